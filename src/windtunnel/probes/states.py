"""One recorded forward pass at the prediction sites: the readout's input, the patterns, q and k.

Model-agnostic: the patterns, q and k come from :func:`windtunnel.sites.record_sites`, the
readout's input from :func:`windtunnel.sites.record_readout`, so any model with an attention-site
adapter and a readout (TinyGPT, Hugging Face causal LMs, TransformerLens) is supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import windtunnel.sites as sites
from windtunnel.hooks import eval_mode
from windtunnel.probes._common import _device, _logits, _recorded_sites, _require
from windtunnel.tasks import Batch

__all__ = ["SiteStates", "collect_states", "record_patterns"]


@dataclass(frozen=True)
class SiteStates:
    """What one recorded forward pass gives the geometry diagnostics.

    Attributes:
        residual: the final-norm residual at the prediction sites *including the norm's gain (and
            LayerNorm bias)*, i.e. exactly what the readout reads, [batch, n_sites, d_model].
            (TinyGPT's ``ln_final.hook_normalized`` is taken before the gain; the gain is a
            per-feature scale, so the z-scored PCA statistics of §8.3 are the same either way.)
        entropy_bits: H_Bayes at each site, [batch, n_sites].
        positions: the site positions, long [n_sites].
        patterns: each layer's attention pattern (the sites' ``pattern``),
            [layer, batch, head, pos, pos].
        q, k: each layer's queries and keys as the scores saw them (after any rotary embedding),
            [layer, batch, pos, head, d_head]; k has ``kv_head`` heads under grouped-query attention.
        logits: [batch, seq_len, n_outputs].
    """

    residual: torch.Tensor
    entropy_bits: torch.Tensor
    positions: torch.Tensor
    patterns: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    logits: torch.Tensor

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(states [n, d_model], entropy_bits [n], positions [n]) with n = batch * n_sites, float64."""
        b, s, d = self.residual.shape
        return (
            self.residual.reshape(b * s, d).double(),
            self.entropy_bits.reshape(b * s).double(),
            self.positions.expand(b, s).reshape(b * s),
        )


@torch.no_grad()
def collect_states(model: nn.Module, task: Any, batch: Batch) -> SiteStates:
    """Run ``model`` (in eval mode) on ``batch`` and record what the diagnostics need (docs/theory.md §8.3).

    Raises:
        ValueError: naming the model class when it has no attention sites or no readout (see
            :func:`windtunnel.sites.unsupported`), or as :func:`windtunnel.sites.record_sites`.
    """
    _require("collect_states", model, "sites", "readout")
    device = _device(model)
    with eval_mode(model), _recorded_sites("collect_states", model, grads=False) as recording, sites.record_readout(model) as readout:
        logits = _logits("collect_states", model(batch.tokens.to(device)))
    positions = batch.sites.to(device)
    layers = recording.sites
    return SiteStates(
        residual=readout.input[:, positions],
        entropy_bits=batch.entropy_bits.to(device),
        positions=positions,
        patterns=torch.stack([site.pattern for site in layers]),
        q=torch.stack([site.q for site in layers]),
        k=torch.stack([site.k for site in layers]),
        logits=logits,
    )


@torch.no_grad()
def record_patterns(model: nn.Module, batch: Batch, *, instrument: str = "record_patterns") -> torch.Tensor:
    """Every layer's attention pattern on ``batch`` (eval mode), [layer, batch, head, pos, pos].

    Needs only the attention sites (no readout, no logits), so a Hugging Face base model works too.

    Raises:
        ValueError: naming ``instrument`` and the model class when it has no attention sites, or as
            :func:`windtunnel.sites.record_sites`.
    """
    with eval_mode(model), _recorded_sites(instrument, model, grads=False) as recording:
        model(batch.tokens.to(_device(model)))
    return torch.stack([site.pattern for site in recording.sites])
