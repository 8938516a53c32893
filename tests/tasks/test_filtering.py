"""The shared log-space forward filter against enumeration of every state path."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from windtunnel.tasks import entropy_bits, forward_filter


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
        result.log_filtered_probs.exp(), torch.tensor(filtered, dtype=torch.float64),
        rtol=0, atol=1e-12,
    )
    torch.testing.assert_close(
        result.log_predicted_probs.exp(), torch.tensor(predicted, dtype=torch.float64),
        rtol=0, atol=1e-12,
    )
    assert result.log_evidence_nats.item() == pytest.approx(log_evidence, rel=1e-12, abs=1e-12)


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
