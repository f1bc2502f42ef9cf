"""The documentation holds together: README.md and docs/*.md link only to files and headings that exist, every
"§N.M" the code cites is a heading of docs/method.md, and the README stays a five-minute read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
METHOD = DOCS / "method.md"
README = REPO / "README.md"
README_MAX_LINES = 220
CODE_DIRS = ("selmix_dist", "tools", "launch")

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
SECTION_REF = re.compile(r"§\s?(\d[\w.]*)")
NUMBERED_HEADING = re.compile(r"^(\d+(?:\.\d+)*)\.?(?:\s|$)")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """Markdown text without fenced blocks and inline code, where a "[x](y)" is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text (code marks, emphasis and link targets dropped),
    lower-cased, every character that is not a letter, digit, space, '-' or '_' removed, spaces → '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[`*]", "", text)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's "-1", "-2" suffixes for repeated headings."""
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        result.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return result


def broken_links(path: Path) -> list[str]:
    """"error:" lines, one per relative link of ``path`` whose file or #anchor does not exist."""
    errors = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: — not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(REPO)}: link '{target}'"
        if not linked.exists():
            shown = linked.relative_to(REPO) if linked.is_relative_to(REPO) else linked
            errors.append(f"error: {where}: no file {shown}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            errors.append(f"error: {where}: {linked.name} has no heading with anchor '#{anchor}'")
    return errors


def method_sections() -> set[str]:
    """The section numbers of docs/method.md's headings: "## 3. The gain" → "3", "### 3.2 …" → "3.2"."""
    numbers = set()
    for heading in HEADING.findall(FENCE.sub("", METHOD.read_text())):
        match = NUMBERED_HEADING.match(heading)
        if match:
            numbers.add(match.group(1))
    return numbers


def bad_section_refs(path: Path, sections: set[str]) -> list[str]:
    """"error:" lines for every "§N.M" of a code file that is not a section of docs/method.md, or that sits on
    a line not naming docs/method.md (the code cites only documents that are in the repository)."""
    errors = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        refs = SECTION_REF.findall(line)
        where = f"{path.relative_to(REPO)}:{lineno}"
        if refs and "docs/method.md" not in line:
            errors.append(f"error: {where}: '§' without 'docs/method.md' on the line: {line.strip()}")
        for ref in refs:
            ref = ref.rstrip(".")
            if ref not in sections:
                errors.append(f"error: {where}: §{ref} is not a numbered heading of docs/method.md")
    return errors


def code_files() -> list[Path]:
    files = []
    for name in CODE_DIRS:
        files += [p for p in sorted((REPO / name).rglob("*")) if p.is_file() and p.suffix in ("", ".py", ".sbatch")]
    return [p for p in files if "__pycache__" not in p.parts]


@pytest.mark.parametrize("heading, slug", [
    ("## 3. The gain", "3-the-gain"),
    ("### 3.2 From Ψ to the logits: D = ∂ψ/∂A", "32-from-ψ-to-the-logits-d--ψa"),
    ("## Experiments (`tools/reproduce.py`, `configs/experiments/*.yaml`)",
     "experiments-toolsreproducepy-configsexperimentsyaml"),
    ("### Time (CIFAR-10-LT)", "time-cifar-10-lt"),
    ("# Where this differs from the released SelMix code", "where-this-differs-from-the-released-selmix-code"),
])
def test_github_slug_matches_hand_computed_anchors(heading, slug):
    assert github_slug(HEADING.match(heading).group(1)) == slug


def test_anchors_number_repeated_headings_like_github(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Notes\n\n## Setup\n\n```\n# not a heading\n```\n\n## Setup\n")
    assert anchors(page) == {"notes", "setup", "setup-1"}


def test_every_relative_link_resolves_to_a_file_and_heading():
    errors = [e for page in pages() for e in broken_links(page)]
    assert not errors, "\n".join(errors)


def test_link_checker_reports_a_missing_file_and_a_missing_anchor(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    (tmp_path / "a.md").write_text("# A\n\n## Known part\n")
    page = tmp_path / "p.md"
    page.write_text("[ok](a.md#known-part) [gone](b.md) [bad](a.md#unknown) `[code](c.md)` [web](https://x.org)\n")
    assert broken_links(page) == [
        "error: p.md: link 'b.md': no file b.md",
        "error: p.md: link 'a.md#unknown': a.md has no heading with anchor '#unknown'",
    ]


def test_every_section_reference_in_the_code_is_a_heading_of_the_method_doc():
    sections = method_sections()
    errors = [e for path in code_files() for e in bad_section_refs(path, sections)]
    assert not errors, "\n".join(errors)


def test_section_checker_reports_unknown_sections_and_foreign_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    code = tmp_path / "m.py"
    code.write_text('"""Gain (docs/method.md §3.4, §3.5b).\n\nSee the method spec §2.1."""\n# docs/method.md §9.\n')
    assert bad_section_refs(code, {"3", "3.4", "3.5"}) == [
        "error: m.py:1: §3.5b is not a numbered heading of docs/method.md",
        "error: m.py:3: '§' without 'docs/method.md' on the line: See the method spec §2.1.\"\"\"",
        "error: m.py:3: §2.1 is not a numbered heading of docs/method.md",
        "error: m.py:4: §9 is not a numbered heading of docs/method.md",
    ]


def test_method_doc_has_numbered_sections():
    assert {"1", "1.2", "2", "2.1", "3", "3.4", "4", "5"} <= method_sections()


def test_readme_is_short_and_keeps_the_two_commands():
    text = README.read_text()
    lines = text.count("\n")
    too_long = f"error: README.md has {lines} lines, more than {README_MAX_LINES}: move detail to docs/"
    assert lines <= README_MAX_LINES, too_long
    assert "make demo" in text and "make test" in text


def test_every_docs_page_is_listed_in_the_index_and_the_readme():
    index = set(LINK.findall(prose((DOCS / "README.md").read_text())))
    readme = set(LINK.findall(prose(README.read_text())))
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "README.md":
            assert page.name in index, f"error: docs/README.md does not link {page.name}"
        assert f"docs/{page.name}" in readme, f"error: README.md does not link docs/{page.name}"
