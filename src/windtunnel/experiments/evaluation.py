"""Evaluate a trained run: per-position calibration curves at one or several lengths, JSON + figures.

:func:`evaluate_run` composes the library: calibration (:func:`windtunnel.probes.calibrate`), the
geometry variants (:func:`windtunnel.probes.geometry_variants`), for the HMM the memory analyses
of :mod:`windtunnel.probes.memory`, and the figures of :mod:`windtunnel.reports.evaluation`. It
returns a :class:`RunEvaluation`, whose :meth:`~RunEvaluation.to_dict` is eval.json and which
:meth:`RunEvaluation.read` reads back.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from windtunnel._progress import track
from windtunnel.models import TinyGPT
from windtunnel.probes import (
    calibrate,
    geometry_variants,
    hmm_circuit_probe,
    hmm_history_attention_by_layer,
    hmm_lag_response,
    memory_ladder,
)
from windtunnel.reports.evaluation import (
    plot_eval_curves,
    plot_history_attention,
    plot_lag_response,
    plot_memory,
)
from windtunnel.runs import RunDir, read_json, write_json_atomic
from windtunnel.sites import unsupported
from windtunnel.tasks import HMMBatch, HMMFiltering
from windtunnel.train import ExperimentConfig, load_experiment, step_position_ids

__all__ = [
    "RunEvaluation",
    "evaluate_run",
    "geometry_of_run",
    "load_model",
    "memory_over_training",
]


def load_model(run_dir: str | Path, checkpoint: str | Path | None = None) -> tuple[ExperimentConfig, torch.nn.Module, int]:
    """(experiment, model in eval mode, step) from a run directory's checkpoint (latest by default)."""
    run = RunDir(run_dir)
    experiment = load_experiment(run)
    state = run.load_checkpoint(checkpoint)
    model = experiment.build_model(None)
    try:
        model.load_state_dict(state["model"], strict=True)
    except (KeyError, RuntimeError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"load_model: {checkpoint or run.latest_checkpoint()} does not hold the weights of {run.config_path}'s model ({first}).") from None
    model.eval()
    return experiment, model, int(state["step"])


