"""Every reference in the package, the README, RESULTS.md, BENCHMARKS.md, docs/ and benchmarks/
points to something that ships.

The package cites docs/theory.md by section ("docs/theory.md §8.6"); these tests fail when a
file cites an internal notebook or tag that does not ship (the word SPEC, [JL], [REF], [P2],
[D], [M], "P3 recap"), or a section of docs/theory.md that does not exist.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THEORY = ROOT / "docs" / "theory.md"
TEXT_SUFFIXES = {".py", ".md", ".txt", ".rst", ".html", ".toml", ".cfg", ".json", ".yaml", ".yml"}

FORBIDDEN = {
    "the word SPEC": re.compile(r"\bSPEC\b"),
    "[JL]": re.compile(r"\[JL\]"),
    "[REF]": re.compile(r"\[REF\]"),
    "[P1]/[P2]/[P3] (with or without a version)": re.compile(r"\[P[123](?:v\d+)?\]"),
    "[D]": re.compile(r"\[D\]"),
    "[M]": re.compile(r"\[M\]"),
    "P3 recap": re.compile(r"P3 recap", re.IGNORECASE),
}

# A section number: 8, 8.6; "§8.1–§8.3" and "§7, §11.3" are two numbers each.
SECTION = re.compile(r"§\s*(\d+(?:\.\d+)*)")
# A § reference that names another document right before it ("STYLE.md §2") is not ours to check,
# nor one that names a paper and its version ("arXiv 2512.23752v1, §4.4", "Paper III v1 §2", "{PAPER_III}v1, §2").
OTHER_DOCUMENT = re.compile(r"(\S+\.(?:md|rst|txt)|(?:arXiv \d{4}\.\d{5}|\{PAPER_I{1,3}\}|Paper I{1,3}) ?v\d+,?)\s*$")
HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)


def scanned_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "RESULTS.md", ROOT / "BENCHMARKS.md"]
    for folder in (ROOT / "src", ROOT / "docs", ROOT / "benchmarks"):
        files += [p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES]
    return sorted(p for p in files if "__pycache__" not in p.parts)


def forbidden_hits(text: str) -> list[str]:
    """'line N: tag' for every forbidden tag in ``text``."""
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        hits += [f"line {number}: {name}" for name, pattern in FORBIDDEN.items() if pattern.search(line)]
    return hits


def theory_sections(text: str) -> set[str]:
    """The numbers of the headings of docs/theory.md ('## 2. ...' -> '2', '### 2.2 ...' -> '2.2')."""
    return set(HEADING.findall(text))


def section_references(text: str) -> list[str]:
    """Every section number cited with §, except those right after another document's name."""
    refs = []
    for match in SECTION.finditer(text):
        # walk back over a chain of references ("docs/theory.md §7, §11.3") to the document named
        start = match.start()
        before = text[max(0, start - 200):start]
        chain = re.search(r"((?:§\s*\d+(?:\.\d+)*(?:[\s,;–-]|and\b|or\b)*)*)$", before)
        head = before[: len(before) - len(chain.group(1))] if chain else before
        other = OTHER_DOCUMENT.search(head)
        if other and not other.group(1).endswith("theory.md"):
            continue
        refs.append(match.group(1))
    return refs


def test_no_reference_to_anything_that_does_not_ship():
    problems = []
    for path in scanned_files():
        problems += [f"{path.relative_to(ROOT)} {hit}" for hit in forbidden_hits(path.read_text(encoding="utf-8"))]
    assert not problems, "internal references that do not ship (cite docs/theory.md §x.y or a paper):\n" + "\n".join(problems)


def test_every_section_reference_exists_in_theory():
    sections = theory_sections(THEORY.read_text(encoding="utf-8"))
    missing = []
    for path in scanned_files():
        for ref in section_references(path.read_text(encoding="utf-8")):
            if ref not in sections:
                missing.append(f"{path.relative_to(ROOT)}: §{ref}")
    assert not missing, "sections cited but not in docs/theory.md:\n" + "\n".join(sorted(set(missing)))


def test_the_package_cites_theory_by_section():
    cited = [p for p in scanned_files() if p.suffix == ".py" and "docs/theory.md §" in p.read_text(encoding="utf-8")]
    assert len(cited) >= 20  # the docstrings point readers to the theory


def test_theory_keeps_the_section_numbers_the_code_cites():
    sections = theory_sections(THEORY.read_text(encoding="utf-8"))
    expected = {
        *(f"2.{i}" for i in range(1, 9)), *(f"3.{i}" for i in range(1, 5)), *(f"4.{i}" for i in range(1, 6)),
        *(f"5.{i}" for i in range(1, 5)), "6.1", "6.2", *(f"8.{i}" for i in range(1, 8)),
        *(str(i) for i in range(1, 13)),
    }
    assert expected <= sections, sorted(expected - sections)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("see SPEC §4.3 for details", ["line 1: the word SPEC"]),
        ("ok\nfrom [JL] and [REF]", ["line 2: [JL]", "line 2: [REF]"]),
        ("[P2] boxed, [P1v3] table, [D] derived, [M] measured", ["line 1: [P1]/[P2]/[P3] (with or without a version)", "line 1: [D]", "line 1: [M]"]),
        ("85-90 % (P3 recap)", ["line 1: P3 recap"]),
        ("INSPECT, specs, docs/theory.md §8.6, x[d], arXiv 2512.22471v3", []),
    ],
)
def test_forbidden_tags_are_caught(text, expected):
    assert sorted(forbidden_hits(text)) == sorted(expected)


def test_section_references_are_parsed():
    text = "(docs/theory.md §7, §11.3) and docs/theory.md §8.1–§8.3; STYLE.md §2; the §8.6 schedule; §12 #23"
    assert section_references(text) == ["7", "11.3", "8.1", "8.3", "8.6", "12"]
    papers = "arXiv 2512.23752v1, §5.5, Table 2; Paper III v1 §2, §6.6; {PAPER_III}v1, §4.4; Paper III §9"
    assert section_references(papers) == ["9"]  # a paper's sections need its version; unversioned is ours
    assert theory_sections("## 2. Gradients\n### 2.2 Score\n#### not a number\n## 12. Choices\n") == {"2", "2.2", "12"}
