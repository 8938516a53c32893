"""Every geometry variant of a run's step-0 model: the initialisation baseline of the scale table.

For each run directory, the model at step 0 is rebuilt from the run's seed (as ``windtunnel
dissociation`` does, :func:`windtunnel.experiments.dissociation.load_checkpoints`) and measured
with :func:`windtunnel.experiments.evaluation.geometry_of_run` on the batch ``windtunnel eval``
measures the trained model on (the first 500 of the held-out sequences, seed 12345). Prints one
Markdown row per variant and writes the same numbers as JSON. Used for RESULTS.md's scale sweep;
run from the repository root:

    python docs/figures/geometry_at_init.py OUT.json LABEL=RUN_DIR [LABEL=RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        raise SystemExit(__doc__)
    import torch

    from windtunnel.experiments.dissociation import load_checkpoints
    from windtunnel.experiments.evaluation import geometry_of_run

    out, pairs = Path(argv[0]), [a.split("=", 1) for a in argv[1:]]
    result = {}
    for label, run in pairs:
        experiment, states = load_checkpoints(run)
        model = experiment.build_model(torch.Generator().manual_seed(0))
        model.load_state_dict(states[0])
        model.eval()
        task = experiment.build_task()
        batch = task.sample(500, generator=torch.Generator().manual_seed(12345))  # eval's first batch
        geometry = geometry_of_run(model, task, batch)
        result[label] = {q: {v: e["value"] for v, e in variants.items()} for q, variants in geometry["quantities"].items()}
    labels = list(result)
    print("| variant at step 0 | " + " | ".join(labels) + " |")
    print("|---|" + "---:|" * len(labels))
    for q, variants in result[labels[0]].items():
        for v in variants:
            cells = ["-" if result[l][q][v] is None else f"{result[l][q][v]:.4g}" for l in labels]
            print(f"| {q}.{v} | " + " | ".join(cells) + " |")
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
