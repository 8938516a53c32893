"""Config files (--config), the shipped recipes (windtunnel presets), one list syntax, --device, --quiet."""

import json
import tomllib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from windtunnel.cli import main
from windtunnel.experiments.sweep import plan_sweep
from windtunnel.presets import (
    apply_overrides,
    build_experiment,
    get_preset,
    load_recipe,
    preset_names,
    preset_toml,
    recipe_names,
)

FIXTURE = Path(__file__).parent / "fixtures" / "hmm_4l128_aux_shift_config.json"
# the command recorded in BENCHMARKS.md for the RESULTS.md 4L/4H/128 run
RECORDED = ["--preset", "cpu", "--steps", "60000", "--set", "model.n_layers=4", "--set", "model.d_model=128", "--set",
            "model.d_mlp=512", "--set", "train.aux_loss_weight=1.0", "--set", "train.position_shift=true", "--set",
            "train.eval_every=2000"]
TINY = ["--steps", "2", "--set", "model.n_layers=1", "--set", "model.d_model=16", "--set", "model.n_heads=2", "--set",
        "model.d_mlp=32", "--set", "train.eval_size=10", "--set", "train.warmup_steps=1", "--set", "task.n_values=5",
        "--set", "task.n_pairs=4", "--set", "train.batch_size=4"]


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _flags_to_overrides(flags):
    pairs = dict(zip(flags[::2], flags[1::2]))
    sets = [v for k, v in zip(flags[::2], flags[1::2]) if k == "--set"]
    return pairs, sets


# --- the best HMM recipe -------------------------------------------------------------------------


def test_the_fixture_is_the_config_the_cli_builds_for_the_recorded_command():
    pairs, sets = _flags_to_overrides(RECORDED)
    built = build_experiment("hmm", None, pairs["--preset"], overrides=sets, steps=int(pairs["--steps"]))
    assert built.to_dict() == json.loads(FIXTURE.read_text())


def test_the_shipped_best_hmm_recipe_builds_the_recorded_config():
    assert "hmm-4l128-aux-shift" in recipe_names()
    assert build_experiment("hmm", config="hmm-4l128-aux-shift").to_dict() == json.loads(FIXTURE.read_text())


def test_train_hmm_config_writes_the_recorded_config_json(tmp_path, monkeypatch):
    # the real command, stopped after the Trainer has claimed the run directory (config.json
    # written) and before the 60,000 steps
    import windtunnel.train as train

    def stop(self, **kwargs):
        raise ValueError("stopped before training")

    monkeypatch.setattr(train.Trainer, "fit", stop)
    out = tmp_path / "run"
    result = run(["train", "hmm", "--config", "hmm-4l128-aux-shift", "--out", out, "--quiet"])
    assert result.exit_code == 2 and "stopped before training" in result.output, result.output
    assert json.loads((out / "config.json").read_text()) == json.loads(FIXTURE.read_text())


@pytest.mark.slow
def test_train_hmm_config_trains_one_step_with_the_recorded_config(tmp_path):
    # one step instead of 60,000 (about 3 min on a busy 2-core machine, most of it the evaluation):
    # --steps is the only flag, and train.steps the only difference
    out = tmp_path / "run"
    result = run(["train", "hmm", "--config", "hmm-4l128-aux-shift", "--steps", 1, "--out", out, "--quiet"])
    assert result.exit_code == 0, result.output
    expected = json.loads(FIXTURE.read_text())
    expected["train"]["steps"] = 1
    assert json.loads((out / "config.json").read_text()) == expected


# --- precedence and the file's errors ---------------------------------------------------------


