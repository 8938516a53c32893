"""The README's examples run as written: its Python blocks (and those of docs/usage.md), and its
five-minute wind-tunnel walk-through, read from the README itself and run at a tiny size, as CI
(.ci/run) reads the two commands after `<!-- ci:test -->` and `<!-- ci:main -->`."""

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from windtunnel.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
USAGE = ROOT / "docs" / "usage.md"

# Appended to each walk-through command: the same command, at a size that runs in seconds (a
# repeated click option takes the last value, so these override the README's own sizes).
TINY = {
    "train": ["--steps", "4", "--set", "model.d_model=16", "--set", "model.d_mlp=32", "--set", "model.n_heads=2",
              "--set", "train.batch_size=8", "--set", "train.eval_size=16", "--set", "train.eval_batch_size=16",
              "--set", "train.eval_every=4", "--set", "train.checkpoint_every=4", "--set", "train.warmup_steps=1",
              "--set", "train.device=cpu"],
    "eval": ["--n", "16"],
    "ablate": ["--n", "16"],
    "report": [],
}


def tagged_commands(text: str, tag: str) -> list[str]:
    """The command lines of the first fenced block after the line ``<!-- tag -->``."""
    match = re.search(rf"^<!-- {re.escape(tag)} -->\n```\w*\n(.*?)^```", text, flags=re.S | re.M)
    assert match, f"README.md has no code block after <!-- {tag} -->"
    return [line.strip() for line in match.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("path", [README, USAGE], ids=lambda p: p.name)
def test_python_blocks_run(path):
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert blocks, f"{path.name} has no python example"
    for block in blocks:
        exec(compile(block, str(path), "exec"), {})


def test_ci_reads_the_two_commands_the_readme_shows():
    text = README.read_text()
    assert tagged_commands(text, "ci:main")[0].endswith("windtunnel reproduce em-vs-sgd --out runs/em-vs-sgd")
    assert tagged_commands(text, "ci:test")[0].endswith("&& pytest")


def test_the_walkthrough_runs_at_a_tiny_size(tmp_path, monkeypatch):
    commands = tagged_commands(README.read_text(), "walkthrough")
    assert [shlex.split(c)[1] for c in commands] == ["train", "eval", "ablate", "report"]
    monkeypatch.chdir(tmp_path)
    for command in commands:
        words = shlex.split(command)
        assert words[0] == "windtunnel" and words[1] in TINY, f"no tiny size for the walk-through command {command!r}"
        result = CliRunner().invoke(main, [*words[1:], *TINY[words[1]]], catch_exceptions=False)
        assert result.exit_code == 0, f"{command}: {result.output}"
    run = tmp_path / "runs" / "tour"
    assert {"eval.json", "ablation.json", "report.html"} <= {p.name for p in run.iterdir()}
    assert "Paper numbers beside ours" in (run / "report.html").read_text()


def test_tagged_commands_reads_only_the_tagged_block():
    text = "x\n<!-- walkthrough -->\n```bash\nwindtunnel train a\n# a comment\n\nwindtunnel eval b\n```\n```bash\nother\n```\n"
    assert tagged_commands(text, "walkthrough") == ["windtunnel train a", "windtunnel eval b"]
    with pytest.raises(AssertionError, match="no code block after"):
        tagged_commands(text, "ci:main")


def test_relative_links_of_the_readme_and_docs_resolve():
    missing = []
    for path in (README, *sorted((ROOT / "docs").glob("*.md"))):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target and not (path.parent / target).exists():
                missing.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not missing, missing
