"""Frame–precision dissociation (docs/theory.md §3.4, §8.6): does the frame settle before the precision?

Reads a run directory's saved models (``snapshots/step_N.pt`` written by the telemetry probes on
the log-spaced §8.6 schedule, ``checkpoints/step_N.pt`` written by the Trainer, and step 0
rebuilt from the config's seed), measures on one fixed batch per checkpoint

* frame: per-layer attention-map JS divergence to the final checkpoint, layer-0 key
  orthogonality, the layer-0 ``W_K`` frame-subspace overlap to the final checkpoint ÷ null;
* precision: value-manifold PC1 share, Spearman, ordering score, entropy-probe R², and the
  separation of the lowest entropy levels (bijection);
* calibration: entropy MAE and KL in bits;

and the settling step of each, then writes ``dissociation.json``, ``dissociation.png`` and the
2-D manifold projections ``manifold/step_N.json``. Run: ``windtunnel dissociation RUN_DIR``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import torch

import windtunnel.sites as sites
from windtunnel._progress import track
from windtunnel.geometry import (
    ValueManifoldPCA,
    attention_js_divergence_bits,
    frame_subspace_overlap,
    level_separation,
    settling_step,
)
from windtunnel.probes import (
    calibrate,
    collect_states,
    geometry_snapshot,
    manifold_projection,
)
from windtunnel.reports.figures import metric_label, plain_log_ticks
from windtunnel.runs import RunDir, write_bytes_atomic, write_json_atomic
from windtunnel.train import ExperimentConfig, load_experiment, seed_streams

__all__ = ["FRAME_METRICS", "PRECISION_METRICS", "load_checkpoints", "run_dissociation"]

FRAME_METRICS = ("js_to_final_bits_layer0", "key_ortho_layer0", "frame_overlap_ratio")
PRECISION_METRICS = ("pc1_share", "spearman", "ordering_score", "entropy_mae_bits", "kl_bits")
LOW_LEVELS = (1.0, math.log2(3.0), 2.0)


def load_checkpoints(run_dir: str | Path) -> tuple[ExperimentConfig, dict[int, dict[str, torch.Tensor]]]:
    """(experiment, {step: model state dict}) from snapshots/, checkpoints/ and the seed (step 0).

    A run started ``--init-from`` another began from that run's weights, not from the seed's
    model, so step 0 is left out unless a snapshot or checkpoint holds it."""
    run = RunDir(run_dir)
    experiment = load_experiment(run)
    states: dict[int, dict[str, torch.Tensor]] = {}
    for step, path in [*run.snapshots(), *run.checkpoints()]:
        state = run.load_checkpoint(path)  # verified; refuses unsafe or damaged files by name
        if not isinstance(state.get("model"), dict):
            raise ValueError(f"load_checkpoints: {path} holds no model weights.")
        states[step] = state["model"]
    if 0 not in states and experiment.init_from is None:
        init = torch.Generator().manual_seed(seed_streams(experiment.train.seed)["init"])
        states[0] = experiment.build_model(init).state_dict()
    return experiment, dict(sorted(states.items()))


def _w_key(model: torch.nn.Module) -> torch.Tensor | None:
    """Layer 0's key projection [d_model, head * d_head], or None when the model's adapter has no
    key map (a Hugging Face model; see :func:`windtunnel.sites.unsupported`)."""
    if sites.unsupported(model, "token_keys") is not None:
        return None
    w = sites.token_keys(model, torch.arange(1))[0].w_key  # [head, d_model, d_head], float64
    return w.permute(1, 0, 2).reshape(w.shape[1], -1)


def run_dissociation(
    run_dir: str | Path, *, n_sequences: int = 256, seed: int | None = None, r: int = 8, rel_tol: float = 0.1
) -> dict[str, Any]:
    """Measure every checkpoint of a run and write dissociation.json / .png (docs/theory.md §8.6).

    Settling step: the first logged step after which a metric stays within ``rel_tol`` of its
    final value (``geometry.settling_step``). The JS divergence to the final checkpoint is 0 at
    the end by construction, so its band is absolute: ``rel_tol`` × its value at step 0.
    The batch is drawn from ``seed`` (default: the run's "probe" stream, the telemetry batch).

    Raises:
        ValueError: when the run's model has no attention sites or readout (an MLP or LSTM run) or
            fewer than 2 models are saved. A model without a key map (a Hugging Face
            architecture) gets None for key orthogonality and the frame overlap.
    """
    experiment, states = load_checkpoints(run_dir)
    reason = sites.unsupported(experiment.build_model(None), "readout")
    if reason is not None:
        raise ValueError(
            f"run_dissociation: needs a run whose model has attention sites and a readout (a transformer "
            f"or hf run); {run_dir} holds a {experiment.model_name!r} model: {reason}"
        )
    if len(states) < 2:
        raise ValueError(f"run_dissociation: {run_dir} needs at least 2 saved models; found steps {list(states)}.")
    task = experiment.build_task()
    seed = seed_streams(experiment.train.seed)["probe"] if seed is None else seed
    batch = task.sample(n_sequences, generator=torch.Generator().manual_seed(seed))

    def model_at(step: int) -> torch.nn.Module:
        model = experiment.build_model(None)
        model.load_state_dict(states[step], strict=True)
        return model.eval()

    steps = list(states)
    final = model_at(steps[-1])
    final_states = collect_states(final, task, batch)
    final_wk = _w_key(final)
    run = RunDir(run_dir)
    series: dict[str, list[float | None]] = {}

    def put(name: str, value: Any) -> None:
        series.setdefault(name, []).append(None if value is None or not math.isfinite(float(value)) else float(value))

    for step in track(steps, desc="dissociation: saved models", unit="model"):
        model = model_at(step)
        st = collect_states(model, task, batch)
        snap = geometry_snapshot(model, task, batch, states=st, generator=torch.Generator().manual_seed(seed))
        js = attention_js_divergence_bits(st.patterns.double(), final_states.patterns.double(), st.positions)
        for layer, value in enumerate(js.tolist()):
            put(f"js_to_final_bits_layer{layer}", value)
        put("js_to_final_bits_mean", js.mean())
        ko = snap.key_orthogonality
        put("key_ortho_layer0", ko[0].mean_abs_cosine if ko else None)
        put("key_ortho_layer0_min_head", ko[0].min_abs_cosine if ko else None)
        w_key = _w_key(model)
        put("frame_overlap_ratio", None if w_key is None else frame_subspace_overlap(w_key, final_wk, r=r).ratio_to_null)
        put("focusing_ratio", snap.focusing_ratio)
        for name in ("pc1_share", "pc12_share", "spearman", "ordering_score", "probe_r2", "participation_ratio"):
            put(name, getattr(snap.manifold, name))
        x, h, _ = st.flat()
        try:
            sep = level_separation(ValueManifoldPCA().fit(x, h).pc1_scores_, h, LOW_LEVELS)
            put("level_separation_min", sep.abs().min())
        except ValueError:
            put("level_separation_min", None)
        cal = calibrate(model, task, [batch])
        put("entropy_mae_bits", cal.entropy_mae_bits)
        put("kl_bits", cal.kl_bits)
        write_json_atomic(run.manifold_path(step), {"step": step, **manifold_projection(st)})

    settling: dict[str, int | None] = {}
    for name, values in series.items():
        if values[-1] is None:
            settling[name] = None
            continue
        vals = [math.nan if v is None else v for v in values]
        abs_tol = rel_tol * abs(vals[0]) if name.startswith("js_to_final") and math.isfinite(vals[0]) else 0.0
        settling[name] = settling_step(steps, vals, rel_tol=rel_tol, abs_tol=abs_tol)
    frame = [settling[m] for m in FRAME_METRICS if settling.get(m) is not None]
    precision = [settling[m] for m in ("entropy_mae_bits", "kl_bits") if settling.get(m) is not None]
    out = {
        "run_dir": str(run_dir),
        "steps": steps,
        "n_sequences": n_sequences,
        "seed": seed,
        "rel_tol": rel_tol,
        "frame_overlap_r": r,
        "metrics": series,
        "settling_step": settling,
        "frame_settled_by": max(frame) if frame else None,
        "precision_settled_by": max(precision) if precision else None,
        "frame_settles_first": (max(frame) < min(precision)) if frame and precision else None,
        "mae_improvement_after_frame": _improvement(steps, series["entropy_mae_bits"], max(frame) if frame else None),
    }
    write_json_atomic(run.dissociation_path, out)
    write_bytes_atomic(run.dissociation_figure_path, _figure(out, title=experiment.name or experiment.task_name))
    return out


def _improvement(steps: list[int], mae: list[float | None], at: int | None) -> float | None:
    """MAE at step ``at`` ÷ final MAE (how much calibration improved after the frame settled)."""
    if at is None or mae[-1] in (None, 0.0) or mae[steps.index(at)] is None:
        return None
    return mae[steps.index(at)] / mae[-1]


def _distance_to_final(values: list[float | None]) -> list[float]:
    """|v - v_final| / max_t |v_t - v_final|: 1 at the farthest checkpoint, 0 at the last."""
    vf = values[-1]
    if vf is None:
        return [math.nan] * len(values)
    gaps = [math.nan if v is None else abs(v - vf) for v in values]
    top = max((g for g in gaps if math.isfinite(g)), default=0.0)
    return [g / top if top > 0 else 0.0 for g in gaps]


def _figure(result: dict[str, Any], *, title: str) -> bytes:
    from matplotlib.figure import Figure

    steps = [max(s, 0.5) for s in result["steps"]]  # step 0 drawn at 0.5 on the log axis
    metrics, settle = result["metrics"], result["settling_step"]
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax, ax_mae = fig.subplots(1, 2)
    names = [m for m in (*FRAME_METRICS, "pc1_share", "spearman", "entropy_mae_bits") if m in metrics]
    for name in names:
        style = "-" if name in FRAME_METRICS else "--"
        line = ax.plot(steps, _distance_to_final(metrics[name]), style, marker=".", label=metric_label(name))[0]
        if settle.get(name) is not None:
            ax.axvline(max(settle[name], 0.5), color=line.get_color(), alpha=0.4, lw=1)
    ax.set(xscale="log", xlabel="step (0 drawn at 0.5)", ylabel="distance to the final value (1 = farthest)",
           title="frame (solid) vs precision (dashed)\nvertical lines: settling steps")
    ax.legend(fontsize=7)
    mae = [math.nan if v is None else max(v, 1e-6) for v in metrics["entropy_mae_bits"]]
    ax_mae.plot(steps, mae, marker=".", color="k", label="entropy MAE (bits)")
    if result["frame_settled_by"] is not None:
        ax_mae.axvline(max(result["frame_settled_by"], 0.5), color="C0", ls=":", label="frame settled")
    ax_mae.set(xscale="log", yscale="log", xlabel="step", ylabel="bits", title="calibration after the frame settles")
    ax_mae.legend(fontsize=7)
    for a in (ax, ax_mae):
        a.grid(alpha=0.3)
        plain_log_ticks(a)
    first = result["frame_settles_first"]
    fig.suptitle(f"{title}: the frame settles first: {'yes' if first else 'no' if first is not None else 'undetermined'}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    """``python -m windtunnel.experiments.dissociation RUN_DIR`` (same as the CLI command)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m windtunnel.experiments.dissociation RUN_DIR")
    out = run_dissociation(args[0])
    print(f"settling steps: {out['settling_step']}\nframe settles first: {out['frame_settles_first']}")


if __name__ == "__main__":  # pragma: no cover
    main()
