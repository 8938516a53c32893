"""Sites from hook points: the shared reader of the TinyGPT and TransformerLens adapters.

Both models expose, per attention layer, identity modules (hook points) that q, k, v, the masked
scores (``-inf`` off the allowed set), the pattern and the head output z pass through, in the
TransformerLens layouts of arXiv 2512.22473 quantities. :func:`tap` reads them during one
forward pass and registers gradient hooks on the same tensors; it removes every hook on exit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from windtunnel.sites._protocol import (
    SiteRecording,
    _RawSite,
    causal_violation,
    check_plain_softmax,
    non_causal_error,
)

__all__ = ["HookedLayer", "tap"]

_KEYS = ("q", "k", "v", "scores", "pattern", "z")


@dataclass(frozen=True)
class HookedLayer:
    """One attention layer's hook points and scale.

    Attributes:
        name: the layer's path in the model, e.g. ``"blocks.0.attn"``.
        layer: its index.
        points: hook-point modules by key: ``q`` and ``k`` (as the scores see them, e.g. after
            rotary embeddings) [batch, pos, head or kv_head, d_head], ``v``, ``scores`` (masked
            with -inf) and ``pattern`` [batch, head, query_pos, key_pos], ``z``
            [batch, pos, head, d_v]; ``z`` fires last.
        scale: the score scale.
    """

    name: str
    layer: int
    points: dict[str, nn.Module]
    scale: float


@contextlib.contextmanager
def tap(recording: SiteRecording, layers: Iterable[HookedLayer], *, causal_only: bool, grads: bool) -> Iterator[None]:
    """Record one site per layer whenever its ``z`` hook point fires; remove the hooks on exit."""
    handles = []

    def reader(spec: HookedLayer, key: str, live: dict[str, torch.Tensor]):
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            live[key] = output
            if key == "z":  # the layer is complete
                _record(recording, spec, dict(live), causal_only=causal_only, grads=grads)
                live.clear()

        return hook

    for spec in layers:
        live: dict[str, torch.Tensor] = {}
        for key in _KEYS:
            handles.append(spec.points[key].register_forward_hook(reader(spec, key, live)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _record(recording: SiteRecording, spec: HookedLayer, live: dict[str, torch.Tensor], *, causal_only: bool, grads: bool) -> None:
    q, k, v, scores, pattern, z = (live[key].detach() for key in _KEYS)
    mask = scores != -math.inf  # masked scores are filled with -inf; allowed ones are finite
    if causal_only and causal_violation(mask):
        raise non_causal_error(recording.model_name, spec.name)
    n_heads, n_kv = q.shape[2], k.shape[2]
    if n_heads % n_kv:
        raise ValueError(
            f"record_sites: {recording.model_name} layer {spec.name!r} has {n_heads} query heads and "
            f"{n_kv} key-value heads; grouped-query attention needs the second to divide the first."
        )
    n_rep = n_heads // n_kv
    check_plain_softmax(
        recording.model_name,
        spec.name,
        q=q.transpose(1, 2),
        k=k.repeat_interleave(n_rep, dim=2).transpose(1, 2),
        v=v.repeat_interleave(n_rep, dim=2).transpose(1, 2),
        mask=mask,
        scale=spec.scale,
        z=z.transpose(1, 2),
        scores=scores,
        pattern=pattern,
    )
    raw = _RawSite(
        name=spec.name,
        layer=spec.layer,
        q=q,
        k=k,
        v=v,
        mask=mask,
        scale=spec.scale,
        pattern=pattern,
        z=z,
        kv_head_of=tuple(h // n_rep for h in range(n_heads)),  # repeat_interleave: head h reads h // n_rep
    )
    recording._add(raw, {key: live[key] for key in ("q", "k", "v", "z", "scores")}, grads=grads)
