"""The ``windtunnel`` command line: parse options, build configs, call the library.

Each command lives in its own function below; ``reproduce`` groups the paper reproductions.
Every failure the user can cause ends in one line on stderr, ``windtunnel CMD: error: ...``,
with exit status 2 for bad input (options, values, files) and 1 for a run that stopped
(a non-finite loss, a locked run directory, a full disk); a traceback means a bug.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import click

from windtunnel import __version__


class _Main(click.Group):
    """The command group, with one-line errors (see the module docstring)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        from windtunnel.runs import RunLockedError

        name = "windtunnel"
        self._running = name
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as err:
            _fail(self._running, err.format_message(), err.exit_code,
                  f" (see {self._running} --help)" if isinstance(err, click.UsageError) else "")
        except click.Abort:
            _fail(name, "aborted", 1)
        except (RunLockedError, FloatingPointError) as err:
            _fail(self._running, str(err), 1)
        except ValueError as err:  # bad input the library refused: a config value, a file, a size
            _fail(self._running, str(err), 2)
        except ImportError as err:  # an optional dependency (--model hf needs transformers)
            _fail(self._running, str(err), 1)
        except OSError as err:
            target = f"{err.filename}: " if err.filename else ""
            _fail(self._running, f"{target}{err.strerror or err}", 1)
        sys.exit(code if isinstance(code, int) else 0)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        self._running = f"{self._running} {name}"  # "windtunnel train", or "windtunnel reproduce hmm"
        return name, command, rest


def _fail(where: str, message: str, code: int, suffix: str = "") -> None:
    """Print ``where: error: message`` on one line of stderr and exit with ``code``."""
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    click.echo(f"{where}: error: {line}{suffix}", err=True)
    sys.exit(code)


def _check_out(path: str | os.PathLike, option: str = "--out", *, is_file: bool = False) -> None:
    """Refuse, before anything is written, an output path that cannot be created: one under a
    file, a directory that exists as a file (or a file that exists as a directory), or one whose
    nearest existing folder is not writable."""
    path = Path(path)
    if path.exists() and (path.is_dir() if is_file else not path.is_dir()):
        kind = "a directory" if is_file else "a file"
        raise click.BadParameter(f"{path} is {kind}.", param_hint=f"'{option}'")
    parent = path.parent if is_file else path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise click.BadParameter(f"{path} lies under {parent}, which is a file.", param_hint=f"'{option}'")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise click.BadParameter(f"cannot write in {parent} (permission denied).", param_hint=f"'{option}'")


def _quiet_option(command: Any) -> Any:
    return click.option("--quiet", "-q", is_flag=True,
                        help="No progress bars and no status lines on stderr/stdout; the results and any error are still printed.")(command)


def _device_option(what: str) -> Any:
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                        help=f"Where {what} train: cpu, cuda, or auto (cuda when this machine has a usable GPU, else cpu); "
                             "sets train.device [default: the preset's or config file's train.device, auto].")


