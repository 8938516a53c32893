"""Key orthogonality, its random baseline, frame-subspace overlap and settling step (§8.1, §8.6)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from windtunnel import geometry as g

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def orthonormal(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """[n, d] with orthonormal rows (n <= d)."""
    q, _ = torch.linalg.qr(randn(d, n, seed=seed))
    return q.T


# ----------------------------------------------------------------------------- random baseline


@pytest.mark.parametrize("d,value", [(1, 1.0), (2, 2 / math.pi), (3, 0.5), (4, 4 / (3 * math.pi))])
def test_random_abs_cosine_closed_forms(d, value):
    # d=2: E|cos θ|, θ uniform = 2/π; d=3: x1 on S² is uniform on [-1, 1] (Archimedes), E|x1| = 1/2;
    # d=4: E|x1| = ∫ |t| (2/π) sqrt(1 - t²) dt = 4/(3π).
    assert g.random_abs_cosine(d) == pytest.approx(value, rel=1e-12)


def test_random_abs_cosine_large_d_and_spec_values():
    for d in (1000, 10_000, 100_000):
        assert g.random_abs_cosine(d) == pytest.approx(math.sqrt(2 / (math.pi * d)), rel=1 / d)
    # docs/theory.md §8.1 quotes 0.141 (d=32), 0.100, 0.082, 0.058. The exact value at d=32 is 0.1422
    # (0.141 is the sqrt(2/(πd)) approximation), so allow 1.5e-3.
    for d, quoted in [(32, 0.141), (64, 0.100), (96, 0.082), (192, 0.058)]:
        assert abs(g.random_abs_cosine(d) - quoted) < 1.5e-3


@pytest.mark.parametrize("d", [32, 64, 96, 192])
def test_random_abs_cosine_monte_carlo(d):
    x = torch.randn(2, 20_000, d, generator=gen(d), dtype=F64)
    x = x / x.norm(dim=-1, keepdim=True)
    cos = (x[0] * x[1]).sum(-1).abs()
    se = float(cos.std()) / math.sqrt(cos.numel())
    assert abs(float(cos.mean()) - g.random_abs_cosine(d)) < 4 * se
    # and the spec-quoted values are within 1.5e-3 of the simulation too
    quoted = {32: 0.141, 64: 0.100, 96: 0.082, 192: 0.058}[d]
    assert abs(float(cos.mean()) - quoted) < 1.5e-3 + 4 * se


@pytest.mark.parametrize("d", [0, -3, 2.0, True, "8"])
def test_random_abs_cosine_rejects(d):
    with pytest.raises(ValueError, match=r"random_abs_cosine\.d must be an int >= 1"):
        g.random_abs_cosine(d)


# ----------------------------------------------------------------------------- mean |cos|


def loop_mean_cos(v: torch.Tensor, signed: bool) -> float:
    n = v.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                c = float(v[i] @ v[j] / (v[i].norm() * v[j].norm()))
                total += c if signed else abs(c)
    return total / (n * (n - 1))


def test_mean_abs_cosine_orthonormal_identical_and_loop():
    assert float(g.mean_abs_cosine(orthonormal(5, 8))) == pytest.approx(0.0, abs=1e-14)
    same = randn(1, 7).expand(6, 7)
    assert float(g.mean_abs_cosine(same)) == pytest.approx(1.0, abs=1e-14)
    pair = torch.tensor([[1.0, 2.0], [-2.0, -4.0]], dtype=F64)
    assert float(g.mean_abs_cosine(pair)) == pytest.approx(1.0)
    assert float(g.mean_abs_cosine(pair, signed=True)) == pytest.approx(-1.0)
    v = randn(3, 6, 5, seed=1)  # three independent sets
    got = g.mean_abs_cosine(v)
    got_signed = g.mean_abs_cosine(v, signed=True)
    assert got.shape == (3,)
    for i in range(3):
        assert float(got[i]) == pytest.approx(loop_mean_cos(v[i], False), rel=1e-12)
        assert float(got_signed[i]) == pytest.approx(loop_mean_cos(v[i], True), rel=1e-12)


def test_mean_abs_cosine_zero_vector_counts_as_orthogonal():
    v = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=F64)
    assert float(g.mean_abs_cosine(v)) == 0.0


@given(
    seed=st.integers(0, 10_000),
    scales=st.lists(
        st.floats(0.01, 100.0).map(lambda s: s) | st.floats(-100.0, -0.01), min_size=5, max_size=5
    ),
)
def test_mean_abs_cosine_invariant_to_scaling_each_vector(seed, scales):
    v = randn(5, 4, seed=seed)
    scaled = v * torch.tensor(scales, dtype=F64)[:, None]
    assert float(g.mean_abs_cosine(scaled)) == pytest.approx(float(g.mean_abs_cosine(v)), abs=1e-12)


@pytest.mark.parametrize(
    "bad,rule",
    [
        (torch.zeros(1, 4), "at least 2 vectors"),
        (torch.zeros(4), r"\[\.\.\., n, d\]"),
        (torch.zeros(3, 4, dtype=torch.long), r"\[\.\.\., n, d\]"),
    ],
)
def test_mean_abs_cosine_rejects(bad, rule):
    with pytest.raises(ValueError, match=f"mean_abs_cosine.*vectors.*{rule}"):
        g.mean_abs_cosine(bad)


# ----------------------------------------------------------------------------- key orthogonality


def test_key_orthogonality_orthonormal_and_identical_keys():
    n_hyp, d_model, d_head = 4, 6, 5
    emb = torch.eye(d_model, dtype=F64)[:n_hyp]  # e_x = unit vectors
    w_orth = torch.zeros(d_model, d_head, dtype=F64)
    w_orth[:n_hyp, :n_hyp] = torch.linalg.qr(randn(n_hyp, n_hyp))[
        0
    ]  # keys = rows of an orthogonal matrix
    w_same = torch.zeros(d_model, d_head, dtype=F64)
    w_same[:n_hyp, 0] = torch.tensor([1.0, 2.0, 3.0, 0.5])  # every key along e_0, positive
    res = g.key_orthogonality(emb, torch.stack([w_same, w_orth]))
    assert res.abs_cosine_per_head.tolist() == pytest.approx([1.0, 0.0], abs=1e-14)
    assert res.signed_cosine_per_head.tolist() == pytest.approx([1.0, 0.0], abs=1e-14)
    assert float(res.mean_abs_cosine) == pytest.approx(0.5)
    assert res.min_head == 1 and float(res.min_abs_cosine) == pytest.approx(0.0, abs=1e-14)
    assert res.random_baseline == g.random_abs_cosine(d_head)
    assert res.cosine.shape == (2, n_hyp, n_hyp) and res.n_heads == 2 and res.n_hypotheses == n_hyp


def test_key_orthogonality_matches_loop_with_convention_k_equals_e_at_w():
    emb, w = randn(7, 10, seed=2), randn(3, 10, 4, seed=3)
    res = g.key_orthogonality(emb, w)
    for h in range(3):
        keys = torch.stack([emb[x] @ w[h] for x in range(7)])
        assert float(res.abs_cosine_per_head[h]) == pytest.approx(
            loop_mean_cos(keys, False), rel=1e-12
        )
        assert float(res.signed_cosine_per_head[h]) == pytest.approx(
            loop_mean_cos(keys, True), rel=1e-12
        )


@given(seed=st.integers(0, 10_000))
def test_key_orthogonality_rotation_invariant_in_d_model(seed):
    emb, w = randn(6, 8, seed=seed), randn(2, 8, 4, seed=seed + 1)
    rot = torch.linalg.qr(randn(8, 8, seed=seed + 2))[0]
    a = g.key_orthogonality(emb, w)
    b = g.key_orthogonality(emb @ rot, rot.T @ w)  # k = (e R)(Rᵀ W) = e W
    torch.testing.assert_close(a.abs_cosine_per_head, b.abs_cosine_per_head, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "emb,w,field",
    [
        (torch.zeros(1, 4, dtype=F64), torch.zeros(2, 4, 3, dtype=F64), "normed_embeddings"),
        (torch.zeros(2, 3, 4, dtype=F64), torch.zeros(2, 4, 3, dtype=F64), "normed_embeddings"),
        (torch.zeros(3, 4, dtype=F64), torch.zeros(2, 5, 3, dtype=F64), "w_key"),
        (torch.zeros(3, 4, dtype=F64), torch.zeros(4, 3, dtype=F64), "w_key"),
        (torch.zeros(3, 4, dtype=F64), torch.zeros(1, 2, 4, 3, dtype=F64), "w_key"),
        (torch.zeros(3, 4, dtype=torch.long), torch.zeros(2, 4, 3, dtype=F64), "normed_embeddings"),
    ],
)
def test_key_orthogonality_rejects(emb, w, field):
    with pytest.raises(ValueError, match=f"key_orthogonality.*{field}"):
        g.key_orthogonality(emb, w)


def test_frame_overlap_identical_orthogonal_and_rotations():
    d_model, d_k, r = 32, 24, 8
    w = randn(d_model, d_k, seed=30)
    same = g.frame_subspace_overlap(w, w, r=r)
    assert float(same.overlap) == pytest.approx(1.0)
    assert float(same.ratio_to_null) == pytest.approx(d_model / r)
    assert same.null == r / d_model and same.r == r and same.d == d_model
    # mixing the key side leaves the input subspace alone; scaling does not matter either
    rot = torch.linalg.qr(randn(d_k, d_k, seed=31))[0]
    assert float(g.frame_subspace_overlap(w, 3.0 * w @ rot, r=r).overlap) == pytest.approx(1.0)
    out = g.frame_subspace_overlap(w, w, r=r, side="output")
    assert out.d == d_k and float(out.ratio_to_null) == pytest.approx(d_k / r)
    # disjoint coordinate subspaces: overlap 0
    a = torch.zeros(d_model, d_k, dtype=F64)
    b = torch.zeros(d_model, d_k, dtype=F64)
    a[torch.arange(r), torch.arange(r)] = torch.arange(r, 0, -1, dtype=F64) + 1
    b[torch.arange(r) + r, torch.arange(r)] = torch.arange(r, 0, -1, dtype=F64) + 1
    assert float(g.frame_subspace_overlap(a, b, r=r).overlap) == pytest.approx(0.0, abs=1e-14)
    # half-shared: 4 of 8 directions in common
    c = torch.zeros(d_model, d_k, dtype=F64)
    c[torch.arange(r) + r // 2, torch.arange(r)] = torch.arange(r, 0, -1, dtype=F64) + 1
    assert float(g.frame_subspace_overlap(a, c, r=r).overlap) == pytest.approx(0.5)


def test_frame_overlap_random_null():
    w = torch.randn(400, 2, 24, 16, generator=gen(32), dtype=F64)  # [draws, pair, d_model, d_k]
    res = g.frame_subspace_overlap(w[:, 0], w[:, 1], r=4)
    assert res.overlap.shape == (400,)
    # E‖UᵀV‖²_F / r = r / d for independent uniform subspaces (Gaussian matrices); 10 % band
    assert float(res.ratio_to_null.mean()) == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize(
    "w,w_ref,kwargs,field",
    [
        (randn(6, 4), randn(6, 4), dict(r=0), "r must be an int in"),
        (
            randn(6, 4),
            randn(6, 4),
            dict(r=5),
            r"r must be an int in \[1, min\(d_model, d_k\)\] = \[1, 4\]",
        ),
        (randn(6, 4), randn(6, 4), dict(r=2.0), "r must be"),
        (randn(6, 4), randn(6, 5), {}, "w_key and w_key_reference"),
        (randn(6), randn(6), {}, "w_key"),
        (randn(6, 4), randn(6, 4), dict(r=2, side="left"), "side must be one of"),
    ],
)
def test_frame_overlap_rejects(w, w_ref, kwargs, field):
    with pytest.raises(ValueError, match=f"frame_subspace_overlap.*{field}"):
        g.frame_subspace_overlap(w, w_ref, **kwargs)


def test_settling_step_hand_curves():
    steps = [0, 1, 2, 4, 8, 16]
    # settles at 4 and stays: final 1.0, band [0.9, 1.1]
    assert g.settling_step(steps, [5.0, 3.0, 1.5, 1.05, 0.95, 1.0]) == 4
    # touches the band at step 1, leaves, then settles at 8
    assert g.settling_step(steps, [5.0, 1.0, 2.0, 1.5, 1.09, 1.0]) == 8
    # only the final value is settled
    assert g.settling_step(steps, [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]) == 16
    # settled from the start
    assert g.settling_step(torch.tensor(steps), torch.tensor([1.0, 1.02, 0.98, 1.0, 1.0, 1.0])) == 0
    # negative final value: band uses |f|
    assert g.settling_step(steps, [0.0, -1.5, -1.0, -0.95, -1.05, -1.0]) == 2
    # NaN is never settled
    assert g.settling_step(steps, [1.0, math.nan, 1.0, 1.0, 1.0, 1.0]) == 2
    # custom band
    assert g.settling_step(steps, [5.0, 3.0, 1.5, 1.05, 0.95, 1.0], rel_tol=0.6) == 2


def test_settling_step_final_zero():
    steps = [0, 10, 20, 30]
    assert g.settling_step(steps, [1.0, 0.01, 0.0, 0.0]) == 20
    assert g.settling_step(steps, [1.0, 0.01, 0.001, 0.0], abs_tol=0.02) == 10


@pytest.mark.parametrize(
    "steps,values,kwargs,field",
    [
        ([], [], {}, "steps and values"),
        ([0, 1], [1.0], {}, "steps and values"),
        ([0, 1, 1], [1.0, 1.0, 1.0], {}, "steps must be strictly increasing"),
        ([0, 1], [1.0, math.nan], {}, "values must be finite"),
        ([0, 1], [1.0, 1.0], dict(rel_tol=-0.1), "rel_tol"),
        ([0, 1], [1.0, 1.0], dict(abs_tol=math.nan), "abs_tol"),
    ],
)
def test_settling_step_rejects(steps, values, kwargs, field):
    with pytest.raises(ValueError, match=f"settling_step.*{field}"):
        g.settling_step(steps, values, **kwargs)
