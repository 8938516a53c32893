"""Named experiment configs: the paper's recipes ("paper") and 2-core CPU recipes ("cpu").

A preset is a function returning an :class:`~windtunnel.train.ExperimentConfig`, so it can be
printed and saved before anything is built. Keys are ``"<task>/<model>/<preset>"``.
Overrides use dotted keys (``train.lr=1e-3``, ``model.n_layers=4``, ``task.n_values=13``);
an unknown key is an error that lists the close matches.

Sources (docs/theory.md §6): bijection transformer = the production recipe of the authors' follow-up (bayesian-wind-tunnel, experiments/jlens) (AdamW 3e-4, wd 0.1,
batch 256, warmup 2k, cosine to 0 at 50k, clip 1); HMM transformer = 9L/8H/256, pre-LayerNorm,
dropout 0.1, AdamW 3e-4, wd 0.01, batch 64, warmup 1k, cosine, ≈78k steps; LSTM and MLP
baselines as in docs/theory.md §6.1. The "cpu" presets are ours: smaller models and budgets chosen so a
run fits a 2-core machine; their measured results are in BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

from windtunnel._checks import ConfigError, close_matches
from windtunnel.train import ExperimentConfig, TrainConfig

__all__ = [
    "HF_PRESETS",
    "PRESETS",
    "Recipe",
    "apply_overrides",
    "build_experiment",
    "get_preset",
    "list_recipes",
    "load_recipe",
    "parse_recipe",
    "preset_names",
    "preset_toml",
    "recipe_names",
]


def _bijection(model_name: str, model: dict[str, Any], train: dict[str, Any], name: str) -> ExperimentConfig:
    return ExperimentConfig(task_name="bijection", task={}, model_name=model_name, model=model, train=TrainConfig(**train), name=name)


_BIJ_PAPER_TRAIN = dict(steps=50_000, batch_size=256, lr=3e-4, weight_decay=0.1, warmup_steps=2000, grad_clip=1.0, eval_every=2500, checkpoint_every=2500)
_BIJ_CPU_TRAIN = dict(steps=12_000, batch_size=128, lr=2e-3, weight_decay=0.1, warmup_steps=300, grad_clip=1.0, eval_every=1000, checkpoint_every=1000)
_TINY_BIJ_CPU = dict(n_layers=2, n_heads=4, d_model=64, d_mlp=256)


def bijection_transformer_paper() -> ExperimentConfig:
    """TinyGPT 6L/6H/192, FFN 768, RMSNorm, tied embeddings (2,677,440 parameters); the authors' follow-up recipe (docs/theory.md §6.2)."""
    return _bijection("transformer", dict(n_layers=6, n_heads=6, d_model=192, d_mlp=768), _BIJ_PAPER_TRAIN, "bijection/transformer/paper")


def bijection_transformer_cpu() -> ExperimentConfig:
    """TinyGPT 2L/4H/64, FFN 256; AdamW 2e-3, wd 0.1, batch 128, 12k steps (ours, for 2 CPU cores)."""
    return _bijection("transformer", _TINY_BIJ_CPU, _BIJ_CPU_TRAIN, "bijection/transformer/cpu")


def bijection_mlp_paper() -> ExperimentConfig:
    """Position-wise MLP control: 9 pre-LN residual blocks 192→768→192, tied head; the authors' follow-up (bayesian-wind-tunnel, experiments/jlens)."""
    return _bijection("mlp", dict(n_layers=9, d_model=192, d_mlp=768), _BIJ_PAPER_TRAIN, "bijection/mlp/paper")


def bijection_mlp_cpu() -> ExperimentConfig:
    """Position-wise MLP control, 2 blocks of width 64: it cannot see context, so it sits on the floor."""
    return _bijection("mlp", dict(n_layers=2, d_model=64, d_mlp=256), {**_BIJ_CPU_TRAIN, "steps": 2000}, "bijection/mlp/cpu")


def bijection_lstm_paper() -> ExperimentConfig:
    """LSTM 6×192 with token + position embeddings, tied head; AdamW 3e-4, wd 0.1, constant LR."""
    return _bijection(
        "lstm",
        dict(n_layers=6, d_model=192),
        {**_BIJ_PAPER_TRAIN, "warmup_steps": 0, "schedule": "constant"},
        "bijection/lstm/paper",
    )


