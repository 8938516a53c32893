"""Evaluate a trained run: per-position calibration curves at one or several lengths, JSON + figure."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from windtunnel.runs import RunDir, write_bytes_atomic, write_json_atomic
from windtunnel.tasks import HMMBatch, entropy_bits, windowed_posterior
from windtunnel.train import ExperimentConfig, evaluate

__all__ = ["MEMORY_WINDOWS", "evaluate_run", "load_model", "memory_ladder"]


def load_model(run_dir: str | Path, checkpoint: str | Path | None = None) -> tuple[ExperimentConfig, torch.nn.Module, int]:
    """(experiment, model in eval mode, step) from a run directory's checkpoint (latest by default)."""
    run = RunDir(run_dir)
    experiment = ExperimentConfig.from_dict(run.read_config())
    state = run.load_checkpoint(checkpoint)
    model = experiment.build_model(None)
    model.load_state_dict(state["model"], strict=True)
    model.eval()
    return experiment, model, int(state["step"])


def evaluate_run(
    run_dir: str | Path, *, lengths: Sequence[int] = (), n_sequences: int = 2000, seed: int = 12345, batch_size: int = 500
) -> dict[str, Any]:
    """Evaluate the latest checkpoint on fresh seeded sequences; write eval.json and eval_curves.png.

    ``lengths`` applies to tasks with a length parameter (HMM ``n_steps``); an empty list
    evaluates the training length only. Every metric is per sample (SPEC §7). For the HMM each
    summary also holds the memory ladder (:func:`memory_ladder`): the entropy MAE of exact
    filters that remember only the last w observations, and the rungs the model falls between.

    Raises:
        ValueError: when lengths are given for a task without ``n_steps`` or exceed the model's
            position table.
    """
    experiment, model, step = load_model(run_dir)
    base = experiment.build_task()
    if lengths and not hasattr(base, "n_steps"):
        raise ValueError(f"evaluate_run: --lengths needs a task with n_steps (the HMM); {experiment.task_name} has none.")
    tasks = {f"n_steps={n}": experiment.build_task(n_steps=n) for n in lengths} if lengths else {"train length": base}
    n_positions = getattr(experiment.model_config(), "n_positions", None)
    for name, task in tasks.items():
        if n_positions is not None and task.seq_len > n_positions:
            raise ValueError(f"evaluate_run: {name} needs {task.seq_len} positions; the model has {n_positions}.")
    generator = torch.Generator().manual_seed(seed)
    summary, curves = {}, {}
    for name, task in tasks.items():
        batches = [task.sample(min(batch_size, n_sequences - i), generator=generator) for i in range(0, n_sequences, batch_size)]
        cal = evaluate(model, task, batches)
        summary[name] = cal.scalars()
        if all(isinstance(b, HMMBatch) for b in batches):
            summary[name].update(memory_ladder(batches, model_mae_bits=summary[name]["entropy_mae_bits"]))
        curves[name] = {k: v.tolist() for k, v in vars(cal.per_site).items()}
    run = RunDir(run_dir)
    out = {"step": step, "n_sequences": n_sequences, "seed": seed, "summary": summary, "per_position": curves}
    json_path = write_json_atomic(run.path / "eval.json", out)
    figure_path = _plot(curves, run.path / "eval_curves.png", title=f"{experiment.name or experiment.task_name} at step {step}")
    return {**out, "paths": {"json": str(json_path), "figure": str(figure_path)}}


MEMORY_WINDOWS = (1, 2, 3, 4, 6, 8)


def memory_ladder(
    batches: Sequence[HMMBatch], *, model_mae_bits: float, windows: Sequence[int] = MEMORY_WINDOWS
) -> dict[str, Any]:
    """Where a model's HMM calibration sits on the ladder of finite-memory exact filters.

    For each w in ``windows``, the per-sample entropy MAE (bits) of
    :func:`~windtunnel.tasks.windowed_posterior` against the exact posterior of the same
    sequences; then the rungs around the model: the longest memory the model beats (MAE above
    ``model_mae_bits``) and the shortest memory that beats or ties it. On K = 20 HMMs the ladder
    is about 0.16, 0.047, 0.014, 0.005, 0.0006, 0.0001 bits for w = 1, 2, 3, 4, 6, 8.

    Returns:
        ``{"windowed_filter_mae_bits": {w: mae}, "beats_memory_steps": w or None,
        "beaten_by_memory_steps": w or None}`` (None: the model beats no rung / every rung).
    """
    errors = {w: [] for w in windows}
    for batch in batches:
        args = (batch.transition_cents, batch.emission_cents, batch.observations)
        for w in windows:
            errors[w].append((entropy_bits(windowed_posterior(*args, window=w)) - batch.entropy_bits).abs().flatten())
    ladder = {w: torch.cat(e).mean().item() for w, e in errors.items()}
    beats = [w for w in windows if ladder[w] > model_mae_bits]
    beaten_by = [w for w in windows if ladder[w] <= model_mae_bits]
    return {
        "windowed_filter_mae_bits": ladder,
        "beats_memory_steps": max(beats) if beats else None,
        "beaten_by_memory_steps": min(beaten_by) if beaten_by else None,
    }


def _plot(curves: dict[str, dict[str, list[float]]], path: Path, *, title: str) -> Path:
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return write_bytes_atomic(path, buffer.getvalue())
