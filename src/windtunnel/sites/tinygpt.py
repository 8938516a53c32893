"""Attention sites of windtunnel's own models, read from their hook points (arXiv 2512.22473 §2).

Every :class:`windtunnel.attention.MultiHeadAttention` in a model (TinyGPT's blocks) already
exposes ``hook_q``, ``hook_k``, ``hook_v``, ``hook_attn_scores``, ``hook_pattern`` and ``hook_z``;
this adapter reads them during one forward pass and registers gradient hooks on the same tensors,
so that ``hook_z``'s gradient is the site's u. Nothing stays registered after the block.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from windtunnel.attention import MultiHeadAttention
from windtunnel.sites._protocol import (
    SiteRecording,
    _RawSite,
    causal_violation,
    check_plain_softmax,
    non_causal_error,
)

__all__ = ["attention_modules", "attach", "matches"]

_HOOKS = ("q", "k", "v", "attn_scores", "pattern", "z")


def attention_modules(model: nn.Module) -> list[tuple[str, MultiHeadAttention]]:
    """Every windtunnel attention module under ``model`` with its path, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MultiHeadAttention)]


def matches(model: nn.Module) -> bool:
    """True when ``model`` is, or contains, a windtunnel :class:`MultiHeadAttention`."""
    return isinstance(model, nn.Module) and bool(attention_modules(model))


@contextlib.contextmanager
def attach(model: nn.Module, recording: SiteRecording, *, causal_only: bool, grads: bool) -> Iterator[None]:
    """Fill ``recording`` from the hook points of every windtunnel attention module of ``model``.

    Raises:
        ValueError: when a head carries an ablation multiplier (its z is m_h·a·v, outside the
            plain law), or, with ``causal_only``, when a layer attends to later positions.
    """
    modules = attention_modules(model)
    ablated = [name for name, attn in modules if attn.head_multiplier is not None]
    if ablated:
        raise ValueError(
            f"record_sites: {recording.model_name} has head multipliers (ablations) on {ablated}; "
            "the routing law covers unablated heads; record outside model.ablated()."
        )
    handles = []
    for layer, (name, attn) in enumerate(modules):
        live: dict[str, torch.Tensor] = {}

        def store(key: str, live: dict[str, torch.Tensor] = live):
            def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
                live[key] = output

            return hook

        def finish(_module: nn.Module, _args: tuple, z: torch.Tensor, *, live=live, name=name, attn=attn, layer=layer) -> None:
            live["z"] = z
            _record(recording, name, layer, attn, dict(live), causal_only=causal_only, grads=grads)
            live.clear()

        for key in _HOOKS[:-1]:
            handles.append(getattr(attn, f"hook_{key}").register_forward_hook(store(key)))
        handles.append(attn.hook_z.register_forward_hook(finish))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _record(
    recording: SiteRecording,
    name: str,
    layer: int,
    attn: MultiHeadAttention,
    live: dict[str, torch.Tensor],
    *,
    causal_only: bool,
    grads: bool,
) -> None:
    q, k, v, scores, pattern, z = (live[key].detach() for key in _HOOKS)
    mask = scores != -math.inf  # masked entries are filled with -inf, allowed ones are finite
    if causal_only and causal_violation(mask):
        raise non_causal_error(recording.model_name, name)
    check_plain_softmax(
        recording.model_name,
        name,
        q=q.transpose(1, 2),
        k=k.transpose(1, 2),
        v=v.transpose(1, 2),
        mask=mask,
        scale=attn.scale,
        z=z.transpose(1, 2),
        scores=scores,
        pattern=pattern,
    )
    raw = _RawSite(
        name=name,
        layer=layer,
        q=q,
        k=k,
        v=v,
        mask=mask,
        scale=attn.scale,
        pattern=pattern,
        z=z,
        kv_head_of=tuple(range(attn.n_heads)),
    )
    recording._add(
        raw,
        {"q": live["q"], "k": live["k"], "v": live["v"], "z": live["z"], "scores": live["attn_scores"]},
        grads=grads,
    )
