"""Attention sites of TransformerLens ``HookedTransformer`` models, read from their hook points.

For every block the adapter reads ``attn.hook_q`` (``hook_rot_q`` under rotary embeddings, the
queries the scores are built from), ``hook_k`` (``hook_rot_k``), ``hook_v``,
``hook_attn_scores`` (whose ``-inf`` entries give the mask), ``hook_pattern`` and ``hook_z``; the
scale is ``1 / attn.attn_scale``. Gradient hooks on the same tensors give u = ``hook_z_grad``
and the gradients TransformerLens's own backward cache would store (arXiv 2512.22473 §2.2).
Keys and values of grouped-query models stay per key-value head, as TransformerLens records them.

TransformerLens is never imported here: a model is recognised through ``sys.modules``, so a
``HookedTransformer`` exists only where the user has installed ``pip install 'windtunnel[tl]'``
(the 3.x line; 4.x removed ``HookedTransformer``).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from windtunnel.sites._protocol import (
    SiteRecording,
    _RawSite,
    causal_violation,
    check_plain_softmax,
    non_causal_error,
)

__all__ = ["attach", "matches"]


def _hooked_transformer_class() -> type | None:
    module = sys.modules.get("transformer_lens.HookedTransformer")
    return getattr(module, "HookedTransformer", None) if module is not None else None


def matches(model: Any) -> bool:
    """True for a TransformerLens ``HookedTransformer`` (checked without importing TransformerLens)."""
    cls = _hooked_transformer_class()
    return cls is not None and isinstance(model, cls)


@contextlib.contextmanager
def attach(model: nn.Module, recording: SiteRecording, *, causal_only: bool, grads: bool) -> Iterator[None]:
    """Fill ``recording`` from the attention hook points of every block of ``model``.

    Raises:
        ValueError: with ``causal_only``, when a layer attends to later positions; when a layer
            is not plain softmax attention over the recorded q, k, v (ALiBi, soft-capping, sinks).
    """
    rotary = getattr(model.cfg, "positional_embedding_type", None) == "rotary"
    handles = []
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        live: dict[str, torch.Tensor] = {}
        points = {
            "q": attn.hook_rot_q if rotary else attn.hook_q,
            "k": attn.hook_rot_k if rotary else attn.hook_k,
            "v": attn.hook_v,
            "scores": attn.hook_attn_scores,
            "pattern": attn.hook_pattern,
        }

        def store(key: str, live: dict[str, torch.Tensor] = live):
            def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
                live[key] = output

            return hook

        def finish(_module: nn.Module, _args: tuple, z: torch.Tensor, *, live=live, attn=attn, layer=layer) -> None:
            live["z"] = z
            _record(recording, f"blocks.{layer}.attn", layer, attn, dict(live), causal_only=causal_only, grads=grads)
            live.clear()

        for key, point in points.items():
            handles.append(point.register_forward_hook(store(key)))
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
    attn: nn.Module,
    live: dict[str, torch.Tensor],
    *,
    causal_only: bool,
    grads: bool,
) -> None:
    q, k, v, scores, pattern, z = (live[key].detach() for key in ("q", "k", "v", "scores", "pattern", "z"))
    mask = scores != -math.inf  # TransformerLens fills masked scores with IGNORE = -inf
    if causal_only and causal_violation(mask):
        raise non_causal_error(recording.model_name, name)
    n_heads, n_kv = q.shape[2], k.shape[2]
    if n_heads % n_kv:
        raise ValueError(
            f"record_sites: {recording.model_name} layer {name!r} has {n_heads} query heads and "
            f"{n_kv} key-value heads; grouped-query attention needs the second to divide the first."
        )
    n_rep = n_heads // n_kv
    scale = 1.0 / float(attn.attn_scale)
    check_plain_softmax(
        recording.model_name,
        name,
        q=q.transpose(1, 2),
        k=k.repeat_interleave(n_rep, dim=2).transpose(1, 2),
        v=v.repeat_interleave(n_rep, dim=2).transpose(1, 2),
        mask=mask,
        scale=scale,
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
        scale=scale,
        pattern=pattern,
        z=z,
        kv_head_of=tuple(h // n_rep for h in range(n_heads)),  # torch.repeat_interleave in TL's GQA
    )
    recording._add(raw, {key: live[key] for key in ("q", "k", "v", "z", "scores")}, grads=grads)
