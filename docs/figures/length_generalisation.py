"""Draw the per-step entropy MAE of HMM runs evaluated at several lengths, side by side.

Reads each run's eval.json (``windtunnel eval RUN --lengths 20,30,50``) and
plots, for the longest length, the mean |H_model - H_Bayes| in bits at every step of the
sequence, with the training horizon marked. Used for the RESULTS.md comparison of positional
schemes; run from the repository root:

    python docs/figures/length_generalisation.py OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        raise SystemExit(__doc__)
    from matplotlib.figure import Figure

    out, runs = Path(argv[0]), [a.split("=", 1) for a in argv[1:]]
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    horizon, longest = None, None
    for label, run in runs:
        evaluation = json.loads((Path(run) / "eval.json").read_text(encoding="utf-8"))
        config = json.loads((Path(run) / "config.json").read_text(encoding="utf-8"))
        horizon = config.get("task", {}).get("n_steps", 20)
        name = max(evaluation["per_position"], key=lambda k: int(k.split("=")[-1]) if "=" in k else 0)
        mae = evaluation["per_position"][name]["entropy_mae_bits"]
        longest = len(mae)
        summary = evaluation["summary"]
        means = ", ".join(f"{k.split('=')[-1]}: {v['entropy_mae_bits']:.3f}" for k, v in summary.items())
        ax.plot(range(1, len(mae) + 1), mae, marker=".", label=f"{label} (mean MAE by K, {means})")
    if horizon:
        ax.axvline(horizon + 0.5, color="k", ls=":", label=f"training horizon K = {horizon}")
    from matplotlib.ticker import FormatStrFormatter

    ax.set(xlabel="step t of the sequence", ylabel="entropy MAE (bits)", yscale="log",
           title=f"HMM filtering trained at K = {horizon}, evaluated at K = {longest}")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
