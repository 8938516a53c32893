"""The instrument features of windtunnel.sites: what each adapter provides or refuses, and the
recorded tensors against the models' own hook points."""

import warnings

import pytest
import torch

from windtunnel import sites
from windtunnel.hooks import record
from windtunnel.models import PositionwiseMLP, PositionwiseMLPConfig, TinyGPT, TinyGPTConfig

transformers = pytest.importorskip("transformers")
transformer_lens = pytest.importorskip("transformer_lens")

TOKENS = torch.randint(0, 12, (3, 7), generator=torch.Generator().manual_seed(0))


def _tiny(**kw):
    config = TinyGPTConfig(vocab_size=12, n_positions=8, n_layers=2, n_heads=2, d_model=16, d_mlp=32, **kw)
    return TinyGPT(config, generator=torch.Generator().manual_seed(0))


def _gpt2(base=False):
    config = transformers.GPT2Config(vocab_size=12, n_positions=8, n_embd=16, n_layer=2, n_head=2, n_inner=32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return (transformers.GPT2Model if base else transformers.GPT2LMHeadModel)(config).eval()


def _tl():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=8, d_head=8, n_heads=2, d_vocab=12, act_fn="gelu", device="cpu")
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        torch.manual_seed(0)
        return HookedTransformer(config).eval()


def test_what_each_adapter_provides():
    mlp = PositionwiseMLP(PositionwiseMLPConfig(vocab_size=12, n_positions=8, n_layers=1, d_model=8, d_mlp=16), generator=torch.Generator().manual_seed(0))
    features = ("readout", "token_keys", "value_projections", "ablation")
    assert all(sites.unsupported(_tiny(), f) is None for f in sites.FEATURES)
    assert all(sites.unsupported(_tl(), f) is None for f in sites.FEATURES)
    gpt2 = _gpt2()
    assert sites.unsupported(gpt2, "sites") is None and sites.unsupported(gpt2, "readout") is None
    assert all("AttentionInterface" in sites.unsupported(gpt2, f) for f in features[1:3])
    assert sites.unsupported(gpt2, "ablation") is None and sites.unsupported(_gpt2(base=True), "ablation") is None
    no_mlp = _gpt2()
    no_mlp.transformer.h[1].mlp = None  # a decoder layer without a child named "mlp"
    assert "layers [1] have none" in sites.unsupported(no_mlp, "ablation")
    no_index = _gpt2()
    no_index.transformer.h[0].attn.layer_idx = None
    assert "found layer indices [1]" in sites.unsupported(no_index, "ablation")
    assert "get_output_embeddings() is None" in sites.unsupported(_gpt2(base=True), "readout")
    assert all(sites.unsupported(mlp, f).startswith("no attention-site adapter") for f in sites.FEATURES)
    with pytest.raises(ValueError, match=r"^unsupported: feature must be one of .*; got 'keys'"):
        sites.unsupported(mlp, "keys")
    with pytest.raises(ValueError, match=r"^record_readout: PositionwiseMLP \(windtunnel.models.mlp\) does not support 'readout'"):
        with sites.record_readout(mlp):
            pass
    with pytest.raises(ValueError, match=r"^token_keys: GPT2LMHeadModel .* does not support 'token_keys'"):
        sites.token_keys(gpt2, torch.arange(3))


def test_recorded_values_and_readout_are_the_hook_points():
    model = _tiny(norm="layernorm", attn_bias=True)
    names = lambda n: n.endswith(("attn.hook_v", "ln1.hook_normalized", "ln_final.hook_normalized"))  # noqa: E731
    with record(model, names=names, grads=True) as cache, sites.record_values(model, grads=True) as values, sites.record_readout(model) as readout:
        model(TOKENS).square().sum().backward()
    for l, block in enumerate(model.blocks):
        assert torch.equal(values.values[l], cache[f"blocks.{l}.attn.hook_v"])
        assert torch.equal(values.grads[l], cache[f"blocks.{l}.attn.hook_v_grad"])
        assert torch.equal(values.inputs[l], cache[f"blocks.{l}.ln1.hook_normalized"] * block.ln1.w + block.ln1.b)
        assert values.projections[l].weight is block.attn.W_V and values.projections[l].bias is block.attn.b_V
    assert torch.equal(readout.input, cache["ln_final.hook_normalized"] * model.ln_final.w + model.ln_final.b)
    with pytest.raises(RuntimeError, match="read out twice in one block"):
        with sites.record_readout(model):
            model(TOKENS)
            model(TOKENS)
    with pytest.raises(RuntimeError, match="no forward pass of TinyGPT ran"):
        with sites.record_readout(model) as empty:
            pass
        empty.input


def test_transformer_lens_ablations_are_removed_and_checked():
    model = _tl()
    with torch.no_grad():
        intact = model(TOKENS)
        with sites.ablated(model, heads=[(0, 1), (1, 0)], bypass=[1]):
            ablated = model(TOKENS)
        assert not torch.equal(ablated, intact)
        assert torch.equal(model(TOKENS), intact)  # every hook removed
    assert sites.ablation_layout(model) == (2, 2)
    with pytest.raises(ValueError, match=r"(?s)2 problems in HookedTransformer.ablated:.*HookedTransformer.ablated.bypass must be layer indices in \[0, 2\).*heads must be"):
        with sites.ablated(model, heads=[(0, 2)], bypass=[5]):
            pass


def test_final_residual_is_the_final_norms_input_and_token_keys_keep_the_embeddings():
    model = _tiny(norm="layernorm")
    with record(model, names="blocks.1.hook_resid_post") as cache, sites.record_final_residual(model) as pre, sites.record_readout(model) as post:
        model(TOKENS)
    assert torch.equal(pre.input, cache["blocks.1.hook_resid_post"])
    torch.testing.assert_close(post.input, model.ln_final(pre.input))
    keys = sites.token_keys(model, torch.arange(5))
    assert all(torch.equal(k.embeddings, model.embed.W_E[:5].double()) for k in keys)
    tl = _tl()
    with sites.record_final_residual(tl) as tl_pre:
        _, tl_cache = tl.run_with_cache(TOKENS)
    assert torch.equal(tl_pre.input, tl_cache["blocks.1.hook_resid_post"])
    assert torch.equal(sites.token_keys(tl, torch.arange(5))[1].embeddings, tl.W_E[:5].double())
    gpt2 = _gpt2()
    assert "final norm" in sites.unsupported(gpt2, "final_residual")
    with pytest.raises(ValueError, match=r"^record_final_residual: GPT2LMHeadModel .* does not support 'final_residual'"):
        with sites.record_final_residual(gpt2):
            pass
    with pytest.raises(RuntimeError, match="^record_final_residual: no forward pass"):
        with sites.record_final_residual(model) as empty:
            pass
        empty.input
