"""The docs hold together: every relative link and image in README.md and docs/**/*.md points at a
file that exists (and a `#anchor` at a heading of that file, by GitHub's slug rules), and the
README stays a short guide (<= 250 lines). Pure text: no JAX import, well under a second."""

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

# [text](target) and ![alt](target), target up to the first space or ')': an optional "title"
# after a space is not part of it. Reference-style definitions `[id]: target` too.
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
HTML = re.compile(r"""<(?:img|a)\s[^>]*(?:src|href)\s*=\s*["']([^"']+)["']""", re.I)
FENCE = re.compile(r"^(\s*)(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def strip_code(text: str, inline: bool = True) -> str:
    """The text with fenced code blocks (and, with `inline`, code spans) blanked: links there are
    not links, and `# comments` in a shell block are not headings."""
    out, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence:
            if m and m.group(2) == fence:
                fence = None
            out.append("")
            continue
        if m:
            fence = m.group(2)
            out.append("")
            continue
        out.append(re.sub(r"`+[^`]*`+", "", line) if inline else line)
    return "\n".join(out)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = text.replace("*", "")  # emphasis markers (underscores stay: GitHub keeps them)
    text = text.strip().lower()
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "-_ " or cat[0] in "LNM":
            kept.append("-" if ch == " " else ch)
    return "".join(kept)


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in strip_code(path.read_text(), inline=False).splitlines():
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        result.add(slug if n == 0 else f"{slug}-{n}")
    return result


def links(path: Path) -> list[str]:
    text = strip_code(path.read_text())
    return INLINE.findall(text) + REFDEF.findall(text) + HTML.findall(text)


def broken_links(path: Path) -> list[str]:
    bad = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
            continue  # http:, https:, mailto: ...
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / file_part).resolve()
        if not dest.exists():
            bad.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
            bad.append(f"{path.relative_to(ROOT)}: {target} (no heading with that anchor)")
    return bad


def test_slug_rules():
    assert github_slug("Weak-to-strong generalization (`rlhf_jax/w2s.py`)") == (
        "weak-to-strong-generalization-rlhf_jaxw2spy")
    assert github_slug("Every stage against TRL (`python -m benchmarks.bench_stages`)") == (
        "every-stage-against-trl-python--m-benchmarksbench_stages")
    assert github_slug("**Bold** and [a link](x.md) — dash") == "bold-and-a-link--dash"


def test_checker_catches_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    (tmp_path / "ok.md").write_text("# A heading\n")
    page.write_text("[ok](ok.md#a-heading) ![img](missing.png) [bad](ok.md#nope)\n"
                    "`[code](not-a-link.md)`\n```\n[fenced](also-not.md)\n```\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert broken_links(page) == ["p.md: missing.png (no such file)",
                                      "p.md: ok.md#nope (no heading with that anchor)"]
    finally:
        ROOT = old


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_docs_have_links():
    # The checker sees the README's links (a regex that matched nothing would pass everything).
    assert len(links(ROOT / "README.md")) >= 10


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail to docs/ (max {README_MAX_LINES})"
