"""Optimiser arms for the single head (docs/theory.md §3.2-§3.3) and a batched trainer for them.

Every arm starts from one forward/backward pass and updates all weights simultaneously, as the
reference does. Parameters split into a *value* group (``W_V`` by default) and a *routing* group
(everything else, ``W_O`` included, as in the authors' code). Several replicas, each with its own
arm, seed and data, train in one batched computation.

| arm | routing step | value step |
|---|---|---|
| ``sgd`` | -lr g | -lr g |
| ``two_timescale`` | -lr g | -ratio lr g (the reference "EM-like" arm) |
| ``em`` | -lr g | closed-form EM-style step (:func:`em_value_update`) |
| ``alternating`` | -lr g, then a fresh forward/backward pass | -ratio lr g' |
| ``adam`` | Adam(lr) on every weight (a reference point, not in the paper) | |
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from windtunnel._checks import Problems, check_choice, check_number
from windtunnel.models.single_head import (
    PARAMETER_NAMES,
    SingleHeadAttention,
    SingleHeadGradients,
    single_head_gradients,
)

__all__ = [
    "ARM_NAMES",
    "ArmConfig",
    "ArmOptimizer",
    "em_value_update",
    "ridge_factor",
    "train_adamw_cosine",
    "train_steps",
]

ARM_NAMES = ("sgd", "two_timescale", "em", "alternating", "adam")


@dataclass(frozen=True, kw_only=True)
class ArmConfig:
    """One optimiser arm.

    Attributes:
        name: one of :data:`ARM_NAMES`.
        lr: routing learning rate eta_r (every weight for ``sgd``; Adam's step size for ``adam``).
        value_lr_ratio: rho, the value learning rate is rho * lr (``two_timescale``,
            ``alternating``; also for any extra value-group weight under ``em``).
        value_params: the value ("content") group; the rest is routing. The reference puts W_O
            with routing, so the default is ("W_V",).
        em_step: eta_v of the ``em`` arm.
        em_eps: floor epsilon on the responsibility R_j in the ``em`` arm.
        em_ridge: lambda = em_ridge * tr(X^T X) / d_x in the ``em`` arm's least squares.
        adam_betas: Adam's (beta1, beta2).
        adam_eps: Adam's epsilon.

    Raises:
        ValueError: naming every bad field at once.
    """

    name: str
    lr: float = 0.01
    value_lr_ratio: float = 10.0
    value_params: tuple[str, ...] = ("W_V",)
    em_step: float = 1.0
    em_eps: float = 1e-6
    em_ridge: float = 1e-3
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        owner = "ArmConfig"
        problems = Problems(owner)
        texts = [
            check_choice(owner, "name", self.name, ARM_NAMES),
            check_number(owner, "lr", self.lr, low=0.0, low_open=True),
            check_number(owner, "value_lr_ratio", self.value_lr_ratio, low=0.0, low_open=True),
            check_number(owner, "em_step", self.em_step, low=0.0, low_open=True),
            check_number(owner, "em_eps", self.em_eps, low=0.0, low_open=True),
            check_number(owner, "em_ridge", self.em_ridge, low=0.0),
            check_number(owner, "adam_eps", self.adam_eps, low=0.0, low_open=True),
        ]
        problems.items.extend(t for t in texts if t)
        if not isinstance(self.value_params, tuple) or not set(self.value_params) <= set(
            PARAMETER_NAMES
        ):
            problems.add(
                "value_params", f"a tuple of names from {PARAMETER_NAMES}", self.value_params
            )
        elif self.name == "em" and "W_V" not in self.value_params:
            problems.add(
                "value_params", "a tuple containing 'W_V' for the em arm", self.value_params
            )
        betas = self.adam_betas
        if not (
            isinstance(betas, tuple)
            and len(betas) == 2
            and all(isinstance(b, float) and 0.0 <= b < 1.0 for b in betas)
        ):
            problems.add("adam_betas", "a pair of floats in [0, 1)", betas)
        problems.raise_if_any()

    def to_dict(self) -> dict:
        """Plain-JSON form of the config."""
        return {
            "name": self.name,
            "lr": self.lr,
            "value_lr_ratio": self.value_lr_ratio,
            "value_params": list(self.value_params),
            "em_step": self.em_step,
            "em_eps": self.em_eps,
            "em_ridge": self.em_ridge,
            "adam_betas": list(self.adam_betas),
            "adam_eps": self.adam_eps,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ArmConfig:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["value_params"] = tuple(data.get("value_params", ("W_V",)))
        data["adam_betas"] = tuple(data.get("adam_betas", (0.9, 0.999)))
        return cls(**data)


def ridge_factor(x: torch.Tensor, ridge: float) -> torch.Tensor:
    """Cholesky factor of X^T X + lambda I with lambda = ridge * tr(X^T X) / d_x.

    Shapes: x [replica, n_positions, d_x] -> [replica, d_x, d_x] (lower triangular).
    """
    gram = x.transpose(1, 2) @ x
    d_x = gram.shape[-1]
    lam = ridge * gram.diagonal(dim1=-2, dim2=-1).sum(-1) / d_x
    eye = torch.eye(d_x, dtype=x.dtype, device=x.device)
    return torch.linalg.cholesky(gram + lam[:, None, None] * eye)


def em_value_update(
    x: torch.Tensor,
    d_values: torch.Tensor,
    responsibility: torch.Tensor,
    factor: torch.Tensor,
    *,
    step: float,
    eps: float,
) -> torch.Tensor:
    """The closed-form EM-style change of W_V (docs/theory.md §3.3), one per replica.

    Each value moves by the responsibility-weighted *mean* per-position error, as a mixture
    M-step moves a prototype:

        delta v_j = -eta_v * sum_i alpha_ij u~_i / max(R_j, eps),   u~_i = N u_i,
                  = -eta_v * N * (dL/dv_j) / max(R_j, eps),

    with R_j = sum_i alpha_ij and u_i = dL/dz_i of the mean loss over N positions. The values
    are tied through v = x W_V, so the target changes Delta V* are realised by ridge least squares:

        Delta W_V = (X^T X + lambda I)^{-1} X^T Delta V*.

    Shapes: x [replica, N, d_x]; d_values [replica, N, d_v]; responsibility [replica, N];
    factor [replica, d_x, d_x] from :func:`ridge_factor`. Returns Delta W_V [replica, d_x, d_v].
    """
    n_positions = x.shape[1]
    target = -step * n_positions * d_values / responsibility.clamp_min(eps).unsqueeze(-1)
    return torch.cholesky_solve(x.transpose(1, 2) @ target, factor)


class ArmOptimizer:
    """Applies each replica's arm to a :class:`SingleHeadAttention` in place.

    Args:
        model: the replicas to train.
        arms: one :class:`ArmConfig` per replica.
        x: training inputs [replica or 1, batch, pos, d_x] (needed by ``em`` and ``alternating``).
        targets: training labels long [replica or 1, batch, pos].
        block_size: query block of the closed-form gradient pass.
        n_workers: threads over replica groups in the gradient pass (see
            :func:`windtunnel.models.single_head.single_head_gradients`).

    Raises:
        ValueError: when the number of arms is not the number of replicas.
    """

    def __init__(
        self,
        model: SingleHeadAttention,
        arms: Sequence[ArmConfig],
        x: torch.Tensor,
        targets: torch.Tensor,
        *,
        block_size: int = 64,
        n_workers: int = 1,
    ) -> None:
        if len(arms) != model.n_replicas:
            raise ValueError(
                f"ArmOptimizer.arms must have one arm per replica ({model.n_replicas}); got {len(arms)}."
            )
        self.model, self.arms, self.block_size, self.n_workers = (
            model,
            list(arms),
            block_size,
            n_workers,
        )
        self.x = x.expand(model.n_replicas, -1, -1, -1)
        self.targets = targets.expand(model.n_replicas, -1, -1)
        members: dict[ArmConfig, list[int]] = {}
        for r, arm in enumerate(self.arms):
            members.setdefault(arm, []).append(r)
        self.groups = {arm: torch.tensor(idx) for arm, idx in members.items()}
        self.needs_responsibility = any(arm.name == "em" for arm in self.arms)
        self._ridge: dict[ArmConfig, torch.Tensor] = {}
        self._adam: dict[ArmConfig, dict[str, list[torch.Tensor]]] = {}
        self._adam_steps: dict[ArmConfig, int] = {}
        for arm, idx in self.groups.items():
            if arm.name == "em":
                self._ridge[arm] = ridge_factor(self._flat_x(idx), arm.em_ridge)
            if arm.name == "adam":
                self._adam[arm] = {
                    n: [torch.zeros_like(p[idx]), torch.zeros_like(p[idx])]
                    for n, p in model.weights.items()
                }
                self._adam_steps[arm] = 0

    def _flat_x(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.x[idx]
        return x.reshape(x.shape[0], -1, x.shape[-1])  # [replica, batch * pos, d_x]

    def gradients(self, *, with_routing: bool = False) -> SingleHeadGradients:
        """Closed-form gradients of every replica at the current weights.

        ``with_routing`` also takes the routing sums and responsibilities that
        :func:`windtunnel.models.single_head.single_head_routing_telemetry` needs.
        """
        return self.model.exact_gradients(
            self.x,
            self.targets,
            block_size=self.block_size,
            with_responsibility=self.needs_responsibility or with_routing,
            with_routing=with_routing,
            # the per-value pulls serve the em arm and the telemetry only
            with_values=self.needs_responsibility or with_routing,
            n_workers=self.n_workers,
        )

    @torch.no_grad()
    def step(self, grads: SingleHeadGradients) -> dict[str, torch.Tensor]:
        """Update every replica from ``grads`` (all taken at the current weights).

        Returns:
            The realised change of each weight, {name: [replica, *shape]}.
        """
        weights = self.model.weights
        deltas = {n: torch.zeros_like(p) for n, p in weights.items()}
        for arm, idx in self.groups.items():
            g = {n: grads.grads[n][idx] for n in PARAMETER_NAMES}
            for name, change in self._arm_deltas(arm, idx, g, grads).items():
                deltas[name][idx] = change
        for name, p in weights.items():
            p.add_(deltas[name])
        return deltas

    def _arm_deltas(
        self,
        arm: ArmConfig,
        idx: torch.Tensor,
        g: dict[str, torch.Tensor],
        grads: SingleHeadGradients,
    ) -> dict[str, torch.Tensor]:
        value_lr = arm.value_lr_ratio * arm.lr
        if arm.name == "sgd":
            return {n: -arm.lr * g[n] for n in PARAMETER_NAMES}
        if arm.name == "two_timescale":
            return {
                n: -(value_lr if n in arm.value_params else arm.lr) * g[n] for n in PARAMETER_NAMES
            }
        if arm.name == "em":
            out = {
                n: -(value_lr if n in arm.value_params else arm.lr) * g[n] for n in PARAMETER_NAMES
            }
            batch_pos = grads.d_values.shape[1] * grads.d_values.shape[2]
            out["W_V"] = em_value_update(
                self._flat_x(idx),
                grads.d_values[idx].reshape(len(idx), batch_pos, -1),
                grads.responsibility[idx].reshape(len(idx), batch_pos),
                self._ridge[arm],
                step=arm.em_step,
                eps=arm.em_eps,
            )
            return out
        if arm.name == "alternating":
            return self._alternating(arm, idx, g)
        return self._adam_deltas(arm, g)

    def _alternating(
        self, arm: ArmConfig, idx: torch.Tensor, g: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        # E-step: routing moves first; M-step: values move against a fresh gradient at the new routing.
        out = {n: -arm.lr * g[n] for n in PARAMETER_NAMES if n not in arm.value_params}
        moved = {n: p[idx] + out.get(n, 0.0) for n, p in self.model.weights.items()}
        fresh = single_head_gradients(
            moved,
            self.x[idx],
            self.targets[idx],
            block_size=self.block_size,
            n_workers=self.n_workers,
        )
        for n in arm.value_params:
            out[n] = -arm.value_lr_ratio * arm.lr * fresh.grads[n]
        return out

    def _adam_deltas(self, arm: ArmConfig, g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._adam_steps[arm] += 1
        t = self._adam_steps[arm]
        b1, b2 = arm.adam_betas
        out = {}
        for n in PARAMETER_NAMES:
            m, v = self._adam[arm][n]
            m.mul_(b1).add_(g[n], alpha=1 - b1)
            v.mul_(b2).addcmul_(g[n], g[n], value=1 - b2)
            m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
            out[n] = -arm.lr * m_hat / (v_hat.sqrt() + arm.adam_eps)
        return out


def train_steps(
    optimizer: ArmOptimizer,
    n_steps: int,
    *,
    on_step: Callable[
        [int, SingleHeadGradients, dict[str, torch.Tensor], dict[str, torch.Tensor]], None
    ]
    | None = None,
    routing_at: Callable[[int], bool] | None = None,
) -> torch.Tensor:
    """Run ``n_steps`` simultaneous updates; return the pre-update losses [replica, n_steps] (nats).

    ``on_step(step, grads, weights_before, deltas)`` is called after each update (for telemetry);
    ``weights_before`` holds detached copies of the pre-update weights when ``on_step`` is given.
    At the steps where ``routing_at(step)`` is true, ``grads`` also carries the routing sums
    (:meth:`ArmOptimizer.gradients` with ``with_routing=True``).
    """
    losses = torch.empty(optimizer.model.n_replicas, n_steps, dtype=torch.float64)
    for step in range(n_steps):
        grads = optimizer.gradients(with_routing=routing_at is not None and routing_at(step))
        losses[:, step] = grads.loss_nats.double()
        before = (
            {n: p.detach().clone() for n, p in optimizer.model.weights.items()} if on_step else {}
        )
        deltas = optimizer.step(grads)
        if on_step is not None:
            on_step(step, grads, before, deltas)
        if not math.isfinite(float(grads.loss_nats.sum())):
            raise FloatingPointError(f"loss is not finite at step {step}; lower the arm's lr.")
    return losses


def train_adamw_cosine(
    model: torch.nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    n_steps: int,
    *,
    lr: float = 3e-4,
    weight_decay: float = 0.01,
    clip: float = 1.0,
    dropout_generator: torch.Generator | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The deep variant's recipe (docs/theory.md §4.5): full-batch AdamW, cosine annealing over ``n_steps``,
    gradient-norm clipping; returns the pre-update losses [n_steps] (nats).

    Shapes: x [batch, pos, d_x]; targets long [batch, pos]; ``model(x, generator=...)`` gives
    logits [batch, pos, n_classes].
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, n_steps)
    losses = torch.empty(n_steps, dtype=torch.float64)
    model.train()
    for step in range(n_steps):
        optimizer.zero_grad(set_to_none=True)
        logits = model(x, generator=dropout_generator)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        schedule.step()
        losses[step] = loss.item()
        if not math.isfinite(losses[step].item()):
            raise FloatingPointError(f"loss is not finite at step {step}; lower lr.")
        if on_step is not None:
            on_step(step)
    model.eval()
    return losses
