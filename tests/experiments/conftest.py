"""Fixtures shared by the tests of windtunnel.experiments."""

import pytest

from tiny_runs import tiny_bijection
from windtunnel.experiments.telemetry import attach_probes
from windtunnel.train import Trainer


@pytest.fixture(scope="session")
def probed_run(tmp_path_factory):
    """A 30-step bijection TinyGPT run trained with the telemetry probes (snapshots, manifold)."""
    path = tmp_path_factory.mktemp("run")
    attach_probes(Trainer(tiny_bijection(), path), n_sequences=32).fit()
    return path