def _check_device(device: str | None) -> None:
    """Refuse ``--device cuda`` on a machine without a usable CUDA device, before anything starts."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.BadParameter("cuda was asked for, but this machine has no usable CUDA device "
                                     "(torch.cuda.is_available() is False); use --device cpu or auto.", param_hint="'--device'")


def _list_option(*names: str, parse: Any, example: str, help: str, **kwargs: Any) -> Any:
    """An option that takes its values as ONE comma-separated list (``--lengths 20,30,50``).

    ``parse(text) -> tuple`` reads the whole list (raising ValueError with the rule); giving the
    option twice (``--lengths 20 --lengths 50``) is refused with the one-list form of the same values.
    """
    def callback(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> Any:
        if not values:
            return None
        name = param.opts[0]
        if len(values) > 1:
            raise click.BadParameter(f"is given {len(values)} times; give the values once, comma-separated: "
                                     f"{name} {','.join(values)}", ctx=ctx, param=param)
        try:
            return parse(values[0])
        except ValueError as err:
            rule = str(err).removeprefix(f"{name} ").removeprefix(f"{name}: ")
            raise click.BadParameter(f"{rule} (one comma-separated list, e.g. {name} {example})", ctx=ctx, param=param) from None

    return click.option(*names, multiple=True, callback=callback, metavar=kwargs.pop("metavar", "V1,V2,..."), help=help, **kwargs)


def _parse_ints(minimum: int) -> Any:
    def parse(text: str) -> tuple[int, ...]:
        parts = [p.strip() for p in text.split(",")]
        try:
            values = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"must be integers >= {minimum} separated by commas; got {text!r}.") from None
        if any(v < minimum for v in values):
            raise ValueError(f"must be integers >= {minimum}; got {text!r}.")
        if len(set(values)) != len(values):
            raise ValueError(f"lists a value twice; got {text!r}.")
        return values
    return parse


def _parse_choices(choices: tuple[str, ...]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(p.strip() for p in text.split(","))
        bad = [v for v in values if v not in choices]
        if bad or len(set(values)) != len(values):
            raise ValueError(f"must be distinct names from {', '.join(choices)} separated by commas; got {text!r}.")
        return values
    return parse


def _parse_seed_list(text: str) -> tuple[int, ...]:
    from windtunnel.experiments.sweep import parse_seeds

    return parse_seeds(text)


def _check_sets(overrides: tuple[str, ...], option: str = "--set") -> None:
    """Refuse the bracket form of a list value: lists are written ``key=30,50`` everywhere."""
    for item in overrides:
        key, _, raw = item.partition("=")
        if raw.strip().startswith("["):
            inner = raw.strip().removeprefix("[").removesuffix("]").replace(" ", "")
            raise click.BadParameter(f"{item!r}: write a list without brackets, comma-separated: {option} {key.strip()}={inner}",
                                     param_hint=f"'{option}'")


@contextlib.contextmanager
def _busy(desc: str, quiet: bool) -> Any:
    """A bar without a total (elapsed seconds on stderr) around work that reports no progress of its own."""
    if quiet:
        yield
        return
    import threading

    from tqdm import tqdm

    done = threading.Event()
    with tqdm(desc=desc, total=None, bar_format="{desc}: {elapsed}", file=sys.stderr, leave=False) as bar:
        def tick() -> None:
            while not done.wait(0.5):
                bar.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()


def _echo(quiet: bool) -> Any:
    """click.echo, or nothing under --quiet (for status lines, not results)."""
    return (lambda *args, **kwargs: None) if quiet else click.echo


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="windtunnel")
def main() -> None:
    """windtunnel: the routing law of softmax attention, checked; Bayesian wind tunnels, measured."""


@main.command("verify-law")
@click.option("--trials", default=200, show_default=True, type=click.IntRange(min=1),
              help="Random heads per dtype.")
@_list_option("--dtype", "dtypes", parse=_parse_choices(("float64", "float32")), example="float64,float32",
              metavar="DTYPES", help="Dtypes to check, comma-separated: float64, float32 [default: float64,float32].")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random heads.")
def verify_law_command(trials: int, dtypes: tuple[str, ...], seed: int) -> None:
    """Check the closed-form routing law against autograd on random heads.

    Random shapes, score scales and masks (none, causal, key padding with fully padded
    sequences, random masks with fully masked rows); every closed-form quantity of
    windtunnel.dynamics is compared with autograd. Exits with status 1 if any relative error
    (error / magnitude of the summands) exceeds the tolerance: 1e-10 in float64, 1e-4 in float32.
    """
    import torch

    from windtunnel.dynamics import verify_law

    failed = False
    for name in dtypes or ("float64", "float32"):
        report = verify_law(
            trials, dtype=getattr(torch, name), generator=torch.Generator().manual_seed(seed)
        )
        click.echo(f"\n{name}: {trials} random heads, tolerance {report.rel_tol:.0e} (relative)")
        click.echo(f"  {'quantity':<24}{'max abs error':>16}{'max rel error':>16}  ok")
        for quantity, rel in report.max_rel_error.items():
            ok = "yes" if rel <= report.rel_tol else "NO"
            click.echo(
                f"  {quantity:<24}{report.max_abs_error[quantity]:>16.3e}{rel:>16.3e}  {ok}"
            )
        failed |= not report.passed
    click.echo("\nFAILED: some closed form disagrees with autograd." if failed
               else "\nAll closed forms agree with autograd.")
    if failed:
        raise SystemExit(1)


@main.command("train")
@click.argument("task", type=click.Choice(["bijection", "hmm", "recall"]))
@click.option("--config", "config", default=None, metavar="FILE|NAME",
              help="A recipe: a TOML file, or the name of a shipped recipe or preset (windtunnel presets lists them; "
                   "presets --show NAME prints one to copy). Precedence: preset < config file < --set, --steps, --seed, "
                   "--device [default: none, the preset alone].")
@click.option("--model", "model_name", default=None,
              type=click.Choice(["transformer", "mlp", "lstm", "hf"]),
              help="'hf': a Hugging Face architecture, --set model.architecture=llama|gpt2|gpt_neox|... "
                   "(needs pip install 'windtunnel[hf]') [default: the config file's, else transformer].")
@click.option("--preset", default=None, type=click.Choice(["cpu", "paper"]),
              help="'paper': the paper's recipe; 'cpu': a 2-core recipe (ours) [default: the config file's, else cpu].")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override train.steps (optimizer steps) [default: the preset's].")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Override train.seed [default: the preset's, 0].")
@_device_option("the model will")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory [default: runs/<task>-<model>-<preset>; with --config NAME, runs/<task>-<NAME>].")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Dotted override, e.g. --set train.lr=1e-3 --set model.n_layers=4 (repeatable, one field each; a "
                   "list field takes comma-separated values: --set eval_lengths=30,50) [default: none].")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its latest checkpoint. It may change only --steps "
                   "(extend the run; the cosine schedule is recomputed for the new length) and "
                   "--set train.lr / train.keep_checkpoints; any other option that would change the run "
                   "is refused.")
@click.option("--overwrite", is_flag=True, help="Replace the run in --out (everything in it is deleted).")
@click.option("--init-from", "init_from", type=click.Path(exists=True), default=None,
              help="Fine-tune: start from the model weights of this run directory's latest checkpoint "
                   "(or of a checkpoint file); optimizer, schedule and step start fresh [default: none].")
@click.option("--telemetry", is_flag=True,
              help="Attach the probes of docs/theory.md §8 (geometry, routing law, calibration; for the HMM also "
                   "memory by lag) on the log-spaced schedule; also saves weight snapshots for "
                   "`windtunnel dissociation`.")
@click.option("--tensorboard", is_flag=True,
              help="Also write the training metrics and the telemetry as TensorBoard event files in "
                   "OUT/tensorboard/ (view with: tensorboard --logdir OUT). Off unless asked, so that the files a "
                   "run writes never depend on what happens to be installed; needs pip install "
                   "'windtunnel[tensorboard]'. With --resume they are rebuilt from the logs, each step once.")
@_quiet_option
def train_command(task, config, model_name, preset, steps, seed, device, out, overrides, resume, overwrite, init_from,
                  telemetry, tensorboard, quiet):
    """Train a model on a wind tunnel, evaluating calibration in bits against the exact posterior."""
    from windtunnel.presets import build_experiment, load_recipe
    from windtunnel.train import Trainer

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other.")
    _check_sets(overrides)
    _check_device(device)
    recipe = load_recipe(config) if config is not None else None
    if out is None:
        if recipe is None:
            out = f"runs/{task}-{model_name or 'transformer'}-{preset or 'cpu'}"
        elif recipe.name.count("/") == 2 and not Path(recipe.name).is_file():  # a preset key
            out = f"runs/{recipe.name.replace('/', '-')}"
        else:
            out = f"runs/{task}-{Path(recipe.name).stem}"
    _check_out(out)
    say = _echo(quiet)
    if resume:
        trainer = Trainer.resume(out, changes=_resume_changes(task, recipe, model_name, preset, steps, seed, device, out,
                                                              overrides, init_from),
                                 tensorboard=tensorboard)
    else:
        experiment = build_experiment(task, model_name, preset, config=recipe, overrides=overrides, steps=steps, seed=seed,
                                      device=device)
        if init_from is not None:
            import dataclasses

            experiment = dataclasses.replace(experiment, init_from=init_from)
        trainer = Trainer(experiment, out, overwrite=overwrite, tensorboard=tensorboard)
    if telemetry:
        from windtunnel.experiments.telemetry import attach_probes

        attach_probes(trainer)
    say(f"run directory: {out}" + (f" (resumed at step {trainer.step})" if resume else ""))
    if recipe is not None:
        say(f"config: {recipe.name}")
    if trainer.init_step is not None:
        say(f"model weights from {trainer.experiment.init_from} (step {trainer.init_step})")
    n_params = sum(p.numel() for p in trainer.model.parameters())
    say(f"{trainer.experiment.name or task}: {n_params:,} parameters, "
        f"{trainer.config.steps} steps x batch {trainer.config.batch_size} on {trainer.device}")
    result = trainer.fit(progress=not quiet)
    cal = result.calibration
    click.echo(f"step {result.step}: loss {result.final_loss_nats:.4f} nats; entropy MAE "
               f"{float(cal.entropy_mae_bits):.4f} bits, KL {float(cal.kl_bits):.4f} bits, "
               f"accuracy {float(cal.accuracy):.3f} (Bayes entropy {float(cal.bayes_entropy_bits):.3f} bits); "
               f"{result.wall_s:.0f} s")


def _resume_changes(task, recipe, model_name, preset, steps, seed, device, out, overrides, init_from) -> dict[str, Any]:
    """What ``train --resume`` asks to change in the run of ``out``, as Trainer.resume's ``changes``.

    Options equal to the run's own values change nothing and pass; a differing TASK, --model,
    --preset, --seed or --init-from, or a --set (or config file entry, or --device) of another
    field, is refused by name.
    """
    from windtunnel.presets import apply_overrides
    from windtunnel.runs import RunDir
    from windtunnel.train import RESUME_CHANGES, config_differences, flatten_config, load_experiment

    run = RunDir(out)
    if not run.exists():
        raise click.BadParameter(f"{out} holds no run to resume (no config.json); drop --resume to start one.", param_hint="'--resume'")
    experiment = load_experiment(run)
    refused = []
    if task != experiment.task_name:
        refused.append(f"TASK {task} (the run is {experiment.task_name})")
    model_name = model_name or (recipe.model if recipe is not None else None)
    preset = preset or (recipe.preset if recipe is not None else None)
    if model_name is not None and model_name != experiment.model_name:
        refused.append(f"--model {model_name} (the run is {experiment.model_name})")
    if preset is not None and experiment.name and experiment.name.split("/")[-1] != preset:
        refused.append(f"--preset {preset} (the run is {experiment.name})")
    if seed is not None and seed != experiment.train.seed:
        refused.append(f"--seed {seed} (the run's is {experiment.train.seed})")
    if init_from is not None and init_from != experiment.init_from:
        refused.append(f"--init-from {init_from} (the run's is {experiment.init_from})")
    amended = recipe.apply(experiment) if recipe is not None else experiment
    amended = apply_overrides(amended, [*overrides, *([f"train.steps={steps}"] if steps is not None else []),
                                        *([f"train.device={device}"] if device is not None else [])])
    before, after = experiment.to_dict(), amended.to_dict()
    changed = config_differences(before, after)
    refused += [f"--set {k}" for k in changed if k not in RESUME_CHANGES]
    if refused:
        raise click.UsageError(
            f"--resume continues the run in {out} as it is; refused: {', '.join(refused)}. --resume may change only "
            f"--steps, --set train.lr and --set train.keep_checkpoints; for anything else start a new run "
            f"(another --out, or --init-from {out})."
        )
    return {k: v for k, v in flatten_config(after).items() if k in changed}


@main.command("eval")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@_list_option("--lengths", parse=_parse_ints(1), example="20,30,50", metavar="K1,K2,...",
              help="Sequence lengths to evaluate (HMM n_steps, in steps), comma-separated, e.g. --lengths 20,30,50 "
                   "[default: the training length].")
@click.option("--n", "n_sequences", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Held-out sequences per length.")
@click.option("--seed", type=click.IntRange(min=0), default=12345, show_default=True,
              help="Seed of the evaluation sequences.")
@click.option("--shift-steps", "step_shift", type=click.IntRange(min=0), default=0, show_default=True,
              help="HMM TinyGPT: read step t at the position rows of step t + N (the training shift's "
                   "layout); writes eval_shiftN.json, leaving eval.json alone.")
@_quiet_option
def eval_command(run_dir, lengths, n_sequences, seed, step_shift, quiet):
    """Evaluate a run's latest checkpoint: per-position calibration curves, JSON and a plot."""
    _check_out(run_dir, "RUN_DIR")
    from windtunnel._progress import progress_bars
    from windtunnel.experiments.evaluation import evaluate_run
    from windtunnel.reports.evaluation import history_head

    with progress_bars(not quiet):
        report = evaluate_run(run_dir, lengths=lengths or (), n_sequences=n_sequences, seed=seed, step_shift=step_shift)
    if step_shift:
        click.echo(f"steps moved {step_shift} along the position table: step t reads the rows of step t + {step_shift}")
    for name, row in report.summary.items():
        se = row.get("entropy_mae_se_bits")
        se_text = f" (standard error {se:.5f})" if se is not None and se == se else ""
        click.echo(f"{name}: entropy MAE {row['entropy_mae_bits']:.5f} bits{se_text}, KL {row['kl_bits']:.5f} bits, "
                   f"accuracy {row['accuracy']:.3f}")
        if "windowed_filter_mae_bits" in row:
            ladder = ", ".join(f"w={w}: {mae:.4f}" for w, mae in row["windowed_filter_mae_bits"].items())
            beats, beaten_by = row["beats_memory_steps"], row["beaten_by_memory_steps"]
            place = " and ".join(
                text for text in (
                    f"better than w = {beats}" if beats is not None else "",
                    f"worse than w = {beaten_by}" if beaten_by is not None else "",
                ) if text
            )
            click.echo(f"  exact filters with a w-step memory: {ladder} bits; the model is {place}")
            click.echo(f"  the memoryless filter (uᵀT) ⊙ E[:, o_t]: {row['memoryless_filter_mae_bits']:.4f} bits")
    if report.circuit is not None:
        circuit = report.circuit
        click.echo("held-out R² of linear probes at the read positions (steps 2..K), per layer:")
        click.echo("  " + " ".join(f"{q:>22}" for q in ["layer", *circuit["r2"]]))
        for i, layer in enumerate(circuit["layers"]):
            click.echo("  " + " ".join(f"{v:>22}" for v in [layer, *(f"{r[i]:.3f}" for r in circuit["r2"].values())]))
        click.echo("attention mass from the read positions (steps 2..K), the largest head in each layer:")
        for block, per_layer in circuit["attention"].items():
            click.echo(f"  {block:>14}: " + ", ".join(f"{max(heads):.2f}" for heads in per_layer))
    if report.lag_response is not None:
        lag = report.lag_response
        click.echo("the belief's move when the observation d steps back changes (total variation; "
                   "exact filter / model / error of the model's move):")
        for d, exact, moved, error in zip(lag["lags"], lag["bayes_move_tv"], lag["model_move_tv"], lag["response_error_tv"]):
            click.echo(f"  d = {d}: {exact:.5f} / {moved:.5f} / {error:.5f}")
    if report.history_attention is not None:
        name, longest = list(report.history_attention.items())[-1]
        steps = longest["steps"]
        ticks = sorted({steps[0], *(steps[round(f * (len(steps) - 1))] for f in (0.25, 0.5, 0.75)), steps[-1]})
        click.echo(f"attention to the earlier observations by step t ({name}), the head of each layer "
                   f"with the most: mass on step t-1 / on all earlier steps / entropy among them (bits)")
        click.echo("  " + " " * 8 + "".join(f"{f't={t}':>20}" for t in ticks))
        for i, layer in enumerate(longest["layers"]):
            head = history_head(layer)
            cells = [
                f"{layer['previous_read'][head][t - 2]:.2f} / {layer['earlier_reads'][head][t - 2]:.2f} / "
                f"{layer['earlier_entropy_bits'][head][t - 2]:.1f}" for t in ticks
            ]
            click.echo(f"  block {i}:" + "".join(f"{c:>20}" for c in cells) + f"   (head {head})")
    geometry = report.geometry_variants
    if geometry is not None:
        from windtunnel.reports import geometry_variant_reasons, geometry_variant_rows

        if geometry.get("unavailable"):
            click.echo(f"geometry variants: none for this model ({geometry['unavailable']})")
        else:
            click.echo(f"geometry under every published definition (first {geometry['n_sequences']} sequences; "
                       "docs/theory.md §8.1–§8.3): variant: this run [paper]")
            reasons: dict[str, list[str]] = {}  # one line per reason, not one per variant
            for (quantity, name, value, paper, _, _), raw in zip(geometry_variant_rows(geometry), geometry_variant_reasons(geometry)):
                if raw is not None:
                    reasons.setdefault(raw, []).append(f"{quantity}, {name}" + (f" [paper: {paper}]" if paper != "—" else ""))
                    continue
                click.echo(f"  {quantity}, {name}: {value}" + (f"  [paper: {paper}]" if paper != "—" else ""))
            for reason, names in reasons.items():
                click.echo(f"  not measured ({reason.rstrip('.')}): " + "; ".join(names))
    click.echo(f"wrote {report.json_path} and {' and '.join(str(p) for p in report.figure_paths)}")


