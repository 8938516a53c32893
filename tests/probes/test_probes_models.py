"""Every instrument on the models windtunnel did not build: tiny Hugging Face GPT-2 and Llama
(grouped-query, RoPE) causal LMs built from configs, and TransformerLens HookedTransformers.

References are independent of the instruments: the routing law and entropies recomputed from the
sites ``record_sites`` records, the readout checked against the model's own unembedding, key
orthogonality by a loop over hand-normed embeddings, ablations against zeroed weights, the value
probe against the SGD identity x ΔW_V · (-AᵀU) = lr ‖XᵀAᵀU‖² >= 0. Both libraries initialise from
the global RNG, so every build runs under ``torch.random.fork_rng``.
"""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformer_lens = pytest.importorskip("transformer_lens")

from windtunnel import probes  # noqa: E402
from windtunnel import sites as probes_sites  # noqa: E402
from windtunnel.sites import record_sites, routing_law  # noqa: E402
from windtunnel.tasks import Bijection  # noqa: E402

TASK = Bijection(n_values=6, n_pairs=5)  # vocab 12, seq_len 9
N_LAYERS, N_HEADS = 2, 4
HF_ARCHS = ("gpt2", "llama")
TL_ARCHS = ("tl", "tl_rotary_gqa")


def _hf(arch, *, base=False):
    common = dict(vocab_size=TASK.vocab_size, bos_token_id=0, eos_token_id=0, initializer_range=0.3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if arch == "gpt2":
            config = transformers.GPT2Config(
                n_positions=16, n_embd=32, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=64,
                attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **common,
            )
            model = (transformers.GPT2Model if base else transformers.GPT2LMHeadModel)(config)
        else:
            config = transformers.LlamaConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                num_key_value_heads=2, max_position_embeddings=16, **common,
            )
            model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    return model.eval()


def _tl(arch):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    rotary = arch == "tl_rotary_gqa"
    config = HookedTransformerConfig(
        n_layers=N_LAYERS, d_model=32, n_ctx=16, d_head=8, n_heads=N_HEADS, d_vocab=TASK.vocab_size, act_fn="gelu",
        normalization_type="LN", positional_embedding_type="rotary" if rotary else "standard",
        n_key_value_heads=2 if rotary else None, rotary_dim=8 if rotary else None, device="cpu",
        initializer_range=0.3,
    )
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        torch.manual_seed(0)
        return HookedTransformer(config).eval()


def _build(arch):
    return _tl(arch) if arch.startswith("tl") else _hf(arch)


def _batch(n=8, seed=1):
    return TASK.sample(n, generator=torch.Generator().manual_seed(seed))


def _logits(output):
    return output if isinstance(output, torch.Tensor) else output.logits


@pytest.mark.parametrize("arch", HF_ARCHS + TL_ARCHS)
def test_routing_law_stats_agree_with_the_law_on_the_recorded_sites(arch):
    model, batch = _build(arch).train(), _batch()
    stats = probes.routing_law_stats(model, TASK, batch)
    assert model.training and all(p.grad is None for p in model.parameters())  # mode and gradients restored
    per_head = [getattr(stats, name) for name in type(stats)._PER_HEAD]
    assert all(t.shape == (N_LAYERS, N_HEADS) and bool(torch.isfinite(t).all()) for t in per_head)
    # the reference: the sites recorded directly, the law of each in float64
    model.eval()
    with record_sites(model) as recording:
        loss = probes.site_loss_nats(_logits(model(batch.tokens)), batch, TASK)
        loss.backward()
    model.zero_grad(set_to_none=True)
    assert stats.loss_nats == pytest.approx(loss.item(), rel=1e-6)
    for layer, site in enumerate(recording.sites):
        law = routing_law(site, dtype=torch.float64)
        d_s = law.d_scores  # [batch, head, query_pos, key_pos]
        d_v = law.heads.d_values  # dL/dv per query head [batch, head, key_pos, d_v]
        allowed = site.mask.expand_as(d_s)
        live = allowed & (site.u.abs().sum(-1) > 0).transpose(1, 2)[..., None]
        for h in range(N_HEADS):
            assert stats.d_scores_fro[layer, h].item() == pytest.approx(d_s[:, h].norm().item(), rel=1e-5)
            assert stats.value_pull_norm[layer, h].item() == pytest.approx(d_v[:, h].norm().item(), rel=1e-5)
            adv = law.advantage[:, h][live[:, h]]
            assert stats.advantage_abs_mean[layer, h].item() == pytest.approx(adv.abs().mean().item(), rel=1e-5)
    assert float(stats.law_rel_error.max()) < 1e-10
    assert float(stats.model_grad_rel_error.max()) < 1e-4  # float32 models against the float64 law
    rows = stats.rows(3)
    assert {r["layer"] for r in rows if r["head"] is not None} == {0, 1}


