"""Geometry diagnostics (SPEC §8) against hand-derivable values, plain loops, numpy and scipy."""

import math

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats
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


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


# ----------------------------------------------------------------------------- random baseline


@pytest.mark.parametrize("d,value", [(1, 1.0), (2, 2 / math.pi), (3, 0.5), (4, 4 / (3 * math.pi))])
def test_random_abs_cosine_closed_forms(d, value):
    # d=2: E|cos θ|, θ uniform = 2/π; d=3: x1 on S² is uniform on [-1, 1] (Archimedes), E|x1| = 1/2;
    # d=4: E|x1| = ∫ |t| (2/π) sqrt(1 - t²) dt = 4/(3π).
    assert g.random_abs_cosine(d) == pytest.approx(value, rel=1e-12)


def test_random_abs_cosine_large_d_and_spec_values():
    for d in (1000, 10_000, 100_000):
        assert g.random_abs_cosine(d) == pytest.approx(math.sqrt(2 / (math.pi * d)), rel=1 / d)
    # SPEC §8.1 quotes 0.141 (d=32), 0.100, 0.082, 0.058. The exact value at d=32 is 0.1422
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


# ----------------------------------------------------------------------------- attention entropy


def causal_uniform(batch: int, heads: int, t: int) -> torch.Tensor:
    a = torch.ones(t, t, dtype=F64).tril()
    return (a / a.sum(-1, keepdim=True)).expand(batch, heads, t, t)


def one_hot_rows(batch: int, heads: int, t: int, key: int = 0) -> torch.Tensor:
    a = torch.zeros(batch, heads, t, t, dtype=F64)
    a[..., key] = 1.0
    return a


def random_causal_pattern(*lead: int, t: int, seed: int) -> torch.Tensor:
    scores = randn(*lead, t, t, seed=seed).masked_fill(
        ~torch.ones(t, t, dtype=torch.bool).tril(), -math.inf
    )
    return scores.softmax(-1)


def test_attention_entropy_uniform_is_log2_allowed_and_normalizes_to_one():
    t = 6
    sites = torch.tensor([0, 2, 5])
    res = g.attention_entropy(causal_uniform(2, 3, t), sites, normalize=True)
    expected = [math.log2(s + 1) for s in sites.tolist()]
    assert res.entropy_bits.shape == (1, 2, 3, 3)
    torch.testing.assert_close(res.site_entropy_bits[0], torch.tensor(expected, dtype=F64))
    # site 0 has one allowed key: log2 1 = 0, so its normalised entropy is defined as 0
    torch.testing.assert_close(
        res.normalized_entropy[0, 0, 0], torch.tensor([0.0, 1.0, 1.0], dtype=F64)
    )
    assert float(res.layer_entropy_bits[0]) == pytest.approx(sum(expected) / 3)
    assert float(res.layer_normalized_entropy[0]) == pytest.approx(2 / 3)
    assert res.normalized_entropy is not None


def test_attention_entropy_averages_heads_after_entropy_and_focusing():
    # Two heads, each one-hot on a different key: the per-head entropies are 0; averaging the
    # patterns first would give 1 bit (the Jensen bias the SPEC warns about).
    t = 4
    a = torch.zeros(1, 2, t, t, dtype=F64)
    a[:, 0, :, 0] = 1.0
    a[:, 1, 1:, 1] = 1.0
    a[:, 1, 0, 0] = 1.0
    uniform = causal_uniform(1, 2, t)
    res = g.attention_entropy([uniform, a], torch.tensor([3]))
    assert res.layer_entropy_bits.tolist() == pytest.approx([2.0, 0.0])
    assert float(res.focusing_ratio) == pytest.approx(1.0)
    assert res.head_entropy_bits.shape == (2, 2)
    assert res.normalized_entropy is None and res.layer_normalized_entropy is None


