"""HMM wind tunnel: grid, token layout and exact beliefs against enumeration of all state paths."""

import itertools
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from windtunnel.tasks import (
    HMMBatch,
    HMMFiltering,
    Task,
    hmm_posterior,
    quantise_rows,
    windowed_posterior,
)
from windtunnel.tasks.filtering import _probability_filter
from windtunnel.tasks.hmm import _log_space_posterior


def _path_marginal(transition, emission, observations, n_steps, units=100):
    """p(s_n_steps | o_1:len(observations)) by summing the joint over all S^n_steps state paths.

    transition, emission: nested lists in grid units; observations: the o's that are conditioned
    on (at most n_steps of them). Plain Python floats: independent of the library's filter.
    """
    n_states = len(transition)
    marginal = [0.0] * n_states
    for path in itertools.product(range(n_states), repeat=n_steps):
        weight = 1.0 / n_states
        for t, s in enumerate(path):
            if t > 0:
                weight *= transition[path[t - 1]][s] / units
            if t < len(observations):
                weight *= emission[s][observations[t]] / units
        marginal[path[-1]] += weight
    total = sum(marginal)
    return [m / total for m in marginal]


def _rows(width, floor_units=5, units=100):
    """Integer rows on the grid: every entry >= floor, summing exactly to ``units``."""
    free = units - floor_units * width
    return st.lists(st.integers(0, free), min_size=width - 1, max_size=width - 1).map(
        lambda cuts: [
            hi - lo + floor_units for lo, hi in zip([0, *sorted(cuts)], [*sorted(cuts), free])
        ]
    )


@st.composite
def _hmms(draw, floor_units=5):
    n_states = draw(st.integers(1, 4))
    n_symbols = draw(st.integers(1, 4))
    transition = [draw(_rows(n_states, floor_units)) for _ in range(n_states)]
    emission = [draw(_rows(n_symbols, floor_units)) for _ in range(n_states)]
    observations = draw(st.lists(st.integers(0, n_symbols - 1), min_size=1, max_size=6))
    return transition, emission, observations


def _evidence(transition, emission, observations):
    """p(o_1:K) in grid units^(2K - 1) by summing over all state paths (0 when impossible)."""
    n_states = len(transition)
    total = 0
    for path in itertools.product(range(n_states), repeat=len(observations)):
        weight = 1
        for t, s in enumerate(path):
            if t > 0:
                weight *= transition[path[t - 1]][s]
            weight *= emission[s][observations[t]]
        total += weight
    return total


def _time_major(transition_cents, emission_cents, observations, units=100):
    """The [from, to, batch] transition and [n_steps, S, batch] likelihoods of hmm_posterior."""
    batch, n_states = transition_cents.shape[:2]
    n_steps = observations.shape[1]
    trans_probs = transition_cents.double().permute(1, 2, 0) / units
    index = observations.T.unsqueeze(1).expand(n_steps, n_states, batch)
    lik = (emission_cents.double() / units).permute(2, 1, 0).gather(0, index)
    return trans_probs, lik


@given(hmm=_hmms())
@settings(max_examples=40)
def test_beliefs_equal_path_enumeration(hmm):
    _assert_beliefs_equal_path_enumeration(*hmm)


@given(hmm=_hmms(floor_units=0))
@settings(max_examples=60)
def test_beliefs_with_zero_cents_equal_path_enumeration(hmm):
    # Rows on the grid that may hold zero cents (forbidden transitions and symbols): the
    # probability-space recursion must keep them (not decline) and give the exact beliefs.
    transition, emission, observations = hmm
    assume(_evidence(transition, emission, observations) > 0)  # else no posterior exists
    args = (torch.tensor([transition]), torch.tensor([emission]), torch.tensor([observations]))
    n_states = len(transition)
    accepted = _probability_filter(
        1.0 / n_states, *_time_major(*args), n_predicted=len(observations) + 1, with_norms=False
    )
    assert accepted is not None
    _assert_beliefs_equal_path_enumeration(transition, emission, observations)