@pytest.mark.parametrize("arch", HF_ARCHS + TL_ARCHS)
def test_attention_focusing_equals_the_entropy_of_the_recorded_patterns(arch):
    model, batch = _build(arch), _batch()
    focus = probes.attention_focusing(model, TASK, batch)
    assert focus.head_entropy_bits.shape == (N_LAYERS, N_HEADS) and focus.layer_entropy_bits.shape == (N_LAYERS,)
    with torch.no_grad(), record_sites(model) as recording:
        model(batch.tokens)
    for layer, site in enumerate(recording.sites):
        a = site.pattern[:, :, batch.sites].double()  # [batch, head, n_sites, key_pos]
        hand = -torch.where(a > 0, a * torch.log2(a), torch.zeros_like(a)).sum(-1)
        torch.testing.assert_close(focus.head_entropy_bits[layer], hand.mean((0, 2)), rtol=1e-12, atol=1e-12)
        assert bool((hand <= torch.log2(batch.sites.double() + 1)[None, None] + 1e-9).all())  # at most log2 |keys|
    h0, h_last = focus.layer_entropy_bits[0].item(), focus.layer_entropy_bits[-1].item()
    assert focus.focusing_ratio == pytest.approx((h0 - h_last) / h0)


@pytest.mark.parametrize("arch", HF_ARCHS + TL_ARCHS)
def test_states_are_what_the_readout_reads_and_the_snapshot_runs(arch):
    model, batch = _build(arch), _batch()
    states = probes.collect_states(model, TASK, batch)
    assert states.residual.shape == (8, batch.sites.numel(), 32)
    assert states.patterns.shape == (N_LAYERS, 8, N_HEADS, TASK.seq_len, TASK.seq_len)
    assert states.q.shape == (N_LAYERS, 8, TASK.seq_len, N_HEADS, 8)
    if arch.startswith("tl"):
        readout = states.residual @ model.unembed.W_U + model.unembed.b_U
    else:
        readout = states.residual @ model.get_output_embeddings().weight.T
    torch.testing.assert_close(states.logits[:, batch.sites], readout, rtol=1e-5, atol=1e-5)
    snap = probes.geometry_snapshot(model, TASK, batch, generator=torch.Generator().manual_seed(0), states=states)
    assert (snap.key_orthogonality is None) == (arch in HF_ARCHS)  # HF adapters have no key map
    assert snap.manifold.pc1_share is not None and 0 < snap.manifold.pc1_share <= 1
    projection = probes.manifold_projection(states, max_points=10)
    assert len(projection["pc1"]) == 10


def test_key_orthogonality_of_a_hooked_transformer_against_a_loop():
    model = _tl("tl")
    ko = probes.layer_key_orthogonality(model, probes.hypothesis_tokens(TASK))
    e = model.embed.W_E[6:12].detach().double()
    for layer, block in enumerate(model.blocks):
        centred = e - e.mean(-1, keepdim=True)
        normed = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + model.cfg.eps)
        normed = normed * block.ln1.w.detach().double() + block.ln1.b.detach().double()
        for h in range(N_HEADS):
            keys = normed @ block.attn.W_K[h].detach().double()
            cos = [abs(float(keys[x] @ keys[y] / (keys[x].norm() * keys[y].norm()))) for x in range(6) for y in range(6) if x != y]
            assert ko[layer].abs_cosine_per_head[h].item() == pytest.approx(sum(cos) / len(cos), rel=1e-5)


