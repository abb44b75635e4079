"""No text written for the authors where a reader sees it: chapters, the README, the package's docstrings (rendered
by show_source and the API page) and, after a build, the HTML."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PHRASES = [  # internal labels, remarks about the build machine or budget, the chapter's own history
    r"\bpitfall\s+P\d+", r"\bP(?:[7-9]|1[0-3])\b(?=[),;:])", r"CPU budget", r"compute budget", r"\bno GPU in this\b",
    r"earlier version of this chapter", r"not run \(CPU", r"tasks marked .not run.", r"on the machine (?:this|the book) was (?:made|built)",
]
PATTERN = re.compile("|".join(PHRASES), re.I)


def _sources():
    yield from (ROOT / "book").glob("*.ipynb")
    yield from (ROOT / "book").glob("*.md")
    yield ROOT / "README.md"
    yield from (ROOT / "helpers").rglob("*.py")


def test_the_phrase_list_finds_authoring_text():
    assert PATTERN.search("as noted in pitfall P9") and PATTERN.search("(CPU budget)")
    assert not PATTERN.search("the paper's Table 2 and Figure 9")


@pytest.mark.parametrize("path", sorted(_sources()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_authoring_text(path):
    hits = [m.group(0) for m in PATTERN.finditer(path.read_text(encoding="utf-8"))]
    assert not hits, f"{path.relative_to(ROOT)}: {hits}"


def test_no_authoring_text_in_the_built_html():
    html = ROOT / "_build" / "html"
    if not html.is_dir():
        pytest.skip("the book is not built")
    hits = {p.name: PATTERN.findall(re.sub(r"<[^>]+>", " ", p.read_text(encoding="utf-8")))
            for p in html.rglob("*.html")}
    assert not {k: v for k, v in hits.items() if v}
