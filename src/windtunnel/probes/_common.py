"""What every instrument of :mod:`windtunnel.probes` shares: the tidy telemetry row, the loss
signature, replayable generators and the model checks."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from windtunnel._checks import must
from windtunnel.models import TinyGPT
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


def _check_model(owner: str, model: Any) -> TinyGPT:
    if not isinstance(model, TinyGPT):
        raise ValueError(must(owner, "model", "a TinyGPT (attention probes need its hooks)", type(model).__name__))
    return model


def _check_unablated(owner: str, model: Any) -> TinyGPT:
    """A TinyGPT without head ablations: gradient probes read hook_v/hook_z as the unablated head's."""
    model = _check_model(owner, model)
    if any(block.attn.head_multiplier is not None for block in model.blocks):
        raise ValueError(must(owner, "model", "free of head ablations", "an ablated model"))
    return model


def _row(step: int, metric: str, value: Any, layer: int | None = None, head: int | None = None) -> Row:
    value = float(value)
    return {"step": step, "layer": layer, "head": head, "metric": metric, "value": value if math.isfinite(value) else None}