def test_attention_entropy_matches_loop_and_layer_forms_agree():
    p = random_causal_pattern(3, 2, 4, t=5, seed=4)  # [layer, batch, head, q, k]
    sites = torch.tensor([1, 4])
    stacked = g.attention_entropy(p, sites)
    listed = g.attention_entropy(list(p), sites)
    single = g.attention_entropy(p[1], sites)
    torch.testing.assert_close(stacked.entropy_bits, listed.entropy_bits)
    torch.testing.assert_close(single.entropy_bits[0], stacked.entropy_bits[1])
    for layer in range(3):
        for b in range(2):
            for h in range(4):
                for i, s in enumerate(sites.tolist()):
                    row = p[layer, b, h, s, : s + 1]
                    ref = -sum(float(x) * math.log2(float(x)) for x in row)
                    assert float(stacked.entropy_bits[layer, b, h, i]) == pytest.approx(
                        ref, rel=1e-12
                    )
    torch.testing.assert_close(stacked.head_entropy_bits, stacked.entropy_bits.mean((1, 3)))
    expected_focus = (
        stacked.layer_entropy_bits[0] - stacked.layer_entropy_bits[2]
    ) / stacked.layer_entropy_bits[0]
    torch.testing.assert_close(stacked.focusing_ratio, expected_focus)


def test_attention_entropy_mask_counts_allowed_keys():
    # padding: only the first 2 keys may be attended at every query
    t = 4
    mask = torch.zeros(t, t, dtype=torch.bool)
    mask[:, :2] = True
    p = torch.zeros(1, 1, t, t, dtype=F64)
    p[..., :2] = 0.5
    res = g.attention_entropy(p, normalize=True, mask=mask)
    torch.testing.assert_close(res.normalized_entropy.flatten(), torch.ones(t, dtype=F64))


def test_focusing_ratio_values():
    assert float(g.focusing_ratio(torch.tensor([4.0, 2.0, 0.5], dtype=F64))) == pytest.approx(0.875)
    assert float(g.focusing_ratio(torch.tensor([1.0, 2.0], dtype=F64))) == pytest.approx(-1.0)
    assert math.isnan(float(g.focusing_ratio(torch.tensor([0.0, 0.0], dtype=F64))))
    with pytest.raises(ValueError, match="focusing_ratio: layer_entropy_bits"):
        g.focusing_ratio([1.0, 0.5])


@pytest.mark.parametrize(
    "patterns,sites,mask,field",
    [
        (torch.zeros(2, 3, 3, dtype=F64), None, None, "patterns"),
        (torch.zeros(1, 1, 1, 2, 3, 3, dtype=F64), None, None, "patterns"),
        ([], None, None, "patterns"),
        (
            [torch.zeros(1, 1, 3, 3, dtype=F64), torch.zeros(1, 2, 3, 3, dtype=F64)],
            None,
            None,
            "patterns",
        ),
        ([torch.zeros(1, 3, 3, dtype=F64)], None, None, r"patterns\[0\]"),
        (torch.zeros(1, 1, 3, 3, dtype=F64), torch.tensor([3]), None, "sites"),
        (torch.zeros(1, 1, 3, 3, dtype=F64), torch.tensor([-1]), None, "sites"),
        (torch.zeros(1, 1, 3, 3, dtype=F64), torch.tensor([1.0]), None, "sites"),
        (torch.zeros(1, 1, 3, 3, dtype=F64), torch.tensor([], dtype=torch.long), None, "sites"),
        (torch.zeros(1, 1, 3, 3, dtype=F64), None, torch.ones(3, 3), "mask"),
        (torch.zeros(1, 1, 3, 3, dtype=F64), None, torch.ones(2, 3, dtype=torch.bool), "mask"),
    ],
)
def test_attention_entropy_rejects(patterns, sites, mask, field):
    with pytest.raises(ValueError, match=f"attention_entropy.*{field}"):
        g.attention_entropy(patterns, sites, mask=mask, normalize=True)


# ----------------------------------------------------------------------------- QK alignment


