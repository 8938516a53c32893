"""HMM wind-tunnel recipes side by side on one CUDA GPU, each sized to one wall-clock budget.

Each recipe first trains a short probe, all probes at once, to measure its steps/s while the
recipes share the GPU. Then every recipe trains, all at once, for as many whole thousands of steps
as its measured rate fits in ``--train-s`` (at most the recipe's own cap), so the cosine schedule
ends inside the budget. A run still going ``--grace-s`` after the budget is stopped; its latest
checkpoint (every 1,000 steps) stays. Each run is then scored with ``windtunnel eval --lengths 20
--lengths 30 --lengths 50`` (2,000 fresh sequences per K) and a table is printed and written to
``summary.json``. With ``--export DIR`` each run's config, metrics, eval.json and a weights-only
copy of its latest checkpoint (when under 12 MB) are copied to DIR/<name>/ for use elsewhere.

Usage (on a machine with CUDA, from the repository root, without installing):
    PYTHONPATH=src python benchmarks/hmm_gpu_sweep.py --out runs/gpu-sweep --train-s 400 [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from windtunnel.runs import RunDir

# Every recipe: the HMM at K = 20 with the auxiliary belief loss and the position shift (ours;
# RESULTS.md) unless its own options turn them off, evaluated at K = 20, 30, 50 during training.
COMMON = ["--set", "train.aux_loss_weight=1.0", "--set", "train.position_shift=true",
          "--set", "train.eval_every=2000", "--set", "train.checkpoint_every=1000"]
SMALL = ["--preset", "cpu", "--set", "model.n_layers=4", "--set", "train.lr=1e-3"]
RECIPES: dict[str, tuple[list[str], int]] = {
    # name: (options, most steps)
    "4L64-b32": (SMALL, 60_000),  # the 2-core recipe of BENCHMARKS.md, as is
    "4L64-b256": (SMALL + ["--set", "train.batch_size=256"], 60_000),
    "4L128-b256": (SMALL + ["--set", "model.d_model=128", "--set", "model.d_mlp=512", "--set", "train.batch_size=256"], 60_000),
    "4L64-drop-b256": (SMALL + ["--set", "model.dropout=0.1", "--set", "train.batch_size=256"], 60_000),
    "paper-9L256": (["--preset", "paper"], 78_000),  # the paper's model and optimiser, plus the two additions
    "4L128-b32": (SMALL + ["--set", "model.d_model=128", "--set", "model.d_mlp=512"], 60_000),
    "4L128-b32-noshift": (SMALL + ["--set", "model.d_model=128", "--set", "model.d_mlp=512", "--set", "train.position_shift=false"], 60_000),
}


def _train(options: list[str], steps: int, out: Path, env: dict[str, str], device: str, extra: list[str] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "windtunnel", "train", "hmm", *COMMON, "--set", f"train.device={device}", *options, *extra, "--steps", str(steps), "--out", str(out)]
    log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _rows(run: Path, split: str) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("split") == split:
            rows.append(row)
    return rows


def _steps_per_s(run: Path) -> float:
    """Steady-state rate from the train rows, leaving out the first 100 steps (start-up)."""
    rows = [r for r in _rows(run, "train") if r["step"] >= 100]
    if len(rows) < 2:
        raise RuntimeError(f"probe {run.name} logged too few rows; see {run}.log")
    return (rows[-1]["step"] - rows[0]["step"]) / (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"])


def _wait(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, str]:
    status = {}
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            status[name] = "done" if proc.returncode == 0 else f"rc={proc.returncode}"
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()
            status[name] = "stopped at the deadline"
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-s", type=float, default=400.0, help="wall-clock budget of the concurrent training")
    parser.add_argument("--grace-s", type=float, default=45.0)
    parser.add_argument("--only", nargs="*", default=None, choices=sorted(RECIPES))
    parser.add_argument("--export", type=Path, default=None)
    parser.add_argument("--no-eval", action="store_true", help="skip `windtunnel eval` (score the exported runs elsewhere)")
    parser.add_argument("--probe-steps", type=int, default=400, help="steps of each probe (>= 200)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke test of this script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("hmm_gpu_sweep: needs a CUDA device (or --device cpu for a smoke test)")
    names = args.only or list(RECIPES)
    args.out.mkdir(parents=True, exist_ok=False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // len(names)))}
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{device_name}; torch {torch.__version__}; {len(names)} recipes at once", flush=True)

    t0 = time.monotonic()
    probes = {n: _train(RECIPES[n][0], args.probe_steps, args.out / f"probe-{n}", env, args.device, ["--set", "train.warmup_steps=50", "--set", "train.eval_size=100"]) for n in names}
    status = _wait(probes, time.monotonic() + 600)
    rates = {}
    for n in names:
        if status[n] != "done":
            sys.exit(f"probe {n}: {status[n]}; see {args.out}/probe-{n}.log")
        rates[n] = _steps_per_s(args.out / f"probe-{n}")
    print(f"probes took {time.monotonic() - t0:.0f} s", flush=True)

    plan = {n: min(RECIPES[n][1], max(1000, int(rates[n] * args.train_s * 0.9) // 1000 * 1000)) for n in names}
    for n in names:
        print(f"  {n}: {rates[n]:.1f} steps/s sharing the GPU -> {plan[n]} steps", flush=True)
    t1 = time.monotonic()
    runs = {n: _train(RECIPES[n][0], plan[n], args.out / n, env, args.device) for n in names}
    status = _wait(runs, t1 + args.train_s + args.grace_s)
    train_wall = time.monotonic() - t1
    print(f"training took {train_wall:.0f} s", flush=True)
    if args.export is not None:
        _export(args.out, names, args.export)

    evals = {}
    for n in names:
        if not args.no_eval and (args.out / n / "checkpoints" / "latest.pt").exists():
            cmd = [sys.executable, "-m", "windtunnel", "eval", str(args.out / n), "--lengths", "20", "--lengths", "30", "--lengths", "50"]
            evals[n] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(args.out / f"eval-{n}.log", "w"), env=env)  # noqa: SIM115
    _wait(evals, time.monotonic() + 120)

    summary = {"device": device_name, "torch": torch.__version__, "train_wall_s": train_wall, "runs": {}}
    print(f"\n| recipe | steps planned | steps done | status | steps/s (shared) | MAE K=20 | K=30 | K=50 (bits) |", flush=True)
    print("|---|---|---|---|---|---|---|---|")
    for n in names:
        done = max([r["step"] for r in _rows(args.out / n, "train")], default=0)
        path = args.out / n / "eval.json"
        mae = {}
        if path.exists():
            report = json.loads(path.read_text())
            mae = {k: v["entropy_mae_bits"] for k, v in report["summary"].items()}
        summary["runs"][n] = {"steps_planned": plan[n], "steps_done": done, "status": status[n], "probe_steps_per_s": rates[n], "mae_bits": mae}
        cells = " | ".join(f"{mae[f'n_steps={k}']:.4f}" if f"n_steps={k}" in mae else "-" for k in (20, 30, 50))
        print(f"| {n} | {plan[n]} | {done} | {status[n]} | {rates[n]:.1f} | {cells} |", flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.export is not None:
        shutil.copy(args.out / "summary.json", args.export / "summary.json")


def _export(out: Path, names: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for n in names:
        src, dst = out / n, dest / n
        (dst / "checkpoints").mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "metrics.jsonl", "eval.json"):
            if (src / f).exists():
                shutil.copy(src / f, dst / f)
        ckpt = src / "checkpoints" / "latest.pt"
        if ckpt.exists():
            state = RunDir(src).load_checkpoint(ckpt)  # verified, weights_only
            weights = {k: state[k] for k in ("step", "model", "experiment", "device_type") if k in state}
            if sum(v.numel() * v.element_size() for v in weights["model"].values()) < 12e6:
                RunDir(dst).save_checkpoint(weights["step"], weights, keep_every=False)


if __name__ == "__main__":
    main()
