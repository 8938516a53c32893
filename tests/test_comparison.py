"""Cross-seed comparison of optimiser arms: hand-worked records."""

import numpy as np
import pytest
import scipy.stats

from windtunnel.comparison import seed_statistics, steps_to_threshold, summarize_arms


def test_steps_to_threshold_by_hand():
    assert steps_to_threshold(np.array([3.0, 2.0, 1.0]), 2.5) == 1
    assert steps_to_threshold([3.0, 2.0, 1.0], 2.0) == 2  # strictly below
    assert steps_to_threshold([3.0, 2.0], 0.5) == 2  # never: the number of steps


def _record(bayes, arms):
    return {
        "bayes": {"train": {"loss_nats": bayes}},
        "arms": {
            name: {
                split: {"loss_nats": final, "entropy_nats": final + 0.01, "accuracy": 0.25}
                for split in ("train", "heldout")
            }
            for name, (final, _) in arms.items()
        },
        "curves": {name: curve for name, (_, curve) in arms.items()},
    }


def test_summary_of_two_hand_made_seeds():
    per_seed = [
        _record(1.8, {"sgd": (2.0, [2.2, 2.1, 2.05, 2.0]), "fast": (1.9, [2.2, 2.0, 1.95, 1.9])}),
        _record(1.9, {"sgd": (2.2, [2.4, 2.3, 2.25, 2.2]), "fast": (2.0, [2.4, 2.05, 2.02, 2.0])}),
    ]
    out = summarize_arms(per_seed, ["sgd", "fast"], n_steps=4, h_min_nats=1.5)
    fast = out["fast"]
    assert fast["final_loss_mean"] == pytest.approx(1.95) and fast[
        "final_loss_std"
    ] == pytest.approx(0.05)
    # sgd's mean final loss is 2.1: seed 1 is below it from step 1, seed 2 from step 1 (2.05)
    assert fast["steps_to_sgd_mean_final_per_seed"] == [1, 1] and fast["speedup_vs_sgd"] == 4.0
    # own thresholds 2.0 and 2.2: seed 1 first below 2.0 at step 2, seed 2 below 2.2 at step 1
    assert fast["steps_to_own_sgd_final_per_seed"] == [2, 1]
    assert fast["speedup_vs_sgd_per_seed_threshold"] == pytest.approx(4 / 1.5)
    assert fast["beats_sgd_every_seed"] is True
    assert fast["ttest_p_vs_sgd"] == pytest.approx(
        scipy.stats.ttest_rel([1.9, 2.0], [2.0, 2.2]).pvalue
    )
    assert fast["gap_to_bayes_nats_mean"] == pytest.approx(0.1)
    assert fast["gap_to_h_min_nats_mean"] == pytest.approx(1.95 - 1.5)
    assert fast["entropy_gap_to_h_min_nats_mean"] == pytest.approx(1.96 - 1.5)
    assert fast["curve_mean"] == pytest.approx([2.3, 2.025, 1.985, 1.95])
    assert out["sgd"]["ttest_p_vs_sgd"] is None and out["sgd"]["steps_to_sgd_mean_final"] == 3.0
    no_baseline = summarize_arms(per_seed, ["fast"], n_steps=4, h_min_nats=1.5)
    assert "speedup_vs_sgd" not in no_baseline["fast"]


def test_seed_statistics_by_hand():
    # 1, 2, 3: mean 2, sample std 1; with 2 degrees of freedom the t quantile has the closed form
    # (2q - 1) / sqrt(2 q (1 - q)), q = 0.975 (about 4.3027); the interval is 2 ± t / sqrt(3)
    out = seed_statistics([1.0, 2.0, 3.0])
    half = (2 * 0.975 - 1) / (2 * 0.975 * 0.025) ** 0.5 / 3**0.5
    assert out["mean"] == 2.0 and out["std"] == 1.0 and out["n"] == 3
    assert out["ci_low"] == pytest.approx(2.0 - half, rel=1e-12) and out["ci_high"] == pytest.approx(2.0 + half, rel=1e-12)
    assert seed_statistics([1.0, 2.0, 3.0], ddof=0)["std"] == pytest.approx((2 / 3) ** 0.5)  # the em-vs-sgd convention
    assert seed_statistics([1.0, 2.0, 3.0], confidence=0.5)["ci_high"] < out["ci_high"]
    assert seed_statistics([0.5]) == {"mean": 0.5, "std": None, "ci_low": None, "ci_high": None, "n": 1}
    assert seed_statistics([0.5, 0.5])["ci_low"] == seed_statistics([0.5, 0.5])["ci_high"] == 0.5


@pytest.mark.parametrize("values, kwargs, match", [([], {}, "no values"), ([1.0, float("nan")], {}, "finite"),
                                                    ([1.0, 2.0], {"confidence": 1.0}, "confidence")])
def test_seed_statistics_refuses(values, kwargs, match):
    with pytest.raises(ValueError, match=match):
        seed_statistics(values, **kwargs)


def test_summarize_arms_reports_the_shared_statistics():
    per_seed = [
        _record(1.8, {"sgd": (2.0, [2.2, 2.0])}),
        _record(1.9, {"sgd": (2.2, [2.4, 2.2])}),
    ]
    out = summarize_arms(per_seed, ["sgd"], n_steps=2, h_min_nats=1.5)["sgd"]
    stats = seed_statistics([2.0, 2.2], ddof=0)
    assert (out["final_loss_mean"], out["final_loss_std"]) == (stats["mean"], stats["std"])
    assert (out["final_loss_ci95_low"], out["final_loss_ci95_high"]) == (stats["ci_low"], stats["ci_high"])


def test_paired_t_test_is_scipys_ttest_rel():
    from windtunnel.comparison import _paired_t_test

    rng = np.random.default_rng(3)
    for n in (2, 3, 5, 10):
        a, b = rng.normal(size=n), rng.normal(size=n)
        ref = scipy.stats.ttest_rel(a, b)
        t, p = _paired_t_test(a, b)
        assert t == pytest.approx(ref.statistic, rel=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-12)
    assert _paired_t_test(np.array([1.0, 2.0]), np.array([0.0, 1.0])) == (float("inf"), 0.0)
    assert all(np.isnan(_paired_t_test(np.array([1.0, 2.0]), np.array([1.0, 2.0]))))


def test_t_interval_uses_the_student_t_quantile_of_scipy():
    for n in (2, 4, 7):
        values = np.arange(n, dtype=float) ** 1.5
        out = seed_statistics(values, confidence=0.9)
        half = scipy.stats.t.ppf(0.95, n - 1) * values.std(ddof=1) / n**0.5
        assert out["ci_high"] - out["mean"] == pytest.approx(half, rel=1e-12)