def _assert_beliefs_equal_path_enumeration(transition, emission, observations):
    beliefs = hmm_posterior(
        torch.tensor([transition]), torch.tensor([emission]), torch.tensor([observations])
    )
    n_obs = len(observations)
    for t in range(1, n_obs + 1):
        filtered = _path_marginal(transition, emission, observations[:t], t)
        predicted = _path_marginal(transition, emission, observations[: t - 1], t)
        next_state = _path_marginal(transition, emission, observations[:t], t + 1)
        for name, expected in (
            ("filtered_probs", filtered),
            ("predicted_probs", predicted),
            ("next_state_probs", next_state),
        ):
            # float64 throughout; six steps of products and sums lose a few ulps at most.
            torch.testing.assert_close(
                getattr(beliefs, name)[0, t - 1],
                torch.tensor(expected, dtype=torch.float64),
                rtol=0,
                atol=1e-12,
                msg=lambda m, name=name, t=t: f"{name} at t={t}: {m}",
            )


@pytest.mark.parametrize("n_states,n_symbols", [(5, 5), (3, 2), (2, 4)])
def test_sampled_batch_equals_enumeration(n_states, n_symbols):
    task = HMMFiltering(n_states=n_states, n_symbols=n_symbols, n_steps=5)
    batch = task.sample(3, generator=torch.Generator().manual_seed(n_states + 7 * n_symbols))
    for row in range(3):
        transition = batch.transition_cents[row].tolist()
        emission = batch.emission_cents[row].tolist()
        observations = batch.observations[row].tolist()
        for t in range(1, 6):
            expected = _path_marginal(transition, emission, observations[:t], t)
            torch.testing.assert_close(
                batch.posterior[row, t - 1],
                torch.tensor(expected, dtype=torch.float64),
                rtol=0,
                atol=1e-12,
            )
    assert not batch.posterior.isnan().any()
    torch.testing.assert_close(
        batch.entropy_bits,
        -(batch.posterior * batch.posterior.log2()).sum(-1),
    )


def test_default_grid_and_integer_rows():
    task = HMMFiltering()
    batch = task.sample(500, generator=torch.Generator().manual_seed(0))
    for cents in (batch.transition_cents, batch.emission_cents):
        assert cents.dtype == torch.long
        assert torch.all(cents.sum(-1) == 100)
        # Floor 5 cents; a row's largest entry is at most 100 - 4 * 5 = 80.
        assert cents.min() >= 5 and cents.max() <= 80
    assert batch.transition_cents.shape == (500, 5, 5)
    assert batch.emission_cents.shape == (500, 5, 5)


def test_default_token_layout():
    task = HMMFiltering()
    assert (task.vocab_size, task.header_len, task.seq_len) == (105, 53, 93)
    assert task.sites.tolist() == [54 + 2 * t for t in range(20)]
    batch = task.sample(16, generator=torch.Generator().manual_seed(1))
    assert isinstance(task, Task) and isinstance(batch, HMMBatch)
    tokens = batch.tokens
    assert tokens.shape == (16, 93)
    assert torch.all(tokens[:, 0] == 96)  # [TRANS]
    assert torch.all(tokens[:, 26] == 97)  # [EMIT]
    assert torch.all(tokens[:, 52] == 98)  # [SEP]
    assert torch.all(tokens[:, 53::2] == 99)  # [OBS]
    for row in range(16):
        for i in range(5):
            for j in range(5):
                # id = 100 p - 5, row-major
                assert tokens[row, 1 + 5 * i + j] == batch.transition_cents[row, i, j] - 5
                assert tokens[row, 27 + 5 * i + j] == batch.emission_cents[row, i, j] - 5
        for t in range(20):
            assert tokens[row, 54 + 2 * t] == 100 + batch.observations[row, t]
    assert tokens[:, 1:26].max() <= 95 and tokens[:, 27:52].max() <= 95
    assert torch.equal(batch.labels, batch.states)
    assert torch.equal(batch.sites, task.sites)


@pytest.mark.parametrize("n_states,n_symbols", [(4, 6), (2, 3), (6, 2)])
def test_other_sizes_layout(n_states, n_symbols):
    task = HMMFiltering(n_states=n_states, n_symbols=n_symbols, n_steps=7)
    header = n_states**2 + n_states * n_symbols + 3
    assert task.header_len == header
    assert task.vocab_size == 100 + n_symbols
    assert task.sites.tolist() == [header + 1 + 2 * t for t in range(7)]
    batch = task.sample(8, generator=torch.Generator().manual_seed(2))
    assert batch.tokens.shape == (8, header + 14)
    assert torch.all(batch.tokens[:, 0] == 96)
    assert torch.all(batch.tokens[:, 1 + n_states**2] == 97)
    assert torch.all(batch.tokens[:, header - 1] == 98)
    assert torch.all(batch.tokens[:, header::2] == 99)
    assert torch.equal(batch.tokens[:, task.sites], batch.observations + 100)
    # step_layout: the header, then one ([OBS], symbol) pair per step.
    start, per_step = task.step_layout
    assert (start, per_step) == (header, 2) and task.seq_len == start + per_step * 7
    assert batch.posterior.shape == (8, 7, n_states)
    assert batch.transition_cents.shape == (8, n_states, n_states)
    assert batch.emission_cents.shape == (8, n_states, n_symbols)
    assert torch.all(batch.emission_cents.sum(-1) == 100)
    assert batch.tokens.max() < task.vocab_size