@main.command("memory")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--n", "n_sequences", type=click.IntRange(min=1), default=200, show_default=True,
              help="Sequences, the same at every saved model.")
@click.option("--seed", type=click.IntRange(min=0), default=12345, show_default=True,
              help="Seed of the sequences and of the observation changes.")
@click.option("--max-lag", type=click.IntRange(min=1), default=5, show_default=True, help="Longest lag measured (in steps).")
@_quiet_option
def memory_command(run_dir, n_sequences, seed, max_lag, quiet):
    """HMM: how much the belief hears each earlier observation, at every saved model of a run;
    writes memory.json and memory.png."""
    _check_out(run_dir, "RUN_DIR")
    from windtunnel._progress import progress_bars
    from windtunnel.experiments.evaluation import memory_over_training

    with progress_bars(not quiet):
        out = memory_over_training(run_dir, n_sequences=n_sequences, seed=seed, max_lag=max_lag)
    lags = [d for d in out["lags"] if d >= 1]
    click.echo("the model's move over the exact filter's when o_{t-d} changes (1 = heard at full weight), "
               "and the entropy MAE on the same sequences:")
    click.echo(f"  {'step':>8}" + "".join(f"{f'd = {d}':>9}" for d in lags) + f"{'MAE (bits)':>12}")
    for step, moved, mae in zip(out["steps"], out["model_move_tv"], out["entropy_mae_bits"]):
        cells = [moved[d] / out["bayes_move_tv"][d] if out["bayes_move_tv"][d] > 0 else float("nan") for d in lags]
        click.echo(f"  {step:>8}" + "".join(f"{c:>9.2f}" for c in cells) + f"{mae:>12.4f}")
    click.echo(f"wrote {out['paths']['json']} and {out['paths']['figure']}")


