"""Shared model parts against torch's reference implementations; dropout statistics and errors."""

import pytest
import torch
import torch.nn.functional as F

from windtunnel.hooks import name_hook_points, record
from windtunnel.models._layers import FeedForward, LayerNorm, RMSNorm, dropout


def _x(*shape, seed=0):
    return (
        torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
        + 1
    )


def test_rmsnorm_matches_torch_and_hooks_before_the_gain():
    norm = RMSNorm(6, eps=1e-5).double()
    name_hook_points(norm)
    with torch.no_grad():
        norm.w.copy_(torch.linspace(0.5, 2.0, 6))
    x = _x(2, 3, 6)
    with torch.no_grad(), record(norm) as cache:
        y = norm(x)
    torch.testing.assert_close(y, F.rms_norm(x, (6,), norm.w, eps=1e-5), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        cache["hook_normalized"], F.rms_norm(x, (6,), eps=1e-5), rtol=0, atol=1e-12
    )


def test_layernorm_matches_torch_and_hooks_before_the_affine():
    norm = LayerNorm(6, eps=1e-5).double()
    name_hook_points(norm)
    with torch.no_grad():
        norm.w.copy_(torch.linspace(0.5, 2.0, 6))
        norm.b.copy_(torch.linspace(-1.0, 1.0, 6))
    x = _x(2, 3, 6, seed=1)
    with torch.no_grad(), record(norm) as cache:
        y = norm(x)
    torch.testing.assert_close(
        y, F.layer_norm(x, (6,), norm.w, norm.b, eps=1e-5), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        cache["hook_normalized"], F.layer_norm(x, (6,), eps=1e-5), rtol=0, atol=1e-12
    )


def test_feed_forward_is_linear_gelu_linear():
    ff = FeedForward(4, 10, bias=True, std=0.5, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        ff.b_in.fill_(0.2)
        ff.b_out.fill_(-0.1)
    x = _x(3, 4, seed=2)
    with torch.no_grad():
        expected = F.linear(F.gelu(F.linear(x, ff.W_in.T, ff.b_in)), ff.W_out.T, ff.b_out)
        torch.testing.assert_close(ff(x), expected, rtol=0, atol=1e-12)
    no_bias = FeedForward(4, 10, bias=False, std=0.5, generator=None)
    assert no_bias.b_in is None and sum(p.numel() for p in no_bias.parameters()) == 80


def test_dropout_keeps_the_mean_and_is_reproducible():
    x = torch.ones(200_000)
    y = dropout(x, 0.25, training=True, generator=torch.Generator().manual_seed(0), owner="T")
    kept = (y != 0).double().mean().item()
    # Binomial standard error sqrt(0.75 * 0.25 / 2e5) ≈ 1e-3; allow 5 of them.
    assert abs(kept - 0.75) < 5e-3
    assert torch.all((y == 0) | (y == 1 / 0.75))
    z = dropout(x, 0.25, training=True, generator=torch.Generator().manual_seed(0), owner="T")
    assert torch.equal(y, z)
    assert dropout(x, 0.25, training=False, generator=None, owner="T") is x
    assert dropout(x, 0.0, training=True, generator=None, owner="T") is x


def test_dropout_errors():
    with pytest.raises(
        ValueError,
        match=r"T.forward: generator must be a torch.Generator in training mode when dropout > 0 \(dropout=0.5\); got None",
    ):
        dropout(torch.ones(3), 0.5, training=True, generator=None, owner="T")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dropout_generator_on_the_wrong_device():
    with pytest.raises(
        ValueError,
        match=r"T.forward: generator must be on the device of the activations \(cuda\); got a generator on cpu",
    ):
        dropout(
            torch.ones(3, device="cuda"), 0.5, training=True, generator=torch.Generator(), owner="T"
        )


def test_the_token_model_configs_share_one_base_and_load_the_config_json_of_older_runs():
    import dataclasses

    from windtunnel.models import LSTMConfig, PositionwiseMLPConfig, TinyGPTConfig
    from windtunnel.models._layers import TokenModelConfig

    shared = {f.name for f in dataclasses.fields(TokenModelConfig)}
    # config.json of a TinyGPT run written before the base existed: the same keys, another order
    old = {"vocab_size": 30, "n_positions": 12, "n_layers": 2, "n_heads": 2, "d_model": 16, "d_mlp": 32,
           "norm": "layernorm", "norm_eps": 1e-5, "attn_bias": False, "mlp_bias": True, "dropout": 0.0,
           "tie_embeddings": False, "n_out": 5, "head_bias": True, "init_std": 0.02}
    config = TinyGPTConfig.from_dict(old)
    assert config.to_dict() == old and config.n_outputs == 5 and config.d_head == 8
    for cls in (TinyGPTConfig, PositionwiseMLPConfig, LSTMConfig):
        assert issubclass(cls, TokenModelConfig) and shared <= {f.name for f in dataclasses.fields(cls)}
        made = cls(vocab_size=7, n_positions=4)
        assert cls.from_dict(made.to_dict()) == made and made.n_outputs == 7
        with pytest.raises(ValueError, match=rf"{cls.__name__}.dropout must be"):
            cls(vocab_size=7, n_positions=4, dropout=1.0)
    assert LSTMConfig(vocab_size=7).n_positions is None  # optional there only
    with pytest.raises(ValueError, match="TinyGPTConfig.n_positions"):
        TinyGPTConfig(vocab_size=7, n_positions=None)
    with pytest.raises(ValueError, match="TinyGPTConfig.n_heads must divide d_model"):
        TinyGPTConfig(vocab_size=7, n_positions=4, n_heads=5, d_model=16)