def test_length_generalisation_shares_format():
    long_task = HMMFiltering(n_steps=50)
    short_task = HMMFiltering(n_steps=20)
    batch = long_task.sample(32, generator=torch.Generator().manual_seed(4))
    assert long_task.seq_len == 153 and long_task.sites[-1] == 54 + 2 * 49
    # The first 20 steps of a K = 50 sequence are a valid K = 20 sequence with the same beliefs.
    short_tokens = short_task.encode(
        batch.transition_cents, batch.emission_cents, batch.observations[:, :20]
    )
    assert torch.equal(short_tokens, batch.tokens[:, : short_task.seq_len])
    short = hmm_posterior(batch.transition_cents, batch.emission_cents, batch.observations[:, :20])
    torch.testing.assert_close(short.filtered_probs, batch.posterior[:, :20], rtol=0, atol=0)


def test_generator_matches_its_model():
    """s_1 is uniform, o_t ~ E[s_t], s_t+1 ~ T[s_t]: unbiased residuals average to zero."""
    task = HMMFiltering(n_steps=2)
    n = 10000
    batch = task.sample(n, generator=torch.Generator().manual_seed(5))
    rows = torch.arange(n)
    s1, s2, o1 = batch.states[:, 0], batch.states[:, 1], batch.observations[:, 0]
    first = torch.bincount(s1, minlength=5).double() / n
    emit = (
        torch.nn.functional.one_hot(o1, 5) - batch.emission_cents[rows, s1].double() / 100
    ).mean(0)
    move = (
        torch.nn.functional.one_hot(s2, 5) - batch.transition_cents[rows, s1].double() / 100
    ).mean(0)
    # Each residual has sd <= 0.5, so 4 sd of the mean is 4 * 0.5 / sqrt(10000) = 0.02.
    torch.testing.assert_close(first, torch.full((5,), 0.2, dtype=torch.float64), rtol=0, atol=0.02)
    torch.testing.assert_close(emit, torch.zeros(5, dtype=torch.float64), rtol=0, atol=0.02)
    torch.testing.assert_close(move, torch.zeros(5, dtype=torch.float64), rtol=0, atol=0.02)


def test_reference_entropy_statistics():
    """docs/theory.md §5.2 [D]: mean filtered entropy ≈ 2.02 bits at t = 1 and 1.907 overall."""
    batch = HMMFiltering().sample(2000, generator=torch.Generator().manual_seed(6))
    # Per-site sd is 0.25; sequence means are averages of 20 correlated sites, so the overall
    # mean's standard error is below 0.25 / sqrt(2000) ≈ 0.006; 0.03 is a 5-sigma tolerance.
    assert batch.entropy_bits.mean().item() == pytest.approx(1.907, abs=0.03)
    assert batch.entropy_bits[:, 0].mean().item() == pytest.approx(2.02, abs=0.03)
    assert batch.entropy_bits.max() <= math.log2(5) + 1e-12


def _reference_quantise(row, floor_units=5, units=100):
    """docs/theory.md §5.2's repair rule, written as a plain loop over Python ints."""
    cents = [max(round(p * units), floor_units) for p in row]
    while sum(cents) < units:
        i = min(range(len(cents)), key=lambda j: (cents[j], j))
        cents[i] += 1
    while sum(cents) > units:
        i = max(range(len(cents)), key=lambda j: (cents[j], -j))
        cents[i] -= 1
    return cents


