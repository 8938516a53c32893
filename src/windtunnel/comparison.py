"""Statistics over seeds: one summary (:func:`seed_statistics`) shared by ``reproduce em-vs-sgd``
and ``windtunnel sweep``; comparing optimiser arms over seeds (docs/theory.md §4.2):
steps-to-threshold and paired t-tests.

:func:`summarize_arms` works on plain per-seed records (the ``per_seed`` list of an em-vs-sgd
``results.json``), so a comparison can be recomputed from a run directory; its standard
deviations use ddof = 0, as the reference does (``np.std``). Sweeps report the sample standard
deviation (ddof = 1). Either way the 95 % interval is Student's t interval of the mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.special  # not scipy.stats: importing it costs about 0.5 s of every run

__all__ = ["seed_statistics", "steps_to_threshold", "summarize_arms"]


def seed_statistics(values: Sequence[float] | np.ndarray, *, ddof: int = 1, confidence: float = 0.95) -> dict[str, float | int | None]:
    """Mean, standard deviation and a confidence interval of one quantity over seeds.

    With n values, mean m and sample standard deviation s (ddof = 1), the interval is Student's t
    interval of the mean, m ± t_{(1+confidence)/2, n-1} · s / sqrt(n); it needs n >= 2 (None for
    one value). ``std`` is reported with ``ddof`` (1: the sample standard deviation; 0: the
    population one, as ``reproduce em-vs-sgd`` reports it after the reference); the interval
    always uses ddof = 1.

    Args:
        values: one number per seed, shape [n]; NaN values are not allowed.
        ddof: delta degrees of freedom of the reported ``std``.
        confidence: coverage of the interval, in (0, 1).

    Returns:
        {"mean", "std", "ci_low", "ci_high", "n"}; ``std`` is None when n <= ddof, the interval
        None when n < 2 (and both ends equal the mean when every value is the same).

    Raises:
        ValueError: for no values, a non-finite value, or ``confidence`` outside (0, 1).
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("seed_statistics: no values.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"seed_statistics: every value must be finite; got {x.tolist()}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"seed_statistics: confidence must lie in (0, 1); got {confidence!r}.")
    n = int(x.size)
    mean = float(x.mean())
    std = float(x.std(ddof=ddof)) if n > ddof else None
    if n < 2:
        low = high = None
    else:
        half = float(scipy.special.stdtrit(n - 1, 0.5 + confidence / 2)) * float(x.std(ddof=1)) / math.sqrt(n)
        low, high = mean - half, mean + half
    return {"mean": mean, "std": std, "ci_low": low, "ci_high": high, "n": n}


def steps_to_threshold(losses: Sequence[float] | np.ndarray, threshold: float) -> int:
    """First step whose (pre-update) loss is strictly below ``threshold``; ``len(losses)`` if none."""
    below = np.flatnonzero(np.asarray(losses) < threshold)
    return int(below[0]) if below.size else len(losses)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _paired_t_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Paired two-sided t-test of a against b (the test of scipy's ``ttest_rel``): t statistic and p.

    With d = a - b over n pairs, t = mean(d) / (s_d / sqrt(n)) (s_d: sample standard deviation) and
    p = 2 P(T_{n-1} > |t|). NaN for identical pairs; t = ±inf and p = 0 when every difference is
    the same non-zero number.

    Shapes: a, b [n], n >= 2.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = d.size
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.float64(d.mean()) / np.sqrt(d.var(ddof=1) / n)
    return float(t), float(2.0 * scipy.special.stdtr(n - 1, -abs(t)))


def summarize_arms(
    per_seed: list[dict],
    names: Sequence[str],
    *,
    n_steps: int,
    h_min_nats: float,
    baseline: str = "sgd",
) -> dict[str, dict]:
    """Mean ± std of each arm's final metrics over seeds (:func:`seed_statistics`, ddof = 0), the
    95 % interval of its final loss, and its speed against ``baseline``.

    Each record holds ``bayes.train.loss_nats``, ``arms[name][split][metric]`` for split in
    (train, heldout) and metric in (loss_nats, entropy_nats, accuracy), and ``curves[name]``, the
    pre-update losses of every step.

    Against the baseline (when it is among ``names``), with s̄ the baseline's mean final loss:

    * ``steps_to_sgd_mean_final``: mean over seeds of the first step below s̄ (the reference
      threshold); ``speedup_vs_sgd`` = n_steps / that mean;
    * ``steps_to_own_sgd_final_mean``: the same against each seed's own baseline final loss;
    * ``ttest_t_vs_sgd``, ``ttest_p_vs_sgd``: paired t-test of the final losses (as scipy's
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
        stats = {
            "final_loss": seed_statistics(final, ddof=0),
            "final_entropy": seed_statistics(entropy, ddof=0),
            "final_accuracy": seed_statistics(accuracy, ddof=0),
            "heldout_loss": seed_statistics(column(name, "heldout", "loss_nats"), ddof=0),
            "heldout_entropy": seed_statistics(column(name, "heldout", "entropy_nats"), ddof=0),
            "heldout_accuracy": seed_statistics(column(name, "heldout", "accuracy"), ddof=0),
        }
        summary = {
            "final_loss_mean": stats["final_loss"]["mean"],
            "final_loss_std": stats["final_loss"]["std"],
            "final_loss_ci95_low": stats["final_loss"]["ci_low"],
            "final_loss_ci95_high": stats["final_loss"]["ci_high"],
            "final_entropy_mean": stats["final_entropy"]["mean"],
            "final_entropy_std": stats["final_entropy"]["std"],
            "final_accuracy_mean": stats["final_accuracy"]["mean"],
            "final_accuracy_std": stats["final_accuracy"]["std"],
            "heldout_loss_mean": stats["heldout_loss"]["mean"],
            "heldout_loss_std": stats["heldout_loss"]["std"],
            "heldout_entropy_mean": stats["heldout_entropy"]["mean"],
            "heldout_accuracy_mean": stats["heldout_accuracy"]["mean"],
            "gap_to_bayes_nats_mean": (final - bayes).mean(),
            "gap_to_h_min_nats_mean": final.mean() - h_min_nats,
            "entropy_gap_to_h_min_nats_mean": entropy.mean() - h_min_nats,
            "curve_mean": curves.mean(0).tolist(),
            "curve_std": curves.std(0).tolist(),
        }
        if base is not None:
            to_mean = [steps_to_threshold(c, base.mean()) for c in curves]
            to_own = [steps_to_threshold(c, t) for c, t in zip(curves, base)]
            test = _paired_t_test(final, base) if name != baseline and len(final) > 1 else None
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
                    "ttest_t_vs_sgd": _finite(test[0]) if test is not None else None,
                    "ttest_p_vs_sgd": _finite(test[1]) if test is not None else None,
                }
            )
        out[name] = {k: float(v) if isinstance(v, np.floating) else v for k, v in summary.items()}
    return out
