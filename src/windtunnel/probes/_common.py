"""What every instrument of :mod:`windtunnel.probes` shares: the tidy telemetry row, the loss
signature, replayable generators, the logits of any model's output, and the one error an
instrument raises for a model it does not support."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

import windtunnel.sites as sites
from windtunnel.tasks import Batch

Row = dict[str, Any]
LossFn = Callable[[torch.Tensor, Batch, Any], torch.Tensor]


def _replayer(generator: torch.Generator | None) -> Callable[[], torch.Generator | None]:
    """A function that returns, at every call, a fresh generator in ``generator``'s present state
    (None for None): the same draws every time, and ``generator`` itself is left untouched."""
    if generator is None:
        return lambda: None
    state, device = generator.get_state(), generator.device

    def replay() -> torch.Generator:
        g = torch.Generator(device=device)
        g.set_state(state)
        return g

    return replay


def _row(step: int, metric: str, value: Any, layer: int | None = None, head: int | None = None) -> Row:
    value = float(value)
    return {"step": step, "layer": layer, "head": head, "metric": metric, "value": value if math.isfinite(value) else None}


def _model_name(model: Any) -> str:
    cls = type(model)
    return f"{cls.__name__} ({cls.__module__})"


def _require(instrument: str, model: Any, *features: str) -> None:
    """Raise the one ValueError naming ``instrument`` and the model class when the model's adapter
    lacks a feature (see :func:`windtunnel.sites.unsupported`)."""
    for feature in features:
        reason = sites.unsupported(model, feature)
        if reason is not None:
            raise ValueError(f"{instrument}: not available for {_model_name(model)}: {reason}")


def _supported(model: Any, *features: str) -> bool:
    return all(sites.unsupported(model, feature) is None for feature in features)


def _logits(instrument: str, output: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, or a Hugging Face ``ModelOutput``'s ``.logits``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ValueError(
        f"{instrument}: the model must return logits [batch, seq_len, n_outputs] or an output with "
        f".logits (a Hugging Face ModelOutput); got {type(output).__name__}."
    )


@contextlib.contextmanager
def _recorded_sites(instrument: str, model: nn.Module, *, grads: bool) -> Iterator[sites.SiteRecording]:
    """:func:`windtunnel.sites.record_sites` with its errors (a fused kernel, attention outside the
    plain law, an ablated TinyGPT) prefixed by the instrument's name."""
    _require(instrument, model, "sites")
    try:
        with sites.record_sites(model, grads=grads) as recording:
            yield recording
    except ValueError as error:
        if str(error).startswith("record_sites:"):
            raise ValueError(f"{instrument}: {error}") from error
        raise


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class VariantUnavailable(Exception):
    """A geometry variant (docs/theory.md §8.1–§8.3) that cannot be measured on this model or task;
    its message is the reason, which the variant table reports instead of a number."""
