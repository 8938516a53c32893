"""Test-suite settings: stricter than users.

Warnings are errors (pyproject), deterministic algorithms are on, and hypothesis runs a
derandomized profile so that any failure reproduces.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# cuBLAS is deterministic only with a fixed workspace; without it, deterministic mode makes every
# CUDA matmul raise. Set before any CUDA context exists (the gpu-marked tests).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
torch.use_deterministic_algorithms(True)


@pytest.fixture(autouse=True)
def _global_rng_untouched():
    """Library code must never touch the global RNG: every test checks that it is unchanged."""
    before = torch.random.get_rng_state().clone()
    yield
    after = torch.random.get_rng_state()
    assert torch.equal(before, after), "the global torch RNG state changed during the test"
