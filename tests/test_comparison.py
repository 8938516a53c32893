"""Cross-seed comparison of optimiser arms: hand-worked records."""

import numpy as np
import pytest
import scipy.stats

from windtunnel.comparison import steps_to_threshold, summarize_arms


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
