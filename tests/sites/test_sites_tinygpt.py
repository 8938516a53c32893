"""TinyGPT adapter: its sites are TinyGPT's own hook values, and the law on them equals autograd."""

import pytest
import torch

from windtunnel.attention import MultiHeadAttention
from windtunnel.hooks import record
from windtunnel.models import TinyGPT, TinyGPTConfig
from windtunnel.sites import check_law, model_gradient_errors, record_sites, routing_law


def _model(dtype=torch.float64):
    config = TinyGPTConfig(vocab_size=11, n_positions=9, n_layers=2, n_heads=3, d_model=24, d_mlp=32, init_std=0.3)
    return TinyGPT(config, generator=torch.Generator().manual_seed(0)).to(dtype).eval()


def _tokens():
    return torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(1))


def _loss(logits):
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=logits.dtype)
    return (logits * weights).sum()


def _hooks_left(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_sites_reproduce_the_hook_values_and_gradients():
    model, tokens = _model(), _tokens()
    wanted = lambda n: "attn.hook_" in n  # noqa: E731
    with record(model, names=wanted, grads=True) as cache, record_sites(model) as recording:
        _loss(model(tokens)).backward()
    assert [s.name for s in recording.sites] == ["blocks.0.attn", "blocks.1.attn"]
    for layer, site in enumerate(recording.sites):
        hook = f"blocks.{layer}.attn.hook_"
        for field, name in (("q", "q"), ("k", "k"), ("v", "v"), ("pattern", "pattern"), ("z", "z")):
            assert torch.equal(getattr(site, field), cache[hook + name]), field
        for field, name in (("q_grad", "q"), ("k_grad", "k"), ("v_grad", "v"), ("z_grad", "z"), ("scores_grad", "attn_scores")):
            assert torch.equal(getattr(site, field), cache[hook + name + "_grad"]), field
        assert torch.equal(site.mask, cache[hook + "attn_scores"] > -torch.inf)
        assert torch.equal(site.mask[0, 0], torch.ones(9, 9, dtype=torch.bool).tril())
        assert site.scale == model.blocks[layer].attn.scale and site.layer == layer
        assert site.kv_head_of == (0, 1, 2)
    assert _hooks_left(model) == 0


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_law_equals_autograd_on_every_head(dtype, tol):
    """Relative error: max |closed form - autograd| / max |autograd| per layer and quantity."""
    model, tokens = _model(dtype), _tokens()
    with record_sites(model) as recording:
        _loss(model(tokens)).backward()
    for site in recording.sites:
        law = routing_law(site)
        assert law.d_queries.dtype == dtype
        errors = model_gradient_errors(site, law)
        assert set(errors) == {"d_queries", "d_keys", "d_values", "d_scores"}
        assert max(errors.values()) <= tol, (site.name, errors)
        assert check_law(site).worst_rel_error <= 1e-10


def test_no_grad_forward_and_missing_backward_give_clear_errors():
    model, tokens = _model(), _tokens()
    with torch.no_grad(), record_sites(model) as recording:
        model(tokens)
    assert recording.sites[0].q.shape == (3, 9, 3, 8)  # q, k, v, pattern still recorded
    with pytest.raises(ValueError, match=r"no u = dL/dz: the forward pass ran with grad mode disabled \(torch.no_grad\(\)"):
        recording.sites[0].u
    with record_sites(model) as recording:
        model(tokens)
    with pytest.raises(ValueError, match="no backward pass has reached this layer yet"):
        routing_law(recording[1])
    with record_sites(model, grads=False) as recording:
        _loss(model(tokens)).backward()
    with pytest.raises(ValueError, match=r"record_sites\(\.\.\., grads=False\)"):
        recording[0].u


def test_two_forward_passes_ablated_heads_and_bidirectional_attention_are_refused():
    model, tokens = _model(), _tokens()
    with pytest.raises(RuntimeError, match="layer 'blocks.0.attn' ran twice"):
        with record_sites(model):
            model(tokens)
            model(tokens)
    with model.ablated(heads=[(1, 0)]), pytest.raises(ValueError, match=r"head multipliers \(ablations\) on \['blocks.1.attn'\]"):
        with record_sites(model):
            pass
    attn = MultiHeadAttention(d_model=8, n_heads=2, causal=False, generator=torch.Generator().manual_seed(0)).double()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(ValueError, match="lets queries attend to later keys"):
        with record_sites(attn):
            attn(x)
    with record_sites(attn, causal_only=False) as recording:
        attn(x).sum().backward()
    assert bool(recording[0].mask.all())
    assert max(model_gradient_errors(recording[0]).values()) <= 1e-10
    assert _hooks_left(model) == 0 and _hooks_left(attn) == 0
