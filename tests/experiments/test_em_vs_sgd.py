"""The em-vs-sgd runner: results structure, shared init, statistics, and the reference numbers."""

import json

import numpy as np
import pytest
import scipy.stats
import torch

from windtunnel._checks import ConfigError
from windtunnel.comparison import steps_to_threshold
from windtunnel.experiments.em_vs_sgd import EmVsSgdConfig, run_em_vs_sgd, total_steps
from windtunnel.models import SingleHeadAttention
from windtunnel.tasks import StickyMarkov

SHORT = StickyMarkov(seq_len=48)


@pytest.fixture(scope="module")
def small_results():
    config = EmVsSgdConfig(
        seeds=(42, 7),
        n_steps=6,
        arms=("sgd", "two_timescale", "em"),
        telemetry_every=3,
        law_check_len=16,
        task=SHORT,
    )
    steps = []
    results = run_em_vs_sgd(config, progress=steps.append)
    assert sum(steps) == total_steps(config) == 6
    return results


def test_results_have_the_documented_fields_and_serialise(small_results):
    r = small_results
    json.dumps(r, allow_nan=False)
    for key in (
        "config",
        "versions",
        "per_seed",
        "aggregate",
        "bayes_loss_nats",
        "conditional_entropy_nats",
    ):
        assert key in r
    assert [s["seed"] for s in r["per_seed"]] == [42, 7]
    for name in ("sgd", "two_timescale", "em"):
        agg = r["aggregate"][name]
        for key in (
            "final_loss_mean",
            "final_loss_std",
            "final_accuracy_mean",
            "steps_to_sgd_mean_final",
            "speedup_vs_sgd",
            "ttest_p_vs_sgd",
        ):
            assert key in agg
        assert len(agg["curve_mean"]) == 6
    assert r["aggregate"]["sgd"]["ttest_p_vs_sgd"] is None
    tel = r["per_seed"][0]["telemetry"]["em"]
    assert tel["step"] == [0, 3, 5] and len(tel["mean_abs_advantage"]) == 3
    assert len(r["law_checks"]) == 3 and max(c["residual"] for c in r["law_checks"]) < 1e-12
    # attention entropy can never exceed that of uniform causal attention, mean_i ln(i)
    uniform = sum(np.log(i) for i in range(1, 48)) / 47
    assert r["per_seed"][0]["uniform_attention_entropy_nats"] == pytest.approx(uniform)
    assert max(tel["attention_entropy_nats"]) <= uniform + 1e-6


def test_arms_of_a_seed_start_from_identical_weights_and_data(small_results):
    for seed in small_results["per_seed"]:
        first = {name: curve[0] for name, curve in seed["curves"].items()}
        assert len(set(first.values())) == 1, first
    # and the shared start is the seed's own reference initialisation on its own data
    batch = SHORT.sample(1, generator=torch.Generator().manual_seed(42), draw_order="reference")
    model = SingleHeadAttention()
    model.reset_parameters(torch.Generator().manual_seed(42))
    loss = model.exact_gradients(
        batch.inputs.unsqueeze(0), batch.targets.unsqueeze(0)
    ).loss_nats.item()
    assert small_results["per_seed"][0]["curves"]["sgd"][0] == pytest.approx(loss, abs=1e-6)