@dataclass(frozen=True)
class RunEvaluation:
    """What :func:`evaluate_run` measured on a run's checkpoint; :meth:`to_dict` is eval.json.

    Attributes:
        step: the checkpoint's training step.
        n_sequences: held-out sequences per length.
        seed: seed of the held-out sequences.
        summary: per length name ("train length" or "n_steps=K"), the calibration scalars
            (:meth:`windtunnel.metrics.Calibration.scalars`: ``entropy_mae_bits``, ``kl_bits``,
            ``accuracy``, ...); for the HMM also the memory ladder
            (:func:`windtunnel.probes.memory_ladder`).
        per_position: per length name, each calibration curve by prediction site, {curve: [n_sites]}.
        step_shift: how many whole steps the steps were moved along the position table (0: not).
        geometry_variants: :func:`geometry_of_run` on the first batch of the training length;
            None when no batch of that length was evaluated (or the steps were moved).
        history_attention: HMM TinyGPT with K >= 2: per length name,
            :func:`windtunnel.probes.hmm_history_attention_by_layer`; None otherwise.
        circuit: HMM TinyGPT with K >= 2: :func:`windtunnel.probes.hmm_circuit_probe`; None otherwise.
        lag_response: HMM with >= 2 symbols: :func:`windtunnel.probes.hmm_lag_response`; None otherwise.
        json_path: the eval.json (or eval_shiftN.json) written; None when read from a dict.
        figure_paths: the figures written (eval_curves*.png, then history_attention.png and
            lag_response.png when drawn).
    """

    step: int
    n_sequences: int
    seed: int
    summary: dict[str, dict[str, Any]]
    per_position: dict[str, dict[str, list[float]]]
    step_shift: int = 0
    geometry_variants: dict[str, Any] | None = None
    history_attention: dict[str, Any] | None = None
    circuit: dict[str, Any] | None = None
    lag_response: dict[str, Any] | None = None
    json_path: Path | None = None
    figure_paths: tuple[Path, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """The content of eval.json: the measurements, without the paths; the optional parts
        (``step_shift``, ``geometry_variants``, ``history_attention``, ``circuit``,
        ``lag_response``) only when present."""
        out: dict[str, Any] = {"step": self.step, "n_sequences": self.n_sequences, "seed": self.seed, "summary": self.summary, "per_position": self.per_position}
        if self.step_shift:
            out["step_shift"] = self.step_shift
        for name in _OPTIONAL:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, json_path: Path | None = None) -> RunEvaluation:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: naming the missing keys when ``data`` is not an eval.json.
        """
        required = ("step", "n_sequences", "seed", "summary", "per_position")
        missing = [k for k in required if not isinstance(data, dict) or k not in data]
        if missing:
            raise ValueError(f"RunEvaluation: {json_path or 'the data'} is not an eval.json (missing {', '.join(missing)}).")
        return cls(
            **{k: data[k] for k in required},
            step_shift=int(data.get("step_shift", 0)),
            **{k: data.get(k) for k in _OPTIONAL},
            json_path=json_path,
        )

    @classmethod
    def read(cls, run_dir: str | Path, *, step_shift: int = 0) -> RunEvaluation:
        """The eval.json (``step_shift`` > 0: eval_shiftN.json) of a run directory.

        Raises:
            ValueError: when the file is missing or is not an eval.json.
        """
        path = RunDir(run_dir).eval_path(f"_shift{step_shift}" if step_shift else "")
        if not path.exists():
            raise ValueError(f"RunEvaluation.read: {path} does not exist; run windtunnel eval {run_dir} first.")
        return cls.from_dict(read_json(path), json_path=path)


_OPTIONAL = ("geometry_variants", "history_attention", "circuit", "lag_response")


def evaluate_run(
    run_dir: str | Path,
    *,
    lengths: Sequence[int] = (),
    n_sequences: int = 2000,
    seed: int = 12345,
    batch_size: int = 500,
    step_shift: int = 0,
) -> RunEvaluation:
    """Evaluate the latest checkpoint on fresh seeded sequences; write eval.json and eval_curves.png
    (and, for an HMM, lag_response.png; for an HMM TinyGPT, history_attention.png). Returns what
    it measured and wrote (:class:`RunEvaluation`).

    ``lengths`` applies to tasks with a length parameter (HMM ``n_steps``); an empty list
    evaluates the training length only. Every metric is per sample (docs/theory.md §7). For the HMM each
    summary also holds the memory ladder (:func:`~windtunnel.probes.memory_ladder`): the entropy MAE of exact
    filters that remember only the last w observations, and the rungs the model falls between.

    For an HMM TinyGPT, eval.json also holds ``history_attention`` per length
    (:func:`~windtunnel.probes.hmm_history_attention` per layer and head on up to 200 of the
    sequences), and, when trained at K >= 2, ``circuit`` (:func:`~windtunnel.probes.hmm_circuit_probe`,
    on 8 to 1,000 further sequences of the training length): what each layer's residual stream
    encodes at the read positions, and where each head attends. For every HMM run, ``lag_response``
    (:func:`~windtunnel.probes.hmm_lag_response`, on up to 200 further sequences of the training length): how the
    belief moves when one earlier observation changes, by lag, against the exact filter.

    For every model with attention sites and a readout, eval.json holds ``geometry_variants``
    (:func:`geometry_of_run`): key orthogonality, the value manifold's PC1 share and attention
    focusing under every published definition (:data:`windtunnel.probes.GEOMETRY_VARIANTS`), with
    the paper's number beside the definition it belongs to, on the first evaluation batch of the
    training length (up to ``batch_size`` sequences); for other models the reason they have none.

    ``step_shift`` > 0 (an HMM TinyGPT only) evaluates the same sequences with their steps moved
    that many whole steps along the position table (:func:`windtunnel.train.step_position_ids`,
    the layout ``TrainConfig.position_shift`` trains on): step t reads the rows of step
    t + step_shift. Comparing curves then tells an error that follows the step from one that
    follows a row of the table. It writes eval_shift{step_shift}.json and
    eval_curves_shift{step_shift}.png beside eval.json, which it leaves alone, and skips the
    attention and circuit probes (they describe the unshifted layout).

    Raises:
        ValueError: when lengths are given for a task without ``n_steps`` or exceed the model's
            position table, or ``step_shift`` is negative, given for another task or model, or
            moves the last step past the table.
    """
    experiment, model, step = load_model(run_dir)
    base = experiment.build_task()
    if lengths and not hasattr(base, "n_steps"):
        raise ValueError(f"evaluate_run: --lengths needs a task with n_steps (the HMM); {experiment.task_name} has none.")
    tasks = {f"n_steps={n}": experiment.build_task(n_steps=n) for n in lengths} if lengths else {"train length": base}
    n_positions = getattr(experiment.model_config(), "n_positions", None)
    if isinstance(step_shift, bool) or not isinstance(step_shift, int) or step_shift < 0:
        raise ValueError(f"evaluate_run: step_shift must be an int >= 0; got {step_shift!r}.")
    if step_shift and not (isinstance(base, HMMFiltering) and isinstance(model, TinyGPT)):
        raise ValueError(f"evaluate_run: step_shift needs an HMM TinyGPT run; this one is {experiment.task_name}/{experiment.model_name}.")
    for name, task in tasks.items():
        needed = task.seq_len + (task.step_layout[1] * step_shift if step_shift else 0)
        if n_positions is not None and needed > n_positions:
            moved = f" with the steps moved by {step_shift}" if step_shift else ""
            raise ValueError(f"evaluate_run: {name} needs {needed} positions{moved}; the model has {n_positions}.")
    generator = torch.Generator().manual_seed(seed)
    summary, curves, history = {}, {}, {}
    geometry: dict[str, Any] | None = None
    for name, task in track(tasks.items(), desc="eval: lengths", unit="length"):
        batches = [task.sample(min(batch_size, n_sequences - i), generator=generator) for i in range(0, n_sequences, batch_size)]
        if geometry is None and not step_shift and task.seq_len == base.seq_len:
            geometry = geometry_of_run(model, task, batches[0])
        ids = step_position_ids(task.seq_len, task.step_layout, step_shift) if step_shift else None
        cal = calibrate(model, task, batches, position_ids=ids)
        summary[name] = cal.scalars()
        if all(isinstance(b, HMMBatch) for b in batches):
            summary[name].update(memory_ladder(batches, model_mae_bits=summary[name]["entropy_mae_bits"]))
        curves[name] = {k: v.tolist() for k, v in vars(cal.per_site).items()}
        if isinstance(task, HMMFiltering) and isinstance(model, TinyGPT) and task.n_steps >= 2 and not step_shift:
            history[name] = hmm_history_attention_by_layer(model, task, batches[0])
    circuit = lag_response = None
    if isinstance(base, HMMFiltering) and isinstance(model, TinyGPT) and base.n_steps >= 2 and not step_shift:
        # the probe needs >= 8 sequences for its held-out split, however few --n asks for
        probe_batch = base.sample(max(8, min(n_sequences, 1000)), generator=generator)
        circuit = hmm_circuit_probe(model, base, probe_batch, generator=torch.Generator().manual_seed(seed))
    if isinstance(base, HMMFiltering) and base.n_symbols >= 2 and not step_shift:
        lag_batch = base.sample(min(n_sequences, 200), generator=generator)
        lag_response = hmm_lag_response(model, base, lag_batch, generator=torch.Generator().manual_seed(seed))
    result = RunEvaluation(
        step=step, n_sequences=n_sequences, seed=seed, summary=summary, per_position=curves, step_shift=step_shift,
        geometry_variants=geometry, history_attention=history or None, circuit=circuit, lag_response=lag_response,
    )
    run = RunDir(run_dir)
    suffix = f"_shift{step_shift}" if step_shift else ""
    json_path = write_json_atomic(run.eval_path(suffix), result.to_dict())
    title = f"{experiment.name or experiment.task_name} at step {step}" + (f", steps moved {step_shift} along the position table" if step_shift else "")
    figures = [plot_eval_curves(curves, run.eval_figure_path(suffix), title=title)]
    if history:
        figures.append(plot_history_attention(history, run.history_figure_path, title=title))
    if lag_response is not None:
        figures.append(plot_lag_response(lag_response, run.lag_figure_path, title=title))
    return dataclasses.replace(result, json_path=json_path, figure_paths=tuple(figures))


def memory_over_training(
    run_dir: str | Path, *, n_sequences: int = 200, seed: int = 12345, max_lag: int = 5
) -> dict[str, Any]:
    """The lag response (:func:`~windtunnel.probes.hmm_lag_response`) of an HMM run at every saved
    model (:func:`~windtunnel.experiments.dissociation.load_checkpoints`: step 0 rebuilt from the
    seed unless the run started ``--init-from`` another, the telemetry snapshots and every
    checkpoint). All on the
    same ``n_sequences`` sequences and the same observation changes, beside the entropy MAE on
    those sequences. Shows the lags of the history being learned, one after another. Writes
    memory.json and memory.png in the run directory.

    Returns:
        ``{"steps": [...], "lags": [0..], "bayes_move_tv": [per lag], "model_move_tv": [[per lag]
        per step], "response_error_tv": [[per lag] per step], "entropy_mae_bits": [per step],
        "n_sequences", "seed", "paths"}``.

    Raises:
        ValueError: when the run is not an HMM run, or its task has one symbol.
    """
    from windtunnel.experiments.dissociation import load_checkpoints

    experiment, states = load_checkpoints(run_dir)
    task = experiment.build_task()
    if not isinstance(task, HMMFiltering):
        raise ValueError(f"memory_over_training: needs an HMM run; {run_dir} holds a {experiment.task_name!r} run.")
    if isinstance(n_sequences, bool) or not isinstance(n_sequences, int) or n_sequences < 1:
        raise ValueError(f"memory_over_training: n_sequences must be an int >= 1; got {n_sequences!r}.")
    batch = task.sample(n_sequences, generator=torch.Generator().manual_seed(seed))
    model = experiment.build_model(None)
    out: dict[str, Any] = {"steps": [], "lags": [], "bayes_move_tv": [], "model_move_tv": [], "response_error_tv": [], "entropy_mae_bits": []}
    for step, state in track(states.items(), desc="memory: saved models", unit="model"):
        model.load_state_dict(state, strict=True)
        lag = hmm_lag_response(model, task, batch, generator=torch.Generator().manual_seed(seed), max_lag=max_lag)
        out["steps"].append(step)
        out["lags"], out["bayes_move_tv"] = lag["lags"], lag["bayes_move_tv"]
        out["model_move_tv"].append(lag["model_move_tv"])
        out["response_error_tv"].append(lag["response_error_tv"])
        out["entropy_mae_bits"].append(float(calibrate(model, task, [batch]).entropy_mae_bits))
    out.update(n_sequences=n_sequences, seed=seed)
    run = RunDir(run_dir)
    title = experiment.name or experiment.task_name
    paths = {"json": str(write_json_atomic(run.memory_path, out)), "figure": str(plot_memory(out, run.memory_figure_path, title=title))}
    return {**out, "paths": paths}


def geometry_of_run(model: torch.nn.Module, task: Any, batch: Any) -> dict[str, Any]:
    """Every geometry variant (:func:`windtunnel.probes.geometry_variants`, docs/theory.md §8.1–§8.3)
    of ``model`` on ``batch``, as eval.json stores it: ``{"n_sequences", "quantities": {quantity:
    {variant: {...}}}}``, or ``{"unavailable": reason}`` for a model without attention sites or a
    readout (the LSTM and the MLP)."""
    reason = unsupported(model, "sites") or unsupported(model, "readout")
    if reason is not None:
        return {"unavailable": reason}
    return {"n_sequences": int(batch.tokens.shape[0]), "quantities": geometry_variants(model, task, batch)}
