"""Wall time of the full em-vs-sgd reproduction, as a user runs it.

Runs ``windtunnel reproduce em-vs-sgd`` (by default the paper setting: 5 seeds x sgd and
two_timescale x 1000 steps, T = 2000, reference normalisation and RNG, telemetry every 100
steps) --repeats times in fresh processes, and prints the median wall time with a Markdown row
for BENCHMARKS.md. The time includes interpreter start-up, data, training, evaluation, telemetry
and the figures and report.

Usage: python benchmarks/em_vs_sgd.py [--repeats 3] [--out DIR] [-- extra CLI options]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", default=None, help="output directory of the runs (default: a temporary one)"
    )
    parser.add_argument(
        "extra", nargs="*", help="extra options for `windtunnel reproduce em-vs-sgd` (after --)"
    )
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="em-vs-sgd-bench-")
    command = [
        sys.executable,
        "-m",
        "windtunnel.cli",
        "reproduce",
        "em-vs-sgd",
        "--out",
        out,
        *args.extra,
    ]
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(
            f"run {i + 1}: {times[-1]:.1f} s (1-min load average after the run {load:.2f})",
            flush=True,
        )
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    shown = " ".join(["windtunnel reproduce em-vs-sgd", *args.extra])
    print(
        f"\nmachine: {_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}"
    )
    print("| machine | command | runs (s) | median wall (s) |")
    print("|---|---|---|---|")
    print(
        f"| {os.cpu_count()}-core {_cpu_name()} | `{shown}` | {', '.join(f'{t:.1f}' for t in times)} | "
        f"**{statistics.median(times):.1f}** |"
    )


if __name__ == "__main__":
    main()
