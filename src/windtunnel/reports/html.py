"""A self-contained HTML report of one run, built from its run directory alone (docs/theory.md §8, §10).

Reads ``config.json``, ``metrics.jsonl``, ``telemetry.jsonl``, and when present ``eval.json``,
``dissociation.json`` / ``dissociation.png``, ``ablation.json`` and ``manifold/step_N.json``. HMM runs
get a memory section from the memory probe's telemetry, eval.json's ``lag_response``,
ablation.json's ``lag_map`` and ``memory.png``.
Figures are embedded as base64 PNG, so the single file can be mailed or archived. Nothing here
imports the training stack: a report can be rebuilt from a copied directory.

A run directory may come from anyone, so every value read from it reaches the page through
:func:`_esc` (directly or through :func:`_fmt` and :func:`_table`), never raw.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from windtunnel.paper_numbers import PaperNumber, paper_number
from windtunnel.reports.figures import metric_label, note_if_empty, plain_log_ticks
from windtunnel.runs import RunDir, read_jsonl, write_text_atomic

__all__ = ["GEOMETRY_VARIANT_HEADER", "PAPER_ROWS", "build_report", "geometry_variant_reasons", "geometry_variant_rows", "paper_table_rows"]

# The report's paper table: per task, (how ours is read from the run, the paper numbers of that row).
# The numbers themselves live in windtunnel.paper_numbers, once (docs/theory.md §10).
PAPER_ROWS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "bijection": [
        ("mae", ("bijection.transformer.entropy_mae", "bijection.transformer.entropy_mae_v1", "bijection.transformer.entropy_mae_retrain")),
        ("key_ortho", ("bijection.transformer.key_orthogonality", "bijection.transformer.key_orthogonality_target")),
        ("pc1", ("bijection.transformer.value_manifold", "bijection.transformer.value_manifold_target")),
        ("focusing", ("bijection.transformer.focusing",)),
        ("bypass", ("bijection.transformer.bypass",)),
        ("dissociation", ("bijection.transformer.dissociation",)),
    ],
    "hmm": [
        ("mae", ("hmm.transformer.entropy_mae",)),
        ("mae_lengths", ("hmm.transformer.entropy_mae_k30", "hmm.transformer.entropy_mae_k50")),
        ("focusing", ("hmm.transformer.focusing",)),
    ],
    "recall": [("accuracy", ("recall.transformer.accuracy",))],
}


def paper_table_rows(task: str) -> list[tuple[str, PaperNumber]]:
    """(how ours is read, paper number) for every row of the report's paper table of ``task``."""
    return [(reader, paper_number(key)) for reader, keys in PAPER_ROWS.get(task, []) for key in keys]


def _png(fig: Any) -> str:
    for ax in fig.axes:
        plain_log_ticks(ax)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return _img(buffer.getvalue())


def _img(data: bytes) -> str:
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def _esc(value: Any) -> str:
    """Any value as HTML text: the one escape every value from the run directory goes through."""
    return html.escape(str(value))


def _text(value: Any) -> str:
    """A number or value as plain (unescaped) text: — for None and non-finite floats."""
    if value is None:
        return "—"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:.3g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}"
    return str(value)


