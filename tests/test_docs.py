"""The documentation: the generated recipe reference is current, the README stays short, and every
relative link in README.md and docs/ points at a file (and heading) that exists."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from ticketforge import recipe, recipe_docs
from ticketforge.search import METHODS
from ticketforge.structures import STRUCTURES

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README] + sorted(DOCS.rglob("*.md"))

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks (a '#' comment in a code block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _strip_inline_code(line: str) -> str:
    return re.sub(r"`[^`]*`", "", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (letters, digits, '_', '-' and
    spaces stay), spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(page.read_text()):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    """Link targets outside code; a link's text may run over a line break."""
    text = "\n".join(_strip_inline_code(line) for line in _prose(page.read_text()))
    return _LINK.findall(text)


def test_recipe_reference_is_current():
    assert (DOCS / "recipes.md").read_text() == recipe_docs.render(), (
        "docs/recipes.md is out of date with the recipe schema; regenerate it with "
        "`python -m ticketforge.recipe_docs > docs/recipes.md`")


def _leaf_keys(value, prefix=""):
    """Key paths of every non-section field of a recipe (a dataclass-valued field is a section)."""
    for f in dataclasses.fields(value):
        path = f"{prefix}.{f.name}" if prefix else f.name
        sub = getattr(value, f.name)
        if dataclasses.is_dataclass(sub):
            yield from _leaf_keys(sub, path)
        else:
            yield path


def test_recipe_reference_covers_every_key():
    text = recipe_docs.render()
    keys = list(_leaf_keys(recipe.Recipe()))
    assert "search.sparsity" in keys and "data.crop" in keys
    for key in keys:
        assert f"| `{key}` |" in text, f"{key} missing from the recipe reference"
    for name in recipe.builtin_names():
        assert f"| `{name}` |" in text
    for name in METHODS:
        assert f"| `{name}` |" in text
    for name in STRUCTURES:
        assert f"| `{name}` |" in text


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= 300, f"README.md has {n} lines; move detail into docs/ (at most 300)"


def test_readme_headings_name_no_issue():
    for line in _prose(README.read_text()):
        if _HEADING.match(line):
            assert not re.search(r"issue \d+", line, re.IGNORECASE), line


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    problems = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{target}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} "
                            "does not exist")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not problems, f"broken links in {page.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_slug_follows_github():
    assert slug("`ticketforge bench`: the same method on the target board") == \
        "ticketforge-bench-the-same-method-on-the-target-board"
    assert slug("Budgets users think in: a speed-up, a latency or a size") == \
        "budgets-users-think-in-a-speed-up-a-latency-or-a-size"
    assert slug("2:4 sparsity (recipes `cts-2to4` and `magnitude-2to4`)") == \
        "24-sparsity-recipes-cts-2to4-and-magnitude-2to4"