@pytest.mark.parametrize("arch", TL_ARCHS)
def test_value_update_probe_on_a_hooked_transformer_under_sgd(arch):
    model, batch, lr = _tl(arch).train(), _batch(), 0.05
    probe = probes.ValueUpdateProbe()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with probe.watch(model, batch.tokens):
        probes.site_loss_nats(model(batch.tokens), batch, TASK).backward()
    optimizer.step()
    stats = probe.finish(model, lr)
    n_value_heads = 2 if arch == "tl_rotary_gqa" else N_HEADS  # per key-value head under GQA
    assert stats.pull_cosine.shape == (N_LAYERS, n_value_heads)
    assert all(bool(torch.isfinite(getattr(stats, n)).all()) for n in type(stats)._PER_HEAD)
    # SGD: the head's own change never points against its pull, and it is the gradient step
    assert float(stats.own_pull_cosine_all.min()) > 0.0
    assert torch.allclose(stats.gradient_pull_cosine_all, stats.own_pull_cosine_all, atol=1e-5)


def test_value_update_probe_on_llama_against_values_rebuilt_by_hand():
    model, batch, lr = _hf("llama").train(), _batch(), 0.05
    probe = probes.ValueUpdateProbe()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    layer0 = model.model.layers[0]

    def values():  # layer 0: v = input_layernorm(embedding) W_V^T, per key-value head (no rotary on v)
        with torch.no_grad():
            return layer0.self_attn.v_proj(layer0.input_layernorm(model.model.embed_tokens(batch.tokens))).view(*batch.tokens.shape, 2, 8)

    before, grads = values(), []
    def keep_grad(_module, _args, out):
        if out.requires_grad:
            out.register_hook(grads.append)

    handle = layer0.self_attn.v_proj.register_forward_hook(keep_grad)
    with probe.watch(model, batch.tokens):
        probes.site_loss_nats(model(batch.tokens).logits, batch, TASK).backward()
    handle.remove()
    optimizer.step()
    stats = probe.finish(model, lr)
    delta, pull = (values() - before).double(), grads[0].view(*batch.tokens.shape, 2, 8).double()
    whole = -(delta * pull).sum((0, 1, 3)) / (delta.pow(2).sum((0, 1, 3)).sqrt() * pull.pow(2).sum((0, 1, 3)).sqrt())
    ratio = delta.pow(2).sum((0, 1, 3)).sqrt() / (lr * pull.pow(2).sum((0, 1, 3)).sqrt())
    assert stats.pull_cosine.shape == (N_LAYERS, 2)  # per key-value head
    assert torch.allclose(stats.pull_cosine_all[0].double(), whole, atol=1e-5)
    assert torch.allclose(stats.norm_ratio[0].double(), ratio, rtol=1e-4)
    assert bool(torch.isnan(stats.own_pull_cosine).all() and torch.isnan(stats.gradient_pull_cosine_all).all())  # no W_V
    assert {r["value"] for r in stats.rows(3) if r["metric"] == "value_update_own_norm_ratio"} == {None}