def _write(tmp_path, text, name="recipe.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_precedence_preset_then_file_then_flags(tmp_path):
    path = _write(tmp_path, "eval_lengths = [40]\n[recipe]\ntask = 'hmm'\n[train]\nlr = 5e-4\nsteps = 123\nbatch_size = 16\n"
                            "[model]\nn_layers = 2\n")
    preset = get_preset("hmm", "transformer", "cpu")
    built = build_experiment("hmm", config=str(path), overrides=["train.lr=7e-4"], steps=50, seed=3, device="cpu")
    assert built.train.lr == 7e-4 and built.train.steps == 50 and built.train.seed == 3 and built.train.device == "cpu"  # flags
    assert built.train.batch_size == 16 and built.model["n_layers"] == 2 and built.eval_lengths == (40,)  # the file
    assert built.train.warmup_steps == preset.train.warmup_steps and built.model["d_model"] == preset.model["d_model"]  # preset
    assert built.name == preset.name


def test_train_with_a_config_file_through_the_cli(tmp_path):
    path = _write(tmp_path, "[recipe]\ntask = 'bijection'\n[train]\nlr = 5e-4\nseed = 4\n")
    result = run(["train", "bijection", "--config", path, "--out", tmp_path / "run", *TINY, "--set", "train.lr=2e-4"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["lr"] == 2e-4 and config["train"]["seed"] == 4 and config["train"]["steps"] == 2
    assert f"config: {path}" in result.output


@pytest.mark.parametrize("text,needles", [
    ("[trian]\nlr = 1e-3\n", ["[trian] is not a section", "did you mean 'train'"]),
    ("[train]\nlrr = 1e-3\n", ["train.lrr is not a field of TrainConfig", "did you mean 'lr'"]),
    ("[train]\nlr = -1.0\n", ["TrainConfig.lr must be a number in (0.0, inf)", "got -1.0"]),
    ("[train]\nlr = 1e-3\n[model]\nn_layers = 'four'\n", ["n_layers", "'four'"]),
    ("[train\nlr = 1e-3\n", ["not valid TOML"]),
    ("[recipe]\ntask = 'bijection'\n", ["is a recipe for bijection", "TASK hmm"]),
    ("[recipe]\nmodel = 'lstm'\npreset = 'cpu'\ncolour = 'red'\n", ["[recipe] colour is not a recipe key"]),
    ("steps = 10\n", ["steps is not a top-level key", "[train]"]),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_the_key(tmp_path, text, needles):
    path = _write(tmp_path, text)
    result = run(["train", "hmm", "--config", path, "--out", tmp_path / "run"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("windtunnel train: error:"), result.output
    assert str(path) in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "run").exists()


def test_config_that_is_neither_file_nor_name():
    result = run(["train", "hmm", "--config", "hmm-4l128-aux-shfit"])
    assert result.exit_code == 2 and "did you mean 'hmm-4l128-aux-shift'" in result.output
    result = run(["train", "hmm", "--config", "missing/recipe.toml"])
    assert result.exit_code == 2 and "missing/recipe.toml: no such file" in result.output


def test_a_clash_between_the_file_and_model_is_refused():
    with pytest.raises(ValueError, match=r"--model lstm \(the file says transformer\)"):
        build_experiment("hmm", "lstm", config="hmm-4l-aux")


# --- presets and recipes ----------------------------------------------------------------------


def test_presets_lists_every_preset_and_recipe_with_task_description_and_source():
    result = run(["presets"])
    assert result.exit_code == 0, result.output
    for name in [*preset_names(), *recipe_names()]:
        assert f"  {name} " in result.output
    assert "source: RESULTS.md" in result.output and "source: the paper's recipe" in result.output
    for name in recipe_names():
        recipe = load_recipe(name)
        assert recipe.task and recipe.model and recipe.preset and recipe.description and recipe.source, name


@pytest.mark.parametrize("key", preset_names())
def test_a_preset_shown_as_toml_and_read_back_is_the_preset(tmp_path, key):
    shown = run(["presets", "--show", key])
    assert shown.exit_code == 0, shown.output
    assert shown.output == preset_toml(key)
    path = _write(tmp_path, shown.output, "copy.toml")
    data = tomllib.loads(shown.output)
    task, model, preset = key.split("/")
    assert data["recipe"] == {**data["recipe"], "task": task, "model": model, "preset": preset}
    built = build_experiment(task, config=str(path))
    assert built.to_dict() == get_preset(task, model, preset).to_dict()
    # the file really sets the fields: the copy applied to another start overrides it
    other = load_recipe(str(path)).apply(apply_overrides(get_preset(task, model, preset), ["train.lr=0.123", "train.seed=9"]))
    assert other.to_dict() == get_preset(task, model, preset).to_dict()


@pytest.mark.parametrize("name", recipe_names())
def test_a_shipped_recipe_is_shown_verbatim_and_builds(name):
    shown = run(["presets", "--show", name])
    assert shown.exit_code == 0
    assert shown.output == load_recipe(name).text
    recipe = load_recipe(name)
    built = build_experiment(recipe.task, config=name)
    for key, value in recipe.settings:
        section, _, field = key.partition(".")
        assert built.to_dict()[section][field] == value, key


def test_presets_show_unknown_name():
    result = run(["presets", "--show", "hmm/transformer/gpu"])
    assert result.exit_code == 2 and "did you mean 'hmm/transformer/cpu'" in result.output


def test_sweep_trials_start_from_the_config():
    spec = plan_sweep("hmm", None, None, (0, 1), [("train.lr", ["1e-3", "3e-4"])], config="hmm-4l-aux", steps=10)
    assert spec["config"]["name"] == "hmm-4l-aux" and spec["model"] == "transformer" and spec["preset"] == "cpu"
    assert len(spec["trials"]) == 4
    for trial in spec["trials"]:
        experiment = trial["experiment"]
        assert experiment["model"]["n_layers"] == 4 and experiment["train"]["aux_loss_weight"] == 1.0
        assert experiment["train"]["steps"] == 10 and experiment["train"]["lr"] == trial["grid"]["train.lr"]
    assert "config" not in plan_sweep("hmm", None, None, (0,), [], steps=10)  # old sweeps keep their spec


# --- one list syntax ------------------------------------------------------------------------------


@pytest.mark.parametrize("args,shown", [
    (["verify-law", "--dtype", "float64", "--dtype", "float32"], "--dtype float64,float32"),
    (["reproduce", "hmm", "--models", "transformer", "--models", "lstm"], "--models transformer,lstm"),
    (["reproduce", "em-vs-sgd", "--arms", "sgd", "--arms", "em"], "--arms sgd,em"),
    (["reproduce", "em-vs-sgd", "--seeds", "1", "--seeds", "2"], "--seeds 1,2"),
    (["sweep", "hmm", "--seeds", "0", "--seeds", "1", "--out", "nowhere"], "--seeds 0,1"),
    (["train", "hmm", "--set", "eval_lengths=[30, 50]"], "--set eval_lengths=30,50"),
    (["sweep", "hmm", "--seeds", "0", "--set", "train_lengths=[50]", "--out", "nowhere"], "--set train_lengths=50"),
])
def test_the_old_list_forms_are_one_line_errors_showing_the_new_form(args, shown):
    result = run(args)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and shown in result.output, result.output
    assert not Path("nowhere").exists()


def test_eval_lengths_repeated_is_refused(tmp_path):
    made = run(["train", "bijection", "--out", tmp_path / "run", *TINY, "--quiet"])
    assert made.exit_code == 0, made.output
    result = run(["eval", tmp_path / "run", "--lengths", "20", "--lengths", "50"])
    assert result.exit_code == 2 and "--lengths 20,50" in result.output
    result = run(["eval", tmp_path / "run", "--lengths", "20,x"])
    assert result.exit_code == 2 and "integers >= 1" in result.output and "--lengths 20,30,50" in result.output


def test_set_takes_a_comma_list_for_list_fields():
    built = build_experiment("hmm", overrides=["eval_lengths=30,60", "train.betas=0.8,0.95", "train_lengths=40"])
    assert built.eval_lengths == (30, 60) and built.train.betas == (0.8, 0.95) and built.train_lengths == (40,)
    assert build_experiment("hmm", overrides=["eval_lengths="]).eval_lengths == ()
    assert get_preset("hmm").eval_lengths == (30, 50)


def _capture_em_vs_sgd(monkeypatch):
    import windtunnel.experiments.em_vs_sgd as module

    seen = {}

    def fake(config, progress=None):
        seen["seeds"] = config.seeds
        raise ValueError("stopped before training")

    monkeypatch.setattr(module, "run_em_vs_sgd", fake)
    return seen


@pytest.mark.parametrize("args,seeds", [
    ([], (42, 2024, 1337, 7777, 9999)),  # the paper's five: what the old default count of 5 gave
    (["--quick"], (42, 2024)),  # the old --quick count of 2
    (["--seeds", "0-2"], (0, 1, 2)),
    (["--seeds", "42,7,9"], (42, 7, 9)),
])
def test_em_vs_sgd_seeds_are_a_list_or_range_with_the_old_default(monkeypatch, tmp_path, args, seeds):
    seen = _capture_em_vs_sgd(monkeypatch)
    result = run(["reproduce", "em-vs-sgd", *args, "--out", tmp_path / "out", "--quiet"])
    assert result.exit_code == 2 and "stopped before training" in result.output
    assert seen["seeds"] == seeds


@pytest.mark.parametrize("args,noted", [
    (["--seeds", "3"], True),  # a count in windtunnel 0.2: now seed 3 alone, which the note says
    (["--seeds", "0"], False),  # never a valid count
    (["--seeds", "5"], True),
    (["--seeds", "42"], False),  # a real seed
    (["--seeds", "0-2"], False),
    ([], False),
])
def test_em_vs_sgd_notes_a_lone_small_seed_that_used_to_be_a_count(monkeypatch, tmp_path, args, noted):
    _capture_em_vs_sgd(monkeypatch)
    result = run(["reproduce", "em-vs-sgd", *args, "--out", tmp_path / "out"])
    assert result.exit_code == 2 and "stopped before training" in result.output
    assert ("used to be a count" in result.output) is noted
    if args == ["--seeds", "3"]:
        assert "write --seeds 42,2024,1337" in result.output


# --- --device and --quiet ---------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("args", [["train", "hmm"], ["sweep", "hmm", "--seeds", "0"], ["reproduce", "hmm"]])
def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path, args):
    result = run([*args, "--device", "cuda", "--out", tmp_path / "out"])
    assert result.exit_code == 2, result.output
    assert "no usable CUDA device" in result.output and "--device cpu or auto" in result.output
    assert not (tmp_path / "out").exists()


def test_device_sets_train_device(tmp_path):
    result = run(["train", "bijection", "--device", "cpu", "--out", tmp_path / "run", *TINY, "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["device"] == "cpu"
    spec = plan_sweep("bijection", None, None, (0,), [], device="cpu")
    assert spec["device"] == "cpu" and spec["trials"][0]["experiment"]["train"]["device"] == "cpu"


def test_quiet_silences_progress_and_status_but_not_results(tmp_path):
    loud = CliRunner().invoke(main, ["train", "bijection", "--out", str(tmp_path / "a"), *TINY])
    quiet = CliRunner().invoke(main, ["train", "bijection", "--out", str(tmp_path / "b"), *TINY, "--quiet"])
    assert loud.exit_code == 0 and quiet.exit_code == 0, (loud.output, quiet.output)
    assert "run directory:" in loud.stdout and "%|" in loud.stderr
    assert quiet.stderr == ""
    assert quiet.stdout.startswith("step 2: loss") and len(quiet.stdout.strip().splitlines()) == 1
    for command in (["eval"], ["ablate", "--n", "20"]):  # memory and dissociation: tests/experiments
        loud = CliRunner().invoke(main, [command[0], str(tmp_path / "a"), *command[1:]])
        quiet = CliRunner().invoke(main, [command[0], str(tmp_path / "b"), *command[1:], "--quiet"])
        assert loud.exit_code == 0 and quiet.exit_code == 0, (loud.output, quiet.output)
        assert "%|" in loud.stderr, (command, loud.stderr)
        assert quiet.stderr == "", (command, quiet.stderr)
