"""Comparing optimiser arms over seeds (docs/theory.md §4.2): summaries, steps-to-threshold, paired t-tests.

Works on plain per-seed records (the ``per_seed`` list of an em-vs-sgd ``results.json``), so a
comparison can be recomputed from a run directory. Standard deviations use ddof = 0, as the
reference does (``np.std``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.stats

__all__ = ["steps_to_threshold", "summarize_arms"]


def steps_to_threshold(losses: Sequence[float] | np.ndarray, threshold: float) -> int:
    """First step whose (pre-update) loss is strictly below ``threshold``; ``len(losses)`` if none."""
    below = np.flatnonzero(np.asarray(losses) < threshold)
    return int(below[0]) if below.size else len(losses)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def summarize_arms(
    per_seed: list[dict],
    names: Sequence[str],
    *,
    n_steps: int,
    h_min_nats: float,
    baseline: str = "sgd",
) -> dict[str, dict]:
    """Mean ± std of each arm's final metrics over seeds, and its speed against ``baseline``.

    Each record holds ``bayes.train.loss_nats``, ``arms[name][split][metric]`` for split in
    (train, heldout) and metric in (loss_nats, entropy_nats, accuracy), and ``curves[name]``, the
    pre-update losses of every step.

    Against the baseline (when it is among ``names``), with s̄ the baseline's mean final loss:

    * ``steps_to_sgd_mean_final``: mean over seeds of the first step below s̄ (the reference
      threshold); ``speedup_vs_sgd`` = n_steps / that mean;
    * ``steps_to_own_sgd_final_mean``: the same against each seed's own baseline final loss;
    * ``ttest_t_vs_sgd``, ``ttest_p_vs_sgd``: paired t-test of the final losses (scipy
      ``ttest_rel``; None for the baseline itself or a single seed).

    Returns:
        {name: {field: float | list | bool | None}}, JSON-ready.
    """

    def column(name: str, split: str, key: str) -> np.ndarray:
        return np.array([s["arms"][name][split][key] for s in per_seed])

    bayes = np.array([s["bayes"]["train"]["loss_nats"] for s in per_seed])
    base = column(baseline, "train", "loss_nats") if baseline in names else None
    out = {}
    for name in names:
        final, entropy = column(name, "train", "loss_nats"), column(name, "train", "entropy_nats")
        accuracy = column(name, "train", "accuracy")
        curves = np.array([s["curves"][name] for s in per_seed])
        summary = {
            "final_loss_mean": final.mean(),
            "final_loss_std": final.std(),
            "final_entropy_mean": entropy.mean(),
            "final_entropy_std": entropy.std(),
            "final_accuracy_mean": accuracy.mean(),
            "final_accuracy_std": accuracy.std(),
            "heldout_loss_mean": column(name, "heldout", "loss_nats").mean(),
            "heldout_loss_std": column(name, "heldout", "loss_nats").std(),
            "heldout_entropy_mean": column(name, "heldout", "entropy_nats").mean(),
            "heldout_accuracy_mean": column(name, "heldout", "accuracy").mean(),
            "gap_to_bayes_nats_mean": (final - bayes).mean(),
            "gap_to_h_min_nats_mean": final.mean() - h_min_nats,
            "entropy_gap_to_h_min_nats_mean": entropy.mean() - h_min_nats,
            "curve_mean": curves.mean(0).tolist(),
            "curve_std": curves.std(0).tolist(),
        }
        if base is not None:
            to_mean = [steps_to_threshold(c, base.mean()) for c in curves]
            to_own = [steps_to_threshold(c, t) for c, t in zip(curves, base)]
            test = (
                scipy.stats.ttest_rel(final, base) if name != baseline and len(final) > 1 else None
            )
            summary.update(
                {
                    "steps_to_sgd_mean_final": float(np.mean(to_mean)),
                    "steps_to_sgd_mean_final_std": float(np.std(to_mean)),
                    "steps_to_sgd_mean_final_per_seed": to_mean,
                    "steps_to_own_sgd_final_mean": float(np.mean(to_own)),
                    "steps_to_own_sgd_final_per_seed": to_own,
                    "speedup_vs_sgd": n_steps / max(float(np.mean(to_mean)), 1.0),
                    "speedup_vs_sgd_per_seed_threshold": n_steps / max(float(np.mean(to_own)), 1.0),
                    "beats_sgd_every_seed": bool(np.all(final < base)),
                    "ttest_t_vs_sgd": _finite(test.statistic) if test is not None else None,
                    "ttest_p_vs_sgd": _finite(test.pvalue) if test is not None else None,
                }
            )
        out[name] = {k: float(v) if isinstance(v, np.floating) else v for k, v in summary.items()}
    return out