@given(
    weights=st.lists(
        st.lists(st.floats(0.0, 1.0), min_size=5, max_size=5).filter(lambda w: sum(w) > 1e-3),
        min_size=1,
        max_size=8,
    )
)
def test_quantise_matches_reference_loop(weights):
    probs = torch.tensor(weights, dtype=torch.float64)
    probs = probs / probs.sum(-1, keepdim=True)
    probs = probs.clamp_min(0.05)
    probs = probs / probs.sum(-1, keepdim=True)
    cents = quantise_rows(probs)
    assert torch.all(cents.sum(-1) == 100)
    assert cents.min() >= 5
    # Rounding with ties is the only place the two could differ; ties are measure-zero here.
    assert cents.tolist() == [_reference_quantise(row) for row in probs.tolist()]


def test_quantise_hand_examples():
    # 33 + 33 + 33 = 99: add 1 to the smallest, first index on ties.
    assert quantise_rows(torch.tensor([[0.333, 0.333, 0.334]])).tolist() == [[34, 33, 33]]
    # 0 is raised to 5, so 5 + 100 = 105: take 5 from the largest.
    assert quantise_rows(torch.tensor([[0.004, 0.996]])).tolist() == [[5, 95]]
    # 26 + 26 + 26 + 23 = 101: take 1 from the largest, first index on ties.
    assert quantise_rows(torch.tensor([[0.256, 0.256, 0.256, 0.232]])).tolist() == [
        [25, 26, 26, 23]
    ]
    # A coarser grid: quarters, floor 0.25 on a width of 4 forces the uniform row.
    assert quantise_rows(torch.tensor([[0.7, 0.1, 0.1, 0.1]]), floor=0.25, grid=0.25).tolist() == [
        [1, 1, 1, 1]
    ]


@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=10)
def test_generator_determinism(seed):
    task = HMMFiltering(n_states=3, n_symbols=4, n_steps=6)
    first = task.sample(8, generator=torch.Generator().manual_seed(seed))
    second = task.sample(8, generator=torch.Generator().manual_seed(seed))
    for name in ("tokens", "labels", "posterior", "transition_cents", "predicted_probs"):
        assert torch.equal(getattr(first, name), getattr(second, name))