def bijection_lstm_cpu() -> ExperimentConfig:
    """LSTM 2×128 (ours, for 2 CPU cores), 4k steps."""
    return _bijection("lstm", dict(n_layers=2, d_model=128), {**_BIJ_CPU_TRAIN, "lr": 3e-3, "steps": 4000}, "bijection/lstm/cpu")


def _hmm(model_name: str, model: dict[str, Any], train: dict[str, Any], name: str) -> ExperimentConfig:
    return ExperimentConfig(task_name="hmm", task={}, model_name=model_name, model=model, train=TrainConfig(**train), eval_lengths=(30, 50), name=name)


_HMM_PAPER_TRAIN = dict(steps=78_000, batch_size=64, lr=3e-4, weight_decay=0.01, warmup_steps=1000, grad_clip=1.0, eval_every=2000, checkpoint_every=2000)
_HMM_CPU_TRAIN = dict(steps=4000, batch_size=32, lr=1e-3, weight_decay=0.01, warmup_steps=200, grad_clip=1.0, eval_every=1000, eval_size=1000, checkpoint_every=1000)


def hmm_transformer_paper() -> ExperimentConfig:
    """TinyGPT 9L/8H/256, FFN 1024, pre-LayerNorm, dropout 0.1, untied Linear(256→5) with bias."""
    return _hmm(
        "transformer",
        dict(n_layers=9, n_heads=8, d_model=256, d_mlp=1024, norm="layernorm", dropout=0.1, head_bias=True),
        _HMM_PAPER_TRAIN,
        "hmm/transformer/paper",
    )


def hmm_transformer_cpu() -> ExperimentConfig:
    """TinyGPT 3L/4H/64 pre-LayerNorm, no dropout; 4k steps at batch 32 (ours; far below the paper's budget)."""
    return _hmm("transformer", dict(n_layers=3, n_heads=4, d_model=64, d_mlp=256, norm="layernorm", head_bias=True), _HMM_CPU_TRAIN, "hmm/transformer/cpu")


def hmm_lstm_paper() -> ExperimentConfig:
    """LSTM 9×256, token embedding only, LayerNorm, Linear→5 (docs/theory.md §6.1)."""
    return _hmm("lstm", dict(n_layers=9, d_model=256, n_positions=None, head_bias=True), {**_HMM_PAPER_TRAIN, "warmup_steps": 0, "schedule": "constant"}, "hmm/lstm/paper")


def hmm_lstm_cpu() -> ExperimentConfig:
    """LSTM 2×64, token embedding only (ours)."""
    return _hmm("lstm", dict(n_layers=2, d_model=64, n_positions=None, head_bias=True), {**_HMM_CPU_TRAIN, "steps": 2000}, "hmm/lstm/cpu")


def hmm_mlp_cpu() -> ExperimentConfig:
    """Position-wise MLP control (it sees one token, so it lands near the 0.415-bit floor)."""
    return _hmm("mlp", dict(n_layers=2, d_model=64, d_mlp=256, head_bias=True), {**_HMM_CPU_TRAIN, "steps": 1000}, "hmm/mlp/cpu")


def _recall(model_name: str, task: dict[str, Any], model: dict[str, Any], train: dict[str, Any], name: str) -> ExperimentConfig:
    return ExperimentConfig(task_name="recall", task=task, model_name=model_name, model=model, train=TrainConfig(**train), name=name)


def recall_transformer_paper() -> ExperimentConfig:
    """64 pairs, 3 queries; TinyGPT 4L/4H/128 (no source recipe: ours), AdamW 1e-3, 20k steps."""
    return _recall("transformer", {}, dict(n_layers=4, n_heads=4, d_model=128, d_mlp=512), dict(steps=20_000, batch_size=64, lr=1e-3, warmup_steps=1000, eval_every=1000, checkpoint_every=2000, eval_size=1000), "recall/transformer/paper")


# The cpu recall task is small on purpose. With the N(0, 0.02) initialisation every recall run we
# tried (4, 8 and 16 pairs; lr 1e-3 to 1e-2; batch 64 to 512; 2 or 3 layers) sat on the
# "uniform over the stored values" plateau (cross-entropy ln N) for its whole budget: near-uniform
# attention makes the routing advantages, and so the QK gradients, vanishingly small (a saddle of
# the bilinear QK product). init_std 0.1 makes the initial patterns uneven; 4 pairs then escape
# the plateau after 500 to 4,000 steps depending on the seed, while 8 pairs still had not after
# thousands of steps (RESULTS.md).
_RECALL_CPU_TASK = dict(n_pairs=4, n_queries=4, n_keys=16, n_values=16, n_gap_filler=2, n_query_filler=0)
_RECALL_CPU_TRAIN = dict(steps=6000, batch_size=64, lr=2e-3, warmup_steps=100, eval_every=500, checkpoint_every=1000, eval_size=2000)


