"""The HMM memory analyses of windtunnel.probes.memory against brute force: attention mass by block,
history attention, the circuit probe, the memory ladder and the lag response."""

import pytest


def _layout_masses(task, tokens, pattern):
    """Brute force for hmm_attention_mass: classify every key position by the tokens themselves."""
    import torch

    blocks = ("transition", "emission", "earlier_reads", "self", "obs_markers", "other_markers")
    out = {k: torch.zeros(pattern.shape[1], dtype=torch.float64) for k in blocks}
    count = 0
    for b in range(tokens.shape[0]):
        row = tokens[b].tolist()
        t0, e0, sep = row.index(task.trans_id), row.index(task.emit_id), row.index(task.sep_id)
        reads = [i for i, tok in enumerate(row) if tok >= task.symbol_offset]
        for j, q in enumerate(reads[1:], start=1):
            count += 1
            for h in range(pattern.shape[1]):
                for k in range(q + 1):
                    w = float(pattern[b, h, q, k])
                    if t0 < k < e0:
                        out["transition"][h] += w
                    elif e0 < k < sep:
                        out["emission"][h] += w
                    elif k in reads[:j]:
                        out["earlier_reads"][h] += w
                    elif k == q:
                        out["self"][h] += w
                    elif row[k] == task.obs_id:
                        out["obs_markers"][h] += w
                    elif row[k] in (task.trans_id, task.emit_id, task.sep_id):
                        out["other_markers"][h] += w
    return {k: v / count for k, v in out.items()}


def _random_causal_pattern(task):
    """Three sequences of ``task`` and a random causal attention pattern [3, 2 heads, seq, seq] (float64)."""
    import torch

    batch = task.sample(3, generator=torch.Generator().manual_seed(0))
    n = task.seq_len
    scores = torch.randn(3, 2, n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return batch, torch.softmax(scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -torch.inf), -1)


def test_hmm_attention_mass_matches_a_brute_force_over_the_token_layout():
    import torch

    from windtunnel.probes import hmm_attention_mass
    from windtunnel.tasks import HMMFiltering

    task = HMMFiltering(n_states=2, n_symbols=3, n_steps=4)
    batch, pattern = _random_causal_pattern(task)
    got = hmm_attention_mass(pattern, task)
    want = _layout_masses(task, batch.tokens, pattern)
    other = want.pop("other_markers")
    assert set(got) == set(want)
    for block in want:
        torch.testing.assert_close(got[block], want[block], rtol=0, atol=1e-12)
    # Every key position is in exactly one block: with the three markers the masses sum to 1.
    torch.testing.assert_close(sum(got.values()) + other, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="pattern must be"):
        hmm_attention_mass(pattern[:, :, :-1], task)


def test_hmm_history_attention_matches_a_loop_over_steps_and_reads():
    import math

    import torch

    from windtunnel.probes import hmm_history_attention
    from windtunnel.tasks import HMMFiltering

    task = HMMFiltering(n_states=2, n_symbols=2, n_steps=5)
    batch, pattern = _random_causal_pattern(task)
    got = hmm_history_attention(pattern, task)
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: (2, 4) for k in ("earlier_reads", "previous_read", "earlier_entropy_bits")}
    for b_h in range(2):
        for t in range(2, 6):
            masses, prevs, ents = [], [], []
            for b in range(3):
                row = batch.tokens[b].tolist()
                reads = [i for i, tok in enumerate(row) if tok >= task.symbol_offset]
                q = reads[t - 1]
                w = [float(pattern[b, b_h, q, k]) for k in reads[: t - 1]]
                masses.append(sum(w))
                prevs.append(w[-1])
                ents.append(-sum(x / sum(w) * math.log2(x / sum(w)) for x in w))
            for key, vals in (("earlier_reads", masses), ("previous_read", prevs), ("earlier_entropy_bits", ents)):
                assert float(got[key][b_h, t - 2]) == pytest.approx(sum(vals) / 3, abs=1e-12), (key, b_h, t)
    # One earlier read at t = 2: its entropy is 0 and the previous read is all of it.
    torch.testing.assert_close(got["previous_read"][:, 0], got["earlier_reads"][:, 0], rtol=0, atol=1e-15)
    assert got["earlier_entropy_bits"][:, 0].abs().max() < 1e-12
    with pytest.raises(ValueError, match="hmm_history_attention: pattern must be"):
        hmm_history_attention(pattern[:, :, 1:], task)


