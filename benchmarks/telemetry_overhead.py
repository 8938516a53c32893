"""Training time with and without the telemetry probes of docs/theory.md §8 on the bijection `cpu` preset.

Trains the `bijection/transformer/cpu` preset for --steps steps (default cadence: the probes run
at train.telemetry_steps(--steps)) twice per repeat, once plain and once with
experiments.telemetry.attach_probes (geometry, routing law, calibration, weight snapshots and
manifold projections written to a temporary run directory), and reports the median wall time of
--repeats runs of each. Because a short run has a much denser probe schedule than the
full-length preset, it also measures the mean cost of one probe call and extrapolates the overhead
to the full preset: n_calls(N) x probe_s / (N x step_s) for the preset's N steps. Single-threaded
(torch.set_num_threads(1)) to reduce noise from other jobs on the machine.

Usage: python benchmarks/telemetry_overhead.py [--steps 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from windtunnel.experiments.telemetry import attach_probes
from windtunnel.presets import apply_overrides, get_preset
from windtunnel.train import Trainer, telemetry_steps


def _run(steps: int, probes: bool) -> tuple[float, float]:
    """(wall seconds of fit, seconds spent inside probes)."""
    experiment = apply_overrides(get_preset("bijection", "transformer", "cpu"), [f"train.steps={steps}", "train.device=cpu"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(experiment, tmp)
        probe_s = 0.0
        if probes:
            attach_probes(trainer)
            timed = []
            for probe in trainer.probes:
                def wrapped(model, step, probe=probe):
                    nonlocal probe_s
                    start = time.perf_counter()
                    rows = probe(model, step)
                    probe_s += time.perf_counter() - start
                    return rows
                timed.append(wrapped)
            trainer.probes = timed
        start = time.perf_counter()
        trainer.fit()
        return time.perf_counter() - start, probe_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    plain, probed, inside = [], [], []
    for _ in range(args.repeats):
        plain.append(_run(args.steps, False)[0])
        wall, probe_s = _run(args.steps, True)
        probed.append(wall)
        inside.append(probe_s)
    n_calls = len(telemetry_steps(args.steps))
    base, tel = statistics.median(plain), statistics.median(probed)
    step_s = base / args.steps
    call_s = statistics.median(inside) / n_calls
    full_steps = get_preset("bijection", "transformer", "cpu").train.steps
    full_calls = len(telemetry_steps(full_steps))
    print(f"| steps | probe calls | plain (s) | with probes (s) | overhead | per probe call (s) | per step (s) |")
    print(f"|---|---|---|---|---|---|---|")
    print(f"| {args.steps} | {n_calls} | {base:.1f} | {tel:.1f} | {100 * (tel - base) / base:+.1f} % | {call_s:.3f} | {step_s:.4f} |")
    print(f"\nplain runs: {[round(t, 1) for t in plain]}; with probes: {[round(t, 1) for t in probed]}")
    print(f"extrapolated to the full {full_steps}-step preset: {full_calls} probe calls x {call_s:.3f} s / "
          f"({full_steps} x {step_s:.4f} s) = {100 * full_calls * call_s / (full_steps * step_s):.1f} % overhead")


if __name__ == "__main__":
    main()
