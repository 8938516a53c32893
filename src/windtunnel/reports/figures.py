"""Shared figure conventions: plain tick labels on log axes, a note in a panel with no data yet,
and human names for the metrics the figures draw (used by the HTML report and by the figures that
`windtunnel eval` and `windtunnel dissociation` write)."""

from __future__ import annotations

import math
import textwrap
from typing import Any

__all__ = ["METRIC_LABELS", "metric_label", "note_if_empty", "plain_log_ticks", "tick_text"]

METRIC_LABELS: dict[str, str] = {
    # geometry and calibration over training (telemetry.jsonl, dissociation.json)
    "key_ortho_abs_cos": "key orthogonality (mean |cos|)",
    "key_ortho_layer0": "layer-0 key orthogonality",
    "key_ortho_layer0_min_head": "layer-0 key orthogonality, best head",
    "attn_entropy_bits": "attention entropy (bits)",
    "manifold_pc1_share": "value manifold: PC1 share",
    "manifold_pc12_share": "value manifold: PC1+PC2 share",
    "manifold_spearman": "value manifold: Spearman(PC1, Bayes entropy)",
    "manifold_probe_r2": "value manifold: linear probe R²",
    "focusing_ratio": "attention focusing ratio",
    "js_to_final_bits_layer0": "layer-0 attention: JS divergence to final (bits)",
    "js_to_final_bits_layer1": "layer-1 attention: JS divergence to final (bits)",
    "js_to_final_bits_mean": "attention: mean JS divergence to final (bits)",
    "frame_overlap_ratio": "W_K frame-subspace overlap ÷ chance",
    "pc1_share": "value manifold: PC1 share",
    "pc12_share": "value manifold: PC1+PC2 share",
    "spearman": "Spearman(PC1, Bayes entropy)",
    "ordering_score": "entropy ordering along PC1",
    "probe_r2": "linear probe R² of Bayes entropy",
    "participation_ratio": "participation ratio of the states",
    "level_separation_min": "smallest separation of entropy levels",
    "entropy_mae_bits": "entropy MAE (bits)",
    "kl_bits": "KL(Bayes ‖ model) (bits)",
    "accuracy": "accuracy",
    # routing law (docs/theory.md §8.4)
    "advantage_abs_mean": "mean |advantage|",
    "positive_advantage_mass": "attention on positive advantage",
    "d_scores_fro": "‖dL/ds‖ (Frobenius)",
    "advantage_attention_cov": "cov(advantage, attention)",
    # ablation kinds (ablation.json)
    "head": "head",
    "bypass": "bypass the layer",
    "zero_attn_out": "zero the attention output",
    "zero_mlp_out": "zero the MLP output",
}
"""Human names of the metric keys that appear in figures and report tables, by key."""


def metric_label(name: Any) -> str:
    """The human name of a metric key; an unknown key is shown with its underscores as spaces, so
    no snake_case identifier reaches a title, legend or table."""
    text = str(name)
    if text in METRIC_LABELS:
        return METRIC_LABELS[text]
    if text.startswith("js_to_final_bits_layer"):
        return f"layer-{text.rsplit('layer', 1)[1]} attention: JS divergence to final (bits)"
    return text.replace("_", " ")


def tick_text(value: float, spacing: float | None = None) -> str:
    """A tick label in plain digits: ``0.01``, ``1.094``, ``250``; ``1e-5`` and ``2e6`` outside
    [0.001, 10⁴). ``spacing`` (the smallest gap between neighbouring ticks) sets the decimals, so
    ticks 1.0938 and 1.0940 stay apart."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    if 1e-3 <= abs(value) < 1e4:
        decimals = 3
        if spacing is not None and spacing > 0:
            decimals = min(8, max(0, -math.floor(math.log10(spacing) + 1e-9) + (0 if _is_power_of_ten(spacing) else 1)))
        text = f"{value:.{decimals}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    mantissa, exponent = f"{value:.3e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _is_power_of_ten(x: float) -> bool:
    return abs(math.log10(x) - round(math.log10(x))) < 1e-9


def plain_log_ticks(ax: Any, axis: str = "both") -> None:
    """Plain tick labels (:func:`tick_text`) on the log-scaled axes of ``ax`` (``"x"``, ``"y"`` or
    ``"both"``), instead of Matplotlib's ``1.115×10⁰``; call after the scales are set. Linear axes
    are left alone."""
    from matplotlib.ticker import LogFormatter

    class _Plain(LogFormatter):
        def set_locs(self, locs: Any = None) -> None:
            super().set_locs(locs)
            ticks = sorted(float(v) for v in (locs if locs is not None else []) if v > 0)
            gaps = [b - a for a, b in zip(ticks, ticks[1:]) if b > a]
            self._spacing = min(gaps) if gaps else None

        def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
            return tick_text(x, getattr(self, "_spacing", None))

    for name in ("x", "y") if axis == "both" else (axis,):
        target = ax.xaxis if name == "x" else ax.yaxis
        if target.get_scale() != "log":
            continue
        target.set_major_formatter(_Plain())
        target.set_minor_formatter(_Plain(labelOnlyBase=False))


def note_if_empty(ax: Any, has_data: bool, note: str) -> None:
    """Write ``note`` in the middle of a panel that has nothing to draw yet, and hide its ticks."""
    if has_data:
        return
    text = ax.text(0.5, 0.5, textwrap.fill(note, 38), ha="center", va="center", fontsize=9, color="#555", transform=ax.transAxes)
    text.set_in_layout(False)
    ax.set_xticks([])
    ax.set_yticks([])
