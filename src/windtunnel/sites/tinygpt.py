"""Attention sites of windtunnel's own models, read from their hook points (arXiv 2512.22473).

Every :class:`windtunnel.attention.MultiHeadAttention` in a model (TinyGPT's blocks) already
exposes ``hook_q``, ``hook_k``, ``hook_v``, ``hook_attn_scores``, ``hook_pattern`` and ``hook_z``;
this adapter reads them during one forward pass and registers gradient hooks on the same tensors,
so that ``hook_z``'s gradient is the site's u. Nothing stays registered after the block.

The instrument features (:mod:`windtunnel.sites._instruments`) read TinyGPT's layout: ``blocks[l]``
with a pre-attention norm ``ln1`` and ``attn``, the embedding ``embed.W_E``, the final norm
``ln_final`` and the method ``ablated``; a model built on MultiHeadAttention without that layout
has the sites but not the features.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from windtunnel.attention import MultiHeadAttention
from windtunnel.sites._hookpoints import HookedLayer, tap
from windtunnel.sites._protocol import SiteRecording, TokenKeys, ValueProjection

__all__ = [
    "ablated",
    "ablation_layout",
    "attach",
    "final_residual_hook",
    "matches",
    "readout_hook",
    "token_keys",
    "unsupported",
    "value_projections",
]

_LAYOUT = "TinyGPT's layout (blocks[l].ln1 and blocks[l].attn, a windtunnel MultiHeadAttention)"


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


# ----------------------------------------------------------------------------- instrument features


def _blocks(model: nn.Module) -> list[nn.Module] | None:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        return None
    ok = all(isinstance(getattr(b, "attn", None), MultiHeadAttention) and isinstance(getattr(b, "ln1", None), nn.Module) for b in blocks)
    return list(blocks) if ok else None


def unsupported(model: nn.Module, feature: str) -> str | None:
    """Why ``model`` lacks ``feature``, or None (see :func:`windtunnel.sites.unsupported`)."""
    if feature in ("readout", "final_residual"):
        ok = isinstance(getattr(model, "ln_final", None), nn.Module)
        return None if ok else f"the {feature} is found at TinyGPT's final norm ln_final, which this model lacks."
    if _blocks(model) is None:
        return f"{feature} reads {_LAYOUT}, which this model lacks."
    if feature == "token_keys" and not isinstance(getattr(getattr(model, "embed", None), "W_E", None), torch.Tensor):
        return "token keys read TinyGPT's token embedding embed.W_E, which this model lacks."
    if feature == "ablation" and not callable(getattr(model, "ablated", None)):
        return "ablations use TinyGPT's ablated() method, which this model lacks."
    if feature == "value_projections" and any(b.attn.head_multiplier is not None for b in _blocks(model)):
        return "its heads carry ablation multipliers (inside model.ablated(heads=...)); the value probe reads unablated heads."
    return None


def readout_hook(model: nn.Module, sink: Callable[[torch.Tensor], None]) -> RemovableHandle:
    """Pass the output of ``ln_final`` (gain and bias included: what the readout reads) to ``sink``."""
    return model.ln_final.register_forward_hook(lambda _m, _args, output: sink(output))


def final_residual_hook(model: nn.Module, sink: Callable[[torch.Tensor], None]) -> RemovableHandle:
    """Pass the input of ``ln_final`` (the residual stream before the final norm) to ``sink``."""
    return model.ln_final.register_forward_pre_hook(lambda _m, args: sink(args[0]))


def token_keys(model: nn.Module, tokens: torch.Tensor, dtype: torch.dtype) -> tuple[TokenKeys, ...]:
    """Layer l: ``blocks[l].ln1(W_E[tokens])`` (no position embedding) and ``blocks[l].attn.W_K``."""
    w_e = model.embed.W_E
    emb = w_e[tokens.to(w_e.device)].to(dtype)  # [n_tokens, d_model]
    return tuple(
        TokenKeys(normed_embeddings=block.ln1(emb), w_key=block.attn.W_K.detach().to(dtype), embeddings=emb.detach())
        for block in _blocks(model)
    )


def _first_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["x"]


def value_projections(model: nn.Module) -> tuple[ValueProjection, ...]:
    """Layer l: ``blocks[l].attn``'s W_V, b_V and ``hook_v``; x is the attention's input (ln1's output)."""
    return tuple(
        ValueProjection(
            name=f"blocks.{l}.attn",
            weight=block.attn.W_V,
            bias=block.attn.b_V,
            values=block.attn.hook_v,
            inputs=block.attn,
            input_of=_first_arg,
        )
        for l, block in enumerate(_blocks(model))
    )


def ablation_layout(model: nn.Module) -> tuple[int, int]:
    """(n_layers, n_heads) of TinyGPT's blocks."""
    blocks = _blocks(model)
    return len(blocks), blocks[0].attn.n_heads


def ablated(model: nn.Module, **kwargs: Any) -> AbstractContextManager[nn.Module]:
    """TinyGPT's own ``model.ablated(heads=..., bypass=..., zero_attn_out=..., zero_mlp_out=...)``."""
    return model.ablated(**kwargs)
