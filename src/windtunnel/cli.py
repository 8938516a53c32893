"""The ``windtunnel`` command line: parse options, build configs, call the library.

Each command lives in its own function below; ``reproduce`` groups the paper reproductions.
"""

from __future__ import annotations

import click

from windtunnel import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="windtunnel")
def main() -> None:
    """windtunnel: the routing law of softmax attention, checked; Bayesian wind tunnels, measured."""


@main.command("verify-law")
@click.option("--trials", default=200, show_default=True, type=click.IntRange(min=1),
              help="Random heads per dtype.")
@click.option("--dtype", "dtypes", type=click.Choice(["float64", "float32"]), multiple=True,
              help="Dtype to check (repeatable); default: both.")
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


@main.group()
def reproduce() -> None:
    """Reproduce a paper experiment and write results, figures and a report."""


ARM_CHOICES = ("sgd", "two_timescale", "em", "alternating", "adam")
PAPER_SEEDS = (42, 2024, 1337, 7777, 9999)


def _parse_arms(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[str, ...] | None:
    if value is None:
        return None
    arms = tuple(a.strip() for a in value.split(",") if a.strip())
    bad = [a for a in arms if a not in ARM_CHOICES]
    if not arms or bad or len(set(arms)) != len(arms):
        raise click.BadParameter(
            f"must be a comma-separated list of distinct names from {', '.join(ARM_CHOICES)}; got {value!r}.",
            ctx=ctx,
            param=param,
        )
    return arms


@reproduce.command("em-vs-sgd")
@click.option(
    "--seeds",
    "n_seeds",
    type=click.IntRange(min=1),
    default=None,
    help="Number of seeds: the first N of 42, 2024, 1337, 7777, 9999, then 100, 101, ... "
    "[default: 5; 2 with --quick]",
)
@click.option(
    "--steps",
    "n_steps",
    type=click.IntRange(min=1),
    default=None,
    help="Optimiser steps per arm [default: 1000; 300 with --quick].",
)
@click.option(
    "--arms",
    callback=_parse_arms,
    default=None,
    help="Comma-separated arms from sgd, two_timescale, em, alternating, adam "
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
def em_vs_sgd_command(
    n_seeds, n_steps, arms, model, out_dir, quick, rng, normalization, telemetry_every, threads
) -> None:
    """Paper II: EM-like (two-timescale) vs SGD on the sticky Markov chain (SPEC §4).

    Writes OUT/results.json, OUT/curves.png, OUT/telemetry.png and OUT/report.md.
    """
    import torch
    from tqdm import tqdm

    from windtunnel.experiments.em_vs_sgd import EmVsSgdConfig, run_em_vs_sgd, total_steps
    from windtunnel.reports.em_vs_sgd import write_em_vs_sgd_outputs
    from windtunnel.tasks.sticky_markov import StickyMarkov

    if model == "deep" and arms is not None:
        raise click.UsageError(
            "--arms applies to --model single only; --model deep trains with AdamW."
        )
    n_seeds = n_seeds or (2 if quick else 5)
    seeds = (PAPER_SEEDS + tuple(range(100, 100 + max(0, n_seeds - 5))))[:n_seeds]
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
        with tqdm(total=total_steps(config), desc=f"em-vs-sgd ({model})", unit="step") as bar:
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
