"""LSTMModel: equals a multi-layer nn.LSTM with the same weights; counts, causality, options, errors."""

import pytest
import torch
from torch import nn

from windtunnel.hooks import hook_points, record
from windtunnel.models import LSTMConfig, LSTMModel

SMALL = dict(vocab_size=9, n_positions=7, n_layers=3, d_model=8)


def _model(seed=0, **overrides):
    return LSTMModel(
        LSTMConfig(**{**SMALL, **overrides}), generator=torch.Generator().manual_seed(seed)
    )


def _tokens(batch=3, seq_len=7, seed=1):
    return torch.randint(0, 9, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def _reference_lstm(model):
    """A stock multi-layer nn.LSTM holding the model's weights (built without the global RNG)."""
    config = model.config
    ref = nn.LSTM(
        config.d_model, config.d_model, num_layers=config.n_layers, batch_first=True, device="meta"
    )
    ref = ref.to_empty(device="cpu")
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(ref, f"{name}_l{layer}").copy_(getattr(block.lstm, f"{name}_l0"))
    return ref


def test_stack_equals_a_multi_layer_nn_lstm():
    model = _model(seed=2)
    tokens = _tokens()
    with (
        torch.no_grad(),
        record(model, names=["hook_embed", "hook_pos_embed", "blocks.2.hook_out"]) as cache,
    ):
        logits = model(tokens)
        out, _ = _reference_lstm(model)(cache["hook_embed"] + cache["hook_pos_embed"])
    torch.testing.assert_close(cache["blocks.2.hook_out"], out, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, model.ln_final(out) @ model.embed.W_E.T, rtol=0, atol=1e-6)


def test_parameter_counts():
    bijection = LSTMModel(LSTMConfig(vocab_size=40, n_positions=38, dropout=0.1), generator=None)
    lstm = 6 * (4 * 192 * (192 + 192) + 2 * 4 * 192)  # nn.LSTM(192, 192, num_layers=6)
    expected = 40 * 192 + 38 * 192 + lstm + 2 * 192
    assert expected == 1_794_048  # "≈1.80M" in docs/theory.md §6.1
    assert sum(p.numel() for p in bijection.parameters()) == expected
    hmm = LSTMModel(
        LSTMConfig(
            vocab_size=7, n_layers=9, d_model=256, tie_embeddings=False, n_out=5, head_bias=True
        ),
        generator=None,
    )
    lstm = 9 * (4 * 256 * 512 + 2 * 4 * 256)
    assert sum(p.numel() for p in hmm.parameters()) == 7 * 256 + lstm + 2 * 256 + 256 * 5 + 5


def test_initialisation_is_pytorch_default_and_deterministic():
    a, b, c = _model(seed=3), _model(seed=3), _model(seed=4)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), name
        if not name.startswith("ln_final"):  # norms start at gain 1, bias 0 whatever the seed
            assert not torch.equal(p, r), name
    bound = 1 / 8**0.5
    weights = a.blocks[0].lstm.weight_hh_l0
    assert weights.abs().max() <= bound and weights.abs().max() > 0.9 * bound
    assert torch.all(LSTMModel(a.config, generator=None).blocks[0].lstm.weight_ih_l0 == 0)


def test_causal():
    model = _model(seed=5)
    tokens = _tokens()
    changed = tokens.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 9
    with torch.no_grad():
        base, other = model(tokens), model(changed)
    torch.testing.assert_close(other[:, :4], base[:, :4], rtol=0, atol=0)
    assert (other[:, 4:] - base[:, 4:]).abs().max() > 0


def test_no_position_embedding_and_untied_head():
    model = _model(n_positions=None, tie_embeddings=False, n_out=4, head_bias=True)
    assert model.pos_embed is None
    assert "hook_pos_embed" not in hook_points(model)
    assert sorted(hook_points(model)) == sorted(
        [
            "hook_embed",
            "blocks.0.hook_out",
            "blocks.1.hook_out",
            "blocks.2.hook_out",
            "ln_final.hook_normalized",
        ]
    )
    assert model(torch.zeros(2, 50, dtype=torch.long)).shape == (2, 50, 4)


def test_dropout_between_layers_uses_the_generator():
    model = _model(seed=6, dropout=0.5)
    tokens = _tokens()
    with pytest.raises(
        ValueError, match=r"LSTMModel.forward: generator must be a torch.Generator in training mode"
    ):
        model(tokens)
    with record(
        model, names=["blocks.0.hook_out", "blocks.1.hook_out", "blocks.2.hook_out"]
    ) as cache:
        x = model(tokens, generator=torch.Generator().manual_seed(0))
    y = model(tokens, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, y)
    model.eval()
    assert not torch.equal(x, model(tokens))
    # Dropout acts between layers only: layer 0's output itself is untouched (up to the rounding
    # of a different LSTM kernel under grad mode), while layer 1 sees a dropped-out input.
    with torch.no_grad(), record(model, names=["blocks.0.hook_out", "blocks.1.hook_out"]) as clean:
        model(tokens)
    torch.testing.assert_close(
        cache["blocks.0.hook_out"], clean["blocks.0.hook_out"], rtol=0, atol=1e-6
    )
    assert (cache["blocks.1.hook_out"] - clean["blocks.1.hook_out"]).abs().max() > 1e-3


def test_config_round_trip_and_errors():
    config = LSTMConfig(**SMALL)
    assert LSTMConfig.from_dict(config.to_dict()) == config
    assert LSTMConfig(vocab_size=3).n_positions is None
    with pytest.raises(ValueError, match=r"LSTMConfig.n_positions must be an int >= 1; got 0"):
        LSTMConfig(**{**SMALL, "n_positions": 0})
    with pytest.raises(
        ValueError, match=r"LSTMConfig.dropout must be a number in \[0.0, 1.0\); got -0.1"
    ):
        LSTMConfig(**{**SMALL, "dropout": -0.1})
    with pytest.raises(
        ValueError,
        match=r"LSTMConfig.n_out must be None or equal vocab_size when tie_embeddings=True",
    ):
        LSTMConfig(**{**SMALL, "n_out": 5})
    with pytest.raises(ValueError, match=r"'num_layers' is not a field of LSTMConfig;"):
        LSTMConfig.from_dict({**SMALL, "num_layers": 2})
    with pytest.raises(ValueError, match="LSTMModel.config must be an LSTMConfig; got dict"):
        LSTMModel(SMALL, generator=None)
    with pytest.raises(ValueError, match=r"LSTMModel.forward: tokens must be an integer tensor"):
        _model()(torch.zeros(2, 3, dtype=torch.bool))
