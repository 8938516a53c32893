"""Every command and every option of the command line says what it is for.

Walks the click command tree (groups included, so ``reproduce hmm`` is checked), and reads each
command's ``--help`` page as a user would.
"""

import click
import pytest
from click.testing import CliRunner

from windtunnel.cli import main


def _commands(command, path):
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from _commands(sub, [*path, name])
    else:
        yield path, command


COMMANDS = list(_commands(main, []))


def test_the_walk_finds_every_command():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"train", "eval", "report", "inspect", "reproduce em-vs-sgd", "reproduce hmm"} <= names


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_option_has_help_text_and_the_help_page_renders(path, command):
    missing = [opt.opts[0] for opt in command.params if isinstance(opt, click.Option) and not (opt.help or "").strip()]
    assert not missing, f"windtunnel {' '.join(path)}: options without help text: {missing}"
    assert (command.help or "").strip(), f"windtunnel {' '.join(path)} has no description"
    page = CliRunner().invoke(main, [*path, "--help"])
    assert page.exit_code == 0, page.output
    for opt in command.params:
        if isinstance(opt, click.Option):
            assert opt.opts[0] in page.output


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_option_with_a_value_says_its_default(path, command):
    """An option that takes a value shows its default (show_default) or names it in its help
    ("[default: ...]", or "required"); flags are off unless given."""
    silent = [
        opt.opts[0] for opt in command.params
        if isinstance(opt, click.Option) and not opt.is_flag and opt.opts[0] not in ("--help", "--version")
        and not opt.required and not opt.show_default and "default" not in (opt.help or "").lower()
    ]
    assert not silent, f"windtunnel {' '.join(path)}: options that do not say their default: {silent}"