def test_qk_alignment_matches_loop_and_stats():
    batch, pos, heads, d = 2, 5, 3, 4
    q, k = randn(batch, pos, heads, d, seed=5), randn(batch, pos, heads, d, seed=6)
    sites = torch.tensor([1, 3, 4])
    res = g.qk_alignment(q, k, sites)
    vals, per_head = [], [[] for _ in range(heads)]
    for b in range(batch):
        for h in range(heads):
            for i, t in enumerate(sites.tolist()):
                for j in range(pos):
                    c = float(q[b, t, h] @ k[b, j, h] / (q[b, t, h].norm() * k[b, j, h].norm()))
                    if j <= t:
                        vals.append(c)
                        per_head[h].append(c)
                        assert float(res.cosine[b, h, i, j]) == pytest.approx(c, abs=1e-12)
                    else:
                        assert float(res.cosine[b, h, i, j]) == 0.0
                        assert not bool(res.allowed[b, h, i, j])
    arr = np.array(vals)
    assert float(res.mean_cosine) == pytest.approx(arr.mean(), abs=1e-12)
    assert float(res.std_cosine) == pytest.approx(arr.std(), abs=1e-12)
    assert float(res.min_cosine) == pytest.approx(arr.min(), abs=1e-12)
    assert float(res.max_cosine) == pytest.approx(arr.max(), abs=1e-12)
    assert res.head_mean.tolist() == pytest.approx([np.mean(v) for v in per_head], abs=1e-12)
    torch.testing.assert_close(res.head_mean_cosine, res.cosine.mean(1))
    assert res.feasible_cosine is None and res.feasible_mass is None


def test_qk_alignment_leading_layer_axis_equals_per_layer_calls():
    q, k = (
        randn(2, 3, 4, 2, 5, seed=7),
        randn(2, 3, 4, 2, 5, seed=8),
    )  # [layer, batch, pos, head, d]
    both = g.qk_alignment(q, k)
    for layer in range(2):
        one = g.qk_alignment(q[layer], k[layer])
        torch.testing.assert_close(both.cosine[layer], one.cosine)
        torch.testing.assert_close(both.std_cosine[layer], one.std_cosine)


def test_qk_alignment_identical_queries_and_keys_have_unit_self_cosine():
    x = randn(1, 4, 2, 3, seed=9)
    res = g.qk_alignment(x, x)
    diag = res.cosine[0].diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(diag, torch.ones_like(diag))
    assert float(res.max_cosine) == pytest.approx(1.0)


def test_qk_alignment_feasible_split_and_masses():
    # one sequence, one head, d=2; at site t=3 keys 0..3. Keys 0, 1 parallel to q (feasible),
    # key 2 anti-parallel (eliminated), key 3 orthogonal and not a candidate.
    q = torch.zeros(1, 4, 1, 2, dtype=F64)
    q[0, 3, 0] = torch.tensor([1.0, 0.0])
    k = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=F64).view(1, 4, 1, 2)
    feasible = torch.tensor([True, True, False, False]).view(1, 1, 4)
    candidates = torch.tensor([True, True, True, False]).view(1, 1, 4)
    pattern = torch.zeros(1, 1, 4, 4, dtype=F64)
    pattern[0, 0, 3] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    res = g.qk_alignment(
        q, k, torch.tensor([3]), feasible=feasible, candidates=candidates, pattern=pattern
    )
    assert float(res.feasible_cosine) == pytest.approx(1.0)
    assert float(res.eliminated_cosine) == pytest.approx(-1.0)
    assert float(res.feasible_mass) == pytest.approx(0.3)
    assert float(res.eliminated_mass) == pytest.approx(0.3)
    # without candidates every allowed non-feasible key counts as eliminated
    res2 = g.qk_alignment(q, k, torch.tensor([3]), feasible=feasible, pattern=pattern)
    assert float(res2.eliminated_cosine) == pytest.approx(-0.5)
    assert float(res2.eliminated_mass) == pytest.approx(0.7)


