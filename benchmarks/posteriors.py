"""Batched HMM posteriors vs per-sequence Python-loop filters and dynamax's HMM filter.

Samples a batch of fresh HMMs from ``HMMFiltering`` and times
  * ``hmm_posterior``: the library call end to end, from integer cents to the filtered,
    predicted and next-state beliefs; the recursion runs in probability space (no logs), zero
    cents included;
  * ``hmm_posterior``'s log-space route, ``forward_filter`` on the logs of the cents plus the
    next-state product: what ``hmm_posterior`` did before, and still does when some positive
    belief would underflow;
  * ``forward_filter``: the batched filter's log-space API alone (log inputs prepared beforehand;
    the same probability-space recursion inside, with exp and log around it);
  * the batched recursion kept in log space throughout (the path ``forward_filter`` falls back to);
  * reference filters written here that loop over sequences and steps: in log space with one
    logsumexp per next state, as the papers' reference code does; in numpy with one
    small matrix-vector product per step (the fastest loop we could write); in plain Python lists.
``hmm_posterior`` is timed twice: with repeated calls reusing already-mapped memory, and (where
glibc's ``malloc_trim`` exists) with freed memory handed back to the OS before every call, so
that its ~4 MB of buffers cost first-touch page faults each time.
Prints a table of median times and, for every row, its CPU time divided by ``hmm_posterior``'s:
for the loops that is the speedup of the batched call (loop time ÷ batched time). Checks first
that every implementation agrees to 1e-12. Torch runs single-threaded by default: the kernels are
tiny, and on a shared machine extra threads only add contention. Speedups use process CPU time,
which other processes on a shared machine disturb far less than wall time.

Then, side by side in the same process, ``hmm_posterior`` against dynamax's ``hmm_filter``
(JAX, ``jit`` of a ``vmap`` over sequences, float64, XLA on one thread when ``--threads 1``) from
the same cents and observations to the filtered and predicted beliefs, for two kinds of input:
rows with no zero entry (``HMMFiltering``'s HMMs) and Dirichlet(1) rows quantised to the 0.01
grid with no floor, which may contain a zero cent (observations drawn from each model, so every
posterior exists); at each ``--dynamax-batches`` size. A third call is the stricter peer:
dynamax's filter alone, given T in probabilities and the log-likelihoods, prepared outside the
timing. JAX compiles before the timing; the calls alternate, and each row reports the median of
``--dynamax-repeats`` calls of each. All must agree to 1e-12 first. JAX and dynamax are optional:
without them this part prints why it is skipped.

Run: ``python benchmarks/posteriors.py [--batch 1000] [--steps 50] [--repeats 7] [--threads 1]
[--part all|loops|dynamax] [--dynamax-batches 1000 100000] [--dynamax-repeats 3]``."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import math
import os
import platform
import statistics
import time

import numpy as np
import torch

from windtunnel.tasks import HMMFiltering, forward_filter, hmm_posterior, quantise_rows
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
    parser.add_argument("--part", choices=("all", "loops", "dynamax"), default="all")
    parser.add_argument("--dynamax-batches", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--dynamax-repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("all", "loops"):
        loop_table(args)
    if args.part in ("all", "dynamax"):
        if args.part == "all":
            print()
        dynamax_table(args)


def loop_table(args: argparse.Namespace) -> None:
    """The batched implementations and the per-sequence loops at ``--batch`` (no zero cents)."""
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

def grid_hmms_with_zero_cents(
    batch: int, n_states: int, n_symbols: int, n_steps: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HMMs whose rows may contain a zero cent, with observations drawn from each model.

    Rows are Dirichlet(1) draws (normalised Exponential(1) draws) quantised to the 0.01 grid by
    ``quantise_rows`` with no floor, so an entry below half a cent becomes a zero (about one
    entry in 50 for 5-wide rows). The states and observations are drawn from the quantised
    model, so every observation sequence has positive probability.

    Returns:
        (transition_cents long [batch, S, S], emission_cents long [batch, S, O], observations
        long [batch, n_steps]).
    """

    def rows(width: int) -> torch.Tensor:
        u = torch.rand(batch, n_states, width, generator=generator, dtype=torch.float64)
        draws = -torch.log1p(-u)
        return quantise_rows(draws / draws.sum(-1, keepdim=True), floor=0.0, grid=0.01)

    transition, emission = rows(n_states), rows(n_symbols)
    trans_cum, emit_cum = transition.cumsum(-1), emission.cumsum(-1)
    index = torch.arange(batch)

    def draw(cum_rows: torch.Tensor) -> torch.Tensor:
        # The first cumulative sum above r, r uniform on 0..99: index j with probability cents/100.
        r = torch.randint(100, (batch, 1), generator=generator)
        return (cum_rows <= r).sum(-1)

    observations = torch.empty(batch, n_steps, dtype=torch.long)
    state = torch.randint(n_states, (batch,), generator=generator)
    for t in range(n_steps):
        if t > 0:
            state = draw(trans_cum[index, state])
        observations[:, t] = draw(emit_cum[index, state])
    return transition, emission, observations


