"""Batched HMM posteriors vs per-sequence Python-loop filters (SPEC §11.11).

Samples a batch of fresh HMMs from ``HMMFiltering`` and times
  * ``hmm_posterior``: the library call end to end, from integer cents to the filtered,
    predicted and next-state beliefs; the recursion runs in probability space (no logs);
  * ``hmm_posterior``'s log-space route, ``forward_filter`` on the logs of the cents plus the
    next-state product: what ``hmm_posterior`` did before, and still does when some belief would
    underflow;
  * ``forward_filter``: the batched filter's log-space API alone (log inputs prepared beforehand;
    the same probability-space recursion inside, with exp and log around it);
  * the batched recursion kept in log space throughout (the path ``forward_filter`` falls back to);
  * reference filters written here that loop over sequences and steps: in log space with one
    logsumexp per next state, as the reference code's filters do (SPEC §11.11); in numpy with one
    small matrix-vector product per step (the fastest loop we could write); in plain Python lists.
``hmm_posterior`` is timed twice: with repeated calls reusing already-mapped memory, and (where
glibc's ``malloc_trim`` exists) with freed memory handed back to the OS before every call, so
that its ~4 MB of buffers cost first-touch page faults each time.
Prints a table of median times and, for every row, its CPU time divided by ``hmm_posterior``'s:
for the loops that is the speedup of the batched call (loop time ÷ batched time). Checks first
that every implementation agrees to 1e-12. Torch runs single-threaded by default: the kernels are
tiny, and on a shared machine extra threads only add contention. Speedups use process CPU time,
which other processes on a shared machine disturb far less than wall time.

Run: ``python benchmarks/posteriors.py [--batch 1000] [--steps 50] [--repeats 7] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import math
import platform
import statistics
import time

import numpy as np
import torch

from windtunnel.tasks import HMMFiltering, forward_filter, hmm_posterior
from windtunnel.tasks.filtering import _log_space_filter
from windtunnel.tasks.hmm import _log_space_posterior


def _logsumexp(x: np.ndarray) -> float:
    top = x.max()
    return float(top + np.log(np.exp(x - top).sum()))


def loop_filter_log_numpy(transition: np.ndarray, emission: np.ndarray, observations: np.ndarray):
    """Filtered p(s_t | o_1:t) per sequence, per step and per next state, in log space."""
    batch, n_steps = observations.shape
    n_states = transition.shape[-1]
    out = np.empty((batch, n_steps, n_states))
    for b in range(batch):
        log_t, log_e = np.log(transition[b]), np.log(emission[b])
        log_alpha = np.full(n_states, -np.log(n_states)) + log_e[:, observations[b, 0]]
        log_alpha -= _logsumexp(log_alpha)
        out[b, 0] = np.exp(log_alpha)
        for t in range(1, n_steps):
            log_alpha = (
                np.array([_logsumexp(log_alpha + log_t[:, j]) for j in range(n_states)])
                + log_e[:, observations[b, t]]
            )
            log_alpha -= _logsumexp(log_alpha)
            out[b, t] = np.exp(log_alpha)
    return out


def loop_filter_numpy(transition: np.ndarray, emission: np.ndarray, observations: np.ndarray):
    """Filtered p(s_t | o_1:t) one sequence and one step at a time, in probability space."""
    batch, n_steps = observations.shape
    n_states = transition.shape[-1]
    out = np.empty((batch, n_steps, n_states))
    for b in range(batch):
        belief = np.full(n_states, 1.0 / n_states)
        for t in range(n_steps):
            if t > 0:
                belief = belief @ transition[b]
            belief = belief * emission[b, :, observations[b, t]]
            belief = belief / belief.sum()
            out[b, t] = belief
    return out


def loop_filter_python(transition: list, emission: list, observations: list):
    """The same filter in plain Python floats and lists."""
    out = []
    for trans, emit, obs in zip(transition, emission, observations):
        n_states = len(trans)
        belief = [1.0 / n_states] * n_states
        rows = []
        for t, o in enumerate(obs):
            if t > 0:
                belief = [
                    sum(belief[i] * trans[i][j] for i in range(n_states)) for j in range(n_states)
                ]
            belief = [belief[j] * emit[j][o] for j in range(n_states)]
            total = sum(belief)
            belief = [x / total for x in belief]
            rows.append(belief)
        out.append(rows)
    return out


def median_times_s(fn, repeats: int, before=None) -> tuple[float, float]:
    """Median wall-clock and median process CPU time of ``fn()`` over ``repeats`` runs.

    ``before``, if given, runs untimed before every call.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        if before is not None:
            before()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return statistics.median(walls), statistics.median(cpus)


