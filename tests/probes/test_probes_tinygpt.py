"""Probes on TinyGPT against independent computations: hooks read by hand, autograd, manual ablations."""

import copy
import math

import pytest
import torch

from windtunnel import probes
from windtunnel.probes import value_update
from windtunnel.hooks import record
from windtunnel.runs import RunDir
from windtunnel.models import PositionwiseMLP, PositionwiseMLPConfig, TinyGPT, TinyGPTConfig
from windtunnel.tasks import Bijection, HMMFiltering
from windtunnel.train import site_loss

TASK = Bijection(n_values=6, n_pairs=5)


def tiny_model(task=TASK, seed=0, **kw):
    cfg = dict(vocab_size=task.vocab_size, n_positions=task.seq_len, n_layers=2, n_heads=2, d_model=16, d_mlp=32)
    cfg.update(kw)
    return TinyGPT(TinyGPTConfig(**cfg), generator=torch.Generator().manual_seed(seed))


def batch_of(task=TASK, n=24, seed=1):
    return task.sample(n, generator=torch.Generator().manual_seed(seed))


def test_hypothesis_tokens():
    assert probes.hypothesis_tokens(TASK).tolist() == list(range(6, 12))  # value tokens V..2V-1
    assert probes.hypothesis_tokens(Bijection(n_values=5, n_pairs=4, format="A")).tolist() == list(range(5))
    assert probes.hypothesis_tokens(HMMFiltering(n_steps=3)) is None


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_collect_states_residual_is_what_the_readout_reads(norm):
    model, batch = tiny_model(norm=norm), batch_of()
    states = probes.collect_states(model, TASK, batch)
    # tied readout: logits = ln_final(resid) @ W_E^T, so the residual must include gain (and bias)
    expected = states.residual @ model.embed.W_E.T
    torch.testing.assert_close(states.logits[:, batch.sites], expected, rtol=1e-5, atol=1e-6)
    with record(model, names="blocks.1.hook_resid_post") as cache:
        model(batch.tokens)
    torch.testing.assert_close(states.residual, model.ln_final(cache["blocks.1.hook_resid_post"])[:, batch.sites])
    assert states.patterns.shape == (2, 24, 2, TASK.seq_len, TASK.seq_len)
    assert states.q.shape == states.k.shape == (2, 24, TASK.seq_len, 2, 8)
    x, h, pos = states.flat()
    assert x.shape == (24 * 5, 16) and h.shape == pos.shape == (24 * 5,)
    assert torch.equal(h.view(24, 5), batch.entropy_bits)


@torch.no_grad()
def test_key_orthogonality_against_a_loop():
    model = tiny_model()
    ko = probes.layer_key_orthogonality(model, probes.hypothesis_tokens(TASK))
    for layer, block in enumerate(model.blocks):
        e = model.embed.W_E[6:12].double()
        n = e / torch.sqrt(e.pow(2).mean(-1, keepdim=True) + model.config.norm_eps) * block.ln1.w.double()
        for h in range(2):
            keys = n @ block.attn.W_K[h].double()
            total = 0.0
            for x in range(6):
                for y in range(6):
                    if x != y:
                        total += abs(float(keys[x] @ keys[y] / (keys[x].norm() * keys[y].norm())))
            assert ko[layer].abs_cosine_per_head[h].item() == pytest.approx(total / 30, rel=1e-9)


