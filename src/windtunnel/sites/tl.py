"""Attention sites of TransformerLens ``HookedTransformer`` models, read from their hook points.

For every block the adapter reads ``attn.hook_q`` (``hook_rot_q`` under rotary embeddings, the
queries the scores are built from), ``hook_k`` (``hook_rot_k``), ``hook_v``,
``hook_attn_scores`` (whose ``-inf`` entries give the mask), ``hook_pattern`` and ``hook_z``; the
scale is ``1 / attn.attn_scale``. Gradient hooks on the same tensors give u = ``hook_z_grad``
and the gradients TransformerLens's own backward cache would store (arXiv 2512.22473).
Keys and values of grouped-query models stay per key-value head, as TransformerLens records them.

TransformerLens is never imported here: a model is recognised through ``sys.modules``, so a
``HookedTransformer`` exists only where the user has installed ``pip install 'windtunnel[tl]'``
(the 3.x line; 4.x removed ``HookedTransformer``).

``TransformerBridge`` (TransformerLens 3.x's ``model_bridge``, the only model class of 4.x) is not
supported: booting it replaces the wrapped Hugging Face model's attention modules with bridge
components that compute attention themselves, so the Hugging Face adapter never sees a call (and
says so), and the bridge's ``hook_attn_scores`` carry no ``-inf`` entries (checked on GPT-2 with
TransformerLens 3.9), so the mask its softmax applied cannot be read from its hook points.

Instrument features (:mod:`windtunnel.sites._instruments`): the readout is the input of
``unembed``; token keys are ``blocks[l].ln1(embed.W_E[x])`` with ``attn.W_K`` (``attn._W_K``, per
key-value head, under grouped-query attention); the value projection is ``attn.W_V``/``b_V``
(``_W_V``/``_b_V``) with the attention call's ``value_input``; ablations are forward hooks on
``attn.hook_z``, ``hook_attn_out``, ``hook_mlp_out`` and the block itself. Configurations that feed
each head its own input (``use_split_qkv_input``, ``use_attn_in``), normalise q and k after the
projection (``use_qk_norm``) or put the norms after the sublayers (post-norm architectures) have
no per-layer key map, and the first two no value projection of [batch, pos, d_model] inputs.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from windtunnel.sites._hookpoints import HookedLayer, tap
from windtunnel.sites._protocol import SiteRecording, TokenKeys, ValueProjection, ablation_heads_by_layer

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


def _hooked_transformer_class() -> type | None:
    module = sys.modules.get("transformer_lens.HookedTransformer")
    return getattr(module, "HookedTransformer", None) if module is not None else None


def matches(model: Any) -> bool:
    """True for a TransformerLens ``HookedTransformer`` (checked without importing TransformerLens)."""
    cls = _hooked_transformer_class()
    return cls is not None and isinstance(model, cls)


def attach(model: nn.Module, recording: SiteRecording, *, causal_only: bool, grads: bool) -> AbstractContextManager[None]:
    """Fill ``recording`` from the attention hook points of every block of ``model``.

    Raises:
        ValueError: when recording, as :func:`windtunnel.sites.record_sites`: with
            ``causal_only``, a layer that attends to later positions (``attention_dir =
            "bidirectional"``); a layer that is not plain softmax attention over the recorded q,
            k, v (ALiBi, soft-capping, attention sinks, log-n query scaling).
    """
    rotary = getattr(model.cfg, "positional_embedding_type", None) == "rotary"
    layers = [
        HookedLayer(
            name=f"blocks.{layer}.attn",
            layer=layer,
            points={
                "q": block.attn.hook_rot_q if rotary else block.attn.hook_q,
                "k": block.attn.hook_rot_k if rotary else block.attn.hook_k,
                "v": block.attn.hook_v,
                "scores": block.attn.hook_attn_scores,
                "pattern": block.attn.hook_pattern,
                "z": block.attn.hook_z,
            },
            scale=1.0 / float(block.attn.attn_scale),  # TransformerLens divides the scores by attn_scale
        )
        for layer, block in enumerate(model.blocks)
    ]
    return tap(recording, layers, causal_only=causal_only, grads=grads)


# ----------------------------------------------------------------------------- instrument features


def _post_norm(model: nn.Module) -> bool:
    architectures = sys.modules.get("transformer_lens.utilities.architectures")
    post_norm = getattr(architectures, "POST_NORM_ARCHITECTURES", ())
    return getattr(model.cfg, "original_architecture", None) in post_norm


def unsupported(model: nn.Module, feature: str) -> str | None:
    """Why ``model`` lacks ``feature``, or None (see :func:`windtunnel.sites.unsupported`)."""
    cfg = model.cfg
    per_head_inputs = bool(getattr(cfg, "use_split_qkv_input", False) or getattr(cfg, "use_attn_in", False))
    if feature == "token_keys":
        if per_head_inputs or getattr(cfg, "use_qk_norm", False) or _post_norm(model):
            return (
                "a HookedTransformer with use_split_qkv_input, use_attn_in, use_qk_norm or post-norm "
                "blocks has no per-layer key map n_l(e_x) W_K to apply to token embeddings."
            )
    if feature == "value_projections" and per_head_inputs:
        return "a HookedTransformer with use_split_qkv_input or use_attn_in feeds every head its own value input."
    return None


def readout_hook(model: nn.Module, sink: Callable[[torch.Tensor], None]) -> RemovableHandle:
    """Pass the input of ``unembed`` (the final norm's output, gain and bias included) to ``sink``."""
    return model.unembed.register_forward_pre_hook(lambda _m, args: sink(args[0]))


def final_residual_hook(model: nn.Module, sink: Callable[[torch.Tensor], None]) -> RemovableHandle:
    """Pass the input of ``ln_final`` (of ``unembed`` when the model has no final norm) to ``sink``."""
    norm = getattr(model, "ln_final", None)
    target = norm if isinstance(norm, nn.Module) else model.unembed
    return target.register_forward_pre_hook(lambda _m, args: sink(args[0]))


def _own(attn: nn.Module, name: str) -> Any:
    """The stored parameter: ``_W_K`` etc. per key-value head under grouped-query attention."""
    own = getattr(attn, "_" + name, None)
    return own if isinstance(own, nn.Parameter) else getattr(attn, name, None)


def token_keys(model: nn.Module, tokens: torch.Tensor, dtype: torch.dtype) -> tuple[TokenKeys, ...]:
    """Layer l: ``blocks[l].ln1(W_E[tokens])`` (no positions) and the layer's W_K."""
    w_e = model.embed.W_E
    emb = w_e[tokens.to(w_e.device)].to(dtype)[None]  # [1, n_tokens, d_model]: TL norms expect a batch
    return tuple(
        TokenKeys(normed_embeddings=block.ln1(emb)[0].to(dtype), w_key=_own(block.attn, "W_K").detach().to(dtype), embeddings=emb[0].detach())
        for block in model.blocks
    )


def _value_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["value_input"] if "value_input" in kwargs else args[2]


def value_projections(model: nn.Module) -> tuple[ValueProjection, ...]:
    """Layer l: the attention's W_V and b_V (per key-value head), ``hook_v``, and its ``value_input``."""
    return tuple(
        ValueProjection(
            name=f"blocks.{l}.attn",
            weight=_own(block.attn, "W_V"),
            bias=_own(block.attn, "b_V"),
            values=block.attn.hook_v,
            inputs=block.attn,
            input_of=_value_input,
        )
        for l, block in enumerate(model.blocks)
    )


def ablation_layout(model: nn.Module) -> tuple[int, int]:
    """(n_layers, n_heads) from the model's config."""
    return int(model.cfg.n_layers), int(model.cfg.n_heads)


@contextlib.contextmanager
def ablated(
    model: nn.Module, *, heads: list, bypass: list, zero_attn_out: list, zero_mlp_out: list
) -> Iterator[nn.Module]:
    """Ablations as forward hooks: a head's ``hook_z`` slice set to 0 (its output before W_O, as
    TinyGPT's pattern multiplier of 0 gives), a layer's ``hook_attn_out``/``hook_mlp_out`` set to 0,
    or its block returning its input (bypass). The hooks are removed on exit.

    Raises:
        ValueError: when a layer or head index is out of range.
    """
    n_layers, n_heads = ablation_layout(model)
    by_layer = ablation_heads_by_layer(
        f"{type(model).__name__}.ablated", n_layers, n_heads, heads=heads, bypass=bypass,
        zero_attn_out=zero_attn_out, zero_mlp_out=zero_mlp_out,
    )

    def zero_heads(index: list[int]) -> Callable:
        return lambda _m, _args, z: z.index_fill(2, torch.tensor(index, device=z.device), 0.0)  # z [batch, pos, head, d_head]

    def zero(_m: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(output)

    def identity(_m: nn.Module, args: tuple, kwargs: dict, _output: torch.Tensor) -> torch.Tensor:
        return args[0] if args else kwargs["resid_pre"]

    handles = [model.blocks[layer].attn.hook_z.register_forward_hook(zero_heads(index)) for layer, index in by_layer.items()]
    handles += [model.blocks[layer].hook_attn_out.register_forward_hook(zero) for layer in zero_attn_out]
    handles += [model.blocks[layer].hook_mlp_out.register_forward_hook(zero) for layer in zero_mlp_out]
    handles += [model.blocks[layer].register_forward_hook(identity, with_kwargs=True) for layer in bypass]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
