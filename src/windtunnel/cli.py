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


@main.group()
def reproduce() -> None:
    """Reproduce a paper experiment and write results, figures and a report."""


if __name__ == "__main__":  # pragma: no cover
    main()
