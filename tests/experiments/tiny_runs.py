"""Tiny experiments for the tests of windtunnel.experiments (a few steps, CPU)."""

from windtunnel.presets import apply_overrides, get_preset
from windtunnel.train import ExperimentConfig, TrainConfig

TINY = ["train.steps=30", "task.n_values=6", "task.n_pairs=5", "model.d_model=16", "model.d_mlp=32",
        "model.n_heads=2", "train.batch_size=16", "train.eval_size=64", "train.eval_batch_size=64",
        "train.eval_every=15", "train.checkpoint_every=15", "train.warmup_steps=5", "train.log_every=5",
        "train.device=cpu"]


def tiny_bijection(model="transformer"):
    """The bijection preset of ``model`` shrunk to 30 steps of a d_model = 16 model."""
    extra = TINY if model == "transformer" else [o for o in TINY if not o.startswith("model.n_heads")]
    return apply_overrides(get_preset("bijection", model, "cpu"), extra)


def tiny(task, model, task_kwargs, model_kwargs, **extra):
    """A preset builder (as in windtunnel.presets) of a 6-step run of ``task`` with ``model``."""
    def build():
        return ExperimentConfig(
            task_name=task, task=task_kwargs, model_name=model, model=model_kwargs,
            train=TrainConfig(steps=6, batch_size=8, warmup_steps=2, eval_every=3, eval_size=20,
                              eval_batch_size=10, log_every=2, checkpoint_every=3, device="cpu"),
            name=f"{task}/{model}/cpu", **extra,
        )
    return build
