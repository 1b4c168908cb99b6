"""The documentation that code cites exists, and nothing cites documents users do not have.

Code comments and docstrings cite the repository's documents as ``docs/<name>.md``, optionally with a
section (``docs/routing.md §3``) and a step of that section (``docs/routing.md §3 step 6``). These
tests check, over the Python files of megatron_moe/, tests/, bench/, scripts/, the top-level Python
files and README.md, that every such citation resolves (the file exists, the section has a heading
``## §N ``, the step is a numbered item of that section), and that no file still cites the internal
routing spec (``ROUTING_SPEC``, ``../shared/`` or a bare ``spec N``).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
SOURCE_DIRS = ("megatron_moe", "tests", "bench", "scripts")

CITATION = re.compile(r"\bdocs/(?P<name>[\w-]+(?:/[\w-]+)*)\.md(?: §(?P<section>\d+)(?: step (?P<step>\d+))?)?")
SECTION_HEADING = re.compile(r"^## §(\d+) ", re.MULTILINE)
FORBIDDEN = (
    ("ROUTING_SPEC", re.compile(re.escape("ROUTING_SPEC"))),
    ("../shared/", re.compile(re.escape("../shared/"))),
    ("bare 'spec N' citation", re.compile(r"\bspec \d")),
)


def _sources() -> list[Path]:
    """README.md, the top-level *.py files and every *.py file under SOURCE_DIRS."""
    files = [ROOT / "README.md", *sorted(ROOT.glob("*.py"))]
    for name in SOURCE_DIRS:
        files.extend(sorted((ROOT / name).rglob("*.py")))
    return [f for f in files if f.is_file() and "__pycache__" not in f.parts]


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _sections(doc: Path) -> dict[int, str]:
    """Section number -> text of that section (from its ``## §N `` heading to the next ``## `` heading)."""
    text = doc.read_text(encoding="utf-8")
    out = {}
    for match in SECTION_HEADING.finditer(text):
        end = text.find("\n## ", match.end())
        out[int(match.group(1))] = text[match.start() : len(text) if end < 0 else end]
    return out


def _citations() -> list[tuple[str, int, re.Match]]:
    return [
        (_rel(path), lineno, match)
        for path in _sources()
        for lineno, line in enumerate(_lines(path), start=1)
        for match in CITATION.finditer(line)
    ]


def _citation_problem(match: re.Match) -> str | None:
    doc = ROOT / "docs" / f"{match['name']}.md"
    if not doc.is_file():
        return f"{_rel(doc)} does not exist"
    if match["section"] is None:
        return None
    sections = _sections(doc)
    section = int(match["section"])
    if section not in sections:
        return f"{_rel(doc)} has no heading line starting with '## §{section} '"
    if match["step"] is not None and not re.search(rf"^\s*{match['step']}\. ", sections[section], re.MULTILINE):
        return f"{_rel(doc)} §{section} has no numbered step {match['step']}"
    return None


def test_sources_are_found_and_cite_the_docs():
    """Guard against a vacuous pass: the scan sees the package and its section citations."""
    sources = {_rel(p) for p in _sources()}
    assert {"README.md", "megatron_moe/routing/sparsemixer.py", "tests/test_docs.py"} <= sources
    cited = {(m["name"], m["section"]) for _, _, m in _citations()}
    assert ("routing", "3") in cited


def test_every_doc_citation_resolves():
    problems = [
        f"{path}:{lineno}: '{match.group(0)}': {problem}"
        for path, lineno, match in _citations()
        if (problem := _citation_problem(match)) is not None
    ]
    assert not problems, "unresolved documentation citations:\n" + "\n".join(problems)


def test_no_citation_of_the_internal_spec():
    problems = []
    for path in _sources():
        if path.resolve() == THIS:
            continue
        for lineno, line in enumerate(_lines(path), start=1):
            for what, pattern in FORBIDDEN:
                if pattern.search(line):
                    problems.append(f"{_rel(path)}:{lineno}: {what}: {line.strip()}")
    assert not problems, "citations of documents users do not have:\n" + "\n".join(problems)


def test_doc_sections_are_numbered_in_order():
    """Numbered sections of every doc run 1, 2, 3, ... so that '§N' citations stay stable."""
    for doc in sorted((ROOT / "docs").glob("*.md")):
        numbers = [int(n) for n in SECTION_HEADING.findall(doc.read_text(encoding="utf-8"))]
        assert numbers == list(range(1, len(numbers) + 1)), f"{_rel(doc)}: sections {numbers}"


def test_routing_doc_sections_and_sparsemixer_steps():
    sections = _sections(ROOT / "docs" / "routing.md")
    assert sorted(sections) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 8):
        assert re.search(rf"^{step}\. \*\*", sections[3], re.MULTILINE), f"§3 lacks step {step}"
