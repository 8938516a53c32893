"""Batched forward filtering for discrete hidden-state models (docs/theory.md §4.3, §5.2).

Shared by the sticky Markov chain of arXiv 2512.22473 (hidden state z_t = y_{t-1}, Gaussian
emissions, through the log-space API :func:`forward_filter`) and the HMM wind tunnel of arXiv
2512.22471 (categorical emissions, straight from probabilities through ``_probability_filter``).
The recursion is over time only; every batch and state dimension is vectorised. One
probability-space recursion serves both, zero probabilities included (zero is exact there); the
exact log-space recursion takes over only where a positive probability would underflow, and for
gradients."""

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
    normalised once after the loop; three kernels per step), the one ``hmm_posterior`` uses, with
    -inf inputs (zero probabilities) as exact zeros, unless an input requires grad or some
    positive value would fall below the smallest normal float; then the recursion runs in log
    space throughout. Both agree to rounding
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
# [n_states, n_states, columns] buffer, much faster on CPU than a batched matmul of tiny matrices.
_BROADCAST_STATES = 32

# The unnormalised recursion divides the joint by its sum every this many steps, so that its
# scale cannot drift into subnormal (or overflowing) floats over long sequences; between rescales
# it shrinks by at most the product of the likelihoods, far from the float64 limits in practice.
_RESCALE_EVERY_STEPS = 8