def test_geometry_snapshot_baselines_and_rows():
    model, base, batch = tiny_model(seed=0), tiny_model(seed=5), batch_of()
    snap = probes.geometry_snapshot(model, TASK, batch, baseline_model=base, generator=torch.Generator().manual_seed(0))
    assert snap.random_baseline == pytest.approx(math.gamma(4) / (math.sqrt(math.pi) * math.gamma(4.5)))
    assert len(snap.key_orthogonality) == len(snap.baseline_key_orthogonality) == 2
    assert not torch.equal(snap.key_orthogonality[0].abs_cosine_per_head, snap.baseline_key_orthogonality[0].abs_cosine_per_head)
    assert snap.head_entropy_bits.shape == (2, 2)
    # attention entropy at the sites by hand: -sum a log2 a, mean over batch, heads and sites
    pat = probes.collect_states(model, TASK, batch).patterns[0][:, :, batch.sites].double()
    hand = -(torch.where(pat > 0, pat * torch.log2(pat), torch.zeros_like(pat))).sum(-1).mean()
    assert snap.layer_entropy_bits[0].item() == pytest.approx(hand.item(), rel=1e-9)
    rows = snap.rows(7)
    assert {r["metric"] for r in rows} >= {"key_ortho_abs_cos", "key_ortho_init_abs_cos", "attn_entropy_bits", "focusing_ratio", "manifold_pc1_share", "manifold_probe_r2"}
    hmm = HMMFiltering(n_steps=3)
    hmodel = tiny_model(hmm, n_out=hmm.n_classes, tie_embeddings=False)
    assert probes.geometry_snapshot(hmodel, hmm, batch_of(hmm)).key_orthogonality is None


def test_routing_law_stats_agree_with_autograd():
    model, batch = tiny_model(), batch_of()
    model.train()
    stats = probes.routing_law_stats(model, TASK, batch)
    assert model.training
    assert all(p.grad is None for p in model.parameters())  # no gradient left behind
    names = lambda n: n.endswith(("attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_v", "attn.hook_z"))  # noqa: E731
    model.eval()
    with record(model, names=names, grads=True) as cache:
        site_loss(model(batch.tokens), batch, TASK).backward()
    model.zero_grad(set_to_none=True)
    for layer in range(2):
        d_s = cache[f"blocks.{layer}.attn.hook_attn_scores_grad"].double()  # autograd dL/ds
        alpha = cache[f"blocks.{layer}.attn.hook_pattern"].double()
        u = cache[f"blocks.{layer}.attn.hook_z_grad"].double()  # [batch, pos, head, d_head]
        live = (u.abs().sum(-1) > 0).transpose(1, 2)  # [batch, head, pos]
        for h in range(2):
            assert stats.d_scores_fro[layer, h].item() == pytest.approx(d_s[:, h].norm().item(), rel=1e-4)
            d_v = cache[f"blocks.{layer}.attn.hook_v_grad"][:, :, h].double()
            assert stats.value_pull_norm[layer, h].item() == pytest.approx(d_v.norm().item(), rel=1e-4)
            # adv_ij > 0  <=>  dL/ds_ij = -a_ij adv_ij < 0 (a_ij > 0): mass on keys a descent step
            # reinforces. float32 autograd puts rounding noise on exact zeros (e.g. the one-key row 0),
            # so signs are read only above a noise floor.
            floor = 1e-5 * float(d_s[:, h].abs().max())
            mass = (alpha[:, h] * (d_s[:, h] < -floor)).sum(-1)[live[:, h]].mean()
            assert stats.positive_advantage_mass[layer, h].item() == pytest.approx(mass.item(), abs=2e-3)
    assert float(stats.law_rel_error.max()) < 1e-10
    assert float(stats.model_grad_rel_error.max()) < 1e-4
    rows = stats.rows(3)
    assert all(set(r) == {"step", "layer", "head", "metric", "value"} for r in rows)


