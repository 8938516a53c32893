"""Training wind-tunnel models: configs, the Trainer, evaluation in bits, resume and NaN guard.

One :class:`ExperimentConfig` names a task, a model and a :class:`TrainConfig`; it round-trips
through ``config.json``. The :class:`Trainer` draws a fresh batch every step from a seeded data
generator, optimises with AdamW under linear warmup + cosine decay and gradient clipping,
evaluates on a fixed held-out set drawn from a separate generator, writes ``metrics.jsonl`` and
checkpoints (model, optimizer, step and every generator state) to a run directory, and resumes
from a checkpoint to exactly the run it would have been. Randomness never touches the global RNG:
data, initialisation, evaluation and dropout each get their own generator derived from the seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from windtunnel._checks import Problems, check_choice, check_number, check_positive_int, close_matches
from windtunnel.metrics import Calibration
from windtunnel.models import (
    HFCausalLM,
    HFCausalLMConfig,
    LSTMConfig,
    LSTMModel,
    PositionwiseMLP,
    PositionwiseMLPConfig,
    TinyGPT,
    TinyGPTConfig,
)
from windtunnel.probes import ValueUpdateProbe, auxiliary_loss_nats, calibrate
from windtunnel.probes import site_loss_nats as site_loss
from windtunnel.runs import RunDir, append_jsonl, require_tensorboard
from windtunnel.tasks import AssociativeRecall, Batch, Bijection, HMMFiltering, move_tensor

__all__ = [
    "MODELS",
    "TASKS",
    "ExperimentConfig",
    "Probe",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "RESUME_CHANGES",
    "config_differences",
    "estimate_memory_bytes",
    "flatten_config",
    "learning_rate",
    "load_experiment",
    "seed_streams",
    "site_loss",
    "step_position_ids",
    "telemetry_steps",
    "weight_decayed",
]

TASKS: dict[str, type] = {"bijection": Bijection, "hmm": HMMFiltering, "recall": AssociativeRecall}
MODELS: dict[str, tuple[type, type]] = {
    "transformer": (TinyGPTConfig, TinyGPT),
    "mlp": (PositionwiseMLPConfig, PositionwiseMLP),
    "lstm": (LSTMConfig, LSTMModel),
    "hf": (HFCausalLMConfig, HFCausalLM),
}
STREAMS = ("data", "init", "eval", "dropout", "probe")

Probe = Callable[[nn.Module, int], list[dict[str, Any]]]
"""A telemetry probe: ``probe(model, step) -> rows`` of {step, layer, head, metric, value}."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation and bookkeeping of one training run.

    Attributes:
        steps: optimizer steps in total.
        batch_size: fresh sequences per step.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay.
        betas: AdamW's betas.
        warmup_steps: linear warmup from 0 to ``lr`` over these steps.
        schedule: "cosine" (to ``min_lr_ratio * lr`` at ``steps``) or "constant" after warmup.
        min_lr_ratio: floor of the cosine as a fraction of ``lr`` (0 = decay to 0).
        grad_clip: max global gradient norm; None disables clipping.
        aux_loss_weight: weight of the auxiliary soft CE on the task's auxiliary targets, added
            to the site loss (0 = off). Only the HMM has them: the predicted belief
            p(s_t | o_1:t-1) at the [OBS] token before each observation (ours, not the paper's
            recipe; RESULTS.md shows it lets small models leave the memoryless plateau).
        position_shift: in training, keep the header's positions but move each sequence's steps
            along the position table by a whole number of steps, drawn uniformly (from the data
            generator) so that the last step still fits the table: the K training steps then
            read the rows of steps s+1..s+K of a longer sequence, and rows past the training
            length are trained too. Evaluation never shifts. Needs a task with a
            ``step_layout`` (the HMM) and TinyGPT. Ours, not the paper's recipe: for length
            generalisation (RESULTS.md).
        position_shift_ends: with ``position_shift``, the fraction of sequences placed at the
            first or the last offset (half each) instead of a uniform one. Uniform offsets train
            the middle rows of the table most and the last rows least (the last step's row only
            at the largest offset, 1 in n_offsets sequences); the ends even this out. (It did
            not change the K = 50 error of our HMM runs: RESULTS.md.) 0, the default, draws
            exactly as before the field existed.
        eval_every: evaluate every this many steps (and at the end).
        eval_size: held-out sequences, drawn once from the eval generator.
        eval_batch_size: sequences per evaluation forward pass.
        log_every: log the train loss every this many steps.
        checkpoint_every: save a checkpoint every this many steps (and at the end).
        divergence_factor: stop the run (as for a NaN) at the first step whose training loss
            exceeds this multiple of ln(n_out), the loss of a uniform prediction over the model's
            outputs: a model that far below chance has diverged, and the checkpoints written
            from then on would hold its blown-up weights. None turns the check off.
        keep_checkpoints: None keeps every periodic checkpoints/step_N.pt; k keeps the k newest
            and every one on the log-spaced schedule of :func:`telemetry_steps` (what
            ``windtunnel dissociation`` and ``memory`` read), deleting the others as training
            goes. latest.pt and the telemetry snapshots are never deleted.
        seed: the one integer from which every generator is derived (:func:`seed_streams`).
        device: "auto" (CUDA when available), "cpu" or "cuda".
        compile: the fast path for small models on a GPU, whose steps are bound by kernel-launch
            latency: the forward pass and the loss go through ``torch.compile`` (on CUDA in its
            "reduce-overhead" mode, which replays them as CUDA graphs) and, on CUDA, AdamW is the
            fused kernel. Off (the default), the step is plain eager PyTorch. Results equal the
            eager ones to float32 rounding, not bit for bit, so a run keeps the setting it
            started with. Needs ``model.dropout = 0`` and a working C compiler; the first steps
            pay the compilation (a minute or more).
    """

    steps: int
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 2000
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    aux_loss_weight: float = 0.0
    position_shift: bool = False
    position_shift_ends: float = 0.0
    eval_every: int = 1000
    eval_size: int = 2000
    eval_batch_size: int = 500
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int | None = None
    divergence_factor: float | None = 10.0
    seed: int = 0
    device: str = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        problems = Problems(owner)
        for name in ("steps", "batch_size", "eval_every", "eval_size", "eval_batch_size", "log_every", "checkpoint_every"):
            text = check_positive_int(owner, name, getattr(self, name))
            if text:
                problems.add_text(text)
        text = check_positive_int(owner, "warmup_steps", self.warmup_steps, minimum=0)
        if text:
            problems.add_text(text)
        if self.keep_checkpoints is not None:
            text = check_positive_int(owner, "keep_checkpoints", self.keep_checkpoints, minimum=0)
            if text:
                problems.add_text(text.replace("an int >= 0", "None or an int >= 0"))
        for name, low, high, low_open in (("lr", 0.0, math.inf, True), ("weight_decay", 0.0, math.inf, False), ("min_lr_ratio", 0.0, 1.0, False), ("aux_loss_weight", 0.0, math.inf, False), ("position_shift_ends", 0.0, 1.0, False)):
            text = check_number(owner, name, getattr(self, name), low=low, high=high, low_open=low_open, high_open=math.isinf(high))
            if text:
                problems.add_text(text)
        if self.divergence_factor is not None:
            text = check_number(owner, "divergence_factor", self.divergence_factor, low=1.0, high=math.inf, low_open=True, high_open=True)
            if text:
                problems.add_text(text.replace("a number", "None or a number"))
        if self.grad_clip is not None:
            text = check_number(owner, "grad_clip", self.grad_clip, low=0.0, high=math.inf, low_open=True, high_open=True)
            if text:
                problems.add_text(text)
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas)):
            problems.add("betas", "two numbers in [0, 1)", self.betas)
        for name, choices in (("schedule", ("cosine", "constant")), ("device", ("auto", "cpu", "cuda"))):
            text = check_choice(owner, name, getattr(self, name), choices)
            if text:
                problems.add_text(text)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            problems.add("seed", "an int >= 0", self.seed)
        if not isinstance(self.compile, bool):
            problems.add("compile", "a bool", self.compile)
        if not isinstance(self.position_shift, bool):
            problems.add("position_shift", "a bool", self.position_shift)
        elif self.position_shift_ends and not self.position_shift:
            problems.add("position_shift_ends", "0 unless position_shift is on", self.position_shift_ends)
        problems.raise_if_any()
        object.__setattr__(self, "betas", tuple(self.betas))

    def resolved_device(self) -> torch.device:
        """The device this run uses: ``device``, with "auto" resolved.

        Raises:
            ValueError: for ``device="cuda"`` on a machine without a usable CUDA device.
        """
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "TrainConfig.device is 'cuda' but this machine has no usable CUDA device; "
                "use --set train.device=cpu (or auto)."
            )
        return torch.device(self.device)


def _dataclass_from_dict(cls: type, data: dict[str, Any], owner: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{owner} must be a JSON object of {cls.__name__} fields; got {type(data).__name__}.")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(
            "; ".join(f"{owner}: {k!r} is not a field of {cls.__name__};{close_matches(k, names) or ' its fields: ' + ', '.join(sorted(names)) + '.'}" for k in unknown)
        )
    return cls(**data)


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """A task, a model and how to train it: everything needed to rebuild a run.

    Attributes:
        task_name: a key of ``TASKS`` ("bijection", "hmm", "recall").
        task: keyword arguments of the task class.
        model_name: a key of ``MODELS`` ("transformer", "mlp", "lstm", "hf").
        model: fields of the model config, except ``vocab_size``, ``n_positions`` and ``n_out``,
            which are derived from the task unless given.
        train: the :class:`TrainConfig`.
        eval_lengths: for tasks with a length parameter (HMM ``n_steps``), extra evaluation
            lengths (length generalisation); empty for none.
        train_lengths: for such tasks, extra training lengths: each step's batch is drawn at a
            length chosen uniformly (from the data generator) among the task's own and these.
            Empty (the default): every batch at the task's length, drawn exactly as before the
            field existed. Ours, and a deviation from training at one K: label results that use it.
        name: a label (the preset name).
        init_from: a run directory (its latest checkpoint) or a checkpoint file whose model
            weights start this run: fine-tuning. The optimizer, schedule, step and generators
            start fresh. The source's model config must equal this one's. None: a fresh
            initialisation from the seed.
    """

    task_name: str
    task: dict[str, Any] = field(default_factory=dict)
    model_name: str = "transformer"
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig
    eval_lengths: tuple[int, ...] = ()
    train_lengths: tuple[int, ...] = ()
    name: str = ""
    init_from: str | None = None

    def __post_init__(self) -> None:
        problems = Problems("ExperimentConfig")
        for text in (
            check_choice("ExperimentConfig", "task_name", self.task_name, tuple(TASKS)),
            check_choice("ExperimentConfig", "model_name", self.model_name, tuple(MODELS)),
        ):
            if text:
                problems.add_text(text)
        if self.init_from is not None and not (isinstance(self.init_from, str) and self.init_from):
            problems.add("init_from", "a path (str) or None", self.init_from)
        for name in ("eval_lengths", "train_lengths"):
            value = getattr(self, name)
            if not (isinstance(value, (list, tuple)) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value)):
                problems.add(name, "a list of ints >= 1, e.g. [30, 50]", value)
        for name in ("task", "model"):
            if not isinstance(getattr(self, name), dict):
                problems.add(name, "a dict of fields", getattr(self, name))
        if not isinstance(self.name, str):
            problems.add("name", "a string", self.name)
        if not isinstance(self.train, TrainConfig):
            problems.add("train", "a TrainConfig", self.train)
        problems.raise_if_any()
        object.__setattr__(self, "eval_lengths", tuple(self.eval_lengths))
        object.__setattr__(self, "train_lengths", tuple(self.train_lengths))
        task = self.build_task()  # validates the task fields
        if self.train_lengths:
            if not hasattr(task, "n_steps"):
                raise ValueError(f"ExperimentConfig: train_lengths needs a task with n_steps (the HMM); {self.task_name} has none.")
            longest = max(self.build_task(n_steps=n).seq_len for n in self.train_lengths)  # validates each length
        model_config = self.model_config()  # validates the model fields
        n_rows = getattr(model_config, "n_positions", None)
        if self.train_lengths and n_rows is not None and n_rows < longest:
            raise ValueError(
                f"ExperimentConfig: train_lengths {list(self.train_lengths)} need {longest} positions; "
                f"model.n_positions is {n_rows}."
            )
        if self.train.compile and getattr(model_config, "dropout", 0.0):
            raise ValueError(
                f"ExperimentConfig: train.compile needs model.dropout = 0 (its masks come from the run's own "
                f"generator, which a compiled step does not replay); got dropout={model_config.dropout}."
            )
        if self.train.aux_loss_weight > 0 and not hasattr(task, "auxiliary_targets"):
            raise ValueError(
                f"ExperimentConfig: train.aux_loss_weight={self.train.aux_loss_weight} needs a task with auxiliary "
                f"targets (the HMM); {self.task_name} has none. Set it to 0."
            )
        if self.train.position_shift:
            n_positions = getattr(model_config, "n_positions", None)
            if self.model_name != "transformer":
                raise ValueError(
                    f"ExperimentConfig: train.position_shift needs the transformer (TinyGPT); got model {self.model_name!r}."
                )
            if not hasattr(task, "step_layout"):
                raise ValueError(
                    f"ExperimentConfig: train.position_shift needs a task made of steps (the HMM); {self.task_name} is not."
                )
            if n_positions < task.seq_len + task.step_layout[1]:
                raise ValueError(
                    f"ExperimentConfig: train.position_shift needs a position table at least one step longer "
                    f"than the training sequences ({task.seq_len} tokens); it has {n_positions} rows. Add longer "
                    "eval_lengths or set model.n_positions."
                )

    def build_task(self, **overrides: Any) -> Any:
        """The task object (``overrides`` replace fields, e.g. ``n_steps=50``)."""
        return _dataclass_from_dict(TASKS[self.task_name], {**self.task, **overrides}, "ExperimentConfig.task")

    def model_config(self) -> Any:
        """The model's config dataclass, with vocabulary, positions and outputs derived from the task."""
        task = self.build_task()
        config_cls, _ = MODELS[self.model_name]
        names = {f.name for f in dataclasses.fields(config_cls)}
        derived: dict[str, Any] = {"vocab_size": task.vocab_size}
        if "n_positions" in names:
            extra = [*self.eval_lengths, *self.train_lengths]
            longest = max([task.seq_len] + [self.build_task(n_steps=n).seq_len for n in extra])
            derived["n_positions"] = longest
        if task.soft_targets:
            derived["n_out"] = task.n_classes
            if "tie_embeddings" in names:
                derived["tie_embeddings"] = False
        return _dataclass_from_dict(config_cls, {**derived, **self.model}, "ExperimentConfig.model")

    def build_model(self, generator: torch.Generator | None) -> nn.Module:
        """A freshly initialised model (from ``generator``; None leaves it for a state dict)."""
        _, model_cls = MODELS[self.model_name]
        return model_cls(self.model_config(), generator=generator)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; inverse of :meth:`from_dict`."""
        out = dataclasses.asdict(self)
        out["train"]["betas"] = list(self.train.betas)
        out["eval_lengths"] = list(self.eval_lengths)
        out["train_lengths"] = list(self.train_lengths)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        if not isinstance(data, dict):
            raise ValueError(f"ExperimentConfig must be a JSON object; got {type(data).__name__}.")
        data = dict(data)
        data["train"] = _dataclass_from_dict(TrainConfig, data.get("train", {}), "ExperimentConfig.train")
        return _dataclass_from_dict(cls, data, "ExperimentConfig")


def load_experiment(run: str | Path | RunDir) -> ExperimentConfig:
    """The experiment of a run directory, from its config.json.

    Raises:
        ValueError: naming config.json when it is missing, not JSON or not a valid config.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    data = run.read_config()
    try:
        return ExperimentConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{run.config_path}: not a valid windtunnel config: {err}") from None


