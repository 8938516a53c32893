"""HMM wind-tunnel recipes side by side on one CUDA GPU, through ``windtunnel sweep``.

The recipes are one sweep: TinyGPT 4L/4H (FFN 256) at width 64 and 128, with and without the
position shift, all with the auxiliary belief loss (ours; RESULTS.md), K = 20, evaluated at
K = 20, 30, 50 during training (1,000 sequences per K). ``--gpus-per-trial`` (default 1 / the
number of recipes) puts them all on the one GPU at once, each in its own worker process; each
trial is an ordinary run directory under OUT/runs/ (``windtunnel eval RUN --lengths 20,30,50``
scores one on 2,000 fresh sequences per K). The sweep's tables
(``windtunnel compare``, one per K) and its wall time are printed.

This replaces the scheduler this script used to carry (concurrent ``windtunnel train``
processes, a step-rate probe and a wall-clock budget): the sweep runs, resumes after a kill
(rerun the same command) and summarises. Give ``--steps`` instead of a time budget.

Usage (on a machine with CUDA, from the repository root, without installing):
    PYTHONPATH=src python benchmarks/hmm_gpu_sweep.py --out runs/gpu-sweep --steps 12000 [--seeds 0-2]
    PYTHONPATH=src python benchmarks/hmm_gpu_sweep.py --out runs/gpu-sweep-smoke --steps 20 --device cpu   (a smoke test)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

RECIPE = ["--preset", "cpu", "--set", "model.n_layers=4", "--set", "train.lr=1e-3", "--set", "train.aux_loss_weight=1.0",
          "--set", "train.eval_every=2000", "--set", "train.checkpoint_every=1000"]
GRID = ["--grid", "model.d_model=64,128", "--grid", "train.position_shift=true,false"]
N_RECIPES = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12_000)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--gpus-per-trial", type=float, default=1 / N_RECIPES)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke test of this script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("hmm_gpu_sweep: needs a CUDA device (or --device cpu for a smoke test)")
    wt = [sys.executable, "-m", "windtunnel"]
    gpus = args.gpus_per_trial if args.device == "cuda" else 0.0
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{device_name}; torch {torch.__version__}; {N_RECIPES} recipes x seeds {args.seeds}, {gpus:g} GPU per trial", flush=True)
    start = time.monotonic()
    cmd = [*wt, "sweep", "hmm", *RECIPE, *GRID, "--seeds", args.seeds, "--steps", str(args.steps),
           "--gpus-per-trial", str(gpus), "--out", str(args.out)]
    done = subprocess.run(cmd)
    wall = time.monotonic() - start
    print(f"sweep: exit status {done.returncode}, {wall:.0f} s", flush=True)
    for metric in ("entropy_mae_bits", "eval_len30.entropy_mae_bits", "eval_len50.entropy_mae_bits"):
        subprocess.run([*wt, "compare", str(args.out), "--metric", metric, "--out", str(args.out / f"compare-{metric}.png")], check=False)


if __name__ == "__main__":
    main()
