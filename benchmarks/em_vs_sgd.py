"""Wall time of the full em-vs-sgd reproduction, as a user runs it; side by side with the
authors' script; and where the time of one run goes.

Three modes (by default the paper setting: 5 seeds x sgd and two_timescale x 1000 steps,
T = 2000, reference normalisation and RNG, telemetry every 100 steps):

* plain: runs ``windtunnel reproduce em-vs-sgd`` --repeats times in fresh processes and prints
  the median wall time with a Markdown row for BENCHMARKS.md. The time includes interpreter
  start-up, data, training, evaluation, telemetry and the figures and report.
* ``--side-by-side AUTHORS_SCRIPT``: --repeats pairs, each the authors' multi-seed script
  (arXiv 2512.22473's ``em_vs_sgd_multiseed.py``, run with its defaults in a fresh temporary
  working directory, where it writes em_vs_sgd_results.json; it needs numpy and scipy) and then
  ours. Prints both times per pair, the medians, the ratio (median of the per-pair ratios) as a
  Markdown row, and whether the per-seed final training losses agree to 4 decimals.
* ``--breakdown``: one run of ours under cProfile, split into phases (imports, data, Bayes
  filter, training, telemetry, evaluation, summary, figures, report) from the cumulative times of
  functions that exist in every version of the package since the batched single head, so that
  pointing PYTHONPATH at an older checkout gives the "before" column. Wall-clock of the main
  thread: waits on worker threads count in the phase that waits. Imports made inside a phase
  (lazy imports) count in both that phase and "imports". cProfile adds some overhead.

Usage: python benchmarks/em_vs_sgd.py [--repeats 3] [--out DIR]
           [--side-by-side AUTHORS_SCRIPT | --breakdown] [-- extra CLI options]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

AUTHORS_RESULTS = "em_vs_sgd_results.json"

#: Phases of ``--breakdown``: name -> (file suffix, function name) whose cumulative times add up.
PHASES = {
    "imports": [("<frozen importlib._bootstrap>", "_find_and_load")],
    "data (sampling, incl. Bayes filter)": [("tasks/sticky_markov.py", "sample_each")],
    "  of which Bayes filter": [("tasks/sticky_markov.py", "sticky_bayes_filter")],
    "training (train_steps, incl. telemetry)": [("windtunnel/arms.py", "train_steps")],
    "  of which gradient pass": [("models/single_head.py", "single_head_gradients")],
    "  of which telemetry + law checks (on_step)": [("experiments/em_vs_sgd.py", "on_step")],
    "evaluation": [
        ("models/single_head.py", "predict_logits"),
        ("tasks/sticky_markov.py", "score_predictions"),
    ],
    "summary statistics": [("windtunnel/comparison.py", "summarize_arms")],
    "figures": [
        ("reports/em_vs_sgd.py", "_curves_png"),
        ("reports/em_vs_sgd.py", "_telemetry_png"),
    ],
    "report + results.json": [
        ("reports/em_vs_sgd.py", "report_markdown"),
        ("windtunnel/runs.py", "write_json_atomic"),
    ],
}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _ours(out: str, extra: list[str], *, profile: str | None = None) -> float:
    runner = ["-m", "cProfile", "-o", profile] if profile else []
    command = [sys.executable, *runner, "-m", "windtunnel.cli", "reproduce", "em-vs-sgd"]
    start = time.perf_counter()
    subprocess.run(
        [*command, "--out", out, *extra],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def _authors(script: Path, workdir: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, str(script)],
        cwd=workdir,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def _final_losses_agree(authors_json: Path, ours_json: Path) -> str:
    """Per-seed final training losses, authors' (sgd, em) against ours (sgd, two_timescale)."""
    theirs = json.loads(authors_json.read_text())["per_seed"]
    mine = {s["seed"]: s["arms"] for s in json.loads(ours_json.read_text())["per_seed"]}
    rows, same = [], True
    for entry in theirs:
        arms = mine.get(entry["seed"])
        if arms is None:
            continue
        for their_arm, our_arm in (("sgd", "sgd"), ("em", "two_timescale")):
            a = round(entry[their_arm]["loss"], 4)
            b = round(arms[our_arm]["train"]["loss_nats"], 4)
            same &= a == b
            rows.append(f"seed {entry['seed']} {our_arm}: authors {a:.4f}, ours {b:.4f}")
    verdict = "all equal to 4 decimals" if same else "DIFFER"
    return "\n".join([*rows, f"per-seed final losses: {verdict}"])