def estimate_memory_bytes(experiment: ExperimentConfig) -> int:
    """A lower estimate of the memory a run needs, in bytes, computed without allocating it.

    It counts the parameters four times (weights, gradients and AdamW's two moments; counted on
    the meta device), the logits and their gradient for one training batch, and the held-out
    posteriors (float32). Activations, the data sampler's workspace and the allocator's slack
    come on top, so a run whose estimate exceeds the machine's memory cannot fit; one below it
    may still not.
    """
    task = experiment.build_task()
    with torch.device("meta"):
        model = experiment.build_model(None)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = experiment.train
    tokens = cfg.batch_size * task.seq_len
    n_out = getattr(model.config, "n_out", None) or getattr(model.config, "vocab_size", task.vocab_size)
    n_sites = max(1, task.seq_len)
    return int(4 * (4 * n_params + 2 * tokens * n_out + cfg.eval_size * n_sites * task.n_classes))


def _machine_memory_bytes(device: torch.device) -> int | None:
    """Total memory of the device (GPU) or of the machine (CPU); None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def check_fits(experiment: ExperimentConfig, device: torch.device) -> None:
    """Refuse a run whose :func:`estimate_memory_bytes` exceeds the memory of ``device``.

    Raises:
        ValueError: naming the estimate, the memory and the sizes that drive it.
    """
    need, have = estimate_memory_bytes(experiment), _machine_memory_bytes(device)
    if have is not None and need > have:
        task = experiment.build_task()
        raise ValueError(
            f"ExperimentConfig: this run needs at least {need / 2**30:.1f} GiB (parameters, optimizer state, "
            f"one batch of logits, held-out posteriors; vocabulary {task.vocab_size}, batch "
            f"{experiment.train.batch_size} x {task.seq_len} tokens, {experiment.train.eval_size} held-out "
            f"sequences) and this {device.type} has {have / 2**30:.1f} GiB; make the task or the model smaller."
        )


def seed_streams(seed: int) -> dict[str, int]:
    """Independent 63-bit seeds for each random stream (``STREAMS``), derived from one seed.

    numpy's SeedSequence spawns statistically independent children, so adding an evaluation
    pass or a probe never shifts the training data stream.
    """
    children = np.random.SeedSequence(seed).spawn(len(STREAMS))
    return {name: int(child.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)) for name, child in zip(STREAMS, children)}


def weight_decayed(name: str, parameter: torch.Tensor) -> bool:
    """Whether AdamW's weight decay applies to the parameter ``name``: the matrices (two or more
    dimensions) that are not embeddings; biases, norms' gains and embedding tables are not decayed."""
    return parameter.dim() >= 2 and "embed" not in name


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup from 0 over ``warmup_steps``, then cosine to ``min_lr_ratio * lr`` at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * step / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.min_lr_ratio * config.lr
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_position_ids(seq_len: int, step_layout: tuple[int, int], shift: int | torch.Tensor) -> torch.Tensor:
    """Position-table rows for a sequence whose steps are moved ``shift`` whole steps along the
    table, as ``TrainConfig.position_shift`` trains and ``windtunnel eval --shift-steps`` evaluates:
    the header keeps rows 0..header_len-1 and token i >= header_len reads row i + per_step * shift.

    Args:
        seq_len: tokens per sequence.
        step_layout: the task's (header_len, tokens per step) (``HMMFiltering.step_layout``).
        shift: whole steps, an int (one shift for every sequence) or a long tensor [batch, 1].

    Returns:
        long [seq_len] for an int shift, [batch, seq_len] for a tensor one.
    """
    header_len, per_step = step_layout
    ids = torch.arange(seq_len)
    return torch.where(ids >= header_len, ids + per_step * shift, ids)