def test_make_probes_rows_schema_and_files(tmp_path):
    model, batch = tiny_model(), batch_of()
    ps = probes.make_probes(TASK, eval_batch=batch, baseline_model=tiny_model(seed=9), generator=torch.Generator().manual_seed(4), run_dir=tmp_path)
    rows = [r for p in ps for r in p(model, 12)]
    assert rows and all(set(r) == {"step", "layer", "head", "metric", "value"} for r in rows)
    assert all(r["step"] == 12 and (r["value"] is None or isinstance(r["value"], float)) for r in rows)
    assert all(r["layer"] is None or r["layer"] in (0, 1) for r in rows)
    assert all(r["head"] is None or (r["head"] in (0, 1) and r["layer"] is not None) for r in rows)
    assert {"probe_entropy_mae_bits", "advantage_abs_mean", "key_ortho_abs_cos"} <= {r["metric"] for r in rows}
    assert (tmp_path / "manifold" / "step_12.json").exists()
    saved = RunDir(tmp_path).load_checkpoint(tmp_path / "snapshots" / "step_12.pt")["model"]  # verified
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    again = [r for p in ps for r in p(model, 12)]
    r2 = [r["value"] for r in rows if r["metric"] == "manifold_probe_r2"]
    assert r2 == [r["value"] for r in again if r["metric"] == "manifold_probe_r2"]  # same split every call
    mlp = PositionwiseMLP(PositionwiseMLPConfig(vocab_size=TASK.vocab_size, n_positions=TASK.seq_len, n_layers=1, d_model=8, d_mlp=16), generator=torch.Generator().manual_seed(0))
    assert [m for p in ps for m in (r["metric"] for r in p(mlp, 0))] == ["probe_entropy_mae_bits", "probe_kl_bits", "probe_accuracy"]


def test_make_probes_adds_the_memory_probe_for_the_hmm():
    task = HMMFiltering(n_states=2, n_symbols=3, n_steps=4)
    model, batch = tiny_model(task), batch_of(task, n=16)
    ps = probes.make_probes(task, eval_batch=batch, generator=torch.Generator().manual_seed(4))
    assert len(ps) == 4 and probes.make_probes(TASK, eval_batch=batch_of()).__len__() == 3
    rows = ps[-1](model, 7)
    want = probes.hmm_lag_response(model, task, batch, generator=torch.Generator().manual_seed(4))
    for name in ("model_move_tv", "bayes_move_tv", "response_error_tv"):
        got = {r["metric"]: r["value"] for r in rows if r["metric"].startswith(name + "_lag")}
        assert got == {f"{name}_lag{d}": v for d, v in zip(want["lags"], want[name])}
    assert all(r["step"] == 7 and r["layer"] is None and r["head"] is None for r in rows)
    assert ps[-1](model, 8)[0]["value"] == rows[0]["value"], "the same observation changes at every step"


def _manual(model, edit):
    clone = copy.deepcopy(model)
    with torch.no_grad():
        edit(clone)
    return clone


def test_ablation_table_matches_manual_ablations():
    model, batches = tiny_model(), [batch_of(n=32)]
    table = probes.ablation_table(model, TASK, batches)
    assert len(table.rows) == 2 * 2 + 3 * 2
    by = {(r["kind"], r["layer"], r["head"]): r for r in table.rows}

    def mae(m):
        return probes.calibrate(m, TASK, batches).scalars()["entropy_mae_bits"]

    for layer in range(2):
        for h in range(2):  # zeroing the head's rows of W_O removes exactly its output (no bias)
            manual = _manual(model, lambda m: m.blocks[layer].attn.W_O[h].zero_())
            assert by[("head", layer, h)]["entropy_mae_bits"] == pytest.approx(mae(manual), abs=1e-9)
            assert by[("head", layer, h)]["delta_mae_bits"] != 0.0  # a head with nonzero output matters
        manual = _manual(model, lambda m: m.blocks[layer].attn.W_O.zero_())
        assert by[("zero_attn_out", layer, None)]["entropy_mae_bits"] == pytest.approx(mae(manual), abs=1e-9)

        def kill_mlp(m):
            m.blocks[layer].mlp.W_out.zero_()
            m.blocks[layer].mlp.b_out.zero_()

        assert by[("zero_mlp_out", layer, None)]["entropy_mae_bits"] == pytest.approx(mae(_manual(model, kill_mlp)), abs=1e-9)
        assert by[("bypass", layer, None)]["delta_mae_bits"] != 0.0
    assert table.intact["entropy_mae_bits"] == pytest.approx(mae(model))