# The recursion runs over blocks of this many sequences (batch columns), one block after the
# other: a block's transition and product buffers and its time slices stay in the CPU caches,
# where one pass over the whole batch per step would stream every buffer through memory (at batch
# 100,000 and 5 states the transition alone is 20 MB). A batch up to this size is one block;
# on other devices the whole batch is one block.
_BLOCK_COLUMNS = 4096


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
    initial: torch.Tensor | float,
    transition: torch.Tensor,
    likelihoods: torch.Tensor,
    *,
    n_predicted: int,
    with_norms: bool,
    min_factor: float | None = None,
    emission: torch.Tensor | None = None,
    observations: torch.Tensor | None = None,
    divisor: float = 1.0,
) -> _ProbabilityFilter | None:
    """The forward recursion in probability space; None when it would lose precision.

    Shapes (time-major, batch last, so that every step reads and writes contiguous slabs):
    initial broadcastable to [n_states, batch]; transition [n_states, n_states, batch] (any
    strides) with transition[z, z', b] = p(z_{t+1} = z' | z_t = z) for sequence b; likelihoods
    [seq_len, n_states, batch] (any non-negative scale). ``n_predicted`` is seq_len, or
    seq_len + 1 to also get the one-step-ahead belief after the last observation. ``likelihoods``
    is overwritten (it becomes ``filtered_probs``): the caller passes a buffer it owns.

    Optional: ``emission`` [n_symbols, n_states, batch] (any strides) with ``observations`` long
    [seq_len, batch]: then ``likelihoods`` is an uninitialised buffer that each block fills with
    emission[o_tb, z, b] itself, while the block is in the caches. ``divisor`` divides the
    transition and emission entries as they are read (grid units to probabilities).
    ``min_factor``: a lower bound of the positive entries of the transition and the likelihoods
    (after the division); computed here when None (a pass over each).

    The recursion runs block by block over the batch (``_BLOCK_COLUMNS`` sequences each, on CPU;
    the whole batch elsewhere). Its loop is unnormalised, joint_t = (joint_{t-1} @ T) ⊙ lik_t,
    three kernels per step; it divides joint_t by its sum every ``_RESCALE_EVERY_STEPS`` steps and
    normalises each time slice after the loop. Zero probabilities (a forbidden transition or
    symbol, a state no path reaches) are exact in this arithmetic: they stay exact zeros, as they
    are -inf in the log-space recursion. What can make it differ from the log-space recursion is
    underflow alone: a positive value that becomes subnormal (digits lost) or a positive product
    that rounds to zero. The checks after each block's loop (:func:`_block_recursion`) exclude
    both from every value it stores; where they fail (likelihood ratios beyond ~1e300 within a
    sequence, say) it returns None and callers use the log-space recursion.
    """
    seq_len, n_states, batch = likelihoods.shape
    dtype, device = likelihoods.dtype, likelihoods.device
    if min_factor is None:
        smallest_trans = _min_positive(transition) / divisor
        if emission is None:
            min_factor = min(smallest_trans, _min_positive(likelihoods))
        else:
            min_factor = min(smallest_trans, _min_positive(emission) / divisor)
    if not min_factor >= torch.finfo(dtype).tiny:  # negative, NaN or subnormal entries
        return None
    predicted = torch.empty(n_predicted, n_states, batch, dtype=dtype, device=device)
    norms = torch.empty(seq_len, 1, batch, dtype=dtype, device=device) if with_norms else None
    initial = torch.as_tensor(initial, dtype=dtype, device=device).broadcast_to(n_states, batch)
    # Blocks are for CPU caches; an accelerator takes the whole batch per kernel.
    width = min(batch, _BLOCK_COLUMNS) if device.type == "cpu" else batch
    # Buffers every block reuses: its transition (contiguous), its products, its rescale sums.
    trans_buffer = torch.empty(n_states, n_states, width, dtype=dtype, device=device)
    products = None
    if n_states <= _BROADCAST_STATES:
        products = torch.empty(n_states, n_states, width, dtype=dtype, device=device)
    rescales = torch.empty(seq_len // _RESCALE_EVERY_STEPS, 1, width, dtype=dtype, device=device)
    if emission is not None:
        emit_buffer = torch.empty(emission.shape[0], n_states, width, dtype=dtype, device=device)
    for start in range(0, batch, width):
        stop = min(batch, start + width)
        columns = slice(start, stop)
        trans = trans_buffer[..., : stop - start]
        trans.copy_(transition[..., columns])
        if divisor != 1.0:
            trans.div_(divisor)
        joint = likelihoods[..., columns]  # [seq_len, n_states, columns]
        if emission is not None:
            emit = emit_buffer[..., : stop - start]
            emit.copy_(emission[..., columns])
            if divisor != 1.0:
                emit.div_(divisor)
            index = observations[:, columns].unsqueeze(1).expand(joint.shape)
            torch.gather(emit, 0, index, out=joint)
        block_predicted = predicted[..., columns]
        block_predicted[0] = initial[..., columns]
        accurate = _block_recursion(
            block_predicted,
            trans,
            joint,
            products=None if products is None else products[..., : stop - start],
            rescales=rescales[..., : stop - start],
            norms=None if norms is None else norms[..., columns],
            min_factor=min_factor,
        )
        if not accurate:
            return None
    return _ProbabilityFilter(predicted_probs=predicted, filtered_probs=likelihoods, norms=norms)


def _block_recursion(
    predicted: torch.Tensor,
    trans: torch.Tensor,
    joint: torch.Tensor,
    *,
    products: torch.Tensor | None,
    rescales: torch.Tensor,
    norms: torch.Tensor | None,
    min_factor: float,
) -> bool:
    """One block of :func:`_probability_filter`, in place; False when it lost precision.

    Shapes: predicted [n_predicted, n_states, cols] with row 0 set, trans [n_states, n_states,
    cols] contiguous, joint [seq_len, n_states, cols] holding the likelihoods, products like
    trans (None above ``_BROADCAST_STATES``), rescales [seq_len // _RESCALE_EVERY_STEPS, 1, cols],
    norms [seq_len, 1, cols] or None. On True, joint holds filtered_t, predicted row t >= 1 holds
    filtered_{t-1} @ T and norms the per-step normalisers.

    Why the checks suffice: every value the loop stores is a sum of products of a stored value
    and a factor (a transition entry or a likelihood), or a stored value divided by a rescale sum.
    Induction over the steps: if every stored positive value is at least the smallest normal
    float (``tiny``) and ``smallest stored positive x min_factor`` does not round to zero, no
    product of positives rounds to zero, so a stored zero is an exact zero; a product that comes
    out subnormal is added to a sum of at least ``tiny``, which it moves by less than its last
    bit; so every stored value is the exact one to rounding. A rescaled slice held
    ``stored x rescale`` before the division, at least ``tiny`` when ``smallest positive x
    min(1, smallest rescale)`` is. The predicted rows are read for their smallest positive entry;
    the joint's is at least ``that x min_factor / max(1, largest rescale)``, and the joint is read
    only where this bound is below ``tiny``. The final division by sums in (0, 1] only raises
    values; sums above 1 are bounded by the largest one.
    """
    seq_len, n_predicted = joint.shape[0], predicted.shape[0]
    predicted_t, joint_t = predicted.unbind(0), joint.unbind(0)
    joint_by_source_t = joint.unsqueeze(2).unbind(0)  # [n_states (from), 1, cols] each
    if products is None:
        trans_by_column = trans.permute(2, 0, 1).contiguous()  # [cols, from, to]
    for t in range(seq_len):
        now = joint_t[t]
        now.mul_(predicted_t[t])
        if t % _RESCALE_EVERY_STEPS == _RESCALE_EVERY_STEPS - 1:
            rescale = rescales[t // _RESCALE_EVERY_STEPS]
            torch.sum(now, dim=0, keepdim=True, out=rescale)
            now.div_(rescale)
        if t + 1 < n_predicted:
            # unnormalised predicted_{t+1}(z') = sum_z joint_t(z) T(z, z')
            if products is not None:
                torch.mul(joint_by_source_t[t], trans, out=products)
                torch.sum(products, dim=0, out=predicted_t[t + 1])
            else:
                predicted_t[t + 1].copy_(torch.einsum("zb,bzy->yb", now, trans_by_column))
    info = torch.finfo(joint.dtype)
    low_predicted, high_predicted = _positive_range(predicted, scratch=True)
    if not (low_predicted >= info.tiny and high_predicted <= info.max):
        return False  # a subnormal, negative, infinite or NaN value stored
    smallest_rescale, largest_rescale = 1.0, 1.0
    if rescales.numel():
        smallest_rescale, largest_rescale = (x.item() for x in torch.aminmax(rescales))
        if not smallest_rescale > 0:
            return False
    # A positive joint_t(z) = predicted_t(z) lik_t(z), divided by its rescale sum on rescaled
    # steps, is at least this bound (rounding is monotone); only when the bound is below ``tiny``
    # is the block's joint read to find its smallest positive entry.
    low_joint = low_predicted * min_factor / max(1.0, largest_rescale)
    if not low_joint >= info.tiny:
        low_joint = _positive_range(joint, scratch=True)[0]
        # The rescaled slices held stored x rescale before the division: normal too.
        if not (low_joint >= info.tiny and low_joint * min(1.0, smallest_rescale) >= info.tiny):
            return False
    if not (low_joint * min_factor > 0 and low_predicted * min_factor > 0):
        return False  # some product of positives may have rounded to zero
    sums = joint.sum(1, keepdim=True)  # [seq_len, 1, cols]; finite only if every entry is
    smallest_sum, largest_sum = (x.item() for x in torch.aminmax(sums))
    if not (smallest_sum > 0 and largest_sum <= info.max):
        return False  # an observation the model cannot produce (no posterior exists), or NaN
    low = min(low_joint, low_predicted)
    if largest_sum > 1 and not low / largest_sum >= info.tiny:
        return False
    if not high_predicted / smallest_sum <= info.max:
        return False
    if norms is not None:
        # norm_t = (sum of joint_t before its rescale) / (sum of joint_{t-1} as stored)
        norms.copy_(sums)
        norms[_RESCALE_EVERY_STEPS - 1 :: _RESCALE_EVERY_STEPS] *= rescales
    inverse = sums.reciprocal_()  # in place: every buffer here is a page-faulting allocation
    if norms is not None:
        norms[1:] *= inverse[:-1]
        low_norm, high_norm = (x.item() for x in torch.aminmax(norms))
        if not (low_norm >= info.tiny and high_norm <= info.max):
            return False
    # filtered_t = joint_t / sum(joint_t); predicted_{t+1} / sum(joint_t) = filtered_t @ T.
    predicted[1:] *= inverse[: n_predicted - 1]
    joint.mul_(inverse)
    return True


def _positive_range(x: torch.Tensor, *, scratch: bool = False) -> tuple[float, float]:
    """(smallest positive entry, largest entry) of a tensor of non-negative values.

    The smallest positive entry is inf when none is positive; -1.0 when some entry is negative
    and NaN when one is NaN (both fail any ``>= tiny`` test). One pass when no entry is zero.
    With ``scratch`` (a buffer of ours, holding no inf), the zeros are masked in place and
    restored, instead of in a copy as large as ``x``.
    """
    if x.is_contiguous():
        low, high = (float(v.item()) for v in torch.aminmax(x))
    else:  # amin and amax: aminmax copies a strided block first
        low, high = float(x.amin().item()), float(x.amax().item())
    if low == 0:
        top = math.inf if x.is_floating_point() else torch.iinfo(x.dtype).max
        zeros = x == 0
        if scratch and high < top:
            low = float(x.masked_fill_(zeros, top).amin().item())
            x.masked_fill_(zeros, 0)
        else:
            low = float(x.masked_fill(zeros, top).amin().item())
        if low == top:
            low = math.inf
    elif low < 0:
        low = -1.0
    return low, high


def _min_positive(x: torch.Tensor) -> float:
    """The smallest positive entry of ``x`` (inf if none, and NaN or negative as it finds)."""
    return _positive_range(x)[0] if x.numel() else math.inf


def _smallest_exp(log_x: torch.Tensor) -> float:
    """The smallest positive entry of exp(log_x) when exp flushes none to zero or a subnormal.

    exp(-inf) = 0 is exact; a finite entry below log(tiny) + 1 (about -707 in float64) may have
    no normal exponential, and +inf or NaN none at all: then 0.0. inf when every entry is -inf.
    """
    if not log_x.numel():
        return math.inf
    info = torch.finfo(log_x.dtype)
    low, high = (v.item() for v in torch.aminmax(log_x))
    if not high < math.inf:  # +inf or NaN
        return 0.0
    if low == -math.inf:
        low = log_x.masked_fill(log_x == -math.inf, math.inf).amin().item()
        if low == math.inf:
            return math.inf
    # A margin of 1 nat keeps exp's rounding off the boundary.
    return math.exp(low) if low >= math.log(info.tiny) + 1.0 else 0.0


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
    log_init = log_init.to(dtype).reshape(batch, n_states).T
    trans = log_trans.to(dtype).reshape(batch, n_states, n_states).permute(1, 2, 0)
    # -inf (a zero probability) is exact; a finite log too small for a normal exponential is not.
    smallest_lik, smallest_trans = _smallest_exp(likelihoods), _smallest_exp(trans)
    if not (smallest_lik > 0 and smallest_trans > 0 and _smallest_exp(log_init) > 0):
        return None
    result = _probability_filter(
        log_init.exp(),
        # A copy, always (``contiguous`` may return the caller's tensor), exponentiated in place.
        trans.clone(memory_format=torch.contiguous_format).exp_(),
        likelihoods.exp_(),
        n_predicted=seq_len,
        with_norms=True,
        min_factor=min(smallest_lik, smallest_trans),
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
