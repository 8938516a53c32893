"""Steps per second of the Trainer on the bijection task, before and after the step loop stopped
waiting for the host (issue 19), and with the compiled fast path (``train.compile``).

Models (TinyGPT, RMSNorm, FFN 4 x d_model): 2L/4H/64 (the cpu preset's), 4L/4H/128 and the
paper's 6L/6H/192; batch 256 (the paper's recipe) and 128 (the cpu preset's); the bijection
V = 20, L = 19 (37 tokens), AdamW with clipping, the paper recipe's hyperparameters. Each way is
measured on the same machine in the same process, back to back:

  * before:   the loop as the trainer ran it up to this change, re-enacted here with the trainer's
              own model, optimizer, data stream and losses: the batch copied to the device with a
              wait, and the loss, the gradient norm and the weight check read back every step
              (three host synchronisations per step on a GPU);
  * after:    ``Trainer.fit`` as it is now (eager): the checks read back in one transfer at log
              steps (every 50), the batch copied from page-locked memory without a wait;
  * compiled: ``Trainer.fit`` with ``train.compile=true`` (torch.compile of the forward and loss;
              on CUDA its CUDA graphs and the fused AdamW); with --fast only.

Each is warmed up (--warmup steps, which include the compilation), then timed over --repeats
segments of --steps steps each; the table gives the median segment's steps/s, and the minutes
50,000 steps (the paper's bijection recipe) would take at that rate. Evaluation and
checkpoints are left out (no run directory; the one held-out evaluation falls outside the timed
segments). Prints a Markdown table for BENCHMARKS.md.

With ``--replicas R`` it times instead R seeds of each model trained as one replica group
(:class:`~windtunnel.replicas.ReplicaTrainer`: one vmapped step over the stacked weights) against
the same R seeds as R separate ``Trainer.fit`` runs back to back, each segment the group's
--steps steps and then each separate run's --steps steps, alternating. It prints the group's
steps/s, its seed-steps/s (R x steps/s), the separate runs' seed-steps/s (R x steps over their
summed time) and the ratio of the two seed-steps/s (medians over the segments).

Usage: PYTHONPATH=src python benchmarks/train_throughput.py [--device cpu|cuda] [--fast|--no-fast]
           [--models 2L64 4L128 6L192] [--batches 256 128] [--steps 50] [--repeats 5] [--warmup 10]
           [--replicas R] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import statistics
import time

import torch
from torch import nn

from windtunnel.presets import get_preset
from windtunnel.replicas import ReplicaTrainer
from windtunnel.train import Trainer, learning_rate, site_loss

MODELS = {
    "2L64": dict(n_layers=2, n_heads=4, d_model=64, d_mlp=256),
    "4L128": dict(n_layers=4, n_heads=4, d_model=128, d_mlp=512),
    "6L192": dict(n_layers=6, n_heads=6, d_model=192, d_mlp=768),
}
PAPER_STEPS = 50_000


def experiment(model: dict, batch: int, device: str, *, compile: bool, total_steps: int, seed: int = 0):
    """The paper's bijection recipe with ``model``, ``batch`` and ``seed``."""
    paper = get_preset("bijection", "transformer", "paper")
    train = dataclasses.replace(paper.train, steps=total_steps, batch_size=batch, device=device, compile=compile,
                                warmup_steps=0, eval_every=total_steps, eval_size=100, eval_batch_size=100, log_every=50,
                                checkpoint_every=total_steps, seed=seed)
    return dataclasses.replace(paper, model=model, train=train, name="")


def build(model: dict, batch: int, device: str, *, compile: bool, total_steps: int, seed: int = 0) -> Trainer:
    """A Trainer of the paper's bijection recipe with ``model``, ``batch`` and ``seed``, in memory."""
    return Trainer(experiment(model, batch, device, compile=compile, total_steps=total_steps, seed=seed))


def machine(device: str) -> str:
    """The GPU's name, or the CPU's architecture and torch's thread count."""
    return torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def replica_rates(model: dict, batch: int, args: argparse.Namespace) -> tuple[float, float, float]:
    """(group steps/s, group seed-steps/s, separate runs' seed-steps/s), medians over the
    segments; each segment times the group's --steps steps, then the R separate runs' --steps
    steps each, one after another."""
    total = args.warmup + args.repeats * args.steps + 1
    seeds = range(args.replicas)
    group = ReplicaTrainer([experiment(model, batch, args.device, compile=False, total_steps=total, seed=s) for s in seeds])
    alone = [build(model, batch, args.device, compile=False, total_steps=total, seed=s) for s in seeds]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    group.fit(stop_at=args.warmup)  # fit releases nothing it needs: the group continues from its step
    for trainer in alone:
        trainer.fit(stop_at=args.warmup)
    group_rates, alone_rates = [], []
    for _ in range(args.repeats):
        seconds = timed(lambda: group.fit(stop_at=group.step + args.steps))
        group_rates.append(args.steps / seconds)
        seconds = sum(timed(lambda t=t: t.fit(stop_at=t.step + args.steps)) for t in alone)
        alone_rates.append(args.replicas * args.steps / seconds)
    steps_per_s = statistics.median(group_rates)
    return steps_per_s, args.replicas * steps_per_s, statistics.median(alone_rates)


