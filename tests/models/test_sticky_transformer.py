"""The deep sticky-chain transformer: shapes, causality, generator-driven init and dropout."""

import pytest
import torch

from windtunnel._checks import ConfigError
from windtunnel.models import StickyTransformer, StickyTransformerConfig

SMALL = StickyTransformerConfig(d_x=4, d_model=8, n_layers=2, n_heads=2, d_mlp=16, n_classes=3)


def _model(config=SMALL, seed=0):
    return StickyTransformer(config, generator=torch.Generator().manual_seed(seed)).double()


def test_reference_shape_and_parameter_count():
    model = StickyTransformer(generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 7, 20, generator=torch.Generator().manual_seed(1))
    assert model(x).shape == (2, 7, 8)
    # embed 20*64+64; per block: 2 LN (4*64), qkv 64*192+192, out 64*64+64, mlp 64*256+256+256*64+64;
    # final LN 2*64; unembed 64*8+8
    block = 4 * 64 + 64 * 192 + 192 + 64 * 64 + 64 + 64 * 256 + 256 + 256 * 64 + 64
    expected = 20 * 64 + 64 + 4 * block + 2 * 64 + 64 * 8 + 8
    assert sum(p.numel() for p in model.parameters()) == expected


def test_outputs_are_causal():
    model = _model()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 9, 4, generator=gen, dtype=torch.float64)
    changed = x.clone()
    changed[:, 5:] += torch.randn(1, 4, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(model(x)[:, :5], model(changed)[:, :5], rtol=0, atol=1e-12)
    assert not torch.allclose(model(x)[:, 5:], model(changed)[:, 5:])


def test_init_is_a_function_of_the_generator():
    a, b, c = _model(seed=3), _model(seed=3), _model(seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    bound = 1 / 4**0.5  # embed: fan_in = d_x = 4
    assert a.embed.weight.abs().max() <= bound and a.ln_final.weight.eq(1).all()


def test_dropout_uses_only_the_given_generator():
    config = StickyTransformerConfig(
        d_x=4, d_model=8, n_layers=1, n_heads=2, d_mlp=16, n_classes=3, dropout=0.5
    )
    model = _model(config)
    x = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    one = model(x, generator=torch.Generator().manual_seed(9))
    two = model(x, generator=torch.Generator().manual_seed(9))
    other = model(x, generator=torch.Generator().manual_seed(10))
    assert torch.equal(one, two) and not torch.equal(one, other)
    plain = model(x)  # no generator: no dropout, the SDPA path; equals rate 0
    without = _model(StickyTransformerConfig(**{**config.__dict__, "dropout": 0.0}))
    torch.testing.assert_close(plain, without(x), rtol=0, atol=1e-12)


def test_bad_config_and_inputs_raise():
    with pytest.raises(
        ValueError,
        match=r"StickyTransformerConfig.n_heads must divide d_model; got n_heads=3, d_model=64",
    ):
        StickyTransformerConfig(n_heads=3)
    with pytest.raises(ConfigError, match=r"2 problems in StickyTransformerConfig"):
        StickyTransformerConfig(n_layers=0, dropout=1.0)
    with pytest.raises(
        ValueError, match=r"StickyTransformer.forward: x must be \[batch, pos, d_x=4\]"
    ):
        _model()(torch.zeros(3, 5, dtype=torch.float64))