def test_ablation_table_of_a_hooked_transformer_matches_zeroed_weights():
    model, batches = _tl("tl"), [_batch(n=16)]
    table = probes.ablation_table(model, TASK, batches)
    assert len(table.rows) == N_LAYERS * N_HEADS + 3 * N_LAYERS
    by = {(r["kind"], r["layer"], r["head"]): r for r in table.rows}

    def mae(edit):
        clone = copy.deepcopy(model)
        with torch.no_grad():
            edit(clone)
        return probes.calibrate(clone, TASK, batches).scalars()["entropy_mae_bits"]

    for layer in range(N_LAYERS):
        # a head's z times W_O[h] is its whole contribution; b_O belongs to no head
        got = by[("head", layer, 1)]["entropy_mae_bits"]
        assert got == pytest.approx(mae(lambda m: m.blocks[layer].attn.W_O[1].zero_()), abs=1e-6)
        zero_attn = lambda m: (m.blocks[layer].attn.W_O.zero_(), m.blocks[layer].attn.b_O.zero_())  # noqa: E731
        assert by[("zero_attn_out", layer, None)]["entropy_mae_bits"] == pytest.approx(mae(zero_attn), abs=1e-6)
        zero_mlp = lambda m: (m.blocks[layer].mlp.W_out.zero_(), m.blocks[layer].mlp.b_out.zero_())  # noqa: E731
        assert by[("zero_mlp_out", layer, None)]["entropy_mae_bits"] == pytest.approx(mae(zero_mlp), abs=1e-6)
        assert by[("bypass", layer, None)]["delta_mae_bits"] != 0.0
    assert table.intact == probes.calibrate(model, TASK, batches).scalars()  # every hook removed


def _hf_parts(model, layer):
    """(output projection, MLP output projection, final norm, decoder layers) of the two test architectures."""
    if isinstance(model, transformers.GPT2LMHeadModel):
        block = model.transformer.h[layer]
        return block.attn.c_proj, block.mlp.c_proj, model.transformer.ln_f, model.transformer.h
    block = model.model.layers[layer]
    return block.self_attn.o_proj, block.mlp.down_proj, model.model.norm, model.model.layers


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_ablations_of_hugging_face_models_match_zeroed_weights_and_a_skipped_layer(arch):
    model, batch = _hf(arch), _batch(n=16)
    d_head = model.config.hidden_size // N_HEADS
    tokens = batch.tokens

    def edited(edit):
        clone = copy.deepcopy(model)
        with torch.no_grad():
            edit(clone)
        return clone(tokens).logits

    def zero_head_columns(m, layer, head):
        proj = _hf_parts(m, layer)[0]  # GPT-2's Conv1D is x @ W [d_in, d_out]; Linear is x @ W.T
        rows = slice(head * d_head, (head + 1) * d_head)
        (proj.weight[rows] if arch == "gpt2" else proj.weight[:, rows]).zero_()

    def zero_linear(m, layer, which):
        proj = _hf_parts(m, layer)[which]
        proj.weight.zero_()
        if getattr(proj, "bias", None) is not None:
            proj.bias.zero_()

    for layer in range(N_LAYERS):
        with probes_sites.ablated(model, heads=[(layer, 1), (layer, 3)]) as same:
            assert same is model
            got = model(tokens).logits
        want = edited(lambda m: (zero_head_columns(m, layer, 1), zero_head_columns(m, layer, 3)))
        assert torch.allclose(got, want, atol=1e-5), (layer, (got - want).abs().max())
        with probes_sites.ablated(model, zero_attn_out=[layer]):
            got = model(tokens).logits
        assert torch.allclose(got, edited(lambda m: zero_linear(m, layer, 0)), atol=1e-5)
        with probes_sites.ablated(model, zero_mlp_out=[layer]):
            got = model(tokens).logits
        assert torch.allclose(got, edited(lambda m: zero_linear(m, layer, 1)), atol=1e-5)
    with probes_sites.ablated(model, bypass=[1]):
        got = model(tokens).logits
    with torch.no_grad():  # layer 1 skipped: the final norm and head read layer 0's output
        hidden = model(tokens, output_hidden_states=True).hidden_states[1]
        want = model.lm_head(_hf_parts(model, 0)[2](hidden))
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(model(tokens).logits, copy.deepcopy(model)(tokens).logits)  # every hook removed
    assert model.config._attn_implementation == "sdpa"
    table = probes.ablation_table(model, TASK, [batch])
    assert len(table.rows) == N_LAYERS * N_HEADS + 3 * N_LAYERS
    assert table.intact == probes.calibrate(model, TASK, [batch]).scalars()
    with pytest.raises(ValueError, match=r"^\w+\.ablated\.heads must be \(layer, head\) pairs in \[0, 2\) x \[0, 4\)"):
        with probes_sites.ablated(model, heads=[(0, 4)]):
            pass


