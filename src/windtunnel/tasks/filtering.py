"""Batched log-space forward filtering for discrete hidden-state models (SPEC §4.3, §5.2).

Shared by the sticky Markov chain (hidden state z_t = y_{t-1}, Gaussian emissions) and the HMM
wind tunnel (categorical emissions). The recursion is over time only; every batch and state
dimension is vectorised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from windtunnel._checks import check_float_tensor

__all__ = ["FilterResult", "forward_filter", "entropy_bits"]


@dataclass(frozen=True)
class FilterResult:
    """Posteriors of a forward filter, all natural-log probabilities.

    Attributes:
        log_predicted_probs: log p(z_t | x_1:t-1), [..., seq_len, n_states]; at t = 1 the prior.
        log_filtered_probs: log p(z_t | x_1:t), [..., seq_len, n_states].
        log_evidence_nats: log p(x_1:T), [...]: the sum of the per-step normalisers.
    """

    log_predicted_probs: torch.Tensor
    log_filtered_probs: torch.Tensor
    log_evidence_nats: torch.Tensor


def forward_filter(
    log_initial: torch.Tensor, log_transition: torch.Tensor, log_likelihoods: torch.Tensor
) -> FilterResult:
    """Exact forward filter in log space.

    predicted_1 = initial; filtered_t ∝ predicted_t ⊙ lik_t; predicted_{t+1} = filtered_t @ T,
    with T[z, z'] = p(z_{t+1} = z' | z_t = z). No transition is applied before the first
    observation.

    Shapes: log_initial [..., n_states], log_transition [..., n_states, n_states],
    log_likelihoods [..., seq_len, n_states] with log_likelihoods[..., t, z] = log p(x_t | z_t = z)
    (up to a constant per step, which only shifts the evidence). Leading dimensions broadcast.

    Computed by the scaled recursion in probability space (renormalised every step; a handful of
    kernels per step) unless an input requires grad or some probability would fall below the
    smallest normal float; then the recursion runs in log space throughout. Both agree to
    rounding (tests/tasks/test_filtering.py checks each against path enumeration).

    Raises:
        ValueError: when an argument is not a floating tensor or the state sizes disagree.
    """
    owner = "forward_filter"
    check_float_tensor(owner, "log_initial", log_initial, min_dim=1, shape_text="[..., n_states]")
    check_float_tensor(
        owner, "log_transition", log_transition, min_dim=2, shape_text="[..., n_states, n_states]"
    )
    check_float_tensor(
        owner, "log_likelihoods", log_likelihoods, min_dim=2, shape_text="[..., seq_len, n_states]"
    )
    n_states = log_likelihoods.shape[-1]
    if log_initial.shape[-1] != n_states or log_transition.shape[-2:] != (n_states, n_states):
        raise ValueError(
            f"{owner}: state sizes must agree: log_initial [..., {n_states}], log_transition "
            f"[..., {n_states}, {n_states}]; got {list(log_initial.shape)} and "
            f"{list(log_transition.shape)} with log_likelihoods {list(log_likelihoods.shape)}."
        )
    lead = torch.broadcast_shapes(
        log_initial.shape[:-1], log_transition.shape[:-2], log_likelihoods.shape[:-2]
    )
    log_init = log_initial.expand(*lead, n_states)
    log_trans = log_transition.expand(*lead, n_states, n_states)
    log_lik = log_likelihoods.expand(*lead, *log_likelihoods.shape[-2:])
    if not any(x.requires_grad for x in (log_initial, log_transition, log_likelihoods)):
        result = _scaled_filter(log_init, log_trans, log_lik)
        if result is not None:
            return result
    return _log_space_filter(log_init, log_trans, log_lik)


def _log_space_filter(
    log_pred: torch.Tensor, log_trans: torch.Tensor, log_lik: torch.Tensor
) -> FilterResult:
    """The recursion in log space throughout: exact for any magnitudes, differentiable, slower."""
    predicted, filtered = [], []
    log_evidence = torch.zeros(log_pred.shape[:-1], dtype=log_lik.dtype, device=log_lik.device)
    for t in range(log_lik.shape[-2]):
        joint = log_pred + log_lik[..., t, :]
        norm = torch.logsumexp(joint, dim=-1)
        log_filt = joint - norm.unsqueeze(-1)
        predicted.append(log_pred)
        filtered.append(log_filt)
        log_evidence = log_evidence + norm
        # predicted_{t+1}(z') = logsumexp_z [filtered_t(z) + log T(z, z')]
        log_pred = torch.logsumexp(log_filt.unsqueeze(-1) + log_trans, dim=-2)
    return FilterResult(
        log_predicted_probs=torch.stack(predicted, dim=-2),
        log_filtered_probs=torch.stack(filtered, dim=-2),
        log_evidence_nats=log_evidence,
    )


# Up to this many states the transition is one broadcast multiply and one sum over a
# [n_states, n_states, batch] buffer, much faster on CPU than a batched matmul of tiny matrices.
_BROADCAST_STATES = 32


def _scaled_filter(
    log_init: torch.Tensor, log_trans: torch.Tensor, log_lik: torch.Tensor
) -> FilterResult | None:
    """The scaled forward recursion in probability space; None when it would lose precision.

    Each step multiplies the predicted probabilities by exp(log_lik - max log_lik) and
    renormalises, so the largest filtered probability is >= 1/n_states and nothing overflows;
    the log-evidence adds back the per-step log-normaliser and the subtracted maxima. The only
    way this differs from the log-space recursion is when a probability falls below the smallest
    normal float (flushed to zero or losing digits); then it returns None and the caller uses
    the log-space recursion. Five kernels per step instead of ~15.
    """
    lead, (seq_len, n_states) = log_lik.shape[:-2], log_lik.shape[-2:]
    n = math.prod(lead)
    dtype = torch.promote_types(torch.promote_types(log_init.dtype, log_trans.dtype), log_lik.dtype)
    device = log_lik.device
    tiny = torch.finfo(dtype).tiny
    log_lik = log_lik.to(dtype)
    lik_max = log_lik.amax(-1, keepdim=True)  # [..., seq_len, 1]
    # Buffers are time-major and state-major, [seq_len, n_states, n]: every step reads and writes
    # contiguous slabs, and sums over states add whole rows. Log-likelihoods are shifted so that
    # each step's maximum is 0.
    shifted = (log_lik - lik_max).reshape(n, seq_len, n_states).permute(1, 2, 0).contiguous()
    # Fresh large buffers cost page faults on every call, so the loop and the epilogue work in
    # place: ``filtered`` starts as the shifted likelihoods and ``shifted`` ends as log filtered.
    filtered = shifted.exp()
    trans = log_trans.to(dtype).exp().reshape(n, n_states, n_states)
    predicted = torch.empty(seq_len + 1, n_states, n, dtype=dtype, device=device)
    norms = torch.empty(seq_len, 1, n, dtype=dtype, device=device)
    predicted[0] = log_init.to(dtype).exp().reshape(n, n_states).T
    broadcast = n_states <= _BROADCAST_STATES
    if broadcast:
        trans_by_state = trans.permute(1, 2, 0).contiguous()  # [from, to, n]
        joint = torch.empty(n_states, n_states, n, dtype=dtype, device=device)
    for t in range(seq_len):
        filt = filtered[t]
        filt.mul_(predicted[t])
        torch.sum(filt, dim=0, keepdim=True, out=norms[t])
        filt.div_(norms[t])
        # predicted_{t+1}(z') = sum_z filtered_t(z) T(z, z')
        if broadcast:
            torch.mul(filt.unsqueeze(1), trans_by_state, out=joint)
            torch.sum(joint, dim=0, out=predicted[t + 1])
        else:
            predicted[t + 1] = torch.einsum("zb,bzy->yb", filt, trans)
    predicted = predicted[:-1]
    # Zero or subnormal probabilities (or a zero normaliser) mean digits were lost: bail out.
    # Exact zeros that the model implies (a -inf log-probability) also land here, and the
    # log-space recursion handles them exactly. NaN fails the comparison too.
    for x in (predicted, filtered, norms):
        if not bool(x.min() >= tiny):
            return None

    def batch_major(x: torch.Tensor) -> torch.Tensor:
        # [seq_len, n_states, n] -> [..., seq_len, n_states], a view (splitting n never copies)
        return x.permute(2, 0, 1).reshape(*lead, seq_len, n_states)

    log_norms = norms.log_()  # [seq_len, 1, n]
    log_predicted = predicted.log_()
    # log filtered = log predicted + (log_lik - max) - log norm: an add instead of a second log.
    log_filtered = shifted.add_(log_predicted).sub_(log_norms)
    log_evidence = log_norms.sum((0, 1)).reshape(lead) + lik_max.squeeze(-1).sum(-1)
    return FilterResult(
        log_predicted_probs=batch_major(log_predicted),
        log_filtered_probs=batch_major(log_filtered),
        log_evidence_nats=log_evidence,
    )


def entropy_bits(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in bits along ``dim``, with 0 log 0 = 0."""
    logs = torch.where(probs > 0, torch.log2(probs.clamp_min(torch.finfo(probs.dtype).tiny)), 0.0)
    return -(probs * logs).sum(dim)
