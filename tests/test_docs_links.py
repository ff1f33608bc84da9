"""The README and docs/ pages link only to files that exist in the repository (no site build needed:
the pages are read as Markdown on the forge and in an editor, so a broken relative link is the failure
that matters), and the README stays short enough to read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[str]:
    """Link targets of ``[text](target)`` that point into the repository (no scheme, no pure anchor)."""
    code_free = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code blocks are examples
    return [t.split("#", 1)[0] for t in LINK.findall(code_free)
            if not re.match(r"^[a-z]+:", t) and not t.startswith("#")]


def test_relative_links_finds_file_links_only():
    text = "[a](docs/x.md) [b](https://e.org) [c](#here) [d](../conf/y.yaml#L3)\n```\n[e](nope.md)\n```"
    assert relative_links(text) == ["docs/x.md", "../conf/y.yaml"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    missing = [t for t in relative_links(page.read_text()) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(REPO)} links to missing files: {missing}"


def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200
