"""Batched log-space forward filtering for discrete hidden-state models (SPEC §4.3, §5.2).

Shared by the sticky Markov chain (hidden state z_t = y_{t-1}, Gaussian emissions) and the HMM
wind tunnel (categorical emissions). The recursion is over time only; every batch and state
dimension is vectorised.
"""

from __future__ import annotations

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
    seq_len = log_likelihoods.shape[-2]
    lead = torch.broadcast_shapes(
        log_initial.shape[:-1], log_transition.shape[:-2], log_likelihoods.shape[:-2]
    )
    log_pred = log_initial.expand(*lead, n_states)
    log_trans = log_transition.expand(*lead, n_states, n_states)
    predicted, filtered = [], []
    log_evidence = torch.zeros(lead, dtype=log_likelihoods.dtype, device=log_likelihoods.device)
    for t in range(seq_len):
        joint = log_pred + log_likelihoods[..., t, :]
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


def entropy_bits(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in bits along ``dim``, with 0 log 0 = 0."""
    logs = torch.where(probs > 0, torch.log2(probs.clamp_min(torch.finfo(probs.dtype).tiny)), 0.0)
    return -(probs * logs).sum(dim)