def test_qk_alignment_custom_mask():
    q, k = randn(1, 3, 1, 2, seed=10), randn(1, 3, 1, 2, seed=11)
    mask = torch.ones(3, 3, dtype=torch.bool)  # bidirectional
    res = g.qk_alignment(q, k, mask=mask)
    assert bool(res.allowed.all())


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(q=torch.zeros(2, 3, 4, dtype=F64)), "q"),
        (dict(k=torch.zeros(1, 3, 2, 5, dtype=F64)), "q and k"),
        (dict(k=torch.zeros(2, 3, 2, 4, dtype=F64)), "q and k"),
        (dict(sites=torch.tensor([3])), "sites"),
        (dict(mask=torch.ones(2, 3, dtype=torch.bool)), "mask"),
        (dict(candidates=torch.ones(1, 1, 3, dtype=torch.bool)), "feasible"),
        (dict(pattern=torch.zeros(1, 2, 3, 3, dtype=F64)), "feasible"),
        (dict(feasible=torch.ones(2, 1, 3, dtype=torch.bool)), "feasible"),
        (dict(feasible=torch.ones(1, 3, 3)), "feasible"),
        (
            dict(
                feasible=torch.ones(1, 3, 3, dtype=torch.bool),
                candidates=torch.ones(1, 3, 2, dtype=torch.bool),
            ),
            "candidates",
        ),
        (
            dict(
                feasible=torch.ones(1, 3, 3, dtype=torch.bool),
                pattern=torch.zeros(1, 2, 3, 2, dtype=F64),
            ),
            "pattern",
        ),
    ],
)
def test_qk_alignment_rejects(kwargs, field):
    args = dict(q=torch.ones(1, 3, 2, 4, dtype=F64), k=torch.ones(1, 3, 2, 4, dtype=F64))
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"qk_alignment.*{field}"):
        g.qk_alignment(**args)


# ----------------------------------------------------------------------------- rank statistics


@given(
    xs=st.lists(st.integers(-3, 3), min_size=3, max_size=30),
    seed=st.integers(0, 10_000),
)
def test_ranks_spearman_pearson_match_scipy_with_ties(xs, seed):
    x = torch.tensor(xs, dtype=F64)
    y = torch.randint(-2, 3, (len(xs),), generator=gen(seed)).to(F64)
    np.testing.assert_allclose(g.average_ranks(x).numpy(), scipy.stats.rankdata(xs), rtol=0, atol=0)
    if np.ptp(xs) == 0 or float(y.max() - y.min()) == 0:
        assert math.isnan(float(g.spearman_correlation(x, y)))
        assert math.isnan(float(g.pearson_correlation(x, y)))
        return
    rho = scipy.stats.spearmanr(x.numpy(), y.numpy()).statistic
    r = scipy.stats.pearsonr(x.numpy(), y.numpy()).statistic
    assert float(g.spearman_correlation(x, y)) == pytest.approx(rho, abs=1e-12)
    assert float(g.pearson_correlation(x, y)) == pytest.approx(r, abs=1e-12)


def test_average_ranks_integer_and_empty():
    torch.testing.assert_close(
        g.average_ranks(torch.tensor([10, 10, 5])), torch.tensor([2.5, 2.5, 1.0], dtype=F64)
    )
    assert g.average_ranks(torch.tensor([], dtype=F64)).numel() == 0


def test_spearman_monotone_transform():
    x = randn(50, seed=12)
    assert float(g.spearman_correlation(x, torch.exp(3 * x))) == pytest.approx(1.0)
    assert float(g.spearman_correlation(x, -(x**3))) == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "fn",
    [g.pearson_correlation, g.spearman_correlation],
)
@pytest.mark.parametrize(
    "x,y,field",
    [
        (torch.zeros(3, 1, dtype=F64), torch.zeros(3, dtype=F64), "x must be a real 1-D"),
        (torch.zeros(3, dtype=F64), torch.zeros(3, dtype=torch.bool), "y must be a real 1-D"),
        (torch.zeros(3, dtype=F64), torch.zeros(4, dtype=F64), "one length"),
        (torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64), "one length"),
        (torch.tensor([0.0, math.nan], dtype=F64), torch.zeros(2, dtype=F64), "x must be finite"),
    ],
)
def test_correlations_reject(fn, x, y, field):
    with pytest.raises(ValueError, match=f"{fn.__name__}.*{field}"):
        fn(x, y)


def test_average_ranks_rejects():
    with pytest.raises(ValueError, match="average_ranks.x must be a real 1-D"):
        g.average_ranks(torch.zeros(2, 2))


