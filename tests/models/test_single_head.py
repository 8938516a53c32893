"""The batched single head: closed-form blocked gradients against autograd, reference init,
replica independence and argument errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from windtunnel._checks import ConfigError
from windtunnel.models import (
    PARAMETER_NAMES,
    SingleHeadAttention,
    SingleHeadConfig,
    single_head_gradients,
    single_head_output,
    single_head_routing_telemetry,
    single_head_telemetry,
)


def _model(n_replicas, seed, dtype=torch.float64, config=None, scale=1.0):
    model = SingleHeadAttention(config, n_replicas=n_replicas, dtype=dtype)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)  # larger weights give non-uniform attention, a sharper test
    return model


def _autograd(model, x, y):
    out = model(x)
    n_rep = model.n_replicas
    ce = torch.nn.functional.cross_entropy(
        out.logits.reshape(-1, out.logits.shape[-1]),
        y.expand(n_rep, -1, -1).reshape(-1),
        reduction="none",
    )
    loss = ce.view(n_rep, -1).mean(1)
    grads = torch.autograd.grad(loss.sum(), [model.weights[n] for n in PARAMETER_NAMES])
    return loss.detach(), dict(zip(PARAMETER_NAMES, grads))


@given(
    n_replicas=st.integers(1, 3),
    batch=st.integers(1, 2),
    n_pos=st.integers(1, 33),
    block_size=st.integers(1, 40),
    shared_x=st.booleans(),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=25)
def test_exact_gradients_equal_autograd(n_replicas, batch, n_pos, block_size, shared_x, seed):
    config = SingleHeadConfig(d_x=5, d_k=3, d_v=4, n_classes=6)
    model = _model(n_replicas, seed, config=config, scale=20.0)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(
        1 if shared_x else n_replicas, batch, n_pos, 5, generator=gen, dtype=torch.float64
    )
    y = torch.randint(6, (1 if shared_x else n_replicas, batch, n_pos), generator=gen)
    loss, grads = _autograd(model, x, y)
    exact = model.exact_gradients(x, y, block_size=block_size, with_responsibility=True)
    torch.testing.assert_close(exact.loss_nats, loss, rtol=0, atol=1e-12)
    for name in PARAMETER_NAMES:
        scale = grads[name].abs().max().clamp_min(1e-30)
        assert (exact.grads[name] - grads[name]).abs().max() / scale < 1e-10, name
    assert exact.n_labelled == batch * n_pos
    # responsibilities: column sums of the causal pattern; they add up to the number of queries
    pattern = model(x).pattern.detach()
    torch.testing.assert_close(exact.responsibility, pattern.sum(-2), rtol=0, atol=1e-12)


def test_d_values_are_the_autograd_value_gradient():
    model = _model(2, 3, scale=10.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 30, 20, generator=gen, dtype=torch.float64)
    y = torch.randint(8, (2, 1, 30), generator=gen)
    out = model(x)
    ce = (
        torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, 8), y.reshape(-1), reduction="none"
        )
        .view(2, -1)
        .mean(1)
    )
    (d_v,) = torch.autograd.grad(ce.sum(), [out.v])
    exact = model.exact_gradients(x, y, block_size=7)
    torch.testing.assert_close(exact.d_values, d_v, rtol=0, atol=1e-14)


def test_forward_pattern_is_causal_and_normalised():
    model = _model(2, 0)
    x = torch.randn(2, 3, 12, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = model(x)
    assert (
        out.pattern.shape == (2, 3, 12, 12)
        and out.q.shape == (2, 3, 12, 10)
        and out.z.shape == (2, 3, 12, 15)
    )
    torch.testing.assert_close(out.pattern.sum(-1), torch.ones(2, 3, 12, dtype=torch.float64))
    assert (out.pattern.triu(1) == 0).all()
    torch.testing.assert_close(
        model.head_output(x, block_size=5), out.z.detach(), rtol=0, atol=1e-14
    )
    torch.testing.assert_close(
        model.predict_logits(x, block_size=4), out.logits.detach(), rtol=0, atol=1e-14
    )
    # the first query can only attend to itself
    torch.testing.assert_close(out.z[..., 0, :], out.v[..., 0, :])


def test_reset_parameters_is_the_reference_draw_order():
    model = SingleHeadAttention(n_replicas=2)
    model.reset_parameters(torch.Generator().manual_seed(42))
    gen = torch.Generator().manual_seed(42)
    for r in range(2):
        for name, shape in (
            ("W_Q", (20, 10)),
            ("W_K", (20, 10)),
            ("W_V", (20, 15)),
            ("W_O", (15, 8)),
        ):
            assert torch.equal(model.weights[name][r], torch.randn(shape, generator=gen) * 0.1)
    again = SingleHeadAttention(n_replicas=2)
    again.reset_parameters(torch.Generator().manual_seed(42))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    one = SingleHeadAttention(n_replicas=3)
    one.reset_parameters(torch.Generator().manual_seed(42), replicas=slice(2, 3))
    assert torch.equal(one.W_Q[2], model.W_Q[0]) and (one.W_Q[:2] == 0).all()


def test_replicas_are_independent():
    model = _model(3, 1)
    x = torch.randn(1, 1, 9, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.randint(8, (1, 1, 9), generator=torch.Generator().manual_seed(3))
    before = model.exact_gradients(x, y)
    with torch.no_grad():
        model.W_K[1].mul_(-3.0)
    after = model.exact_gradients(x, y)
    for r in (0, 2):
        assert after.loss_nats[r] == before.loss_nats[r]
        assert all(torch.equal(after.grads[n][r], before.grads[n][r]) for n in PARAMETER_NAMES)
    assert after.loss_nats[1] != before.loss_nats[1]


def test_scores_use_one_over_sqrt_d_k():
    # x = (1, 2): q_1 = (2, 2, 2, 2), k_0 = (.5, .5, .5, .5), k_1 = (1, 1, 1, 1), so with
    # 1/sqrt(d_k) = 1/2: s_10 = 4 / 2 = 2 and s_11 = 8 / 2 = 4; the pattern is (1, e^2) / (1 + e^2)
    config = SingleHeadConfig(d_x=1, d_k=4, d_v=1, n_classes=2)
    model = SingleHeadAttention(config, dtype=torch.float64)
    with torch.no_grad():
        model.W_Q.fill_(1.0)
        model.W_K.fill_(0.5)
        model.W_V.fill_(1.0)
        model.W_O.fill_(1.0)
    x = torch.tensor([[[[1.0], [2.0]]]], dtype=torch.float64)  # [1, 1, 2, 1]
    out = model(x)
    expected = torch.tensor([1.0, math.e**2], dtype=torch.float64) / (1.0 + math.e**2)
    torch.testing.assert_close(out.pattern[0, 0, 1], expected)
    weights = {n: p.detach() for n, p in model.weights.items()}
    torch.testing.assert_close(single_head_output(weights, x), out.z.detach())


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"SingleHeadConfig.d_k must be an int >= 1; got 0"):
        SingleHeadConfig(d_k=0)
    with pytest.raises(ConfigError, match=r"2 problems in SingleHeadConfig"):
        SingleHeadConfig(n_classes=1, init_std=0.0)
    with pytest.raises(
        ValueError, match=r"SingleHeadAttention.n_replicas must be an int >= 1; got 0"
    ):
        SingleHeadAttention(n_replicas=0)
    model = _model(2, 0)
    with pytest.raises(
        ValueError, match=r"x must be \[replica, batch, pos, d_x\] with replica in \(1, 2\)"
    ):
        model(torch.zeros(3, 1, 4, 20, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"d_x = 20; got \[1, 4, 20\]"):
        model.head_output(torch.zeros(1, 4, 20, dtype=torch.float64))
    x = torch.zeros(2, 1, 4, 20, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"targets must be long \[replica, batch, pos\]"):
        model.exact_gradients(x, torch.zeros(2, 1, 5, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"single_head_gradients.block_size must be an int >= 1; got 0"
    ):
        single_head_gradients(
            model.weights, x, torch.zeros(2, 1, 4, dtype=torch.long), block_size=0
        )


@pytest.mark.parametrize(
    "n_workers,shared_x,n_rep,n_pos,block_size,seed",
    [
        (2, False, 5, 50, 16, 4),
        (3, True, 5, 50, 16, 4),
        (7, False, 5, 50, 16, 4),
        (2, False, 3, 37, 64, 6),
    ],
)
def test_worker_threads_give_bit_identical_gradients(
    n_workers, shared_x, n_rep, n_pos, block_size, seed
):
    # (the last case: blocks whose elementwise ops would end in a vector loop's scalar tail at
    # group-dependent places)
    model = _model(n_rep, seed, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1 if shared_x else n_rep, 2, n_pos, 20, generator=gen)
    y = torch.randint(8, (1 if shared_x else n_rep, 2, n_pos), generator=gen)
    serial = model.exact_gradients(x, y, block_size=block_size, with_responsibility=True)
    threaded = model.exact_gradients(
        x, y, block_size=block_size, with_responsibility=True, n_workers=n_workers
    )
    assert torch.equal(serial.loss_nats, threaded.loss_nats)
    assert torch.equal(serial.d_values, threaded.d_values) and torch.equal(
        serial.responsibility, threaded.responsibility
    )
    assert all(torch.equal(serial.grads[n], threaded.grads[n]) for n in PARAMETER_NAMES)
    with pytest.raises(
        ValueError, match=r"single_head_gradients.n_workers must be an int >= 1; got 0"
    ):
        model.exact_gradients(x, y, n_workers=0)


@pytest.mark.parametrize("batch,block_size,n_workers", [(1, 7, 1), (2, 64, 2), (1, 1, 3)])
def test_routing_telemetry_from_the_gradient_pass_equals_the_separate_pass(
    batch, block_size, n_workers
):
    # the sums taken inside the blocked gradient pass against single_head_telemetry, which
    # rebuilds the head and calls causal_routing_telemetry (itself checked in test_telemetry.py)
    # non-uniform attention, yet no row so one-hot that the sign of its small advantages is
    # rounding noise (the positive mass would then be ill-posed)
    model = _model(3, 6, scale=3.0)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, batch, 37, 20, generator=gen, dtype=torch.float64)
    y = torch.randint(8, (3, batch, 37), generator=gen)
    delta_w_value = torch.randn(3, 20, 15, generator=gen, dtype=torch.float64)
    weights = {n: p.detach() for n, p in model.weights.items()}
    grads = model.exact_gradients(
        x, y, block_size=block_size, with_routing=True, with_responsibility=True, n_workers=n_workers
    )
    fused = single_head_routing_telemetry(grads, x, delta_w_value)
    separate = single_head_telemetry(weights, x, y, delta_w_value)
    for field in separate.__dataclass_fields__:
        if field != "positive_advantage_mass":
            torch.testing.assert_close(
                getattr(fused, field), getattr(separate, field), rtol=1e-10, atol=1e-14, msg=field
            )
    # The positive mass counts sign(adv): query 0 sees key 0 only, so its advantage is exactly
    # 0 (z_0 = v_0), which the gradient pass keeps and a recomputation turns into rounding noise
    # of either sign. Brute force from the autograd forward, with that exact zero:
    out = model(x)
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 8), y.reshape(-1))
    (u,) = torch.autograd.grad(ce * 3, [out.z])  # the mean over each replica's positions
    adv = (u * out.z).sum(-1, keepdim=True) - u @ out.v.transpose(-1, -2)
    adv[..., 0, :] = 0.0
    brute = (out.pattern * (adv > 0)).sum((-1, -2)).detach() / 37
    torch.testing.assert_close(fused.positive_advantage_mass, brute, rtol=0, atol=1e-12)
    plain = model.exact_gradients(x, y, block_size=block_size, n_workers=n_workers)
    assert plain.routing_sums is None
    assert torch.equal(plain.loss_nats, grads.loss_nats)  # the sums do not touch the gradients
    assert all(torch.equal(plain.grads[n], grads.grads[n]) for n in PARAMETER_NAMES)
    bare = model.exact_gradients(x, y, block_size=block_size, n_workers=n_workers, with_values=False)
    assert bare.d_values is None and torch.equal(bare.loss_nats, grads.loss_nats)
    assert all(torch.equal(bare.grads[n], grads.grads[n]) for n in PARAMETER_NAMES)
    with pytest.raises(ValueError, match=r"single_head_routing_telemetry.grads must come from"):
        single_head_routing_telemetry(plain, x, delta_w_value)


def test_scripted_block_loop_equals_the_plain_function(monkeypatch):
    # the TorchScript-compiled loop and the Python function it is compiled from: same numbers
    from windtunnel.models import single_head

    gen = torch.Generator().manual_seed(11)
    model = SingleHeadAttention(n_replicas=3)
    model.reset_parameters(gen)
    x = torch.randn(3, 2, 41, 20, generator=gen)
    y = torch.randint(8, (3, 2, 41), generator=gen)
    kwargs = {"block_size": 16, "with_responsibility": True, "with_routing": True}
    scripted = model.exact_gradients(x, y, **kwargs)
    assert single_head._loop() is not single_head._block_loop  # TorchScript compiled it
    monkeypatch.setattr(single_head, "_loop", lambda: single_head._block_loop)
    plain = model.exact_gradients(x, y, **kwargs)
    assert torch.equal(scripted.loss_nats, plain.loss_nats)
    assert all(torch.equal(scripted.grads[n], plain.grads[n]) for n in PARAMETER_NAMES)
    assert torch.equal(scripted.d_values, plain.d_values)
    assert torch.equal(scripted.responsibility, plain.responsibility)
    assert all(torch.equal(scripted.routing_sums[f], plain.routing_sums[f]) for f in plain.routing_sums)
