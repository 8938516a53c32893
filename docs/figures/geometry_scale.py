"""Calibration and every geometry variant across sweeps (one sweep per model size), side by side.

Reads each sweep's summary.json (``windtunnel sweep``; the geometry columns
``geometry.QUANTITY.VARIANT`` appear once the trials are evaluated with ``windtunnel eval`` and
the sweep command is rerun) and draws four panels against the sweeps, in the order given:
calibration (entropy MAE and KL, bits), layer-0 key orthogonality, value-manifold PC1 share and
attention focusing, each variant one line (mean over seeds, 95 % interval as error bars), with the
paper's numbers (windtunnel.paper_numbers, docs/theory.md §8.9) as shaded bands. Prints the same numbers as a Markdown table
(mean, and ± std over seeds with n where n > 1). Used for the RESULTS.md scale sweep; run from the
repository root:

    python docs/figures/geometry_scale.py OUT.png LABEL=SWEEP_DIR[,SWEEP_DIR...] [LABEL=...]

Several sweeps after one label are pooled (their finished trials, e.g. more seeds of one model).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

CALIBRATION = ("entropy_mae_bits", "kl_bits")
PANELS = {  # quantity: (title, the windtunnel.paper_numbers entries drawn as bands)
    "key_orthogonality": ("layer-0 key orthogonality (mean |cos|; signed for vocabulary_signed)",
                          ("bijection.transformer.key_orthogonality", "bijection.transformer.weight_columns")),
    "value_manifold_pc1_share": ("value-manifold PC1 share of variance",
                                 ("bijection.transformer.value_manifold", "bijection.transformer.value_manifold_target")),
    "focusing_ratio": ("attention focusing (H first - H last) / H first", ("bijection.transformer.focusing",)),
}
PAPER_MAE = "bijection.transformer.entropy_mae"
"""The paper number drawn as a line on the calibration panel."""


def paper_bands(quantity: str) -> list[tuple[float, float, str]]:
    """(low, high, label) of each paper band drawn on ``quantity``'s panel, read from
    windtunnel.paper_numbers (docs/theory.md §10): a range as a shaded band, a single number or a
    one-sided bound ("> 80 %") as a line (low = high)."""
    from windtunnel.paper_numbers import REPOSITORY, paper_number

    out = []
    for key in PANELS[quantity][1]:
        number = paper_number(key)
        if number.low is None and number.high is None:
            raise SystemExit(f"paper number {key} states no band")
        low = number.low if number.low is not None else number.high
        high = number.high if number.high is not None else number.low
        first = number.source.split("; ")[0]
        where = first.split(", ")[1] if first.startswith(REPOSITORY) else first.split(", ")[0]
        out.append((low, high, f"{number.quantity}: {number.paper} ({where})"))
    return out


def _groups(sweep_dirs: list[Path]) -> dict[str, dict[str, float]]:
    """metric -> {mean, std, ci_low, ci_high, n} over the finished trials of the sweeps (their
    summary.json rows, pooled: several sweeps of one model, e.g. more seeds in a second sweep)."""
    from windtunnel.comparison import seed_statistics

    rows = []
    for sweep_dir in sweep_dirs:
        summary = json.loads((sweep_dir / "summary.json").read_text(encoding="utf-8"))
        if len(summary["groups"]) != 1:
            raise SystemExit(f"{sweep_dir}: expected one grid point per sweep, found {len(summary['groups'])}")
        rows += [r for r in summary["trials"] if r["status"] == "finished"]
    names = {k for r in rows for k, v in r.items() if k in CALIBRATION or k == "wall_s" or k.startswith("geometry.")}
    out = {}
    for name in names:
        values = [r[name] for r in rows if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
        if values:
            out[name] = seed_statistics(values, ddof=1)
    return out


def _random_baseline(sweep_dirs: list[Path]) -> float | None:
    """E|cos| of random directions in R^{d_head} for the sweep's model."""
    configs = sorted((sweep_dirs[0] / "runs").glob("*/config.json"))
    if not configs:
        return None
    from windtunnel.geometry import random_abs_cosine

    model = json.loads(configs[0].read_text(encoding="utf-8"))["model"]
    return random_abs_cosine(model["d_model"] // model["n_heads"])


def _variant_order() -> list[str]:
    """geometry.QUANTITY.VARIANT in the order of windtunnel.probes.GEOMETRY_VARIANTS (ours first)."""
    from windtunnel.probes import GEOMETRY_VARIANTS

    return [f"geometry.{q}.{v}" for q, variants in GEOMETRY_VARIANTS.items() for v in variants]


def table(labels: list[str], stats: list[dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per metric (calibration, then geometry.*), one column per sweep."""
    names = [m for m in CALIBRATION if any(m in s for s in stats)]
    names += [m for m in _variant_order() if any(m in s for s in stats)]
    names += [m for m in ("wall_s",) if any(m in s for s in stats)]

    def cell(entry: dict[str, float] | None) -> str:
        if not entry or entry.get("mean") is None:
            return "-"
        text = f"{entry['mean']:.4g}"
        if entry.get("n", 1) > 1 and entry.get("std") is not None:
            text += f" ± {entry['std']:.2g} (n = {entry['n']})"
        return text

    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for name in names:
        lines.append(f"| {name.removeprefix('geometry.')} | " + " | ".join(cell(s.get(name)) for s in stats) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        raise SystemExit(__doc__)
    from matplotlib.figure import Figure

    out, pairs = Path(argv[0]), [a.split("=", 1) for a in argv[1:]]
    labels = [label for label, _ in pairs]
    dirs = [[Path(d) for d in text.split(",")] for _, text in pairs]
    stats = [_groups(d) for d in dirs]
    print(table(labels, stats))
    xs = list(range(len(labels)))
    fig = Figure(figsize=(13, 9.5), layout="constrained")
    axes = fig.subplots(2, 2)

    def line(ax, metric: str, label: str, **style) -> None:
        points = [(x, s[metric]) for x, s in zip(xs, stats) if metric in s and s[metric].get("mean") is not None]
        if not points:
            return
        ys = [e["mean"] for _, e in points]
        err = [[e["mean"] - e["ci_low"] if e.get("ci_low") is not None else 0.0 for _, e in points],
               [e["ci_high"] - e["mean"] if e.get("ci_high") is not None else 0.0 for _, e in points]]
        ax.errorbar([x for x, _ in points], ys, yerr=err, marker="o", capsize=3, label=label, **style)

    ax = axes[0][0]
    for metric in CALIBRATION:
        line(ax, metric, metric.replace("_bits", " (bits)").replace("_", " "))
    from windtunnel.paper_numbers import paper_number

    mae = paper_number(PAPER_MAE)
    ax.axhline(mae.value, color="grey", ls=":", label=f"paper MAE {mae.paper} bits (6L/6H/192, 50k steps x 256)")
    ax.set(yscale="log", title="calibration on 2,000 held-out sequences", ylabel="bits")
    for ax, (quantity, (title, _)) in zip((axes[0][1], axes[1][0], axes[1][1]), PANELS.items()):
        variants = [m.split(".", 2)[2] for m in _variant_order() if m.startswith(f"geometry.{quantity}.") and any(m in s for s in stats)]
        for variant in variants:
            line(ax, f"geometry.{quantity}.{variant}", variant, ls="-" if "zscored" in variant or quantity != "value_manifold_pc1_share" else "--")
        for low, high, text in paper_bands(quantity):
            if low == high:
                ax.axhline(low, color="grey", ls=":", label=text)
            else:
                ax.axhspan(low, high, color="grey", alpha=0.2, label=text)
        if quantity == "key_orthogonality":
            base = [_random_baseline(d) for d in dirs]
            ax.plot(xs, base, "kx", ms=9, label="random directions in R^d_head")
        ax.set(title=title)
    for ax in axes.flat:
        ax.set_xticks(xs, labels)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Bijection: calibration and every geometry definition against model size (matched reduced budget)")
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