def test_partial_correlation_against_numpy():
    n = 60
    pos = torch.randint(0, 5, (n,), generator=gen(13))
    x = randn(n, seed=14) + pos
    y = 0.5 * x + randn(n, seed=15) - 2 * pos
    # linear: residuals of least squares on [1, pos]
    design = np.stack([np.ones(n), pos.numpy()], 1)
    rx = x.numpy() - design @ np.linalg.lstsq(design, x.numpy(), rcond=None)[0]
    ry = y.numpy() - design @ np.linalg.lstsq(design, y.numpy(), rcond=None)[0]
    got = float(g.partial_correlation(x, y, pos, kind="linear"))
    assert got == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)
    # group: subtract per-position means (plain loop)
    gx, gy = x.numpy().copy(), y.numpy().copy()
    for p in range(5):
        sel = pos.numpy() == p
        gx[sel] -= gx[sel].mean()
        gy[sel] -= gy[sel].mean()
    assert float(g.partial_correlation(x, y, pos)) == pytest.approx(
        np.corrcoef(gx, gy)[0, 1], abs=1e-12
    )
    # y a function of position: nothing left to correlate
    assert math.isnan(float(g.partial_correlation(x, pos.to(F64) ** 2, pos)))


def test_partial_correlation_rejects():
    x = torch.arange(4, dtype=F64)
    with pytest.raises(ValueError, match="partial_correlation.kind must be one of"):
        g.partial_correlation(x, x, x, kind="rank")
    with pytest.raises(ValueError, match="partial_correlation: x and control"):
        g.partial_correlation(x, x, x[:3])
    with pytest.raises(ValueError, match=r"partial_correlation.x must be at least 3 points"):
        g.partial_correlation(x[:2], x[:2], x[:2])


# ----------------------------------------------------------------------------- value manifold


def entropy_manifold(n_levels=6, per_level=20, d=12, seed=0, noise=1e-3):
    """States on a smooth 1-D curve parametrised by entropy, plus small noise."""
    levels = torch.log2(torch.arange(1, n_levels + 1, dtype=F64) + 1)
    h = levels.repeat_interleave(per_level)
    basis = orthonormal(3, d, seed=seed)
    curve = torch.stack([h, 0.3 * torch.sin(h), 0.2 * h**2], 1)  # monotone first coordinate
    states = curve @ basis + noise * randn(h.numel(), d, seed=seed + 1)
    return states, h


def test_pca_explained_variance_matches_numpy_svd():
    x = randn(40, 7, seed=16) @ randn(7, 7, seed=17) + 3.0
    h = randn(40, seed=18)
    probe = g.ValueManifoldPCA().fit(x, h)
    xn = x.numpy()
    z = (xn - xn.mean(0)) / xn.std(0)
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    np.testing.assert_allclose(
        probe.explained_variance_ratio_.numpy(), s**2 / (s**2).sum(), atol=1e-12
    )
    np.testing.assert_allclose(probe.explained_variance_.numpy(), s**2 / 39, atol=1e-10)
    np.testing.assert_allclose(np.abs(probe.components_.numpy() @ vt.T), np.eye(7), atol=1e-8)
    np.testing.assert_allclose(probe.mean_.numpy(), xn.mean(0), atol=1e-12)
    np.testing.assert_allclose(probe.scale_.numpy(), xn.std(0), atol=1e-12)
    torch.testing.assert_close(probe.transform(x)[:, 0], probe.pc1_scores_)
    pr = (s**2).sum() ** 2 / (s**4).sum()
    assert probe.summary_.participation_ratio == pytest.approx(pr, rel=1e-10)
    assert float(g.participation_ratio(x, standardize=True)) == pytest.approx(pr, rel=1e-10)
    assert probe.n_components_ == 7 and probe.n_features_in_ == 7 and probe.n_samples_ == 40
    assert g.ValueManifoldPCA(n_components=2).fit(x, h).components_.shape == (2, 7)


def test_pca_points_on_a_line():
    t = torch.linspace(-1, 1, 30, dtype=F64)
    direction = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    states = t[:, None] * direction + torch.tensor([5.0, 0.0, 1.0, -1.0], dtype=F64)
    s = g.ValueManifoldPCA().fit(states, t).summary_
    assert s.pc1_share == pytest.approx(1.0, abs=1e-12)
    assert s.pc12_share == pytest.approx(1.0, abs=1e-12)
    assert s.participation_ratio == pytest.approx(1.0, abs=1e-10)
    assert s.n_components_for_variance == 1
    assert s.spearman == pytest.approx(1.0) and s.pearson == pytest.approx(1.0)
    assert float(g.participation_ratio(states)) == pytest.approx(1.0, abs=1e-10)


