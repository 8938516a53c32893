"""HookPoint naming and record(): values, gradients against autograd, filters, zero cost, errors."""

import pytest
import torch
from torch import nn

from windtunnel.hooks import ActivationCache, HookPoint, eval_mode, hook_points, name_hook_points, record


class Inner(nn.Module):
    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3, generator=generator, dtype=torch.float64))
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_pre(x @ self.w)
        return self.hook_post(torch.tanh(pre))


class Toy(nn.Module):
    """x -> hook_in -> two inner blocks -> sum of the output used twice (once squared)."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.hook_in = HookPoint()
        self.blocks = nn.ModuleList([Inner(generator), Inner(generator)])
        name_hook_points(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hook_in(x)
        for block in self.blocks:
            h = block(h)
        return h


def _toy_and_input():
    g = torch.Generator().manual_seed(0)
    model = Toy(g)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    return model, x


def _loss(out: torch.Tensor) -> torch.Tensor:
    # Uses the output twice, so the gradient at the last hook is a sum of two paths.
    return (out.sum() + (out**2).sum() * 0.5) / out.shape[0]


ALL_NAMES = [
    "hook_in",
    "blocks.0.hook_pre",
    "blocks.0.hook_post",
    "blocks.1.hook_pre",
    "blocks.1.hook_post",
]


def test_hook_point_is_identity_and_named_by_path():
    model, x = _toy_and_input()
    assert list(hook_points(model)) == ALL_NAMES
    assert model.blocks[1].hook_pre.name == "blocks.1.hook_pre"
    y = x.detach()
    assert HookPoint()(y) is y


def test_name_hook_points_is_idempotent_but_refuses_a_second_root():
    model, _ = _toy_and_input()
    name_hook_points(model)  # same root again: same names, no error
    wrapper = nn.Module()
    wrapper.inner = model
    with pytest.raises(ValueError, match="already named 'hook_in' by another root"):
        name_hook_points(wrapper)


def test_recorded_values_and_grads_match_a_manual_forward_and_autograd():
    model, x = _toy_and_input()
    with record(model, grads=True) as cache:
        loss = _loss(model(x))
        loss.backward()

    # Independent reference: the same computation written out, intermediates kept for autograd.
    w0, w1 = model.blocks[0].w, model.blocks[1].w
    inp = x.detach().requires_grad_(True)
    pre0 = inp @ w0
    post0 = torch.tanh(pre0)
    pre1 = post0 @ w1
    post1 = torch.tanh(pre1)
    ref_grads = torch.autograd.grad(_loss(post1), [inp, pre0, post0, pre1, post1])
    refs = dict(zip(ALL_NAMES, [inp, pre0, post0, pre1, post1]))
    for name, grad in zip(ALL_NAMES, ref_grads):
        torch.testing.assert_close(cache[name], refs[name].detach(), rtol=0, atol=1e-14)
        torch.testing.assert_close(cache[name + "_grad"], grad, rtol=0, atol=1e-14)
    assert set(cache) == set(ALL_NAMES) | {n + "_grad" for n in ALL_NAMES}
    assert not cache["hook_in"].requires_grad


@pytest.mark.parametrize(
    "names,expected",
    [
        ("blocks.0.hook_pre", ["blocks.0.hook_pre"]),
        (["blocks.1.hook_post", "hook_in"], ["hook_in", "blocks.1.hook_post"]),
        (lambda n: n.endswith("hook_post"), ["blocks.0.hook_post", "blocks.1.hook_post"]),
        (None, ALL_NAMES),
    ],
)
def test_name_filters(names, expected):
    model, x = _toy_and_input()
    with record(model, names=names) as cache:
        model(x)
    assert list(cache) == expected


def test_unknown_name_raises_with_a_suggestion():
    model, _ = _toy_and_input()
    with pytest.raises(
        ValueError, match=r"record.names must name hook points.*did you mean 'blocks.0.hook_pre'"
    ):
        with record(model, names=["blocks.0.hook_pr"]):
            pass


def test_missing_cache_key_suggests_the_closest():
    model, x = _toy_and_input()
    with record(model, names="hook_in") as cache:
        model(x)
    with pytest.raises(KeyError, match="did you mean 'hook_in'"):
        cache["hook_inn"]
    assert isinstance(cache, ActivationCache) and len(cache) == 1


def _tensor_attributes(model: nn.Module) -> list[str]:
    """Tensors held by modules other than their parameters and buffers."""
    found = []
    for path, module in model.named_modules():
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                found.append(f"{path}.{key}")
    return found


def _registered_hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_zero_cost_when_not_recording():
    model, x = _toy_and_input()
    model(x).sum().backward()
    assert _registered_hooks(model) == 0
    assert _tensor_attributes(model) == []
    with record(model, grads=True) as cache:
        assert _registered_hooks(model) == len(ALL_NAMES)
        model(x).sum().backward()
    assert _registered_hooks(model) == 0
    assert _tensor_attributes(model) == []
    assert len(cache) == 2 * len(ALL_NAMES)


def test_hooks_are_removed_when_the_block_raises():
    model, _ = _toy_and_input()
    with pytest.raises(ZeroDivisionError):
        with record(model):
            raise ZeroDivisionError
    assert _registered_hooks(model) == 0


def test_backward_after_the_block_still_records_grads():
    model, x = _toy_and_input()
    with record(model, names="hook_in", grads=True) as cache:
        out = model(x)
    assert "hook_in_grad" not in cache
    out.sum().backward()
    torch.testing.assert_close(cache["hook_in_grad"], x.grad)


def test_grads_under_no_grad_raise_at_entry():
    model, _ = _toy_and_input()
    with torch.no_grad():
        with pytest.raises(ValueError, match="grads=True needs grad mode"):
            with record(model, grads=True):
                pass
    with torch.inference_mode():
        with pytest.raises(ValueError, match="grads=True needs grad mode"):
            with record(model, grads=True):
                pass


def test_grads_raise_when_the_forward_runs_under_no_grad():
    model, x = _toy_and_input()
    with record(model, grads=True):
        with torch.no_grad():
            with pytest.raises(ValueError, match="'hook_in' ran with grad mode disabled"):
                model(x)


def test_grads_raise_when_nothing_upstream_requires_grad():
    model, x = _toy_and_input()
    model.requires_grad_(False)
    with record(model, names="blocks.0.hook_pre", grads=True):
        with pytest.raises(ValueError, match="'blocks.0.hook_pre' does not require grad"):
            model(x.detach())


def test_no_grad_forward_is_fine_without_grads():
    model, x = _toy_and_input()
    with torch.no_grad(), record(model) as cache:
        model(x)
    assert len(cache) == len(ALL_NAMES)


def test_recording_twice_in_one_block_raises():
    model, x = _toy_and_input()
    with record(model, names="hook_in"):
        model(x)
        with pytest.raises(RuntimeError, match="'hook_in' was recorded twice"):
            model(x)


def test_detach_false_keeps_the_graph():
    model, x = _toy_and_input()
    with record(model, names="blocks.0.hook_post", detach=False) as cache:
        model(x)
    kept = cache["blocks.0.hook_post"]
    assert kept.requires_grad
    (grad,) = torch.autograd.grad(kept.sum(), model.blocks[0].w)
    assert grad.abs().sum() > 0


def test_recording_a_submodule_uses_the_root_names():
    model, x = _toy_and_input()
    with record(model.blocks[1]) as cache:
        model(x)
    assert list(cache) == ["blocks.1.hook_pre", "blocks.1.hook_post"]


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_turns_dropout_off_and_restores_the_flag_even_on_error(training):
    model = nn.Sequential(nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.1)))  # no parameters: no draw from the global RNG
    model.train(training)
    x = torch.ones(64, 3)
    with eval_mode(model) as same:
        assert same is model and not any(m.training for m in model.modules())
        assert torch.equal(model[0](x), x), "dropout is the identity in eval mode"
    assert all(m.training == training for m in model.modules())
    with pytest.raises(ZeroDivisionError):
        with eval_mode(model):
            raise ZeroDivisionError
    assert all(m.training == training for m in model.modules())