def test_calibrate_reads_the_logits_of_a_model_output():
    model, batches = _hf("gpt2"), [_batch()]

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, tokens):
            return self.inner(tokens).logits

    assert probes.calibrate(model, TASK, batches).scalars() == probes.calibrate(Logits(model), TASK, batches).scalars()

    class Pair(Logits):
        def forward(self, tokens):
            return self.inner(tokens).logits, None

    with pytest.raises(ValueError, match=r"^calibrate: the model must return logits .* got tuple"):
        probes.calibrate(Pair(model), TASK, batches)


class _Wrapper(torch.nn.Module):
    """Maps tokens to logits around a Hugging Face or TransformerLens model (as windtunnel's HFCausalLM does)."""

    def __init__(self, *inner):
        super().__init__()
        self.inner = torch.nn.ModuleList(inner)

    def forward(self, tokens):
        return _logits(self.inner[0](tokens))


@pytest.mark.parametrize("arch", ("llama", "tl"))
def test_a_wrapper_is_probed_through_the_model_it_holds(arch):
    inner, batch = _build(arch), _batch()
    wrapped = _Wrapper(inner)
    through = probes.routing_law_stats(wrapped, TASK, batch)
    for field, value in vars(probes.routing_law_stats(inner, TASK, batch)).items():
        got = getattr(through, field)
        assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, field
    assert torch.equal(probes.collect_states(wrapped, TASK, batch).residual, probes.collect_states(inner, TASK, batch).residual)
    if arch == "tl":
        assert probes.ablation_table(wrapped, TASK, [batch]).to_dict() == probes.ablation_table(inner, TASK, [batch]).to_dict()
    with pytest.raises(ValueError, match=r"^routing_law_stats: not available for _Wrapper .*no attention-site adapter"):
        probes.routing_law_stats(_Wrapper(inner, _build(arch)), TASK, batch)  # two models held: ambiguous


@pytest.mark.parametrize("arch", ("gpt2", "tl"))
def test_make_probes_on_hugging_face_and_transformer_lens(arch):
    model, batch = _build(arch), _batch()
    ps = probes.make_probes(TASK, eval_batch=batch, baseline_model=_build(arch), generator=torch.Generator().manual_seed(4))
    rows = [r for p in ps for r in p(model, 5)]
    metrics = {r["metric"] for r in rows}
    assert {"advantage_abs_mean", "attn_entropy_bits", "focusing_ratio", "manifold_pc1_share", "probe_entropy_mae_bits"} <= metrics
    assert ("key_ortho_abs_cos" in metrics) == (arch == "tl")
    assert all(r["value"] is None or isinstance(r["value"], float) for r in rows)


def test_what_hugging_face_models_refuse_names_the_instrument_and_the_class():
    model, batch = _hf("gpt2"), _batch()
    hf = r"not available for GPT2LMHeadModel \(transformers\.models\.gpt2\.modeling_gpt2\): the Hugging Face adapter"
    with pytest.raises(ValueError, match=rf"^layer_key_orthogonality: {hf}.*key projection W_K"):
        probes.layer_key_orthogonality(model, probes.hypothesis_tokens(TASK))
    base = _hf("gpt2", base=True)  # no language-model head: sites but no readout
    with pytest.raises(ValueError, match=r"^collect_states: not available for GPT2Model .*get_output_embeddings\(\) is None"):
        probes.collect_states(base, TASK, batch)
    assert probes.attention_focusing(base, TASK, batch).head_entropy_bits.shape == (N_LAYERS, N_HEADS)
    llama = _hf("llama")
    llama.config._attn_implementation_internal = "flash_attention_2"  # as if loaded with flash
    with pytest.raises(ValueError, match=r"^routing_law_stats: record_sites: LlamaForCausalLM runs attn_implementation='flash_attention_2'"):
        probes.routing_law_stats(llama, TASK, batch)
