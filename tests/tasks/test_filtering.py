"""The shared log-space forward filter against enumeration of every state path."""

import itertools
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from windtunnel.tasks import entropy_bits, forward_filter
from windtunnel.tasks.filtering import _log_space_filter, _scaled_filter


def _enumerate(initial, transition, likelihoods):
    """Filtered p(z_t | x_1:t), predicted p(z_t | x_1:t-1) and log p(x_1:T) from all paths.

    Plain Python floats over probabilities (not logs): initial [S], transition [S][S],
    likelihoods [T][S].
    """
    n_states = len(initial)
    n_steps = len(likelihoods)
    filtered, predicted = [], []
    evidence = None
    for t in range(1, n_steps + 1):
        joint_obs = [0.0] * n_states  # sum over paths of length t with x_1..x_t
        joint_prev = [0.0] * n_states  # ... with x_1..x_{t-1} only
        for path in itertools.product(range(n_states), repeat=t):
            weight = initial[path[0]]
            for i in range(1, t):
                weight *= transition[path[i - 1]][path[i]]
            for i in range(t - 1):
                weight *= likelihoods[i][path[i]]
            joint_prev[path[-1]] += weight
            joint_obs[path[-1]] += weight * likelihoods[t - 1][path[-1]]
        filtered.append([w / sum(joint_obs) for w in joint_obs])
        predicted.append([w / sum(joint_prev) for w in joint_prev])
        evidence = sum(joint_obs)
    return filtered, predicted, math.log(evidence)


def _stochastic(draw, rows, cols):
    weights = draw(
        st.lists(
            st.lists(st.floats(0.01, 1.0), min_size=cols, max_size=cols),
            min_size=rows,
            max_size=rows,
        )
    )
    return [[w / sum(row) for w in row] for row in weights]


@st.composite
def _models(draw):
    n_states = draw(st.integers(1, 4))
    n_steps = draw(st.integers(1, 6))
    initial = _stochastic(draw, 1, n_states)[0]
    transition = _stochastic(draw, n_states, n_states)
    likelihoods = draw(
        st.lists(
            st.lists(st.floats(1e-3, 3.0), min_size=n_states, max_size=n_states),
            min_size=n_steps,
            max_size=n_steps,
        )
    )
    return initial, transition, likelihoods


