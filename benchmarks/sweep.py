"""Four small trials: ``windtunnel sweep`` on the local backend against running them one after another.

The trials: the bijection cpu preset's model (TinyGPT 2L/4H/64) at batch 32, 2 seeds x 2
learning rates, ``--steps`` steps each, evaluated on 500 held-out sequences at the end. Three ways, each as a
fresh process from the command line, wall time from launch to exit:

* ``train x4``: four ``windtunnel train`` commands one after another (torch's default threads);
* ``sweep --workers 1``: the sweep, one trial at a time in one worker with all the cores;
* ``sweep --workers 1 --threads 1``: one trial at a time, one torch thread;
* ``sweep``: the sweep's default, one worker per core, one torch thread each.

The three are interleaved within each repeat, so that a change of the machine's load hits them
alike; the table gives the median over the repeats.

Usage (from the repository root): PYTHONPATH=src python benchmarks/sweep.py [--steps 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON = ["--set", "train.batch_size=32", "--set", "train.eval_size=500", "--set", "train.warmup_steps=20"]
SEEDS, LRS = (0, 1), ("1e-3", "3e-3")


def _run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    wt = [sys.executable, "-m", "windtunnel"]
    steps = ["--steps", str(args.steps), "--set", f"train.eval_every={args.steps}", "--set", f"train.checkpoint_every={args.steps}"]
    times: dict[str, list[float]] = {"train x4": [], "sweep --workers 1": [], "sweep --workers 1 --threads 1": [], "sweep": []}
    root = Path(tempfile.mkdtemp(prefix="wt-sweep-bench-"))
    try:
        for r in range(args.repeats):
            def serial() -> None:
                for lr in LRS:
                    for seed in SEEDS:
                        subprocess.run([*wt, "train", "bijection", "--seed", str(seed), "--set", f"train.lr={lr}", *COMMON, *steps,
                                        "--out", str(root / f"serial{r}-{lr}-{seed}")], check=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

            start = time.perf_counter()
            serial()
            times["train x4"].append(time.perf_counter() - start)
            sweep = [*wt, "sweep", "bijection", "--seeds", ",".join(map(str, SEEDS)), "--grid", f"train.lr={','.join(LRS)}", *COMMON, *steps]
            times["sweep --workers 1"].append(_run([*sweep, "--workers", "1", "--out", str(root / f"one{r}")]))
            times["sweep --workers 1 --threads 1"].append(_run([*sweep, "--workers", "1", "--threads", "1", "--out", str(root / f"thin{r}")]))
            times["sweep"].append(_run([*sweep, "--out", str(root / f"pool{r}")]))
            print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(times["train x4"])
    print(f"\n{os.cpu_count()} cores; 4 trials x {args.steps} steps; median of {args.repeats} repeats\n")
    print("| how | wall time (s) | runs (s) | vs train x4 |")
    print("|---|---:|---|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {', '.join(f'{v:.1f}' for v in values)} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()