def _machine_line() -> str:
    return (
        f"machine: {_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"python {platform.python_version()}"
    )


def _plain(args, out: str) -> None:
    times = []
    for i in range(args.repeats):
        times.append(_ours(out, args.extra))
        print(
            f"run {i + 1}: {times[-1]:.1f} s (1-min load average after the run {_load():.2f})",
            flush=True,
        )
    shown = " ".join(["windtunnel reproduce em-vs-sgd", *args.extra])
    print(f"\n{_machine_line()}")
    print("| machine | command | runs (s) | median wall (s) |")
    print("|---|---|---|---|")
    print(
        f"| {os.cpu_count()}-core {_cpu_name()} | `{shown}` | {', '.join(f'{t:.1f}' for t in times)} | "
        f"**{statistics.median(times):.1f}** |"
    )


def _side_by_side(args, out: str) -> None:
    script = Path(args.side_by_side).resolve()
    if not script.is_file():
        sys.exit(f"--side-by-side: no such file: {script}")
    theirs, ours = [], []
    agreement = ""
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="em-vs-sgd-authors-") as workdir:
            theirs.append(_authors(script, workdir))
            ours.append(_ours(out, args.extra))
            if i == 0:
                agreement = _final_losses_agree(
                    Path(workdir) / AUTHORS_RESULTS, Path(out) / "results.json"
                )
        print(
            f"pair {i + 1}: authors {theirs[-1]:.1f} s, ours {ours[-1]:.1f} s, "
            f"ratio {theirs[-1] / ours[-1]:.2f} (1-min load average {_load():.2f})",
            flush=True,
        )
    ratio = statistics.median(t / o for t, o in zip(theirs, ours))
    shown = " ".join(["windtunnel reproduce em-vs-sgd", *args.extra])
    print(f"\n{agreement}\n\n{_machine_line()}")
    print("| machine | authors' script (s) | ours (s) | median authors / ours (s) | ratio |")
    print("|---|---|---|---|---|")
    print(
        f"| {os.cpu_count()}-core {_cpu_name()} | {', '.join(f'{t:.1f}' for t in theirs)} | "
        f"{', '.join(f'{t:.1f}' for t in ours)} (`{shown}`) | "
        f"{statistics.median(theirs):.1f} / {statistics.median(ours):.1f} | **{ratio:.1f}x** |"
    )


def _breakdown(args, out: str) -> None:
    with tempfile.TemporaryDirectory(prefix="em-vs-sgd-profile-") as tmp:
        profile = str(Path(tmp) / "run.prof")
        wall = _ours(out, args.extra, profile=profile)
        stats = pstats.Stats(profile).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    import windtunnel

    print(f"package: {Path(windtunnel.__file__).parent}")
    print(f"wall {wall:.1f} s (1-min load average after the run {_load():.2f})\n")
    print("| phase | cumulative s | share of wall |")
    print("|---|---|---|")
    for phase, keys in PHASES.items():
        seconds = sum(
            ct
            for (file, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.items()
            for suffix, fn in keys
            if name == fn and file.replace(os.sep, "/").endswith(suffix)
        )
        print(f"| {phase} | {seconds:.2f} | {seconds / wall:.1%} |")
    print(f"| total wall (subprocess, incl. interpreter start-up) | {wall:.2f} | 100% |")
    print(f"\n{_machine_line()}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", default=None, help="output directory of our runs (default: a temporary one)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--side-by-side",
        metavar="AUTHORS_SCRIPT",
        default=None,
        help="path of the authors' em_vs_sgd_multiseed.py: time it against ours, pair by pair",
    )
    mode.add_argument(
        "--breakdown", action="store_true", help="one profiled run of ours, split into phases"
    )
    parser.add_argument(
        "extra", nargs="*", help="extra options for `windtunnel reproduce em-vs-sgd` (after --)"
    )
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="em-vs-sgd-bench-")
    try:
        if args.side_by_side:
            _side_by_side(args, out)
        elif args.breakdown:
            _breakdown(args, out)
        else:
            _plain(args, out)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