def test_pca_isotropic_design_and_components_for_variance():
    # centred, orthogonal, equal-norm columns (Hadamard): every eigenvalue equal
    k = 4
    x = hadamard(8)[:, 1 : k + 1]
    h = torch.arange(8, dtype=F64)
    s = g.ValueManifoldPCA().fit(x, h).summary_
    assert s.participation_ratio == pytest.approx(k)
    assert s.pc1_share == pytest.approx(1 / k) and s.pc12_share == pytest.approx(2 / k)
    assert s.n_components_for_variance == 4
    assert (
        g.ValueManifoldPCA(variance_threshold=0.5).fit(x, h).summary_.n_components_for_variance == 2
    )
    assert float(g.participation_ratio(x)) == pytest.approx(k)


def test_pca_zero_variance_feature_is_harmless():
    x = randn(25, 5, seed=19)
    h = randn(25, seed=20)
    with_const = torch.cat(
        [x, torch.full((25, 1), 0.1, dtype=F64)], 1
    )  # 0.1 is not exact in binary
    a = g.ValueManifoldPCA().fit(x, h)
    b = g.ValueManifoldPCA().fit(with_const, h)
    assert not any(
        torch.isnan(t).any() for t in (b.components_, b.explained_variance_ratio_, b.scale_)
    )
    torch.testing.assert_close(b.explained_variance_ratio_[:5], a.explained_variance_ratio_)
    assert float(b.explained_variance_ratio_[5]) == pytest.approx(0.0, abs=1e-14)
    assert b.summary_.spearman == pytest.approx(a.summary_.spearman)


def test_pca_entropy_ordered_manifold():
    states, h = entropy_manifold()
    probe = g.ValueManifoldPCA().fit(states, h, generator=gen(21))
    s = probe.summary_
    assert s.ordering_score == 1.0
    assert s.n_bins == 6
    # within-level noise breaks rank ties, so the pooled Spearman is just below 1
    assert s.spearman > 0.98 and s.pearson > 0.99
    assert s.pc1_share > 0.9
    assert s.probe_r2 > 0.99
    assert probe.bin_counts_.tolist() == [20] * 6
    torch.testing.assert_close(probe.bin_entropy_bits_, torch.unique(h))
    # reversed orientation: PC1 is flipped so that Spearman >= 0
    flipped = g.ValueManifoldPCA().fit(-states, h).summary_
    assert flipped.spearman == pytest.approx(s.spearman) and flipped.ordering_score == 1.0
    # without noise every level is one point: ρ = 1 exactly (ties in both variables)
    exact = g.ValueManifoldPCA().fit(*entropy_manifold(noise=0.0)).summary_
    assert exact.spearman == pytest.approx(1.0, abs=1e-12) and exact.ordering_score == 1.0


def test_pca_ordering_score_quantile_bins_and_non_monotone_curve():
    h = torch.linspace(0, 4, 200, dtype=F64)  # 200 distinct levels -> quantile bins
    bump = torch.stack([torch.cos(math.pi * h / 4), 0.01 * randn(200, seed=22)], 1)
    probe = g.ValueManifoldPCA(n_bins=8).fit(bump, h)
    assert probe.summary_.n_bins == 8 and probe.bin_counts_.tolist() == [25] * 8
    assert probe.summary_.ordering_score == pytest.approx(1.0)
    # a U-shaped curve along PC1: bin means go down then up, the ordering score drops
    u_shape = torch.stack([(h - 2) ** 2, 0.01 * randn(200, seed=23)], 1)
    probe = g.ValueManifoldPCA(n_bins=8).fit(u_shape, h)
    ref = scipy.stats.spearmanr(
        probe.bin_entropy_bits_.numpy(), probe.bin_pc1_mean_.numpy()
    ).statistic
    assert probe.summary_.ordering_score == pytest.approx(ref)
    assert abs(probe.summary_.ordering_score) < 0.5


