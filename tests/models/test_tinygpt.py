"""TinyGPT: parameter counts, initialisation, causality, hooks, ablations, dropout, config errors."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from windtunnel._checks import ConfigError
from windtunnel.hooks import hook_points, record
from windtunnel.models import TinyGPT, TinyGPTConfig

# init_std 0.3 rather than 0.02: every sublayer then moves the logits well above rounding.
SMALL = dict(
    vocab_size=11, n_positions=9, n_layers=2, n_heads=2, d_model=16, d_mlp=32, init_std=0.3
)


def _model(seed=0, **overrides):
    config = TinyGPTConfig(**{**SMALL, **overrides})
    return TinyGPT(config, generator=torch.Generator().manual_seed(seed))


def _tokens(batch=3, seq_len=9, vocab=11, seed=1):
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_bijection_parameter_count_is_2_677_440():
    config = TinyGPTConfig(vocab_size=40, n_positions=38)  # defaults: 6 layers, 6 heads, 192, 768
    model = TinyGPT(config, generator=None)
    # Hand count (docs/theory.md §6.1): embeddings 40*192 + 38*192; per layer 4*192² (Q, K, V, O, no bias)
    # + 192*768 + 768 + 768*192 + 192 (FFN with biases) + 2*192 (two RMSNorm gains); final gain 192.
    per_layer = 4 * 192**2 + (192 * 768 + 768 + 768 * 192 + 192) + 2 * 192
    assert 40 * 192 + 38 * 192 + 6 * per_layer + 192 == 2_677_440
    assert _n_params(model) == 2_677_440


def test_hmm_shape_parameter_count():
    vocab = 7
    config = TinyGPTConfig(
        vocab_size=vocab,
        n_positions=1024,
        n_layers=9,
        n_heads=8,
        d_model=256,
        d_mlp=1024,
        norm="layernorm",
        dropout=0.1,
        tie_embeddings=False,
        n_out=5,
        head_bias=True,
    )
    model = TinyGPT(config, generator=None)
    per_layer = 4 * 256**2 + (256 * 1024 + 1024 + 1024 * 256 + 256) + 2 * (2 * 256)
    expected = vocab * 256 + 1024 * 256 + 9 * per_layer + 2 * 256 + (256 * 5 + 5)
    assert _n_params(model) == expected
    assert model.eval()(torch.zeros(2, 4, dtype=torch.long)).shape == (2, 4, 5)


def test_same_generator_seed_gives_identical_weights():
    a, b, c = _model(seed=5), _model(seed=5), _model(seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    differing = [name for name in sa if not torch.equal(sa[name], sc[name])]
    assert "embed.W_E" in differing and "blocks.1.attn.W_K" in differing
    # reset_parameters draws in the constructor's order.
    a.reset_parameters(torch.Generator().manual_seed(6))
    for name, value in a.state_dict().items():
        assert torch.equal(value, sc[name]), name


def test_init_statistics_and_none_generator():
    model = TinyGPT(
        TinyGPTConfig(vocab_size=40, n_positions=38), generator=torch.Generator().manual_seed(0)
    )
    for name in ("embed.W_E", "blocks.3.attn.W_V", "blocks.5.mlp.W_out"):
        std = model.get_parameter(name).std().item()
        assert 0.019 < std < 0.021, (name, std)
    assert torch.all(model.blocks[0].mlp.b_in == 0) and torch.all(model.blocks[0].ln1.w == 1)
    empty = TinyGPT(TinyGPTConfig(**SMALL), generator=None)
    assert torch.all(empty.embed.W_E == 0) and torch.all(empty.blocks[1].ln2.w == 1)


def test_state_dict_round_trip():
    model = _model(seed=2)
    copy = TinyGPT(model.config, generator=None)
    copy.load_state_dict(model.state_dict())
    tokens = _tokens()
    assert torch.equal(model(tokens), copy(tokens))
    assert not any("head_multiplier" in key for key in model.state_dict())


def test_causal_pass_equals_per_prefix_passes():
    # float64: in float32 the full and the prefix passes block their matmuls differently, and
    # the logits differ by a few ulps (1.4e-6 on some CPUs), which says nothing about causality.
    model = _model(seed=3).double()
    tokens = _tokens(seq_len=9)
    with torch.no_grad():
        full = model(tokens)
        for t in range(1, 10):
            torch.testing.assert_close(full[:, :t], model(tokens[:, :t]), rtol=0, atol=1e-12)
        # Changing the future never changes the past.
        changed = tokens.clone()
        changed[:, 5:] = (changed[:, 5:] + 1) % 11
        other = model(changed)
    torch.testing.assert_close(other[:, :5], full[:, :5], rtol=0, atol=0)
    assert (other[:, 5:] - full[:, 5:]).abs().max() > 0


EXPECTED_HOOKS = (
    ["hook_embed", "hook_pos_embed"]
    + [
        f"blocks.{layer}.{name}"
        for layer in range(2)
        for name in (
            "ln1.hook_normalized",
            "attn.hook_q",
            "attn.hook_k",
            "attn.hook_v",
            "attn.hook_attn_scores",
            "attn.hook_pattern",
            "attn.hook_z",
            "ln2.hook_normalized",
            "mlp.hook_pre",
            "mlp.hook_post",
            "hook_resid_pre",
            "hook_attn_out",
            "hook_resid_mid",
            "hook_mlp_out",
            "hook_resid_post",
        )
    ]
    + ["ln_final.hook_normalized"]
)


def test_hook_names_and_shapes():
    model = _model()
    assert sorted(hook_points(model)) == sorted(EXPECTED_HOOKS)
    with torch.no_grad(), record(model) as cache:
        model(_tokens(batch=3, seq_len=7))
    shapes = {name: tuple(value.shape) for name, value in cache.items()}
    assert shapes["hook_embed"] == shapes["hook_pos_embed"] == (3, 7, 16)
    assert shapes["blocks.1.attn.hook_q"] == shapes["blocks.1.attn.hook_z"] == (3, 7, 2, 8)
    assert (
        shapes["blocks.0.attn.hook_pattern"]
        == shapes["blocks.0.attn.hook_attn_scores"]
        == (3, 2, 7, 7)
    )
    assert shapes["blocks.0.mlp.hook_post"] == (3, 7, 32)
    assert shapes["ln_final.hook_normalized"] == shapes["blocks.1.hook_resid_post"] == (3, 7, 16)
    # Residual bookkeeping: pre + attn_out = mid, mid + mlp_out = post, post(l) = pre(l+1).
    for layer in range(2):
        b = f"blocks.{layer}."
        torch.testing.assert_close(
            cache[b + "hook_resid_pre"] + cache[b + "hook_attn_out"], cache[b + "hook_resid_mid"]
        )
        torch.testing.assert_close(
            cache[b + "hook_resid_mid"] + cache[b + "hook_mlp_out"], cache[b + "hook_resid_post"]
        )
    assert torch.equal(cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(
        cache["hook_embed"] + cache["hook_pos_embed"], cache["blocks.0.hook_resid_pre"]
    )


def test_tied_readout_and_rmsnorm_against_torch():
    model = _model(seed=4)
    tokens = _tokens()
    with torch.no_grad(), record(model, names="blocks.1.hook_resid_post") as cache:
        logits = model(tokens)
    final = F.rms_norm(cache["blocks.1.hook_resid_post"], (16,), model.ln_final.w, eps=1e-5)
    torch.testing.assert_close(logits, final @ model.embed.W_E.T, rtol=0, atol=1e-6)
    assert model.unembed is None


def test_untied_layernorm_readout_against_torch():
    model = _model(seed=4, norm="layernorm", tie_embeddings=False, n_out=5, head_bias=True)
    with torch.no_grad():
        model.unembed.b_U.copy_(torch.arange(5.0))
        model.ln_final.b.fill_(0.1)
    tokens = _tokens()
    with torch.no_grad(), record(model, names="blocks.1.hook_resid_post") as cache:
        logits = model(tokens)
    final = F.layer_norm(
        cache["blocks.1.hook_resid_post"], (16,), model.ln_final.w, model.ln_final.b, eps=1e-5
    )
    torch.testing.assert_close(
        logits, final @ model.unembed.W_U + model.unembed.b_U, rtol=0, atol=1e-6
    )
    assert logits.shape == (3, 9, 5)


def test_hook_z_grad_maps_to_attn_out_grad_through_w_o():
    model = _model(seed=7)
    tokens = _tokens()
    names = ["blocks.0.attn.hook_z", "blocks.0.hook_attn_out"]
    with record(model, names=names, grads=True) as cache:
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    u = cache["blocks.0.attn.hook_z_grad"]  # [batch, pos, head, d_head]
    expected = torch.einsum(
        "bpd,hed->bphe", cache["blocks.0.hook_attn_out_grad"], model.blocks[0].attn.W_O
    )
    torch.testing.assert_close(u, expected.detach(), rtol=1e-5, atol=1e-9)
    assert u.abs().max() > 0


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def test_head_ablation_changes_logits_and_all_heads_equal_zero_attn_out():
    model = _model(seed=8)
    tokens = _tokens()
    base = _logits(model, tokens)
    with torch.no_grad(), record(model, names="blocks.0.attn.hook_z") as cache:
        model(tokens)
    assert cache["blocks.0.attn.hook_z"][:, :, 1].abs().max() > 0  # head (0, 1) has nonzero output
    with model.ablated(heads=[(0, 1)]):
        one = _logits(model, tokens)
    assert (one - base).abs().max() > 1e-4
    with model.ablated(heads=[(0, 0), (0, 1)]):
        all_heads = _logits(model, tokens)
    with model.ablated(zero_attn_out=[0]):
        zero_attn = _logits(model, tokens)
    torch.testing.assert_close(all_heads, zero_attn, rtol=0, atol=1e-6)
    assert torch.equal(_logits(model, tokens), base)  # state restored
    assert all(
        block.attn.head_multiplier is None and not block.zero_attn_out for block in model.blocks
    )


def test_head_ablation_equals_zeroing_that_heads_w_o():
    model = _model(seed=9)
    tokens = _tokens()
    with model.ablated(heads=[(1, 0)]):
        ablated = _logits(model, tokens)
    with torch.no_grad():
        model.blocks[1].attn.W_O[0].zero_()
    torch.testing.assert_close(ablated, _logits(model, tokens), rtol=0, atol=1e-6)


def test_bypass_and_zero_mlp_out_against_manual_composition():
    model = _model(seed=10)
    tokens = _tokens()
    with torch.no_grad():
        resid = model.embed(tokens) + model.pos_embed(tokens)
        after_block1_only = model.blocks[1](resid)
        manual_bypass0 = model.ln_final(after_block1_only) @ model.embed.W_E.T
        manual_none = model.ln_final(resid) @ model.embed.W_E.T
    with model.ablated(bypass=[0]):
        torch.testing.assert_close(_logits(model, tokens), manual_bypass0, rtol=0, atol=1e-6)
    with model.ablated(bypass=[0, 1]):
        torch.testing.assert_close(_logits(model, tokens), manual_none, rtol=0, atol=1e-6)
    base = _logits(model, tokens)
    with model.ablated(zero_mlp_out=[1]):
        zero_mlp = _logits(model, tokens)
    assert (zero_mlp - base).abs().max() > 1e-4
    with torch.no_grad():
        model.blocks[1].mlp.W_out.zero_()
        model.blocks[1].mlp.b_out.zero_()
    torch.testing.assert_close(zero_mlp, _logits(model, tokens), rtol=0, atol=1e-6)


def test_bypassed_block_is_the_identity_at_its_hooks():
    model = _model(seed=11)
    with torch.no_grad(), model.ablated(bypass=[1]), record(model) as cache:
        model(_tokens())
    assert torch.equal(cache["blocks.1.hook_resid_pre"], cache["blocks.1.hook_resid_post"])
    assert "blocks.1.attn.hook_pattern" not in cache


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(heads=[(2, 0)]),
            r"TinyGPT.ablated.heads must be \(layer, head\) pairs in \[0, 2\) x \[0, 2\); got \[\(2, 0\)\]",
        ),
        (dict(heads=[(0, 5)]), r"TinyGPT.ablated.heads must be .*; got \[\(0, 5\)\]"),
        (
            dict(bypass=[-1]),
            r"TinyGPT.ablated.bypass must be layer indices in \[0, 2\); got \[-1\]",
        ),
        (dict(zero_attn_out=[2]), r"TinyGPT.ablated.zero_attn_out must be layer indices"),
        (dict(zero_mlp_out=["0"]), r"TinyGPT.ablated.zero_mlp_out must be layer indices"),
    ],
)
def test_bad_ablation_arguments(kwargs, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        with model.ablated(**kwargs):
            pass


def test_dropout_uses_only_the_given_generator():
    model = _model(seed=12, dropout=0.3)
    tokens = _tokens()
    model.train()
    with pytest.raises(
        ValueError,
        match=r"TinyGPT.forward: generator must be a torch.Generator in training mode when dropout > 0 \(dropout=0.3\); got None",
    ):
        model(tokens)
    a = model(tokens, generator=torch.Generator().manual_seed(0))
    b = model(tokens, generator=torch.Generator().manual_seed(0))
    c = model(tokens, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    model.eval()
    no_dropout = model(tokens)
    assert torch.equal(no_dropout, _model(seed=12)(tokens))
    assert not torch.equal(a, no_dropout)


def test_no_dropout_needs_no_generator_in_training():
    model = _model()
    model.train()
    assert torch.equal(model(_tokens()), model.eval()(_tokens()))


def test_position_ids_choose_the_rows_of_the_table():
    model = _model().eval()
    tokens = _tokens(batch=2, seq_len=5)
    assert torch.equal(model(tokens, position_ids=torch.arange(5)), model(tokens))
    # Ids k..k+4 equal a model whose table starts at row k.
    shifted = _model().eval()
    with torch.no_grad():
        shifted.pos_embed.W_pos.zero_()
        shifted.pos_embed.W_pos[:6] = model.pos_embed.W_pos[3:9]
    assert torch.allclose(model(tokens, position_ids=torch.arange(3, 8)), shifted(tokens), atol=1e-6)
    assert not torch.allclose(model(tokens, position_ids=torch.arange(3, 8)), model(tokens), atol=1e-3)
    # A [batch, seq_len] tensor gives each sequence its own ids, gaps allowed.
    ids = torch.tensor([[0, 1, 6, 7, 8], [4, 5, 6, 7, 8]])
    per_row = model(tokens, position_ids=ids)
    # (Batched and single-sequence passes may sum in another order: compare to float32 precision.)
    assert torch.allclose(per_row[0], model(tokens[:1], position_ids=ids[0])[0], atol=1e-6)
    assert torch.allclose(per_row[1], model(tokens[1:], position_ids=ids[1])[0], atol=1e-6)
    assert not torch.allclose(per_row[0], model(tokens[:1], position_ids=ids[1])[0], atol=1e-3)
    with record(model, names=["hook_pos_embed"]) as cache:
        model(tokens, position_ids=ids)
    assert torch.equal(cache["hook_pos_embed"], model.pos_embed.W_pos[ids])


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.arange(-1, 4), r"position_ids must lie in \[0, n_positions\) = \[0, 9\); got values in \[-1, 3\]"),
        (torch.arange(5, 10), r"got values in \[5, 9\]"),
        (torch.arange(5.0), r"integer tensor of shape \[batch, seq_len\] = \[2, 5\] or \[seq_len\]; got float32 \[5\]"),
        (torch.zeros(3, 5, dtype=torch.long), r"got int64 \[3, 5\]"),
        (torch.arange(4), r"got int64 \[4\]"),
        (3, r"got int"),
    ],
)
def test_bad_position_ids(ids, match):
    with pytest.raises(ValueError, match=match):
        _model()(_tokens(batch=2, seq_len=5), position_ids=ids)


def test_bad_tokens():
    model = _model()
    with pytest.raises(
        ValueError,
        match=r"tokens must be an integer tensor of shape \[batch, seq_len\] with seq_len >= 1; got float32 \[2, 3\]",
    ):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"got int64 \[3\]"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"tokens must have seq_len <= n_positions = 9; got seq_len=10"
    ):
        model(torch.zeros(1, 10, dtype=torch.long))


def test_config_round_trip():
    config = TinyGPTConfig(**SMALL, norm="layernorm", tie_embeddings=False, n_out=4)
    data = config.to_dict()
    assert data["n_out"] == 4 and data["norm"] == "layernorm"
    assert TinyGPTConfig.from_dict(data) == config
    assert config.d_head == 8 and config.n_outputs == 4
    assert TinyGPTConfig(**SMALL).n_outputs == 11
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_layers = 3


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            dict(n_heads=3, d_model=64),
            r"^TinyGPTConfig.n_heads must divide d_model; got n_heads=3, d_model=64.$",
        ),
        (dict(n_layers=0), r"TinyGPTConfig.n_layers must be an int >= 1; got 0"),
        (dict(vocab_size=True), r"TinyGPTConfig.vocab_size must be an int >= 1; got True"),
        (dict(n_positions=2.5), r"TinyGPTConfig.n_positions must be an int >= 1; got 2.5"),
        (
            dict(norm="rms"),
            r"TinyGPTConfig.norm must be one of 'rmsnorm', 'layernorm'; got 'rms'. did you mean 'rmsnorm'",
        ),
        (dict(norm_eps=0.0), r"TinyGPTConfig.norm_eps must be a number in \(0.0, 1.0\]; got 0.0"),
        (dict(dropout=1.0), r"TinyGPTConfig.dropout must be a number in \[0.0, 1.0\); got 1.0"),
        (dict(init_std=-0.02), r"TinyGPTConfig.init_std must be a number"),
        (dict(attn_bias=1), r"TinyGPTConfig.attn_bias must be a bool; got 1"),
        (dict(tie_embeddings="yes"), r"TinyGPTConfig.tie_embeddings must be a bool; got 'yes'"),
        (
            dict(n_out=5),
            r"TinyGPTConfig.n_out must be None or equal vocab_size when tie_embeddings=True; got n_out=5, vocab_size=11",
        ),
        (dict(n_out=0, tie_embeddings=False), r"TinyGPTConfig.n_out must be an int >= 1; got 0"),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        TinyGPTConfig(**{**SMALL, **overrides})


def test_all_config_problems_reported_together():
    with pytest.raises(
        ConfigError,
        match=r"2 problems in TinyGPTConfig:\n  TinyGPTConfig.n_layers .*\n  TinyGPTConfig.dropout",
    ):
        TinyGPTConfig(**{**SMALL, "n_layers": -1, "dropout": 2.0})


def test_from_dict_rejects_unknown_fields():
    data = {**TinyGPTConfig(**SMALL).to_dict(), "n_layer": 3}
    with pytest.raises(
        ValueError, match=r"'n_layer' is not a field of TinyGPTConfig; did you mean 'n_layers'\?"
    ):
        TinyGPTConfig.from_dict(data)


def test_model_rejects_a_non_config():
    with pytest.raises(ValueError, match="TinyGPT.config must be a TinyGPTConfig; got dict"):
        TinyGPT(SMALL, generator=None)


def test_no_hooks_or_tensors_kept_without_recording():
    model = _model()
    F.cross_entropy(model(_tokens()).flatten(0, 1), _tokens().flatten()).backward()
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    held = [
        (path, key)
        for path, m in model.named_modules()
        for key, value in vars(m).items()
        if isinstance(value, torch.Tensor)
    ]
    assert held == []