def recall_transformer_cpu() -> ExperimentConfig:
    """4 pairs over 16 keys / 16 values, every pair queried (ours, for 2 CPU cores); TinyGPT 2L/4H/64, init std 0.1."""
    return _recall("transformer", _RECALL_CPU_TASK, dict(n_layers=2, n_heads=4, d_model=64, d_mlp=256, init_std=0.1), _RECALL_CPU_TRAIN, "recall/transformer/cpu")


def recall_lstm_cpu() -> ExperimentConfig:
    """The same cpu-sized recall task; LSTM 2×128 (ours)."""
    return _recall("lstm", _RECALL_CPU_TASK, dict(n_layers=2, d_model=128), _RECALL_CPU_TRAIN, "recall/lstm/cpu")


PRESETS: dict[str, Callable[[], ExperimentConfig]] = {
    "bijection/transformer/paper": bijection_transformer_paper,
    "bijection/transformer/cpu": bijection_transformer_cpu,
    "bijection/mlp/paper": bijection_mlp_paper,
    "bijection/mlp/cpu": bijection_mlp_cpu,
    "bijection/lstm/paper": bijection_lstm_paper,
    "bijection/lstm/cpu": bijection_lstm_cpu,
    "hmm/transformer/paper": hmm_transformer_paper,
    "hmm/transformer/cpu": hmm_transformer_cpu,
    "hmm/lstm/paper": hmm_lstm_paper,
    "hmm/lstm/cpu": hmm_lstm_cpu,
    "hmm/mlp/cpu": hmm_mlp_cpu,
    "recall/transformer/paper": recall_transformer_paper,
    "recall/transformer/cpu": recall_transformer_cpu,
    "recall/lstm/cpu": recall_lstm_cpu,
}


# Hugging Face architectures (``--model hf``; llama unless --set model.architecture=gpt2|gpt_neox|...),
# sized like the TinyGPT cpu presets, with the same recipes. Kept out of PRESETS, the models each
# ``windtunnel reproduce`` trains and compares, so that a reproduction never needs transformers.


def bijection_hf_cpu() -> ExperimentConfig:
    """Llama 2L/4H/64, FFN 256 (SwiGLU), RMSNorm, RoPE, tied embeddings; the bijection cpu recipe (ours)."""
    return _bijection("hf", dict(architecture="llama", **_TINY_BIJ_CPU), _BIJ_CPU_TRAIN, "bijection/hf/cpu")


def hmm_hf_cpu() -> ExperimentConfig:
    """Llama 3L/4H/64, FFN 256, untied Linear(64→5) with bias; the HMM cpu recipe (ours)."""
    return _hmm("hf", dict(architecture="llama", n_layers=3, n_heads=4, d_model=64, d_mlp=256, head_bias=True), _HMM_CPU_TRAIN, "hmm/hf/cpu")


def recall_hf_cpu() -> ExperimentConfig:
    """The cpu recall task; Llama 2L/4H/64, init std 0.1 (as the TinyGPT recall preset, ours)."""
    return _recall("hf", _RECALL_CPU_TASK, dict(architecture="llama", n_layers=2, n_heads=4, d_model=64, d_mlp=256, init_std=0.1), _RECALL_CPU_TRAIN, "recall/hf/cpu")


HF_PRESETS: dict[str, Callable[[], ExperimentConfig]] = {
    "bijection/hf/cpu": bijection_hf_cpu,
    "hmm/hf/cpu": hmm_hf_cpu,
    "recall/hf/cpu": recall_hf_cpu,
}


def preset_names() -> list[str]:
    """Every preset key, ``"<task>/<model>/<preset>"`` (``PRESETS`` and ``HF_PRESETS``)."""
    return sorted({**PRESETS, **HF_PRESETS})