@main.command("dissociation")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--n", "n_sequences", type=click.IntRange(min=2), default=256, show_default=True,
              help="Sequences in the fixed probe batch.")
@_quiet_option
def dissociation_command(run_dir, n_sequences, quiet):
    """Frame–precision dissociation (docs/theory.md §8.6) over a run's saved models; writes dissociation.json/.png."""
    _check_out(run_dir, "RUN_DIR")
    from windtunnel._progress import progress_bars
    from windtunnel.experiments.dissociation import run_dissociation

    with progress_bars(not quiet):
        out = run_dissociation(run_dir, n_sequences=n_sequences)
    click.echo(f"{len(out['steps'])} checkpoints ({out['steps'][0]}..{out['steps'][-1]})")
    for name, step in out["settling_step"].items():
        click.echo(f"  {name:<32} settles at step {step}")
    click.echo(f"frame settled by {out['frame_settled_by']}, calibration by {out['precision_settled_by']}; "
               f"frame settles first: {out['frame_settles_first']}")
    click.echo(f"wrote {run_dir}/dissociation.json and dissociation.png")


@main.command("ablate")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--n", "n_sequences", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Held-out sequences.")
@click.option("--seed", type=click.IntRange(min=0), default=12345, show_default=True,
              help="Seed of the held-out sequences.")
