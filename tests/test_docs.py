"""The documentation's relative links resolve (files, folders and #anchors), and the README stays short."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 220

FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`+[^`\n]*`+")
LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def markdown_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def strip_code(text: str) -> str:
    """The text without fenced code blocks and inline code spans, which hold no links (line breaks kept, so line
    numbers stay those of the file)."""

    def blank(m):
        return "\n" * m.group(0).count("\n")

    return INLINE_CODE.sub(blank, FENCE.sub(blank, text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lower-cased, spaces to hyphens, punctuation other than
    hyphens and underscores removed."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading renders as its text
    text = text.strip().lower().replace(" ", "-")
    return re.sub(r"[^\w-]", "", text)


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        s = slug(heading)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def relative_links(path: Path):
    """(target, line number) of every relative link in a Markdown file: no scheme (http:, mailto:, ...)."""
    text = path.read_text()
    body = strip_code(text)
    for m in LINK.finditer(body):
        target = m.group(2)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            continue
        yield target, body.count("\n", 0, m.start()) + 1


def broken_links(path: Path) -> list[str]:
    problems = []
    for target, line in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{line}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file or folder")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert path.exists(), path
    assert broken_links(path) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t, _ in relative_links(ROOT / "README.md")}
    assert {p.resolve() for p in (ROOT / "docs").glob("*.md")} <= linked


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_checker_finds_broken_links(tmp_path, monkeypatch):
    """A missing file, a missing folder and a missing anchor are each reported; a good link and an http link are not."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# Title\n\n## A `code` section: here\n")
    (tmp_path / "sub").mkdir()
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#a-code-section-here) [ok](sub/) [ok](#top) [web](https://example.org/x#y)\n\n# Top\n"
        "[gone](missing.md) [gone](nosuch/) [bad](a.md#no-such-heading) `[code](ignored.md)`\n"
        "```\n[block](ignored-too.md)\n```\n"
    )
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert any("missing.md" in p for p in problems)
    assert any("nosuch/" in p for p in problems)
    assert any("#no-such-heading" in p for p in problems)
    assert slug("NSC / NSCB / mAP (`mcnn-profile-eval`)") == "nsc--nscb--map-mcnn-profile-eval"
    assert slug("A cluster's own MPI") == "a-clusters-own-mpi"