def test_hmm_circuit_probe_on_an_untrained_model():
    import torch

    from windtunnel.probes import CIRCUIT_QUANTITIES, hmm_attention_mass, hmm_circuit_probe
    from windtunnel.hooks import record
    from windtunnel.models import TinyGPT, TinyGPTConfig
    from windtunnel.tasks import HMMFiltering

    task = HMMFiltering(n_steps=6)
    config = TinyGPTConfig(vocab_size=task.vocab_size, n_positions=task.seq_len, n_layers=2, n_heads=2, d_model=16,
                           d_mlp=32, tie_embeddings=False, n_out=task.n_classes, head_bias=True)
    model = TinyGPT(config, generator=torch.Generator().manual_seed(0)).train()
    batch = task.sample(300, generator=torch.Generator().manual_seed(1))
    out = hmm_circuit_probe(model, task, batch, generator=torch.Generator().manual_seed(2))
    assert model.training  # the mode is restored
    assert out["layers"] == ["embed", "block 0", "block 1"] and out["n_sequences"] == 300
    assert tuple(out["r2"]) == CIRCUIT_QUANTITIES
    # The token and position of a read site say nothing about this sequence's HMM or beliefs:
    # every held-out R² at the embedding is about 0.
    for quantity, per_layer in out["r2"].items():
        assert len(per_layer) == 3
        assert abs(per_layer[0]) < 0.05, (quantity, per_layer)
    with pytest.raises(ValueError, match=">= 8 sequences"):
        hmm_circuit_probe(model, task, task.sample(4, generator=torch.Generator().manual_seed(3)), generator=torch.Generator())
    with torch.no_grad(), record(model.eval(), names="blocks.1.attn.hook_pattern") as cache:
        model(batch.tokens)
    for block, mass in hmm_attention_mass(cache["blocks.1.attn.hook_pattern"], task).items():
        assert out["attention"][block][1] == pytest.approx(mass.tolist(), abs=1e-6)


