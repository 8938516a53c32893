"""The figures of ``windtunnel eval`` and ``windtunnel memory``, drawn from what they write
(eval.json, memory.json), and the reading of eval.json's ``history_attention`` they share with
the command line."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from windtunnel.reports.figures import plain_log_ticks
from windtunnel.reports.html import draw_lag_response
from windtunnel.runs import write_bytes_atomic

__all__ = ["history_head", "plot_eval_curves", "plot_history_attention", "plot_lag_response", "plot_memory"]


def history_head(layer: dict[str, list[list[float]]]) -> int:
    """The head of one layer of ``history_attention`` (eval.json) with the most attention on the
    earlier observations, summed over the steps: the one `windtunnel eval` prints and plots."""
    return max(range(len(layer["earlier_reads"])), key=lambda h: sum(layer["earlier_reads"][h]))



def plot_eval_curves(curves: dict[str, dict[str, list[float]]], path: Path, *, title: str) -> Path:
    """Per prediction site, for each evaluated length: the model's entropy against the Bayes
    entropy, the per-sample entropy MAE and the KL (eval.json's ``per_position``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.6), layout="constrained")
    ax_h, ax_mae, ax_kl = fig.subplots(1, 3)
    for name, c in curves.items():
        sites = range(1, len(c["bayes_entropy_bits"]) + 1)
        line = ax_h.plot(sites, c["model_entropy_bits"], label=f"model ({name})")[0]
        ax_h.plot(sites, c["bayes_entropy_bits"], "--", color=line.get_color(), alpha=0.7, label=f"Bayes ({name})")
        ax_mae.semilogy(sites, [max(v, 1e-6) for v in c["entropy_mae_bits"]], label=name)
        ax_kl.semilogy(sites, [max(v, 1e-6) for v in c["kl_bits"]], label=name)
    ax_h.set(xlabel="prediction site", ylabel="entropy (bits)", title="entropy: model vs Bayes")
    ax_mae.set(xlabel="prediction site", ylabel="|H_model − H_Bayes| (bits)", title="per-sample entropy MAE")
    ax_kl.set(xlabel="prediction site", ylabel="KL(Bayes ‖ model) (bits)", title="KL")
    for ax in (ax_h, ax_mae, ax_kl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save_png(fig, path)


def plot_history_attention(history: dict[str, Any], path: Path, *, title: str) -> Path:
    """For the longest evaluated length, the head of each layer with the most attention on earlier
    observations: its mass on step t-1, on all earlier steps, and its entropy among them, by t."""
    from matplotlib.figure import Figure

    name, longest = list(history.items())[-1]
    steps = longest["steps"]
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    ax_prev, ax_all, ax_ent = fig.subplots(1, 3)
    for i, layer in enumerate(longest["layers"]):
        head = history_head(layer)
        label = f"block {i}, head {head}"
        ax_prev.plot(steps, layer["previous_read"][head], label=label)
        ax_all.plot(steps, layer["earlier_reads"][head], label=label)
        ax_ent.plot(steps, layer["earlier_entropy_bits"][head], label=label)
    ax_prev.set(xlabel="step t", ylabel="attention mass", title="on step t−1", ylim=(-0.02, 1.02))
    ax_all.set(xlabel="step t", ylabel="attention mass", title="on steps 1..t−1", ylim=(-0.02, 1.02))
    ax_ent.set(xlabel="step t", ylabel="bits", title="entropy among steps 1..t−1")
    for ax in (ax_prev, ax_all, ax_ent):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title} ({name}; per layer, the head with the most attention on earlier observations)")
    return _save_png(fig, path)


def plot_lag_response(lag: dict[str, Any], path: Path, *, title: str) -> Path:
    """The belief's move by lag, exact filter against model (log scale), and the error of the
    model's move beside it."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    draw_lag_response(ax, lag)
    ax.set(xlabel="lag d = t − j (observation o_j changed)", xticks=lag["lags"])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle(f"{title}\nhow the belief at step t moves when o_j changes ({lag['n_sequences']} sequences)", fontsize=10)
    return _save_png(fig, path)


def plot_memory(memory: dict[str, Any], path: Path, *, title: str) -> Path:
    """Per lag d >= 1, the model's move over the exact move at every saved step; beside it the
    entropy MAE on the same sequences."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax_lag, ax_mae = fig.subplots(1, 2)
    steps = memory["steps"]
    for i, d in enumerate(memory["lags"]):
        if d == 0 or memory["bayes_move_tv"][i] <= 0:
            continue
        ax_lag.plot(steps, [row[i] / memory["bayes_move_tv"][i] for row in memory["model_move_tv"]], marker=".", label=f"d = {d}")
    ax_lag.axhline(1.0, color="black", lw=0.8)
    ax_lag.set(xlabel="step", ylabel="model move / exact move", title="how much the belief hears o_{t−d}")
    ax_mae.semilogy(steps, memory["entropy_mae_bits"], marker=".", color="black")
    ax_mae.set(xlabel="step", ylabel="bits", title="entropy MAE on the same sequences")
    for ax in (ax_lag, ax_mae):
        ax.grid(alpha=0.3)
    ax_lag.legend(fontsize=7)
    fig.suptitle(f"{title}: memory over training ({memory['n_sequences']} sequences, every saved model)")
    return _save_png(fig, path)


def _save_png(fig: Any, path: Path) -> Path:
    for ax in fig.axes:
        plain_log_ticks(ax)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return write_bytes_atomic(path, buffer.getvalue())
