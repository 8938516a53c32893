"""Attention sites of windtunnel's own models, read from their hook points (arXiv 2512.22473).

Every :class:`windtunnel.attention.MultiHeadAttention` in a model (TinyGPT's blocks) already
exposes ``hook_q``, ``hook_k``, ``hook_v``, ``hook_attn_scores``, ``hook_pattern`` and ``hook_z``;
this adapter reads them during one forward pass and registers gradient hooks on the same tensors,
so that ``hook_z``'s gradient is the site's u. Nothing stays registered after the block.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from torch import nn

from windtunnel.attention import MultiHeadAttention
from windtunnel.sites._hookpoints import HookedLayer, tap
from windtunnel.sites._protocol import SiteRecording

__all__ = ["attach", "matches"]


def _attention_modules(model: nn.Module) -> list[tuple[str, MultiHeadAttention]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MultiHeadAttention)]


def matches(model: nn.Module) -> bool:
    """True when ``model`` is, or contains, a windtunnel :class:`MultiHeadAttention`."""
    return isinstance(model, nn.Module) and bool(_attention_modules(model))


def attach(model: nn.Module, recording: SiteRecording, *, causal_only: bool, grads: bool) -> AbstractContextManager[None]:
    """Fill ``recording`` from the hook points of every windtunnel attention module of ``model``;
    layer l is the l-th such module in module order.

    Raises:
        ValueError: when a head carries an ablation multiplier (its z is m_h·a·v, outside the
            plain law); when recording, as :func:`windtunnel.sites.record_sites`.
    """
    modules = _attention_modules(model)
    ablated = [name for name, attn in modules if attn.head_multiplier is not None]
    if ablated:
        raise ValueError(
            f"record_sites: {recording.model_name} has head multipliers (ablations) on {ablated}; "
            "the routing law covers unablated heads; record outside model.ablated()."
        )
    layers = [
        HookedLayer(
            name=name,
            layer=layer,
            points={
                "q": attn.hook_q,
                "k": attn.hook_k,
                "v": attn.hook_v,
                "scores": attn.hook_attn_scores,
                "pattern": attn.hook_pattern,
                "z": attn.hook_z,
            },
            scale=attn.scale,
        )
        for layer, (name, attn) in enumerate(modules)
    ]
    return tap(recording, layers, causal_only=causal_only, grads=grads)
