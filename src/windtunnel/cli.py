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


if __name__ == "__main__":  # pragma: no cover
    main()
