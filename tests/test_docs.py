"""The documentation's relative links name files that exist (a moved file or a link written
from another folder sends a reader nowhere)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "bench/README.md",
    ROOT / "deploy/README.md",
    ROOT / "tests/fake_soda/README.md",
]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_names_a_file(page: Path) -> None:
    links = re.findall(r"\]\(([^)#\s]+)", page.read_text(encoding="utf-8"))
    local = [link for link in links if "://" not in link and not link.startswith("mailto:")]
    broken = [link for link in local if not (page.parent / link).exists()]
    assert broken == [], f"{page.relative_to(ROOT)} links to nothing: {broken}"
