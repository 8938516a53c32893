"""Telemetry and ablations for a run: attach the probes of docs/theory.md §8 to a Trainer; ablate a trained run (§8.5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import windtunnel.sites as sites
from windtunnel.probes import ValueUpdateProbe, ablation_table, hmm_lag_map, make_probes
from windtunnel.runs import RunDir, write_json_atomic
from windtunnel.tasks import HMMFiltering
from windtunnel.train import Trainer, seed_streams

__all__ = ["ablate_run", "attach_probes"]


def attach_probes(trainer: Trainer, *, n_sequences: int = 128, save_snapshots: bool = True) -> Trainer:
    """Give ``trainer`` the geometry, routing-law and calibration probes of :func:`make_probes`,
    and for a transformer (TinyGPT or ``hf``) the :class:`~windtunnel.probes.ValueUpdateProbe` of
    the training steps.

    The probe batch (``n_sequences`` sequences) and the entropy probe's split come from the run's
    "probe" seed stream, and the §8.1 baseline is the model rebuilt from the "init" stream (the
    step-0 model), so neither touches the training data stream. With a run directory, the probes
    also save log-spaced weight snapshots and manifold projections there. Returns ``trainer``.
    """
    experiment = trainer.experiment
    seeds = seed_streams(experiment.train.seed)
    probe_generator = torch.Generator().manual_seed(seeds["probe"])
    batch = trainer.task.sample(n_sequences, generator=probe_generator).to(trainer.device)
    baseline = None
    if experiment.model_name == "transformer":
        baseline = experiment.build_model(torch.Generator().manual_seed(seeds["init"])).to(trainer.device)
    trainer.probes = make_probes(
        trainer.task,
        eval_batch=batch,
        baseline_model=baseline,
        generator=torch.Generator().manual_seed(seeds["probe"]),
        run_dir=trainer.run.path if trainer.run is not None else None,
        save_snapshots=save_snapshots,
    )
    if experiment.model_name in ("transformer", "hf"):
        trainer.update_probe = ValueUpdateProbe()
    return trainer


def ablate_run(run_dir: str | Path, *, n_sequences: int = 2000, seed: int = 12345, batch_size: int = 500) -> dict[str, Any]:
    """Ablation table of a run's latest checkpoint on fresh seeded sequences; writes ablation.json.

    For an HMM run it also holds ``lag_map`` (:func:`~windtunnel.probes.hmm_lag_map` on up to 200
    further sequences): which heads carry which lags of the observation history."""
    from windtunnel.experiments.evaluation import load_model

    experiment, model, step = load_model(run_dir)
    reason = sites.unsupported(model, "ablation")
    if reason is not None:
        raise ValueError(
            f"ablate_run: needs a run whose model can be ablated (a transformer or hf run); {run_dir} "
            f"holds a {experiment.model_name!r} model: {reason}"
        )
    task = experiment.build_task()
    generator = torch.Generator().manual_seed(seed)
    batches = [task.sample(min(batch_size, n_sequences - i), generator=generator) for i in range(0, n_sequences, batch_size)]
    out = {"step": step, "n_sequences": n_sequences, "seed": seed, **ablation_table(model, task, batches).to_dict()}
    if isinstance(task, HMMFiltering) and task.n_symbols >= 2:
        lag_batch = task.sample(min(n_sequences, 200), generator=generator)
        out["lag_map"] = hmm_lag_map(model, task, lag_batch, generator=torch.Generator().manual_seed(seed))
    write_json_atomic(RunDir(run_dir).ablation_path, out)
    return out