def _fmt(value: Any) -> str:
    """:func:`_text`, escaped for HTML."""
    return _esc(_text(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """Cells are plain values or text; each is escaped here, once."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, None when the file is missing.

    Raises:
        ValueError: naming the path when the file is not UTF-8 JSON holding an object.
    """
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"build_report: {path} must be valid JSON; got {err}.") from None
    if not isinstance(data, dict):
        raise ValueError(f"build_report: {path} must hold a JSON object; got {type(data).__name__}.")
    return data


class _Telemetry:
    """Telemetry rows indexed by (metric, layer, head) -> [(step, value)]."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.series: dict[tuple[str, Any, Any], list[tuple[int, float]]] = defaultdict(list)
        for r in rows:
            if r.get("value") is not None:
                self.series[(r["metric"], r.get("layer"), r.get("head"))].append((r["step"], r["value"]))

    def get(self, metric: str, layer: Any = None, head: Any = None) -> list[tuple[int, float]]:
        return sorted(self.series.get((metric, layer, head), []))

    def last(self, metric: str, layer: Any = None, head: Any = None) -> float | None:
        s = self.get(metric, layer, head)
        return s[-1][1] if s else None

    def layers(self, metric: str) -> list[int]:
        return sorted({k[1] for k in self.series if k[0] == metric and k[1] is not None})


def _figure(ncols: int, width: float = 11, height: float = 3.4) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig, axes


def _loss_section(metrics: list[dict[str, Any]], train_config: dict[str, Any]) -> str:
    train = [(r["step"], r["loss_nats"]) for r in metrics if r.get("split") == "train" and r.get("loss_nats") is not None]
    evals = defaultdict(list)
    for r in metrics:
        if str(r.get("split", "")).startswith("eval"):
            evals[r["split"]].append(r)
    if not train and not evals:
        return "<p>No metrics.jsonl rows.</p>"
    fig, (ax_loss, ax_mae) = _figure(2)
    if train:
        ax_loss.plot(*zip(*train), lw=1)
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats)", title="training loss at the prediction sites")
    log_every, steps = train_config.get("log_every"), train_config.get("steps")
    note_if_empty(ax_loss, bool(train), f"No training loss logged yet: the loss is logged every {_text(log_every)} steps "
                  f"(train.log_every) and this run has {_text(steps)}." if log_every is not None else "No training loss logged.")
    for split, rows in evals.items():
        name = "held-out" if split == "eval" else split.replace("eval_len", "length ")
        ax_mae.semilogy([r["step"] for r in rows], [max(r["entropy_mae_bits"], 1e-7) for r in rows], marker=".", label=f"{name}: entropy MAE")
        ax_mae.semilogy([r["step"] for r in rows], [max(r["kl_bits"], 1e-7) for r in rows], ls="--", marker=".", label=f"{name}: KL")
    ax_mae.set(xlabel="step", ylabel="bits", title="held-out calibration")
    note_if_empty(ax_mae, bool(evals), f"No held-out evaluation yet (every {_text(train_config.get('eval_every'))} steps, train.eval_every).")
    if evals:
        ax_mae.legend(fontsize=7)
    return _png(fig)


def _calibration_section(evaluation: dict[str, Any] | None) -> str:
    if evaluation is None:
        return "<p>No eval.json: run <code>windtunnel eval RUN_DIR</code>.</p>"
    fig, (ax_h, ax_mae) = _figure(2)
    for name, c in evaluation["per_position"].items():
        sites = range(1, len(c["bayes_entropy_bits"]) + 1)
        line = ax_h.plot(sites, c["model_entropy_bits"], marker=".", label=f"model ({name})")[0]
        ax_h.plot(sites, c["bayes_entropy_bits"], "--", color=line.get_color(), label=f"Bayes ({name})")
        ax_mae.semilogy(sites, [max(v, 1e-7) for v in c["entropy_mae_bits"]], marker=".", label=f"MAE ({name})")
        ax_mae.semilogy(sites, [max(v, 1e-7) for v in c["kl_bits"]], ls="--", label=f"KL ({name})")
    ax_h.set(xlabel="prediction site", ylabel="entropy (bits)", title="entropy per position: model vs Bayes")
    ax_mae.set(xlabel="prediction site", ylabel="bits", title="per-sample entropy MAE and KL")
    ax_h.legend(fontsize=7)
    ax_mae.legend(fontsize=7)
    rows = [[name, s["entropy_mae_bits"], s["kl_bits"], s["accuracy"], s["bayes_entropy_bits"]] for name, s in evaluation["summary"].items()]
    text = f"<p>Step {_fmt(evaluation['step'])}, {_fmt(evaluation['n_sequences'])} held-out sequences (seed {_fmt(evaluation['seed'])}).</p>"
    return text + _table(["set", "entropy MAE (bits)", "KL (bits)", "accuracy", "Bayes entropy (bits)"], rows) + _png(fig)


def _manifold_section(folder: Path, n_panels: int = 4) -> str:
    files = sorted(((int(p.stem.split("_", 1)[1]), p) for p in folder.glob("step_*.json")), key=lambda t: t[0]) if folder.exists() else []
    if not files:
        return "<p>No manifold projections (written by the telemetry probes or <code>windtunnel dissociation</code>).</p>"
    picks = sorted({round(i * (len(files) - 1) / max(n_panels - 1, 1)) for i in range(min(n_panels, len(files)))})
    fig, axes = _figure(len(picks), height=3.0)
    for ax, i in zip(axes, picks):
        step, path = files[i]
        data = _read_json(path)
        sc = ax.scatter(data["pc1"], data["pc2"], c=data["entropy_bits"], s=4, cmap="viridis")
        ax.set(title=f"step {step}: PC1 {100 * data['pc1_share']:.0f} %", xlabel="PC1", ylabel="PC2")
    fig.colorbar(sc, ax=list(axes), label="Bayes entropy (bits)")
    return _png(fig)


def _geometry_section(tel: _Telemetry) -> str:
    if not tel.series:
        return "<p>No telemetry.jsonl (train with <code>--telemetry</code>).</p>"
    fig, (ax_ko, ax_ent, ax_pc) = _figure(3, height=4.4)
    for layer in tel.layers("key_ortho_abs_cos"):
        s = tel.get("key_ortho_abs_cos", layer)
        ax_ko.plot([max(a, 0.5) for a, _ in s], [b for _, b in s], marker=".", label=f"layer {layer}")
    base = tel.last("key_ortho_random_baseline")
    if base is not None:
        ax_ko.axhline(base, color="grey", ls="--", label="random √(2/πd)")
    init = tel.last("key_ortho_init_abs_cos", 0)
    if init is not None:
        ax_ko.axhline(init, color="k", ls=":", label="layer 0 at init")
    ax_ko.set(xscale="log", xlabel="step (0 drawn at 0.5)", ylabel="mean |cos|", title="key orthogonality")
    for layer in tel.layers("attn_entropy_bits"):
        s = tel.get("attn_entropy_bits", layer)
        ax_ent.plot([max(a, 0.5) for a, _ in s], [b for _, b in s], marker=".", label=f"layer {layer}")
    ax_ent.set(xscale="log", xlabel="step (0 drawn at 0.5)", ylabel="bits", title="attention entropy at the sites")
    for metric in ("manifold_pc1_share", "manifold_spearman", "manifold_probe_r2", "focusing_ratio"):
        s = tel.get(metric)
        if s:
            ax_pc.plot([max(a, 0.5) for a, _ in s], [b for _, b in s], marker=".", label=metric_label(metric))
    ax_pc.set(xscale="log", xlabel="step (0 drawn at 0.5)", title="value manifold and focusing")
    for ax in (ax_ko, ax_ent, ax_pc):  # below the axes: the lines span the whole panel, a legend inside hides some
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    rows = []
    for layer in tel.layers("key_ortho_abs_cos"):
        heads = sorted(k[2] for k in tel.series if k[0] == "key_ortho_abs_cos" and k[1] == layer and k[2] is not None)
        rows.append([layer, tel.last("key_ortho_abs_cos", layer), tel.last("key_ortho_min_abs_cos", layer),
                     tel.last("key_ortho_init_abs_cos", layer), base, tel.last("attn_entropy_bits", layer), len(heads)])
    return _table(["layer", "mean |cos| (final)", "min head", "at init", "random", "attention entropy (bits)", "heads"], rows) + _png(fig)


def _head_mean_panels(tel: _Telemetry, panels: Sequence[tuple[str, str]], *, width: float = 13) -> Any:
    """One panel per (metric, title): the metric's head mean per layer against the step (log)."""
    fig, axes = _figure(len(panels), width=width)
    for ax, (metric, title) in zip(axes, panels):
        for layer in tel.layers(metric):
            by_step: dict[int, list[float]] = defaultdict(list)
            for (m, l, h), series in tel.series.items():
                if m == metric and l == layer and h is not None:
                    for step, v in series:
                        by_step[step].append(v)
            steps = sorted(by_step)
            ax.plot([max(s, 0.5) for s in steps], [sum(by_step[s]) / len(by_step[s]) for s in steps], marker=".", label=f"layer {layer}")
        ax.set(xscale="log", xlabel="step (0 drawn at 0.5)", title=title)
        note_if_empty(ax, bool(tel.layers(metric)), "No rows in telemetry.jsonl.")
        if tel.layers(metric):
            ax.legend(fontsize=7)
    return fig


def _routing_section(tel: _Telemetry) -> str:
    metrics = ("advantage_abs_mean", "positive_advantage_mass", "d_scores_fro", "advantage_attention_cov")
    if not tel.layers("advantage_abs_mean"):
        return "<p>No routing-law telemetry.</p>"
    fig = _head_mean_panels(tel, [(m, metric_label(m)) for m in metrics])
    worst = max((v for (m, _, _), s in tel.series.items() if m == "law_check_rel_error" for _, v in s), default=None)
    worst_model = max((v for (m, _, _), s in tel.series.items() if m == "law_model_grad_rel_error" for _, v in s), default=None)
    text = (f"<p>Exactness at every logged step: closed form vs autograd rebuild (float64), worst relative error "
            f"{_fmt(worst)}; closed form vs the model's own backward at the q, k and v hooks (float32), worst {_fmt(worst_model)}. "
            "Below: the routing-law quantities of docs/theory.md §2.2, each the mean over a layer's heads, against the step.</p>")
    text += _png(fig)
    if tel.layers("value_update_pull_cosine_all"):  # runs from before the value-update probe have none
        text += ("<p>Value updates: on the training step at each logged step, the cosine between the optimiser's "
                 "realised change ΔV of the value vectors and their responsibility-weighted pull −AᵀU (as whole "
                 "matrices), the same for the change a plain gradient step on W<sub>V</sub> would have made (what the "
                 "weight tying alone leaves of the value law; never negative), and ‖ΔV‖ ÷ (lr ‖AᵀU‖). Paper II's value "
                 "law, a gradient step on the values themselves, gives cosines of 1 and a ratio of 1. Per-value cosines "
                 "and the head's own W<sub>V</sub> part are in telemetry.jsonl (<code>value_update_*</code>). Head means.</p>")
        fig = _head_mean_panels(tel, [
            ("value_update_pull_cosine_all", "cos(ΔV, −AᵀU), realised"),
            ("value_update_gradient_pull_cosine_all", "cos(ΔV, −AᵀU), gradient step on $W_V$"),
            ("value_update_norm_ratio", "‖ΔV‖ ÷ (lr ‖AᵀU‖)"),
        ], width=11)
        fig.axes[2].set_yscale("log")
        text += _png(fig)
    return text


def _dissociation_section(run: Path, diss: dict[str, Any] | None) -> str:
    if diss is None:
        return "<p>No dissociation.json: run <code>windtunnel dissociation RUN_DIR</code>.</p>"
    png = run / "dissociation.png"
    rows = [[metric_label(name), step] for name, step in diss["settling_step"].items()]
    text = (f"<p>Checkpoints: {len(diss['steps'])} ({_fmt(diss['steps'][0])}…{_fmt(diss['steps'][-1])}). Frame settled by step "
            f"{_fmt(diss['frame_settled_by'])}; calibration by {_fmt(diss['precision_settled_by'])}; frame settles first: "
            f"<b>{_fmt(diss['frame_settles_first'])}</b>; MAE at frame settling ÷ final MAE: {_fmt(diss['mae_improvement_after_frame'])}.</p>")
    return text + (_img(png.read_bytes()) if png.exists() else "") + _table(["metric", "settling step (within 10 % of final)"], rows)


def draw_lag_response(ax: Any, lag: dict[str, Any]) -> None:
    """On a matplotlib axis, log scale: the exact filter's move, the model's move and the error of
    the model's move by lag (a ``lag_response`` of eval.json). Shared by ``windtunnel eval``'s
    lag_response.png and the report."""
    ax.semilogy(lag["lags"], lag["bayes_move_tv"], "o-", color="black", label="exact filter: its move")
    ax.semilogy(lag["lags"], lag["model_move_tv"], "s-", label="model: its move")
    ax.semilogy(lag["lags"], lag["response_error_tv"], "^--", label="model: error of its move")
    ax.set(ylabel="total variation")


def _memory_section(saved: Path, evaluation: dict[str, Any] | None, ablation: dict[str, Any] | None, tel: _Telemetry) -> str:
    """HMM only: the memory probe over training (telemetry ``model_move_tv_lag{d}``), the belief's
    response by lag (eval.json ``lag_response``), which heads carry each lag (ablation.json
    ``lag_map``), and memory.png of ``windtunnel memory`` when present."""
    lag = evaluation.get("lag_response") if evaluation is not None else None
    lag_map = ablation.get("lag_map") if ablation is not None else None
    probe_lags = sorted(int(m.rsplit("lag", 1)[1]) for (m, _, _) in tel.series if m.startswith("model_move_tv_lag"))
    over_checkpoints = ("<p>Every saved model of the run (<code>windtunnel memory</code>):</p>" + _img(saved.read_bytes())) if saved.exists() else ""
    if lag is None and lag_map is None and not probe_lags:
        if over_checkpoints:
            return over_checkpoints
        return "<p>No lag response: run <code>windtunnel eval RUN_DIR</code> (and <code>windtunnel ablate RUN_DIR</code> for the heads).</p>"
    fig, axes = _figure(int(bool(probe_lags)) + int(lag is not None) + int(lag_map is not None), width=13)
    text = ""
    if probe_lags:
        ax = axes[0]
        for d in [d for d in probe_lags if 1 <= d <= 5]:
            model, exact = dict(tel.get(f"model_move_tv_lag{d}")), dict(tel.get(f"bayes_move_tv_lag{d}"))
            steps = sorted(s for s in model if exact.get(s))
            ax.plot([max(s, 0.5) for s in steps], [model[s] / exact[s] for s in steps], marker=".", label=f"d = {d}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set(xscale="log", xlabel="step (0 drawn at 0.5)", ylabel="model move / exact move", title="memory over training (probe batch)")
        ax.legend(fontsize=7)
        text += ("<p>Left: at each probed step, how much the belief moves when the observation d steps back changes, "
                 "as a fraction of the exact filter's move (1 = the model hears that lag at full weight).</p>")
    if lag is not None:
        ax = axes[int(bool(probe_lags))]
        draw_lag_response(ax, lag)
        ax.set(xlabel="lag d (observation $o_{t-d}$ changed)", title="how the belief moves, by lag")
        ax.legend(fontsize=7)
        text += (f"<p>Each observation in turn changed to another symbol ({_fmt(lag['n_sequences'])} sequences): how far the belief "
                 "at each later step moves, for the exact filter and the model, and how far the model's move is from the exact one.</p>")
    if lag_map is not None:
        ax = axes[-1]
        lags = lag_map["lags"][1:]
        intact = lag_map["intact"]["model_move_tv"]
        grid = [[row["model_move_tv"][d] / intact[d] if intact[d] > 0 else float("nan") for d in lags] for row in lag_map["heads"]]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.5)
        ax.set(xticks=range(len(lags)), xticklabels=[str(d) for d in lags], yticks=range(len(grid)),
               yticklabels=[f"L{r['layer']}H{r['head']}" for r in lag_map["heads"]], xlabel="lag d",
               title="move with the head ablated ÷ intact move")
        ax.grid(False)
        fig.colorbar(image, ax=ax)
        text += "<p>Last panel: each head ablated in turn (ablation.json); a low value means the head carries that lag.</p>"
    return text + _png(fig) + over_checkpoints


GEOMETRY_VARIANT_HEADER = ["quantity", "variant", "this run", "paper", "definition", "source"]
"""Columns of :func:`geometry_variant_rows`."""

_QUANTITY_TEXT = {
    "key_orthogonality": "key orthogonality (layer 0)",
    "value_manifold_pc1_share": "value manifold PC1 share",
    "focusing_ratio": "attention focusing ratio",
}


def _variant_entries(geometry: dict[str, Any] | None) -> list[tuple[str, str, dict[str, Any]]]:
    """(quantity, variant name, its dict) of eval.json's ``geometry_variants``, in file order;
    anything that is not a dict is skipped."""
    if not isinstance(geometry, dict) or not isinstance(geometry.get("quantities"), dict):
        return []
    return [
        (quantity, name, v)
        for quantity, variants in geometry["quantities"].items() if isinstance(variants, dict)
        for name, v in variants.items() if isinstance(v, dict)
    ]


def geometry_variant_rows(geometry: dict[str, Any] | None) -> list[list[str]]:
    """eval.json's ``geometry_variants`` as table rows of plain text, one per variant, ours marked:
    [quantity, variant, this run, paper, definition, source] (:data:`GEOMETRY_VARIANT_HEADER`).
    `windtunnel eval` prints these rows and the report shows them, so both show the same numbers.
    A value-manifold variant's cell adds its position control (docs/theory.md §8.9): the Spearman ρ of
    PC1 with the entropy and with the position, and the within-position Pearson r (— where position
    and entropy cannot be separated). A variant the run could not measure shows — and the reason;
    the paper column is — where no paper number belongs to the definition. Empty when there is
    nothing to show."""
    rows = []
    for quantity, name, v in _variant_entries(geometry):
        value = _text(v.get("value"))
        if "spearman_position" in v and v.get("value") is not None:  # a value-manifold variant: its position control
            value += (f" (Spearman of PC1 with entropy {_text(v.get('spearman'))}, with position {_text(v.get('spearman_position'))}; "
                      f"within positions r {_text(v.get('partial_pearson_given_position'))})")
        if v.get("unavailable"):
            value = f"— ({v['unavailable']})"
        rows.append([_QUANTITY_TEXT.get(quantity, str(quantity)), f"{name} (ours)" if v.get("ours") else str(name), value,
                     _text(v.get("paper")), _text(v.get("description")), _text(v.get("source"))])
    return rows


def geometry_variant_reasons(geometry: dict[str, Any] | None) -> list[str | None]:
    """Per row of :func:`geometry_variant_rows` (same order), why the variant was not measured, or None."""
    return [v.get("unavailable") or None for _, _, v in _variant_entries(geometry)]


def _geometry_variants_section(evaluation: dict[str, Any] | None) -> str:
    geometry = evaluation.get("geometry_variants") if isinstance(evaluation, dict) else None
    if isinstance(geometry, dict) and geometry.get("unavailable"):
        return f"<p>No geometry variants for this model: {_esc(geometry['unavailable'])}</p>"
    rows = geometry_variant_rows(geometry)
    if not rows:
        return "<p>No geometry variants in eval.json: run <code>windtunnel eval RUN_DIR</code>.</p>"
    text = (f"<p>From eval.json: step {_fmt(evaluation.get('step'))}, the first {_fmt(geometry.get('n_sequences'))} evaluation "
            "sequences. Each quantity under every published definition (docs/theory.md §8.1–§8.3, §9), ours first; the "
            "paper's number stands beside the definition it belongs to.</p>")
    return text + _table(GEOMETRY_VARIANT_HEADER, rows)


def _ablation_section(ablation: dict[str, Any] | None) -> str:
    if ablation is None:
        return "<p>No ablation.json: run <code>windtunnel ablate RUN_DIR</code>.</p>"
    rows = [[metric_label(r["kind"]), r["layer"], r["head"], r["entropy_mae_bits"], r["delta_mae_bits"], r["mae_ratio"], r["delta_kl_bits"], r["delta_accuracy"]]
            for r in sorted(ablation["rows"], key=lambda r: -r["delta_mae_bits"])]
    intact = ablation["intact"]
    text = (f"<p>Step {_fmt(ablation['step'])}, {_fmt(ablation['n_sequences'])} sequences; intact entropy MAE {_fmt(intact['entropy_mae_bits'])} bits, "
            f"accuracy {_fmt(intact['accuracy'])}. Sorted by ΔMAE.</p>")
    return text + _table(["ablation", "layer", "head", "MAE (bits)", "ΔMAE (bits)", "MAE ratio", "ΔKL (bits)", "Δaccuracy"], rows)


def _settings(fields: Any) -> str:
    """A config section as escaped JSON. config.json's task and model sections hold the arguments
    given to the task and model, the rest being their defaults, so an empty one reads "(default settings)"."""
    return "(default settings)" if not fields else _esc(json.dumps(fields))


def _ours(key: str, metrics: list[dict[str, Any]], evaluation: dict | None, tel: _Telemetry, diss: dict | None, ablation: dict | None) -> str:
    """Our value for a paper-table row, as plain text (the table escapes it)."""
    final_eval = [r for r in metrics if r.get("split") == "eval"]
    if key == "mae":
        if evaluation is not None:
            return _text(next(iter(evaluation["summary"].values()))["entropy_mae_bits"]) + " (eval.json)"
        return _text(final_eval[-1]["entropy_mae_bits"]) + " (last eval)" if final_eval else "—"
    if key == "mae_lengths":
        if evaluation is None:
            return "—"
        return " / ".join(f"{n}: {_text(s['entropy_mae_bits'])}" for n, s in evaluation["summary"].items())
    if key == "accuracy":
        return _text(final_eval[-1]["accuracy"]) if final_eval else "—"
    # The geometry rows read eval.json first: the held-out evaluation of the final model, the same
    # numbers `windtunnel eval` prints (its first, our, definition of each quantity). Without it, the
    # telemetry's last logged step (the probe batch), then dissociation.json's final checkpoint.
    ours = {q: v.get("value") for q, _, v in _variant_entries((evaluation or {}).get("geometry_variants")) if v.get("ours")}
    for row_key, quantity in (("key_ortho", "key_orthogonality"), ("pc1", "value_manifold_pc1_share"), ("focusing", "focusing_ratio")):
        if key == row_key and ours.get(quantity) is not None:
            return f"{_text(ours[quantity])} (eval.json)"
    fallback = {m: v[-1] for m, v in diss["metrics"].items()} if diss is not None else {}
    if key == "key_ortho":
        if tel.last("key_ortho_abs_cos", 0) is None:
            return f"{_text(fallback.get('key_ortho_layer0'))} (dissociation.json, final checkpoint)"
        return f"{_text(tel.last('key_ortho_abs_cos', 0))} vs {_text(tel.last('key_ortho_random_baseline'))} random (d_head), {_text(tel.last('key_ortho_init_abs_cos', 0))} at init (telemetry, last logged step)"
    if key == "pc1":
        if tel.last("manifold_pc1_share") is None:
            return f"{_text(fallback.get('pc1_share'))} (PC1+PC2 {_text(fallback.get('pc12_share'))}); Spearman {_text(fallback.get('spearman'))} (dissociation.json, final checkpoint)"
        return f"{_text(tel.last('manifold_pc1_share'))} (PC1+PC2 {_text(tel.last('manifold_pc12_share'))}); Spearman {_text(tel.last('manifold_spearman'))} (telemetry, last logged step)"
    if key == "focusing":
        if tel.last("focusing_ratio") is None:
            return f"{_text(fallback.get('focusing_ratio'))} (dissociation.json, final checkpoint)"
        return f"{_text(tel.last('focusing_ratio'))} (telemetry, last logged step)"
    if key == "bypass" and ablation is not None:
        ratios = [r["mae_ratio"] for r in ablation["rows"] if r["kind"] == "bypass" and r["mae_ratio"] is not None]
        return f"min {_text(min(ratios))}×, max {_text(max(ratios))}×" if ratios else "—"
    if key == "dissociation" and diss is not None:
        return f"frame by {_text(diss['frame_settled_by'])}, first: {_text(diss['frame_settles_first'])}; MAE ×{_text(diss['mae_improvement_after_frame'])} after"
    return "—"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f2f2f2}img{max-width:100%;display:block;margin:.5em 0}h2{border-bottom:1px solid #ddd;margin-top:1.6em}
code{background:#f4f4f4;padding:0 3px}"""


def build_report(run_dir: str | Path, *, out: str | Path | None = None) -> Path:
    """Write a self-contained HTML report of ``run_dir`` (default ``RUN_DIR/report.html``).

    Every value read from the directory is HTML-escaped, so a planted config name or JSON value
    shows as text and never runs as markup.

    Raises:
        ValueError: when ``run_dir`` is not a run directory (no config.json), or naming the file
            when eval.json, dissociation.json, ablation.json or a manifold file is not valid JSON
            holding an object.
    """
    run = RunDir(run_dir)
    config = run.read_config()
    metrics = run.metrics()
    tel = _Telemetry(read_jsonl(run.telemetry_path))
    evaluation = _read_json(run.eval_path())
    diss = _read_json(run.dissociation_path)
    ablation = _read_json(run.ablation_path)
    task = str(config.get("task_name", "?"))
    title = config.get("name") or f"{task}/{config.get('model_name', '?')}"
    paper_rows, shown = [], set()
    for reader, number in paper_table_rows(task):  # "this run" once per group of numbers it is read against
        ours = "" if reader in shown else _ours(reader, metrics, evaluation, tel, diss, ablation)
        shown.add(reader)
        paper_rows.append([number.quantity, number.paper, number.source, ours])
    train = config.get("train", {})
    sections = [
        ("Run", f"<p>Task <code>{_esc(task)}</code> {_settings(config.get('task'))}, model "
                f"<code>{_esc(config.get('model_name'))}</code> {_settings(config.get('model'))}; "
                f"{_fmt(train.get('steps'))} steps × batch {_fmt(train.get('batch_size'))}, lr {_fmt(train.get('lr'))}, seed {_fmt(train.get('seed'))}.</p>"),
        ("Paper numbers beside ours (docs/theory.md §10)", _table(["quantity", "paper", "source", "this run"], paper_rows) if paper_rows else "<p>No paper targets for this task.</p>"),
        ("Loss and held-out calibration", _loss_section(metrics, train)),
        ("Per-position calibration vs Bayes", _calibration_section(evaluation)),
        ("Value manifold coloured by Bayes entropy", _manifold_section(run.manifold_dir)),
        ("Key orthogonality, attention entropy, manifold statistics", _geometry_section(tel)),
        ("Geometry under every published definition (docs/theory.md §8.1–§8.3)", _geometry_variants_section(evaluation)),
        ("Frame–precision dissociation (docs/theory.md §8.6)", _dissociation_section(run.path, diss)),
        ("Routing-law telemetry (docs/theory.md §8.4)", _routing_section(tel)),
        ("Ablations (docs/theory.md §8.5)", _ablation_section(ablation)),
    ]
    if task == "hmm":
        sections.insert(4, ("Memory: how the belief responds to each earlier observation", _memory_section(run.memory_figure_path, evaluation, ablation, tel)))
    body = "".join(f"<h2>{_esc(name)}</h2>{content}" for name, content in sections)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title><style>{_CSS}</style></head>"
            f"<body><h1>windtunnel report: {_esc(title)}</h1>{body}</body></html>")
    return write_text_atomic(Path(out) if out is not None else run.report_path, page)
