"""Routing telemetry: block-wise statistics against a full-matrix computation written out here."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from windtunnel.telemetry import causal_routing_telemetry, routing_law_residual


def _full(q, k, v, u, delta):
    """Every statistic from whole [pos, pos] matrices, straight from the definitions."""
    n = q.shape[-2]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    alpha = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    b = u @ v.transpose(-1, -2)
    adv = ((alpha * b).sum(-1, keepdim=True) - b).masked_fill(~allowed, 0.0)
    d_values = alpha.transpose(-1, -2) @ u
    # written out: torch's cosine_similarity clamps small norms at eps = 1e-8, which would bias the
    # cosine of keys that receive almost no attention
    cos = (delta * -d_values).sum(-1) / (delta.norm(dim=-1) * d_values.norm(dim=-1))
    resp = alpha.sum(-2)
    return {
        "mean_abs_advantage": adv.abs().sum((-1, -2)) / (n * (n + 1) / 2),
        "weighted_abs_advantage": (alpha * adv.abs()).sum((-1, -2)) / n,
        # adv_ij = 0 exactly in exact arithmetic for a query with one key; rounding decides its sign,
        # so the positive mass is only defined up to entries within rounding of zero: bracket it.
        "positive_advantage_mass": (
            (alpha * (adv > 1e-12)).sum((-1, -2)) / n,
            (alpha * (adv > -1e-12)).sum((-1, -2)) / n,
        ),
        "attention_entropy_nats": -(alpha * torch.where(alpha > 0, alpha.log(), 0.0)).sum((-1, -2))
        / n,
        "d_scores_norm": (-alpha * adv).pow(2).sum((-1, -2)).sqrt(),
        "value_specialization": cos.mean(-1),
        "responsibility_weighted_specialization": (cos * resp).sum(-1) / resp.sum(-1),
    }


@given(n_pos=st.integers(1, 30), block_size=st.integers(1, 35), seed=st.integers(0, 2**31))
@settings(max_examples=20)
def test_blockwise_telemetry_equals_the_full_matrix_definitions(n_pos, block_size, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, n_pos, 3, generator=gen, dtype=torch.float64) * 2 for _ in range(2))
    v, u, delta = (torch.randn(2, n_pos, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    tel = causal_routing_telemetry(q, k, v, u, delta, block_size=block_size)
    for name, expected in _full(q, k, v, u, delta).items():
        if name == "positive_advantage_mass":
            low, high = expected
            assert (getattr(tel, name) >= low - 1e-12).all() and (
                getattr(tel, name) <= high + 1e-12
            ).all()
            continue
        torch.testing.assert_close(getattr(tel, name), expected, rtol=1e-10, atol=1e-12, msg=name)
    assert set(tel.to_dict()) == set(_full(q, k, v, u, delta))


def test_value_specialization_is_one_along_the_pull_and_minus_one_against_it():
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(6, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    v, u = (torch.randn(6, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    pull = -_full(q, k, v, u, torch.ones(6, 4, dtype=torch.float64))[
        "value_specialization"
    ]  # any delta
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()
    alpha = torch.softmax((q @ k.T / math.sqrt(3)).masked_fill(~allowed, float("-inf")), -1)
    d_values = alpha.T @ u
    along = causal_routing_telemetry(q, k, v, u, -3.0 * d_values)
    against = causal_routing_telemetry(q, k, v, u, d_values)
    assert abs(along.value_specialization.item() - 1) < 1e-12
    assert abs(against.value_specialization.item() + 1) < 1e-12
    assert torch.isfinite(pull)


def test_routing_law_residual_is_at_rounding_level():
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(3, 17, 4, generator=gen) * 3 for _ in range(2))
    v = torch.randn(3, 17, 5, generator=gen)
    w_out = torch.randn(5, 6, generator=gen)
    targets = torch.randint(6, (3, 17), generator=gen)
    assert routing_law_residual(q, k, v, w_out, targets) < 1e-13
