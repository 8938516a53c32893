"""Paper II, sticky Markov chain: EM-like (two-timescale) vs SGD over several seeds (docs/theory.md §4).

Every seed x arm is one replica of a batched :class:`SingleHeadAttention`; all replicas of a
seed share its data and initial weights, and one closed-form gradient pass per step serves them
all. ``rng="reference"`` reproduces the authors' data and initialisation streams (docs/theory.md §4.1 RNG)
with private generators; the held-out sequence is drawn the same way from seed + 10000.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy
import torch

from windtunnel._checks import Problems, check_choice, check_number, check_positive_int
from windtunnel.arms import ARM_NAMES, ArmConfig, ArmOptimizer, train_adamw_cosine, train_steps
from windtunnel.comparison import summarize_arms
from windtunnel.models.single_head import (
    SingleHeadAttention,
    single_head_law_residual,
    single_head_routing_telemetry,
)
from windtunnel.models.sticky_transformer import StickyTransformer, StickyTransformerConfig
from windtunnel.tasks.sticky_markov import (
    StickyBatch,
    StickyMarkov,
    score_predictions,
)

__all__ = ["PAPER_SEEDS", "EmVsSgdConfig", "run_em_vs_sgd", "total_steps"]

PAPER_SEEDS = (42, 2024, 1337, 7777, 9999)
MODELS = ("single", "deep")
RNG_MODES = ("reference", "independent")


@dataclass(frozen=True, kw_only=True)
class EmVsSgdConfig:
    """The sticky-chain comparison; defaults are the paper's (reference script) settings.

    Attributes:
        seeds: run seeds; each gives one training sequence, one held-out sequence and one init.
        n_steps: full-batch optimiser steps per arm.
        arms: optimiser arms (:data:`windtunnel.arms.ARM_NAMES`) for ``model="single"``.
        model: ``"single"`` (the reference single head) or ``"deep"`` (docs/theory.md §4.5, AdamW).
        rng: ``"reference"`` (the authors' draw order, bit-exact on CPU) or ``"independent"``
            (vectorised sampling; data, init and held-out generators derived from the seed).
        lr: routing learning rate eta_r.
        value_lr_ratio: rho of ``two_timescale`` and ``alternating``.
        em_step: eta_v of ``em``.
        deep_lr: AdamW learning rate of the deep variant.
        telemetry_every: log routing telemetry every this many steps (0 = never).
        law_check_len: positions of the per-log exactness check against autograd.
        block_size: query rows per block in the closed-form gradient pass.
        heldout_offset: the held-out sequence uses seed + heldout_offset (reference: 10000).
        n_workers: threads over replica groups for gradients and telemetry (speed only; use
            with ``torch.set_num_threads(1)``).
        task: the chain (reference normalisation by default).
    """

    seeds: tuple[int, ...] = PAPER_SEEDS
    n_steps: int = 1000
    arms: tuple[str, ...] = ("sgd", "two_timescale")
    model: str = "single"
    rng: str = "reference"
    lr: float = 0.01
    value_lr_ratio: float = 10.0
    em_step: float = 1.0
    deep_lr: float = 3e-4
    telemetry_every: int = 100
    law_check_len: int = 256
    block_size: int = 64
    heldout_offset: int = 10000
    n_workers: int = 1
    task: StickyMarkov = field(default_factory=StickyMarkov)

    def __post_init__(self) -> None:
        owner = "EmVsSgdConfig"
        p = Problems(owner)
        if not (
            isinstance(self.seeds, tuple)
            and self.seeds
            and len(set(self.seeds)) == len(self.seeds)
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds)
        ):
            p.add("seeds", "a non-empty tuple of distinct ints >= 0", self.seeds)
        bad_arms = not (
            isinstance(self.arms, tuple) and self.arms and len(set(self.arms)) == len(self.arms)
        )
        if bad_arms or any(check_choice(owner, "arms", a, ARM_NAMES) for a in self.arms):
            p.add("arms", f"a non-empty tuple of distinct names from {ARM_NAMES}", self.arms)
        texts = [
            check_positive_int(owner, "n_steps", self.n_steps),
            *(
                check_number(owner, f, getattr(self, f), low=0.0, low_open=True)
                for f in ("lr", "value_lr_ratio", "em_step", "deep_lr")
            ),
            check_choice(owner, "model", self.model, MODELS),
            check_choice(owner, "rng", self.rng, RNG_MODES),
            check_positive_int(owner, "telemetry_every", self.telemetry_every, minimum=0),
            check_positive_int(owner, "law_check_len", self.law_check_len, minimum=2),
            check_positive_int(owner, "block_size", self.block_size),
            check_positive_int(owner, "heldout_offset", self.heldout_offset),
            check_positive_int(owner, "n_workers", self.n_workers),
        ]
        p.items.extend(t for t in texts if t)
        if not isinstance(self.task, StickyMarkov):
            p.add("task", "a StickyMarkov", self.task)
        p.raise_if_any()

    def arm_configs(self) -> list[ArmConfig]:
        """One :class:`ArmConfig` per name in ``arms``, sharing lr, ratio and em_step."""
        return [
            ArmConfig(name=a, lr=self.lr, value_lr_ratio=self.value_lr_ratio, em_step=self.em_step)
            for a in self.arms
        ]

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        out = dataclasses.asdict(self)
        out["seeds"], out["arms"] = list(self.seeds), list(self.arms)
        return out


def total_steps(config: EmVsSgdConfig) -> int:
    """Progress-bar length: optimiser steps of the run (all arms of a step count once)."""
    return config.n_steps * (len(config.seeds) if config.model == "deep" else 1)


def _generators(config: EmVsSgdConfig, seed: int) -> tuple[dict[str, torch.Generator], str]:
    if config.rng == "reference":
        seeds = {"data": seed, "init": seed, "heldout": seed + config.heldout_offset}
        return {k: torch.Generator().manual_seed(v) for k, v in seeds.items()}, "reference"
    children = np.random.SeedSequence(seed).spawn(3)
    gens = {
        k: torch.Generator().manual_seed(int(c.generate_state(1)[0]))
        for k, c in zip(("data", "init", "heldout"), children)
    }
    return gens, "vectorized"


def _row(batch: StickyBatch, i: int) -> StickyBatch:
    return StickyBatch(
        **{f: getattr(batch, f)[i : i + 1] for f in ("inputs", "targets", "previous", "posterior")}
    )


def run_em_vs_sgd(config: EmVsSgdConfig, *, progress: Callable[[int], None] | None = None) -> dict:
    """Train every seed x arm, evaluate, compare; return the JSON-ready results (see the CLI docs).

    ``progress(n)`` is called with the number of steps just completed. For speed, do as the CLI
    does: ``torch.set_num_threads(1)`` and ``n_workers`` = the number of cores.
    """
    start = time.perf_counter()
    task, h_min = config.task, config.task.conditional_entropy_nats()
    gens = [_generators(config, seed) for seed in config.seeds]
    order = gens[0][1]
    # one chain per seed; one batched filter pass gives all exact posteriors
    train = task.sample_each([g["data"] for g, _ in gens], draw_order=order)
    heldout = task.sample_each([g["heldout"] for g, _ in gens], draw_order=order)
    data = [
        {"seed": seed, "gens": g, "train": _row(train, i), "heldout": _row(heldout, i)}
        for i, (seed, (g, _)) in enumerate(zip(config.seeds, gens))
    ]
    per_seed = [
        {
            "seed": d["seed"],
            "bayes": {
                "train": task.bayes_scores(d["train"]).to_dict(),
                "heldout": task.bayes_scores(d["heldout"]).to_dict(),
            },
            # mean over queries of ln(number of visible keys): the entropy of uniform attention
            "uniform_attention_entropy_nats": float(
                np.mean(np.log(np.arange(1, d["train"].inputs.shape[1] + 1)))
            ),
            "arms": {},
            "curves": {},
            "telemetry": {},
        }
        for d in data
    ]
    runner = _run_deep if config.model == "deep" else _run_single
    law_checks = runner(config, data, per_seed, progress)
    names = ["deep_adamw"] if config.model == "deep" else list(config.arms)
    aggregate = summarize_arms(per_seed, names, n_steps=config.n_steps, h_min_nats=h_min)
    return {
        "experiment": "em_vs_sgd",
        "config": config.to_dict(),
        "versions": {
            "windtunnel": importlib.metadata.version("windtunnel"),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "python": platform.python_version(),
        },
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "bayes_loss_nats": float(np.mean([s["bayes"]["train"]["loss_nats"] for s in per_seed])),
        "bayes_heldout_loss_nats": float(
            np.mean([s["bayes"]["heldout"]["loss_nats"] for s in per_seed])
        ),
        "bayes_accuracy": float(np.mean([s["bayes"]["train"]["accuracy"] for s in per_seed])),
        "conditional_entropy_nats": h_min,
        "conditional_entropy_bits": task.conditional_entropy_bits(),
        "law_checks": law_checks,
        "per_seed": per_seed,
        "aggregate": aggregate,
        "wall_s": time.perf_counter() - start,
    }


def _run_single(
    config: EmVsSgdConfig, data: list[dict], per_seed: list[dict], progress
) -> list[dict]:
    arms, n_seeds = config.arm_configs(), len(data)
    model = SingleHeadAttention(n_replicas=len(arms) * n_seeds)  # replica r = arm * n_seeds + seed
    for a in range(len(arms)):
        for s, d in enumerate(data):
            init = torch.Generator()  # a copy of the seed's init stream: every arm draws the same
            init.set_state(d["gens"]["init"].get_state())
            model.reset_parameters(init, replicas=slice(a * n_seeds + s, a * n_seeds + s + 1))
    # [replica, 1, pos, d_x] and [replica, 1, pos]: every arm sees its seed's sequence
    x = torch.stack([d["train"].inputs for d in data]).repeat(len(arms), 1, 1, 1)
    y = torch.stack([d["train"].targets for d in data]).repeat(len(arms), 1, 1)
    optimizer = ArmOptimizer(
        model,
        [arm for arm in arms for _ in range(n_seeds)],
        x,
        y,
        block_size=config.block_size,
        n_workers=config.n_workers,
    )
    records: list[dict] = []
    law_checks: list[dict] = []

    def logged(step: int) -> bool:
        every = config.telemetry_every
        return bool(every) and (step % every == 0 or step == config.n_steps - 1)

    def on_step(step: int, grads, before: dict, deltas: dict) -> None:
        if progress is not None:
            progress(1)
        if logged(step):
            # the routing sums came with this step's gradient pass (routing_at below)
            tel = single_head_routing_telemetry(grads, x, deltas["W_V"])
            records.append({"step": step, **{k: v.mean(-1).tolist() for k, v in vars(tel).items()}})
            r = len(law_checks) % model.n_replicas
            law_checks.append(
                {
                    "step": step,
                    "arm": arms[r // n_seeds].name,
                    "seed": data[r % n_seeds]["seed"],
                    "residual": single_head_law_residual(
                        before, x, y, replica=r, n_pos=config.law_check_len
                    ),
                }
            )

    losses = train_steps(optimizer, config.n_steps, on_step=on_step, routing_at=logged).numpy()
    train_logits = model.predict_logits(x)
    heldout_x = torch.stack([d["heldout"].inputs for d in data]).repeat(len(arms), 1, 1, 1)
    heldout_logits = model.predict_logits(heldout_x)
    for a, arm in enumerate(arms):
        for s, d in enumerate(data):
            r = a * n_seeds + s
            per_seed[s]["arms"][arm.name] = {
                "train": score_predictions(train_logits[r], d["train"].targets).to_dict(),
                "heldout": score_predictions(heldout_logits[r], d["heldout"].targets).to_dict(),
            }
            per_seed[s]["curves"][arm.name] = losses[r].tolist()
            per_seed[s]["telemetry"][arm.name] = {
                "step": [rec["step"] for rec in records],
                **{
                    k: [rec[k][r] for rec in records]
                    for k in (records[0] if records else {})
                    if k != "step"
                },
            }
    return law_checks


def _run_deep(
    config: EmVsSgdConfig, data: list[dict], per_seed: list[dict], progress
) -> list[dict]:
    for s, d in enumerate(data):
        model = StickyTransformer(
            StickyTransformerConfig(d_x=config.task.d_embed, n_classes=config.task.n_symbols),
            generator=d["gens"]["init"],
        )
        losses = train_adamw_cosine(
            model,
            d["train"].inputs,
            d["train"].targets,
            config.n_steps,
            lr=config.deep_lr,
            on_step=(lambda _step: progress(1)) if progress else None,
        )
        with torch.no_grad():
            per_seed[s]["arms"]["deep_adamw"] = {
                split: score_predictions(model(d[split].inputs), d[split].targets).to_dict()
                for split in ("train", "heldout")
            }
        per_seed[s]["curves"]["deep_adamw"] = losses.tolist()
    return []