def before_steps(trainer: Trainer, n: int) -> None:
    """``n`` steps of the previous loop: a blocking copy and three read-backs every step."""
    cfg, model, task = trainer.config, trainer.model, trainer.task
    params = [p for p in model.parameters() if p.numel()]
    model.train()
    for _ in range(n):
        lr = learning_rate(trainer.step, cfg)
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
        batch = task.sample(cfg.batch_size, generator=trainer.data_generator).to(trainer.device)
        logits = model(batch.tokens, generator=trainer.dropout_generator)
        loss = site_loss(logits, batch, task)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        loss_value = float(loss.detach())
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise FloatingPointError(f"step {trainer.step}: loss {loss_value}, gradient norm {grad_norm}")
        trainer.optimizer.step()
        if not bool(torch.isfinite(torch.stack([p.detach().abs().amax() for p in params])).all()):
            raise FloatingPointError(f"step {trainer.step}: weights not finite")
        trainer.step += 1
        trainer.last_loss = loss_value


def rate(way: str, model: dict, batch: int, args: argparse.Namespace) -> float:
    """Median steps/s of ``way`` over the timed segments."""
    total = args.warmup + args.repeats * args.steps + 1  # + 1: the final evaluation is never timed
    trainer = build(model, batch, args.device, compile=way == "compiled", total_steps=total)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def run(n: int) -> None:
        if way == "before":
            before_steps(trainer, n)
        else:
            trainer.fit(stop_at=trainer.step + n)  # ends with a read-back: the GPU has finished

    run(args.warmup)
    sync()
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run(args.steps)
        sync()
        rates.append(args.steps / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                        help="also time train.compile=true (default: on for cuda, off for cpu, where compiling takes minutes)")
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[256, 128])
    parser.add_argument("--steps", type=int, default=50, help="steps per timed segment")
    parser.add_argument("--repeats", type=int, default=5, help="timed segments; the median is reported")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (they include compilation)")
    parser.add_argument("--replicas", type=int, default=None, metavar="R",
                        help="time R seeds as one replica group against R separate runs back to back instead")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.replicas is not None:
        main_replicas(args)
        return
    fast = args.fast if args.fast is not None else args.device == "cuda"
    ways = ["before", "after"] + (["compiled"] if fast else [])
    print(f"torch {torch.__version__}, {machine(args.device)}; {args.repeats} x {args.steps} steps after {args.warmup} warm-up steps")
    print()
    head = "| model | batch | before (steps/s) | after (steps/s) | after / before |"
    rule = "|---|---:|---:|---:|---:|"
    if fast:
        head += " compiled (steps/s) | compiled / before |"
        rule += "---:|---:|"
    print(head + " 50k steps, best (min) |")
    print(rule + "---:|", flush=True)
    for name in args.models:
        for batch in args.batches:
            rates = {way: rate(way, MODELS[name], batch, args) for way in ways}
            cells = [name, str(batch), f"{rates['before']:.1f}", f"{rates['after']:.1f}", f"{rates['after'] / rates['before']:.2f}x"]
            if fast:
                cells += [f"{rates['compiled']:.1f}", f"{rates['compiled'] / rates['before']:.2f}x"]
            cells.append(f"{PAPER_STEPS / max(rates.values()) / 60:.1f}")
            print("| " + " | ".join(cells) + " |", flush=True)


def main_replicas(args: argparse.Namespace) -> None:
    if args.replicas < 2:
        raise SystemExit(f"--replicas must be 2 or more; got {args.replicas}.")
    print(f"torch {torch.__version__}, {machine(args.device)}; R = {args.replicas} seeds; {args.repeats} segments of {args.steps} steps "
          f"(the group's, then each separate run's) after {args.warmup} warm-up steps")
    print()
    print("| model | batch | R | group (steps/s) | group (seed-steps/s) | R separate runs (seed-steps/s) | group / separate |")
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for name in args.models:
        for batch in args.batches:
            steps, group_seed_steps, alone_seed_steps = replica_rates(MODELS[name], batch, args)
            print(f"| {name} | {batch} | {args.replicas} | {steps:.2f} | {group_seed_steps:.2f} | {alone_seed_steps:.2f} | "
                  f"{group_seed_steps / alone_seed_steps:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