@given(model=_models())
@settings(max_examples=50)
def test_filter_equals_path_enumeration(model):
    initial, transition, likelihoods = model
    result = forward_filter(
        torch.tensor(initial, dtype=torch.float64).log(),
        torch.tensor(transition, dtype=torch.float64).log(),
        torch.tensor(likelihoods, dtype=torch.float64).log(),
    )
    filtered, predicted, log_evidence = _enumerate(initial, transition, likelihoods)
    # float64; at most 4^6 paths of 6-term products, so errors stay within ~1e3 ulps of 1.
    torch.testing.assert_close(
        result.log_filtered_probs.exp(),
        torch.tensor(filtered, dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )
    torch.testing.assert_close(
        result.log_predicted_probs.exp(),
        torch.tensor(predicted, dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )
    assert result.log_evidence_nats.item() == pytest.approx(log_evidence, rel=1e-12, abs=1e-12)


def _enumerate_log(log_initial, log_transition, log_likelihoods):
    """Log filtered probabilities by enumeration: path log-weights summed with a max shift."""
    n_states, n_steps = len(log_initial), len(log_likelihoods)
    out = []
    for t in range(1, n_steps + 1):
        per_state = [[] for _ in range(n_states)]
        for path in itertools.product(range(n_states), repeat=t):
            terms = [
                log_initial[path[0]],
                *(log_transition[path[i - 1]][path[i]] for i in range(1, t)),
            ]
            terms += [log_likelihoods[i][path[i]] for i in range(t)]
            per_state[path[-1]].append(math.fsum(terms))
        logs = []
        for values in per_state:
            top = max(values)
            logs.append(
                -math.inf
                if top == -math.inf
                else top + math.log(math.fsum(math.exp(v - top) for v in values))
            )
        top = max(logs)
        total = top + math.log(math.fsum(math.exp(v - top) for v in logs))
        out.append([v - total for v in logs])
    return out


def test_extreme_likelihoods_fall_back_to_log_space():
    # Likelihood ratios of e^-2000 push some filtered probabilities far below the smallest
    # float64, which the scaled recursion cannot represent: it must decline, and the result
    # must still match log-domain enumeration (including log-probabilities near -2000).
    log_initial = [math.log(0.5), math.log(0.5)]
    log_transition = [[math.log(0.9), math.log(0.1)], [math.log(0.2), math.log(0.8)]]
    log_likelihoods = [[0.0, -2000.0], [-1500.0, 0.0], [0.0, -10.0], [-3.0, -1.0]]
    args = [
        torch.tensor(x, dtype=torch.float64) for x in (log_initial, log_transition, log_likelihoods)
    ]
    assert _scaled_filter(*args) is None
    result = forward_filter(*args)
    expected = torch.tensor(
        _enumerate_log(log_initial, log_transition, log_likelihoods), dtype=torch.float64
    )
    torch.testing.assert_close(result.log_filtered_probs, expected, rtol=1e-12, atol=1e-10)
    assert result.log_filtered_probs[0, 1].item() == pytest.approx(-2000.0, abs=1e-9)


def test_structural_zeros_stay_in_probability_space():
    # A transition that cannot leave state 0 gives exact zeros: log-probability -inf. Zero is
    # exact in probability space, so the scaled recursion keeps them (issue 18) and must give
    # the enumeration's values, exact zeros included, as the log-space recursion does.
    initial = [1.0, 0.0, 0.0]
    transition = [[1.0, 0.0, 0.0], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8]]
    likelihoods = [[0.5, 0.2, 0.9], [0.1, 0.7, 0.7], [0.3, 0.3, 0.3]]
    args = [torch.tensor(x, dtype=torch.float64).log() for x in (initial, transition, likelihoods)]
    scaled = _scaled_filter(*args)
    _assert_same_filter(scaled, _log_space_filter(*args), atol=1e-15)
    result = forward_filter(*args)
    filtered, _, log_evidence = _enumerate(initial, transition, likelihoods)
    torch.testing.assert_close(
        result.log_filtered_probs.exp(),
        torch.tensor(filtered, dtype=torch.float64),
        rtol=0,
        atol=1e-15,
    )
    assert torch.all(result.log_filtered_probs[:, 1:] == -math.inf)
    assert result.log_evidence_nats.item() == pytest.approx(log_evidence, rel=1e-14)


@st.composite
def _models_with_zeros(draw):
    """As ``_models``, with some initial, transition and likelihood entries set to exactly 0.

    Initial and transition rows stay distributions (renormalised; a row left all zero keeps its
    original entries), as the enumeration assumes.
    """
    initial, transition, likelihoods = draw(_models())

    def zero_some(row, normalise):
        mask = draw(st.lists(st.booleans(), min_size=len(row), max_size=len(row)))
        kept = [0.0 if m else x for x, m in zip(row, mask)]
        if not normalise:
            return kept
        return [x / sum(kept) for x in kept] if sum(kept) > 0 else row

    return (
        zero_some(initial, True),
        [zero_some(row, True) for row in transition],
        [zero_some(row, False) for row in likelihoods],
    )


@given(model=_models_with_zeros())
@settings(max_examples=60)
def test_zero_probabilities_stay_in_probability_space(model):
    # Zero entries anywhere (log -inf) are exact in probability space: the scaled recursion must
    # accept them (issue 18) and give the enumeration's beliefs and evidence, zeros included.
    initial, transition, likelihoods = model
    args = [torch.tensor(x, dtype=torch.float64).log() for x in (initial, transition, likelihoods)]
    exact = _log_space_filter(*args)
    assume(bool(torch.isfinite(exact.log_evidence_nats)))  # else no posterior exists
    scaled = _scaled_filter(*args)
    _assert_same_filter(scaled, exact, atol=1e-12)
    filtered, predicted, log_evidence = _enumerate(initial, transition, likelihoods)
    result = forward_filter(*args)
    for name, expected in (("log_filtered_probs", filtered), ("log_predicted_probs", predicted)):
        torch.testing.assert_close(
            getattr(result, name).exp(),
            torch.tensor(expected, dtype=torch.float64),
            rtol=0,
            atol=1e-12,
        )
    assert result.log_evidence_nats.item() == pytest.approx(log_evidence, rel=1e-12, abs=1e-12)


def _assert_same_filter(scaled, exact, *, atol):
    """The scaled path ran (not None) and agrees with the log-space recursion in every field."""
    assert scaled is not None
    for name in ("log_filtered_probs", "log_predicted_probs", "log_evidence_nats"):
        torch.testing.assert_close(
            getattr(scaled, name), getattr(exact, name), rtol=1e-12, atol=atol
        )


@given(seed=st.integers(0, 2**31 - 1), n_states=st.integers(1, 40), n_steps=st.integers(1, 8))
@settings(max_examples=25)
def test_scaled_and_log_space_recursions_agree(seed, n_states, n_steps):
    # Covers both transition kernels of the scaled path (broadcast up to 32 states, einsum above).
    gen = torch.Generator().manual_seed(seed)
    log_init = torch.log_softmax(torch.randn(n_states, generator=gen, dtype=torch.float64), -1)
    log_trans = torch.log_softmax(
        2 * torch.randn(3, n_states, n_states, generator=gen, dtype=torch.float64), -1
    )
    log_lik = 4 * torch.randn(3, n_steps, n_states, generator=gen, dtype=torch.float64)
    scaled = _scaled_filter(log_init.expand(3, n_states), log_trans, log_lik)
    exact = _log_space_filter(log_init.expand(3, n_states), log_trans, log_lik)
    _assert_same_filter(scaled, exact, atol=1e-12)


def test_gradients_use_the_log_space_recursion():
    # With requires_grad the filter stays differentiable; d log p(x_1:T) / d log_lik[T] is the
    # last filtered distribution (the derivative of a log-normaliser).
    gen = torch.Generator().manual_seed(1)
    log_init = torch.log_softmax(torch.randn(3, generator=gen, dtype=torch.float64), -1)
    log_trans = torch.log_softmax(torch.randn(3, 3, generator=gen, dtype=torch.float64), -1)
    log_lik = torch.randn(4, 3, generator=gen, dtype=torch.float64).requires_grad_()
    result = forward_filter(log_init, log_trans, log_lik)
    (grad,) = torch.autograd.grad(result.log_evidence_nats, log_lik)
    torch.testing.assert_close(grad[-1], result.log_filtered_probs[-1].detach().exp())


def test_leading_dimensions_broadcast():
    gen = torch.Generator().manual_seed(0)
    log_init = torch.log_softmax(torch.randn(3, generator=gen, dtype=torch.float64), -1)
    log_trans = torch.log_softmax(torch.randn(4, 3, 3, generator=gen, dtype=torch.float64), -1)
    log_lik = torch.randn(2, 4, 5, 3, generator=gen, dtype=torch.float64)
    batched = forward_filter(log_init, log_trans, log_lik)
    assert batched.log_filtered_probs.shape == (2, 4, 5, 3)
    for a in range(2):
        for b in range(4):
            single = forward_filter(log_init, log_trans[b], log_lik[a, b])
            torch.testing.assert_close(
                batched.log_filtered_probs[a, b], single.log_filtered_probs, rtol=0, atol=1e-14
            )
            torch.testing.assert_close(
                batched.log_evidence_nats[a, b], single.log_evidence_nats, rtol=0, atol=1e-12
            )


def test_entropy_bits_hand_values():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25] * 4, [1.0, 0.0, 0.0, 0.0]])
    assert entropy_bits(probs).tolist() == [1.0, 2.0, 0.0]


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(3, dtype=torch.long), torch.zeros(3, 3), torch.zeros(2, 3)), "log_initial"),
        ((torch.zeros(3), torch.zeros(3), torch.zeros(2, 3)), "log_transition"),
        ((torch.zeros(3), torch.zeros(3, 3), torch.zeros(3)), "log_likelihoods"),
        ((torch.zeros(2), torch.zeros(3, 3), torch.zeros(2, 3)), "state sizes must agree"),
        ((torch.zeros(3), torch.zeros(3, 2), torch.zeros(2, 3)), "state sizes must agree"),
    ],
)
def test_errors(args, match):
    with pytest.raises(ValueError, match=match):
        forward_filter(*args)


