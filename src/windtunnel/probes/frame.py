"""Key orthogonality of the hypothesis tokens, layer by layer (docs/theory.md §8.1), and its published variants.

The variants (registered in :data:`windtunnel.probes.GEOMETRY_VARIANTS`) each return
``{"value": layer 0's number, "per_layer": [...]}`` or raise
:class:`~windtunnel.probes._common.VariantUnavailable` with the reason.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

import windtunnel.sites as sites
from windtunnel.geometry import KeyOrthogonality, key_orthogonality, mean_abs_cosine, pooled_mean_cosine
from windtunnel.probes._common import VariantUnavailable, _require
from windtunnel.probes.states import GeometryStates

__all__ = [
    "hypothesis_tokens",
    "key_ortho_hypothesis_abs",
    "key_ortho_in_context_abs",
    "key_ortho_vocabulary_signed",
    "key_ortho_weight_columns_abs",
    "layer_key_orthogonality",
]


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


def _per_layer(values: list[float]) -> dict[str, Any]:
    if not values or not math.isfinite(values[0]):
        raise VariantUnavailable("no finite value at layer 0 (fewer than two keys to compare).")
    return {"value": values[0], "per_layer": [v if math.isfinite(v) else None for v in values]}


def _hypotheses(task: Any) -> torch.Tensor:
    hyp = hypothesis_tokens(task)
    if hyp is None:
        raise VariantUnavailable("the task has no hypothesis tokens (its hypotheses are hidden states; docs/theory.md §8.1).")
    return hyp


def _keys_or_reason(model: nn.Module, tokens: torch.Tensor) -> tuple[sites.TokenKeys, ...]:
    reason = sites.unsupported(model, "token_keys")
    if reason is not None:
        raise VariantUnavailable(reason)
    return sites.token_keys(model, tokens, dtype=torch.float64)


def key_ortho_hypothesis_abs(model: nn.Module, task: Any, states: GeometryStates) -> dict[str, Any]:
    """Ours (docs/theory.md §8.1): mean off-diagonal |cos| of the hypothesis tokens' keys n_l(e_x) W_K
    after the block's pre-attention norm, no positions, averaged over heads; the definition of
    :func:`layer_key_orthogonality` and of the ``key_ortho_abs_cos`` telemetry. The number arXiv
    2512.22471v3 reports for layer 0 (0.052 against 0.082 random) and the authors' REPRODUCE.md
    target (< 0.1) are read against this variant (docs/theory.md §10)."""
    hyp = _hypotheses(task)
    _keys_or_reason(model, hyp[:1])
    return _per_layer([float(ko.mean_abs_cosine) for ko in layer_key_orthogonality(model, hyp)])


def key_ortho_vocabulary_signed(model: nn.Module, task: Any, states: GeometryStates) -> dict[str, Any]:
    """The authors' Paper I analysis script (docs/theory.md §11.7): every vocabulary id (not only the
    hypotheses), the raw token embedding W_E[x] without the block's norm or positions, keys
    W_E[x] W_K per head, and the *signed* mean off-diagonal cosine of the normalised keys,
    averaged over heads. Signed cosines of many directions cancel, so it sits near 0 even at
    initialisation; no paper number is stated for it."""
    keys = _keys_or_reason(model, torch.arange(task.vocab_size))
    values = []
    for layer in keys:
        if layer.embeddings is None:
            raise VariantUnavailable("the model's adapter gives no raw token embeddings.")
        k = torch.einsum("nd,hde->hne", layer.embeddings, layer.w_key)  # [head, vocab, d_head]
        values.append(float(mean_abs_cosine(k, signed=True).mean()))
    return _per_layer(values)


def key_ortho_in_context_abs(model: nn.Module, task: Any, states: GeometryStates) -> dict[str, Any]:
    """Keys as formed in context (docs/theory.md §8.1, §9): the keys the scores saw (positions, rotary
    embeddings and earlier layers included) at the positions holding a hypothesis token, mean
    off-diagonal |cos| over pairs of such positions within a sequence, pooled over sequences
    (:func:`~windtunnel.geometry.pooled_mean_cosine`), averaged over key-value heads. The
    in-context reading ``windtunnel inspect`` uses on Hugging Face models, which have no
    context-free key map; no paper number is stated for it."""
    hyp = _hypotheses(task)
    mask = torch.isin(states.tokens, hyp.to(states.tokens.device))  # [batch, pos]
    keys = states.k.double().permute(0, 3, 1, 2, 4)  # [layer, kv_head, batch, pos, d_head]
    return _per_layer([float(pooled_mean_cosine(k, mask).mean()) for k in keys])


def key_ortho_weight_columns_abs(model: nn.Module, task: Any, states: GeometryStates) -> dict[str, Any]:
    """arXiv 2512.23752 (Paper III, docs/theory.md §9): per head, the d_head columns of W_K (vectors in
    R^{d_model}) and their mean off-diagonal |cos|, averaged over heads; its v1 reports
    0.034–0.18 for pretrained language models (§4.2, Table 2), and its recap of the bijection
    0.09–0.12 against 0.40–0.45 at random initialisation (§2, §6.1). Needs no tokens, so it is defined on every task."""
    keys = _keys_or_reason(model, torch.arange(1))
    return _per_layer([float(mean_abs_cosine(layer.w_key.transpose(1, 2)).mean()) for layer in keys])
