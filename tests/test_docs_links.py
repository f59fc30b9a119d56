"""Every relative link in README.md and docs/ resolves to a file (and, with #anchor, to a heading in it)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


def _links() -> list[tuple[Path, str]]:
    return [(page, target) for page in PAGES for target in LINK.findall(page.read_text())
            if not re.match(r"[a-z]+:", target)]  # http:, https:, mailto: are not files


def test_the_docs_exist_and_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    for name in ("planner", "reversible", "stem-and-elision", "memory-report", "training-stack", "cli-and-format",
                 "safety"):
        assert (ROOT / "docs" / f"{name}.md").is_file()
        assert f"docs/{name}.md" in (ROOT / "README.md").read_text()
    assert _links()


@pytest.mark.parametrize("page,target", _links(), ids=lambda v: str(v.relative_to(ROOT)) if isinstance(v, Path) else v)
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    assert file.exists(), f"{page.relative_to(ROOT)}: {target} does not exist"
    if anchor:
        assert anchor in _anchors(file), f"{page.relative_to(ROOT)}: no heading #{anchor} in {file.name}"