def test_pca_probe_split_uses_generator_only():
    states, h = entropy_manifold(seed=3)
    noisy = states + 0.3 * randn(*states.shape, seed=24)
    a = g.ValueManifoldPCA().fit(noisy, h, generator=gen(5))
    b = g.ValueManifoldPCA().fit(noisy, h, generator=gen(5))
    assert a.summary_.probe_r2 == b.summary_.probe_r2
    # check the R² against a numpy fit on the same split
    perm = torch.randperm(h.numel(), generator=gen(5))
    test, train = perm[:24], perm[24:]
    z = ((noisy - a.mean_) / a.scale_).numpy()
    design = np.concatenate([z, np.ones((h.numel(), 1))], 1)
    coef = np.linalg.lstsq(design[train.numpy()], h.numpy()[train.numpy()], rcond=None)[0]
    pred = design[test.numpy()] @ coef
    yt = h.numpy()[test.numpy()]
    r2 = 1 - ((yt - pred) ** 2).sum() / ((yt - yt.mean()) ** 2).sum()
    assert a.summary_.probe_r2 == pytest.approx(r2, abs=1e-8)
    assert g.ValueManifoldPCA().fit(noisy, h).summary_.probe_r2 is None
    ridge = g.ValueManifoldPCA(probe_ridge=1e3).fit(noisy, h, generator=gen(5)).summary_.probe_r2
    assert ridge < a.summary_.probe_r2


def test_pca_partial_correlation_given_position():
    states, h = entropy_manifold()
    positions = (h * 10).round().long()  # entropy is a function of position here
    s = g.ValueManifoldPCA().fit(states, h, positions=positions).summary_
    assert math.isnan(s.partial_pearson_given_position)
    # entropy varies within a position: compare with the standalone function
    h2 = h + 0.1 * randn(h.numel(), seed=25)
    probe = g.ValueManifoldPCA(position_control="linear").fit(states, h2, positions=positions)
    expected = g.partial_correlation(probe.pc1_scores_, h2, positions, kind="linear")
    assert probe.summary_.partial_pearson_given_position == pytest.approx(float(expected))
    assert (
        g.summarize_value_manifold(states, h2, positions=positions, position_control="linear")
        == probe.summary_
    )


def test_summary_with_single_feature():
    x = torch.arange(5, dtype=F64)[:, None]
    s = g.summarize_value_manifold(x, -torch.arange(5, dtype=F64))
    assert s.pc1_share == 1.0 and s.pc12_share == 1.0 and s.spearman == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(n_components=0), "n_components"),
        (dict(variance_threshold=0.0), "variance_threshold"),
        (dict(variance_threshold=1.5), "variance_threshold"),
        (dict(n_bins=1), "n_bins"),
        (dict(test_fraction=1.0), "test_fraction"),
        (dict(probe_ridge=-1.0), "probe_ridge"),
        (dict(position_control="pos"), "position_control"),
    ],
)
def test_pca_constructor_rejects(kwargs, field):
    with pytest.raises(ValueError, match=f"ValueManifoldPCA.{field} must be"):
        g.ValueManifoldPCA(**kwargs)


def test_pca_constructor_reports_all_problems():
    with pytest.raises(ValueError, match="(?s)n_bins.*test_fraction"):
        g.ValueManifoldPCA(n_bins=0, test_fraction=2.0)


@pytest.mark.parametrize(
    "states,h,kwargs,field",
    [
        (torch.zeros(2, 3, dtype=F64), torch.zeros(2, dtype=F64), {}, "states must be a tensor"),
        (torch.zeros(5, dtype=F64), torch.zeros(5, dtype=F64), {}, "states"),
        (randn(5, 3), torch.zeros(4, dtype=F64), {}, "entropy_bits must be a tensor"),
        (randn(5, 3), torch.zeros(5, dtype=torch.long), {}, "entropy_bits"),
        (
            randn(5, 3),
            torch.tensor([0.0, 1, 2, 3, math.nan], dtype=F64),
            {},
            "entropy_bits must be finite",
        ),
        (
            randn(5, 3).masked_fill(torch.eye(5, 3, dtype=torch.bool), math.inf),
            torch.zeros(5, dtype=F64),
            {},
            "states must be finite",
        ),
        (torch.ones(5, 3, dtype=F64), torch.zeros(5, dtype=F64), {}, "states must be non-constant"),
        (randn(5, 3), torch.zeros(5, dtype=F64), dict(positions=torch.zeros(4)), "positions"),
        (
            randn(6, 3),
            torch.zeros(6, dtype=F64),
            dict(generator=gen()),
            "states must be enough rows",
        ),
    ],
)
def test_pca_fit_rejects(states, h, kwargs, field):
    with pytest.raises(ValueError, match=f"ValueManifoldPCA.fit.*{field}"):
        g.ValueManifoldPCA().fit(states, h, **kwargs)


