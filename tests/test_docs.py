"""The links in README.md and docs/ resolve, as GitHub renders them: `mkdocs build --strict`
(run by `python3 dev.py test`) checks the docs' links on the site, but never reads README.md,
whose links to docs/ pages and their anchors are what a reader on GitHub follows first. And
what the README shows of the docs is what they say."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from pymdownx.slugs import slugify

from tests.conftest import REPO

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"(#{1,6}) (.+)")
# mkdocs.yml's toc slugify, which makes the site's anchors GitHub's
SITE_SLUG = slugify(case="lower")


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, each space a hyphen."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def prose(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks, where a `#` or `](` is not markdown."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def headings(path: Path) -> list[str]:
    return [m.group(2) for line in prose(path) if (m := HEADING.fullmatch(line))]


def anchors(path: Path) -> set[str]:
    """Every heading's anchor, a repeated one numbered as GitHub numbers it (-1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in headings(path):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    """Each relative link of the file whose file or anchor does not exist."""
    broken = []
    for line in prose(path):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
                broken.append(f"{path.name}: {target} (no such anchor in {linked.name})")
    return broken


def test_readme_and_docs_links_resolve() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert [problem for page in pages for problem in broken_links(page)] == []


def test_readme_links_into_the_docs() -> None:
    """The README is the first screen and the table of contents: it links every docs page."""
    linked = {t.partition("#")[0] for line in prose(REPO / "README.md") for t in LINK.findall(line)}
    pages = {f"docs/{page.name}" for page in (REPO / "docs").glob("*.md")}
    assert pages - linked == set()
    assert len((REPO / "README.md").read_text().splitlines()) < 250


def test_readme_shows_the_targets_of_the_documented_benchmark_run() -> None:
    """The README's performance table is the performance page's, from the same run of the
    benchmark (test_benchmark_smoke holds that page to what the benchmark writes)."""
    page = (REPO / "docs" / "performance.md").read_text()
    duckdb = page.partition("## On DuckDB")[2].partition("## On PostgreSQL")[0]
    after = duckdb.partition("The targets, from this run:")[2].lstrip("\n").splitlines()
    table = "\n".join(itertools.takewhile(lambda line: line.startswith("|"), after))
    assert table.count("\n") >= 10, table  # a header, its rule and the nine targets
    readme = (REPO / "README.md").read_text()
    assert f"\n{table}\n" in readme
    run = re.search(r"from one run of `python3 dev.py bench` at commit (\w+)", duckdb)
    assert run and f"at commit {run.group(1)}" in readme


def test_a_broken_file_or_anchor_is_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## `dbt-klaviyo sync`: the run\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](other.md#dbt-klaviyo-sync-the-run) [ok](#page) [ok](https://example.com/#x)\n"
        "[bad](other.md#dbt-klaviyo-sync) [bad](#nowhere) [bad](missing.md)\n"
        "```sh\n# not a heading, [not](#a-link)\n```\n"
    )
    assert broken_links(page) == [
        "page.md: other.md#dbt-klaviyo-sync (no such anchor in other.md)",
        "page.md: #nowhere (no such anchor in page.md)",
        "page.md: missing.md (no such file)",
    ]


def test_the_site_anchors_are_githubs() -> None:
    """mkdocs.yml's slugify gives each heading the anchor GitHub gives it, so one link works
    both on GitHub and on the site."""
    for page in sorted((REPO / "docs").glob("*.md")):
        for heading in headings(page):
            assert SITE_SLUG(heading.replace("`", ""), "-") == github_slug(heading), heading