@_quiet_option
def ablate_command(run_dir, n_sequences, seed, quiet):
    """Ablate every head and layer of a run's latest checkpoint (docs/theory.md §8.5); writes ablation.json."""
    _check_out(run_dir, "RUN_DIR")
    from windtunnel._progress import progress_bars
    from windtunnel.experiments.telemetry import ablate_run

    with progress_bars(not quiet):
        out = ablate_run(run_dir, n_sequences=n_sequences, seed=seed)
    click.echo(f"intact: entropy MAE {out['intact']['entropy_mae_bits']:.5f} bits")
    for row in sorted(out["rows"], key=lambda r: -r["delta_mae_bits"])[:10]:
        where = f"L{row['layer']}" + (f"H{row['head']}" if row["head"] is not None else "")
        click.echo(f"  {row['kind']:<14}{where:<7} ΔMAE {row['delta_mae_bits']:+.5f} bits, "
                   f"Δaccuracy {row['delta_accuracy']:+.3f}")
    if "lag_map" in out:
        lag_map = out["lag_map"]
        lags = lag_map["lags"][1:]
        click.echo("which heads carry which lags: the belief's move when o_{t-d} changes, with the head "
                   "ablated, as a fraction of the intact move (low = the head carries that lag)")
        click.echo("  " + " " * 7 + "".join(f"{f'd = {d}':>9}" for d in lags))
        intact = lag_map["intact"]["model_move_tv"]
        for row in lag_map["heads"]:
            cells = [row["model_move_tv"][d] / intact[d] if intact[d] > 0 else float("nan") for d in lags]
            click.echo(f"  L{row['layer']}H{row['head']:<4}" + "".join(f"{c:>9.2f}" for c in cells))
    click.echo(f"wrote {run_dir}/ablation.json")


@main.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Default RUN_DIR/report.html.")
def report_command(run_dir, out):
    """Self-contained HTML report of a run directory (figures embedded; reads the directory only)."""
    _check_out(out if out is not None else Path(run_dir) / "report.html", "--out", is_file=True)
    from windtunnel.reports import build_report

    path = build_report(run_dir, out=out)
    click.echo(f"wrote {path}")


@main.command("inspect")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A UTF-8 text file, tokenized with MODEL_DIR's tokenizer.")
@click.option("--max-tokens", type=click.IntRange(min=3), default=512, show_default=True,
              help="Read at most this many tokens of the text (and no more than the model's positions).")
@click.option("--out", type=click.Path(file_okay=False), default="runs/inspect", show_default=True,
              help="Folder for inspect.json and inspect.html.")
@_quiet_option
def inspect_command(model_dir, text_file, max_tokens, out, quiet):
    """Routing law, attention focusing and key geometry of every head of a local Hugging Face model.

    MODEL_DIR is a directory written by save_pretrained (config.json, *.safetensors, the
    tokenizer). Nothing is downloaded, no code from the directory runs and pickled weights are
    refused. Needs pip install 'windtunnel[hf]'.
    """
    _check_out(out)
    from windtunnel.experiments.inspection import inspect_model_dir

    with _busy("inspect: reading the model, one recorded forward and backward pass", quiet):
        result = inspect_model_dir(model_dir, text_file, out=out, max_tokens=max_tokens)
    click.echo(f"{result['model_class']} ({result['model_type']}), {result['n_tokens']} tokens of "
               f"{result['n_text_tokens']}: next-token cross-entropy {result['loss_nats']:.4f} nats")
    click.echo("layer  heads  attention entropy (bits)  mean |advantage|  keys mean |cos|  law check rel. error")
    for row in result["layers"]:
        layer_heads = [h for h in result["heads"] if h["layer"] == row["layer"]]
        adv = sum(h["advantage_abs_mean"] or 0.0 for h in layer_heads) / len(layer_heads)
        cos = sum(h["key_abs_cos"] or 0.0 for h in layer_heads) / len(layer_heads)
        entropy = row["attn_entropy_bits"]
        click.echo(f"{row['layer']:>5}  {row['n_heads']:>5}  {entropy if entropy is not None else float('nan'):>24.3f}"
                   f"  {adv:>16.3g}  {cos:>15.3f}  {row['law_check_rel_error']:>20.1e}")
    click.echo(f"focusing ratio {result['focusing_ratio']:.3f}; wrote {result['paths']['json']} and {result['paths']['html']}")