def get_preset(task: str, model: str = "transformer", preset: str = "cpu") -> ExperimentConfig:
    """The preset ``task/model/preset``.

    Raises:
        ValueError: naming the available presets when there is no such preset.
    """
    key = f"{task}/{model}/{preset}"
    known = {**PRESETS, **HF_PRESETS}
    if key not in known:
        raise ValueError(f"get_preset: no preset {key!r};{close_matches(key, known)} available: {', '.join(preset_names())}.")
    return known[key]()


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _as_list(value: Any) -> Any:
    """A list-valued field's value in the one list form of the command line: ``30,50`` (text)
    becomes ``[30, 50]``, a single ``50`` becomes ``[50]``, an empty value ``[]``; a list (JSON
    ``[30, 50]``, TOML ``[30, 50]``) is kept."""
    if isinstance(value, str):
        return [_parse_value(part.strip()) for part in value.split(",") if part.strip()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return value


def _current_value(config: ExperimentConfig, data: dict[str, Any], section: str, name: str) -> Any:
    """The value ``section.name`` has in ``config`` (defaults included), to tell list-valued fields."""
    if section == "train":
        return data["train"].get(name)
    if section == "model":
        return getattr(config.model_config(), name, None)
    return getattr(config.build_task(), name, None)


def apply_overrides(
    config: ExperimentConfig, overrides: Sequence[str | tuple[str, Any]], *, source: str = "the overrides"
) -> ExperimentConfig:
    """Apply ``section.field=value`` overrides (values parsed as JSON, else kept as strings).

    Sections: ``train`` (TrainConfig fields), ``model`` (model-config fields), ``task`` (task
    fields); top-level ``name``, ``eval_lengths`` and ``train_lengths`` too. A list-valued field
    (``eval_lengths``, ``train.betas``, ...) takes comma-separated values, ``eval_lengths=30,50``
    (a JSON list is read too). An item may also be a ``(key, value)`` pair with the value already
    parsed (a config file's entries). Every problem is reported at once.

    Args:
        source: names where the items come from in the error ("the overrides", a file's path).

    Raises:
        ConfigError / ValueError: listing each malformed or unknown key with close matches, and
            any invalid resulting value.
    """
    data = config.to_dict()
    problems = []
    model_fields = {f.name for f in dataclasses.fields(type(config.model_config()))}
    task_fields = {f.name for f in dataclasses.fields(type(config.build_task()))}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for item in overrides:
        if isinstance(item, tuple):
            key, value = item
            shown = key
        else:
            key, sep, raw = item.partition("=")
            key = key.strip().removeprefix("--")
            if not sep:
                problems.append(f"override {item!r} must look like section.field=value")
                continue
            value = _parse_value(raw)
            shown = f"--{key}"
        if key in ("name", "eval_lengths", "train_lengths"):
            data[key] = value if key == "name" else _as_list(value)
            continue
        section, dot, name = key.partition(".")
        known = {"train": train_fields, "model": model_fields, "task": task_fields}.get(section)
        if not dot or known is None:
            problems.append(f"{shown} must start with train., model. or task. (or be name, eval_lengths, train_lengths).")
            continue
        if name not in known:
            owner = {"train": "TrainConfig", "model": type(config.model_config()).__name__, "task": type(config.build_task()).__name__}[section]
            problems.append(f"{shown} is not a field of {owner};{close_matches(name, known) or ' its fields: ' + ', '.join(sorted(known)) + '.'}")
            continue
        if isinstance(_current_value(config, data, section, name), (list, tuple)):
            value = _as_list(value)
        data[section][name] = value
    if problems:
        raise ConfigError(source, problems)
    return ExperimentConfig.from_dict(data)


# --- recipes: configs as TOML files -------------------------------------------------------------

RECIPE_SECTIONS = ("train", "model", "task")
RECIPE_TOP_LEVEL = ("name", "eval_lengths", "train_lengths")
RECIPE_HEADER = ("task", "model", "preset", "description", "source")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A config file: the preset it starts from and the settings it changes.

    Attributes:
        name: the shipped recipe's or the preset's name, or the file's path.
        task, model, preset: the preset the settings apply to (``[recipe]``; None when the file
            leaves it to the command line).
        description: one line (``[recipe] description``).
        source: where the recipe was measured (``[recipe] source``: a RESULTS.md / BENCHMARKS.md row).
        settings: ``(key, value)`` pairs in file order, keys as for ``--set`` (``train.lr``).
        text: the TOML text.
    """

    name: str
    task: str | None
    model: str | None
    preset: str | None
    description: str
    source: str
    settings: tuple[tuple[str, Any], ...]
    text: str

    def apply(self, config: ExperimentConfig) -> ExperimentConfig:
        """``config`` with this recipe's settings applied.

        Raises:
            ValueError: naming the file, the key and the rule, for an unknown key or a value the
                field refuses.
        """
        try:
            return apply_overrides(config, self.settings, source=self.name)
        except ConfigError:
            raise
        except (ValueError, TypeError) as err:
            raise ValueError(f"{self.name}: {err}") from None


def _toml() -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ImportError("config files are read with tomllib, which needs Python >= 3.11 (or pip install tomli).") from None
    return tomllib


def _recipe_files() -> dict[str, Any]:
    from importlib.resources import files

    folder = files("windtunnel") / "recipes"
    return {entry.name.removesuffix(".toml"): entry for entry in folder.iterdir() if entry.name.endswith(".toml")}


def recipe_names() -> list[str]:
    """The recipes shipped with the package (``windtunnel/recipes/*.toml``), by name."""
    return sorted(_recipe_files())


def parse_recipe(text: str, name: str) -> Recipe:
    """A :class:`Recipe` from TOML text; ``name`` (the file's path or the recipe's name) heads every error.

    The file: optional top-level ``name``, ``eval_lengths``, ``train_lengths``; an optional
    ``[recipe]`` table (``task``, ``model``, ``preset``, ``description``, ``source``); tables
    ``[train]``, ``[model]``, ``[task]`` of fields, as ``--set`` names them.

    Raises:
        ValueError: not TOML, an unknown table or key, a table where a value belongs.
    """
    tomllib = _toml()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{name}: not valid TOML: {err}.") from None
    problems, settings = [], []
    header = data.get("recipe", {})
    if not isinstance(header, dict):
        problems.append("recipe must be a table ([recipe])")
        header = {}
    for key, value in header.items():
        if key not in RECIPE_HEADER:
            problems.append(f"[recipe] {key} is not a recipe key;{close_matches(key, RECIPE_HEADER) or ' they are: ' + ', '.join(RECIPE_HEADER) + '.'}")
        elif not isinstance(value, str):
            problems.append(f"[recipe] {key} must be a string; got {value!r}")
    for key, value in data.items():
        if key == "recipe":
            continue
        if key in RECIPE_SECTIONS:
            if not isinstance(value, dict):
                problems.append(f"{key} must be a table ([{key}]) of fields; got {value!r}")
                continue
            for field_name, field_value in value.items():
                if isinstance(field_value, dict):
                    problems.append(f"[{key}] {field_name} must be a value, not a table")
                else:
                    settings.append((f"{key}.{field_name}", field_value))
        elif key in RECIPE_TOP_LEVEL and not isinstance(value, dict):
            settings.append((key, value))
        else:
            known = ("recipe", *RECIPE_SECTIONS, *RECIPE_TOP_LEVEL)
            what = f"[{key}] is not a section" if isinstance(value, dict) else f"{key} is not a top-level key"
            problems.append(f"{what};{close_matches(key, known) or ''} the sections are [recipe], [train], [model], [task]; "
                            "the top-level keys name, eval_lengths, train_lengths (before the first section)")
    if problems:
        raise ConfigError(name, problems)
    text_of = {k: header.get(k) for k in RECIPE_HEADER}
    return Recipe(name=name, task=text_of["task"], model=text_of["model"], preset=text_of["preset"],
                  description=text_of["description"] or "", source=text_of["source"] or "", settings=tuple(settings), text=text)


def _preset_source(key: str) -> str:
    task, model, preset = key.split("/")
    if preset == "paper":
        return "the paper's recipe (docs/theory.md §6.2)" if key != "recall/transformer/paper" else "ours, no published recipe (docs/theory.md §6.2)"
    return "ours, sized for 2 CPU cores (BENCHMARKS.md, wind tunnels: training to calibration on the 2-core machine)"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(value), repr(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def preset_toml(key: str) -> str:
    """The preset ``task/model/preset`` as a complete config file: every field it sets, to copy and edit.

    TOML has no null: a field that is None is written as a comment (set it with ``--set section.field=null``).
    """
    known = {**PRESETS, **HF_PRESETS}
    if key not in known:
        raise ValueError(f"preset_toml: no preset {key!r};{close_matches(key, known)} available: {', '.join(preset_names())}.")
    config = known[key]()
    data = config.to_dict()
    task, model, preset = key.split("/")
    description = (known[key].__doc__ or "").strip().splitlines()[0]
    lines = [f"# windtunnel preset {key}: every field it sets. Edit and run with --config FILE.", ""]
    for top in RECIPE_TOP_LEVEL:
        if top != "name" and data[top]:
            lines.append(f"{top} = {_toml_value(data[top])}")
    lines += ["", "[recipe]", f"task = {json.dumps(task)}", f"model = {json.dumps(model)}", f"preset = {json.dumps(preset)}",
              f"description = {_toml_value(description)}", f"source = {_toml_value(_preset_source(key))}"]
    for section in ("task", "model", "train"):
        if not data[section] and section != "train":
            continue
        lines += ["", f"[{section}]"]
        for name, value in data[section].items():
            lines.append(f"# {name}: None (TOML has no null; --set {section}.{name}=null)" if value is None else f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def load_recipe(name_or_path: str) -> Recipe:
    """A config file by path, a shipped recipe by name (:func:`recipe_names`), or a preset by key
    (``hmm/transformer/cpu``, as :func:`preset_toml` writes it), in that order.

    Raises:
        ValueError: when it is none of them (naming the shipped recipes), or the file is not a
            valid recipe (naming the file and the key).
        OSError: a file that cannot be read.
    """
    from pathlib import Path

    path = Path(name_or_path)
    if path.is_file():
        return parse_recipe(path.read_text(encoding="utf-8"), str(path))
    shipped = _recipe_files()
    if name_or_path in shipped:
        return parse_recipe(shipped[name_or_path].read_text(encoding="utf-8"), name_or_path)
    if name_or_path in {**PRESETS, **HF_PRESETS}:
        return parse_recipe(preset_toml(name_or_path), name_or_path)
    if path.is_dir():
        raise ValueError(f"{name_or_path} is a directory, not a config file.")
    if path.suffix == ".toml" or "/" in name_or_path or "\\" in name_or_path:
        raise ValueError(f"{name_or_path}: no such file (and no shipped recipe or preset has that name).")
    raise ValueError(
        f"{name_or_path!r} is neither a file, a shipped recipe nor a preset;{close_matches(name_or_path, [*shipped, *preset_names()])} "
        f"shipped recipes: {', '.join(sorted(shipped)) or 'none'} (windtunnel presets lists them with the presets)."
    )


def list_recipes() -> list[Recipe]:
    """Every preset (as :func:`preset_toml` writes it), then every shipped recipe."""
    return [load_recipe(key) for key in preset_names()] + [load_recipe(name) for name in recipe_names()]


def build_experiment(
    task: str,
    model: str | None = None,
    preset: str | None = None,
    *,
    config: str | Recipe | None = None,
    overrides: Sequence[str] = (),
    steps: int | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> ExperimentConfig:
    """The config ``windtunnel train`` builds: preset defaults < config file < ``--set``, ``--steps``,
    ``--seed``, ``--device``.

    Args:
        task: the task (TASK); a config file naming another task is refused.
        model, preset: the preset (``--model``, ``--preset``); None takes the config file's
            choice (``[recipe] model``/``preset``), else "transformer" / "cpu". Naming one the
            file contradicts is refused.
        config: a :class:`Recipe` or what :func:`load_recipe` reads (a path, a shipped recipe, a preset key).
        overrides: ``section.field=value`` items (``--set``), applied after the file.
        steps, seed, device: ``train.steps``, ``train.seed``, ``train.device``, applied last.

    Raises:
        ValueError: a contradiction between the file and the command, an unknown key or a bad
            value (naming the file for the file's own keys).
    """
    recipe = load_recipe(str(config)) if config is not None and not isinstance(config, Recipe) else config
    if recipe is not None:
        clashes = [f"{what} {asked} (the file says {theirs})" for what, asked, theirs in
                   (("TASK", task, recipe.task), ("--model", model, recipe.model), ("--preset", preset, recipe.preset))
                   if asked is not None and theirs is not None and asked != theirs]
        if clashes:
            raise ValueError(f"{recipe.name} is a recipe for {recipe.task or task}/{recipe.model or model or 'transformer'}/"
                             f"{recipe.preset or preset or 'cpu'}; the command asks for {', '.join(clashes)}. Drop the option "
                             "(the file chooses) or edit the file's [recipe] table.")
        model, preset = model or recipe.model, preset or recipe.preset
    experiment = get_preset(task, model or "transformer", preset or "cpu")
    if recipe is not None:
        experiment = recipe.apply(experiment)
    extra = [*overrides, *(f"train.{k}={v}" for k, v in (("steps", steps), ("seed", seed), ("device", device)) if v is not None)]
    return apply_overrides(experiment, extra) if extra else experiment
