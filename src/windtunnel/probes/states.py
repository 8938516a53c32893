"""One recorded forward pass at the prediction sites: the readout's input, the patterns, q and k.

Model-agnostic: the patterns, q and k come from :func:`windtunnel.sites.record_sites`, the
readout's input from :func:`windtunnel.sites.record_readout`, so any model with an attention-site
adapter and a readout (TinyGPT, Hugging Face causal LMs, TransformerLens) is supported.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import windtunnel.sites as sites
from windtunnel.hooks import eval_mode
from windtunnel.probes._common import _device, _logits, _recorded_sites, _require
from windtunnel.tasks import Batch

__all__ = ["GeometryStates", "SiteStates", "collect_geometry_states", "collect_states", "record_patterns", "value_positions"]


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


@dataclass(frozen=True)
class GeometryStates:
    """One recorded forward pass with everything the named geometry variants read (docs/theory.md §8.1–§8.3).

    Attributes:
        tokens: the batch's tokens, long [batch, pos].
        entropy_bits: H_Bayes at each prediction site, [batch, n_sites].
        sites: the site positions, long [n_sites].
        readout: the residual after the final norm (what the readout reads) at every position,
            [batch, pos, d_model].
        final_residual: the residual before the final norm at every position, [batch, pos,
            d_model], or None where the model's adapter has no such hook.
        final_residual_missing: why ``final_residual`` is None (None when it is not).
        patterns: each layer's attention pattern, [layer, batch, head, pos, pos].
        k: each layer's keys as the scores saw them, [layer, batch, pos, kv_head, d_head].
        last_values: the last layer's values v, [batch, pos, kv_head, d_v].
    """

    tokens: torch.Tensor
    entropy_bits: torch.Tensor
    sites: torch.Tensor
    readout: torch.Tensor
    final_residual: torch.Tensor | None
    final_residual_missing: str | None
    patterns: torch.Tensor
    k: torch.Tensor
    last_values: torch.Tensor


@torch.no_grad()
def collect_geometry_states(model: nn.Module, task: Any, batch: Batch) -> GeometryStates:
    """Run ``model`` once (eval mode) on ``batch`` and record what the geometry variants read.

    ``task`` is unused and kept for the signature every instrument shares.

    Raises:
        ValueError: naming the model class when it has no attention sites or no readout (see
            :func:`windtunnel.sites.unsupported`), or as :func:`windtunnel.sites.record_sites`.
    """
    _require("collect_geometry_states", model, "sites", "readout")
    device = _device(model)
    missing = sites.unsupported(model, "final_residual")
    with contextlib.ExitStack() as stack:
        stack.enter_context(eval_mode(model))
        recording = stack.enter_context(_recorded_sites("collect_geometry_states", model, grads=False))
        readout = stack.enter_context(sites.record_readout(model))
        pre = None if missing else stack.enter_context(sites.record_final_residual(model))
        model(batch.tokens.to(device))
    layers = recording.sites
    return GeometryStates(
        tokens=batch.tokens.to(device),
        entropy_bits=batch.entropy_bits.to(device),
        sites=batch.sites.to(device),
        readout=readout.input,
        final_residual=None if pre is None else pre.input,
        final_residual_missing=missing,
        patterns=torch.stack([site.pattern for site in layers]),
        k=torch.stack([site.k for site in layers]),
        last_values=layers[-1].v,
    )


def value_positions(tokens: torch.Tensor, sites_: torch.Tensor, hypothesis: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The value positions of a task: the position just after each prediction site where, in every
    sequence, a hypothesis token stands (the value the site predicted, now revealed; docs/theory.md
    §8.3). Bijection format B: the value tokens 2i + 1 of every key site but the last.

    Shapes: tokens long [batch, pos], sites_ long [n_sites], hypothesis long [n_hyp] or None ->
    (positions long [n], index into sites_ of the site each follows, long [n]); both empty when
    there are none (no hypothesis tokens, or none after the sites).
    """
    empty = torch.zeros(0, dtype=torch.long, device=tokens.device)
    if hypothesis is None:
        return empty, empty
    after = sites_.to(tokens.device) + 1
    inside = after < tokens.shape[1]
    index = torch.arange(sites_.numel(), device=tokens.device)[inside]
    after = after[inside]
    is_value = torch.isin(tokens[:, after], hypothesis.to(tokens.device)).all(0)
    return after[is_value], index[is_value]