@main.command("upgrade")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def upgrade_command(run_dir):
    """Give the checkpoints of a run written before windtunnel 0.2 their content hash.

    Only for runs you trust: the old files are read as plain data (weights_only, so no code runs),
    but damage done to them before the upgrade cannot be detected afterwards.
    """
    from windtunnel.runs import RunDir, upgrade_checkpoint_file

    _check_out(run_dir, "RUN_DIR")
    run = RunDir(run_dir)
    run.lock()  # no trainer may write meanwhile
    try:
        paths = [p for p in (run.latest_checkpoint(),) if p is not None]
        paths += [p for _, p in run.checkpoints()] + [p for _, p in run.snapshots()]
        upgraded = [p for p in paths if upgrade_checkpoint_file(p)]
    finally:
        run.unlock()
    click.echo(f"upgraded {len(upgraded)} of {len(paths)} checkpoint files in {run_dir}; the others were already verified")


@main.command("sweep")
@click.argument("task", type=click.Choice(["bijection", "hmm", "recall"]))
@click.option("--config", "config", default=None, metavar="FILE|NAME",
              help="The recipe every trial starts from, as for train: a TOML file, a shipped recipe or a preset "
                   "(windtunnel presets); --set, --steps, --device and the grid apply on top [default: none].")
@click.option("--model", "model_name", default=None,
              type=click.Choice(["transformer", "mlp", "lstm", "hf"]),
              help="The model of every trial (as for train) [default: the config file's, else transformer].")
@click.option("--preset", default=None, type=click.Choice(["cpu", "paper"]),
              help="The preset every trial starts from (as for train) [default: the config file's, else cpu].")
@_list_option("--seeds", parse=_parse_seed_list, example="0-4", required=True, metavar="SEEDS",
              help="train.seed of the trials, one list: a range and/or comma-separated seeds, e.g. 0-4 or 0,3,7; "
                   "every grid point runs every seed (required).")
@click.option("--grid", "grid", multiple=True, metavar="SECTION.FIELD=V1,V2",
              help="A key and its comma-separated values, e.g. --grid train.lr=1e-3,3e-4 (repeatable, one key each; the "
                   "trials are every combination). A list-valued field's values are bracketed: --grid "
                   "eval_lengths=[30,50],[] [default: none, one grid point].")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="An override common to every trial, as for train (repeatable; a list field takes comma-separated "
                   "values) [default: none].")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Override train.steps (optimizer steps) of every trial [default: the preset's].")
@_device_option("the trials")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="The sweep directory: sweep.json, runs/<trial>/, summary.csv, summary.json. Rerunning the same "
                   "command continues it: finished trials are skipped, killed ones resume from their checkpoints.")
@click.option("--backend", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local: worker processes on this machine; ray: Ray Tune on a local Ray instance or on --address "
                   "(needs pip install 'windtunnel[ray]').")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Trials at once [default: local: cores // --threads (GPUs / --gpus-per-trial with GPUs); "
                   "ray: as the cluster allows].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads per trial (a Ray trial asks for this many CPUs) [default: local: cores // workers; ray: 1].")
@click.option("--address", default=None, help="Ray cluster to join ('auto' or HOST:PORT; --backend ray); the sweep "
              "directory must be on a file system every node sees [default: a local Ray instance].")
@click.option("--gpus-per-trial", "gpus_per_trial", type=click.FloatRange(min=0), default=None,
              help="GPU share of each trial, e.g. 0.25 trains four trials side by side on one GPU; 0 trains on the CPU "
                   "[default: 1 with --device cuda, or --device auto on a machine with a GPU; else 0].")
@click.option("--retry-failed", is_flag=True, help="Resume the trials a previous run recorded as failed, too.")
@click.option("--tensorboard", is_flag=True, help="Each trial also writes TensorBoard event files in its run directory, "
              "as train --tensorboard (needs pip install 'windtunnel[tensorboard]').")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True, metavar="R",
              help="Train each grid point's seeds in groups of up to R as one batched model (torch.vmap; one group per "
                   "worker): the same run directories as separate runs, to float rounding (docs/usage.md, replica "
                   "groups). TinyGPT and MLP without dropout; local backend only.")