def test_pca_transform_rejects():
    with pytest.raises(ValueError, match="not fitted"):
        g.ValueManifoldPCA().transform(randn(3, 2))
    probe = g.ValueManifoldPCA().fit(randn(6, 3), randn(6, seed=1))
    with pytest.raises(
        ValueError, match=r"ValueManifoldPCA.transform.states must be a tensor \[n, d=3\]"
    ):
        probe.transform(randn(3, 2))


def test_participation_ratio_rejects():
    with pytest.raises(ValueError, match="participation_ratio.points must be a tensor"):
        g.participation_ratio(torch.zeros(1, 3, dtype=F64))
    with pytest.raises(ValueError, match="participation_ratio: points"):
        g.participation_ratio(torch.zeros(3, dtype=F64))


# ----------------------------------------------------------------------------- frame vs precision


def test_js_identical_disjoint_and_scipy():
    p = random_causal_pattern(2, 3, t=5, seed=26)
    assert float(g.attention_js_divergence_bits(p, p)) == pytest.approx(0.0, abs=1e-15)
    a = one_hot_rows(1, 2, 4, key=0)
    b = one_hot_rows(1, 2, 4, key=1)
    assert float(g.attention_js_divergence_bits(a, b)) == pytest.approx(1.0)
    q = random_causal_pattern(2, 3, t=5, seed=27)
    ref = np.mean(
        [
            scipy.spatial.distance.jensenshannon(p[b_, h, i].numpy(), q[b_, h, i].numpy(), base=2)
            ** 2
            for b_ in range(2)
            for h in range(3)
            for i in range(5)
        ]
    )
    assert float(g.attention_js_divergence_bits(p, q)) == pytest.approx(ref, abs=1e-12)
    site_ref = np.mean(
        [
            scipy.spatial.distance.jensenshannon(p[b_, h, 4].numpy(), q[b_, h, 4].numpy(), base=2)
            ** 2
            for b_ in range(2)
            for h in range(3)
        ]
    )
    got = g.attention_js_divergence_bits(p, q, torch.tensor([4]))
    assert float(got) == pytest.approx(site_ref, abs=1e-12)


def test_js_per_layer_and_masked_rows():
    p = random_causal_pattern(3, 1, 2, t=4, seed=28)
    q = random_causal_pattern(3, 1, 2, t=4, seed=29)
    per_layer = g.attention_js_divergence_bits(p, list(q))
    assert per_layer.shape == (3,)
    for layer in range(3):
        assert float(per_layer[layer]) == pytest.approx(
            float(g.attention_js_divergence_bits(p[layer], q[layer]))
        )
    a, b = one_hot_rows(1, 1, 3, key=0), one_hot_rows(1, 1, 3, key=1)
    a[..., 2, :] = 0.0
    b[..., 2, :] = 0.0  # a fully masked query row in both maps is left out
    assert float(g.attention_js_divergence_bits(a, b)) == pytest.approx(1.0)


def test_js_rejects():
    with pytest.raises(ValueError, match="attention_js_divergence_bits: patterns_a and patterns_b"):
        g.attention_js_divergence_bits(torch.zeros(1, 1, 3, 3), torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match="attention_js_divergence_bits.*patterns_b"):
        g.attention_js_divergence_bits(torch.zeros(1, 1, 3, 3), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="attention_js_divergence_bits.sites"):
        g.attention_js_divergence_bits(
            torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3), torch.tensor([5])
        )


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
