"""The documentation holds together: README is a short user guide with a table of contents, every
relative link in README, BENCHMARKS.md and docs/ reaches an existing file and heading, and every
`patcher COMMAND` README shows is a command `patcher --help` lists (and the other way round)."""

import re
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

README = ROOT / "README.md"
PAGES = [README, ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks (a `# comment` in a bash block is not a heading)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (`-` and `_` kept), spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", prose(path.read_text()), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    return LINK.findall(CODE_SPAN.sub("code", prose(path.read_text())))


def broken_links(path: Path) -> list[str]:
    bad = []
    for target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not checked offline
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {dest})")
    return bad


def test_slug_matches_githubs_anchors():
    assert slug("Converting (`patcher convert`)") == "converting-patcher-convert"
    assert (
        slug("Where patcher writes, and what `--force` replaces")
        == "where-patcher-writes-and-what---force-replaces"
    )
    assert (
        slug("Mutation testing (a developer's check, not CI)") == "mutation-testing-a-developers-check-not-ci"
    )
    assert slug("Post-norm architectures (Gemma 2/3, OLMo 2)") == "post-norm-architectures-gemma-23-olmo-2"


def test_readme_is_short_and_has_a_table_of_contents_of_every_section():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES, "README is a user guide: move reference text to docs/"
    body = prose(text)
    sections = re.findall(r"^## (.+)$", body, re.M)
    assert sections[0] == "Contents", sections
    toc = body.split("## Contents", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"\]\(#([^)]+)\)", toc))
    missing = {slug(s) for s in sections[1:]} - listed
    assert not missing, f"README's Contents does not list {sorted(missing)}"
    assert listed <= anchors(README), sorted(listed - anchors(README))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert not broken_links(page), broken_links(page)


def test_the_link_check_sees_links_and_catches_broken_ones(tmp_path):
    found = [t for p in PAGES for t in links(p)]
    assert len(found) > 100 and "docs/architecture.md" in found and "#two-commands" in links(README)
    page = tmp_path / "page.md"
    page.write_text("# A title\n[ok](#a-title) [gone](#gone) [file](no.md) `[code](#x)`\n```\n[x](#y)\n```\n")
    assert [b.split()[0] for b in broken_links(page)] == ["#gone", "no.md"]


def test_every_docs_page_is_reachable_from_readme():
    reached = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    orphans = [p.name for p in PAGES[2:] if p.resolve() not in reached]
    assert not orphans, f"README's Documentation does not link {orphans}"


def help_commands() -> set[str]:
    """The commands `patcher --help` lists (rich draws them as `│ name   description` rows)."""
    text = run_cli("--help").output
    panel = text[text.index("Commands") :]
    return set(re.findall(r"^(?:[│|]\s+|\s{2})([a-z][a-z0-9-]*)\s{2,}\S", panel, re.M))


def readme_commands() -> set[str]:
    """`patcher NAME` as README shows it to be typed: in a code block or an inline code span."""
    text = README.read_text()
    code = "\n".join(m.group(0) for m in FENCE.finditer(text)) + "\n" + "\n".join(CODE_SPAN.findall(text))
    return set(re.findall(r"(?:^|[`&|;]\s*)patcher ([a-z][a-z0-9-]*)", code, re.M))


def test_every_command_readme_shows_exists_and_every_command_is_shown():
    listed = help_commands()
    assert {"ablate", "extract", "export", "demo"} <= listed, listed  # the help parse found the panel
    shown = readme_commands()
    assert shown - listed == set(), f"README shows commands patcher does not have: {sorted(shown - listed)}"
    assert listed - shown <= {"version"}, f"README shows no example of {sorted(listed - shown - {'version'})}"


def test_nothing_cites_a_document_outside_the_repository():
    """The facts live in docs/: no file points at a design note that is not in the repository."""
    cites = [
        f"{p.relative_to(ROOT)}:{n}"
        for folder in ("patcher", "kernels", "tests", "scripts", "docs")
        for p in (ROOT / folder).rglob("*")
        if p.suffix in {".py", ".toml", ".md"} and p.name != "test_docs.py"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if "DESIGN.md" in line
    ] + [
        f"{p.name}:{n}"
        for p in PAGES[:2]
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if "DESIGN.md" in line
    ]
    assert not cites, cites


def test_readme_names_every_supported_architecture():
    from patcher.model.architectures import supported

    section = prose(README.read_text()).split("## Supported architectures", 1)[1].split("\n## ", 1)[0]
    named = section.split(" — ", 1)[0]
    assert sorted(re.findall(r"[a-z0-9_]+", named)) == sorted(supported())


def test_every_file_the_docs_name_exists():
    """Renames leave no stale paths: each `patcher/...`, `kernels/...`, `tests/...`, `scripts/...` file
    README and docs/ name is in the tree (globs like `tests/test_web*.py` match something). A paragraph
    marked `<!-- check after merging ... -->` describes a layout still on its way and is skipped."""
    pending = re.compile(r"<!-- check after merging .*?-->.*?(?:\n\n|$)", re.S)
    path = re.compile(r"(?<![\w/.])((?:patcher|kernels|tests|scripts)/[\w/*.-]*\w)")
    named = {m for page in [README, *PAGES[2:]] for m in path.findall(pending.sub("", page.read_text()))}
    assert len(named) > 30, sorted(named)
    missing = sorted(p for p in named if "NAME" not in p and not list(ROOT.glob(p)))
    assert not missing, missing
