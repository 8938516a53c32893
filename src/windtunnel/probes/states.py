"""One recorded forward pass at the prediction sites: the readout's input, patterns, q and k."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from windtunnel.hooks import eval_mode, record
from windtunnel.models import TinyGPT
from windtunnel.probes._common import _check_model
from windtunnel.tasks import Batch

__all__ = ["SiteStates", "collect_states"]


@dataclass(frozen=True)
class SiteStates:
    """What one recorded forward pass of a TinyGPT gives the geometry diagnostics.

    Attributes:
        residual: the final-norm residual at the prediction sites *including the norm's gain (and
            LayerNorm bias)*, i.e. exactly what the readout reads, [batch, n_sites, d_model].
            (``ln_final.hook_normalized`` is taken before the gain; the gain is a per-feature
            scale, so the z-scored PCA statistics of §8.3 are the same either way.)
        entropy_bits: H_Bayes at each site, [batch, n_sites].
        positions: the site positions, long [n_sites].
        patterns: ``blocks.{l}.attn.hook_pattern`` per layer, [layer, batch, head, pos, pos].
        q, k: ``hook_q`` / ``hook_k`` per layer, [layer, batch, pos, head, d_head].
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
def collect_states(model: TinyGPT, task: Any, batch: Batch) -> SiteStates:
    """Run ``model`` (in eval mode) on ``batch`` and record what the diagnostics need (SPEC §8.3).

    Raises:
        ValueError: when ``model`` is not a TinyGPT.
    """
    model = _check_model("collect_states", model)
    device = next(model.parameters()).device
    wanted = lambda name: name == "ln_final.hook_normalized" or name.endswith(("attn.hook_pattern", "attn.hook_q", "attn.hook_k"))  # noqa: E731
    with eval_mode(model), record(model, names=wanted) as cache:
        logits = model(batch.tokens.to(device))
    sites = batch.sites.to(device)
    norm = model.ln_final
    residual = cache["ln_final.hook_normalized"][:, sites] * norm.w
    if getattr(norm, "b", None) is not None:
        residual = residual + norm.b
    n = model.config.n_layers
    return SiteStates(
        residual=residual.detach(),
        entropy_bits=batch.entropy_bits.to(device),
        positions=sites,
        patterns=torch.stack([cache[f"blocks.{l}.attn.hook_pattern"] for l in range(n)]),
        q=torch.stack([cache[f"blocks.{l}.attn.hook_q"] for l in range(n)]),
        k=torch.stack([cache[f"blocks.{l}.attn.hook_k"] for l in range(n)]),
        logits=logits,
    )