def test_memory_ladder_places_a_finite_memory_filter_on_its_own_rung():
    import torch

    from windtunnel.probes import memory_ladder
    from windtunnel.tasks import HMMFiltering, entropy_bits, windowed_posterior

    batches = [HMMFiltering(n_steps=12).sample(50, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    # The "model" is the exact 3-step-memory filter itself: its MAE is the ladder's w = 3 rung.
    errors = [
        (entropy_bits(windowed_posterior(b.transition_cents, b.emission_cents, b.observations, window=3))
         - entropy_bits(b.posterior)).abs().flatten()
        for b in batches
    ]
    model_mae = torch.cat(errors).mean().item()
    out = memory_ladder(batches, model_mae_bits=model_mae, windows=(1, 2, 3, 4, 12))
    ladder = out["windowed_filter_mae_bits"]
    assert ladder[3] == model_mae
    assert (out["beats_memory_steps"], out["beaten_by_memory_steps"]) == (2, 3)
    assert ladder[1] > ladder[2] > ladder[3] > ladder[4] > 0
    assert ladder[12] < 1e-12  # a window as long as the sequence is the exact filter
    perfect = memory_ladder(batches, model_mae_bits=0.0, windows=(1, 2))  # beats every rung
    assert (perfect["beats_memory_steps"], perfect["beaten_by_memory_steps"]) == (2, None)
    useless = memory_ladder(batches, model_mae_bits=10.0, windows=(1, 2))  # beaten by every rung
    assert (useless["beats_memory_steps"], useless["beaten_by_memory_steps"]) == (None, 1)


class _FilterAsModel:
    """A stand-in model whose logits at the read positions are the log beliefs of the exact filter
    (or of a filter with a ``window``-step memory), decoded from the tokens alone."""

    def __new__(cls, task, window=None):
        import torch
        from torch import nn

        from windtunnel.tasks import hmm_posterior, windowed_posterior

        class FilterModel(nn.Module):
            def __init__(self):
                super().__init__()
                self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

            def forward(self, tokens):
                s, o, floor = task.n_states, task.n_symbols, task.floor_units
                trans = (tokens[:, 1 : 1 + s * s] + floor).reshape(-1, s, s)
                emit = (tokens[:, 2 + s * s : 2 + s * s + s * o] + floor).reshape(-1, s, o)
                obs = tokens[:, task.sites] - task.symbol_offset
                if window is None:
                    probs = hmm_posterior(trans, emit, obs).filtered_probs
                else:
                    probs = windowed_posterior(trans, emit, obs, window=window)
                logits = torch.full((*tokens.shape, task.vocab_size), -50.0, dtype=torch.float64)
                logits[:, task.sites, task.class_offset : task.class_offset + task.n_classes] = probs.log()
                return logits

        return FilterModel()


def test_hmm_lag_response_of_exact_and_finite_memory_filters():
    import torch

    from windtunnel.probes import hmm_lag_response
    from windtunnel.tasks import HMMFiltering

    task = HMMFiltering(n_states=3, n_symbols=4, n_steps=7)
    batch = task.sample(50, generator=torch.Generator().manual_seed(0))
    exact = hmm_lag_response(_FilterAsModel(task), task, batch, generator=torch.Generator().manual_seed(1), max_lag=9)
    assert exact["lags"] == list(range(7)) and exact["n_sequences"] == 50  # lags stop at K - 1
    assert exact["model_move_tv"] == pytest.approx(exact["bayes_move_tv"], abs=1e-9)
    assert max(exact["response_error_tv"]) < 1e-9
    moves = exact["bayes_move_tv"]
    assert all(a > b > 0 for a, b in zip(moves, moves[1:])), "the exact filter forgets, lag by lag"
    short = hmm_lag_response(_FilterAsModel(task, window=3), task, batch, generator=torch.Generator().manual_seed(1))
    assert short["bayes_move_tv"] == exact["bayes_move_tv"], "the same changes for the same generator"
    assert short["model_move_tv"][:3] == pytest.approx(exact["bayes_move_tv"][:3], rel=0.5)
    assert short["model_move_tv"][3:] == [0.0] * 4, "a 3-step memory does not hear o_{t-3}"
    assert short["response_error_tv"][3:] == pytest.approx(exact["bayes_move_tv"][3:], rel=1e-12)
    with pytest.raises(ValueError, match="max_lag must be an int >= 0"):
        hmm_lag_response(_FilterAsModel(task), task, batch, generator=torch.Generator(), max_lag=-1)


def test_hmm_lag_response_matches_a_loop_over_sequences_and_steps():
    """Two symbols: the changed observation is the other one, so a plain loop can redo it."""
    import torch

    from windtunnel.probes import hmm_lag_response
    from windtunnel.tasks import HMMFiltering, hmm_posterior, windowed_posterior

    task = HMMFiltering(n_states=2, n_symbols=2, n_steps=5)
    batch = task.sample(4, generator=torch.Generator().manual_seed(2))
    got = hmm_lag_response(_FilterAsModel(task, window=2), task, batch, generator=torch.Generator(), max_lag=3)
    sums = {k: [0.0] * 4 for k in ("bayes", "model", "error")}
    counts = [0] * 4
    for n in range(4):
        args = (batch.transition_cents[n : n + 1], batch.emission_cents[n : n + 1])
        obs = batch.observations[n : n + 1]
        for j in range(5):
            flipped = obs.clone()
            flipped[0, j] = 1 - flipped[0, j]
            a0, a1 = hmm_posterior(*args, obs).filtered_probs[0], hmm_posterior(*args, flipped).filtered_probs[0]
            p0, p1 = windowed_posterior(*args, obs, window=2)[0], windowed_posterior(*args, flipped, window=2)[0]
            for t in range(j, min(5, j + 4)):
                d = t - j
                sums["bayes"][d] += 0.5 * float((a1[t] - a0[t]).abs().sum())
                sums["model"][d] += 0.5 * float((p1[t] - p0[t]).abs().sum())
                sums["error"][d] += 0.5 * float(((p1[t] - p0[t]) - (a1[t] - a0[t])).abs().sum())
                counts[d] += 1
    for key, name in (("bayes", "bayes_move_tv"), ("model", "model_move_tv"), ("error", "response_error_tv")):
        assert got[name] == pytest.approx([s / c for s, c in zip(sums[key], counts)], rel=1e-9, abs=1e-15)