def test_errors():
    mlp = PositionwiseMLP(PositionwiseMLPConfig(vocab_size=TASK.vocab_size, n_positions=TASK.seq_len, n_layers=1, d_model=8, d_mlp=16), generator=torch.Generator().manual_seed(0))
    batch = batch_of()
    for fn in (probes.collect_states, probes.geometry_snapshot, probes.routing_law_stats, probes.ablation_table, probes.attention_focusing):
        with pytest.raises(ValueError, match=rf"^{fn.__name__}: not available for PositionwiseMLP \(windtunnel.models.mlp\): no attention-site adapter"):
            fn(mlp, TASK, batch if fn is not probes.ablation_table else [batch])
    model = tiny_model()
    with model.ablated(heads=[(0, 1)]), pytest.raises(ValueError, match=r"^routing_law_stats: record_sites: TinyGPT has head multipliers"):
        probes.routing_law_stats(model, TASK, batch)


def test_value_pull_agreement_known_answers():
    g = torch.Generator().manual_seed(0)
    pull = torch.randn(3, 5, 2, 4, generator=g, dtype=torch.float64)
    pull[0, 0] = 0.0  # a value nobody attended: no pull, left out of the cosines
    cos, whole, ratio = value_update._value_pull_agreement(-0.1 * pull, pull, lr=0.1)  # plain SGD on v
    assert torch.allclose(cos, torch.ones(2, dtype=torch.float64)) and torch.allclose(whole, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(ratio, torch.ones(2, dtype=torch.float64))
    cos, _, ratio = value_update._value_pull_agreement(0.3 * pull, pull, lr=0.1)  # up the gradient, 3x as far
    assert torch.allclose(cos, -torch.ones(2, dtype=torch.float64)) and torch.allclose(ratio, 3 * torch.ones(2, dtype=torch.float64))
    other = torch.randn(3, 5, 2, 4, generator=g, dtype=torch.float64)
    orth = other - (other * pull).sum(-1, keepdim=True) / pull.pow(2).sum(-1, keepdim=True).clamp_min(1e-300) * pull
    cos, whole, _ = value_update._value_pull_agreement(orth, pull, lr=0.1)
    assert cos.abs().max() < 1e-12 and whole.abs().max() < 1e-12
    # two positions along the pull, three against it: the mean counts values, the whole-matrix
    # cosine weighs them by their squared pull
    mixed = torch.where(torch.arange(5)[None, :, None, None] < 2, -pull, pull)
    cos, whole, _ = value_update._value_pull_agreement(mixed, pull, lr=1.0)
    sq = pull.pow(2).sum(-1)
    live = sq > 0
    signs = torch.where(torch.arange(5)[None, :, None] < 2, 1.0, -1.0).double()
    assert torch.allclose(cos, (signs * live).sum((0, 1)) / live.sum((0, 1)))
    assert torch.allclose(whole, (signs * sq).sum((0, 1)) / sq.sum((0, 1)))


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_value_update_probe_against_an_sgd_step_by_hand(norm):
    """Under plain SGD the realised changes are known without the probe: the head's own part is
    x (-lr dL/dW_V) - lr dL/db_V from the parameter gradients, and the total is a fresh forward."""
    model = tiny_model(norm=norm, attn_bias=norm == "layernorm")
    batch, lr = batch_of(), 0.05
    reference = copy.deepcopy(model)
    probe = probes.ValueUpdateProbe()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    with probe.watch(model, batch.tokens):
        site_loss(model(batch.tokens), batch, TASK).backward()
    optimizer.step()
    stats = probe.finish(model, lr)
    assert model.training
    # the same step by hand on the copy
    wanted = lambda n: n.endswith(("attn.hook_v", "ln1.hook_normalized"))  # noqa: E731
    reference.eval()
    with record(reference, names=wanted, grads=True) as cache:
        site_loss(reference(batch.tokens), batch, TASK).backward()
    with torch.no_grad(), record(model, names=lambda n: n.endswith("attn.hook_v")) as after:
        model.eval()
        model(batch.tokens)
    for layer, block in enumerate(reference.blocks):
        ln = block.ln1
        x = cache[f"blocks.{layer}.ln1.hook_normalized"].double() * ln.w.double()
        if getattr(ln, "b", None) is not None:
            x = x + ln.b.double()
        own = torch.einsum("bpd,hde->bphe", x, -lr * block.attn.W_V.grad.double())
        if block.attn.b_V is not None:
            own = own - lr * block.attn.b_V.grad.double()
        pull = cache[f"blocks.{layer}.attn.hook_v_grad"].double()
        total = after[f"blocks.{layer}.attn.hook_v"].double() - cache[f"blocks.{layer}.attn.hook_v"].double()
        for h in range(2):
            for delta, prefix in ((own, "own_"), (total, "")):
                d, p = delta[:, :, h], pull[:, :, h]
                live = p.norm(dim=-1) > 0
                cos = torch.nn.functional.cosine_similarity(d, -p, dim=-1)[live]
                assert getattr(stats, f"{prefix}pull_cosine")[layer, h].item() == pytest.approx(cos.mean().item(), abs=1e-4)
                whole = -(d * p).sum() / (d.norm() * p.norm())
                assert getattr(stats, f"{prefix}pull_cosine_all")[layer, h].item() == pytest.approx(whole.item(), abs=1e-4)
                assert getattr(stats, f"{prefix}norm_ratio")[layer, h].item() == pytest.approx((d.norm() / (lr * p.norm())).item(), rel=1e-3)
    assert stats.pull_cosine.shape == (2, 2) and stats.lr == lr
    # SGD: x ΔW_V · (-AᵀU) = lr ‖XᵀAᵀU‖² >= 0, so the head's own change never points against its pull
    assert float(stats.own_pull_cosine_all.min()) > 0.0
    # and the own change is the gradient step
    assert torch.allclose(stats.gradient_pull_cosine, stats.own_pull_cosine, atol=1e-5)
    assert torch.allclose(stats.gradient_pull_cosine_all, stats.own_pull_cosine_all, atol=1e-5)
    rows = stats.rows(7)
    assert {r["metric"] for r in rows} == {f"value_update_{n}" for n in probes.ValueUpdateStats._PER_HEAD}
    assert all(r["step"] == 7 and r["layer"] in (0, 1) and r["head"] in (0, 1) for r in rows)


def test_value_update_probe_under_adam_differs_from_the_gradient_step():
    """Adam's first step is -lr g / |g| per coordinate: the own change is no longer the gradient step."""
    model, batch = tiny_model(), batch_of()
    probe = probes.ValueUpdateProbe()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with probe.watch(model, batch.tokens):
        site_loss(model(batch.tokens), batch, TASK).backward()
    optimizer.step()
    stats = probe.finish(model, 1e-3)
    assert (stats.gradient_pull_cosine_all - stats.own_pull_cosine_all).abs().max() > 0.01
    assert float(stats.gradient_pull_cosine_all.min()) > 0.0  # the gradient step still never opposes the pull


def test_value_update_probe_errors():
    model, batch = tiny_model(), batch_of()
    probe = probes.ValueUpdateProbe()
    with pytest.raises(RuntimeError, match="no watched step"):
        probe.finish(model, 0.1)
    with pytest.raises(ValueError, match="lr must be a positive"):
        probe.finish(model, 0.0)
    with probe.watch(model, batch.tokens):
        model(batch.tokens)  # forward only: no backward reaches the values
    with pytest.raises(RuntimeError, match="left no gradient at the values of blocks.0.attn"):
        probe.finish(model, 0.1)
    mlp = PositionwiseMLP(PositionwiseMLPConfig(vocab_size=TASK.vocab_size, n_positions=TASK.seq_len, n_layers=1, d_model=8, d_mlp=16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"^ValueUpdateProbe.watch: not available for PositionwiseMLP"):
        with probe.watch(mlp, batch.tokens):
            pass
    with model.ablated(heads=[(0, 1)]), pytest.raises(ValueError, match=r"^ValueUpdateProbe.watch: not available for TinyGPT .*ablation multipliers"):
        with probe.watch(model, batch.tokens):
            pass
