"""The README and the pages under docs/: the entry commands CI reads, the size, and every link.

The README is the front page: its first code block is what a new user and CI run, so it must keep
the two commands exactly; everything else lives in docs/, and a moved heading must not leave a
dead link behind.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
MAX_README_BYTES = 10_240

DEMO_LINE = (
    "make demo   # venv + install + fetch pinned assets, then compile and run "
    "specs/examples/tweet-sentiment.toml"
)
TEST_LINE = "make test   # venv + install, then the test suite (CI runs this through .ci/run)"

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(?P<text>.+?)\s*#*\s*$")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked out."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(re.sub(r"`[^`]*`", "``", line))
    return lines


def _first_code_block(text: str) -> list[str]:
    block, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            if in_fence:
                return block
            in_fence = True
            continue
        if in_fence:
            block.append(line)
    raise AssertionError("README.md has no fenced code block")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: rendered text lowercased, punctuation dropped, spaces to
    hyphens (duplicates get -1, -2, ... in `anchors`)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, as GitHub numbers repeated ones."""
    seen: dict[str, int] = {}
    found = set()
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        match = None if in_fence else HEADING.match(line)
        if match is None:
            continue
        slug = github_slug(match.group("text"))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    """The targets of the relative links in a Markdown file (no scheme, not protocol-relative)."""
    targets = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(line):
            target = match.group("target")
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
                continue
            targets.append(target)
    return targets


def test_readme_first_code_block_holds_the_two_commands() -> None:
    block = _first_code_block(README.read_text(encoding="utf-8"))
    assert block == [DEMO_LINE, TEST_LINE]


def test_readme_is_under_10_kib() -> None:
    size = README.stat().st_size
    assert size < MAX_README_BYTES, f"README.md is {size} bytes; move detail into docs/"


def test_docs_pages_exist_and_the_readme_links_each() -> None:
    assert PAGES, "docs/ has no pages"
    linked = {(README.parent / t.split("#")[0]).resolve() for t in relative_links(README) if not t.startswith("#")}
    missing = [page.name for page in PAGES if page.resolve() not in linked]
    assert not missing, f"README.md does not link to {missing}"


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path: Path) -> None:
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{path.relative_to(REPO)}: " + "; ".join(broken)


def test_slugs_follow_github() -> None:
    assert github_slug("Preference stages: reward, DPO, PPO") == "preference-stages-reward-dpo-ppo"
    assert github_slug("A simulated step: `--precise`") == "a-simulated-step---precise"
    assert github_slug("In `plan.json`") == "in-planjson"
    assert github_slug("`tokens.max_total` and [the budget](x.md)") == "tokensmax_total-and-the-budget"


def test_ci_runs_the_readme_test_command() -> None:
    commands = []
    for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            commands.append(shlex.split(line, comments=True))
    assert ["make", "test"] in commands
    assert TEST_LINE.split("#")[0].split() == ["make", "test"]
