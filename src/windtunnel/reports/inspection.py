"""The HTML report of ``windtunnel inspect``, in the style of the run report (:mod:`.html`).

Built from the inspection's JSON alone. The model directory and the text come from elsewhere, so
every value reaches the page through the run report's one escape (``_esc``, directly or through
``_fmt`` and ``_table``), never raw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from windtunnel.reports.html import _CSS, _esc, _figure, _fmt, _png, _table
from windtunnel.runs import write_text_atomic

__all__ = ["build_inspection_report"]

_HEATMAPS = (
    ("advantage_abs_mean", "mean |advantage|"),
    ("positive_advantage_mass", "attention on positive advantage"),
    ("responsibility_cv", "responsibility CV"),
    ("value_pull_norm", "‖AᵀU‖ (value pull)"),
)
_KEY_MAPS = (
    ("attn_entropy_bits", "attention entropy (bits)"),
    ("key_abs_cos", "keys: mean |cos| between positions"),
    ("key_participation_ratio", "keys: participation ratio"),
)
_COLUMNS = (
    "layer", "head", "kv_head", "advantage_abs_mean", "positive_advantage_mass", "d_scores_fro",
    "advantage_attention_cov", "responsibility_max", "responsibility_cv", "value_pull_norm",
    "attn_entropy_bits", "key_abs_cos", "key_participation_ratio", "key_norm_mean",
)


def _grid(heads: list[dict[str, Any]], metric: str) -> list[list[float]]:
    """[layer][head] of one per-head metric (NaN where missing)."""
    n_layers = 1 + max(int(h["layer"]) for h in heads)
    n_heads = 1 + max(int(h["head"]) for h in heads)
    grid = [[float("nan")] * n_heads for _ in range(n_layers)]
    for h in heads:
        value = h.get(metric)
        grid[int(h["layer"])][int(h["head"])] = float(value) if isinstance(value, (int, float)) else float("nan")
    return grid


def _heatmaps(heads: list[dict[str, Any]], panels: tuple[tuple[str, str], ...]) -> str:
    fig, axes = _figure(len(panels), width=3.4 * len(panels), height=3.2)
    for ax, (metric, title) in zip(axes, panels):
        grid = _grid(heads, metric)
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set(title=title, xlabel="head", ylabel="layer", xticks=range(len(grid[0])), yticks=range(len(grid)))
        ax.grid(False)
        bar = fig.colorbar(image, ax=ax, shrink=0.8)
        bar.formatter.set_useOffset(False)  # plain numbers, never "1e-5 + 4.048"
        bar.update_ticks()
    return _png(fig)


def _entropy_by_layer(layers: list[dict[str, Any]]) -> str:
    fig, axes = _figure(1, width=5, height=3.2)
    values = [row["attn_entropy_bits"] for row in layers]
    axes[0].plot(range(len(values)), [float("nan") if v is None else v for v in values], marker="o")
    axes[0].set(xlabel="layer", ylabel="bits", title="attention entropy by layer (head mean)", xticks=range(len(values)))
    axes[0].ticklabel_format(axis="y", useOffset=False)
    return _png(fig)


def build_inspection_report(result: dict[str, Any], out: str | Path) -> Path:
    """Write the self-contained HTML page of one inspection (the dict :func:`inspect_model_dir`
    writes as JSON) to ``out``; every value is escaped."""
    heads, layers = result["heads"], result["layers"]
    worst_law = max((row["law_check_rel_error"] for row in layers if row["law_check_rel_error"] is not None), default=None)
    worst_model = max((row["model_grad_rel_error"] for row in layers if row["model_grad_rel_error"] is not None), default=None)
    sections = [
        ("Model and text", (
            f"<p>Model <code>{_esc(result.get('model_dir'))}</code> ({_esc(result.get('model_class'))}, model type "
            f"<code>{_esc(result.get('model_type'))}</code>) on <code>{_esc(result.get('text_file'))}</code>: "
            f"{_fmt(result.get('n_tokens'))} tokens read of {_fmt(result.get('n_text_tokens'))} "
            f"(at most {_fmt(result.get('max_tokens'))}). Next-token cross-entropy {_fmt(result.get('loss_nats'))} nats.</p>"
        )),
        ("Routing law (arXiv 2512.22473)", (
            "<p>One backward pass of the next-token cross-entropy. Per head: the mean |advantage| "
            "E<sub>a<sub>i</sub></sub>[b] − b<sub>ij</sub> over allowed keys, the attention mass on keys of positive "
            "advantage, the coefficient of variation of the responsibilities R<sub>j</sub> = Σ<sub>i</sub> a<sub>ij</sub>, "
            f"and ‖AᵀU‖. Exactness: closed form vs an autograd rebuild (float64), worst relative error {_fmt(worst_law)}; "
            f"vs the model's own gradients at q, k, v, worst {_fmt(worst_model)}.</p>"
            + _heatmaps(heads, _HEATMAPS)
        )),
        ("Attention focusing and key geometry", (
            f"<p>Attention entropy of each query row after the first, per head; focusing ratio (first − last layer) ÷ first "
            f"= {_fmt(result.get('focusing_ratio'))}. Keys in context, per key-value head, as the softmax saw them (after "
            f"any rotary embedding): the mean |cos| between the keys of distinct positions (two random directions: "
            f"{_fmt(result.get('key_random_abs_cos'))}) and their participation ratio (effective dimension).</p>"
            + _entropy_by_layer(layers) + _heatmaps(heads, _KEY_MAPS)
        )),
        ("Layers", _table(
            ["layer", "heads", "key-value heads", "attention entropy (bits)", "law check rel. error", "model gradient rel. error"],
            [[row["layer"], row["n_heads"], row["n_kv_heads"], row["attn_entropy_bits"], row["law_check_rel_error"],
              row["model_grad_rel_error"]] for row in layers],
        )),
        ("Every head", "<div style='overflow-x:auto'>" + _table(list(_COLUMNS), [[row.get(c) for c in _COLUMNS] for row in heads]) + "</div>"),
    ]
    title = f"inspect {result.get('model_dir')}"
    body = "".join(f"<h2>{_esc(name)}</h2>{content}" for name, content in sections)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title><style>{_CSS}</style></head>"
            f"<body><h1>windtunnel inspect: {_esc(result.get('model_dir'))}</h1>{body}</body></html>")
    return write_text_atomic(Path(out), page)
