"""Calibration metrics: hand values, oracle vs copy model, the curve-first trap, docs/theory.md §7 floors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from windtunnel.metrics import (
    Calibration,
    SiteMetrics,
    calibration,
    entropy_mae,
    mae_curve_first,
    select_sites,
    site_metrics,
    summarize,
    trivial_floors,
)
from windtunnel.tasks import AssociativeRecall, Bijection, HMMFiltering


def test_hand_values_uniform_against_delta():
    # Uniform over 4 classes vs a delta on class 2: H_model = 2, H_bayes = 0, KL = log2(1/0.25) = 2,
    # TV = (0.75 + 3 * 0.25) / 2 = 0.75, CE = ln 4; argmax of equal logits is class 0 (wrong).
    logits = torch.zeros(1, 1, 4)
    posterior = torch.tensor([[[0.0, 0.0, 1.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[2]])
    result = calibration(logits, posterior, labels)
    assert isinstance(result, Calibration)
    assert result.entropy_mae_bits.item() == pytest.approx(2.0, abs=1e-15)
    assert result.kl_bits.item() == pytest.approx(2.0, abs=1e-15)
    assert result.total_variation.item() == pytest.approx(0.75, abs=1e-15)
    assert result.cross_entropy_nats.item() == pytest.approx(math.log(4), abs=1e-15)
    assert result.soft_cross_entropy_nats.item() == pytest.approx(math.log(4), abs=1e-15)
    assert result.accuracy.item() == 0.0
    assert result.entropy_gap_bits.item() == pytest.approx(2.0, abs=1e-15)


def test_hand_values_two_classes():
    # Logits (0, ln 3) give p = (1/4, 3/4); posterior (1/2, 1/2).
    # H(p) = 2 - (3/4) log2 3; KL = (1/2) log2(2) + (1/2) log2(2/3) = 1 - (1/2) log2 3.
    logits = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64)
    posterior = torch.tensor([[[0.5, 0.5]]], dtype=torch.float64)
    sites = site_metrics(logits, posterior, torch.tensor([[1]]))
    assert sites.model_entropy_bits.item() == pytest.approx(2 - 0.75 * math.log2(3), abs=1e-14)
    assert sites.bayes_entropy_bits.item() == pytest.approx(1.0, abs=1e-15)
    assert sites.kl_bits.item() == pytest.approx(1 - 0.5 * math.log2(3), abs=1e-14)
    assert sites.total_variation.item() == pytest.approx(0.25, abs=1e-15)
    assert sites.cross_entropy_nats.item() == pytest.approx(-math.log(0.75), abs=1e-14)
    assert sites.correct.item()


def test_kl_clipping_at_zero_model_mass():
    # The model gives the true class probability 0: KL = log2(1 / 1e-10) bits, finite.
    logits = torch.tensor([[[0.0, -math.inf]]], dtype=torch.float64)
    posterior = torch.tensor([[[0.0, 1.0]]], dtype=torch.float64)
    sites = site_metrics(logits, posterior, torch.tensor([[1]]))
    assert sites.kl_bits.item() == pytest.approx(math.log2(1e10), rel=1e-12)
    assert sites.model_entropy_bits.item() == 0.0


def test_curve_first_hides_cancelling_errors():
    # Two sequences with Bayes entropy 1 bit: one model over-confident (H = 0), one uniform
    # over 4 (H = 2). Per-sample MAE = 1; curve-first sees mean 1 vs mean 1 and reports 0.
    model = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    bayes = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    assert entropy_mae(model, bayes).item() == 1.0
    assert mae_curve_first(model, bayes).item() == 0.0


@given(seed=st.integers(0, 2**31 - 1), n_classes=st.integers(2, 6), n_sites=st.integers(1, 4))
@settings(max_examples=30)
def test_curve_first_never_exceeds_per_sample(seed, n_classes, n_sites):
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(7, n_sites, n_classes, generator=gen, dtype=torch.float64)
    posterior = torch.softmax(
        2 * torch.randn(7, n_sites, n_classes, generator=gen, dtype=torch.float64), -1
    )
    labels = torch.randint(n_classes, (7, n_sites), generator=gen)
    result = calibration(logits, posterior, labels)
    assert result.mae_curve_first_bits <= result.entropy_mae_bits + 1e-15
    assert torch.all(result.per_site.kl_bits >= -1e-15)
    assert torch.all(result.per_site.total_variation <= 1 + 1e-15)
    # Gibbs: soft CE = H_bayes (nats) + KL (nats), exactly, when nothing is clipped.
    sites = site_metrics(logits, posterior, labels)
    torch.testing.assert_close(
        sites.soft_cross_entropy_nats,
        (sites.bayes_entropy_bits + sites.kl_bits) * math.log(2),
    )


def test_entropy_mae_standard_error_is_over_sequences():
    import statistics

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 4, 5, generator=gen, dtype=torch.float64)
    posterior = torch.softmax(torch.randn(9, 4, 5, generator=gen, dtype=torch.float64), -1)
    labels = torch.randint(5, (9, 4), generator=gen)
    result = calibration(logits, posterior, labels)
    sites = site_metrics(logits, posterior, labels)
    per_sequence = [
        sum(abs(float(sites.model_entropy_bits[n, k] - sites.bayes_entropy_bits[n, k])) for k in range(4)) / 4 for n in range(9)
    ]
    assert result.entropy_mae_bits.item() == pytest.approx(statistics.fmean(per_sequence), rel=1e-12)
    assert result.entropy_mae_se_bits.item() == pytest.approx(statistics.stdev(per_sequence) / 3, rel=1e-12)
    assert math.isnan(calibration(logits[:1], posterior[:1], labels[:1]).entropy_mae_se_bits.item())


def test_select_sites_reads_the_slice():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 12, generator=gen)
    sites = torch.tensor([0, 4, 8])
    picked = select_sites(logits, sites, class_offset=5, n_classes=6)
    assert picked.shape == (3, 3, 6)
    for b in range(3):
        for k, s in enumerate([0, 4, 8]):
            assert torch.equal(picked[b, k], logits[b, s, 5:11])
    # Softmax over the slice equals the full softmax renormalised on the slice (docs/theory.md §7).
    full = torch.softmax(logits.double(), -1)[:, sites, 5:11]
    torch.testing.assert_close(
        torch.softmax(picked.double(), -1), full / full.sum(-1, keepdim=True)
    )


@pytest.mark.parametrize(
    "task",
    [
        Bijection(),
        Bijection(format="A", n_values=13, n_pairs=9),
        HMMFiltering(n_steps=8),
        AssociativeRecall(n_pairs=8, n_queries=2, n_keys=10, n_values=12),
    ],
    ids=["bijection-B", "bijection-A", "hmm", "recall"],
)
def test_oracle_scores_zero(task):
    """A model whose slice logits are log p_bayes is perfectly calibrated."""
    batch = task.sample(64, generator=torch.Generator().manual_seed(1))
    logits = torch.full(
        (64, task.seq_len, task.class_offset + task.n_classes), -30.0, dtype=torch.float64
    )
    logits[:, batch.sites, task.class_offset :] = batch.posterior.log()
    result = calibration(
        select_sites(logits, batch.sites, class_offset=task.class_offset, n_classes=task.n_classes),
        batch.posterior,
        batch.labels,
    )
    assert result.entropy_mae_bits.item() < 1e-12
    assert result.kl_bits.item() < 1e-12
    assert result.total_variation.item() < 1e-12
    bayes_right = (batch.posterior.argmax(-1) == batch.labels).double().mean()
    assert result.accuracy.item() == pytest.approx(bayes_right.item(), abs=1e-12)


def test_copy_model_scores_badly():
    """A model trained on the copy-label bug predicts the token at its own position."""
    task = Bijection()
    batch = task.sample(256, generator=torch.Generator().manual_seed(2))
    copy_logits = 20.0 * torch.nn.functional.one_hot(batch.tokens, task.vocab_size).double()
    copy = calibration(
        select_sites(
            copy_logits, batch.sites, class_offset=task.class_offset, n_classes=task.n_classes
        ),
        batch.posterior,
        batch.labels,
    )
    # The copy target (a key id) lies outside the value slice, so on the slice the copy model
    # is uniform: it sits on the 1.107-bit floor, far from the oracle's 0.
    assert copy.entropy_mae_bits.item() > 1.0
    assert copy.kl_bits.item() > 1.0
    # A copy model read in value space (predicting value id == key id) is confidently wrong.
    as_value = 20.0 * torch.nn.functional.one_hot(batch.tokens[:, batch.sites], task.n_classes)
    wrong = calibration(as_value.double(), batch.posterior, batch.labels)
    assert wrong.entropy_mae_bits.item() > 2.0
    assert wrong.kl_bits.item() > 10.0
    assert wrong.accuracy.item() < 0.2


def test_site_metrics_cat_and_summarize():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 3, 4, generator=gen, dtype=torch.float64)
    posterior = torch.softmax(torch.randn(10, 3, 4, generator=gen, dtype=torch.float64), -1)
    labels = torch.randint(4, (10, 3), generator=gen)
    whole = calibration(logits, posterior, labels)
    parts = [
        site_metrics(logits[i : i + 4], posterior[i : i + 4], labels[i : i + 4]) for i in (0, 4, 8)
    ]
    joined = summarize(SiteMetrics.cat(parts))
    assert joined.scalars() == pytest.approx(whole.scalars(), abs=1e-14)
    assert joined.n_sequences == 10
    # Per-site curves by a plain loop.
    for k in range(3):
        loop = (
            sum(
                abs(
                    site_metrics(
                        logits[n : n + 1, k : k + 1],
                        posterior[n : n + 1, k : k + 1],
                        labels[n : n + 1, k : k + 1],
                    ).model_entropy_bits.item()
                    - site_metrics(
                        logits[n : n + 1, k : k + 1],
                        posterior[n : n + 1, k : k + 1],
                        labels[n : n + 1, k : k + 1],
                    ).bayes_entropy_bits.item()
                )
                for n in range(10)
            )
            / 10
        )
        assert whole.per_site.entropy_mae_bits[k].item() == pytest.approx(loop, abs=1e-14)


def test_bijection_uniform_floor():
    floors = trivial_floors(
        Bijection(), generator=torch.Generator().manual_seed(0), n_sequences=64, batch_size=32
    )
    # Without replacement every sequence has H = log2(20 - i): the floor is exact, not sampled.
    closed = sum(math.log2(20) - math.log2(20 - i) for i in range(19)) / 19
    assert floors.uniform_entropy_mae_bits == pytest.approx(closed, abs=1e-12)
    assert floors.uniform_entropy_mae_bits == pytest.approx(1.107, abs=5e-4)  # docs/theory.md §7
    assert floors.bayes_cross_entropy_nats == pytest.approx(2.228, abs=5e-4)
    assert floors.bayes_entropy_bits == pytest.approx(3.215, abs=5e-4)
    assert floors.uniform_cross_entropy_nats == pytest.approx(math.log(20), abs=1e-12)
    assert floors.n_sequences == 64


def test_hmm_uniform_floor():
    floors = trivial_floors(
        HMMFiltering(), generator=torch.Generator().manual_seed(0), n_sequences=2000
    )
    # Monte Carlo: per-site |log2 5 - H| has sd ≈ 0.25; the 20 sites of a sequence are positively
    # correlated, so the standard error of the mean over 2000 sequences is at most
    # 0.25 / sqrt(2000) ≈ 0.0056. docs/theory.md §7's 0.415 is itself an estimate, so 0.02 (~3.5 se) it is.
    assert floors.uniform_entropy_mae_bits == pytest.approx(0.415, abs=0.02)
    assert floors.bayes_cross_entropy_nats == pytest.approx(1.32, abs=0.02)
    assert floors.bayes_entropy_bits == pytest.approx(1.907, abs=0.03)
    # Uniform is the max-entropy prediction, so KL(bayes || uniform) = log2 5 - H_bayes = |gap|.
    assert floors.uniform_kl_bits == pytest.approx(floors.uniform_entropy_mae_bits, abs=1e-12)


def test_floor_determinism():
    a = trivial_floors(
        HMMFiltering(n_steps=4),
        generator=torch.Generator().manual_seed(9),
        n_sequences=50,
        batch_size=20,
    )
    b = trivial_floors(
        HMMFiltering(n_steps=4),
        generator=torch.Generator().manual_seed(9),
        n_sequences=50,
        batch_size=20,
    )
    assert a == b


@pytest.mark.parametrize(
    "args,match",
    [
        (
            (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)),
            r"site_metrics: site_logits must be a floating-point tensor of shape \[batch, n_sites",
        ),
        (
            (
                torch.zeros(2, 3, 4, dtype=torch.long),
                torch.zeros(2, 3, 4),
                torch.zeros(2, 3, dtype=torch.long),
            ),
            r"site_logits must be",
        ),
        (
            (torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)),
            r"site_metrics: posterior must be .* = \[2, 3, 4\]",
        ),
        (
            (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3)),
            r"site_metrics: labels must be a long tensor of shape \[batch, n_sites\] = \[2, 3\]",
        ),
        (
            (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long)),
            r"labels must be",
        ),
    ],
)
def test_site_metrics_errors(args, match):
    with pytest.raises(ValueError, match=match):
        site_metrics(*args)


@pytest.mark.parametrize(
    "logits,sites,offset,n,match",
    [
        (torch.zeros(2, 5), torch.tensor([0]), 0, 2, r"select_sites: logits must be"),
        (torch.zeros(2, 5, 6), torch.tensor([5]), 0, 2, r"select_sites: sites must be .* 0\.\.4"),
        (torch.zeros(2, 5, 6), torch.tensor([0.0]), 0, 2, r"sites must be a long"),
        (torch.zeros(2, 5, 6), torch.tensor([-1]), 0, 2, r"sites must be"),
        (torch.zeros(2, 5, 6), torch.tensor([1]), 3, 4, r"class_offset \+ n_classes .* vocab = 6"),
        (torch.zeros(2, 5, 6), torch.tensor([1]), -1, 2, r"class_offset \+ n_classes"),
        (torch.zeros(2, 5, 6), torch.tensor([1]), 0, 0, r"n_classes=0"),
    ],
)
def test_select_sites_errors(logits, sites, offset, n, match):
    with pytest.raises(ValueError, match=match):
        select_sites(logits, sites, class_offset=offset, n_classes=n)


@pytest.mark.parametrize("fn", [entropy_mae, mae_curve_first])
def test_entropy_pair_errors(fn):
    with pytest.raises(ValueError, match=r"model_entropy_bits must be a floating-point tensor"):
        fn(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"bayes_entropy_bits must be"):
        fn(torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must have the same shape .* got \[3, 2\] and \[3, 1\]"):
        fn(torch.zeros(3, 2), torch.zeros(3, 1))


def test_floor_and_cat_errors():
    with pytest.raises(ValueError, match=r"trivial_floors\.n_sequences must be an int >= 1"):
        trivial_floors(Bijection(), generator=torch.Generator(), n_sequences=0)
    with pytest.raises(ValueError, match=r"trivial_floors\.batch_size must be an int >= 1"):
        trivial_floors(Bijection(), generator=torch.Generator(), batch_size=2.0)
    with pytest.raises(ValueError, match=r"SiteMetrics\.cat\.parts must be a non-empty list"):
        SiteMetrics.cat([])