@_quiet_option
def sweep_command(task, config, model_name, preset, seeds, grid, overrides, steps, device, out, backend, workers, threads,
                  address, gpus_per_trial, retry_failed, tensorboard, replicas, quiet):
    """Train a grid of settings over several seeds; each trial is an ordinary run directory.

    Every trial's config is checked before anything starts. A failing trial is recorded as failed
    (with its error) and the others go on; the command then exits with status 1. Writes
    OUT/summary.csv (one row per trial) and OUT/summary.json (per grid point: mean, standard
    deviation, 95 % interval over seeds, n); `windtunnel compare OUT` prints and draws them.
    After `windtunnel eval` of the trials, rerunning the same sweep command adds every geometry
    variant of their eval.json (columns geometry.QUANTITY.VARIANT, and the value manifold's
    position control as geometry.QUANTITY.VARIANT.FIELD).
    """
    _check_out(out)
    _check_sets(overrides)
    _check_device(device)
    from windtunnel.experiments.sweep import compare_sweeps, parse_grid, plan_sweep, run_sweep

    if address is not None and backend != "ray":
        raise click.UsageError("--address names a Ray cluster; add --backend ray.")
    if gpus_per_trial is None:
        import torch

        gpus_per_trial = 1.0 if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else 0.0
    elif device == "cuda" and not gpus_per_trial:
        raise click.UsageError("--device cuda and --gpus-per-trial 0 contradict each other; drop one.")
    spec = plan_sweep(task, model_name, preset, seeds, parse_grid(grid), overrides, steps, config=config, device=device)
    summary = run_sweep(spec, out, backend=backend, workers=workers, threads=threads, gpus_per_trial=gpus_per_trial,
                        address=address, retry_failed=retry_failed, echo=_echo(quiet), tensorboard=tensorboard, replicas=replicas)
    if summary["metrics"]:
        click.echo(compare_sweeps([out], metric="entropy_mae_bits" if "entropy_mae_bits" in summary["metrics"] else summary["metrics"][0])["text"])
    counts = summary["counts"]
    click.echo(f"wrote {out}/summary.csv and summary.json: {counts['finished']} finished, {counts['failed']} failed, "
               f"{counts['partial'] + counts['pending']} not finished")
    if counts["failed"]:
        raise click.ClickException(f"{counts['failed']} of {len(summary['trials'])} trials failed; their errors are in "
                                   f"{out}/summary.csv (rerun with --retry-failed to resume them).")


