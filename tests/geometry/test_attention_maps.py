"""Attention entropy, focusing, QK maps and JS divergence (docs/theory.md §8.2, §8.6).

Checked against plain loops, scipy and hand-derivable values.
"""

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
    # patterns first would give 1 bit (the Jensen bias docs/theory.md §8.2 warns about).
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


@given(seed=st.integers(0, 10_000), t=st.integers(1, 7))
def test_attention_entropy_bounded_by_log2_allowed(seed, t):
    p = random_causal_pattern(2, 3, t=t, seed=seed)
    res = g.attention_entropy(p, normalize=True)
    bound = torch.log2(torch.arange(1, t + 1, dtype=F64))
    assert bool((res.entropy_bits >= 0).all())
    assert bool((res.entropy_bits <= bound + 1e-12).all())
    assert bool((res.normalized_entropy <= 1 + 1e-12).all())


def test_qk_alignment_rejects_non_float_k_and_pattern():
    q = torch.ones(1, 3, 2, 4, dtype=F64)
    with pytest.raises(ValueError, match="qk_alignment: k must be a floating-point"):
        g.qk_alignment(q, q.long())
    feasible = torch.ones(1, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="qk_alignment: pattern must be a floating-point"):
        g.qk_alignment(q, q, feasible=feasible, pattern=torch.ones(1, 2, 3, 3, dtype=torch.long))
