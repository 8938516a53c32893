"""Routing-law telemetry: advantage, responsibility and exactness statistics per head (docs/theory.md §8.4)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from windtunnel.hooks import eval_mode
from windtunnel.probes._common import LossFn, Row, _device, _logits, _recorded_sites, _require, _row
from windtunnel.probes.calibration import site_loss_nats
from windtunnel.sites import AttentionSite, SiteRecording, check_law, model_gradient_errors, routing_law
from windtunnel.tasks import Batch

__all__ = ["RoutingLawStats", "routing_law_stats", "routing_law_stats_of_sites"]


@dataclass(frozen=True)
class RoutingLawStats:
    """Routing-law telemetry of every head on one forward/backward of the training loss (§8.4).

    All statistics are [layer, head]. "Live" query rows are those whose upstream gradient u_i is
    nonzero (rows that feed the loss); u comes from the mean loss over the labelled sites.

    Attributes:
        loss_nats: the training loss of the pass.
        advantage_abs_mean: mean |adv_ij| over allowed entries of live rows.
        positive_advantage_mass: Σ_j α_ij 1[adv_ij > 0], averaged over live rows (adv within
            rounding of 0 counts as 0).
        d_scores_fro: ‖dS‖_F = ‖dL/ds‖_F over the batch.
        advantage_attention_cov: covariance of (α_ij, adv_ij) pooled over allowed entries of live
            rows (ours: > 0 when the attended keys are those the step would reinforce).
        responsibility_max: max_j R_j (R_j = Σ_i α_ij over live rows), averaged over sequences.
        responsibility_cv: std_j R_j / mean_j R_j, averaged over sequences.
        value_pull_norm: ‖dV‖_F = ‖AᵀU‖_F over the batch.
        law_rel_error: per layer [layer], worst relative error of :func:`windtunnel.sites.check_law`
            (closed forms vs an autograd rebuild of the heads, float64, on the first 8 sequences).
        model_grad_rel_error: per layer [layer], max relative error of the closed-form dQ, dK, dV
            against the gradients the model's own backward left at q, k, v
            (:func:`windtunnel.sites.model_gradient_errors`, in the model's dtype).
    """

    loss_nats: float
    advantage_abs_mean: torch.Tensor
    positive_advantage_mass: torch.Tensor
    d_scores_fro: torch.Tensor
    advantage_attention_cov: torch.Tensor
    responsibility_max: torch.Tensor
    responsibility_cv: torch.Tensor
    value_pull_norm: torch.Tensor
    law_rel_error: torch.Tensor
    model_grad_rel_error: torch.Tensor

    _PER_HEAD = (
        "advantage_abs_mean",
        "positive_advantage_mass",
        "d_scores_fro",
        "advantage_attention_cov",
        "responsibility_max",
        "responsibility_cv",
        "value_pull_norm",
    )

    def rows(self, step: int) -> list[Row]:
        """Tidy telemetry rows {step, layer, head, metric, value}."""
        out = [_row(step, "law_loss_nats", self.loss_nats)]
        for name in self._PER_HEAD:
            for layer, per_head in enumerate(getattr(self, name).tolist()):
                out += [_row(step, name, v, layer, h) for h, v in enumerate(per_head)]
        for layer in range(self.law_rel_error.shape[0]):
            out.append(_row(step, "law_check_rel_error", self.law_rel_error[layer], layer))
            out.append(_row(step, "law_model_grad_rel_error", self.model_grad_rel_error[layer], layer))
        return out


def routing_law_stats(model: nn.Module, task: Any, batch: Batch, *, loss_fn: LossFn = site_loss_nats) -> RoutingLawStats:
    """Advantage, responsibility and exactness statistics per head (docs/theory.md §8.4).

    One forward pass in eval mode records every layer's attention site
    (:func:`windtunnel.sites.record_sites`: q, k, v exactly as the scores were built from them, the
    mask the model used, its scale and the pattern); one backward of ``loss_fn`` gives u = dL/dz
    and the model's own gradients at q, k, v. Each site goes through
    :func:`windtunnel.sites.routing_law` in float64 (keys and values of grouped-query layers
    expanded to query heads, so every statistic is per query head). Parameter gradients are
    restored afterwards, so a probe does not disturb training.

    Works on every model with an attention-site adapter (TinyGPT, Hugging Face causal LMs,
    TransformerLens); ``model`` may return logits or an output with ``.logits``, which
    ``loss_fn(logits, batch, task)`` receives.

    Raises:
        ValueError: naming the model class when it has no attention sites (see
            :func:`windtunnel.sites.unsupported`), or as :func:`windtunnel.sites.record_sites`
            (e.g. a TinyGPT with heads ablated, a fused attention kernel).
    """
    _require("routing_law_stats", model, "sites")
    device = _device(model)
    recording, loss_nats = recorded_backward(
        "routing_law_stats", model, batch.tokens.to(device), lambda logits: loss_fn(logits, batch.to(device), task)
    )
    return routing_law_stats_of_sites(recording.sites, loss_nats=loss_nats)


def recorded_backward(
    instrument: str, model: nn.Module, tokens: torch.Tensor, loss_of_logits: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[SiteRecording, float]:
    """One forward pass of ``model`` on ``tokens`` in eval mode and one backward pass of
    ``loss_of_logits(logits)``, recorded by :func:`windtunnel.sites.record_sites` (so every site
    has its u); the model's parameter gradients are restored afterwards, so a probe does not
    disturb training. Returns (the recording, the loss in nats).

    Raises:
        ValueError: naming ``instrument`` and the model class, as :func:`windtunnel.sites.record_sites`.
    """
    saved_grads = [p.grad for p in model.parameters()]
    try:
        with eval_mode(model), torch.enable_grad(), _recorded_sites(instrument, model, grads=True) as recording:
            loss = loss_of_logits(_logits(instrument, model(tokens)))
            loss.backward()
    finally:
        for p, g in zip(model.parameters(), saved_grads):
            p.grad = g
    return recording, float(loss.detach())


def routing_law_stats_of_sites(recorded: Sequence[AttentionSite], *, loss_nats: float) -> RoutingLawStats:
    """The statistics of :func:`routing_law_stats` from sites already recorded with their u (a
    forward and backward pass of any loss inside :func:`windtunnel.sites.record_sites`), one site
    per layer in layer order; ``loss_nats`` is that loss, reported as is.

    Raises:
        ValueError: as :func:`windtunnel.sites.routing_law` when a site has no u (no backward
            pass reached it).
    """
    stats: dict[str, list[torch.Tensor]] = {name: [] for name in RoutingLawStats._PER_HEAD}
    law_err, model_err = [], []
    for site in recorded:
        law = routing_law(site, dtype=torch.float64)
        g = law.heads  # [batch, head, query_pos, ...], the layout of windtunnel.dynamics
        u = site.u.transpose(1, 2)  # [batch, head, query_pos, d_v]
        live = (u.abs().sum(-1) > 0)[..., None] & g.mask  # [batch, head, q, k]
        n_live = live.sum((0, 2, 3)).clamp_min(1)
        rows_live = live.any(-1)  # [batch, head, q]
        n_rows = rows_live.sum((0, 2)).clamp_min(1)
        adv, alpha = g.advantage, g.alpha
        stats["advantage_abs_mean"].append((adv.abs() * live).sum((0, 2, 3)) / n_live)
        # adv is a difference of dot products: exact zeros (a one-key row) come out as +-1e-20, so
        # its sign counts only above the rounding floor of its two terms
        floor = 1e3 * torch.finfo(adv.dtype).eps * (g.compatibility.abs() + g.expected_compatibility.abs()[..., None])
        stats["positive_advantage_mass"].append((alpha * (adv > floor) * live).sum(-1).sum((0, 2)) / n_rows)
        stats["d_scores_fro"].append(g.d_scores.pow(2).sum((0, 2, 3)).sqrt())
        mean_a = (alpha * live).sum((0, 2, 3)) / n_live
        mean_adv = (adv * live).sum((0, 2, 3)) / n_live
        cov = ((alpha - mean_a[:, None, None]) * (adv - mean_adv[:, None, None]) * live).sum((0, 2, 3)) / n_live
        stats["advantage_attention_cov"].append(cov)
        resp = (alpha * rows_live[..., None]).sum(-2)  # [batch, head, key_pos]
        stats["responsibility_max"].append(resp.amax(-1).mean(0))
        mean_r = resp.mean(-1)
        cv = torch.where(mean_r > 0, resp.std(-1, correction=0) / mean_r.clamp_min(1e-300), torch.zeros_like(mean_r))
        stats["responsibility_cv"].append(cv.mean(0))
        stats["value_pull_norm"].append(g.d_values.pow(2).sum((0, 2, 3)).sqrt())
        # the autograd rebuild costs as much as the stats; 8 sequences are enough for an exactness check
        law_err.append(check_law(_first_sequences(site, 8)).worst_rel_error)
        errors = model_gradient_errors(site, law)
        model_err.append(max(errors["d_queries"], errors["d_keys"], errors["d_values"]))
    return RoutingLawStats(
        loss_nats=float(loss_nats),
        **{name: torch.stack(values).float() for name, values in stats.items()},
        law_rel_error=torch.tensor(law_err),
        model_grad_rel_error=torch.tensor(model_err),
    )


def _first_sequences(site: AttentionSite, n: int) -> AttentionSite:
    """The site restricted to its first ``n`` sequences (for the autograd rebuild of check_law)."""
    few = slice(0, n)
    return dataclasses.replace(
        site,
        q=site.q[few],
        k=site.k[few],
        v=site.v[few],
        mask=site.mask[few],
        pattern=site.pattern[few],
        z=site.z[few],
        z_grad=site.u[few],
        q_grad=None,
        k_grad=None,
        v_grad=None,
        scores_grad=None,
    )
