"""The tensor functions behind the named geometry variants (docs/theory.md §8.1–§8.3), on data whose
answer is known and against plain loops."""

import math

import pytest
import torch

from windtunnel import geometry as g

F64 = torch.float64


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_pooled_mean_cosine_of_exactly_orthogonal_vectors_is_zero():
    eye = torch.eye(6, dtype=F64)
    vectors = torch.stack([eye[:4] * 3.0, eye[2:6] * 0.5])  # two sets, orthogonal within each
    assert float(g.pooled_mean_cosine(vectors)) == 0.0
    assert float(g.pooled_mean_cosine(vectors, signed=True)) == 0.0
    parallel = torch.ones(1, 3, 5, dtype=F64) * torch.tensor([1.0, 2.0, 3.0], dtype=F64)[None, :, None]
    assert float(g.pooled_mean_cosine(parallel)) == pytest.approx(1.0, abs=1e-15)


def test_pooled_mean_cosine_against_a_loop_and_mean_abs_cosine():
    x = randn(3, 4, 7, 5, seed=1)  # [head, set, n, d]
    mask = torch.rand(4, 7, generator=torch.Generator().manual_seed(2)) < 0.6
    for signed in (False, True):
        got = g.pooled_mean_cosine(x, mask, signed=signed)
        for h in range(3):
            total, count = 0.0, 0
            for s in range(4):
                for a in range(7):
                    for b in range(7):
                        if a != b and mask[s, a] and mask[s, b]:
                            c = float(x[h, s, a] @ x[h, s, b] / (x[h, s, a].norm() * x[h, s, b].norm()))
                            total += c if signed else abs(c)
                            count += 1
            assert float(got[h]) == pytest.approx(total / count, abs=1e-12)
    one = x[:, :1]  # one set, no mask: the plain mean over off-diagonal pairs
    torch.testing.assert_close(g.pooled_mean_cosine(one), g.mean_abs_cosine(one[:, 0]), rtol=0, atol=1e-14)
    assert math.isnan(float(g.pooled_mean_cosine(x, torch.zeros(4, 7, dtype=torch.bool))[0]))
    with pytest.raises(ValueError, match="mask"):
        g.pooled_mean_cosine(x, torch.ones(4, 6, dtype=torch.bool))


@pytest.mark.parametrize("standardize", [True, False])
def test_states_on_a_line_have_pc1_share_one(standardize):
    t = randn(200, seed=3)
    direction = torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0], dtype=F64)
    states = 1.5 + t[:, None] * direction  # a line; the last feature is constant
    entropy = t.exp()
    pca = g.ValueManifoldPCA(standardize=standardize).fit(states, entropy)
    assert pca.summary_.pc1_share == pytest.approx(1.0, abs=1e-12)
    assert pca.summary_.spearman == pytest.approx(1.0)


def test_raw_pca_against_a_loop_and_differs_from_zscored():
    """standardize=False is the centred PCA of the authors' figure scripts: PC1 share = λ_max / trace of
    the covariance, the covariance built here entry by entry."""
    scale = torch.tensor([10.0, 1.0, 1.0, 0.1], dtype=F64)
    states = randn(300, 4, seed=4) * scale + randn(300, 1, seed=5) * torch.tensor([0.0, 1.0, 1.0, 0.1], dtype=F64)
    entropy = randn(300, seed=6)
    n, d = states.shape
    mean = [sum(float(states[i, j]) for i in range(n)) / n for j in range(d)]
    cov = torch.zeros(d, d, dtype=F64)
    for a in range(d):
        for b in range(d):
            cov[a, b] = sum((float(states[i, a]) - mean[a]) * (float(states[i, b]) - mean[b]) for i in range(n)) / (n - 1)
    eig = torch.linalg.eigvalsh(cov)
    raw = g.ValueManifoldPCA(standardize=False).fit(states, entropy).summary_
    assert raw.pc1_share == pytest.approx(float(eig[-1] / eig.sum()), abs=1e-12)
    assert raw.pc12_share == pytest.approx(float((eig[-1] + eig[-2]) / eig.sum()), abs=1e-12)
    zscored = g.ValueManifoldPCA().fit(states, entropy).summary_
    assert raw.pc1_share > 0.9 > 0.6 > zscored.pc1_share  # the large-spread feature dominates only the raw PCA
    with pytest.raises(ValueError, match="standardize must be a bool"):
        g.ValueManifoldPCA(standardize="no")


def test_attention_entropy_of_one_hot_and_uniform_rows_at_any_rows():
    """The focusing variants read the same patterns at different query rows (the sites, the final
    position, every position): a one-hot row has entropy 0, a uniform row log2 of its allowed keys."""
    t = 6
    causal = torch.tril(torch.ones(t, t, dtype=F64))
    uniform = (causal / causal.sum(-1, keepdim=True))[None, None]  # [batch, head, q, k]
    one_hot = torch.zeros(1, 1, t, t, dtype=F64)
    one_hot[..., torch.arange(t), torch.arange(t)] = 1.0  # every row on itself
    patterns = torch.stack([uniform, one_hot])  # [layer, batch, head, q, k]
    for rows in (torch.tensor([t - 1]), torch.arange(1, t), torch.tensor([0, 2, 4])):
        ent = g.attention_entropy(patterns, rows)
        expected = torch.log2(rows.to(F64) + 1).mean()
        assert float(ent.layer_entropy_bits[0]) == pytest.approx(float(expected), abs=1e-12)
        assert float(ent.layer_entropy_bits[1]) == 0.0
        if float(expected) > 0:
            assert float(ent.focusing_ratio) == pytest.approx(1.0, abs=1e-12)