def telemetry_steps(total_steps: int) -> list[int]:
    """The log-spaced probe schedule of docs/theory.md §8.6, dense early, and always the last step.

    0, 1, 2, 4, ..., 512; then every 100 to 1,000, every 500 to 5,000, every 1,000 to 10,000 and
    every 5,000 after that.
    """
    steps = {0}
    s = 1
    while s <= 512:
        steps.add(s)
        s *= 2
    for start, stop, every in ((600, 1000, 100), (1500, 5000, 500), (6000, 10000, 1000)):
        steps.update(range(start, stop + 1, every))
    steps.update(range(15000, total_steps + 1, 5000))
    steps.add(total_steps)
    return sorted(s for s in steps if s <= total_steps)


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or stopped) run reached.

    Attributes:
        step: the last completed step.
        final_loss_nats: the last training loss.
        calibration: evaluation at ``step`` on the held-out set.
        wall_s: wall time of this call of :meth:`Trainer.fit`.
    """

    step: int
    final_loss_nats: float
    calibration: Calibration
    wall_s: float


CHECK_EVERY = 100
"""The trainer reads the losses, gradient norms and weight checks back from the device at least
every this many steps (and at every log, evaluation, checkpoint and probe step): one host
synchronisation per read instead of several per step (:meth:`Trainer.fit`)."""

RESUME_CHANGES = ("train.steps", "train.lr", "train.keep_checkpoints")
"""The fields ``--resume`` may change: extend the run, lower its learning rate (after a
divergence), or thin its checkpoints. Every other change would make it another run."""

STATE_KEYS = frozenset(
    {"step", "last_loss", "elapsed_s", "model", "optimizer", "data_generator", "dropout_generator", "device_type", "experiment"}
)


class Trainer:
    """Trains one model on one wind tunnel (see the module docstring).

    A run directory is written by one trainer at a time: the trainer takes its lock
    (:meth:`RunDir.lock`) when it is built and holds it until :meth:`fit` returns (a later
    :meth:`fit` takes it again). A directory that already holds a run is continued only by
    :meth:`resume` and replaced only with ``overwrite=True``.

    Args:
        experiment: what to train.
        run_dir: where to write config, metrics and checkpoints; None keeps everything in memory.
        probes: telemetry probes called at :func:`telemetry_steps`; their rows go to telemetry.jsonl.
        update_probe: watches the training step taken at each of those steps (the realised change
            of the values against their pull, :class:`~windtunnel.probes.ValueUpdateProbe`); its
            rows go to telemetry.jsonl under the step the update was taken at.
        overwrite: replace the run ``run_dir`` holds (everything in it is deleted).
        tensorboard: also write the metrics and telemetry as TensorBoard event files in
            RUN_DIR/tensorboard/ (:class:`~windtunnel.runs.TensorBoardMirror`; needs the
            ``tensorboard`` extra). Each :meth:`fit` rebuilds them from the logs first. It changes
            nothing else: the run is bit-identical without it, and it is not part of config.json.
        resuming: set by :meth:`resume`, whose checkpoint replaces the weights, so
            ``experiment.init_from`` is not read.

    Raises:
        ValueError: when ``run_dir`` already holds a run (and neither ``overwrite`` nor
            ``resuming``), is not empty and not a run directory, cannot be written, or is being
            written by another process (:class:`~windtunnel.runs.RunLockedError`); when the run
            would not fit in memory or asks for a missing device; when ``experiment.init_from``
            has no checkpoint or holds a model of another config.
    """

    def __init__(
        self,
        experiment: ExperimentConfig,
        run_dir: str | os.PathLike | RunDir | None = None,
        *,
        probes: Sequence[Probe] = (),
        update_probe: ValueUpdateProbe | None = None,
        overwrite: bool = False,
        tensorboard: bool = False,
        resuming: bool = False,
    ) -> None:
        if tensorboard and run_dir is None:
            raise ValueError("Trainer: tensorboard=True needs a run directory to write the event files in.")
        if tensorboard:
            require_tensorboard()  # refused here, before anything is written
        self.tensorboard = tensorboard
        self.experiment = experiment
        self.config = experiment.train
        self.run = run_dir if isinstance(run_dir, RunDir) or run_dir is None else RunDir(run_dir)
        self.probes = list(probes)
        self.update_probe = update_probe
        self.device = self.config.resolved_device()
        check_fits(experiment, self.device)
        if self.run is not None and not resuming:
            self._check_new_run_dir(overwrite)
        self.task = experiment.build_task()
        self.train_tasks = [self.task, *(experiment.build_task(n_steps=n) for n in experiment.train_lengths)]
        seeds = seed_streams(self.config.seed)
        self.model = experiment.build_model(torch.Generator().manual_seed(seeds["init"])).to(self.device)
        self.init_step: int | None = None
        if experiment.init_from is not None and not resuming:
            self.init_step = self._load_init_weights(experiment)
        self.data_generator = torch.Generator().manual_seed(seeds["data"])
        self.dropout_generator = torch.Generator(device=self.device).manual_seed(seeds["dropout"])
        eval_generator = torch.Generator().manual_seed(seeds["eval"])
        self.eval_sets = {"eval": self._eval_batches(self.task, eval_generator)}
        for n in experiment.eval_lengths:
            self.eval_sets[f"eval_len{n}"] = self._eval_batches(experiment.build_task(n_steps=n), eval_generator)
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if weight_decayed(name, p) else no_decay).append(p)
        fast_cuda = self.config.compile and self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=learning_rate(0, self.config),
            betas=self.config.betas,
            fused=True if fast_cuda else None,
        )
        self._step_losses: Callable[..., tuple[torch.Tensor, torch.Tensor | None, int]] = self._losses
        if self.config.compile:
            self._step_losses = torch.compile(self._losses, mode="reduce-overhead" if fast_cuda else None, dynamic=False)
        self.step = 0
        self.last_loss = math.nan
        self.elapsed_s = 0.0
        if self.run is not None:
            self._claim_run_dir(overwrite=overwrite and not resuming)

    def _check_new_run_dir(self, overwrite: bool) -> None:
        """Refuse, before anything is built or written, a directory this run may not take."""
        run = self.run
        if run.path.exists() and not run.path.is_dir():
            raise ValueError(f"Trainer: the run directory {run.path} is a file; choose another --out.")
        if run.exists():
            if not overwrite:
                raise ValueError(
                    f"Trainer: {run.path} already holds a run{_progress_text(run)}; continue it with --resume, "
                    "or replace it with --overwrite."
                )
        elif run.path.is_dir() and any(p.name != ".lock" for p in run.path.iterdir()):
            raise ValueError(f"Trainer: {run.path} is not empty and is not a run directory; choose another --out.")

    def _claim_run_dir(self, *, overwrite: bool) -> None:
        """Lock the run directory, replace the old run when asked, clean up and write config.json.
        A directory created here is removed again if this fails."""
        created = not self.run.path.exists()
        try:
            self.run.lock()
            if overwrite and self.run.exists():
                self.run.remove_run()
            self.run.clean_temporaries()
            self.run.write_config(self.experiment.to_dict())
        except BaseException:
            self.run.unlock()
            if created:
                shutil.rmtree(self.run.path, ignore_errors=True)
            raise

    def close(self) -> None:
        """Close the TensorBoard mirror and release the run directory's lock (:meth:`fit` does it
        when it returns)."""
        if self.run is not None:
            self.run.close_tensorboard()
            self.run.unlock()

    def _load_init_weights(self, experiment: ExperimentConfig) -> int:
        """Load ``experiment.init_from``'s model weights; returns the step they were saved at."""
        source = Path(experiment.init_from)
        if source.is_dir():
            state = RunDir(source).load_checkpoint()
        elif source.is_file():
            try:
                state = RunDir(source.parent).load_checkpoint(source)
            except ValueError as err:
                raise ValueError(f"Trainer: init_from {str(source)!r} could not be read as a checkpoint: {err}") from None
        else:
            raise ValueError(f"Trainer: init_from {str(source)!r} is neither a run directory nor a checkpoint file.")
        if not (isinstance(state, dict) and {"model", "experiment", "step"} <= state.keys()):
            raise ValueError(f"Trainer: init_from {str(source)!r} is not a windtunnel training checkpoint.")
        try:
            theirs = ExperimentConfig.from_dict(state["experiment"]).model_config()
        except (ValueError, TypeError) as err:
            raise ValueError(f"Trainer: init_from {str(source)!r} holds an invalid experiment: {err}") from None
        ours = experiment.model_config()
        if theirs != ours:
            diff = ", ".join(
                f"{f.name}: {getattr(theirs, f.name)!r} there, {getattr(ours, f.name)!r} here"
                for f in dataclasses.fields(ours)
                if getattr(theirs, f.name, None) != getattr(ours, f.name)
            )
            raise ValueError(f"Trainer: init_from {str(source)!r} holds a model of another config ({diff or type(theirs).__name__}).")
        _load_model_state(self.model, state["model"], str(source))
        return int(state["step"])

    def _eval_batches(self, task: Any, generator: torch.Generator) -> tuple[Any, list[Batch]]:
        n, size = self.config.eval_size, self.config.eval_batch_size
        return task, [task.sample(min(size, n - i), generator=generator) for i in range(0, n, size)]

    # --- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (tensors, numbers, strings and containers only, so
        that the checkpoint loads with ``weights_only=True``)."""
        return {
            "step": self.step,
            "last_loss": self.last_loss,
            "elapsed_s": self.elapsed_s,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data_generator": self.data_generator.get_state(),
            "dropout_generator": self.dropout_generator.get_state(),
            "device_type": self.device.type,
            "experiment": self.experiment.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], *, source: str = "the checkpoint") -> None:
        """Restore a checkpoint from :meth:`state_dict` (keys matched strictly).

        Raises:
            ValueError: naming ``source`` when its keys or the model's are not exactly those
                of this run; when the checkpoint was written on another kind of device (CPU /
                CUDA) and the model has dropout: the dropout generator's state cannot move
                between the two, so the run could not continue exactly. Without dropout that
                generator is never drawn from, and the run resumes on either device.
        """
        if set(state) != STATE_KEYS:
            missing, extra = sorted(STATE_KEYS - set(state)), sorted(set(state) - STATE_KEYS)
            raise ValueError(f"Trainer: {source} is not a training checkpoint of this windtunnel (missing {missing}, unexpected {extra}).")
        saved_on = state["device_type"]
        moved = saved_on != self.device.type
        if moved and getattr(self.model.config, "dropout", 0.0) > 0:
            raise ValueError(
                f"Trainer.resume: this checkpoint was written on {saved_on} and this run is on "
                f"{self.device.type}; a model with dropout resumes exactly only on the device kind it "
                f"was trained on: resume it on {saved_on}, or start a new run from its weights "
                f"with --init-from."
            )
        _load_model_state(self.model, state["model"], source)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.data_generator.set_state(state["data_generator"])
            if not moved:
                self.dropout_generator.set_state(state["dropout_generator"])
        except (ValueError, RuntimeError, KeyError, TypeError) as err:
            raise ValueError(f"Trainer: {source} does not fit this run ({err}).") from None
        self.step = int(state["step"])
        self.last_loss = float(state["last_loss"])
        self.elapsed_s = float(state["elapsed_s"])

    @classmethod
    def resume(
        cls,
        run_dir: str | os.PathLike | RunDir,
        *,
        probes: Sequence[Probe] = (),
        changes: dict[str, Any] | None = None,
        tensorboard: bool = False,
    ) -> Trainer:
        """Rebuild a run from its directory and its latest checkpoint.

        Rows logged after that checkpoint (a run killed between checkpoints) are dropped from
        metrics.jsonl and telemetry.jsonl (one atomic replace each), so the resumed run writes
        them again exactly once.

        Args:
            changes: ``{"train.steps": N}`` extends (or shortens, down to the checkpoint's step)
                the run: the cosine schedule is then recomputed for the new length, so the steps
                after the checkpoint differ from those of a run started with N steps.
                ``{"train.lr": x}`` changes the peak learning rate from here on (after a
                divergence). ``{"train.keep_checkpoints": k}`` changes the retention. Each change
                is recorded in config.json and, with the step it was made at, in resumes.jsonl.
            tensorboard: as for :class:`Trainer`; the event files are rebuilt from the cut-back
                logs, so each step appears once. Without it, an existing tensorboard/ folder is
                left as it was (it stops at the step it reached).

        Raises:
            ValueError: for any other key of ``changes`` (naming it), a checkpoint that cannot be
                trusted (naming the file), or ``train.steps`` below the checkpoint's step.
        """
        run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        experiment = load_experiment(run)
        changes = dict(changes or {})
        refused = [k for k in changes if k not in RESUME_CHANGES]
        if refused:
            raise ValueError(
                f"Trainer.resume: {', '.join(refused)} would make {run.path} another run; --resume may change "
                f"only {', '.join(RESUME_CHANGES)}. Start a new run (another --out, or --init-from {run.path})."
            )
        run.lock()  # before reading the checkpoint: a run being written is refused, not half-read
        try:
            return cls._resume_locked(run, experiment, changes, probes, tensorboard)
        except BaseException:
            run.unlock()
            raise

    @classmethod
    def _resume_locked(cls, run: RunDir, experiment: ExperimentConfig, changes: dict[str, Any], probes: Sequence[Probe], tensorboard: bool) -> Trainer:
        state = run.load_checkpoint()
        step = int(state.get("step", 0))
        try:
            saved = ExperimentConfig.from_dict(state.get("experiment")).to_dict()
        except (ValueError, TypeError) as err:
            raise ValueError(f"Trainer.resume: {run.latest_checkpoint()} holds an invalid experiment: {err}") from None
        differ = [k for k in config_differences(experiment.to_dict(), saved) if k not in RESUME_CHANGES]
        if differ:
            ours, theirs = flatten_config(experiment.to_dict()), flatten_config(saved)
            text = ", ".join(f"{k}: {ours.get(k)!r} in config.json, {theirs.get(k)!r} in the checkpoint" for k in differ)
            raise ValueError(f"Trainer.resume: {run.config_path} and {run.latest_checkpoint()} describe different runs ({text}).")
        train_changes = {k.split(".", 1)[1]: v for k, v in changes.items()}
        if train_changes:
            try:
                amended_train = dataclasses.replace(experiment.train, **train_changes)
            except (ValueError, TypeError) as err:
                raise ValueError(f"Trainer.resume: {err}") from None
            if amended_train.steps < step:
                raise ValueError(f"Trainer.resume: train.steps={amended_train.steps} is below the checkpoint's step {step}.")
            experiment = dataclasses.replace(experiment, train=amended_train)
        original = run.read_config()
        trainer = cls(experiment, run, probes=probes, tensorboard=tensorboard, resuming=True)
        try:
            trainer.load_state_dict(state, source=str(run.latest_checkpoint()))
            run.truncate_logs(trainer.step)
            if changes:
                was = original.get("train", {})
                record = {k: [was.get(k.split(".", 1)[1]), v] for k, v in changes.items()}
                append_jsonl(run.resumes_path, [{"step": trainer.step, "changes": record}])
        except BaseException:
            run.write_config(original)
            trainer.close()
            raise
        return trainer

    # --- training ---------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Calibration]:
        """Calibration (:func:`windtunnel.probes.calibrate`) of the model on every held-out set, by
        split name: ``"eval"`` (the training length), then ``"eval_len{K}"`` for each extra length.
        To evaluate any model on other batches, call :func:`~windtunnel.probes.calibrate` itself;
        to evaluate a saved run, :func:`windtunnel.experiments.evaluation.evaluate_run`."""
        return {name: calibrate(self.model, task, batches) for name, (task, batches) in self.eval_sets.items()}

    def _save(self, *, keep_every: bool = True) -> None:
        """Checkpoint (the state is refused if not finite: :meth:`RunDir.save_checkpoint`), then
        apply ``keep_checkpoints``; at the end of the run also export model.safetensors."""
        if self.run is None:
            return
        self.run.save_checkpoint(self.step, self.state_dict(), keep_every=keep_every)
        self._saved_step = self.step
        if self.config.keep_checkpoints is not None:
            self.run.prune_checkpoints(self.config.keep_checkpoints, protected=set(telemetry_steps(self.config.steps)))
        if self.step == self.config.steps:
            metadata = {"format": "windtunnel model weights", "step": str(self.step), "experiment": json.dumps(self.experiment.to_dict())}
            self.run.export_model(self.model.state_dict(), metadata)

    def _log(self, row: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log_metrics(row)

    def _draw_task(self) -> Any:
        """The task of this step's batch: the task itself, or with ``train_lengths`` one of the
        lengths, uniformly (from the data stream; no draw without them)."""
        if len(self.train_tasks) == 1:
            return self.task
        return self.train_tasks[int(torch.randint(0, len(self.train_tasks), (), generator=self.data_generator))]

    def _shifted_position_ids(self, shape: torch.Size) -> torch.Tensor:
        """Position ids [batch, seq_len] for ``position_shift``: the header at 0..header_len-1, the
        steps moved by a random whole number of steps (from the data stream): uniform, or with
        probability ``position_shift_ends`` the first or the last offset."""
        batch, seq_len = shape
        per_step = self.task.step_layout[1]
        n_shifts = (self.model.config.n_positions - seq_len) // per_step + 1
        shift = torch.randint(0, n_shifts, (batch, 1), generator=self.data_generator)
        ends = self.config.position_shift_ends
        if ends > 0:
            u = torch.rand(batch, 1, generator=self.data_generator)
            shift = torch.where(u < ends / 2, 0, torch.where(u < ends, n_shifts - 1, shift))
        ids = step_position_ids(seq_len, self.task.step_layout, shift)
        if self.device.type != "cuda":
            return ids
        # eager: page-locked CPU ids, whose range the model checks on the host before copying them
        # without a wait (a check on the device would wait for it every step); compiled: on the
        # device already, as the CUDA graphs need (the compiled model skips that check)
        return move_tensor(ids, self.device, True) if self.config.compile else ids.pin_memory()

    def _run_probes(self) -> None:
        if not self.probes:
            return
        rows = []
        for probe in self.probes:
            rows.extend(probe(self.model, self.step))
        if self.run is not None:
            self.run.log_telemetry(rows)

    def _weights_finite(self) -> bool:
        """True when every parameter is finite (one sync)."""
        return bool(torch.isfinite(self._weights_peak([p for p in self.model.parameters() if p.numel()])))

    @staticmethod
    def _weights_peak(params: list[nn.Parameter]) -> torch.Tensor:
        """max |w| over the (non-empty) ``params``, a 0-dim tensor on their device, without a
        sync; NaN and inf propagate through it, so it is finite exactly when every weight is."""
        if not params:
            return torch.zeros(())
        return nn.utils.get_total_norm(params, math.inf)

    def _losses(self, batch: Batch, task: Any, shifted: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """The forward pass of one training step: (site loss [], auxiliary loss [] or None when
        its weight is 0, the number of logits). ``TrainConfig.compile`` compiles this."""
        logits = self.model(batch.tokens, generator=self.dropout_generator, **shifted)
        loss = site_loss(logits, batch, task)
        aux_loss = auxiliary_loss_nats(logits, batch, task) if self.config.aux_loss_weight > 0 else None
        return loss, aux_loss, logits.shape[-1]

    def _check_steps(self, pending: list[tuple[int, float, int, torch.Tensor]]) -> tuple[float, float, float, float]:
        """Read back the values of the steps in ``pending`` (one device sync for all of them),
        check them in step order exactly as a check after every step would, and empty it.

        Each step's [loss, auxiliary loss, gradient norm, max |w| after its update] is checked in
        the order the step made them: a non-finite loss, a diverged loss, a non-finite auxiliary
        loss or gradient norm, then non-finite weights. The first failure stops the run at its
        step, with the last finite loss before it. Returns (learning rate, loss, auxiliary loss,
        gradient norm) of the last step, and sets ``last_loss``.

        Raises:
            FloatingPointError: as :meth:`fit` describes.
        """
        rows = torch.stack([values for *_, values in pending]).tolist()
        now = self.step
        cfg = self.config
        for (step, lr, n_out, _), (loss_value, aux_value, grad_norm, peak) in zip(pending, rows):
            self.step = step  # the step a failure is reported at
            if not math.isfinite(loss_value):
                raise self._stop(f"the loss is {loss_value}", loss_value, grad_norm)
            if cfg.divergence_factor is not None and loss_value > cfg.divergence_factor * math.log(n_out):
                uniform = math.log(n_out)
                raise self._stop(
                    f"the loss diverged ({loss_value:.4g} nats, over {cfg.divergence_factor:g} x the {uniform:.3g} nats of a "
                    "uniform prediction; --set train.divergence_factor=null to allow it)", loss_value, grad_norm)
            if not math.isfinite(aux_value):
                raise self._stop(f"the auxiliary loss is {aux_value}", loss_value, grad_norm)
            if not math.isfinite(grad_norm):
                raise self._stop(f"the gradient norm is {grad_norm}", loss_value, grad_norm)
            if not math.isfinite(peak):
                raise self._stop("the weights are not finite after the optimizer step", loss_value, grad_norm)
            self.last_loss = loss_value
        self.step = now
        pending.clear()
        return lr, loss_value, aux_value, grad_norm

    def _stop(self, what: str, loss_value: float, grad_norm: float) -> FloatingPointError:
        """The one-line error of a run stopped at its first non-finite value."""
        saved = getattr(self, "_saved_step", None)
        if self.run is None:
            kept = "nothing kept (no run directory)"
        elif saved is None:
            kept = "no checkpoint was written"
        else:
            path = self.run.checkpoint_path(saved)
            kept = f"kept {path if path.exists() else self.run.latest_checkpoint()} (step {saved}, finite)"
        last = f"last finite loss {self.last_loss:.4g} nats" if math.isfinite(self.last_loss) else "no finite loss yet"
        hint = f"lower the learning rate (now {self.config.lr:g}) with --set train.lr=..."
        if self.run is not None and saved is not None:
            hint = (f"resume with a lower learning rate: windtunnel train {self.experiment.task_name} --out {self.run.path} "
                    f"--resume --set train.lr={self.config.lr / 10:g}")
        return FloatingPointError(
            f"{what} at step {self.step} (loss {loss_value:.4g} nats, gradient norm {grad_norm:.4g}; {last}); {kept}; {hint}"
        )

    def fit(
        self,
        *,
        stop_at: int | None = None,
        progress: bool = False,
        on_eval: Callable[[int, dict[str, Calibration]], None] | None = None,
    ) -> TrainResult:
        """Train from the current step to ``config.steps`` (or to ``stop_at``, then checkpoint).

        ``on_eval(step, calibrations)``, when given, is called after each evaluation has been
        logged, with {split: Calibration} (a sweep reports them to Ray Tune as the trial trains).

        The loss, the gradient norm and the weights after each optimizer step are checked for
        every step; the first non-finite value stops the run. The checks read the values of the
        steps since the last read in one transfer, at every log, evaluation, checkpoint and probe
        step and at least every ``CHECK_EVERY`` steps, so that a GPU is not made to wait for the
        host after each step; the run stops at the same step with the same message as if each
        step had been read at once, later by at most those steps. No checkpoint holds a non-finite value,
        and a checkpoint at step 0 is written before the first step, so there is always a finite
        one to resume from. The run directory's lock is held until this returns.

        Raises:
            FloatingPointError: at the first non-finite loss, gradient norm or weight, in one
                line naming the step, the quantity, the checkpoint kept and the option to change.
            RunLockedError: when another process took the run directory meanwhile.
        """
        if self.run is not None:
            self.run.lock()
        try:
            if self.tensorboard:
                self.run.open_tensorboard()
            return self._fit(stop_at=stop_at, progress=progress, on_eval=on_eval)
        finally:
            self.close()

    def _fit(self, *, stop_at: int | None, progress: bool, on_eval: Callable[[int, dict[str, Calibration]], None] | None = None) -> TrainResult:
        cfg = self.config
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        probe_steps = set(telemetry_steps(cfg.steps)) if self.probes or self.update_probe is not None else set()
        start_time = time.perf_counter()
        elapsed_before = self.elapsed_s
        if self.run is not None and self.run.latest_checkpoint() is None:
            self._save(keep_every=False)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=self.step, desc=self.experiment.name or self.experiment.task_name, unit="step")
        last_eval: dict[str, Calibration] | None = None
        on_cuda = self.device.type == "cuda"
        checked = [p for p in self.model.parameters() if p.numel()]
        # (step, lr, n_out, [loss, aux loss, gradient norm, max |w|] on the device) of each step
        # not yet read back: :meth:`_check_steps` reads them in one transfer
        pending: list[tuple[int, float, int, torch.Tensor]] = []
        self.model.train()
        try:
            while self.step < end:
                if self.step in probe_steps:
                    self._run_probes()
                lr = learning_rate(self.step, cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                task = self._draw_task()
                batch = task.sample(cfg.batch_size, generator=self.data_generator).to(self.device, non_blocking=on_cuda)
                shifted = {"position_ids": self._shifted_position_ids(batch.tokens.shape)} if cfg.position_shift else {}
                watch = self.update_probe is not None and self.step in probe_steps and lr > 0  # at lr 0 nothing moves
                watching = self.update_probe.watch(self.model, batch.tokens, shifted.get("position_ids")) if watch else contextlib.nullcontext()
                with watching:
                    if on_cuda and cfg.compile:
                        torch.compiler.cudagraph_mark_step_begin()
                    # a watched step runs eagerly: the probe's hooks must see every module
                    loss, aux_loss, n_out = (self._losses if watch else self._step_losses)(batch, task, shifted)
                    self.optimizer.zero_grad(set_to_none=True)
                    (loss if aux_loss is None else loss + cfg.aux_loss_weight * aux_loss).backward()
                grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip is not None else math.inf)
                self.optimizer.step()
                values = [loss.detach(), aux_loss.detach() if aux_loss is not None else loss.new_zeros(()), grad_norm, self._weights_peak(checked)]
                pending.append((self.step, lr, n_out, torch.stack([v.to(torch.float64) for v in values])))
                if watch:
                    lr_value, loss_value, aux_value, grad_norm_value = self._check_steps(pending)
                    update_rows = self.update_probe.finish(self.model, lr).rows(self.step)
                    if self.run is not None:
                        self.run.log_telemetry(update_rows)
                self.step += 1
                self.elapsed_s = elapsed_before + time.perf_counter() - start_time
                logged = self.step % cfg.log_every == 0
                evaluated = self.step % cfg.eval_every == 0 or self.step == cfg.steps
                saved = self.step % cfg.checkpoint_every == 0 or self.step == end
                if pending and (logged or evaluated or saved or self.step in probe_steps or len(pending) >= CHECK_EVERY):
                    lr_value, loss_value, aux_value, grad_norm_value = self._check_steps(pending)
                if logged:
                    row = {"step": self.step, "split": "train", "loss_nats": loss_value, "lr": lr_value, "grad_norm": grad_norm_value, "elapsed_s": self.elapsed_s}
                    if aux_loss is not None:
                        row["aux_loss_nats"] = aux_value
                    self._log(row)
                if evaluated:
                    last_eval = self.evaluate()
                    for name, cal in last_eval.items():
                        self._log({"step": self.step, "split": name, **cal.scalars()})
                    if on_eval is not None:
                        on_eval(self.step, last_eval)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_value:.4f}", mae_bits=f"{float(last_eval['eval'].entropy_mae_bits):.4f}")
                elif bar is not None and logged:
                    bar.set_postfix(loss=f"{loss_value:.4f}")
                if saved:
                    self._save()
                if bar is not None:
                    bar.update(1)
            if self.step in probe_steps and self.step == cfg.steps:
                self._run_probes()
        finally:
            if bar is not None:
                bar.close()
        if last_eval is None:
            last_eval = self.evaluate()
        return TrainResult(step=self.step, final_loss_nats=self.last_loss, calibration=last_eval["eval"], wall_s=time.perf_counter() - start_time)


def flatten_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": x}} -> {"train.lr": x}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two nested dicts."""
    fa, fb = flatten_config(a), flatten_config(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def _progress_text(run: RunDir) -> str:
    """" (step S of N)" from the run's latest checkpoint, or "" when it cannot be read."""
    try:
        state = run.load_checkpoint()
        steps = run.read_config().get("train", {}).get("steps")
        return f" (step {int(state['step'])} of {steps})"
    except (ValueError, KeyError, TypeError):
        return ""


def _load_model_state(model: nn.Module, state: Any, source: str) -> None:
    """``model.load_state_dict(state, strict=True)``, with an error naming ``source``."""
    if not isinstance(state, dict):
        raise ValueError(f"Trainer: {source} holds no model state dict.")
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"Trainer: {source} does not hold this model's weights ({first}).") from None
