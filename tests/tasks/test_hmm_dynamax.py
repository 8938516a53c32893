"""hmm_posterior against dynamax's HMM filter, the peer a user would otherwise pick (issue 18).

Optional: skipped unless JAX and dynamax are installed (they are not dependencies of windtunnel;
``benchmarks/posteriors.py`` times the two side by side). Path enumeration stays the reference
(tests/tasks/test_hmm.py); this checks that both agree on the beliefs they both report.
"""

import warnings

import pytest
import torch

with warnings.catch_warnings():
    # dynamax and its dependencies warn about deprecated JAX names on import.
    warnings.simplefilter("ignore")
    jax = pytest.importorskip("jax")
    pytest.importorskip("dynamax")
    from dynamax.hidden_markov_model import hmm_filter

from test_hmm import _grid_hmms_with_zeros  # noqa: E402  (tests/tasks is on sys.path)

from windtunnel.tasks import HMMFiltering, hmm_posterior  # noqa: E402


def _dynamax_beliefs(transition_cents, emission_cents, observations, units=100):
    """(filtered, predicted) float64 [batch, n_steps, S] from dynamax's hmm_filter, vmapped."""
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    n_states = transition_cents.shape[-1]
    trans = jnp.asarray(transition_cents.double().numpy()) / units
    emit = jnp.asarray(emission_cents.double().numpy()) / units
    obs = jnp.asarray(observations.numpy())
    # log p(o_t | s) per sequence, [batch, n_steps, S]; log 0 = -inf for a zero cent.
    log_lik = jnp.log(jnp.take_along_axis(emit, obs[:, None, :].repeat(n_states, 1), 2))
    initial = jnp.full(n_states, 1.0 / n_states)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = jax.vmap(hmm_filter, in_axes=(None, 0, 0))(
            initial, trans, log_lik.transpose(0, 2, 1)
        )
    return (
        torch.from_numpy(jax.device_get(post.filtered_probs).copy()),
        torch.from_numpy(jax.device_get(post.predicted_probs).copy()),
    )


@pytest.mark.parametrize("zeros", [False, True], ids=["no-zero-rows", "zero-cents"])
def test_hmm_posterior_agrees_with_dynamax(zeros):
    generator = torch.Generator().manual_seed(18)
    if zeros:
        args = _grid_hmms_with_zeros(200, 5, 5, 50, generator)
        assert (args[0] == 0).any() and (args[1] == 0).any()
    else:
        batch = HMMFiltering(n_steps=50).sample(200, generator=generator)
        args = (batch.transition_cents, batch.emission_cents, batch.observations)
    beliefs = hmm_posterior(*args)
    filtered, predicted = _dynamax_beliefs(*args)
    assert filtered.dtype == torch.float64
    torch.testing.assert_close(beliefs.filtered_probs, filtered, rtol=0, atol=1e-12)
    torch.testing.assert_close(beliefs.predicted_probs, predicted, rtol=0, atol=1e-12)
