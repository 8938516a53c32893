"""The papers' numbers are typed once (windtunnel.paper_numbers), with sources a reader can look up,
and every report and reproduction reads that one table."""

import ast
import importlib.util
import re
from pathlib import Path

import pytest

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


# The first number of a paper text, optionally a bound ("> 80 %", "< 0.1") or a range ("84–90 %"), with
# its unit; a digit inside a name (PC1, PC2) is not a number.
_STATED = re.compile(r"(?<![\w.])([<>] ?)?(\d+(?:\.\d+)?)(?:–(\d+(?:\.\d+)?))? ?(%|×)?")


def _stated_band(text: str) -> tuple[float | None, float | None]:
    """(low, high) as the text states it, a percentage as a fraction."""
    match = _STATED.search(text)
    bound, first, second, unit = match.groups()
    scale = 0.01 if unit == "%" else 1.0
    low, high = float(first) * scale, float(second or first) * scale
    if bound:
        return (low, None) if bound.startswith(">") else (None, high)
    return low, high


def test_every_band_is_the_one_its_text_states():
    banded = [n for n in PAPER_NUMBERS if n.low is not None or n.high is not None]
    assert {n.key for n in banded} >= {"bijection.transformer.key_orthogonality", "bijection.transformer.value_manifold",
                                       "bijection.transformer.value_manifold_target", "bijection.transformer.focusing",
                                       "bijection.transformer.weight_columns"}
    for n in banded:
        low, high = _stated_band(n.paper)
        assert (n.low, n.high) == (pytest.approx(low) if low is not None else None, pytest.approx(high) if high is not None else None), n.key
    assert paper_number("bijection.transformer.value_manifold").low == pytest.approx(0.84)  # "PC1 84–90 %", not the 1 of PC1
    # every text that states a range of the entry's quantity has its band
    unbanded_ranges = {n.key for n in PAPER_NUMBERS if n.low is None and n.high is None and re.search(r"\d–\d", n.paper)}
    assert unbanded_ranges == {"bijection.transformer.dissociation"}  # steps and an MAE ratio: two quantities, no one band


def test_the_band_parser_reads_ranges_bounds_and_percentages():
    assert _stated_band("PC1 84–90 %, PC1+PC2 88–95 %") == (pytest.approx(0.84), pytest.approx(0.90))
    assert _stated_band("PC1 > 80 % with a strong entropy correlation") == (pytest.approx(0.80), None)
    assert _stated_band("< 0.1") == (None, 0.1)
    assert _stated_band("0.052 vs 0.082 random") == (0.052, 0.052)
    assert _stated_band("PC1+PC2 51–99.7 %") == (pytest.approx(0.51), pytest.approx(0.997))


def test_a_band_is_checked_when_the_number_is_made():
    with pytest.raises(ValueError, match="'a.b.c': low must be <= high; got low=0.9, high=0.8"):
        paper_numbers.PaperNumber("a.b.c", "a", "b", "c", "90–80 %", "x", low=0.9, high=0.8)
    with pytest.raises(ValueError, match="value must lie in the band"):
        paper_numbers.PaperNumber("a.b.c", "a", "b", "c", "0.5", "x", value=0.5, low=0.6, high=0.7)
    with pytest.raises(ValueError, match="high must be a finite number or None; got nan"):
        paper_numbers.PaperNumber("a.b.c", "a", "b", "c", "0.5", "x", high=float("nan"))
    assert paper_numbers.PaperNumber("a.b.c", "a", "b", "c", "0.5", "x", value=0.5, low=0.5, high=0.5).value == 0.5


def test_the_scale_figure_reads_its_bands_from_the_table():
    spec = importlib.util.spec_from_file_location("geometry_scale", PACKAGE.parents[1] / "docs" / "figures" / "geometry_scale.py")
    figure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figure)
    # the bands the script typed before it read them here (its 2L/64 ... 6L/192 figure in RESULTS.md)
    before = {"key_orthogonality": [(0.052, 0.052), (0.09, 0.12)], "value_manifold_pc1_share": [(0.84, 0.90), (0.80, 0.80)],
              "focusing_ratio": [(0.85, 0.90)]}
    for quantity, bands in before.items():
        got = figure.paper_bands(quantity)
        assert [(low, high) for low, high, _ in got] == [(pytest.approx(a), pytest.approx(b)) for a, b in bands], quantity
        assert all(paper_number(key).paper in label for key, (_, _, label) in zip(figure.PANELS[quantity][1], got))
    assert paper_number(figure.PAPER_MAE).value == 0.007
