"""Hugging Face architectures as wind-tunnel models: sizes, initialisation from our generator,
causality, state dicts, training, resume and the command line (issue 15, item 3).

The parameter counts are worked out by hand from each architecture's layer list (GPT-2: LayerNorms,
fused QKV and MLP with biases, learned positions; Llama: RMSNorm gains, Q/K/V/O without biases,
SwiGLU's three matrices; GPT-NeoX: LayerNorms, fused QKV and MLP with biases), not read from the
model. The causal checks run in float64, where a full pass and the prefix passes agree to ~1e-15.
"""

import io
import json
import sys

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")

from windtunnel.cli import main  # noqa: E402
from windtunnel.models import hf as hf_mod  # noqa: E402
from windtunnel.models.hf import ARCHITECTURES, HFCausalLM, HFCausalLMConfig  # noqa: E402
from windtunnel.presets import apply_overrides, get_preset  # noqa: E402
from windtunnel.runs import RunDir  # noqa: E402
from windtunnel.train import ExperimentConfig, TrainConfig, Trainer  # noqa: E402

V, P, L, H, D, F = 11, 12, 2, 4, 32, 48  # vocab, positions, layers, heads, d_model, d_mlp


def _config(arch, **extra):
    """A tiny config; grouped-query attention (2 key-value heads for 4 query heads) where there is any."""
    kv = dict(n_kv_heads=2) if arch in ARCHITECTURES and "n_kv_heads" in ARCHITECTURES[arch].names else {}
    fields = dict(vocab_size=V, n_positions=P, n_layers=L, n_heads=H, d_model=D, d_mlp=F, **kv)
    return HFCausalLMConfig(architecture=arch, **{**fields, **extra})


def _n_params(arch, *, n_kv_heads=H, n_out=None):
    """Hand count: embeddings, L decoder layers, final norm, LM head (none when tied)."""
    kv = D // H * n_kv_heads
    head = 0 if n_out is None else n_out * D
    if arch == "gpt2":
        layer = 2 * 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * F + F) + (F * D + D)
        return V * D + P * D + L * layer + 2 * D + head
    if arch == "llama":
        layer = 2 * D + D * D + 2 * D * kv + D * D + 3 * D * F
        return V * D + L * layer + D + head
    if arch == "gpt_neox":
        layer = 2 * 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * F + F) + (F * D + D)
        return V * D + L * layer + 2 * D + head
    raise AssertionError(arch)


