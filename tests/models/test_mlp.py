"""PositionwiseMLP: parameter count, a manual forward, no mixing of positions, options, errors."""

import pytest
import torch
import torch.nn.functional as F

from windtunnel.hooks import hook_points, record
from windtunnel.models import PositionwiseMLP, PositionwiseMLPConfig

SMALL = dict(vocab_size=11, n_positions=8, n_layers=3, d_model=16, d_mlp=24, init_std=0.3)


def _model(seed=0, **overrides):
    return PositionwiseMLP(
        PositionwiseMLPConfig(**{**SMALL, **overrides}),
        generator=torch.Generator().manual_seed(seed),
    )


def _tokens(batch=4, seq_len=8, seed=1):
    return torch.randint(0, 11, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def test_bijection_control_parameter_count():
    model = PositionwiseMLP(PositionwiseMLPConfig(vocab_size=40, n_positions=38), generator=None)
    # Embeddings 40*192 + 38*192; 9 blocks of LN (2*192) + 192*768 + 768 + 768*192 + 192; final LN.
    per_block = 2 * 192 + 192 * 768 + 768 + 768 * 192 + 192
    expected = 40 * 192 + 38 * 192 + 9 * per_block + 2 * 192
    assert expected == 2_681_664  # "≈2.68M" in docs/theory.md §6.1
    assert sum(p.numel() for p in model.parameters()) == expected


def test_forward_matches_a_manual_computation():
    model = _model(seed=2)
    with torch.no_grad():
        for block in model.blocks:
            block.ln.w.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
            block.ln.b.fill_(0.1)
    tokens = _tokens()
    with torch.no_grad():
        x = model.embed.W_E[tokens] + model.pos_embed.W_pos[: tokens.shape[1]]
        for block in model.blocks:
            h = F.layer_norm(x, (16,), block.ln.w, block.ln.b, eps=1e-5)
            x = x + F.gelu(h @ block.mlp.W_in + block.mlp.b_in) @ block.mlp.W_out + block.mlp.b_out
        x = F.layer_norm(x, (16,), model.ln_final.w, model.ln_final.b, eps=1e-5)
        torch.testing.assert_close(model(tokens), x @ model.embed.W_E.T, rtol=0, atol=1e-5)


def test_logits_at_t_depend_only_on_the_token_at_t():
    model = _model(seed=4)
    tokens = _tokens()
    with torch.no_grad():
        base = model(tokens)
        changed = tokens.clone()
        changed[:, [0, 2, 3, 7]] = (changed[:, [0, 2, 3, 7]] + 5) % 11
        other = model(changed)
    same = [1, 4, 5, 6]
    torch.testing.assert_close(other[:, same], base[:, same], rtol=0, atol=0)
    assert (other[:, [0, 2, 3, 7]] - base[:, [0, 2, 3, 7]]).abs().max() > 1e-3


def test_hooks_bypass_and_options():
    model = _model()
    names = set(hook_points(model))
    assert {
        "hook_embed",
        "hook_pos_embed",
        "blocks.2.hook_mlp_out",
        "blocks.0.ln.hook_normalized",
        "blocks.1.mlp.hook_post",
        "ln_final.hook_normalized",
    } <= names
    with torch.no_grad(), record(model, names=lambda n: "resid" in n) as cache:
        model(_tokens())
    model.blocks[1].bypass = True
    with torch.no_grad(), record(model, names=lambda n: "resid" in n) as bypassed:
        model(_tokens())
    assert torch.equal(bypassed["blocks.1.hook_resid_pre"], bypassed["blocks.1.hook_resid_post"])
    assert not torch.equal(cache["blocks.1.hook_resid_pre"], cache["blocks.1.hook_resid_post"])

    plain = _model(final_norm=False, tie_embeddings=False, n_out=3, head_bias=True)
    assert plain.ln_final is None and "ln_final.hook_normalized" not in hook_points(plain)
    assert plain(_tokens()).shape == (4, 8, 3)


def test_generator_determinism_and_dropout():
    a, b = _model(seed=7, dropout=0.2), _model(seed=7, dropout=0.2)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    tokens = _tokens()
    with pytest.raises(
        ValueError, match=r"PositionwiseMLP.forward: generator must be a torch.Generator"
    ):
        a(tokens)
    x = a(tokens, generator=torch.Generator().manual_seed(0))
    y = a(tokens, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, y) and not torch.equal(x, a.eval()(tokens))


def test_config_round_trip_and_errors():
    config = PositionwiseMLPConfig(**SMALL)
    assert PositionwiseMLPConfig.from_dict(config.to_dict()) == config
    assert config.n_outputs == 11
    with pytest.raises(ValueError, match=r"PositionwiseMLPConfig.d_mlp must be an int >= 1; got 0"):
        PositionwiseMLPConfig(**{**SMALL, "d_mlp": 0})
    with pytest.raises(
        ValueError, match=r"PositionwiseMLPConfig.final_norm must be a bool; got None"
    ):
        PositionwiseMLPConfig(**{**SMALL, "final_norm": None})
    with pytest.raises(ValueError, match=r"'d_ff' is not a field of PositionwiseMLPConfig;"):
        PositionwiseMLPConfig.from_dict({**SMALL, "d_ff": 4})
    with pytest.raises(ValueError, match="PositionwiseMLP.config must be a PositionwiseMLPConfig"):
        PositionwiseMLP(SMALL, generator=None)
    with pytest.raises(
        ValueError, match=r"PositionwiseMLP.forward: tokens must have seq_len <= n_positions = 8"
    ):
        _model()(torch.zeros(1, 9, dtype=torch.long))