@main.command("compare")
@click.argument("sweep_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--metric", default="entropy_mae_bits", show_default=True,
              help="The final metric to compare (a column of summary.csv, e.g. kl_bits, accuracy, eval_len50.entropy_mae_bits).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="The figure [default: FIRST_SWEEP_DIR/compare.png].")
def compare_command(sweep_dirs, metric, out):
    """Print and draw sweeps side by side: a metric's mean and 95 % interval over seeds per grid point."""
    from windtunnel.experiments.sweep import compare_sweeps
    from windtunnel.runs import SweepDir

    out = out or str(SweepDir(sweep_dirs[0]).figure_path)
    _check_out(out, "--out", is_file=True)
    result = compare_sweeps(sweep_dirs, metric=metric, figure=out)
    click.echo(result["text"])
    click.echo(f"wrote {result['figure']}")


@main.command("presets")
@click.option("--show", "show", default=None, metavar="NAME",
              help="Print this preset's or shipped recipe's TOML (to copy into a file and edit) [default: list them all].")
def presets_command(show):
    """List the presets and the shipped recipes that --config NAME accepts: name, task, model, description, source.

    A preset (task/model/preset, e.g. hmm/transformer/cpu) is the starting point of --preset; a
    recipe is a config file of settings over a preset, measured in RESULTS.md / BENCHMARKS.md.
    """
    from windtunnel.presets import list_recipes, load_recipe, preset_names, recipe_names

    if show is not None:
        if show not in {*preset_names(), *recipe_names()}:
            from windtunnel._checks import close_matches

            raise click.BadParameter(f"no preset or shipped recipe {show!r};{close_matches(show, [*preset_names(), *recipe_names()])} "
                                     "windtunnel presets lists them.", param_hint="'--show'")
        click.echo(load_recipe(show).text, nl=False)
        return
    recipes = list_recipes()
    width = max(len(r.name) for r in recipes)
    for title, group in (("presets (--preset, or --config NAME):", [r for r in recipes if r.name.count("/") == 2]),
                         ("recipes (--config NAME):", [r for r in recipes if r.name.count("/") != 2])):
        click.echo(title)
        for r in group:
            click.echo(f"  {r.name:<{width}}  {r.task:<9}  {r.model:<11}  {r.description}")
            click.echo(f"  {'':<{width}}  source: {r.source}")
    click.echo("windtunnel presets --show NAME prints one as TOML; windtunnel train TASK --config NAME|FILE runs it.")


@main.group()
def reproduce() -> None:
    """Reproduce a paper experiment and write results, figures and a report."""



def _wind_tunnel_command(task: str):
    @click.option("--preset", default="cpu", show_default=True, type=click.Choice(["cpu", "paper"]),
                  help="'paper': the paper's recipe (meant for a GPU); 'cpu': ours, sized for 2 CPU cores.")
    @click.option("--out", type=click.Path(file_okay=False), default=None,
                  help=f"Output directory [default: runs/reproduce-{task}-<preset>].")
    @click.option("--seed", type=click.IntRange(min=0), default=None,
                  help="Override train.seed of every model [default: the presets', 0].")
    @_list_option("--models", parse=_parse_choices(("transformer", "mlp", "lstm")), example="transformer,lstm",
                  metavar="MODELS", help="Train only these models, comma-separated from transformer, mlp, lstm "
                                         "[default: every preset model of the task].")
    @_device_option("the models")
    @click.option("--tensorboard", is_flag=True, help="Each model's run directory also gets TensorBoard event files, "
                  "as train --tensorboard (needs pip install 'windtunnel[tensorboard]').")
    @_quiet_option
    def command(preset, out, seed, models, device, tensorboard, quiet):
        from windtunnel._progress import progress_bars
        from windtunnel.experiments.wind_tunnels import reproduce as run

        _check_device(device)
        out = out or f"runs/reproduce-{task}-{preset}"
        _check_out(out)
        with progress_bars(not quiet):
            result = run(task, preset=preset, out=out, seed=seed, models=models, device=device, progress=not quiet,
                         tensorboard=tensorboard)
        click.echo((Path(out) / "model_comparison.md").read_text())
        click.echo(f"wrote {out}/model_comparison.json, model_comparison.md and model_comparison.png ({len(result['models'])} models)")

    command.__doc__ = (
        f"Train the {task} wind tunnel's transformer and baselines; compare calibration with the paper."
    )
    return command


for _task in ("bijection", "hmm", "recall"):
    reproduce.command(_task)(_wind_tunnel_command(_task))

ARM_CHOICES = ("sgd", "two_timescale", "em", "alternating", "adam")
PAPER_SEEDS = (42, 2024, 1337, 7777, 9999)


@reproduce.command("em-vs-sgd")
@_list_option(
    "--seeds",
    parse=_parse_seed_list,
    example="42,2024,1337",
    metavar="SEEDS",
    help="Run seeds, one list: comma-separated seeds and/or ranges, e.g. 42,2024,1337 or 0-4 "
    "[default: the paper's 42,2024,1337,7777,9999; 42,2024 with --quick].",
)
@click.option(
    "--steps",
    "n_steps",
    type=click.IntRange(min=1),
    default=None,
    help="Optimiser steps per arm [default: 1000; 300 with --quick].",
)
@_list_option(
    "--arms",
    parse=_parse_choices(ARM_CHOICES),
    example="sgd,two_timescale,em",
    metavar="ARMS",
    help="Optimiser arms, comma-separated from sgd, two_timescale, em, alternating, adam "
    "[default: sgd,two_timescale].",
)
@click.option(
    "--model",
    type=click.Choice(["single", "deep"]),
    default="single",
    show_default=True,
    help="The reference single head, or the 4-layer deep variant (AdamW).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="runs/em-vs-sgd",
    show_default=True,
    help="Output directory.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="A short smoke run (2 seeds x 300 steps) instead of the paper setting.",
)
@click.option(
    "--rng",
    type=click.Choice(["reference", "independent"]),
    default="reference",
    show_default=True,
    help="reference: the authors' draw order (bit-exact on CPU); independent: derived generators.",
)
@click.option(
    "--normalization",
    type=click.Choice(["reference", "exact"]),
    default="reference",
    show_default=True,
    help="Sticky transition matrix: the authors' (self 0.3498) or exact (0.3).",
)
@click.option(
    "--telemetry-every",
    type=click.IntRange(min=0),
    default=None,
    help="Routing telemetry every N steps, 0 = off [default: 100; 50 with --quick].",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads. The single head runs replica groups on this many worker threads, "
    "each with one torch thread (robust when other jobs share the cores); the deep "
    "model uses torch intra-op threads [default: torch's thread count].",
)
@_quiet_option
def em_vs_sgd_command(
    seeds, n_steps, arms, model, out_dir, quick, rng, normalization, telemetry_every, threads, quiet
) -> None:
    """Paper II: EM-like (two-timescale) vs SGD on the sticky Markov chain (docs/theory.md §4).

    Writes OUT/results.json, OUT/curves.png, OUT/telemetry.png and OUT/report.md.
    """
    _check_out(out_dir)
    import torch
    from tqdm import tqdm

    from windtunnel.experiments.em_vs_sgd import EmVsSgdConfig, run_em_vs_sgd, total_steps
    from windtunnel.reports.em_vs_sgd import write_em_vs_sgd_outputs
    from windtunnel.tasks.sticky_markov import StickyMarkov

    if model == "deep" and arms is not None:
        raise click.UsageError(
            "--arms applies to --model single only; --model deep trains with AdamW."
        )
    if seeds is not None and len(seeds) == 1 and 1 <= seeds[0] <= len(PAPER_SEEDS):
        # windtunnel 0.2 and earlier read --seeds N as a count (the paper's first N seeds); say so
        # once, since an old command line now runs one seed without failing.
        paper = ",".join(map(str, PAPER_SEEDS[: seeds[0]]))
        click.echo(f"note: --seeds {seeds[0]} runs the one seed {seeds[0]}; --seeds used to be a count "
                   f"(windtunnel 0.2 and earlier): for the paper's first {seeds[0]} seed(s) write --seeds {paper}.",
                   err=True)
    seeds = seeds or PAPER_SEEDS[: 2 if quick else 5]
    torch_threads = torch.get_num_threads()
    threads = threads or torch_threads
    config = EmVsSgdConfig(
        seeds=seeds,
        n_steps=n_steps or (300 if quick else 1000),
        arms=arms or ("sgd", "two_timescale"),
        model=model,
        rng=rng,
        telemetry_every=(50 if quick else 100) if telemetry_every is None else telemetry_every,
        n_workers=threads if model == "single" else 1,
        task=StickyMarkov(normalization=normalization),
    )
    torch.set_num_threads(1 if model == "single" else threads)
    try:
        with tqdm(total=total_steps(config), desc=f"em-vs-sgd ({model})", unit="step", disable=quiet) as bar:
            results = run_em_vs_sgd(config, progress=bar.update)
    finally:
        torch.set_num_threads(torch_threads)
    paths = write_em_vs_sgd_outputs(results, out_dir)
    for name, agg in results["aggregate"].items():
        extra = (
            f", {agg['speedup_vs_sgd']:.2f}x to SGD's mean final"
            if "speedup_vs_sgd" in agg and name != "sgd"
            else ""
        )
        click.echo(
            f"{name:>14}: final CE {agg['final_loss_mean']:.4f} ± {agg['final_loss_std']:.4f} nats, "
            f"accuracy {agg['final_accuracy_mean']:.3f}{extra}"
        )
    click.echo(
        f"exact Bayes CE {results['bayes_loss_nats']:.4f}, H_min {results['conditional_entropy_nats']:.4f} nats;"
        f" wrote {', '.join(str(p) for p in paths.values())}"
    )


if __name__ == "__main__":  # pragma: no cover
    main()
