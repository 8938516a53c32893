"""Hugging Face adapter on tiny GPT-2, Llama (grouped-query, RoPE) and GPT-NeoX models built from configs.

Must-shows of issue 15: the closed-form dL/dq, dL/dk, dL/dv of every head equal autograd's
gradients of the tensors the model used, and the value-projection weight gradient assembled from
the law equals the weight's ``.grad``; with the ``"windtunnel"`` implementation the logits equal
eager and sdpa; training with recording on is bit-identical to training with it off.

Errors are relative: max |closed form - autograd| / max |autograd| over a whole layer (or weight).
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from windtunnel.sites import model_gradient_errors, record_sites, routing_law  # noqa: E402
from windtunnel.sites import hf as sites_hf  # noqa: E402

VOCAB, T = 50, 7
ARCHS = ("gpt2", "llama", "gpt_neox")
COMMON = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, initializer_range=0.3)


def _build(arch, *, dtype=torch.float32, impl="sdpa"):
    with torch.random.fork_rng():  # HF initialises from the global RNG
        torch.manual_seed(0)
        if arch == "gpt2":
            config = transformers.GPT2Config(
                n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **COMMON,
            )
            model = transformers.GPT2LMHeadModel(config)
        elif arch == "llama":
            config = transformers.LlamaConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=16, **COMMON,
            )
            model = transformers.LlamaForCausalLM(config)
        else:
            config = transformers.GPTNeoXConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0, **COMMON,
            )
            model = transformers.GPTNeoXForCausalLM(config)
    model.set_attn_implementation(impl)
    return model.to(dtype).eval()


def _inputs(padding):
    tokens = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    keep = torch.ones(2, T, dtype=torch.long)
    if padding:
        keep[0, :2] = 0  # left padding of the first sequence
    return tokens, keep


def _loss(logits, keep):
    """A random linear functional of the logits at the real (unpadded) positions."""
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=logits.dtype)
    return (logits * weights * keep[..., None]).sum()


def _rel(closed, reference):
    return float((closed - reference).abs().max() / reference.abs().max())


def _value_weight_grad(arch, model, layer, d_values, x):
    """(law's dL/dW for the value block, autograd's .grad of that block) of one layer.

    d_values [batch, pos, kv_head, d_head] from the law; x [batch, pos, d_model] the projection's input.
    """
    dv = d_values.flatten(2).flatten(0, 1)  # [batch*pos, kv_head*d_head], heads in contiguous blocks
    xs = x.flatten(0, 1)  # [batch*pos, d_model]
    if arch == "gpt2":  # Conv1D: y = x W + b, W [d_model, 3 d_model]; V is the last third of the columns
        weight = model.transformer.h[layer].attn.c_attn.weight
        d = weight.shape[0]
        return xs.T @ dv, weight.grad[:, 2 * d :]
    if arch == "llama":  # v_proj: y = x W^T, W [kv_head*d_head, d_model]
        return dv.T @ xs, model.model.layers[layer].self_attn.v_proj.weight.grad
    # GPT-NeoX query_key_value: W [3 d_model, d_model], rows per head interleaved as [q_h, k_h, v_h]
    weight = model.gpt_neox.layers[layer].attention.query_key_value.weight
    n_heads, d_head = d_values.shape[2], d_values.shape[3]
    rows = weight.grad.view(n_heads, 3, d_head, -1)[:, 2].reshape(n_heads * d_head, -1)
    return dv.T @ xs, rows


def _projection(arch, model, layer):
    if arch == "gpt2":
        return model.transformer.h[layer].attn.c_attn
    if arch == "llama":
        return model.model.layers[layer].self_attn.v_proj
    return model.gpt_neox.layers[layer].attention.query_key_value


CASES = [(arch, torch.float64, "sdpa", 1e-10) for arch in ARCHS] + [
    ("gpt2", torch.float64, "eager", 1e-10),  # Llama/NeoX eager take the softmax in float32
    *[(arch, torch.float32, impl, 1e-5) for arch in ARCHS for impl in ("eager", "sdpa")],
]


@pytest.mark.parametrize("arch,dtype,impl,tol", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_law_equals_autograd_on_every_head_and_the_value_weight(arch, dtype, impl, tol):
    model = _build(arch, dtype=dtype, impl=impl)
    tokens, keep = _inputs(padding=True)
    inputs: dict[int, torch.Tensor] = {}
    handles = [
        _projection(arch, model, layer).register_forward_pre_hook(
            lambda _m, args, layer=layer: inputs.__setitem__(layer, args[0].detach())
        )
        for layer in range(2)
    ]
    try:
        with record_sites(model) as recording:
            _loss(model(tokens, attention_mask=keep).logits, keep).backward()
    finally:
        for handle in handles:
            handle.remove()
    assert model.config._attn_implementation == impl  # restored
    sites = recording.sites
    assert [site.layer for site in sites] == [0, 1]
    for site in sites:
        if arch == "llama":
            assert site.kv_head_of == (0, 0, 1, 1) and site.k.shape[2] == 2
        assert torch.equal(site.mask[0, 0, -1], keep[0].bool()) and bool(site.mask[1, 0].tril().eq(site.mask[1, 0]).all())
        law = routing_law(site)
        errors = model_gradient_errors(site, law)
        assert max(errors.values()) <= tol, (site.name, errors)
        closed, reference = _value_weight_grad(arch, model, site.layer, law.d_values, inputs[site.layer])
        assert _rel(closed, reference) <= tol, site.name


@pytest.mark.parametrize("arch", ARCHS)
def test_windtunnel_logits_equal_eager_and_sdpa(arch):
    """Bit-identical to the wrapped implementation; within 1e-6 of the other (fp32, relative to
    the largest logit: eager and sdpa themselves differ by a few float32 roundings)."""
    eager, sdpa = _build(arch, impl="eager"), _build(arch, impl="sdpa")
    for padding in (False, True):
        tokens, keep = _inputs(padding)
        real = keep.bool()  # padded query rows are implementation-defined (eager spreads them uniformly)
        with torch.no_grad():
            reference = {impl: m(tokens, attention_mask=keep).logits for impl, m in (("eager", eager), ("sdpa", sdpa))}
            for impl, model in (("eager", eager), ("sdpa", sdpa)):
                with record_sites(model) as recording:
                    logits = model(tokens, attention_mask=keep).logits
                assert len(recording) == 2
                assert torch.equal(logits, reference[impl])
                for other in reference.values():
                    assert _rel(logits[real], other[real]) <= 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_training_with_recording_is_bit_identical(arch):
    model_on = _build(arch).train()
    model_off = copy.deepcopy(model_on)
    tokens, keep = _inputs(padding=True)
    for model, on in ((model_on, True), (model_off, False)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            if on:
                with record_sites(model) as recording:
                    _loss(model(tokens, attention_mask=keep).logits, keep).backward()
                assert recording[0].u.shape == (2, T, 4, 8)
            else:
                _loss(model(tokens, attention_mask=keep).logits, keep).backward()
            optimizer.step()
    for (name, a), b in zip(model_on.state_dict().items(), model_off.state_dict().values()):
        assert torch.equal(a, b), name


def test_fused_kernel_and_no_interface_models_name_their_class(monkeypatch):
    model = _build("llama")
    model.config._attn_implementation_internal = "flash_attention_2"  # as if loaded with flash
    with pytest.raises(ValueError, match=r"LlamaForCausalLM runs attn_implementation='flash_attention_2'.*set_attn_implementation\('sdpa'\)"):
        with record_sites(model):
            pass
    assert model.config._attn_implementation == "flash_attention_2"
    model = _build("gpt2")
    # what transformers answers for a class whose attention does not use the interface
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(ValueError, match="GPT2LMHeadModel does not route its attention through transformers' AttentionInterface"):
        with record_sites(model):
            pass
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.undo()
    for block in model.transformer.h:  # attention replaced by a module outside the interface
        monkeypatch.setattr(block.attn, "forward", lambda hidden_states, *args, **kwargs: (torch.zeros_like(hidden_states), None))
    with pytest.raises(ValueError, match="GPT2LMHeadModel ran a forward pass but none of its attention layers called"):
        with record_sites(model):
            model(_inputs(padding=False)[0])


def test_no_grad_forward_and_the_implementation_outside_recording_are_clear_errors():
    model = _build("gpt2")
    tokens, keep = _inputs(padding=False)
    with torch.no_grad(), record_sites(model) as recording:
        model(tokens)
    with pytest.raises(ValueError, match="forward pass ran with grad mode disabled"):
        routing_law(recording[0])
    sites_hf.register()
    model.set_attn_implementation(sites_hf.IMPLEMENTATION)
    try:
        with pytest.raises(RuntimeError, match="ran outside windtunnel.sites.record_sites"):
            model(tokens)
    finally:
        model.set_attn_implementation("sdpa")


def test_an_encoder_without_causal_mask_is_refused_unless_asked():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = transformers.BertModel(config).eval()
    tokens, keep = _inputs(padding=True)
    with pytest.raises(ValueError, match="BertModel layer 'encoder.layer.0.attention.self' lets queries attend to later keys"):
        with record_sites(model):
            model(tokens, attention_mask=keep)
    with record_sites(model, causal_only=False) as recording:
        out = model(tokens, attention_mask=keep).last_hidden_state
        (out * keep[..., None]).sum().backward()
    site = recording[0]
    assert torch.equal(site.mask[:, 0, -1], keep.bool())
    assert max(model_gradient_errors(site).values()) <= 1e-5
