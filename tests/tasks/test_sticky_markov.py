"""Sticky Markov chain: transition quirk, H_min, sampling streams and the exact Bayes filter
against enumeration of every latent symbol path."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from windtunnel._checks import ConfigError
from windtunnel.tasks import (
    StickyMarkov,
    score_predictions,
    sticky_bayes_filter,
    sticky_transition_matrix,
)

# Off-diagonal weights of the 8-symbol circle: distances 1, 1, 2, 2, 3, 3, 4 -> sum 1/d.
OFF_DIAGONAL_SUM = 2 * (1 + 1 / 2 + 1 / 3) + 1 / 4


def test_reference_quirk_row_matches_the_hand_computation():
    p = sticky_transition_matrix(8, 0.3, "reference")
    total = OFF_DIAGONAL_SUM + 0.3  # the diagonal weight 0.3 is still in the row sum
    expected = [0.3 + 0.7 * 0.3 / total] + [0.7 / d / total for d in (1, 2, 3, 4, 3, 2, 1)]
    torch.testing.assert_close(
        p[0], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-14
    )
    assert [round(v, 4) for v in p[0, :5].tolist()] == [0.3498, 0.1660, 0.0830, 0.0553, 0.0415]
    # circulant: row i is row 0 rolled by i
    for i in range(8):
        torch.testing.assert_close(p[i], p[0].roll(i), rtol=0, atol=1e-15)


def test_exact_normalisation_gives_self_prob_exactly():
    p = sticky_transition_matrix(8, 0.3, "exact")
    assert p.diagonal().sub(0.3).abs().max() < 1e-15
    assert round(p[0, 1].item(), 4) == 0.1787
    assert abs(p[0, 1].item() - 0.7 / OFF_DIAGONAL_SUM) < 1e-15


def test_conditional_entropy_matches_the_paper_and_the_row_formula():
    task = StickyMarkov()
    p = task.transition
    by_hand = -sum(p[0, j].item() * math.log(p[0, j].item()) for j in range(8))  # rows are rolls
    assert abs(task.conditional_entropy_nats() - by_hand) < 1e-12
    assert round(task.conditional_entropy_nats(), 4) == 1.8292
    assert abs(task.conditional_entropy_bits() - by_hand / math.log(2)) < 1e-12
    assert round(StickyMarkov(normalization="exact").conditional_entropy_nats(), 4) == 1.8833


@pytest.mark.parametrize(
    "n_symbols,self_prob,normalization",
    [(8, 0.3, "reference"), (5, 0.6, "exact"), (2, 0.0, "reference"), (7, 0.9, "reference")],
)
def test_stationary_distribution_is_uniform_and_invariant(n_symbols, self_prob, normalization):
    task = StickyMarkov(n_symbols=n_symbols, self_prob=self_prob, normalization=normalization)
    pi = task.stationary
    torch.testing.assert_close(pi @ task.transition, pi, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        pi, torch.full((n_symbols,), 1 / n_symbols, dtype=torch.float64), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        task.transition.sum(-1), torch.ones(n_symbols, dtype=torch.float64), rtol=0, atol=1e-14
    )


def test_means_are_the_reference_draw_and_fixed():
    task = StickyMarkov()
    expected = torch.randn(8, 20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(task.means, expected)
    dist = torch.cdist(task.means.double(), task.means.double())
    off = dist[~torch.eye(8, dtype=torch.bool)]
    assert round(off.mean().item(), 2) == 6.13 and round(off.min().item(), 2) == 3.92  # docs/theory.md §4.1


def _enumerated_predictive(inputs, means, transition, noise_std):
    """p(y_t | x_1..x_t) for every t by summing the joint over all paths y_0..y_t (plain floats)."""
    n = len(means)
    n_inputs = len(inputs)
    out = []
    for t in range(1, n_inputs + 1):
        marginal = [0.0] * n
        for path in itertools.product(range(n), repeat=t + 1):
            weight = 1.0 / n
            for s in range(1, t + 1):
                weight *= transition[path[s - 1]][path[s]]
                sq = sum((a - b) ** 2 for a, b in zip(inputs[s - 1], means[path[s - 1]]))
                weight *= math.exp(-0.5 * sq / noise_std**2)
            marginal[path[-1]] += weight
        total = sum(marginal)
        out.append([m / total for m in marginal])
    return out


@given(
    n_symbols=st.integers(3, 4),
    seq_len=st.integers(2, 6),
    self_prob=st.floats(0.0, 0.95),
    normalization=st.sampled_from(["reference", "exact"]),
    noise_std=st.floats(0.5, 2.0),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=30)
def test_bayes_filter_equals_path_enumeration(
    n_symbols, seq_len, self_prob, normalization, noise_std, seed
):
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(n_symbols, 3, generator=gen, dtype=torch.float64)
    inputs = torch.randn(2, seq_len - 1, 3, generator=gen, dtype=torch.float64) * 1.5
    transition = sticky_transition_matrix(n_symbols, self_prob, normalization)
    result = sticky_bayes_filter(inputs, means, transition, noise_std=noise_std)
    for b in range(2):
        expected = _enumerated_predictive(
            inputs[b].tolist(), means.tolist(), transition.tolist(), noise_std
        )
        torch.testing.assert_close(
            result.predictive_probs[b],
            torch.tensor(expected, dtype=torch.float64),
            rtol=0,
            atol=1e-10,
        )
    torch.testing.assert_close(
        result.predictive_probs.sum(-1),
        torch.ones(2, seq_len - 1, dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )
    # predictive = filtered belief about y_{t-1} pushed through one transition
    torch.testing.assert_close(
        result.predictive_probs, result.filtered_probs @ transition, rtol=0, atol=1e-12
    )


def test_reference_draw_order_reproduces_the_global_rng_stream():
    task = StickyMarkov(seq_len=300)
    batch = task.sample(1, generator=torch.Generator().manual_seed(42), draw_order="reference")
    with torch.random.fork_rng(
        devices=[]
    ):  # the authors' global-RNG procedure, state restored after
        torch.manual_seed(42)
        p32 = sticky_transition_matrix(8, 0.3, "reference", dtype=torch.float32)
        chain = [torch.randint(8, (1,)).item()]
        for _ in range(299):
            chain.append(torch.multinomial(p32[chain[-1]], 1).item())
        noise = torch.randn(299, 20)
    chain = torch.tensor(chain)
    assert torch.equal(batch.previous[0], chain[:-1]) and torch.equal(batch.targets[0], chain[1:])
    assert torch.equal(batch.inputs[0], task.means[chain[:-1]] + noise)


def test_reference_draw_in_one_call_equals_one_multinomial_per_step(monkeypatch):
    # the chain's multinomial draws taken at once (argmax P[y] / Exp(1) variates) against the
    # per-step multinomial loop: the same symbols, noise and generator state afterwards
    from windtunnel.tasks import sticky_markov

    task = StickyMarkov()
    fast_gen, slow_gen = torch.Generator().manual_seed(2024), torch.Generator().manual_seed(2024)
    fast = task.sample(2, generator=fast_gen, draw_order="reference")
    monkeypatch.setattr(sticky_markov, "_multinomial_is_an_exponential_race", lambda: False)
    slow = task.sample(2, generator=slow_gen, draw_order="reference")
    assert torch.equal(fast.previous, slow.previous) and torch.equal(fast.targets, slow.targets)
    assert torch.equal(fast.inputs, slow.inputs)
    assert torch.equal(fast_gen.get_state(), slow_gen.get_state())


def test_reference_seed_42_training_sequence_has_the_spec_bayes_loss():
    task = StickyMarkov()
    batch = task.sample(1, generator=torch.Generator().manual_seed(42), draw_order="reference")
    assert (
        round(task.bayes_scores(batch).loss_nats, 3) == 1.841
    )  # docs/theory.md §4.3, first reference sequence


def test_vectorised_sampling_follows_the_transition_matrix():
    task = StickyMarkov(n_symbols=5, self_prob=0.6, normalization="exact", seq_len=1000)
    batch = task.sample(32, generator=torch.Generator().manual_seed(1))
    assert batch.inputs.shape == (32, 999, 20) and batch.inputs.dtype == torch.float32
    assert batch.targets.shape == (32, 999) and batch.posterior.shape == (32, 999, 5)
    assert torch.equal(batch.previous[:, 1:], batch.targets[:, :-1])
    counts = torch.zeros(5, 5, dtype=torch.float64)
    counts.index_put_(
        (batch.previous.reshape(-1), batch.targets.reshape(-1)),
        torch.ones(32 * 999, dtype=torch.float64),
        accumulate=True,
    )
    freq = counts / counts.sum(-1, keepdim=True)
    assert (freq - task.transition).abs().max() < 0.03  # ~6400 draws per row: 5 sigma is about 0.03
    noise = batch.inputs - task.means[batch.previous]
    assert abs(noise.std().item() - 1.0) < 0.01 and abs(noise.mean().item()) < 0.01


def test_sample_posterior_is_the_filter_and_scores_are_consistent():
    task = StickyMarkov(seq_len=200)
    batch = task.sample(3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(batch.posterior, task.bayes_filter(batch.inputs).predictive_probs)
    scores = task.bayes_scores(batch)
    p = batch.posterior
    loss = -p.gather(-1, batch.targets.unsqueeze(-1)).log().mean().item()
    entropy = -(p * p.log()).sum(-1).mean().item()
    accuracy = (p.argmax(-1) == batch.targets).double().mean().item()
    assert abs(scores.loss_nats - loss) < 1e-12 and abs(scores.entropy_nats - entropy) < 1e-12
    assert scores.accuracy == accuracy
    assert abs(scores.loss_bits - loss / math.log(2)) < 1e-12
    # the Bayes predictor can never be more accurate than knowing y_{t-1}: max_j P_ij = 0.3498
    assert task.transition.max().item() == pytest.approx(0.3498, abs=5e-5)


def test_score_predictions_on_hand_values():
    uniform = torch.zeros(4, 8)
    scores = score_predictions(uniform, torch.arange(4))
    assert (
        abs(scores.loss_nats - math.log(8)) < 1e-12
        and abs(scores.entropy_nats - math.log(8)) < 1e-12
    )
    certain = torch.full((2, 3), -1e4)
    certain[0, 1] = certain[1, 2] = 0.0
    scores = score_predictions(certain, torch.tensor([1, 0]))
    assert scores.accuracy == 0.5 and scores.entropy_nats < 1e-12


def test_other_parameters_work():
    task = StickyMarkov(
        n_symbols=5, self_prob=0.6, d_embed=3, noise_std=0.5, embed_seed=7, seq_len=50
    )
    batch = task.sample(2, generator=torch.Generator().manual_seed(0), draw_order="reference")
    assert batch.inputs.shape == (2, 49, 3) and batch.posterior.shape == (2, 49, 5)
    assert task.means.shape == (5, 3)
    row = task.transition[0]
    assert row[0].item() > 0.6 and abs(row.sum().item() - 1) < 1e-14


def test_bad_config_raises_naming_every_field():
    with pytest.raises(ValueError, match=r"StickyMarkov.n_symbols must be an int >= 2; got 1"):
        StickyMarkov(n_symbols=1)
    with pytest.raises(
        ValueError, match=r"StickyMarkov.self_prob must be a number in \[0.0, 1.0\)"
    ):
        StickyMarkov(self_prob=1.0)
    with pytest.raises(
        ValueError,
        match=r"normalization must be one of 'reference', 'exact'; got 'exakt'.* did you mean 'exact'",
    ):
        StickyMarkov(normalization="exakt")
    with pytest.raises(ValueError, match=r"StickyMarkov.noise_std must be a number in \(0.0"):
        StickyMarkov(noise_std=0.0)
    with pytest.raises(ValueError, match=r"StickyMarkov.seq_len must be an int >= 2"):
        StickyMarkov(seq_len=1)
    with pytest.raises(ConfigError, match=r"3 problems in StickyMarkov") as info:
        StickyMarkov(d_embed=0, embed_seed=-1, n_symbols=2.5)
    assert len(info.value.problems) == 3
    with pytest.raises(ValueError, match=r"sticky_transition_matrix.self_prob"):
        sticky_transition_matrix(8, -0.1)


def test_bad_sample_and_filter_arguments_raise():
    task = StickyMarkov(seq_len=10)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(
        ValueError, match=r"StickyMarkov.sample.batch_size must be an int >= 1; got 0"
    ):
        task.sample(0, generator=gen)
    with pytest.raises(
        ValueError, match=r"StickyMarkov.sample.draw_order must be one of 'vectorized', 'reference'"
    ):
        task.sample(1, generator=gen, draw_order="global")
    with pytest.raises(
        ValueError, match=r"sticky_bayes_filter: inputs must be \[batch, n_inputs, d_embed\]"
    ):
        sticky_bayes_filter(torch.zeros(4, 20), task.means, task.transition)
    with pytest.raises(ValueError, match=r"sticky_bayes_filter: inputs \[..., d_embed=20\]"):
        sticky_bayes_filter(torch.zeros(1, 4, 3), task.means, task.transition)
    with pytest.raises(ValueError, match=r"sticky_bayes_filter.noise_std"):
        sticky_bayes_filter(torch.zeros(1, 4, 20), task.means, task.transition, noise_std=-1.0)
    with pytest.raises(ValueError, match=r"score_predictions: log_probs must be"):
        score_predictions(torch.zeros(3, 8), torch.zeros(4, dtype=torch.long))


def test_sample_each_stacks_one_chain_per_generator():
    task = StickyMarkov(seq_len=40)
    for order in ("reference", "vectorized"):
        both = task.sample_each(
            [torch.Generator().manual_seed(s) for s in (3, 4)], draw_order=order
        )
        for i, s in enumerate((3, 4)):
            one = task.sample(1, generator=torch.Generator().manual_seed(s), draw_order=order)
            assert torch.equal(both.inputs[i], one.inputs[0]) and torch.equal(
                both.targets[i], one.targets[0]
            )
            torch.testing.assert_close(both.posterior[i], one.posterior[0], rtol=0, atol=1e-14)
    with pytest.raises(
        ValueError, match=r"StickyMarkov.sample_each.generators must be a non-empty sequence"
    ):
        task.sample_each([])
    with pytest.raises(ValueError, match=r"StickyMarkov.sample_each.draw_order must be one of"):
        task.sample_each([torch.Generator()], draw_order="x")
