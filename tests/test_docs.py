"""The documentation the code cites is in the repository, down to the cited sections."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITED = re.compile(r"(?<![\w/.-])((?:docs/)?[\w.-]+\.md)`{0,2}(?:\s+(?:section\s+|§)([\d.]+))?")


def cited_files() -> list[Path]:
    """Every Python file of the project and the README: what a reader follows citations from."""
    files = [ROOT / "README.md"]
    for package in ("forwarder", "forwarder_sim", "tests", "bench", "scripts"):
        files += sorted((ROOT / package).rglob("*.py"))
    return [path for path in files if path.exists()]


def test_every_cited_markdown_file_and_section_exists() -> None:
    """A citation like `docs/upstream.md section 5` names a file here with a `## 5.` heading."""
    citations = 0
    for path in cited_files():
        for match in CITED.finditer(path.read_text(encoding="utf-8")):
            name, section = match.group(1), match.group(2)
            target = ROOT / name
            where = f"{path.relative_to(ROOT)} cites {match.group(0)!r}"
            assert target.is_file(), f"{where}: no such file in the repository"
            citations += 1
            if section:
                heading = re.compile(rf"^#+ {re.escape(section)}[. ]", re.MULTILINE)
                assert heading.search(target.read_text(encoding="utf-8")), f"{where}: no section"
    assert citations >= 5  # the scan itself works: the code does cite the docs
