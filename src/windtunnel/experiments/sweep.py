"""Sweeps over seeds and settings: every trial an ordinary run directory, run on a local pool of
worker processes or on a Ray cluster (Ray Tune), resumable, and summarised over seeds.

A sweep is a preset, ``--set`` overrides common to every trial, a grid (``train.lr=1e-3,3e-4``;
the Cartesian product of the keys) and seeds. :func:`plan_sweep` validates every trial's config
before anything is written, and names each trial by its grid values and seed; the plan is saved
as SWEEP_DIR/sweep.json and each trial trains in SWEEP_DIR/runs/NAME (layout:
:mod:`windtunnel.runs`), so ``windtunnel eval``, ``report`` and the rest read it unchanged.

Fault tolerance comes from the run directories themselves. A trial is finished when its latest
checkpoint (verified when read) is at the run's last step; a rerun of the same sweep skips
finished trials, resumes the others from their latest checkpoint (:meth:`Trainer.resume`, which
drops the log rows written after it, so each step is logged once) and starts the rest. A trial
that raises (a non-finite loss, a run that does not fit) is recorded as failed in
SWEEP_DIR/sweep.jsonl with its error and the others go on; a rerun leaves it failed unless asked
to retry it. The driver logs in sweep.jsonl every segment it submits (the step it starts from)
and every segment that ends (from step, to step; a segment that finished while the driver was
being killed is logged by the next run, marked "recovered"), and rewrites summary.csv and
summary.json (atomically) after each trial.

Backends. ``local``: a pool of spawned worker processes, each trial with a fixed number of torch
threads, so that workers x threads <= the cores; workers die with the driver (a killed driver
leaves no trainer behind holding a run's lock). ``ray``: Ray Tune, one Tune trial per sweep trial
with its CPUs (= its torch threads) and GPU fraction as resources. Tune rather than bare Ray
tasks because it gives, without code of ours, what a sweep on a cluster needs: each trial reports
its evaluation metrics as it trains (``tune.report``, in Tune's results under SWEEP_DIR/ray),
per-trial resources including fractional GPUs, and retries of trials lost with a node
(``FailureConfig``); its schedulers and search algorithms stay available. Because a trial resumes
from its own checkpoint, a Tune retry continues the run instead of starting it again. On CPU a
trial gives bit-identical numbers on either backend with the same torch threads.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from windtunnel.comparison import seed_statistics
from windtunnel.presets import Recipe, apply_overrides, build_experiment, load_recipe
from windtunnel.replicas import ReplicaTrainer, check_replicas
from windtunnel.runs import (
    RunDir,
    SweepDir,
    finite_number,
    json_ready,
    read_json,
    require_tensorboard,
    write_json_atomic,
    write_text_atomic,
)
from windtunnel.train import ExperimentConfig, Trainer, load_experiment

__all__ = [
    "SWEEP_FORMAT",
    "compare_sweeps",
    "parse_grid",
    "parse_seeds",
    "plan_sweep",
    "replica_groups",
    "run_replica_group",
    "run_sweep",
    "run_trial",
    "trial_status",
    "write_summary",
]

SWEEP_FORMAT = "windtunnel-sweep"
SWEEP_VERSION = 1
RAY_EXTRA = "the ray backend needs Ray Tune: pip install 'windtunnel[ray]'"


# --- the plan ---------------------------------------------------------------------------------


def parse_seeds(text: str) -> tuple[int, ...]:
    """Seeds from ``"0-4"``, ``"0,3,7"`` or a mix (``"0-2,10"``), in the order given.

    Raises:
        ValueError: for anything else, a negative seed, a descending range or a repeated seed.
    """
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"--seeds must be seeds >= 0 and ranges like 0-4, separated by commas; got {text!r}.")
        low, high = int(match[1]), int(match[2]) if match[2] is not None else int(match[1])
        if high < low:
            raise ValueError(f"--seeds: the range {part} runs backwards; write {high}-{low}.")
        seeds.extend(range(low, high + 1))
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"--seeds lists {', '.join(map(str, repeated))} more than once; got {text!r}.")
    return tuple(seeds)


def _split_values(text: str) -> list[str]:
    """Split at the commas outside brackets, so that ``eval_lengths=[30,50],[]`` is two values."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    return values


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["train.lr=1e-3,3e-4", ...]`` -> ``[("train.lr", ["1e-3", "3e-4"]), ...]``, in order.

    Values are kept as text (parsed as JSON, else as strings, when applied, as ``--set`` does).

    Raises:
        ValueError: listing every malformed item, empty value, repeated value or repeated key.
    """
    problems, grid, seen = [], [], set()
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--grid {item!r} must look like section.field=v1,v2")
            continue
        values = _split_values(raw)
        if any(not v for v in values):
            problems.append(f"--grid {item!r} has an empty value")
            continue
        if len(set(values)) != len(values):
            problems.append(f"--grid {key} repeats a value ({raw})")
            continue
        if key in seen:
            problems.append(f"--grid {key} is given twice; put all its values in one --grid {key}=v1,v2")
            continue
        seen.add(key)
        grid.append((key, values))
    if problems:
        raise ValueError("; ".join(problems) + ".")
    return grid


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+=-]", "_", text).strip("_") or "_"


def _trial_name(grid: dict[str, str], seed: int) -> str:
    return "_".join([*(f"{key}={_slug(value)}" for key, value in grid.items()), f"seed={seed}"])


def _one_line(err: BaseException) -> str:
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


def plan_sweep(
    task: str,
    model: str,
    preset: str,
    seeds: Sequence[int],
    grid: Sequence[tuple[str, Sequence[str]]],
    overrides: Sequence[str] = (),
    steps: int | None = None,
    *,
    config: str | Recipe | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Every trial of a sweep, validated: the spec saved as SWEEP_DIR/sweep.json.

    Each trial's config is the preset ``task/model/preset`` with the config file ``config``
    (``--config``), ``overrides`` (``--set``), ``steps`` (``--steps``), ``device`` (``--device``),
    one value of each grid key and ``train.seed`` applied, in that order
    (:func:`~windtunnel.presets.build_experiment`, as ``windtunnel train`` builds a run), and
    validated as ``windtunnel train`` would validate it. ``model`` or ``preset`` None take the
    config file's choice (else transformer, cpu). The spec holds ``config`` (the file's name and
    settings) and ``device`` only when given, so sweeps planned without them keep their spec.

    Returns:
        {"format", "version", "task", "model", "preset", "seeds", "grid_keys", "grid" (key ->
        values as text), "set", "steps", "trials": [{"name", "seed", "grid" (key -> parsed
        value), "grid_text", "experiment" (the config as a dict)}]}, trials in grid order with
        the seed varying fastest.

    Raises:
        ValueError: one message listing every problem: an unknown key (with the close matches),
            a value the field refuses (naming key and value), a key in both the grid and
            ``--set``, ``train.seed`` in the grid (use the seeds), no seeds, two trials whose
            names would collide.
    """
    if not seeds:
        raise ValueError("--seeds: a sweep needs at least one seed.")
    recipe = load_recipe(str(config)) if config is not None and not isinstance(config, Recipe) else config
    base = build_experiment(task, model, preset, config=recipe, overrides=overrides, steps=steps, device=device)
    model, preset = base.model_name, preset or (recipe.preset if recipe is not None else None) or "cpu"
    given = {item.partition("=")[0].strip().removeprefix("--") for item in overrides}
    problems = []
    for key, values in grid:
        if key == "train.seed":
            problems.append("--grid train.seed: give the seeds with --seeds")
            continue
        if key in given:
            problems.append(f"--grid {key} is also given with --set {key}; keep one")
            continue
        if key == "train.steps" and steps is not None:
            problems.append("--grid train.steps and --steps both set the steps; keep one")
            continue
        for value in values:
            try:
                apply_overrides(base, [f"{key}={value}"])
            except ValueError as err:
                text = _one_line(err)
                if "is not a field of" in text or "must start with" in text:  # the key itself
                    problems.append(f"--grid {key} {text.split(': ', 1)[-1].removeprefix(f'--{key} ')}")
                    break
                problems.append(f"--grid {key}={value}: {text}")
    if problems:
        raise ValueError("bad --grid: " + "; ".join(problems))
    keys = [key for key, _ in grid]
    trials, names = [], {}
    for combo in itertools.product(*(values for _, values in grid)):
        texts = dict(zip(keys, combo))
        for seed in seeds:
            try:
                experiment = apply_overrides(base, [*(f"{k}={v}" for k, v in texts.items()), f"train.seed={seed}"])
            except ValueError as err:
                problems.append(f"{', '.join(f'{k}={v}' for k, v in texts.items())}: {_one_line(err)}")
                break
            name = _trial_name(texts, seed)
            if name in names:
                problems.append(f"the trials {names[name]} and {texts} get the same directory name {name!r}")
            names[name] = texts
            parsed = {k: _parsed(v) for k, v in texts.items()}
            trials.append({"name": name, "seed": int(seed), "grid": parsed, "grid_text": texts, "experiment": experiment.to_dict()})
    if problems:
        raise ValueError("bad sweep: " + "; ".join(problems))
    return {
        "format": SWEEP_FORMAT,
        "version": SWEEP_VERSION,
        "task": task,
        "model": model,
        "preset": preset,
        "seeds": [int(s) for s in seeds],
        "grid_keys": keys,
        "grid": {key: list(values) for key, values in grid},
        "set": list(overrides),
        "steps": steps,
        **({"config": {"name": recipe.name, "settings": [list(item) for item in recipe.settings]}} if recipe is not None else {}),
        **({"device": device} if device is not None else {}),
        "trials": trials,
    }