def test_long_sequences_rescale_instead_of_underflowing():
    # The joint probability of the observations shrinks ~100x per step, to ~1e-4000 after 2,000
    # steps: far below float64 without the periodic rescaling. The filtered beliefs themselves
    # stay near (0.9, 0.1), so the probability-space path must accept and match the log space.
    n_steps = 2000
    log_init = torch.tensor([0.5, 0.5], dtype=torch.float64).log()
    log_trans = torch.tensor([[0.01, 0.99], [0.01, 0.99]], dtype=torch.float64).log()
    log_lik = torch.tensor([[0.0, math.log(1e-3)]], dtype=torch.float64).expand(n_steps, 2)
    scaled = _scaled_filter(log_init, log_trans, log_lik)
    exact = _log_space_filter(log_init, log_trans, log_lik)
    assert exact.log_evidence_nats.item() < -9000
    _assert_same_filter(scaled, exact, atol=1e-11)


@given(
    seed=st.integers(0, 2**31 - 1),
    init_scale=st.sampled_from([1e-3, 1.0, 1e3]),
    trans_scale=st.sampled_from([0.5, 1.0, 3.0]),
)
@settings(max_examples=20)
def test_unnormalised_inputs_keep_their_semantics(seed, init_scale, trans_scale):
    # Initial vectors and transition rows that do not sum to 1 are used as given, as in the
    # log-space recursion: predicted_1 is the initial vector, predicted_t+1 = filtered_t @ T.
    gen = torch.Generator().manual_seed(seed)
    log_init = torch.randn(4, generator=gen, dtype=torch.float64) + math.log(init_scale)
    log_trans = torch.log_softmax(torch.randn(2, 4, 4, generator=gen, dtype=torch.float64), -1)
    log_trans = log_trans + math.log(trans_scale)
    log_lik = 3 * torch.randn(2, 12, 4, generator=gen, dtype=torch.float64)
    scaled = _scaled_filter(log_init.expand(2, 4), log_trans, log_lik)
    exact = _log_space_filter(log_init.expand(2, 4), log_trans, log_lik)
    _assert_same_filter(scaled, exact, atol=1e-12)


def test_inputs_are_not_modified():
    # With one sequence the time-major layouts are views of the inputs; nothing may write there.
    gen = torch.Generator().manual_seed(3)
    args = (
        torch.log_softmax(torch.randn(1, 3, generator=gen, dtype=torch.float64), -1),
        torch.log_softmax(torch.randn(1, 3, 3, generator=gen, dtype=torch.float64), -1),
        torch.randn(1, 6, 3, generator=gen, dtype=torch.float64),
    )
    copies = [x.clone() for x in args]
    forward_filter(*args)
    for x, copy in zip(args, copies):
        assert torch.equal(x, copy)
