"""Paper I's wind tunnels: train the transformer and its baselines, compare with the paper (docs/theory.md §10).

``reproduce(task, preset=..., out=...)`` trains every preset model of the task (transformer, and
the LSTM and position-wise MLP where defined) in ``out/<model>/``, evaluates each on fresh seeded
held-out sequences (one causal pass per sequence, per-sample MAE, docs/theory.md §7), and writes
``model_comparison.json``, ``model_comparison.md`` and ``model_comparison.png`` beside the paper's
numbers and the task's trivial floors (:func:`read_model_comparison` reads the JSON back, also
from directories written before the files were renamed from ``comparison.*``). A model whose
run directory already holds its final checkpoint is not trained again, and an interrupted run
resumes from its latest checkpoint.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from windtunnel.experiments.evaluation import evaluate_run
from windtunnel.metrics import trivial_floors
from windtunnel.paper_numbers import paper_numbers
from windtunnel.presets import PRESETS, apply_overrides, get_preset
from windtunnel.runs import RunDir, read_json, write_bytes_atomic, write_json_atomic, write_text_atomic
from windtunnel.train import Trainer, config_differences, flatten_config, load_experiment

__all__ = ["MODEL_COMPARISON", "paper_rows", "read_model_comparison", "reproduce"]

MODEL_COMPARISON = "model_comparison"
"""Stem of the files ``reproduce`` writes in its output directory (.json, .md, .png); directories
written by windtunnel 0.2.0 and earlier hold them as comparison.*."""


def paper_rows(task: str, model: str) -> list[tuple[str, float, str]]:
    """(quantity, value, source) of every single-valued paper number of ``task`` and ``model``,
    read from :data:`windtunnel.paper_numbers.PAPER_NUMBERS` (docs/theory.md §10)."""
    return [(n.quantity, n.value, n.source) for n in paper_numbers(task, model) if n.value is not None]


def _train_or_resume(key: str, run_dir: Path, seed: int | None, progress: bool, device: str | None = None,
                     tensorboard: bool = False) -> None:
    """Train the preset ``key`` in ``run_dir``; a run there of the same config is resumed (or
    skipped when finished), a run of another config (another seed) is refused."""
    run = RunDir(run_dir)
    experiment = PRESETS[key]()
    if seed is not None or device is not None:
        experiment = apply_overrides(experiment, [f"train.{k}={v}" for k, v in (("seed", seed), ("device", device)) if v is not None])
    if run.exists():
        theirs = load_experiment(run)
        differ = config_differences(theirs.to_dict(), experiment.to_dict())
        if differ:
            there, here = flatten_config(theirs.to_dict()), flatten_config(experiment.to_dict())
            text = ", ".join(f"{k}: {there.get(k)!r} there, {here.get(k)!r} here" for k in differ)
            raise ValueError(f"reproduce: {run_dir} holds a run of another config ({text}); use another --out.")
        state = run.load_checkpoint() if run.latest_checkpoint() else None
        if state is None:  # killed before its first checkpoint: nothing to keep
            Trainer(experiment, run_dir, overwrite=True, tensorboard=tensorboard).fit(progress=progress)
        elif state["step"] < experiment.train.steps:
            Trainer.resume(run_dir, tensorboard=tensorboard).fit(progress=progress)
        return
    Trainer(experiment, run_dir, tensorboard=tensorboard).fit(progress=progress)


def reproduce(task: str, *, preset: str = "cpu", out: str | Path, seed: int | None = None, models: tuple[str, ...] | None = None, progress: bool = True, device: str | None = None,
              tensorboard: bool = False) -> dict[str, Any]:
    """Train and compare every preset model of ``task`` (see the module docstring). With
    ``tensorboard``, each model's run directory also gets TensorBoard event files
    (``Trainer(tensorboard=True)``); a finished run is not trained again, so it gets none.

    ``device`` ("auto", "cpu", "cuda") sets every model's ``train.device``; None keeps the presets' (auto).

    Raises:
        ValueError: when the task has no preset of that name.
    """
    out = Path(out)
    available = [k.split("/")[1] for k in PRESETS if k.startswith(f"{task}/") and k.endswith(f"/{preset}")]
    if not available:
        raise ValueError(f"reproduce: no {preset!r} presets for task {task!r}; choose from {sorted({k.split('/')[0] for k in PRESETS})}.")
    chosen = [m for m in available if models is None or m in models]
    rows = []
    for model_name in chosen:
        key = f"{task}/{model_name}/{preset}"
        run_dir = out / model_name
        _train_or_resume(key, run_dir, seed, progress, device, tensorboard)
        experiment = get_preset(task, model_name, preset)
        lengths = (experiment.build_task().n_steps, *experiment.eval_lengths) if experiment.eval_lengths else ()
        report = evaluate_run(run_dir, lengths=lengths)
        metrics = RunDir(run_dir).metrics()
        wall_s = max((r.get("elapsed_s") or 0.0 for r in metrics if r.get("split") == "train"), default=None)
        n_params = sum(p.numel() for p in experiment.build_model(None).parameters())
        rows.append({"model": model_name, "preset": key, "n_params": n_params, "steps": experiment.train.steps, "train_wall_s": wall_s, "eval": report.summary, "paper": paper_rows(task, model_name)})
    task_object = get_preset(task, chosen[0], preset).build_task()
    floors = trivial_floors(task_object, generator=torch.Generator().manual_seed(0))
    result = {"task": task, "preset": preset, "floors": vars(floors), "models": rows, "chance_accuracy": _chance_accuracy(task_object, floors)}
    write_json_atomic(out / f"{MODEL_COMPARISON}.json", result)
    write_text_atomic(out / f"{MODEL_COMPARISON}.md", _markdown(result))
    _plot(result, out / f"{MODEL_COMPARISON}.png")
    return result


def read_model_comparison(out: str | Path) -> dict[str, Any]:
    """The model comparison a :func:`reproduce` wrote in ``out``: model_comparison.json, or
    comparison.json in a directory written before the rename.

    Raises:
        ValueError: when ``out`` holds neither.
    """
    for name in (f"{MODEL_COMPARISON}.json", "comparison.json"):
        if (Path(out) / name).is_file():
            return read_json(Path(out) / name)
    raise ValueError(f"read_model_comparison: {out} holds no {MODEL_COMPARISON}.json (nor the older comparison.json); run windtunnel reproduce first.")


def _chance_accuracy(task: Any, floors: Any) -> dict[str, float]:
    """Chance accuracies of a task whose posterior is a delta at every site (recall), by name.

    Guessing uniformly over the whole value slice scores 1 / n_classes; a model that has learned
    only that the answer is one of the values stored in the prompt scores 1 / n_pairs. {} for
    tasks with uncertain posteriors (mean Bayes entropy above 0), where the entropy MAE is the
    headline.
    """
    if floors.bayes_entropy_bits > 0:
        return {}
    chance = {"uniform over all values": 1.0 / task.n_classes}
    if hasattr(task, "n_pairs"):
        chance["uniform over the stored values"] = 1.0 / task.n_pairs
    return chance


def _markdown(result: dict[str, Any]) -> str:
    floors = result["floors"]
    lines = [
        f"# {result['task']}: transformer and baselines ({result['preset']} presets)",
        "",
        f"Uniform-prediction floor: entropy MAE {floors['uniform_entropy_mae_bits']:.4f} bits; "
        f"Bayes CE {floors['bayes_cross_entropy_nats']:.4f} nats (mean posterior entropy {floors['bayes_entropy_bits']:.4f} bits).",
        "",
        "| model | parameters | steps | train wall (s) | eval set | entropy MAE (bits) | KL (bits) | accuracy | paper |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["models"]:
        paper = "; ".join(f"{m} {v:g} ({s})" for m, v, s in row["paper"]) or "—"
        for i, (name, ev) in enumerate(row["eval"].items()):
            first = i == 0
            wall = f"{row['train_wall_s']:.0f}" if first and row["train_wall_s"] else ""
            lines.append(
                f"| {row['model'] if first else ''} | {row['n_params']:,} |{row['steps'] if first else ''} | {wall} | {name} | "
                f"{ev['entropy_mae_bits']:.5f} | {ev['kl_bits']:.5f} | {ev['accuracy']:.4f} | {paper if first else ''} |"
            )
    lines += ["", "Every metric is per sample over 2,000 fresh held-out sequences (docs/theory.md §7); KL is KL(Bayes ‖ model)."]
    chance = result.get("chance_accuracy") or {}
    if chance:
        lines += ["", "Chance accuracy: " + "; ".join(f"{text} {value:.2%}" for text, value in chance.items()) + "."]
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    # A delta posterior (recall) makes accuracy the metric that matters (docs/theory.md §5.3); otherwise the
    # per-sample entropy MAE against the exact posterior.
    chance = result.get("chance_accuracy") or {}
    labels, values = [], []
    for row in result["models"]:
        for name, ev in row["eval"].items():
            labels.append(f"{row['model']}\n{name}" if len(row["eval"]) > 1 else row["model"])
            values.append(ev["accuracy"] if chance else max(ev["entropy_mae_bits"], 1e-6))
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    if chance:
        for (text, value), colour in zip(chance.items(), ("tab:red", "tab:orange")):
            ax.axhline(value, color=colour, ls="--", label=f"chance, {text} ({value:.1%})")
        ax.set(ylim=(0, 1.05), ylabel="accuracy at the query sites", title=f"{result['task']}: accuracy (the posterior is a delta)")
    else:
        ax.set_yscale("log")
        ax.axhline(result["floors"]["uniform_entropy_mae_bits"], color="tab:red", ls="--", label="uniform floor")
        ax.set(ylabel="per-sample entropy MAE (bits)", title=f"{result['task']}: calibration against the exact posterior")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return write_bytes_atomic(path, buffer.getvalue())