def _parsed(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# --- one trial (runs in a worker) -------------------------------------------------------------


_VERIFIED: dict[tuple[str, int, int], tuple[int, float]] = {}


def _checkpoint_step(run: RunDir) -> tuple[int | None, float]:
    """(step, elapsed_s) of the run's latest checkpoint, verified; (None, 0) without one. A file
    is verified once per version (path, modification time, size): the driver asks after every
    trial, and a checkpoint is only ever replaced whole.

    Raises:
        CheckpointError: when it exists but cannot be trusted.
    """
    path = run.latest_checkpoint()
    if path is None:
        return None, 0.0
    info = path.stat()
    key = (str(path.resolve()), info.st_mtime_ns, info.st_size)
    if key not in _VERIFIED:
        state = run.load_checkpoint(path)
        _VERIFIED[key] = (int(state["step"]), float(state.get("elapsed_s", 0.0)))
    return _VERIFIED[key]


def run_trial(
    trial: dict[str, Any],
    run_path: str | os.PathLike,
    *,
    threads: int = 1,
    gpus: float = 0.0,
    report: Callable[[int, dict[str, Any]], None] | None = None,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Train one trial of a sweep to its end in ``run_path``: skip it when finished, resume it
    from its latest checkpoint when one exists, start it otherwise. Never raises for a failed
    run: the error comes back in the result.

    Args:
        trial: one entry of the spec's ``trials`` (:func:`plan_sweep`).
        run_path: the trial's run directory.
        threads: torch threads of this trial (``torch.set_num_threads``).
        gpus: 0 hides CUDA from the trial (set before CUDA starts in this process), so "auto"
            trains on the CPU; > 0 leaves the devices the backend assigned visible.
        report: called as ``report(step, {split: {metric: value}})`` after each evaluation.
        tensorboard: also write TensorBoard event files in the trial's run directory
            (:class:`~windtunnel.runs.TensorBoardMirror`; ``Trainer(tensorboard=True)``).

    Returns:
        {"name", "status": "finished" | "failed", "from_step", "to_step", "wall_s" (training time
        of the whole run, summed over its segments), "error" (one line, or None), "skipped"
        (True when it was already finished)}.
    """
    _claim_worker(threads, gpus)
    run = RunDir(run_path)
    out = _new_result(trial)
    try:
        experiment = ExperimentConfig.from_dict(trial["experiment"])
        step = _trial_start(trial, run, experiment, out)
        if out["skipped"]:
            return out
        if step is None:  # nothing trained yet (or killed before the first checkpoint): start afresh
            trainer = Trainer(experiment, run, overwrite=run.exists(), tensorboard=tensorboard)
        else:
            trainer = Trainer.resume(run, tensorboard=tensorboard)
        out["from_step"] = trainer.step
        def on_eval(step: int, calibrations: dict[str, Any]) -> None:
            report(step, {split: cal.scalars() for split, cal in calibrations.items()})

        try:
            trainer.fit(on_eval=on_eval if report is not None else None)
        finally:
            out["to_step"] = trainer.step
            out["wall_s"] = trainer.elapsed_s
        out["status"] = "finished"
    except Exception as err:  # noqa: BLE001 - a failed trial is a result, not the sweep's end
        out["error"] = f"{type(err).__name__}: {_one_line(err)}"
    return out


def _claim_worker(threads: int, gpus: float) -> None:
    """Set this worker process's torch threads, and hide CUDA from it when ``gpus`` is 0 (before
    CUDA starts here, so "auto" trains on the CPU)."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    if not gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _new_result(trial: dict[str, Any]) -> dict[str, Any]:
    return {"name": trial["name"], "status": "failed", "from_step": None, "to_step": None, "wall_s": None, "error": None, "skipped": False}


def _trial_start(trial: dict[str, Any], run: RunDir, experiment: ExperimentConfig, out: dict[str, Any]) -> int | None:
    """The step the trial's run directory continues from (None: start afresh); a finished trial
    fills ``out`` as skipped. Cleans a directory killed while being claimed.

    Raises:
        ValueError: the directory holds another run; a checkpoint that cannot be trusted.
    """
    if run.exists():
        if load_experiment(run).to_dict() != experiment.to_dict():
            raise ValueError(f"{run.path} holds another run than this trial; move it away and rerun the sweep.")
        step, elapsed = _checkpoint_step(run)
        if step == experiment.train.steps:
            out.update(status="finished", from_step=step, to_step=step, wall_s=elapsed, skipped=True, error=None)
        return step
    if run.path.is_dir():  # killed while claiming the directory: only temporaries are left
        run.clean_temporaries()
    return None


def replica_groups(todo: Sequence[tuple[dict[str, Any], int]], replicas: int) -> list[list[tuple[dict[str, Any], int]]]:
    """The trials to run, ``(trial, from_step)`` in sweep order, cut into replica groups: trials
    of one grid point (so they differ only in ``train.seed``) that start from the same step (a
    group starts together or resumes from one common checkpoint step), at most ``replicas`` each,
    in seed order. A group of one trains as an ordinary run."""
    groups: list[list[tuple[dict[str, Any], int]]] = []
    open_groups: dict[str, list[tuple[dict[str, Any], int]]] = {}
    for trial, step in todo:
        key = json.dumps([trial.get("grid_text", trial["grid"]), step], sort_keys=True)
        group = open_groups.get(key)
        if group is None or len(group) >= replicas:
            group = open_groups[key] = []
            groups.append(group)
        group.append((trial, step))
    return groups


def check_replica_sweep(spec: dict[str, Any], replicas: int) -> None:
    """Refuse, before anything runs, a sweep whose grid points cannot train their seeds as
    replica groups of ``replicas`` (:func:`~windtunnel.replicas.check_replicas` on each grid
    point's first ``replicas`` trials: the model, dropout, train_lengths, compile).

    Raises:
        ValueError: "--replicas R: " and the first refusal.
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"--replicas must be an int >= 1; got {replicas!r}.")
    if replicas == 1:
        return
    points: dict[str, list[dict[str, Any]]] = {}
    for trial in spec["trials"]:
        points.setdefault(json.dumps(trial.get("grid_text", trial["grid"]), sort_keys=True), []).append(trial)
    for trials in points.values():
        try:
            check_replicas([ExperimentConfig.from_dict(t["experiment"]) for t in trials[:replicas]])
        except ValueError as err:
            raise ValueError(f"--replicas {replicas}: {_one_line(err)}") from None


def run_replica_group(
    trials: Sequence[dict[str, Any]],
    run_paths: Sequence[str | os.PathLike],
    *,
    threads: int = 1,
    gpus: float = 0.0,
    tensorboard: bool = False,
) -> list[dict[str, Any]]:
    """Train trials that differ only in seed to their end as one replica group
    (:class:`~windtunnel.replicas.ReplicaTrainer`), each in its run directory: started together,
    or resumed together from their common checkpoint step. A group of one, trials not at one
    step, or a group that fails (a non-finite loss of one seed stops them all) fall back to
    :func:`run_trial` for each trial, which resumes it alone from its latest checkpoint: a
    failing seed then fails with a separate run's error, and the others finish. Never raises.

    Returns:
        one :func:`run_trial` result per trial, in order.
    """
    if len(trials) != len(run_paths):
        raise ValueError(f"run_replica_group: one run directory per trial; got {len(trials)} trials and {len(run_paths)} directories.")
    alone = lambda: [run_trial(t, p, threads=threads, gpus=gpus, tensorboard=tensorboard) for t, p in zip(trials, run_paths)]  # noqa: E731
    if len(trials) < 2:
        return alone()
    _claim_worker(threads, gpus)
    runs = [RunDir(p) for p in run_paths]
    outs = [_new_result(t) for t in trials]
    try:
        experiments = [ExperimentConfig.from_dict(t["experiment"]) for t in trials]
        starts = [_trial_start(t, run, e, out) for t, run, e, out in zip(trials, runs, experiments, outs)]
    except Exception:  # noqa: BLE001 - run_trial reports the trial's problem
        return alone()
    if any(out["skipped"] for out in outs) or len(set(starts)) > 1:
        return alone()
    group = None
    try:
        if starts[0] is None:
            group = ReplicaTrainer(experiments, runs, overwrite=True, tensorboard=tensorboard)
        else:
            group = ReplicaTrainer.resume(runs, tensorboard=tensorboard)
        for out, trainer in zip(outs, group.trainers):
            out["from_step"] = trainer.step
        group.fit()
    except Exception:  # noqa: BLE001 - each trial is then run alone, which reports its own error
        return alone()
    for out, trainer in zip(outs, group.trainers):
        out.update(status="finished", to_step=trainer.step, wall_s=trainer.elapsed_s)
    return outs


# --- status and summary (the driver) ----------------------------------------------------------


def trial_status(sweep: SweepDir, trial: dict[str, Any], events: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Where a trial stands, from its run directory and the sweep's events.

    Returns:
        {"status": "finished" (its verified latest checkpoint is at its last step) | "failed"
        (its last event is a failure) | "partial" (a checkpoint short of the end) | "pending",
        "step", "wall_s", "error"}.
    """
    run = sweep.run(trial["name"])
    steps = trial["experiment"]["train"]["steps"]
    try:
        step, elapsed = _checkpoint_step(run) if run.exists() else (None, 0.0)
    except ValueError as err:
        step, elapsed = None, 0.0
        return {"status": "failed", "step": None, "wall_s": None, "error": _one_line(err)}
    mine = [e for e in events if e.get("trial") == trial["name"] and e.get("event") in ("finished", "failed")]
    if step == steps:
        return {"status": "finished", "step": step, "wall_s": elapsed, "error": None}
    if mine and mine[-1]["event"] == "failed":
        return {"status": "failed", "step": step, "wall_s": elapsed if step is not None else None, "error": mine[-1].get("error")}
    return {"status": "partial" if step is not None else "pending", "step": step, "wall_s": elapsed if step is not None else None, "error": None}


def _final_metrics(run: RunDir, step: int) -> dict[str, float | None]:
    """The evaluation at ``step`` of every split ("eval": bare names; "eval_lenN.": prefixed),
    and the last training loss."""
    out: dict[str, float | None] = {}
    last_train = None
    for row in run.metrics():
        if row.get("split") == "train":
            last_train = row
        elif row.get("step") == step:
            prefix = "" if row.get("split") == "eval" else f"{row.get('split')}."
            for key, value in row.items():
                if key not in ("step", "split") and key != "n_sequences" and (value is None or isinstance(value, (int, float))):
                    out[prefix + key] = value
    if last_train is not None:
        out["train_loss_nats"] = last_train.get("loss_nats")
    return out


GEOMETRY_PREFIX = "geometry."
"""Prefix of the summary columns read from a trial's eval.json: ``geometry.QUANTITY.VARIANT``."""

GEOMETRY_FIELDS = ("pc12_share", "spearman", "spearman_position", "partial_pearson_given_position")
"""The numbers a variant reports beside its value that the summary also carries, as
``geometry.QUANTITY.VARIANT.FIELD`` (the value-manifold variants: PC1+PC2 share, Spearman with
the entropy and with the position, partial correlation given position; docs/theory.md §8.9)."""


def _geometry_metrics(run: RunDir, step: int | None) -> dict[str, float | None]:
    """Every geometry variant's value in the run's eval.json (``windtunnel eval``; docs/theory.md
    §8.9), as ``geometry.QUANTITY.VARIANT``, followed by each of its :data:`GEOMETRY_FIELDS` it
    reports, as ``geometry.QUANTITY.VARIANT.FIELD``; a variant the model cannot support, or a
    field that is undefined (a partial correlation with its ``partial_undefined`` reason), is None. Empty
    when there is no eval.json, when it is unreadable, or when it measured another step than
    ``step`` (an evaluation of an earlier checkpoint is not the trial's final model)."""
    path = run.eval_path()
    if step is None or not path.exists():
        return {}
    try:
        evaluation = read_json(path)
    except ValueError:
        return {}
    if not isinstance(evaluation, dict) or evaluation.get("step") != step:
        return {}
    quantities = (evaluation.get("geometry_variants") or {}).get("quantities") or {}
    out: dict[str, float | None] = {}
    for quantity, variants in quantities.items():
        for name, entry in (variants or {}).items():
            column = f"{GEOMETRY_PREFIX}{quantity}.{name}"
            entry = entry if isinstance(entry, dict) else {}
            out[column] = finite_number(entry.get("value"))
            for field in GEOMETRY_FIELDS:
                if field in entry:
                    out[f"{column}.{field}"] = finite_number(entry[field])
    return out


def write_summary(sweep: SweepDir, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write SWEEP_DIR/summary.csv (one row per trial) and summary.json (per grid point: mean,
    std (ddof = 1), 95 % t interval and n over the finished seeds, by
    :func:`~windtunnel.comparison.seed_statistics`), each atomically; returns the JSON content.

    CSV columns: trial, seed, the grid keys, status, step, wall_s, the final metrics (the
    evaluation at the last step; other evaluation lengths prefixed ``eval_lenN.``; the last
    training loss as ``train_loss_nats``; and, for a trial whose eval.json (``windtunnel eval``)
    measured its last step, every geometry variant as ``geometry.QUANTITY.VARIANT`` and its
    position-control numbers as ``geometry.QUANTITY.VARIANT.FIELD``), error.
    Evaluating the trials after the sweep and rerunning the sweep command (which skips the
    finished trials) therefore adds the geometry columns and their statistics over seeds.
    """
    spec = spec if spec is not None else sweep.read_spec()
    events = sweep.events()
    keys = list(spec["grid_keys"])
    rows, metric_names = [], []
    for trial in spec["trials"]:
        state = trial_status(sweep, trial, events)
        metrics = {}
        if state["status"] == "finished":
            metrics = _final_metrics(sweep.run(trial["name"]), state["step"])
            metrics.update(_geometry_metrics(sweep.run(trial["name"]), state["step"]))
        for name in metrics:
            if name not in metric_names:
                metric_names.append(name)
        rows.append({"trial": trial["name"], "seed": trial["seed"], **{k: trial["grid"][k] for k in keys},
                     "status": state["status"], "step": state["step"], "wall_s": state["wall_s"], **metrics, "error": state["error"]})
    columns = ["trial", "seed", *keys, "status", "step", "wall_s", *metric_names, "error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _csv_cell(row.get(c)) for c in columns})
    groups = []
    for combo, members in itertools.groupby(rows, key=lambda r: json.dumps([r[k] for k in keys])):
        members = list(members)
        done = [r for r in members if r["status"] == "finished"]
        stats = {}
        for name in ["wall_s", *metric_names]:
            values = [r[name] for r in done if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
            if values:
                stats[name] = seed_statistics(values, ddof=1)
        groups.append({"grid": dict(zip(keys, json.loads(combo))), "n_trials": len(members), "n_finished": len(done),
                       "seeds": [r["seed"] for r in done], "metrics": stats})
    summary = {
        "sweep": {k: spec[k] for k in ("task", "model", "preset", "seeds", "grid_keys", "grid", "set", "steps")},
        "statistics": "mean, std (ddof = 1), 95 % Student t interval of the mean, n: over the finished seeds",
        "counts": {s: sum(r["status"] == s for r in rows) for s in ("finished", "failed", "partial", "pending")},
        "metrics": metric_names,
        "groups": groups,
        "trials": rows,
    }
    write_text_atomic(sweep.summary_csv_path, buffer.getvalue())
    write_json_atomic(sweep.summary_json_path, json_ready(summary))
    return summary


def _csv_cell(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else value


# --- the driver -------------------------------------------------------------------------------


def _normalised(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with each trial's experiment as the config it loads to (every field, defaults
    filled), so a sweep saved before a config field with a default existed is still the same
    sweep; an experiment that does not load is left as saved."""
    spec = json.loads(json.dumps(spec))
    for trial in spec.get("trials", []):
        try:
            trial["experiment"] = json.loads(json.dumps(ExperimentConfig.from_dict(trial["experiment"]).to_dict()))
        except (KeyError, TypeError, ValueError):
            pass
    return spec


def _prepare(sweep: SweepDir, spec: dict[str, Any]) -> None:
    """Save the spec, or check that the directory holds this very sweep (the trials' configs
    compared as loaded, :func:`_normalised`)."""
    if sweep.exists():
        saved, spec = _normalised(sweep.read_spec()), _normalised(spec)
        if saved != spec:
            differ = [k for k in spec if saved.get(k) != spec[k]]
            raise ValueError(
                f"{sweep.path} holds another sweep (it differs in {', '.join(differ) or 'its format'}); rerun it "
                "with the same TASK, --model, --preset, --seeds, --grid, --set and --steps to continue it, or "
                "choose another --out."
            )
    elif sweep.path.is_dir() and any(p.name != ".lock" for p in sweep.path.iterdir()):
        raise ValueError(f"{sweep.path} is not empty and is not a sweep directory; choose another --out.")
    sweep.runs_dir.mkdir(parents=True, exist_ok=True)
    if not sweep.exists():
        sweep.write_spec(spec)


def run_sweep(
    spec: dict[str, Any],
    out: str | os.PathLike,
    *,
    backend: str = "local",
    workers: int | None = None,
    threads: int | None = None,
    gpus_per_trial: float = 0.0,
    address: str | None = None,
    retry_failed: bool = False,
    echo: Callable[[str], None] = print,
    tensorboard: bool = False,
    replicas: int = 1,
) -> dict[str, Any]:
    """Run (or continue) the sweep ``spec`` in ``out`` and write its summary.

    Args:
        spec: from :func:`plan_sweep`.
        out: the sweep directory; created, or continued when it holds this same sweep.
        backend: "local" (a pool of worker processes) or "ray" (Ray Tune).
        workers: trials at once. Local default: as many as the cores allow at ``threads`` each
            (with ``gpus_per_trial``: GPUs / gpus_per_trial), at most the trials to run. Ray:
            at most this many (default: as the cluster's resources allow).
        threads: torch threads per trial. Local default: cores // workers; Ray default 1. A
            Ray trial asks for this many CPUs.
        gpus_per_trial: fraction (or, on Ray, number) of a GPU per trial; 0 trains on the CPU.
            Locally each worker gets one GPU (round robin), and 1 / gpus_per_trial trials share it.
        address: Ray only: an existing cluster ("auto" or "HOST:PORT"); default a local
            instance. SWEEP_DIR must then be on a file system every node sees at the same path.
        retry_failed: resume trials recorded as failed too (by default a rerun leaves them).
        echo: where progress lines go.
        tensorboard: every trial also writes TensorBoard event files in its run directory
            (:func:`run_trial`).
        replicas: R > 1 trains the seeds of each grid point in groups of up to R as one
            batched model (:func:`run_replica_group`, :class:`~windtunnel.replicas.ReplicaTrainer`;
            groups of trials that start from the same step, :func:`replica_groups`), one group per
            worker; every trial's run directory is the one a separate run writes (to the float
            rounding the replicas module describes). Local backend only. Not part of the sweep's
            identity: a sweep continues with or without it.

    Returns:
        The summary (:func:`write_summary`).

    Raises:
        ValueError: ``out`` holds another sweep or is not a sweep directory; bad backend options;
            ``replicas`` > 1 on the ray backend, or for trials that cannot train as replicas
            (:func:`check_replica_sweep`).
        ImportError: backend "ray" without Ray Tune, or ``tensorboard`` without the tensorboard
            package, naming the extra.
        RunLockedError: another process drives this sweep.
    """
    if backend not in ("local", "ray"):
        raise ValueError(f"run_sweep: backend must be 'local' or 'ray'; got {backend!r}.")
    if address is not None and backend != "ray":
        raise ValueError("--address names a Ray cluster; it needs --backend ray.")
    if gpus_per_trial < 0 or (backend == "local" and gpus_per_trial > 1):
        raise ValueError(f"--gpus-per-trial must be in [0, 1] on the local backend (a trial trains on one device); got {gpus_per_trial:g}.")
    if not gpus_per_trial:
        forced = [t["name"] for t in spec["trials"] if t["experiment"]["train"].get("device") == "cuda"]
        if forced:
            raise ValueError("train.device=cuda needs --gpus-per-trial > 0 (without it the trials train on the CPU).")
    check_replica_sweep(spec, replicas)
    if replicas > 1 and backend != "local":
        raise ValueError(f"--replicas {replicas} trains replica groups on the local backend only; drop --replicas or use --backend local.")
    if backend == "ray":
        _import_ray()
    if tensorboard:
        require_tensorboard()  # refused before any trial starts
    sweep = SweepDir(out)
    if not sweep.exists() and sweep.path.is_dir() and any(p.name != ".lock" for p in sweep.path.iterdir()):
        raise ValueError(f"{sweep.path} is not empty and is not a sweep directory; choose another --out.")
    sweep.path.mkdir(parents=True, exist_ok=True)
    sweep.lock()
    try:
        _prepare(sweep, spec)
        spec = sweep.read_spec()
        events = sweep.events()
        todo, counts = [], {"finished": 0, "failed": 0}
        for trial in spec["trials"]:
            state = trial_status(sweep, trial, events)
            mine = [e for e in events if e.get("trial") == trial["name"]]
            if state["status"] == "finished" and not any(e.get("event") == "finished" for e in mine):
                # it finished training, but the driver died before logging it: log it now, as the
                # segment submitted last (from its step to the end)
                submitted = [e for e in mine if e.get("event") == "submitted"]
                sweep.log_event({"event": "finished", "trial": trial["name"], "from_step": submitted[-1]["from_step"] if submitted else None,
                                 "to_step": state["step"], "wall_s": state["wall_s"], "recovered": True, "time": time.time()})
            if state["status"] == "finished" or (state["status"] == "failed" and not retry_failed):
                counts[state["status"]] += 1
                continue
            todo.append((trial, state["step"] or 0))
        echo(f"sweep {sweep.path}: {len(spec['trials'])} trials; {counts['finished']} finished, {counts['failed']} failed"
             f"{' (rerun with --retry-failed to resume them)' if counts['failed'] else ''}, {len(todo)} to run")
        if todo:
            if backend == "local":
                _run_local(sweep, todo, workers=workers, threads=threads, gpus=gpus_per_trial, echo=echo, tensorboard=tensorboard, replicas=replicas)
            else:
                _run_ray(sweep, todo, workers=workers, threads=threads, gpus=gpus_per_trial, address=address, echo=echo, tensorboard=tensorboard)
        return write_summary(sweep, spec)
    finally:
        sweep.unlock()


def _record(sweep: SweepDir, spec: dict[str, Any], result: dict[str, Any], done: int, total: int, echo: Callable[[str], None]) -> None:
    """Log a trial's result as an event, rewrite the summary, print one line."""
    if result["status"] == "finished":
        sweep.log_event({"event": "finished", "trial": result["name"], "from_step": result["from_step"], "to_step": result["to_step"],
                         "wall_s": result["wall_s"], "time": time.time()})
        text = f"finished (steps {result['from_step']}..{result['to_step']}, run's training time {result['wall_s']:.1f} s)"
    else:
        sweep.log_event({"event": "failed", "trial": result["name"], "from_step": result["from_step"], "to_step": result["to_step"],
                         "error": result["error"], "time": time.time()})
        text = f"FAILED: {result['error']}"
    write_summary(sweep, spec)
    echo(f"[{done}/{total}] {result['name']}: {text}")


def _worker_init(driver_pid: int, threads: int, gpu_counter: Any, n_gpus: int) -> None:
    """In each local worker: die with the driver, fix the torch threads, pick a GPU (round robin)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no glibc
            pass
    if os.getppid() != driver_pid:  # the driver died before prctl took effect
        os._exit(1)
    _watch_driver(driver_pid)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if n_gpus:
        with gpu_counter.get_lock():
            slot = gpu_counter.value
            gpu_counter.value += 1
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot % n_gpus)


def _watch_driver(driver_pid: int) -> None:
    """Where PR_SET_PDEATHSIG does not exist: a thread that ends the worker when the driver is gone."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != driver_pid:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _run_local(sweep, todo, *, workers, threads, gpus, echo, tensorboard=False, replicas=1) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    cores = os.cpu_count() or 1
    n_gpus = 0
    if gpus:
        import torch

        n_gpus = torch.cuda.device_count()
        if not n_gpus:
            raise ValueError("--gpus-per-trial needs a CUDA device; this machine has none (use 0 to train on the CPU).")
    groups = replica_groups(todo, replicas)
    if workers is None:
        workers = int(n_gpus / gpus + 1e-9) if gpus else max(1, cores // (threads or 1))
    workers = max(1, min(workers, len(groups)))
    threads = threads or max(1, cores // workers)
    spec = sweep.read_spec()
    echo(f"local backend: {workers} worker process{'es' if workers > 1 else ''} x {threads} torch thread{'s' if threads > 1 else ''}"
         + (f", {gpus:g} GPU per trial on {n_gpus} GPU{'s' if n_gpus > 1 else ''}" if gpus else "") + f" ({cores} cores)"
         + (f"; {len(todo)} trial{'s' if len(todo) > 1 else ''} in {len(groups)} replica group{'s' if len(groups) > 1 else ''} "
            f"of up to {replicas}" if replicas > 1 else ""))
    context = multiprocessing.get_context("spawn")
    counter = context.Value("i", 0)
    for trial, step in todo:
        sweep.log_event({"event": "submitted", "trial": trial["name"], "from_step": step, "backend": "local", "time": time.time()})
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init,
                             initargs=(os.getpid(), threads, counter, n_gpus)) as pool:
        futures = {}
        for group in groups:
            trials = [trial for trial, _ in group]
            paths = [str(sweep.run(trial["name"]).path) for trial in trials]
            futures[pool.submit(run_replica_group, trials, paths, threads=threads, gpus=gpus, tensorboard=tensorboard)] = trials
        done = 0
        for future in as_completed(futures):
            trials = futures[future]
            try:
                results = future.result()
            except BrokenProcessPool as err:
                results = [{"name": trial["name"], "status": "failed", "from_step": None, "to_step": None, "wall_s": None,
                            "error": f"a worker process died (killed, or out of memory), which stops the pool ({_one_line(err)}); "
                                     "rerun with --retry-failed"} for trial in trials]
            for result in results:
                done += 1
                _record(sweep, spec, result, done, len(todo), echo)


def _import_ray() -> Any:
    try:
        import ray
        from ray import tune
    except ImportError:
        raise ImportError(RAY_EXTRA) from None
    return ray, tune


def _tune_trial(config: dict[str, Any], trials: dict[str, dict[str, Any]], root: str, threads: int, gpus: float, tensorboard: bool = False) -> None:
    """One Tune trial: the sweep trial ``config["trial"]``, reporting each evaluation, then its result."""
    from ray import tune

    trial = trials[config["trial"]]

    def report(step: int, splits: dict[str, dict[str, float]]) -> None:
        tune.report({"step": step, **{f"{split}/{key}": value for split, values in splits.items() for key, value in values.items()}})

    result = run_trial(trial, Path(root) / trial["name"], threads=threads, gpus=gpus, report=report, tensorboard=tensorboard)
    tune.report({"windtunnel_result": json.dumps(result)})


def _run_ray(sweep, todo, *, workers, threads, gpus, address, echo, tensorboard=False) -> None:
    ray, tune = _import_ray()
    threads = threads or 1
    started = False
    if not ray.is_initialized():
        if address is not None:
            ray.init(address=address)
        else:
            cpus = workers * threads if workers else (os.cpu_count() or 1)
            ray.init(num_cpus=cpus, include_dashboard=False)
        started = True
    spec = sweep.read_spec()
    total = len(todo)
    seen: set[str] = set()

    def record(result: dict[str, Any]) -> None:
        if result["name"] not in seen:
            seen.add(result["name"])
            _record(sweep, spec, result, len(seen), total, echo)

    class Progress(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            text = (trial.last_result or {}).get("windtunnel_result")
            if text:
                record(json.loads(text))

    try:
        resources = ray.cluster_resources()
        echo(f"ray backend (Ray Tune {ray.__version__}): {threads} CPU{'s' if threads > 1 else ''}"
             + (f" and {gpus:g} GPU" if gpus else "") + f" per trial; the cluster has {resources.get('CPU', 0):g} CPUs, "
             f"{resources.get('GPU', 0):g} GPUs")
        for trial, step in todo:
            sweep.log_event({"event": "submitted", "trial": trial["name"], "from_step": step, "backend": "ray", "time": time.time()})
        names = [trial["name"] for trial, _ in todo]
        trainable = tune.with_parameters(_tune_trial, trials={t["name"]: t for t, _ in todo},
                                         root=str(sweep.runs_dir.resolve()), threads=threads, gpus=gpus,
                                         tensorboard=tensorboard)
        resources_per_trial = {"cpu": threads, **({"gpu": gpus} if gpus else {})}
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources_per_trial),
            param_space={"trial": tune.grid_search(names)},
            tune_config=tune.TuneConfig(max_concurrent_trials=workers),
            run_config=tune.RunConfig(
                storage_path=str(sweep.ray_dir.resolve()),
                name=time.strftime("tune-%Y%m%d-%H%M%S") + f"-{os.getpid()}",
                failure_config=tune.FailureConfig(max_failures=2),
                callbacks=[Progress()],
                verbose=0,
            ),
        )
        grid = tuner.fit()
        for i in range(len(grid)):
            outcome = grid[i]
            text = (outcome.metrics or {}).get("windtunnel_result")
            if text:
                record(json.loads(text))
            else:
                name = (outcome.config or {}).get("trial")
                if name is not None:
                    record({"name": name, "status": "failed", "from_step": None, "to_step": None, "wall_s": None,
                            "error": f"the Ray trial ended without a result ({_one_line(outcome.error) if outcome.error else 'no error given'})"})
    finally:
        if started:
            ray.shutdown()


# --- compare ----------------------------------------------------------------------------------


def compare_sweeps(dirs: Sequence[str | os.PathLike], *, metric: str = "entropy_mae_bits", figure: str | os.PathLike | None = None) -> dict[str, Any]:
    """The table of ``windtunnel compare``: per sweep and grid point, the metric's mean, std, 95 %
    interval and n over seeds, read from each SWEEP_DIR/summary.json; and a figure of the metric
    against the first grid key (one line per sweep and per value of the other keys, the
    intervals as error bars; a log axis when the values are positive and span more than 10x).

    Returns:
        {"metric", "rows": [{"sweep", "grid", "n", "mean", "std", "ci_low", "ci_high"}], "text"
        (the table, Markdown), "figure" (its path, or None)}.

    Raises:
        ValueError: a directory without summary.json, or a metric no sweep has (naming those it has).
    """
    rows, known = [], set()
    summaries = []
    for d in dirs:
        sweep = SweepDir(d)
        if not sweep.summary_json_path.exists():
            raise ValueError(f"compare: {d} holds no summary.json (not a sweep directory, or its sweep never ran).")
        summary = read_json(sweep.summary_json_path)
        summaries.append((str(d), summary))
        known.update(summary.get("metrics", []))
        known.add("wall_s")
    if metric not in known:
        from windtunnel._checks import close_matches

        raise ValueError(f"compare: no sweep has the metric {metric!r};{close_matches(metric, known)} they have: {', '.join(sorted(known))}.")
    for name, summary in summaries:
        for group in summary["groups"]:
            stats = group["metrics"].get(metric)
            rows.append({"sweep": name, "grid": group["grid"], "n": stats["n"] if stats else 0,
                         **{k: (stats or {}).get(k) for k in ("mean", "std", "ci_low", "ci_high")}})

    def fmt(x: Any) -> str:
        return "-" if x is None else f"{x:.5g}"

    lines = [f"| sweep | grid | n | {metric} mean | std | 95 % interval |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        grid = ", ".join(f"{k}={v}" for k, v in r["grid"].items()) or "-"
        interval = f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]" if r["ci_low"] is not None else "-"
        lines.append(f"| {r['sweep']} | {grid} | {r['n']} | {fmt(r['mean'])} | {fmt(r['std'])} | {interval} |")
    path = None
    if figure is not None:
        path = _draw(rows, metric, figure)
    return {"metric": metric, "rows": rows, "text": "\n".join(lines), "figure": path}


def _draw(rows: list[dict[str, Any]], metric: str, figure: str | os.PathLike) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lines: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
    x_key = None
    for r in rows:
        keys = list(r["grid"])
        x_key = x_key or (keys[0] if keys else None)
        rest = ", ".join(f"{k}={v}" for k, v in list(r["grid"].items())[1:])
        label = r["sweep"] + (f" ({rest})" if rest else "")
        lines.setdefault(label, []).append((r["grid"].get(keys[0]) if keys else Path(r["sweep"]).name, r))
    xs_all = [x for pts in lines.values() for x, _ in pts]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs_all)
    categories = sorted({json.dumps(x) for x in xs_all}) if not numeric else []
    for label, points in lines.items():
        points = [(x, r) for x, r in points if r["mean"] is not None]
        if not points:
            continue
        points.sort(key=lambda p: p[0] if numeric else categories.index(json.dumps(p[0])))
        xs = [x if numeric else categories.index(json.dumps(x)) for x, _ in points]
        ys = [r["mean"] for _, r in points]
        err = [[r["mean"] - r["ci_low"] if r["ci_low"] is not None else 0.0 for _, r in points],
               [r["ci_high"] - r["mean"] if r["ci_high"] is not None else 0.0 for _, r in points]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    if numeric and xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 10:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(categories)), [json.loads(c) if isinstance(json.loads(c), str) else c for c in categories])
    ax.set_xlabel(x_key or "sweep")
    ax.set_ylabel(f"{metric} (mean, 95 % interval over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    from windtunnel.runs import write_bytes_atomic

    write_bytes_atomic(figure, buffer.getvalue())
    return str(figure)
