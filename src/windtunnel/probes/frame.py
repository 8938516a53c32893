"""Key orthogonality of the hypothesis tokens, layer by layer (docs/theory.md §8.1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import windtunnel.sites as sites
from windtunnel.geometry import KeyOrthogonality, key_orthogonality
from windtunnel.probes._common import _require

__all__ = ["hypothesis_tokens", "layer_key_orthogonality"]


def hypothesis_tokens(task: Any) -> torch.Tensor | None:
    """Token ids that name the hypotheses (docs/theory.md §8.1), or None when no input token does.

    For hard-label tasks the hypothesis slice indexes the input vocabulary, so the hypothesis
    tokens are ``class_offset .. class_offset + n_classes - 1``: the value tokens V..2V-1 in
    bijection format B, all V tokens in format A, the value tokens in associative recall. For
    soft-target tasks (the HMM) the slice is a separate state readout and no input token stands
    for a hidden state (the symbol tokens are observations), so key orthogonality is skipped.
    """
    if task.soft_targets:
        return None
    return torch.arange(task.class_offset, task.class_offset + task.n_classes)


def layer_key_orthogonality(model: nn.Module, tokens: torch.Tensor) -> tuple[KeyOrthogonality, ...]:
    """Key orthogonality of every layer on the given hypothesis tokens (docs/theory.md §8.1).

    Layer l uses n_l(e_x), the layer's pre-attention norm (with its gain) of the token embedding
    W_E[x] without position embedding, and that layer's ``W_K``, both from the model's adapter
    (:func:`windtunnel.sites.token_keys`; TinyGPT: ``blocks[l].ln1`` and ``blocks[l].attn.W_K``;
    TransformerLens: the same names), in float64. For l = 0 this is exactly the key a hypothesis
    token would get at the input; for deeper layers it is the same probe of the key map (the
    residual there is no longer the bare embedding), a convention kept for comparability.

    Shapes: tokens long [n_hyp] -> per layer ``KeyOrthogonality`` over [head] (key-value heads
    under grouped-query attention).

    Raises:
        ValueError: naming the model class when its adapter has no key map: Hugging Face models,
            whose adapter sees attention only through the AttentionInterface and so knows no
            architecture's W_K or pre-attention norm (see :func:`windtunnel.sites.unsupported`).
    """
    _require("layer_key_orthogonality", model, "token_keys")
    return tuple(
        key_orthogonality(layer.normed_embeddings, layer.w_key) for layer in sites.token_keys(model, tokens, dtype=torch.float64)
    )
