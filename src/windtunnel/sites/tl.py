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
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager
from typing import Any

from torch import nn

from windtunnel.sites._hookpoints import HookedLayer, tap
from windtunnel.sites._protocol import SiteRecording

__all__ = ["attach", "matches"]


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