def release_freed_memory():
    """glibc's ``malloc_trim(0)``, which hands freed heap pages back to the OS; None elsewhere.

    Run before a call, it makes that call's large buffers fresh pages again: each first touch of a
    4 KiB page then costs a page fault, as in a process whose allocator has not yet kept such
    blocks mapped. Without it, repeated calls reuse pages that are already mapped.
    """
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    return None if trim is None else (lambda: trim(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--python-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    task = HMMFiltering(n_steps=args.steps)
    batch = task.sample(args.batch, generator=torch.Generator().manual_seed(args.seed))
    trans_cents, emit_cents, obs = batch.transition_cents, batch.emission_cents, batch.observations

    # Inputs of the bare filter, prepared outside the timing.
    log_t = torch.log(trans_cents.double() / 100)
    log_e = torch.log(emit_cents.double() / 100)
    index = obs.unsqueeze(-2).expand(-1, task.n_states, -1)
    log_lik = log_e.gather(-1, index).transpose(-1, -2)
    log_init = torch.full((task.n_states,), -math.log(task.n_states), dtype=torch.float64)

    trans_np, emit_np, obs_np = (trans_cents.numpy() / 100, emit_cents.numpy() / 100, obs.numpy())
    trans_py, emit_py, obs_py = trans_np.tolist(), emit_np.tolist(), obs_np.tolist()

    def log_route():
        # What hmm_posterior did before: logs of the cents, forward_filter, next-state product.
        return _log_space_posterior(trans_cents.double() / 100, emit_cents.double() / 100, obs)

    # Agreement first (also warms up every path).
    batched = hmm_posterior(trans_cents, emit_cents, obs)
    via_logs = log_route()
    bare = forward_filter(log_init, log_t, log_lik).log_filtered_probs.exp()
    ref_np = torch.from_numpy(loop_filter_numpy(trans_np, emit_np, obs_np))
    ref_py = torch.tensor(loop_filter_python(trans_py, emit_py, obs_py), dtype=torch.float64)
    ref_log = torch.from_numpy(loop_filter_log_numpy(trans_np, emit_np, obs_np))
    log_space = _log_space_filter(log_init.expand(args.batch, -1), log_t, log_lik)
    max_diff = max(
        (x - ref_np).abs().max().item()
        for x in (
            batched.filtered_probs,
            via_logs.filtered_probs,
            bare,
            ref_py,
            ref_log,
            log_space.log_filtered_probs.exp(),
        )
    )
    for name in ("predicted_probs", "next_state_probs"):
        max_diff = max(
            max_diff, (getattr(batched, name) - getattr(via_logs, name)).abs().max().item()
        )
    if max_diff > 1e-12:
        raise SystemExit(f"implementations disagree: max |diff| = {max_diff:.3g}")

    rows = [
        (
            "hmm_posterior (batched, end to end)",
            median_times_s(lambda: hmm_posterior(trans_cents, emit_cents, obs), args.repeats),
        ),
        ("hmm_posterior's log-space route", median_times_s(log_route, args.repeats)),
    ]
    trim = release_freed_memory()
    if trim is not None:
        rows.append(
            (
                "hmm_posterior, fresh pages every call",
                median_times_s(
                    lambda: hmm_posterior(trans_cents, emit_cents, obs), args.repeats, before=trim
                ),
            )
        )
    rows += [
        (
            "forward_filter (batched, log API)",
            median_times_s(lambda: forward_filter(log_init, log_t, log_lik), args.repeats),
        ),
        (
            "batched, log space throughout",
            median_times_s(
                lambda: _log_space_filter(log_init.expand(args.batch, -1), log_t, log_lik),
                args.repeats,
            ),
        ),
        (
            "loop over sequences, log space",
            median_times_s(
                lambda: loop_filter_log_numpy(trans_np, emit_np, obs_np), args.python_repeats
            ),
        ),
        (
            "loop over sequences, numpy per step",
            median_times_s(
                lambda: loop_filter_numpy(trans_np, emit_np, obs_np), args.python_repeats
            ),
        ),
        (
            "loop over sequences, plain Python",
            median_times_s(
                lambda: loop_filter_python(trans_py, emit_py, obs_py), args.python_repeats
            ),
        ),
    ]
    print(
        f"HMM filtering posteriors: batch {args.batch}, K = {args.steps} steps, "
        f"{task.n_states} states x {task.n_symbols} symbols, float64"
    )
    machine = platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, {machine}, "
        f"torch threads {torch.get_num_threads()}; max |diff| between implementations "
        f"{max_diff:.1e}"
    )
    print()
    ratio_head = "CPU ÷ hmm_posterior CPU"
    print(f"| {'implementation':<38} | wall (ms) |  CPU (ms) | {ratio_head} |")
    print(f"|{'-' * 40}|{'-' * 10}:|{'-' * 10}:|{'-' * (len(ratio_head) + 1)}:|")
    batched_cpu_s = rows[0][1][1]
    for name, (wall, cpu) in rows:
        ratio = f"{cpu / batched_cpu_s:.1f}x"
        print(
            f"| {name:<38} | {wall * 1e3:>9.2f} | {cpu * 1e3:>9.2f} | "
            f"{ratio:>{len(ratio_head)}} |"
        )
    print()
    print("Speedup of hmm_posterior over each loop (loop CPU time ÷ hmm_posterior CPU time):")
    loops = [(name, cpu) for name, (_, cpu) in rows if name.startswith("loop")]
    for name, cpu in loops:
        print(f"  {name}: {cpu / batched_cpu_s:.0f}x")
    if trim is not None:
        fresh_cpu_s = rows[2][1][1]
        print("... and over each loop when hmm_posterior gets fresh pages every call:")
        for name, cpu in loops:
            print(f"  {name}: {cpu / fresh_cpu_s:.0f}x")

if __name__ == "__main__":
    main()
