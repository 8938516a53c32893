"""Routing-law telemetry of one attention head during training (docs/theory.md §8.4), from the forward cache.

Tensors in, tensors out: queries, keys, values, the upstream gradient u = dL/dz at the head
output, and the optimiser's realised change of the values. All per-pair quantities come from
:func:`windtunnel.dynamics.attention_gradients`, applied block by block over query rows so that no
full [query_pos, key_pos] matrix is held at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from windtunnel.dynamics import attention_gradients

__all__ = ["RoutingTelemetry", "causal_routing_telemetry", "routing_law_residual"]


@dataclass(frozen=True)
class RoutingTelemetry:
    """Routing statistics of a causal head, one value per leading index (e.g. replica).

    Attributes:
        mean_abs_advantage: mean of |adv_ij| over causal pairs j <= i, [...], with
            adv_ij = E_{alpha_i}[b] - b_ij and b_ij = u_i·v_j (descent convention, docs/theory.md §2.2).
        weighted_abs_advantage: sum_ij alpha_ij |adv_ij| / n_queries, [...].
        positive_advantage_mass: mean over queries of sum_j alpha_ij 1[adv_ij > 0], [...]: the
            attention on keys that the next step will reinforce.
        attention_entropy_nats: mean over queries of -sum_j alpha_ij ln alpha_ij, [...].
        d_scores_norm: ||dL/ds||_F, [...].
        value_specialization: mean over values j of cos(Delta v_j, -dL/dv_j), [...], where
            dL/dv_j = sum_i alpha_ij u_i is the responsibility-weighted pull; 1 means every value
            moved exactly along the pull it received.
        responsibility_weighted_specialization: the same cosine averaged with weights R_j, [...].
    """

    mean_abs_advantage: torch.Tensor
    weighted_abs_advantage: torch.Tensor
    positive_advantage_mass: torch.Tensor
    attention_entropy_nats: torch.Tensor
    d_scores_norm: torch.Tensor
    value_specialization: torch.Tensor
    responsibility_weighted_specialization: torch.Tensor

    def to_dict(self) -> dict[str, list[float]]:
        """Each field as a plain list (one entry per leading index)."""
        return {
            name: getattr(self, name).reshape(-1).tolist() for name in self.__dataclass_fields__
        }


@torch.no_grad()
def causal_routing_telemetry(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    delta_values: torch.Tensor,
    *,
    scale: float | None = None,
    block_size: int = 256,
) -> RoutingTelemetry:
    """Routing telemetry of a causal head; see :class:`RoutingTelemetry`.

    Shapes: q, k [..., pos, d_k]; v, u, delta_values [..., pos, d_v]. ``u`` is dL/dz, the
    gradient at the head output before W_O; ``delta_values`` is the realised change of v (for
    v = x W_V, x Delta W_V). Returns one number per leading index.
    """
    n_pos = q.shape[-2]
    lead = q.shape[:-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dtype, device = q.dtype, q.device
    abs_adv = torch.zeros(lead, dtype=dtype, device=device)
    weighted = torch.zeros_like(abs_adv)
    positive = torch.zeros_like(abs_adv)
    entropy = torch.zeros_like(abs_adv)
    ds_sq = torch.zeros_like(abs_adv)
    d_values = torch.zeros_like(v)
    resp = torch.zeros(v.shape[:-1], dtype=dtype, device=device)
    for i0 in range(0, n_pos, block_size):
        i1 = min(n_pos, i0 + block_size)
        rows = torch.arange(i0, i1, device=device)
        mask = torch.arange(i1, device=device) <= rows[:, None]  # [block, i1], True = may attend
        grads = attention_gradients(
            q[..., i0:i1, :],
            k[..., :i1, :],
            v[..., :i1, :],
            u[..., i0:i1, :],
            mask=mask,
            scale=scale,
        )
        alpha, adv = grads.alpha, grads.advantage
        abs_adv += adv.abs().sum((-1, -2))
        weighted += (alpha * adv.abs()).sum((-1, -2))
        positive += (alpha * (adv > 0)).sum((-1, -2))
        entropy -= (alpha * torch.where(alpha > 0, alpha.log(), 0.0)).sum((-1, -2))
        ds_sq += grads.d_scores.pow(2).sum((-1, -2))
        d_values[..., :i1, :] += grads.d_values
        resp[..., :i1] += grads.responsibility
    n_pairs = n_pos * (n_pos + 1) / 2
    cos = torch.nn.functional.cosine_similarity(delta_values, -d_values, dim=-1, eps=1e-30)
    return RoutingTelemetry(
        mean_abs_advantage=abs_adv / n_pairs,
        weighted_abs_advantage=weighted / n_pos,
        positive_advantage_mass=positive / n_pos,
        attention_entropy_nats=entropy / n_pos,
        d_scores_norm=ds_sq.sqrt(),
        value_specialization=cos.mean(-1),
        responsibility_weighted_specialization=(cos * resp).sum(-1) / resp.sum(-1),
    )


def routing_law_residual(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_out: torch.Tensor,
    targets: torch.Tensor,
    *,
    scale: float | None = None,
) -> float:
    """Exactness check of the advantage law against autograd, in float64.

    Builds a causal head with a linear readout, logits = softmax(scale q k^T) v w_out, takes the
    mean cross-entropy against ``targets``, and compares ``attention_gradients(...).d_scores``
    (fed with autograd's u = dL/dz) with autograd's dL/ds.

    Shapes: q, k [..., pos, d_k]; v [..., pos, d_v]; w_out [..., d_v, n_classes]; targets long
    [..., pos].

    Returns:
        max |d_scores - autograd| / max |autograd| (0 when the gradient is zero).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    with torch.enable_grad():
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        n_pos = q.shape[-2]
        allowed = torch.ones(n_pos, n_pos, dtype=torch.bool, device=q.device).tril()
        scores = scale * q64 @ k64.transpose(-1, -2)
        scores.retain_grad()
        z = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v64
        z.retain_grad()
        logits = z @ w_out.detach().double()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        )
        loss.backward()
    law = attention_gradients(
        q64.detach(), k64.detach(), v64.detach(), z.grad, mask=allowed, scale=scale
    )
    reference = scores.grad
    denom = reference.abs().max()
    err = (law.d_scores - reference).abs().max()
    return float(err / denom) if denom > 0 else float(err)