def test_aggregates_follow_from_the_per_seed_numbers(small_results):
    r = small_results
    sgd = np.array([s["arms"]["sgd"]["train"]["loss_nats"] for s in r["per_seed"]])
    em = np.array([s["arms"]["em"]["train"]["loss_nats"] for s in r["per_seed"]])
    agg = r["aggregate"]["em"]
    assert agg["final_loss_mean"] == pytest.approx(em.mean()) and agg[
        "final_loss_std"
    ] == pytest.approx(em.std())
    assert agg["ttest_p_vs_sgd"] == pytest.approx(scipy.stats.ttest_rel(em, sgd).pvalue)
    curves = [s["curves"]["em"] for s in r["per_seed"]]
    steps = [steps_to_threshold(np.array(c), sgd.mean()) for c in curves]
    assert agg["steps_to_sgd_mean_final"] == np.mean(steps)
    assert agg["speedup_vs_sgd"] == pytest.approx(6 / max(np.mean(steps), 1))
    bayes = np.mean([s["bayes"]["train"]["loss_nats"] for s in r["per_seed"]])
    assert r["bayes_loss_nats"] == pytest.approx(bayes)
    assert agg["gap_to_bayes_nats_mean"] == pytest.approx(
        (em - [s["bayes"]["train"]["loss_nats"] for s in r["per_seed"]]).mean()
    )


def test_independent_rng_mode_and_deep_model_run():
    config = EmVsSgdConfig(seeds=(1,), n_steps=2, rng="independent", telemetry_every=0, task=SHORT)
    r = run_em_vs_sgd(config)
    assert r["law_checks"] == [] and r["per_seed"][0]["telemetry"]["sgd"]["step"] == []
    assert "steps_to_sgd_mean_final" in r["aggregate"]["two_timescale"]
    deep = run_em_vs_sgd(EmVsSgdConfig(seeds=(1, 2), n_steps=2, model="deep", task=SHORT))
    assert (
        list(deep["aggregate"]) == ["deep_adamw"]
        and len(deep["per_seed"][1]["curves"]["deep_adamw"]) == 2
    )
    assert total_steps(EmVsSgdConfig(seeds=(1, 2), n_steps=3, model="deep")) == 6


def test_reference_data_and_init_give_the_spec_step_zero_loss():
    # docs/theory.md §4.4: the mean pre-update loss at step 0 over the five reference seeds is 2.0798.
    task = StickyMarkov()
    seeds = (42, 2024, 1337, 7777, 9999)
    batches = [
        task.sample(1, generator=torch.Generator().manual_seed(s), draw_order="reference")
        for s in seeds
    ]
    model = SingleHeadAttention(n_replicas=5)
    for r, s in enumerate(seeds):
        model.reset_parameters(torch.Generator().manual_seed(s), replicas=slice(r, r + 1))
    x = torch.stack([b.inputs for b in batches])
    y = torch.stack([b.targets for b in batches])
    assert round(model.exact_gradients(x, y).loss_nats.mean().item(), 4) == 2.0798
    bayes = [round(task.bayes_scores(b).loss_nats, 3) for b in batches]
    assert bayes == [1.841, 1.809, 1.820, 1.850, 1.828]  # docs/theory.md §4.3


@pytest.mark.slow
def test_seed_42_reproduces_the_reference_final_losses():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CLI's layout: one torch thread per replica-group worker
    try:
        r = run_em_vs_sgd(EmVsSgdConfig(seeds=(42,), telemetry_every=0, n_workers=2))
    finally:
        torch.set_num_threads(threads)
    assert round(r["per_seed"][0]["arms"]["sgd"]["train"]["loss_nats"], 4) == 2.0647
    assert round(r["per_seed"][0]["arms"]["two_timescale"]["train"]["loss_nats"], 4) == 1.9802


def test_bad_configs_raise():
    with pytest.raises(
        ValueError, match=r"EmVsSgdConfig.arms must be a non-empty tuple of distinct names"
    ):
        EmVsSgdConfig(arms=("sgd", "newton"))
    with pytest.raises(
        ValueError, match=r"EmVsSgdConfig.model must be one of 'single', 'deep'; got 'wide'"
    ):
        EmVsSgdConfig(model="wide")
    with pytest.raises(
        ValueError, match=r"EmVsSgdConfig.seeds must be a non-empty tuple of distinct ints"
    ):
        EmVsSgdConfig(seeds=(1, 1))
    with pytest.raises(ConfigError, match=r"3 problems in EmVsSgdConfig"):
        EmVsSgdConfig(n_steps=0, rng="global", lr=0.0)
