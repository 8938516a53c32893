"""Optimiser arms: each update rule against a direct autograd computation, in float64."""

import pytest
import torch

from windtunnel._checks import ConfigError
from windtunnel.arms import (
    ArmConfig,
    ArmOptimizer,
    em_value_update,
    ridge_factor,
    train_adamw_cosine,
    train_steps,
)
from windtunnel.models import (
    PARAMETER_NAMES,
    SingleHeadAttention,
    SingleHeadConfig,
    StickyTransformer,
    StickyTransformerConfig,
)

CONFIG = SingleHeadConfig(d_x=6, d_k=4, d_v=5, n_classes=3)


def _problem(n_replicas=1, seed=0, n_pos=24):
    gen = torch.Generator().manual_seed(seed)
    model = SingleHeadAttention(CONFIG, n_replicas=n_replicas, dtype=torch.float64)
    model.reset_parameters(gen)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0)
    x = torch.randn(n_replicas, 1, n_pos, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(3, (n_replicas, 1, n_pos), generator=gen)
    return model, x, y


def _autograd(weights, x, y):
    """Loss, weight gradients, dL/dV and the pattern of one replica (weights [shape], x [1, pos, d_x])."""
    w = {n: t.detach().clone().requires_grad_() for n, t in weights.items()}
    q, k, v = x @ w["W_Q"], x @ w["W_K"], x @ w["W_V"]
    v.retain_grad()
    n_pos = x.shape[-2]
    s = q @ k.transpose(-1, -2) / CONFIG.d_k**0.5
    alpha = torch.softmax(
        s.masked_fill(~torch.ones(n_pos, n_pos, dtype=torch.bool).tril(), float("-inf")), -1
    )
    loss = torch.nn.functional.cross_entropy((alpha @ v @ w["W_O"]).reshape(-1, 3), y.reshape(-1))
    loss.backward()
    return loss.detach(), {n: t.grad for n, t in w.items()}, v.grad, alpha.detach()


def _replica(model, r):
    return {n: p.detach()[r].clone() for n, p in model.weights.items()}


def _step(arm, model, x, y):
    before = _replica(model, 0)
    opt = ArmOptimizer(model, [arm] * model.n_replicas, x, y, block_size=5)
    opt.step(opt.gradients())
    after = _replica(model, 0)
    return before, {n: after[n] - before[n] for n in PARAMETER_NAMES}


@pytest.mark.parametrize(
    "name,value_params",
    [("sgd", ("W_V",)), ("two_timescale", ("W_V",)), ("two_timescale", ("W_V", "W_O"))],
)
def test_gradient_arms_take_the_documented_steps(name, value_params):
    model, x, y = _problem()
    arm = ArmConfig(name=name, lr=0.05, value_lr_ratio=7.0, value_params=value_params)
    before, delta = _step(arm, model, x, y)
    _, grads, _, _ = _autograd(before, x[0], y[0])
    for n in PARAMETER_NAMES:
        lr = 0.05 * (7.0 if name == "two_timescale" and n in value_params else 1.0)
        torch.testing.assert_close(delta[n], -lr * grads[n], rtol=1e-10, atol=1e-14)


def test_em_update_matches_a_direct_computation():
    model, x, y = _problem()
    arm = ArmConfig(name="em", lr=0.02, em_step=0.7, em_eps=1e-6, em_ridge=1e-3)
    before, delta = _step(arm, model, x, y)
    _, grads, d_v, alpha = _autograd(before, x[0], y[0])
    xs = x[0, 0]  # [N, d_x]
    n = xs.shape[0]
    resp = alpha[0].sum(0)  # R_j = sum_i alpha_ij
    u_tilde_pull = n * d_v[0]  # sum_i alpha_ij (N u_i)
    target = torch.stack([-0.7 * u_tilde_pull[j] / max(resp[j].item(), 1e-6) for j in range(n)])
    gram = xs.T @ xs
    lam = 1e-3 * torch.trace(gram) / xs.shape[1]
    expected_w_v = torch.linalg.solve(gram + lam * torch.eye(6, dtype=torch.float64), xs.T @ target)
    torch.testing.assert_close(delta["W_V"], expected_w_v, rtol=1e-9, atol=1e-12)
    for name in ("W_Q", "W_K", "W_O"):  # routing moves by plain gradient steps
        torch.testing.assert_close(delta[name], -0.02 * grads[name], rtol=1e-10, atol=1e-14)


def test_em_with_free_values_moves_each_value_to_its_target():
    # With X = I (one-hot inputs) and no ridge, W_V rows are the values, and Delta V = Delta V*.
    gen = torch.Generator().manual_seed(0)
    x = torch.eye(4, dtype=torch.float64).unsqueeze(0)  # [1, N=4, d_x=4]
    d_values = torch.randn(1, 4, 3, generator=gen, dtype=torch.float64)
    resp = torch.tensor([[4.0, 2.0, 1e-9, 0.5]], dtype=torch.float64)
    delta = em_value_update(x, d_values, resp, ridge_factor(x, 0.0), step=0.5, eps=1e-3)
    expected = (
        -0.5 * 4 * d_values[0] / torch.tensor([4.0, 2.0, 1e-3, 0.5], dtype=torch.float64)[:, None]
    )
    torch.testing.assert_close(delta[0], expected, rtol=1e-12, atol=1e-12)


def test_alternating_values_use_a_fresh_gradient_after_the_routing_step():
    model, x, y = _problem()
    arm = ArmConfig(name="alternating", lr=0.05, value_lr_ratio=10.0)
    before, delta = _step(arm, model, x, y)
    _, grads, _, _ = _autograd(before, x[0], y[0])
    moved = dict(before)
    for n in ("W_Q", "W_K", "W_O"):
        torch.testing.assert_close(delta[n], -0.05 * grads[n], rtol=1e-10, atol=1e-14)
        moved[n] = before[n] + delta[n]
    _, fresh, _, _ = _autograd(moved, x[0], y[0])
    torch.testing.assert_close(delta["W_V"], -0.5 * fresh["W_V"], rtol=1e-10, atol=1e-14)
    assert not torch.allclose(fresh["W_V"], grads["W_V"])


def test_adam_matches_torch_adam():
    model, x, y = _problem()
    reference = {n: p.detach()[0].clone().requires_grad_() for n, p in model.weights.items()}
    torch_adam = torch.optim.Adam(list(reference.values()), lr=0.01)
    opt = ArmOptimizer(model, [ArmConfig(name="adam", lr=0.01)], x, y)
    for _ in range(3):
        opt.step(opt.gradients())
        torch_adam.zero_grad()
        loss, grads, _, _ = _autograd({n: t.detach() for n, t in reference.items()}, x[0], y[0])
        for n, t in reference.items():
            t.grad = grads[n]
        torch_adam.step()
    for n in PARAMETER_NAMES:
        torch.testing.assert_close(
            model.weights[n].detach()[0], reference[n].detach(), rtol=1e-9, atol=1e-12
        )


def test_replicas_with_different_arms_update_independently_and_report_pre_update_losses():
    model, x, y = _problem(n_replicas=1)
    both = SingleHeadAttention(CONFIG, n_replicas=2, dtype=torch.float64)
    with torch.no_grad():
        for n, p in both.weights.items():
            p.copy_(model.weights[n].detach().expand(2, -1, -1))
    arms = [ArmConfig(name="sgd"), ArmConfig(name="em")]
    opt = ArmOptimizer(both, arms, x, y)
    initial = opt.gradients().loss_nats
    losses = train_steps(opt, 3)
    assert losses.shape == (2, 3) and torch.equal(losses[:, 0], initial)
    assert losses[0, 0] == losses[1, 0] and losses[0, 2] != losses[1, 2]
    solo = ArmOptimizer(model, arms[:1], x, y)
    solo_losses = train_steps(solo, 3)
    torch.testing.assert_close(solo_losses[0], losses[0], rtol=0, atol=1e-14)


def test_train_adamw_cosine_lowers_the_loss():
    gen = torch.Generator().manual_seed(0)
    model = StickyTransformer(
        StickyTransformerConfig(d_x=3, d_model=8, n_layers=1, n_heads=2, d_mlp=16, n_classes=3),
        generator=gen,
    )
    model.double()
    x = torch.randn(2, 10, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(3, (2, 10), generator=gen)
    seen = []
    losses = train_adamw_cosine(model, x, y, 30, lr=1e-2, on_step=seen.append)
    assert losses.shape == (30,) and seen == list(range(30))
    assert losses[-1] < losses[0]


def test_bad_arm_configs_raise():
    with pytest.raises(
        ValueError,
        match=r"ArmConfig.name must be one of 'sgd', 'two_timescale'.* did you mean 'sgd'",
    ):
        ArmConfig(name="sdg")
    with pytest.raises(
        ValueError, match=r"ArmConfig.lr must be a number in \(0.0, inf\]; got -1.0"
    ):
        ArmConfig(name="sgd", lr=-1.0)
    with pytest.raises(ValueError, match=r"ArmConfig.value_params must be a tuple of names"):
        ArmConfig(name="two_timescale", value_params=("W_X",))
    with pytest.raises(
        ValueError, match=r"ArmConfig.value_params must be a tuple containing 'W_V' for the em arm"
    ):
        ArmConfig(name="em", value_params=("W_O",))
    with pytest.raises(ConfigError, match=r"2 problems in ArmConfig"):
        ArmConfig(name="adam", adam_betas=(0.9, 1.5), em_eps=0.0)
    assert ArmConfig.from_dict(ArmConfig(name="em", em_step=3.0).to_dict()) == ArmConfig(
        name="em", em_step=3.0
    )
    model, x, y = _problem(n_replicas=2)
    with pytest.raises(
        ValueError, match=r"ArmOptimizer.arms must have one arm per replica \(2\); got 1"
    ):
        ArmOptimizer(model, [ArmConfig(name="sgd")], x, y)
