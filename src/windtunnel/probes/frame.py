"""Key orthogonality of the hypothesis tokens, layer by layer (SPEC §8.1)."""

from __future__ import annotations

from typing import Any

import torch

from windtunnel.geometry import KeyOrthogonality, key_orthogonality
from windtunnel.models import TinyGPT
from windtunnel.probes._common import _check_model

__all__ = ["hypothesis_tokens", "layer_key_orthogonality"]


def hypothesis_tokens(task: Any) -> torch.Tensor | None:
    """Token ids that name the hypotheses (SPEC §8.1), or None when no input token does.

    For hard-label tasks the hypothesis slice indexes the input vocabulary, so the hypothesis
    tokens are ``class_offset .. class_offset + n_classes - 1``: the value tokens V..2V-1 in
    bijection format B, all V tokens in format A, the value tokens in associative recall. For
    soft-target tasks (the HMM) the slice is a separate state readout and no input token stands
    for a hidden state (the symbol tokens are observations), so key orthogonality is skipped.
    """
    if task.soft_targets:
        return None
    return torch.arange(task.class_offset, task.class_offset + task.n_classes)


def layer_key_orthogonality(model: TinyGPT, tokens: torch.Tensor) -> tuple[KeyOrthogonality, ...]:
    """Key orthogonality of every layer on the given hypothesis tokens (SPEC §8.1).

    Layer l uses n_l(e_x) = ``blocks[l].ln1(W_E[x])`` (the block's pre-attention norm with its
    gain, no position embedding) and that layer's ``W_K``. For l = 0 this is exactly the key a
    hypothesis token would get at the input; for deeper layers it is the same probe of the key
    map (the residual there is no longer the bare embedding), a convention kept for comparability.
    """
    model = _check_model("layer_key_orthogonality", model)
    with torch.no_grad():
        emb = model.embed.W_E[tokens.to(model.embed.W_E.device)].double()  # [n_hyp, d_model]
        return tuple(
            key_orthogonality(block.ln1(emb), block.attn.W_K.detach().double()) for block in model.blocks
        )
