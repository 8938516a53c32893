"""Batched forward filtering for discrete hidden-state models (docs/theory.md §4.3, §5.2).

Shared by the sticky Markov chain (hidden state z_t = y_{t-1}, Gaussian emissions, through the
log-space API :func:`forward_filter`) and the HMM wind tunnel (categorical emissions, straight
from probabilities through ``_probability_filter``). The recursion is over time only; every
batch and state dimension is vectorised. One probability-space recursion serves both; the exact
log-space recursion takes over where probabilities would underflow, and for gradients.
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

    Computed by the probability-space recursion (unnormalised, rescaled every few steps and
    normalised once after the loop; three kernels per step), the one ``hmm_posterior`` uses,
    unless an input requires grad or some value would fall below the smallest normal float; then
    the recursion runs in log space throughout. Both agree to rounding
    (tests/tasks/test_filtering.py checks each against path enumeration). The outputs are
    permuted views of time-major buffers, not contiguous tensors.

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

# The unnormalised recursion divides the joint by its sum every this many steps, so that its
# scale cannot drift into subnormal (or overflowing) floats over long sequences; between rescales
# it shrinks by at most the product of the likelihoods, far from the float64 limits in practice.
_RESCALE_EVERY_STEPS = 8


@dataclass(frozen=True)
class _ProbabilityFilter:
    """Output of :func:`_probability_filter`: time-major, state-major probabilities.

    Attributes:
        predicted_probs: [n_predicted, n_states, batch]; row 0 is the initial vector as given,
            row t >= 1 is filtered_{t-1} @ T (a distribution when T's rows sum to 1).
        filtered_probs: p(z_t | x_1:t), [seq_len, n_states, batch].
        norms: the per-step normalisers sum_z predicted_t(z) lik_t(z), [seq_len, 1, batch], whose
            product is the likelihood of x_1:T in the likelihoods' units; None unless asked for.
    """

    predicted_probs: torch.Tensor
    filtered_probs: torch.Tensor
    norms: torch.Tensor | None


def _probability_filter(
    initial: torch.Tensor,
    transition: torch.Tensor,
    likelihoods: torch.Tensor,
    *,
    n_predicted: int,
    with_norms: bool,
) -> _ProbabilityFilter | None:
    """The forward recursion in probability space; None when it would lose precision.

    Shapes (time-major, batch last, so that every step reads and writes contiguous slabs):
    initial [n_states, batch] (or broadcastable to it), transition [n_states, n_states, batch]
    with transition[z, z', b] = p(z_{t+1} = z' | z_t = z) for sequence b, likelihoods
    [seq_len, n_states, batch] (any positive scale). ``n_predicted`` is seq_len, or seq_len + 1
    to also get the one-step-ahead belief after the last observation. ``likelihoods`` is
    overwritten (it becomes ``filtered_probs``): the caller passes a buffer it owns.

    The loop runs the unnormalised recursion joint_t = (joint_{t-1} @ T) ⊙ lik_t, three kernels
    per step, and divides joint_t by its sum only every ``_RESCALE_EVERY_STEPS`` steps; each time
    slice is normalised afterwards, all at once. The only way this differs from the log-space
    recursion is when some stored value, normalised or not, falls below the smallest normal float
    or overflows (digits lost, or flushed to zero); then it returns None and callers use the
    log-space recursion. Exact zeros that a model implies land there too.
    """
    seq_len, n_states, batch = likelihoods.shape
    dtype, device = likelihoods.dtype, likelihoods.device
    predicted = torch.empty(n_predicted, n_states, batch, dtype=dtype, device=device)
    predicted[0] = initial
    joint = likelihoods
    # The sums that joint_t is divided by at steps R - 1, 2R - 1, ... (R = _RESCALE_EVERY_STEPS).
    rescales = torch.empty(seq_len // _RESCALE_EVERY_STEPS, 1, batch, dtype=dtype, device=device)
    # Views made once: indexing inside the loop costs about as much as a small kernel.
    predicted_t, joint_t = predicted.unbind(0), joint.unbind(0)
    joint_by_source_t = joint.unsqueeze(2).unbind(0)  # [n_states (from), 1, batch] each
    broadcast = n_states <= _BROADCAST_STATES
    if broadcast:
        products = torch.empty(n_states, n_states, batch, dtype=dtype, device=device)
    else:
        transition_by_batch = transition.permute(2, 0, 1).contiguous()  # [batch, from, to]
    for t in range(seq_len):
        now = joint_t[t]
        now.mul_(predicted_t[t])
        if t % _RESCALE_EVERY_STEPS == _RESCALE_EVERY_STEPS - 1:
            rescale = rescales[t // _RESCALE_EVERY_STEPS]
            torch.sum(now, dim=0, keepdim=True, out=rescale)
            now.div_(rescale)
        if t + 1 < n_predicted:
            # unnormalised predicted_{t+1}(z') = sum_z joint_t(z) T(z, z')
            if broadcast:
                torch.mul(joint_by_source_t[t], transition, out=products)
                torch.sum(products, dim=0, out=predicted_t[t + 1])
            else:
                predicted_t[t + 1].copy_(torch.einsum("zb,bzy->yb", now, transition_by_batch))
    if not (_all_normal(joint) and _all_normal(predicted)):
        return None
    sums = joint.sum(1, keepdim=True)  # [seq_len, 1, batch]; each >= its largest term: normal
    sums_above_one = bool(sums.max() > 1)
    norms = None
    if with_norms:
        # norm_t = (sum of joint_t before its rescale) / (sum of joint_{t-1} as stored)
        norms = sums.clone()
        norms[_RESCALE_EVERY_STEPS - 1 :: _RESCALE_EVERY_STEPS] *= rescales
    inverse = sums.reciprocal_()  # in place: every buffer here is a page-faulting allocation
    if norms is not None:
        norms[1:] *= inverse[:-1]
        if not _all_normal(norms):
            return None
    # filtered_t = joint_t / sum(joint_t); predicted_{t+1} / sum(joint_t) = filtered_t @ T.
    predicted[1:] *= inverse[: n_predicted - 1]
    filtered = joint.mul_(inverse)
    # Where every sum is <= 1, normalising only raises the (checked) values; otherwise check.
    if sums_above_one and not (_all_normal(filtered) and _all_normal(predicted)):
        return None
    return _ProbabilityFilter(predicted_probs=predicted, filtered_probs=filtered, norms=norms)


def _all_normal(x: torch.Tensor) -> bool:
    """Whether every entry is a finite positive float no smaller than the smallest normal one.

    False on NaN too (the comparisons fail).
    """
    low, high = torch.aminmax(x)
    info = torch.finfo(x.dtype)
    return bool(low >= info.tiny) and bool(high <= info.max)


def _scaled_filter(
    log_init: torch.Tensor, log_trans: torch.Tensor, log_lik: torch.Tensor
) -> FilterResult | None:
    """:func:`forward_filter` by :func:`_probability_filter`; None when that would lose precision.

    Shapes: log_init [..., n_states], log_trans [..., n_states, n_states], log_lik
    [..., seq_len, n_states], leading dimensions equal. Likelihoods enter as
    exp(log_lik - max_z log_lik), so the largest is 1 at every step; the log-evidence adds the
    maxima back. Returns the log-probabilities batch-major again (permuted views).
    """
    lead, (seq_len, n_states) = log_lik.shape[:-2], log_lik.shape[-2:]
    batch = math.prod(lead)
    dtype = torch.promote_types(torch.promote_types(log_init.dtype, log_trans.dtype), log_lik.dtype)
    log_lik = log_lik.to(dtype)
    lik_max = log_lik.amax(-1, keepdim=True)  # [..., seq_len, 1]

    def batch_major(x: torch.Tensor) -> torch.Tensor:
        # [seq_len, n_states, batch] -> [..., seq_len, n_states], a view (splitting never copies)
        return x.permute(2, 0, 1).reshape(*lead, seq_len, n_states)

    # One time-major buffer, [seq_len, n_states, batch], written once by the subtraction; it
    # turns into the likelihoods, the filtered probabilities and their logs, all in place (fresh
    # large buffers cost page faults on every call).
    likelihoods = torch.empty(seq_len, n_states, batch, dtype=dtype, device=log_lik.device)
    torch.sub(log_lik, lik_max, out=batch_major(likelihoods))
    trans = log_trans.to(dtype).reshape(batch, n_states, n_states).permute(1, 2, 0)
    result = _probability_filter(
        log_init.to(dtype).reshape(batch, n_states).T.exp(),
        # A copy, always (``contiguous`` may return the caller's tensor), exponentiated in place.
        trans.clone(memory_format=torch.contiguous_format).exp_(),
        likelihoods.exp_(),
        n_predicted=seq_len,
        with_norms=True,
    )
    if result is None:
        return None
    log_norms = result.norms.log_()  # [seq_len, 1, batch]
    log_evidence = log_norms.sum((0, 1)).reshape(lead) + lik_max.squeeze(-1).sum(-1)
    return FilterResult(
        log_predicted_probs=batch_major(result.predicted_probs.log_()),
        log_filtered_probs=batch_major(result.filtered_probs.log_()),
        log_evidence_nats=log_evidence,
    )


def entropy_bits(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in bits along ``dim``, with 0 log 0 = 0."""
    logs = torch.where(probs > 0, torch.log2(probs.clamp_min(torch.finfo(probs.dtype).tiny)), 0.0)
    return -(probs * logs).sum(dim)
