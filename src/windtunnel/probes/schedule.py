"""Trainer probes: every instrument as a ``probe(model, step) -> rows`` callable (docs/theory.md §8)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from windtunnel.probes._common import Row, _replayer, _row, _supported
from windtunnel.probes.calibration import calibrate
from windtunnel.probes.geometry import geometry_snapshot
from windtunnel.probes.manifold import manifold_projection
from windtunnel.probes.memory import hmm_lag_response
from windtunnel.probes.routing import routing_law_stats
from windtunnel.probes.states import collect_states
from windtunnel.runs import RunDir, write_json_atomic
from windtunnel.tasks import Batch, HMMFiltering

__all__ = ["make_probes"]


def make_probes(
    task: Any,
    *,
    eval_batch: Batch,
    baseline_model: nn.Module | None = None,
    generator: torch.Generator | None = None,
    run_dir: str | Path | None = None,
    save_snapshots: bool = True,
) -> list[Callable[[nn.Module, int], list[Row]]]:
    """Trainer probes: geometry (§8.1–8.3), routing law (§8.4) and calibration on a fixed batch;
    for the HMM also the memory probe, :func:`hmm_lag_response` at every probed step (rows
    ``model_move_tv_lag{d}``, ``bayes_move_tv_lag{d}``, ``response_error_tv_lag{d}``), which shows
    the lags of the observation history being learned one after another.

    Each probe is ``probe(model, step) -> rows`` of {step, layer, head, metric, value} (layer and
    head None where not applicable). The geometry probe runs on every model with attention sites
    and a readout, the routing-law probe on every model with attention sites (TinyGPT, Hugging
    Face causal LMs, TransformerLens; :func:`windtunnel.sites.unsupported`), and both emit nothing
    for other models (the MLP and LSTM baselines); key orthogonality is left out of the geometry
    rows where the model's adapter has no key map (Hugging Face). ``generator`` seeds the entropy probe's 80/20 split: its state is
    captured once, so every step uses the same split. With ``run_dir``, the geometry probe also
    writes the 2-D projection of the value manifold to ``RUN_DIR/manifold/step_N.json`` and, with
    ``save_snapshots``, the model weights to ``RUN_DIR/snapshots/step_N.pt`` (the log-spaced
    checkpoints the frame–precision dissociation of §8.6 reads).
    """
    split = _replayer(generator)
    out_dir = RunDir(run_dir) if run_dir is not None else None

    def geometry_probe(model: nn.Module, step: int) -> list[Row]:
        if not _supported(model, "sites", "readout"):
            return []
        states = collect_states(model, task, eval_batch)
        snap = geometry_snapshot(model, task, eval_batch, baseline_model=baseline_model, generator=split(), states=states)
        if out_dir is not None:
            write_json_atomic(out_dir.manifold_path(step), {"step": step, **manifold_projection(states)})
            if save_snapshots:
                out_dir.save_snapshot(step, {"step": step, "model": model.state_dict()})
        return snap.rows(step)

    def routing_probe(model: nn.Module, step: int) -> list[Row]:
        if not _supported(model, "sites"):
            return []
        return routing_law_stats(model, task, eval_batch).rows(step)

    def calibration_probe(model: nn.Module, step: int) -> list[Row]:
        cal = calibrate(model, task, [eval_batch])
        return [
            _row(step, "probe_entropy_mae_bits", cal.entropy_mae_bits),
            _row(step, "probe_kl_bits", cal.kl_bits),
            _row(step, "probe_accuracy", cal.accuracy),
        ]

    def memory_probe(model: nn.Module, step: int) -> list[Row]:
        replay = split()  # the same observation changes at every step, so the curves compare
        lag = hmm_lag_response(model, task, eval_batch, generator=replay if replay is not None else torch.Generator().manual_seed(0))
        return [
            _row(step, f"{name}_lag{d}", value)
            for name in ("model_move_tv", "bayes_move_tv", "response_error_tv")
            for d, value in zip(lag["lags"], lag[name])
        ]

    probes = [geometry_probe, routing_probe, calibration_probe]
    if isinstance(task, HMMFiltering) and task.n_symbols >= 2:
        probes.append(memory_probe)
    return probes
