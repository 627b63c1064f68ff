"""The documentation stands alone: README stays short, every page it links exists, and no
page points outside the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_readme_is_a_short_read():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_no_page_points_outside_the_repository():
    outside = re.compile(r"shared/(specs|data|papers)|\.\./shared|[Ii]ssue \d+")
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in PAGES
            for n, line in enumerate(p.read_text().splitlines(), 1) if outside.search(line)]
    assert not hits, hits