def _tokens(batch=3, seq_len=P, seed=1):
    return torch.randint(0, V, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_each_architecture_has_the_requested_sizes_and_its_weights_come_from_our_generator(arch):
    before = torch.random.get_rng_state().clone()
    config = _config(arch)
    model = HFCausalLM(config, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), before)  # built and initialised without the global RNG
    kv = config.n_kv_heads or H
    assert sum(p.numel() for p in model.parameters()) == _n_params(arch, n_kv_heads=kv)
    hf_config = model.hf.config
    assert (hf_config.num_hidden_layers, hf_config.num_attention_heads, hf_config.hidden_size) == (L, H, D)
    assert hf_config.max_position_embeddings == P and hf_config.vocab_size == V
    if arch == "llama":
        assert model.hf.model.layers[0].self_attn.k_proj.weight.shape == (kv * D // H, D) and kv < H
    # tied readout: the LM head is the input embedding
    assert model.hf.get_output_embeddings().weight is model.hf.get_input_embeddings().weight
    # the same seed gives the same weights, another seed other ones
    again = HFCausalLM(config, generator=torch.Generator().manual_seed(0)).state_dict()
    other = HFCausalLM(config, generator=torch.Generator().manual_seed(1)).state_dict()
    state = model.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    assert any(not torch.equal(state[k], other[k]) for k in state)
    # N(0, 0.02²) matrices and embeddings, unit norm gains, zero biases
    matrices = torch.cat([p.detach().flatten() for p in model.parameters() if p.dim() >= 2])
    assert abs(float(matrices.std()) - 0.02) < 0.002 and abs(float(matrices.mean())) < 0.002
    for name, p in model.named_parameters():
        if p.dim() == 1:
            gain = name.endswith("weight") and ("norm" in name or ".ln_" in name)
            assert bool((p == (1.0 if gain else 0.0)).all()), name


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_a_full_pass_equals_the_prefix_passes_whatever_the_position_ids(arch):
    model = HFCausalLM(_config(arch, n_out=5, tie_embeddings=False, head_bias=True), generator=torch.Generator().manual_seed(0))
    model = model.double().eval()
    dropouts = {k: v for k, v in model.hf.config.to_dict().items() if ("dropout" in k or "pdrop" in k) and v}
    assert not dropouts and all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    tokens = _tokens()
    # positions with a jump, as a moved step layout reads them: transformers would take the jump for
    # the start of another packed sequence and cut the attention there
    jumped = torch.where(torch.arange(8) >= 3, torch.arange(8) + 4, torch.arange(8))
    with torch.no_grad():
        full = model(tokens)
        assert full.shape == (3, P, 5) and full.dtype == torch.float64
        for t in range(P):
            assert torch.allclose(model(tokens[:, : t + 1])[:, -1], full[:, t], rtol=0, atol=1e-12), t
        assert torch.equal(model(tokens, position_ids=torch.arange(P)), full)
        moved = model(tokens[:, :8], position_ids=jumped)
        for t in range(8):
            assert torch.allclose(model(tokens[:, : t + 1], position_ids=jumped[: t + 1])[:, -1], moved[:, t], rtol=0, atol=1e-12), t
        assert not torch.allclose(moved, full[:, :8])  # the ids reach the model
        # the earlier tokens are heard across the jump: changing token 0 moves the last logits
        changed = tokens[:, :8].clone()
        changed[:, 0] = (changed[:, 0] + 1) % V
        assert not torch.allclose(model(changed, position_ids=jumped)[:, -1], moved[:, -1])


def test_logits_have_the_tunnel_shape_and_the_state_dict_round_trips():
    for config in (_config("gpt2"), _config("llama", n_out=5, tie_embeddings=False, head_bias=True)):
        model = HFCausalLM(config, generator=torch.Generator().manual_seed(3)).eval()
        tokens = _tokens(batch=2, seq_len=7)
        logits = model(tokens)
        assert logits.shape == (2, 7, config.n_outputs) == (2, 7, 5 if config.n_out else V)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        fresh = HFCausalLM(config, generator=None).eval()
        assert not torch.equal(fresh(tokens), logits)
        fresh.load_state_dict(state, strict=True)
        assert torch.equal(fresh(tokens), logits)
        assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_rope_theta_sets_the_rotary_base():
    model = HFCausalLM(_config("llama", rope_theta=500.0), generator=None)
    d_head = D // H
    expected = 500.0 ** (-torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)
    assert torch.allclose(model.hf.model.rotary_emb.inv_freq.double(), expected, rtol=1e-6)


def _experiment(task, arch, steps, lr=1e-2, batch_size=16, **model):
    task_fields = dict(n_values=3, n_pairs=3) if task == "bijection" else dict(n_states=2, n_symbols=2, n_steps=4)
    return ExperimentConfig(
        task_name=task, task=task_fields, model_name="hf",
        model=dict(architecture=arch, n_layers=1, n_heads=2, d_model=16, d_mlp=32, **model),
        train=TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=2, eval_every=steps, eval_size=64,
                          eval_batch_size=64, log_every=1, checkpoint_every=4, device="cpu"),
        name="tiny-hf",
    )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_on_the_bijection_lowers_the_held_out_loss(arch):
    # 3 values: the last answer is the one value not yet seen, which a layer learns in 40 steps
    trainer = Trainer(_experiment("bijection", arch, steps=40, lr=3e-2, batch_size=32))
    before = float(trainer.evaluate()["eval"].cross_entropy_nats)
    result = trainer.fit()
    assert float(result.calibration.cross_entropy_nats) < before - 0.1


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_training_on_soft_hmm_targets_fits_a_fixed_batch(arch, tmp_path, monkeypatch):
    # A fresh HMM in every prompt takes thousands of steps to learn; a batch seen every step is
    # fitted in a few, which is enough to show the soft loss trains the untied n_out head.
    experiment = _experiment("hmm", arch, steps=30, batch_size=8)
    config = experiment.model_config()
    assert config.n_out == 2 and config.tie_embeddings is False
    trainer = Trainer(experiment, tmp_path / "run")
    fixed = trainer.task.sample(8, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(type(trainer.task), "sample", lambda self, batch_size, *, generator: fixed)
    trainer.fit()
    assert trainer.model.hf.get_output_embeddings().weight.shape == (2, 16)
    losses = [row["loss_nats"] for row in RunDir(tmp_path / "run").metrics() if row["split"] == "train"]
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.05


def test_killed_and_resumed_run_equals_the_uninterrupted_run(tmp_path):
    experiment = _experiment("bijection", "llama", steps=10, n_kv_heads=1)
    experiment = apply_overrides(experiment, ["train.log_every=2"])
    result_full = (full := Trainer(experiment, tmp_path / "full")).fit()
    Trainer(experiment, tmp_path / "part").fit(stop_at=5)
    resumed = Trainer.resume(tmp_path / "part")
    assert resumed.step == 5  # the checkpoint written when it stopped
    result = resumed.fit()
    assert result.final_loss_nats == result_full.final_loss_nats
    assert float(result.calibration.entropy_mae_bits) == float(result_full.calibration.entropy_mae_bits)
    ours, theirs = full.model.state_dict(), resumed.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(RunDir(tmp_path / "full").metrics()) == strip(RunDir(tmp_path / "part").metrics())


def test_telemetry_and_the_value_update_probe_leave_the_run_unchanged(tmp_path):
    from windtunnel.experiments.telemetry import attach_probes

    experiment = _experiment("bijection", "llama", steps=6, n_kv_heads=1)
    plain = Trainer(experiment, tmp_path / "plain")
    plain.fit()
    watched = attach_probes(Trainer(experiment, tmp_path / "watched"), n_sequences=8)
    watched.fit()
    ours, theirs = plain.model.state_dict(), watched.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    metrics = {r["metric"] for r in RunDir(tmp_path / "watched").telemetry()}
    assert {"advantage_abs_mean", "attn_entropy_bits", "value_update_pull_cosine_all", "value_update_norm_ratio"} <= metrics


def test_train_eval_ablate_and_dissociation_on_the_command_line(tmp_path):
    tiny = ["--steps", "2", "--set", "model.n_layers=1", "--set", "model.d_model=16", "--set", "model.n_heads=2",
            "--set", "model.d_mlp=32", "--set", "train.eval_size=10", "--set", "train.warmup_steps=1",
            "--set", "task.n_values=5", "--set", "task.n_pairs=4", "--set", "train.checkpoint_every=1"]
    run = tmp_path / "run"
    trained = CliRunner().invoke(main, ["train", "bijection", "--model", "hf", "--out", str(run), *tiny,
                                        "--set", "model.architecture=gpt_neox", "--set", "model.d_mlp=24"])
    assert trained.exit_code == 0, trained.output
    assert "bijection/hf/cpu" in trained.output and "step 2: loss" in trained.output
    evaluated = CliRunner().invoke(main, ["eval", str(run), "--n", "4"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "train length: entropy MAE" in evaluated.output and (run / "eval.json").exists()
    geometry = json.loads((run / "eval.json").read_text())["geometry_variants"]["quantities"]  # weights-free variants only
    assert "AttentionInterface" in geometry["key_orthogonality"]["hypothesis_abs"]["unavailable"]
    assert geometry["key_orthogonality"]["in_context_abs"]["value"] is not None
    assert "final norm" in geometry["value_manifold_pc1_share"]["value_positions_pre_final_norm_raw"]["unavailable"]
    assert "key orthogonality (layer 0), hypothesis_abs (ours): — (" in evaluated.output
    ablated = CliRunner().invoke(main, ["ablate", str(run), "--n", "4"])
    assert ablated.exit_code == 0, ablated.output
    rows = json.loads((run / "ablation.json").read_text())["rows"]
    assert [(r["kind"], r["layer"], r["head"]) for r in rows][:3] == [("head", 0, 0), ("head", 0, 1), ("bypass", 0, None)]
    dissociated = CliRunner().invoke(main, ["dissociation", str(run), "--n", "4"])
    assert dissociated.exit_code == 0, dissociated.output
    out = json.loads((run / "dissociation.json").read_text())
    assert out["steps"] == [0, 1, 2] and set(out["metrics"]["frame_overlap_ratio"]) == {None}  # no key map
    assert all(v is not None for v in out["metrics"]["js_to_final_bits_mean"])
    bad = CliRunner().invoke(main, ["train", "bijection", "--model", "hf", "--out", str(tmp_path / "bad"), *tiny,
                                    "--set", "model.architecture=bert"])
    assert bad.exit_code == 2 and "architecture must be one of 'gpt2', 'llama', 'gpt_neox'" in bad.output


def test_presets_build_and_switch_architecture():
    for task in ("bijection", "hmm", "recall"):
        experiment = get_preset(task, "hf", "cpu")
        assert experiment.model_config().architecture == "llama"
        gpt2 = apply_overrides(experiment, ["model.architecture=gpt2"]).model_config()
        assert gpt2.architecture == "gpt2" and gpt2.n_positions == experiment.model_config().n_positions


def test_config_errors_name_the_field_the_rule_and_the_value():
    with pytest.raises(ValueError, match=r"architecture must be one of 'gpt2', 'llama', 'gpt_neox', .*; got 'bert'\. Other"):
        _config("bert")
    with pytest.raises(ValueError, match=r"^HFCausalLMConfig\.n_heads must divide d_model; got n_heads=5, d_model=32\.$"):
        HFCausalLMConfig(vocab_size=V, n_positions=P, n_heads=5, d_model=32)
    with pytest.raises(ValueError, match=r"^HFCausalLMConfig\.n_kv_heads must divide n_heads; got n_kv_heads=3, n_heads=4\.$"):
        _config("llama", n_kv_heads=3)
    with pytest.raises(ValueError, match=r"n_kv_heads must be None or an int >= 1; got 0"):
        _config("llama", n_kv_heads=0)
    with pytest.raises(ValueError, match=r"n_kv_heads must be None or n_heads for gpt2, which has no grouped-query attention"):
        _config("gpt2", n_kv_heads=2)
    with pytest.raises(ValueError, match=r"rope_theta must be None for gpt2, which learns absolute positions"):
        _config("gpt2", rope_theta=500.0)
    with pytest.raises(ValueError, match=r"rope_theta must be None or a number in \(0.0, inf\); got -1"):
        _config("llama", rope_theta=-1)
    with pytest.raises(ValueError, match=r"gpt_neox rotates 0.25 of each head in pairs, so d_head = d_model / n_heads must be a multiple of 8; .*d_head=4"):
        _config("gpt_neox", d_model=16)
    with pytest.raises(ValueError, match=r"attn_implementation must be one of 'eager', 'sdpa'; got 'flash_attention_2'"):
        _config("llama", attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match=r"n_out must be None or equal vocab_size when tie_embeddings=True"):
        _config("llama", n_out=5)
    with pytest.raises(ValueError, match=r"head_bias needs tie_embeddings=False"):
        _config("llama", head_bias=True)
    with pytest.raises(ValueError, match=r"'n_layer' is not a field of HFCausalLMConfig; did you mean 'n_layers'\?"):
        HFCausalLMConfig.from_dict({**_config("llama").to_dict(), "n_layer": 3})
    assert HFCausalLMConfig.from_dict(_config("gpt2").to_dict()) == _config("gpt2")
    with pytest.raises(ValueError, match=r"HFCausalLM\.config must be an HFCausalLMConfig; got dict"):
        HFCausalLM({"architecture": "llama"}, generator=None)
    with pytest.raises(TypeError, match=r"HFCausalLM\.reset_parameters: generator must be a torch\.Generator; got int"):
        HFCausalLM(_config("llama"), generator=None).reset_parameters(0)


def test_build_errors_name_the_architecture_and_what_did_not_fit(monkeypatch):
    real = transformers.AutoConfig.for_model

    def rounding(model_type, **kwargs):  # a config class that changes a size it was given
        config = real(model_type, **kwargs)
        config.intermediate_size += 1
        return config

    monkeypatch.setattr(transformers.AutoConfig, "for_model", rounding)
    with pytest.raises(ValueError, match=r"LlamaConfig does not map cleanly: asked for \{'intermediate_size': 48\}, it holds \{'intermediate_size': 49\}"):
        HFCausalLM(_config("llama"), generator=None)
    monkeypatch.undo()
    monkeypatch.setattr(hf_mod, "_is_norm", lambda module: False)  # as if the norms were unknown parameters
    with pytest.raises(ValueError, match=r"LlamaForCausalLM \(llama\) has parameters windtunnel has no initialisation rule for: model\.layers\.0\.input_layernorm\.weight"):
        HFCausalLM(_config("llama"), generator=None)
    monkeypatch.undo()
    monkeypatch.setattr(HFCausalLMConfig, "n_outputs", property(lambda self: 7))
    with pytest.raises(ValueError, match=r"was built with embedding \[11, 32\] and head \[11, 32\]; expected \[11, 32\] and \[7, 32\]"):
        HFCausalLM(_config("llama"), generator=None)


def test_forward_checks_its_inputs():
    model = HFCausalLM(_config("llama"), generator=None)
    with pytest.raises(ValueError, match=r"HFCausalLM\.forward: tokens must have seq_len <= n_positions = 12; got seq_len=13"):
        model(_tokens(seq_len=13))
    with pytest.raises(ValueError, match=r"HFCausalLM\.forward: tokens must be an integer tensor"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, n_positions\) = \[0, 12\); got values in \[0, 12\]"):
        model(_tokens(seq_len=4), position_ids=torch.tensor([0, 1, 2, 12]))
    with pytest.raises(TypeError, match=r"HFCausalLM\.forward: generator must be a torch\.Generator or None; got int"):
        model(_tokens(seq_len=4), generator=3)


def test_without_transformers_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    config = _config("llama")  # configs need no transformers
    with pytest.raises(ModuleNotFoundError, match=r"needs Hugging Face transformers.*pip install 'windtunnel\[hf\]'"):
        HFCausalLM(config, generator=None)
