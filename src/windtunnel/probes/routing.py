"""Routing-law telemetry: advantage, responsibility and exactness statistics per head (SPEC §8.4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from windtunnel.dynamics import attention_gradients, check_law
from windtunnel.hooks import eval_mode, record
from windtunnel.models import TinyGPT
from windtunnel.probes._common import LossFn, Row, _check_unablated, _row
from windtunnel.probes.calibration import site_loss_nats
from windtunnel.tasks import Batch

__all__ = ["RoutingLawStats", "routing_law_stats"]


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
        law_rel_error: per layer [layer], worst relative error of ``dynamics.check_law`` (closed
            forms vs an autograd rebuild of the head, float64, on the first 8 sequences).
        model_grad_rel_error: per layer [layer], max relative error of the closed-form dQ, dK, dV
            against the gradients the model's own backward left at ``hook_q/k/v`` (float32 model).
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


def _rel_error(closed: torch.Tensor, reference: torch.Tensor) -> float:
    scale = float(reference.abs().max())
    err = float((closed - reference).abs().max())
    return err / scale if scale > 0 else err


def routing_law_stats(model: TinyGPT, task: Any, batch: Batch, *, loss_fn: LossFn = site_loss_nats) -> RoutingLawStats:
    """Advantage, responsibility and exactness statistics per head (SPEC §8.4).

    One forward pass in eval mode records q, k, v (after any bias; exactly the tensors the scores
    are built from) and the pattern; one backward of ``loss_fn`` records u = ``hook_z_grad`` and
    the model's own gradients at q, k, v. Each layer's heads go through
    :func:`windtunnel.dynamics.attention_gradients` with the causal mask and the attention's own
    scale. Parameter gradients are restored afterwards, so a probe does not disturb training.

    Raises:
        ValueError: when ``model`` is not a TinyGPT, or a head carries an ablation multiplier.
    """
    model = _check_unablated("routing_law_stats", model)
    saved_grads = [p.grad for p in model.parameters()]
    device = next(model.parameters()).device
    wanted = lambda name: name.endswith(("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z"))  # noqa: E731
    try:
        with eval_mode(model), torch.enable_grad(), record(model, names=wanted, grads=True) as cache:
            logits = model(batch.tokens.to(device))
            loss = loss_fn(logits, batch.to(device), task)
            loss.backward()
    finally:
        for p, g in zip(model.parameters(), saved_grads):
            p.grad = g
    stats: dict[str, list[torch.Tensor]] = {name: [] for name in RoutingLawStats._PER_HEAD}
    law_err, model_err = [], []
    for l, block in enumerate(model.blocks):
        # hooks are [batch, pos, head, d_head]; dynamics wants [batch, head, pos, d_head]
        q, k, v, u = (cache[f"blocks.{l}.attn.hook_{n}"].transpose(1, 2).double() for n in ("q", "k", "v", "z_grad"))
        pos = q.shape[-2]
        mask = torch.ones(pos, pos, dtype=torch.bool, device=q.device).tril()
        g = attention_gradients(q, k, v, u, mask=mask, scale=block.attn.scale)
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
        few = slice(0, 8)
        law_err.append(check_law(q[few], k[few], v[few], u[few], mask=mask, scale=block.attn.scale).worst_rel_error)
        model_err.append(
            max(
                _rel_error(g.d_queries, cache[f"blocks.{l}.attn.hook_q_grad"].transpose(1, 2).double()),
                _rel_error(g.d_keys, cache[f"blocks.{l}.attn.hook_k_grad"].transpose(1, 2).double()),
                _rel_error(g.d_values, cache[f"blocks.{l}.attn.hook_v_grad"].transpose(1, 2).double()),
            )
        )
    return RoutingLawStats(
        loss_nats=float(loss.detach()),
        **{name: torch.stack(values).float() for name, values in stats.items()},
        law_rel_error=torch.tensor(law_err),
        model_grad_rel_error=torch.tensor(model_err),
    )