def dynamax_table(args: argparse.Namespace) -> None:
    """``hmm_posterior`` against dynamax's ``hmm_filter`` on both input kinds, same process."""
    if args.threads == 1:
        # XLA's CPU client on one thread; read when JAX initialises its backend, so set first.
        os.environ.setdefault(
            "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices from dynamax's dependencies
            import jax
            import jax.numpy as jnp
            from dynamax.hidden_markov_model import hmm_filter
    except ImportError as error:
        print(
            f"dynamax rows skipped: JAX and dynamax are not installed ({error}); "
            "`pip install jax dynamax` in the benchmark's environment to run them."
        )
        return
    jax.config.update("jax_enable_x64", True)

    def dynamax_beliefs(trans_cents, emit_cents, observations):
        # The same inputs as hmm_posterior: cents and symbols, to float64 beliefs.
        n_states = trans_cents.shape[-1]
        emit = emit_cents / 100.0
        # log p(o_t | s), [batch, n_steps, S]: the observed column of E (log 0 = -inf).
        columns = jnp.take_along_axis(emit, observations[:, None, :].repeat(n_states, 1), 2)
        initial = jnp.full(n_states, 1.0 / n_states)
        post = jax.vmap(hmm_filter, in_axes=(None, 0, 0))(
            initial, trans_cents / 100.0, jnp.log(columns).transpose(0, 2, 1)
        )
        return post.filtered_probs, post.predicted_probs

    dynamax_call = jax.jit(dynamax_beliefs)

    def filter_alone(trans, log_lik):
        # The stricter peer: dynamax given float64 T and log-likelihoods [batch, n_steps, S].
        initial = jnp.full(trans.shape[-1], 1.0 / trans.shape[-1])
        post = jax.vmap(hmm_filter, in_axes=(None, 0, 0))(initial, trans, log_lik)
        return post.filtered_probs, post.predicted_probs

    filter_alone_call = jax.jit(filter_alone)
    versions = (
        f"torch {torch.__version__}, jax {jax.__version__}, "
        f"dynamax {_version('dynamax')}, torch threads {torch.get_num_threads()}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    print(f"hmm_posterior vs dynamax hmm_filter: K = {args.steps} steps, 5 states x 5 symbols, "
          f"float64; median of {args.dynamax_repeats} alternating calls each, JAX compile excluded")
    print(versions)
    print()
    print(
        "| input rows | batch | windtunnel CPU (ms) | dynamax CPU (ms) | ratio | dynamax filter "
        "alone CPU (ms) | ratio | walls: windtunnel, dynamax, filter alone (ms) | max abs diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for batch_size in args.dynamax_batches:
        for kind in ("no zero", "may contain a zero cent"):
            generator = torch.Generator().manual_seed(args.seed + batch_size)
            if kind == "no zero":
                sample = HMMFiltering(n_steps=args.steps).sample(batch_size, generator=generator)
                inputs = (sample.transition_cents, sample.emission_cents, sample.observations)
                del sample
            else:
                inputs = grid_hmms_with_zero_cents(batch_size, 5, 5, args.steps, generator)
            n_zero = int((inputs[0] == 0).sum() + (inputs[1] == 0).sum())
            on_jax = [jnp.asarray(x.numpy()) for x in inputs]
            # The filter-alone inputs, prepared outside the timing: T in probabilities and
            # log p(o_t | s) [batch, n_steps, S] (log 0 = -inf).
            trans_cents, emit_cents, observations = inputs
            n_states = trans_cents.shape[-1]
            index = observations.unsqueeze(-2).expand(-1, n_states, -1)
            log_lik = torch.log(emit_cents.double() / 100).gather(-1, index).transpose(1, 2)
            prepared = (
                jnp.asarray(trans_cents.double().numpy() / 100),
                jnp.asarray(log_lik.numpy()),
            )
            del log_lik

            calls = {
                "windtunnel": lambda inputs=inputs: hmm_posterior(*inputs),
                "dynamax": lambda on_jax=on_jax: jax.block_until_ready(dynamax_call(*on_jax)),
                "filter alone": lambda prepared=prepared: jax.block_until_ready(
                    filter_alone_call(*prepared)
                ),
            }
            # Agreement first; this also compiles the JAX functions and warms all three up.
            ours = calls["windtunnel"]()
            max_diff = 0.0
            for name in ("dynamax", "filter alone"):
                filtered, predicted = calls[name]()
                pairs = ((ours.filtered_probs, filtered), (ours.predicted_probs, predicted))
                for mine, theirs in pairs:
                    diff = (mine - torch.from_numpy(np.array(theirs))).abs().max().item()
                    max_diff = max(max_diff, diff) if diff == diff else math.nan
                del filtered, predicted
            del ours
            if not max_diff <= 1e-12:
                raise SystemExit(f"hmm_posterior and dynamax disagree: max |diff| = {max_diff:.3g}")
            times = {name: ([], []) for name in calls}
            for _ in range(args.dynamax_repeats):
                for name, fn in calls.items():
                    wall, cpu = time.perf_counter(), time.process_time()
                    out = fn()
                    times[name][1].append(time.process_time() - cpu)
                    times[name][0].append(time.perf_counter() - wall)
                    del out
            walls = {name: statistics.median(x[0]) * 1e3 for name, x in times.items()}
            cpus = {name: statistics.median(x[1]) * 1e3 for name, x in times.items()}
            ours_cpu = cpus["windtunnel"]
            print(
                f"| {kind} ({n_zero:,} zero cents) | {batch_size:,} | {ours_cpu:.2f} | "
                f"{cpus['dynamax']:.2f} | {cpus['dynamax'] / ours_cpu:.2f}x | "
                f"{cpus['filter alone']:.2f} | {cpus['filter alone'] / ours_cpu:.2f}x | "
                f"{walls['windtunnel']:.2f}, {walls['dynamax']:.2f}, {walls['filter alone']:.2f} | "
                f"{max_diff:.1e} |",
                flush=True,
            )


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    main()
