"""TransformerLens adapter: the law from the adapter's sites equals HookedTransformer's backward cache.

The reference is TransformerLens's own caching hooks (``get_caching_hooks(incl_bwd=True)``), which
store ``<hook>_grad`` for hook_attn_scores, hook_q/k/v (hook_rot_q/k under rotary embeddings) and
hook_z. Errors are relative: max |closed form - cache| / max |cache| over a layer.
"""

import warnings

import pytest
import torch

transformer_lens = pytest.importorskip("transformer_lens")

from windtunnel.sites import model_gradient_errors, record_sites, routing_law  # noqa: E402

HOOKS = ("hook_attn_scores", "hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z")


def _build(positional, n_kv_heads, *, attention_dir="causal"):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_vocab=50, act_fn="gelu",
        normalization_type="LN", positional_embedding_type=positional, n_key_value_heads=n_kv_heads,
        rotary_dim=8 if positional == "rotary" else None, dtype=torch.float64, device="cpu",
        attention_dir=attention_dir, initializer_range=0.3,
    )
    with torch.random.fork_rng(), warnings.catch_warnings():  # TL initialises from the global RNG
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        torch.manual_seed(0)
        return HookedTransformer(config)


def _rel(closed, reference):
    return float((closed - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("positional,n_kv_heads", [("standard", None), ("rotary", 2)])
def test_law_from_sites_equals_the_backward_cache(positional, n_kv_heads):
    model = _build(positional, n_kv_heads)
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    cache, fwd, bwd = model.get_caching_hooks(lambda name: name.endswith(HOOKS), incl_bwd=True)
    with model.hooks(fwd_hooks=fwd, bwd_hooks=bwd), record_sites(model) as recording:
        model(tokens, return_type="loss").backward()
    rot = "rot_" if positional == "rotary" else ""
    assert [site.name for site in recording.sites] == ["blocks.0.attn", "blocks.1.attn"]
    for layer, site in enumerate(recording.sites):
        hook = f"blocks.{layer}.attn.hook_"
        assert site.scale == 1 / model.blocks[layer].attn.attn_scale
        assert site.kv_head_of == ((0, 0, 1, 1) if n_kv_heads else (0, 1, 2, 3))
        assert torch.equal(site.q, cache[hook + rot + "q"]) and torch.equal(site.k, cache[hook + rot + "k"])
        assert torch.equal(site.u, cache[hook + "z_grad"])
        law = routing_law(site)
        assert _rel(law.d_scores, cache[hook + "attn_scores_grad"]) <= 1e-10
        assert _rel(law.d_queries, cache[hook + rot + "q_grad"]) <= 1e-10
        assert _rel(law.d_keys, cache[hook + rot + "k_grad"]) <= 1e-10
        assert _rel(law.d_values, cache[hook + "v_grad"]) <= 1e-10
        assert max(model_gradient_errors(site, law).values()) <= 1e-10
    assert not any(m._forward_hooks for m in model.modules())


def test_bidirectional_alibi_and_no_grad_are_clear_errors():
    tokens = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(1))
    model = _build("standard", None, attention_dir="bidirectional")
    with pytest.raises(ValueError, match="HookedTransformer layer 'blocks.0.attn' lets queries attend to later keys"):
        with record_sites(model):
            model(tokens)
    model = _build("alibi", None)  # an additive score bias is outside the law
    with pytest.raises(ValueError, match="is not plain softmax attention over the recorded q, k, v .its scores differ"):
        with record_sites(model):
            model(tokens)
    model = _build("standard", None)
    with torch.no_grad(), record_sites(model) as recording:
        model(tokens)
    with pytest.raises(ValueError, match="forward pass ran with grad mode disabled"):
        routing_law(recording[0])
