"""The papers' numbers are typed once (windtunnel.paper_numbers), with sources a reader can look up,
and every report and reproduction reads that one table."""

import ast
import re
from pathlib import Path

from windtunnel import paper_numbers, reports
from windtunnel.experiments import wind_tunnels
from windtunnel.paper_numbers import PAPER_NUMBERS, REPOSITORY, paper_number
from windtunnel.probes import GEOMETRY_VARIANTS
from windtunnel.reports import em_vs_sgd, paper_table_rows

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "windtunnel"

# One source: a paper (arXiv id, optional version, optional places ", §N.M", ", Table N", ", Fig. N", optional
# ", recalling arXiv ...") or a file of the authors' public repository.
PAPER_SOURCE = re.compile(r"arXiv \d{4}\.\d{5}(v\d+)?(, (§\d+(\.\d+)*|Table \d+|Fig\. \d+))*(, recalling arXiv \d{4}\.\d{5}(v\d+)?)?")
REPOSITORY_SOURCE = re.compile(re.escape(REPOSITORY) + r", [\w./-]+( \(the authors' follow-up\))?")


def test_every_source_names_a_paper_or_a_file_of_the_authors_repository():
    for number in PAPER_NUMBERS:
        for part in number.source.split("; "):
            assert PAPER_SOURCE.fullmatch(part) or REPOSITORY_SOURCE.fullmatch(part), (number.key, part)
    assert not PAPER_SOURCE.fullmatch("authors' README") and not REPOSITORY_SOURCE.fullmatch("REPRODUCE.md")
    assert PAPER_SOURCE.fullmatch("arXiv 2512.23752v1, §4.4, Table 2, recalling arXiv 2512.22471")
    assert not PAPER_SOURCE.fullmatch("arXiv 2512.23752v1, Table") and not PAPER_SOURCE.fullmatch("arXiv 2512.23752, section 4")


def test_paper_iii_entries_name_the_version_and_the_place_they_were_read_in():
    # sections and tables move between arXiv versions: a place without a version cannot be looked up
    for number in PAPER_NUMBERS:
        if number.source.startswith("arXiv 2512.23752"):
            assert number.source.startswith("arXiv 2512.23752v1, "), (number.key, number.source)
    assert paper_number("llm.llm.focusing").source == "arXiv 2512.23752v1, Table 2"
    assert paper_number("llm.llm.value_manifold").source == "arXiv 2512.23752v1, Table 1"


def test_the_reports_and_the_reproduction_read_the_one_table():
    assert reports.PAPER_NUMBERS is PAPER_NUMBERS
    assert em_vs_sgd.PAPER is paper_numbers.STICKY_REFERENCE
    # reproduce's comparison rows are the table's single-valued entries, the same objects' values
    assert wind_tunnels.paper_rows("hmm", "transformer") == [
        (n.quantity, n.value, n.source) for n in (paper_number("hmm.transformer.entropy_mae"),
                                                  paper_number("hmm.transformer.entropy_mae_k30"),
                                                  paper_number("hmm.transformer.entropy_mae_k50"))]
    assert wind_tunnels.paper_rows("bijection", "mlp") == [("entropy MAE (bits)", 1.107, paper_number("bijection.mlp.entropy_mae").source)]
    # the report's table and the geometry definitions show the same entries
    report = {n.key for _, n in paper_table_rows("bijection")}
    assert {"bijection.transformer.key_orthogonality", "bijection.transformer.value_manifold", "bijection.transformer.focusing"} <= report
    assert paper_number("bijection.transformer.focusing").cited == GEOMETRY_VARIANTS["focusing_ratio"]["sites"].paper


def _string_literals(path: Path) -> list[str]:
    """Every string constant of a module except docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_no_module_but_the_table_types_a_paper_number_in_its_code():
    numbers = ("7.5e-5", "0.052 vs 0.082", "84–90", "85–90", "0.0067", "2.0647", "1.9319")
    found = {}
    for path in PACKAGE.rglob("*.py"):
        for literal in _string_literals(path):
            for number in numbers:
                if number in literal:
                    found.setdefault(number, set()).add(path.name)
    assert found and all(files == {"paper_numbers.py"} for files in found.values()), found


def test_the_literal_scan_would_see_a_second_copy(tmp_path):
    copy = tmp_path / "copy.py"
    copy.write_text('"""7.5e-5 in a docstring is prose."""\nPAPER = {"hmm": "7.5e-5"}\n')
    assert _string_literals(copy) == ["hmm", "7.5e-5"]  # the docstring is skipped, the copy is seen
