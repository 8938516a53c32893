"""Several seeds of one small model trained as one batched model: R replicas, one step.

A model of the sizes this package trains (2L/64 to 6L/192) leaves a GPU idle between its kernels:
its step costs the same at batch 32 and 256. :class:`ReplicaTrainer` trains R runs that differ
only in ``train.seed`` with one forward and one backward pass per step over parameters stacked
along a new leading replica axis (``torch.func.stack_module_state``; the model applied with
``torch.func.functional_call`` under ``torch.vmap``), so R seeds cost about one run's launches.

How equal to separate runs. Each replica's step applies the separate run's operations to its
slice of the stacked tensors; only a kernel that reduces in another order once its tensor has the
replica axis can round differently. On the CPU (tests/test_replicas.py: TinyGPT and the MLP,
bijection and HMM with the auxiliary loss and the position shift, 2 and 3 replicas; first steps
on 2 threads, trajectories on 1), every replica's gradients are the separate run's bit for bit,
and so, step after step (the same kernels on the same shapes), are its weights, AdamW state and
evaluations. That needs the embeddings' lookups to go through ``nn.functional.embedding``
(``models._layers.embedding_lookup``; indexing's backward rounded the stacked embedding
gradients otherwise on more than one thread), and TinyGPT's readout to be untied or to have 12 or
more outputs: a tied readout of 4 to 11 outputs (the bijection's vocabulary at n_values 2 to 5)
has its weight gradient summed in another order by the batched GEMM, a few ulps of its dot
products apart, and from there the trajectories separate as training carries the difference
forward. The logged training loss of a hard-label task can differ in its last bits:
``cross_entropy``'s batching rule sums the per-element losses in another order than its own mean
reduction (the gradient, 1/n per term, is the same). The cpu presets' models (bijection and HMM,
TinyGPT and MLP) had bitwise first-step gradients too. Other sizes can meet other kernels (a
reduction whose tensor crosses a threading threshold only when stacked), and on a GPU bitwise
equality was not checked: expect equality to float32 rounding there, with the differences
carried forward by training.

Everything per run is an ordinary :class:`~windtunnel.train.Trainer`: its run directory, lock,
config.json, generators, held-out sets, initial weights, logs, evaluations and checkpoints. Each
replica draws its batch from its own trainer's data generator in the order a separate run draws
it, so the data are those of the separate run, and every run directory is one that
:meth:`Trainer.resume <windtunnel.train.Trainer.resume>` continues alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from windtunnel.metrics import Calibration
from windtunnel.models._layers import check_position_ids
from windtunnel.probes import auxiliary_loss_nats, site_loss_nats
from windtunnel.runs import RunDir
from windtunnel.train import (
    CHECK_EVERY,
    ExperimentConfig,
    Probe,
    TrainResult,
    Trainer,
    config_differences,
    learning_rate,
    load_experiment,
    telemetry_steps,
    weight_decayed,
)

__all__ = ["REPLICA_MODELS", "ReplicaTrainer", "check_replicas"]

REPLICA_MODELS = ("transformer", "mlp")
"""The ``model_name`` values whose forward pass runs under ``torch.vmap`` (TinyGPT and the
position-wise MLP). The LSTM's ``nn.LSTM`` has no batching rule (vmap would loop over the
replicas) and the Hugging Face models are not built for it."""


def check_replicas(experiments: Sequence[ExperimentConfig]) -> None:
    """Refuse, in one line, R experiments that cannot train as one replica group.

    The experiments must be at least one, differ in ``train.seed`` only (``config_differences``
    names every other differing field), have distinct seeds, use a model of
    :data:`REPLICA_MODELS`, and leave out what a batched step cannot reproduce: dropout (each
    run's masks come from its own generator, which ``vmap`` cannot draw from per replica), more
    than one training length (``train_lengths``: each replica would draw another sequence
    length), and ``train.compile`` (the group step is not compiled).

    Raises:
        ValueError: naming the first rule broken and the offending value.
    """
    experiments = list(experiments)
    if not experiments or not all(isinstance(e, ExperimentConfig) for e in experiments):
        raise ValueError(f"ReplicaTrainer: experiments must be one or more ExperimentConfigs; got {experiments!r:.200}.")
    first = experiments[0]
    base = first.to_dict()
    for index, other in enumerate(experiments[1:], start=1):
        differ = [k for k in config_differences(base, other.to_dict()) if k != "train.seed"]
        if differ:
            raise ValueError(
                f"ReplicaTrainer: the replicas may differ only in train.seed; experiment {index} also differs "
                f"from experiment 0 in {', '.join(differ)}."
            )
    seeds = [e.train.seed for e in experiments]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"ReplicaTrainer: each replica needs its own train.seed; got seeds {seeds} ({', '.join(map(str, repeated))} repeated).")
    if first.model_name not in REPLICA_MODELS:
        raise ValueError(
            f"ReplicaTrainer: model {first.model_name!r} does not train as a replica group (torch.vmap); "
            f"use one of {', '.join(REPLICA_MODELS)}, or train the seeds as separate runs."
        )
    dropout = getattr(first.model_config(), "dropout", 0.0)
    if dropout:
        raise ValueError(
            f"ReplicaTrainer: model.dropout must be 0 (each run draws its masks from its own generator, which a "
            f"batched step cannot replay); got dropout={dropout}."
        )
    if first.train_lengths:
        raise ValueError(
            f"ReplicaTrainer: train_lengths must be empty (each replica would draw its own sequence length each "
            f"step); got {list(first.train_lengths)}."
        )
    if first.train.compile:
        raise ValueError("ReplicaTrainer: train.compile must be false (the replica group's step is not compiled); got true.")


class ReplicaTrainer:
    """Trains R runs that differ only in ``train.seed`` with one batched step (module docstring).

    Per step, with R replicas and the trainers' batch B and length T:

    * each replica r draws its task batch (tokens [B, T] and targets), and with
      ``train.position_shift`` its position ids [B, T], from trainer r's data generator, in a
      separate run's order; they are stacked to [R, B, T] (the ids' range is checked here, on the
      host, since values cannot be read inside ``vmap``);
    * the forward pass and the site (and auxiliary) loss run once under ``torch.vmap`` over the
      stacked parameters [R, *shape]: losses [R]; one backward pass of their sum gives each
      replica its own gradient (replica r's loss depends on its own slice only);
    * each replica's gradient is clipped alone, with the formula of ``nn.utils.clip_grad_norm_``:
      g_r <- g_r * min(1, c / (||g_r|| + 1e-6)), ||g_r|| the 2-norm of the 2-norms of its
      parameters' gradients (c = ``train.grad_clip``; inf when None);
    * one AdamW steps the stacked parameters, with the trainers' groups (weight decay on the
      matrices that are not embeddings) and the schedule of :func:`~windtunnel.train.learning_rate`.
      AdamW is elementwise, so each replica's slice moves as its own optimizer would move it.

    Each step's [loss, auxiliary loss, gradient norm, max |w|] of every replica is checked as
    :meth:`Trainer.fit <windtunnel.train.Trainer.fit>` checks them, read back in one transfer for
    the group. At every log, evaluation, checkpoint and probe step the stacked weights (and, to
    save, AdamW's exp_avg, exp_avg_sq and step) are copied into each trainer's model and optimizer
    and each trainer logs, evaluates, probes and saves itself: every run directory is the ordinary
    run a separate :class:`~windtunnel.train.Trainer` would write, up to the float rounding of the
    batched kernels (module docstring) and ``elapsed_s`` (the group's wall time). Evaluation is
    per run, not batched.

    Args:
        experiments: R configs equal except ``train.seed`` (:func:`check_replicas`).
        run_dirs: R run directories (or None each, or None for all: in memory).
        probes: per replica, the telemetry probes of its trainer (empty: none).
        overwrite: replace the runs the directories hold (as ``Trainer(overwrite=True)``).
        tensorboard: each trainer also writes TensorBoard event files (as for :class:`Trainer`).

    Attributes:
        trainers: the R :class:`~windtunnel.train.Trainer`, in the order of ``experiments``.

    Raises:
        ValueError: what :func:`check_replicas` refuses, ``run_dirs`` or ``probes`` of another
            length than ``experiments``, the same directory twice, and whatever
            :class:`~windtunnel.train.Trainer` refuses (checked before any directory is written
            for the first two kinds; a trainer that fails releases those built before it).
    """

    def __init__(
        self,
        experiments: Sequence[ExperimentConfig],
        run_dirs: Sequence[str | os.PathLike | RunDir | None] | None = None,
        *,
        probes: Sequence[Sequence[Probe]] = (),
        overwrite: bool = False,
        tensorboard: bool = False,
    ) -> None:
        experiments = list(experiments)
        check_replicas(experiments)
        run_dirs = _check_run_dirs(run_dirs, len(experiments))
        probes = _check_probes(probes, len(experiments))
        trainers: list[Trainer] = []
        try:
            for experiment, run_dir, own in zip(experiments, run_dirs, probes):
                trainers.append(Trainer(experiment, run_dir, probes=own, overwrite=overwrite, tensorboard=tensorboard))
        except BaseException:
            for trainer in trainers:
                trainer.close()
            raise
        self._adopt(trainers)

    @classmethod
    def resume(
        cls,
        run_dirs: Sequence[str | os.PathLike | RunDir],
        *,
        probes: Sequence[Sequence[Probe]] = (),
        changes: dict[str, Any] | None = None,
        tensorboard: bool = False,
    ) -> ReplicaTrainer:
        """Continue R runs as one group, each from its latest checkpoint
        (:meth:`Trainer.resume <windtunnel.train.Trainer.resume>`, with the same ``changes``).

        Raises:
            ValueError: what :func:`check_replicas` refuses of the runs' configs, and latest
                checkpoints at different steps (naming them: resume each run alone, or stop the
                group at a common step first), besides what ``Trainer.resume`` refuses.
        """
        runs = [RunDir(r) if not isinstance(r, RunDir) else r for r in _check_run_dirs(run_dirs, len(list(run_dirs)))]
        if any(r is None for r in runs):
            raise ValueError("ReplicaTrainer.resume: every replica needs its run directory; got None.")
        check_replicas([load_experiment(run) for run in runs])
        probes = _check_probes(probes, len(runs))
        trainers: list[Trainer] = []
        try:
            for run, own in zip(runs, probes):
                trainers.append(Trainer.resume(run, probes=own, changes=changes, tensorboard=tensorboard))
            steps = [t.step for t in trainers]
            if len(set(steps)) > 1:
                where = ", ".join(f"{t.run.path}: step {t.step}" for t in trainers)
                raise ValueError(
                    f"ReplicaTrainer.resume: the runs' latest checkpoints must be at one step to continue as a group; "
                    f"got {where}. Resume each run alone."
                )
        except BaseException:
            for trainer in trainers:
                trainer.close()
            raise
        group = cls.__new__(cls)
        group._adopt(trainers)
        return group

    def _adopt(self, trainers: list[Trainer]) -> None:
        self.trainers = trainers
        self.config = trainers[0].config
        self.device = trainers[0].device
        self.task = trainers[0].task
        first = trainers[0].model
        # the module whose forward ``functional_call`` runs with the stacked weights: a copy without
        # storage (on the meta device), so that nothing of replica 0 is read by mistake
        self._skeleton = _meta_copy(first)
        self._names = [name for name, _ in first.named_parameters()]
        self._decay = {name for name, p in first.named_parameters() if weight_decayed(name, p)}

    @property
    def step(self) -> int:
        """The group's step: the last completed step, the same for every replica."""
        return self.trainers[0].step

    @property
    def seeds(self) -> list[int]:
        """Each replica's ``train.seed``."""
        return [t.config.seed for t in self.trainers]

    def close(self) -> None:
        """Release every run directory's lock (:meth:`fit` does it when it returns)."""
        for trainer in self.trainers:
            trainer.close()

    # --- the stacked state ------------------------------------------------------------------

    def _stack(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.optim.AdamW]:
        """The trainers' weights stacked to [R, *shape] leaves, their buffers, and one AdamW over
        the stacked weights holding the trainers' AdamW state (stacked the same way)."""
        models = [t.model for t in self.trainers]
        params, buffers = stack_module_state(models)
        cfg = self.config
        groups = [
            {"params": [params[n] for n in self._names if n in self._decay], "weight_decay": cfg.weight_decay},
            {"params": [params[n] for n in self._names if n not in self._decay], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=learning_rate(self.step, cfg), betas=cfg.betas)
        own = [dict(t.model.named_parameters()) for t in self.trainers]
        for name in self._names:
            states = [t.optimizer.state.get(own_params[name]) for t, own_params in zip(self.trainers, own)]
            if all(not s for s in states):
                continue
            if not all(states):
                raise ValueError(f"ReplicaTrainer: the replicas' AdamW states differ in which parameters they hold ({name}).")
            steps = {float(s["step"]) for s in states}
            if len(steps) > 1:
                raise ValueError(f"ReplicaTrainer: the replicas' AdamW step counts differ ({sorted(steps)}) for {name}.")
            optimizer.state[params[name]] = {
                "step": states[0]["step"].clone(),
                "exp_avg": torch.stack([s["exp_avg"] for s in states]),
                "exp_avg_sq": torch.stack([s["exp_avg_sq"] for s in states]),
            }
        return params, buffers, optimizer

    @torch.no_grad()
    def _copy_back(self, params: dict[str, torch.Tensor], optimizer: torch.optim.AdamW | None) -> None:
        """Copy replica r's slice of the stacked weights into trainer r's model; with
        ``optimizer``, also its AdamW state and learning rate into trainer r's optimizer."""
        for r, trainer in enumerate(self.trainers):
            own = dict(trainer.model.named_parameters())
            for name in self._names:
                own[name].copy_(params[name][r])
            if optimizer is None:
                continue
            for name in self._names:
                state = optimizer.state.get(params[name])
                if state:
                    trainer.optimizer.state[own[name]] = {
                        "step": state["step"].clone(),
                        "exp_avg": state["exp_avg"][r].clone(),
                        "exp_avg_sq": state["exp_avg_sq"][r].clone(),
                    }
            for group in trainer.optimizer.param_groups:
                group["lr"] = optimizer.param_groups[0]["lr"]

    # --- one step ---------------------------------------------------------------------------

    def _draw(self) -> tuple[type, dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        """Each replica's batch from its trainer's data generator, stacked: (the batch's class;
        its fields but ``sites``, each [R, B, ...]; ``sites`` long [n_sites], shared;
        {"position_ids": long [R, B, T]} with ``position_shift``, else {}), on the device."""
        cfg = self.config
        on_cuda = self.device.type == "cuda"
        batches, ids = [], []
        for trainer in self.trainers:
            batch = trainer.task.sample(cfg.batch_size, generator=trainer.data_generator)
            batches.append(batch)
            if cfg.position_shift:
                ids.append(trainer._shifted_position_ids(batch.tokens.shape).cpu())
        sites = batches[0].sites
        if any(not torch.equal(b.sites, sites) for b in batches[1:]):
            raise ValueError("ReplicaTrainer: the replicas' batches score different sites; the task must fix its sites.")
        fields = {
            f.name: _to_device(torch.stack([getattr(b, f.name) for b in batches]), self.device, on_cuda)
            for f in dataclasses.fields(batches[0])
            if f.name != "sites"
        }
        extra = {}
        if ids:
            stacked = torch.stack(ids)  # [R, B, T]
            r, b, t = stacked.shape
            # the model's own range check, here on the host: inside vmap no value can be read
            check_position_ids("ReplicaTrainer", stacked.reshape(r * b, t), torch.empty(r * b, t, dtype=torch.long), self.trainers[0].model.config.n_positions)
            extra["position_ids"] = _to_device(stacked, self.device, on_cuda)
        return type(batches[0]), fields, _to_device(sites, self.device, on_cuda), extra

    def _losses_fn(self, batch_type: type) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """The replicas' (site losses [R], auxiliary losses [R] or zeros) from the stacked weights
        and batches: the forward pass and the losses of ``Trainer._losses`` for one replica,
        under ``torch.vmap`` (weights, buffers, fields and ids batched; ``sites`` shared)."""
        skeleton, task = self._skeleton, self.task
        with_aux = self.config.aux_loss_weight > 0

        def losses(params, buffers, fields, sites, extra):
            logits = functional_call(skeleton, (params, buffers), (fields["tokens"],), extra)
            batch = batch_type(sites=sites, **fields)
            loss = site_loss_nats(logits, batch, task)
            aux = auxiliary_loss_nats(logits, batch, task) if with_aux else torch.zeros_like(loss)
            return loss, aux

        return torch.vmap(losses, in_dims=(0, 0, 0, None, 0))

    def _backward(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], vmapped: dict[type, Callable[..., tuple[torch.Tensor, torch.Tensor]]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's batches (:meth:`_draw`), forward pass and backward pass: each replica's
        unclipped gradient accumulated into ``params[name].grad`` [R, *shape]; returns the site
        losses [R] and auxiliary losses [R] (zeros without them). ``vmapped`` caches the vmapped
        losses per batch class."""
        batch_type, fields, sites, extra = self._draw()
        if batch_type not in vmapped:
            vmapped[batch_type] = self._losses_fn(batch_type)
        loss, aux_loss = vmapped[batch_type](params, buffers, fields, sites, extra)
        weight = self.config.aux_loss_weight
        (loss if weight == 0 else loss + weight * aux_loss).sum().backward()
        return loss, aux_loss

    @staticmethod
    def _clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip each replica's gradient alone as ``nn.utils.clip_grad_norm_`` clips one run's
        (2-norm of the parameters' 2-norms; coefficient min(1, max_norm / (norm + 1e-6))); the
        replicas' norms before clipping [R]."""
        grads = [p.grad for p in params if p.grad is not None]
        # [R, n_params]: each replica's norms contiguous, so that its total is reduced in the order
        # of clip_grad_norm_'s over one run's norms (a reduction down a column is not: it rounds
        # differently)
        norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), 2.0, dim=1) for g in grads], dim=1)
        total = torch.linalg.vector_norm(norms, 2.0, dim=1)  # [R]
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.reshape(-1, *([1] * (g.dim() - 1))))
        return total

    @staticmethod
    def _peaks(params: list[torch.Tensor]) -> torch.Tensor:
        """max |w| of each replica [R] (NaN and inf propagate, as in ``Trainer._weights_peak``)."""
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.detach().flatten(1), math.inf, dim=1) for p in params if p[0].numel()], dim=1),
            math.inf, dim=1,
        )

    # --- the loop ---------------------------------------------------------------------------

    def fit(
        self,
        *,
        stop_at: int | None = None,
        progress: bool = False,
        on_eval: Callable[[int, int, dict[str, Calibration]], None] | None = None,
    ) -> list[TrainResult]:
        """Train every replica from the group's step to ``config.steps`` (or to ``stop_at``, then
        checkpoint each), as :meth:`Trainer.fit <windtunnel.train.Trainer.fit>` trains one run.

        ``on_eval(replica, step, calibrations)`` is called after each replica's evaluation has
        been logged. Each run directory's lock is held until this returns.

        Returns:
            one :class:`~windtunnel.train.TrainResult` per replica, in order.

        Raises:
            FloatingPointError: at the first non-finite (or diverged) value of any replica (the
                earliest step; the first replica at that step), with that run's one-line message
                of ``Trainer.fit`` after "seed S:". The other replicas stop there too; each run
                directory keeps its last finite checkpoint and resumes alone or as a group.
            RunLockedError: when another process took a run directory meanwhile.
        """
        try:
            for trainer in self.trainers:
                if trainer.run is not None:
                    trainer.run.lock()
                if trainer.tensorboard:
                    trainer.run.open_tensorboard()
            return self._fit(stop_at=stop_at, progress=progress, on_eval=on_eval)
        finally:
            self.close()

    def _fit(self, *, stop_at: int | None, progress: bool, on_eval: Callable[[int, int, dict[str, Calibration]], None] | None) -> list[TrainResult]:
        cfg = self.config
        trainers = self.trainers
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        probe_steps = set(telemetry_steps(cfg.steps)) if any(t.probes for t in trainers) else set()
        start_time = time.perf_counter()
        elapsed_before = [t.elapsed_s for t in trainers]
        for trainer in trainers:
            if trainer.run is not None and trainer.run.latest_checkpoint() is None:
                trainer._save(keep_every=False)
        params, buffers, optimizer = self._stack()
        ordered = [params[n] for n in self._names]
        n_out = self._skeleton.config.n_outputs  # the logits' last dimension
        vmapped: dict[type, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}
        clip = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=self.step, desc=f"{trainers[0].experiment.name or trainers[0].experiment.task_name} x{len(trainers)}", unit="step")
        last_eval: list[dict[str, Calibration] | None] = [None] * len(trainers)
        synced = True  # the trainers' models hold the stacked weights
        # (step, lr, n_out, [R, 4] of [loss, aux loss, gradient norm, max |w|]) of each step not read back
        pending: list[tuple[int, float, int, torch.Tensor]] = []
        step = self.step
        values = [(math.nan,) * 4] * len(trainers)
        try:
            while step < end:
                if step in probe_steps:
                    if not synced:
                        self._copy_back(params, None)
                        synced = True
                    for trainer in trainers:
                        trainer._run_probes()
                lr = learning_rate(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                loss, aux_loss = self._backward(params, buffers, vmapped)
                grad_norm = self._clip(ordered, clip)
                optimizer.step()
                synced = False
                row = torch.stack([loss.detach(), aux_loss.detach(), grad_norm, self._peaks(ordered)], dim=1)  # [R, 4]
                pending.append((step, lr, n_out, row.to(torch.float64)))
                step += 1
                for trainer, before in zip(trainers, elapsed_before):
                    trainer.step = step
                    trainer.elapsed_s = before + time.perf_counter() - start_time
                logged = step % cfg.log_every == 0
                evaluated = step % cfg.eval_every == 0 or step == cfg.steps
                saved = step % cfg.checkpoint_every == 0 or step == end
                if pending and (logged or evaluated or saved or step in probe_steps or len(pending) >= CHECK_EVERY):
                    values = self._check(pending)
                if saved:
                    self._copy_back(params, optimizer)
                    synced = True
                elif (evaluated or step in probe_steps) and not synced:
                    self._copy_back(params, None)
                    synced = True
                for r, trainer in enumerate(trainers):
                    lr_value, loss_value, aux_value, grad_norm_value = values[r]
                    if logged:
                        row_out = {"step": step, "split": "train", "loss_nats": loss_value, "lr": lr_value, "grad_norm": grad_norm_value, "elapsed_s": trainer.elapsed_s}
                        if cfg.aux_loss_weight > 0:
                            row_out["aux_loss_nats"] = aux_value
                        trainer._log(row_out)
                    if evaluated:
                        last_eval[r] = trainer.evaluate()
                        for name, cal in last_eval[r].items():
                            trainer._log({"step": step, "split": name, **cal.scalars()})
                        if on_eval is not None:
                            on_eval(r, step, last_eval[r])
                    if saved:
                        trainer._save()
                if bar is not None:
                    if logged:
                        bar.set_postfix(loss=" ".join(f"{v[1]:.4f}" for v in values))
                    bar.update(1)
            if step in probe_steps and step == cfg.steps:
                if not synced:
                    self._copy_back(params, None)
                for trainer in trainers:
                    trainer._run_probes()
        finally:
            if bar is not None:
                bar.close()
        results = []
        for r, trainer in enumerate(trainers):
            calibration = last_eval[r] if last_eval[r] is not None else trainer.evaluate()
            results.append(TrainResult(step=trainer.step, final_loss_nats=trainer.last_loss, calibration=calibration["eval"], wall_s=time.perf_counter() - start_time))
        return results

    def _check(self, pending: list[tuple[int, float, int, torch.Tensor]]) -> list[tuple[float, float, float, float]]:
        """Read back the pending steps of every replica in one transfer and check each replica's
        steps with its trainer's ``_check_steps`` (the order and messages of a separate run).
        Returns each replica's (lr, loss, auxiliary loss, gradient norm) of the last step.

        Raises:
            FloatingPointError: the earliest failure over the replicas (first replica on a tie),
                "seed S: " before its trainer's message.
        """
        host = torch.stack([v for *_, v in pending]).cpu()  # [n_steps, R, 4], one sync
        out, failures = [], []
        for r, trainer in enumerate(self.trainers):
            mine = [(step, lr, n_out, host[i, r]) for i, (step, lr, n_out, _) in enumerate(pending)]
            try:
                out.append(trainer._check_steps(mine))
            except FloatingPointError as err:
                failures.append((trainer.step, r, err))
        pending.clear()
        if failures:
            _, r, err = min(failures, key=lambda f: (f[0], f[1]))
            raise FloatingPointError(f"seed {self.trainers[r].config.seed}: {err}") from None
        return out


def _to_device(tensor: torch.Tensor, device: torch.device, on_cuda: bool) -> torch.Tensor:
    """``tensor`` on ``device``; to CUDA from page-locked memory, without a host wait."""
    if on_cuda and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers are on the meta device."""
    import copy

    skeleton = copy.deepcopy(model)
    return skeleton.to("meta")


def _check_run_dirs(run_dirs: Any, n: int) -> list[Any]:
    """``run_dirs`` as a list of R entries (None for all in memory); refuses another length and
    the same directory twice."""
    if run_dirs is None:
        return [None] * n
    run_dirs = list(run_dirs)
    if len(run_dirs) != n:
        raise ValueError(f"ReplicaTrainer: run_dirs must hold one directory (or None) per replica, {n}; got {len(run_dirs)}.")
    paths = [os.path.abspath(r.path if isinstance(r, RunDir) else r) for r in run_dirs if r is not None]
    repeated = sorted({p for p in paths if paths.count(p) > 1})
    if repeated:
        raise ValueError(f"ReplicaTrainer: each replica needs its own run directory; got {repeated[0]} more than once.")
    return run_dirs


def _check_probes(probes: Sequence[Sequence[Probe]], n: int) -> list[list[Probe]]:
    """Per-replica probe lists (empty: none for every replica)."""
    probes = [list(p) for p in probes]
    if not probes:
        return [[] for _ in range(n)]
    if len(probes) != n:
        raise ValueError(f"ReplicaTrainer: probes must hold one list of probes per replica, {n}; got {len(probes)}.")
    return probes