def test_to_keeps_every_field():
    batch = HMMFiltering(n_steps=3).sample(2, generator=torch.Generator().manual_seed(0))
    moved = batch.to("cpu")
    assert isinstance(moved, HMMBatch)
    assert torch.equal(moved.emission_cents, batch.emission_cents)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_states": 0}, r"HMMFiltering\.n_states must be an int >= 1"),
        ({"n_symbols": 1.0}, r"HMMFiltering\.n_symbols must be an int >= 1"),
        ({"n_steps": -1}, r"HMMFiltering\.n_steps must be an int >= 1"),
        ({"floor": 0.0}, r"HMMFiltering\.floor must be a number in \(0\.0, 1\.0\]"),
        ({"grid": 1.5}, r"HMMFiltering\.grid must be a number in \(0\.0, 1\.0\]"),
        ({"grid": 0.03}, r"HMMFiltering\.grid must be 1/n for an integer n"),
        ({"floor": 0.055}, r"HMMFiltering\.floor must be a multiple of grid=0\.01"),
        ({"floor": 0.3}, r"HMMFiltering\.floor must be <= 1/max\(n_states, n_symbols\) = 1/5"),
        ({"n_states": 3, "n_symbols": 21}, r"HMMFiltering\.floor must be <= .* = 1/21"),
        ({"n_states": 0, "floor": 2.0}, r"2 problems in HMMFiltering"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HMMFiltering(**kwargs)


def test_floor_times_width_equal_to_one_is_allowed():
    batch = HMMFiltering(n_states=20, n_symbols=2, n_steps=2).sample(
        3, generator=torch.Generator().manual_seed(0)
    )
    assert torch.all(batch.transition_cents == 5)


def test_batch_size_error():
    with pytest.raises(ValueError, match=r"HMMFiltering\.sample\.batch_size must be an int >= 1"):
        HMMFiltering().sample(0, generator=torch.Generator())


@pytest.mark.parametrize(
    "shapes,match",
    [
        (((2, 3, 4), (2, 3, 5), (2, 4)), r"hmm_posterior: transition_cents must be .*\[batch, "),
        (((2, 3, 3), (2, 4, 5), (2, 4)), r"emission_cents must be .* = \[2, 3, n_symbols\]"),
        (((2, 3, 3), (2, 3, 5), (3, 4)), r"observations must be a long tensor .* = \[2, n_steps\]"),
        (((2, 3, 3), (2, 3, 5), (2, 4, 1)), r"observations must be"),
    ],
)
def test_hmm_posterior_shape_errors(shapes, match):
    transition, emission, observations = shapes
    with pytest.raises(ValueError, match=match):
        hmm_posterior(
            torch.full(transition, 30), torch.full(emission, 20), torch.zeros(observations).long()
        )


def test_hmm_posterior_symbol_range_error():
    with pytest.raises(ValueError, match=r"observations must be .* symbols in 0\.\.1"):
        hmm_posterior(torch.full((1, 2, 2), 50), torch.full((1, 2, 2), 50), torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match=r"observations must be"):
        hmm_posterior(
            torch.full((1, 2, 2), 50), torch.full((1, 2, 2), 50), torch.tensor([[0.0, 1.0]])
        )


def test_quantise_errors():
    with pytest.raises(ValueError, match=r"quantise_rows: probs must be a floating-point tensor"):
        quantise_rows(torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match=r"quantise_rows\.floor must be <= 1/width = 1/25"):
        quantise_rows(torch.full((1, 25), 0.04))


def _assert_filtered_as_enumerated(beliefs, transition, emission, observations):
    """Sequence 0's filtered beliefs equal path enumeration at every step, to 1e-15."""
    for t in range(1, len(observations) + 1):
        expected = _path_marginal(transition, emission, observations[:t], t)
        torch.testing.assert_close(
            beliefs.filtered_probs[0, t - 1],
            torch.tensor(expected, dtype=torch.float64),
            rtol=0,
            atol=1e-15,
        )


def test_zero_cents_stay_in_probability_space():
    # No transition enters state 1, so after the first step every belief in it is exactly 0.
    # Zero is exact in probability space: the recursion keeps it (issue 18) instead of
    # declining, and gives the enumeration's beliefs with the exact zeros.
    transition = [[100, 0], [100, 0]]
    emission = [[20, 80], [60, 40]]
    observations = [1, 0, 0, 1]
    args = (torch.tensor([transition]), torch.tensor([emission]), torch.tensor([observations]))
    trans_probs = args[0].double().permute(1, 2, 0) / 100
    lik = (args[1].double() / 100)[0].T[args[2][0]].unsqueeze(-1)  # [n_steps, S, 1]
    direct = _probability_filter(0.5, trans_probs, lik, n_predicted=5, with_norms=False)
    assert direct is not None
    beliefs = hmm_posterior(*args)
    torch.testing.assert_close(
        direct.filtered_probs.permute(2, 0, 1), beliefs.filtered_probs, rtol=0, atol=0
    )
    exact = _log_space_posterior(args[0].double() / 100, args[1].double() / 100, args[2])
    for name in ("filtered_probs", "predicted_probs", "next_state_probs"):
        torch.testing.assert_close(getattr(beliefs, name), getattr(exact, name), rtol=0, atol=1e-15)
    _assert_filtered_as_enumerated(beliefs, transition, emission, observations)
    assert torch.all(beliefs.next_state_probs[0, :, 1] == 0)
    assert torch.all(beliefs.filtered_probs[0, 1:, 1] == 0)


def test_long_sequences_match_the_log_space_posterior():
    # 1,000 steps: the joint probability of the observations is ~1e-600, far below float64,
    # so this exercises the rescaling of the probability-space recursion.
    task = HMMFiltering(n_steps=1000)
    batch = task.sample(4, generator=torch.Generator().manual_seed(5))
    args = (batch.transition_cents, batch.emission_cents, batch.observations)
    # The time-major inputs hmm_posterior builds: the probability path must accept them.
    trans_probs = args[0].double().permute(1, 2, 0) / 100  # [from, to, batch]
    index = args[2].T.unsqueeze(1).expand(1000, 5, 4)
    lik = (args[1].double() / 100).permute(2, 1, 0).gather(0, index)  # [n_steps, S, batch]
    result = _probability_filter(0.2, trans_probs, lik, n_predicted=1001, with_norms=False)
    assert result is not None
    fast = hmm_posterior(*args)
    exact = _log_space_posterior(args[0].double() / 100, args[1].double() / 100, args[2])
    for name in ("filtered_probs", "predicted_probs", "next_state_probs"):
        torch.testing.assert_close(getattr(fast, name), getattr(exact, name), rtol=0, atol=1e-12)


@given(hmm=_hmms(), window=st.integers(1, 7))
@settings(max_examples=40)
def test_windowed_posterior_equals_enumeration_over_the_window(hmm, window):
    # At step t the belief conditions on o_{t-w+1..t} only, from a uniform state at the window's
    # first observation: enumerate the state paths of the window alone.
    transition, emission, observations = hmm
    beliefs = windowed_posterior(
        torch.tensor([transition]),
        torch.tensor([emission]),
        torch.tensor([observations]),
        window=window,
    )
    assert beliefs.shape == (1, len(observations), len(transition))
    for t in range(len(observations)):
        seen = observations[max(0, t - window + 1) : t + 1]
        expected = _path_marginal(transition, emission, seen, len(seen))
        assert beliefs[0, t].tolist() == pytest.approx(expected, abs=1e-12)


@given(hmm=_hmms(), window=st.integers(1, 6))
@settings(max_examples=40)
def test_transported_windowed_posterior_equals_enumeration(hmm, window):
    # Past the first `window` steps, the window starts one transition after a uniform state that
    # emitted nothing: enumerate paths over that hidden state and the window's states.
    transition, emission, observations = hmm
    n_states = len(transition)
    beliefs = windowed_posterior(
        torch.tensor([transition]), torch.tensor([emission]), torch.tensor([observations]),
        window=window, transported=True,
    )
    for t in range(len(observations)):
        if t < window:
            expected = _path_marginal(transition, emission, observations[: t + 1], t + 1)
        else:
            seen = observations[t - window + 1 : t + 1]
            expected = [0.0] * n_states
            for path in itertools.product(range(n_states), repeat=window + 1):
                weight = 1.0 / n_states
                for j in range(1, window + 1):
                    weight *= transition[path[j - 1]][path[j]] / 100 * emission[path[j]][seen[j - 1]] / 100
                expected[path[-1]] += weight
            expected = [e / sum(expected) for e in expected]
        assert beliefs[0, t].tolist() == pytest.approx(expected, abs=1e-12)


def test_windowed_posterior_ends_of_the_ladder():
    batch = HMMFiltering(n_steps=12).sample(64, generator=torch.Generator().manual_seed(5))
    args = (batch.transition_cents, batch.emission_cents, batch.observations)
    exact = hmm_posterior(*args).filtered_probs
    # A window as long as the sequence is the exact filter.
    torch.testing.assert_close(windowed_posterior(*args, window=12), exact, rtol=0, atol=1e-15)
    # Window 1: the normalised observed column of E.
    column = batch.emission_cents.double().gather(
        -1, batch.observations.unsqueeze(1).expand(-1, 5, -1)
    ).transpose(1, 2)
    torch.testing.assert_close(
        windowed_posterior(*args, window=1), column / column.sum(-1, keepdim=True),
        rtol=0, atol=1e-15,
    )
    # A shorter memory is a different belief past the window.
    assert (windowed_posterior(*args, window=3)[:, 3:] - exact[:, 3:]).abs().max() > 1e-3
    # Transported window 1: (uᵀT) ⊙ E[:, o_t] from step 2 on; the exact filter at step 1.
    memoryless = batch.transition_cents.double().mean(1, keepdim=True) * column
    memoryless = memoryless / memoryless.sum(-1, keepdim=True)
    got = windowed_posterior(*args, window=1, transported=True)
    torch.testing.assert_close(got[:, 1:], memoryless[:, 1:], rtol=0, atol=1e-15)
    torch.testing.assert_close(got[:, :1], exact[:, :1], rtol=0, atol=1e-15)
    torch.testing.assert_close(windowed_posterior(*args, window=12, transported=True), exact, rtol=0, atol=1e-15)


@pytest.mark.parametrize("window", [0, -1, 2.0, True])
def test_windowed_posterior_window_error(window):
    batch = HMMFiltering(n_steps=4).sample(2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="window"):
        windowed_posterior(
            batch.transition_cents, batch.emission_cents, batch.observations, window=window
        )
    with pytest.raises(ValueError, match="transported"):
        windowed_posterior(
            batch.transition_cents, batch.emission_cents, batch.observations, window=2, transported=1
        )


def _grid_hmms_with_zeros(batch, n_states, n_symbols, n_steps, generator):
    """Random grid HMMs whose rows may hold zero cents, with observations drawn from each model
    (so every one has a posterior): (transition, emission, observations) long tensors."""

    def rows(width):
        # Exponential draws to the 4th power: rows more uneven than Dirichlet(1), zeros common.
        draws = torch.log1p(-torch.rand(batch, n_states, width, generator=generator)) ** 4
        return quantise_rows(draws / draws.sum(-1, keepdim=True), floor=0.0, grid=0.01)

    transition, emission = rows(n_states), rows(n_symbols)
    observations = torch.empty(batch, n_steps, dtype=torch.long)
    rows_of = torch.arange(batch)
    state = torch.randint(n_states, (batch,), generator=generator)
    for t in range(n_steps):
        if t > 0:
            state = torch.multinomial(transition[rows_of, state].double(), 1, generator=generator)
            state = state[:, 0]
        symbol = torch.multinomial(emission[rows_of, state].double(), 1, generator=generator)
        observations[:, t] = symbol[:, 0]
    return transition, emission, observations


def test_blocks_of_sequences_match_one_block_and_the_log_space_posterior(monkeypatch):
    # The recursion runs over blocks of _BLOCK_COLUMNS sequences; with blocks of 3 over 8
    # sequences (the last one partial) every belief must be the one-block result bit for bit,
    # and agree with the log-space recursion. Zero cents included.
    from windtunnel.tasks import filtering

    args = _grid_hmms_with_zeros(8, 4, 3, 12, torch.Generator().manual_seed(11))
    assert (args[0] == 0).any() and (args[1] == 0).any()
    whole = hmm_posterior(*args)
    monkeypatch.setattr(filtering, "_BLOCK_COLUMNS", 3)
    blocked = hmm_posterior(*args)
    assert _probability_filter(0.25, *_time_major(*args), n_predicted=13, with_norms=False)
    exact = _log_space_posterior(args[0].double() / 100, args[1].double() / 100, args[2])
    for name in ("filtered_probs", "predicted_probs", "next_state_probs"):
        assert torch.equal(getattr(blocked, name), getattr(whole, name))
        torch.testing.assert_close(getattr(blocked, name), getattr(exact, name), rtol=0, atol=1e-12)


def test_beliefs_below_the_smallest_normal_float_fall_back_to_log_space():
    # State 0 emits symbol 0 with probability 1e-152 and never leaves; state 1 emits it with 0.5.
    # After three 0s the belief in state 0 is ~1e-456: its products underflow in float64, so the
    # probability-space recursion must decline, and the log-space one gives the beliefs.
    transition = [[100.0, 0.0], [0.0, 100.0]]
    emission = [[1e-150, 100.0 - 1e-150], [50.0, 50.0]]
    observations = [0, 0, 0, 1]
    args = (
        torch.tensor([transition], dtype=torch.float64),
        torch.tensor([emission], dtype=torch.float64),
        torch.tensor([observations]),
    )
    assert _probability_filter(0.5, *_time_major(*args), n_predicted=5, with_norms=False) is None
    beliefs = hmm_posterior(*args)
    exact = _log_space_posterior(args[0].double() / 100, args[1].double() / 100, args[2])
    for name in ("filtered_probs", "predicted_probs", "next_state_probs"):
        assert torch.equal(getattr(beliefs, name), getattr(exact, name))
    assert beliefs.filtered_probs[0, 0, 0].item() == pytest.approx(2e-152, rel=1e-12)
    _assert_filtered_as_enumerated(beliefs, transition, emission, observations)


def test_probability_filter_reads_likelihoods_from_the_emission_and_observations():
    # The mode hmm_posterior uses: each block gathers its likelihoods from E and the symbols, in
    # grid units divided as read, and finds the smallest factor itself when not told: the same
    # beliefs as from likelihoods gathered beforehand.
    args = _grid_hmms_with_zeros(5, 3, 4, 9, torch.Generator().manual_seed(2))
    gathered = _probability_filter(1 / 3, *_time_major(*args), n_predicted=10, with_norms=False)
    lik = torch.empty(9, 3, 5, dtype=torch.float64)
    read = _probability_filter(
        1 / 3,
        args[0].permute(1, 2, 0),
        lik,
        n_predicted=10,
        with_norms=False,
        emission=args[1].permute(2, 1, 0),
        observations=args[2].T,
        divisor=100,
    )
    assert gathered is not None and read is not None
    assert torch.equal(read.filtered_probs, gathered.filtered_probs)
    assert torch.equal(read.predicted_probs, gathered.predicted_probs)
