"""The built book (``_build/html``), as a reader sees it: no unrendered glue or roles, no stderr, no missing images.

Runs after ``make book`` (``.ci/run`` builds the book, then runs this file); skipped when the book is not built.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
PAGES = sorted(p for p in HTML.glob("book/*.html")) if HTML.is_dir() else []

pytestmark = pytest.mark.skipif(not PAGES, reason="the book is not built (run `make book` first)")


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _body(html: str) -> str:
    """The page's visible text, without scripts, styles and code blocks (where braces are legitimate)."""
    html = re.sub(r"<(script|style)\b.*?</\1>", "", html, flags=re.S)
    html = re.sub(r'<div class="highlight.*?</div>', "", html, flags=re.S)
    html = re.sub(r"<pre\b.*?</pre>", "", html, flags=re.S)
    return re.sub(r"<[^>]+>", " ", html)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_unrendered_glue_or_roles(page):
    body = _body(_text(page))
    assert not re.search(r"\{glue(:\w+)?\}", body), "unrendered glue"
    assert not re.search(r"\{(ref|numref|cite(:\w+)?|doc|mod|eq)\}`", body), "raw MyST role"
    assert "<papermill" not in body and "application/papermill" not in body


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_stderr_or_tracebacks(page):
    html = _text(page)
    assert 'class="output stderr"' not in html and "output_stderr" not in html, "a stderr block is shown"
    assert "Traceback (most recent call last)" not in html
    # streams are merged into the cell output (nb_merge_streams), so a Python warning would show as text
    warnings = re.findall(r"\b[A-Z]\w*Warning: .{0,80}", html)
    assert not warnings, f"a warning is shown to the reader: {warnings[:2]}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_images_exist(page):
    html = _text(page)
    for src in re.findall(r'<img[^>]+src="([^"]+)"', html):
        if src.startswith(("data:", "http://", "https://")):
            continue
        assert (page.parent / src.split("#")[0]).resolve().exists(), f"missing image {src}"


def test_every_figure_is_numbered_and_states_n():
    for page in [p for p in PAGES if p.name in {"aggregation.html", "extraction.html"}]:
        html = _text(page)
        captions = re.findall(r'<figcaption>(.*?)</figcaption>', html, flags=re.S)
        assert captions, page.name
        for cap in captions:
            assert "Fig" in cap, f"{page.name}: unnumbered figure"
            assert re.search(r"n\s*=|n = 1|\(n", _body(cap)), f"{page.name}: a caption without n: {_body(cap)[:80]}"


def test_verdict_page_has_a_row_per_finding():
    from helpers.pages.verdicts import FINDINGS

    page = HTML / "book" / "verdicts.html"
    if not page.exists():
        pytest.skip("no verdict page in this build")
    html = _text(page)
    assert html.count("<tr>") >= len(FINDINGS) + 1
    assert "not yet run" in html


def test_glued_values_equal_the_reference():
    """Every value the built book glues equals ``tests/data/glued_values.json`` (the numbers a reader sees did not
    move). After an intended change of results, rewrite the reference with ``python scripts/glued_values.py`` and
    review its diff."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import glued_values

    reference = json.loads((ROOT / "tests" / "data" / "glued_values.json").read_text())
    built = glued_values.glued_values(ROOT / "_build")
    diff = glued_values.differences(reference, built)
    assert not diff, f"{len(diff)} glued values differ from the reference:\n" + "\n".join(diff[:20])


def test_every_launch_button_opens_a_notebook_of_the_repository():
    """A Colab link must point at an .ipynb that exists in the repository (Colab cannot open a MyST .md page)."""
    for page in sorted(HTML.rglob("*.html")):
        for url in set(re.findall(r'https://colab\.research\.google\.com/github/[^"\s]+', _text(page))):
            path = url.split("/blob/", 1)[1].split("/", 1)[1]
            assert path.endswith(".ipynb") and (ROOT / path).is_file(), f"{page.name}: {url}"


CHAPTER_PAGES = [p for p in PAGES if (ROOT / "book" / f"{p.stem}.ipynb").exists()]


def _figures(html: str) -> tuple[list[dict], list[str]]:
    """The page's ``<figure>`` elements (``{"id", "images", "caption"}``, the caption as text) and the sources of
    the images that sit in no figure."""
    from html.parser import HTMLParser

    class Parser(HTMLParser):
        def __init__(self):
            super().__init__()
            self.figures, self.bare, self.current, self.in_caption = [], [], None, 0

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "figure":
                self.current = {"id": attrs.get("id", ""), "images": [], "caption": ""}
            elif tag == "figcaption" and self.current is not None:
                self.in_caption += 1
            elif tag == "img":
                (self.current["images"] if self.current is not None else self.bare).append(attrs.get("src", ""))

        def handle_endtag(self, tag):
            if tag == "figure" and self.current is not None:
                self.figures.append(self.current)
                self.current = None
            elif tag == "figcaption" and self.in_caption:
                self.in_caption -= 1

        def handle_data(self, data):
            if self.in_caption and self.current is not None:
                self.current["caption"] += data

    parser = Parser()
    parser.feed(html)
    return parser.figures, parser.bare


@pytest.mark.parametrize("page", CHAPTER_PAGES, ids=lambda p: p.name)
def test_every_chapter_image_is_a_numbered_captioned_figure_the_text_references(page):
    """Every image of a chapter sits in a figure numbered "Fig. N" with a caption, and the page's text links to it
    (a bare ``plt.show()`` output cannot be referenced)."""
    html = _text(page)
    article = re.search(r'<article class="bd-article".*?</article>', html, flags=re.S)
    assert article, "no article in the page"
    figures, bare = _figures(article.group(0))
    assert not bare, f"{len(bare)} image(s) outside a numbered figure, e.g. {bare[0][:60]}"
    for fig in (f for f in figures if f["images"]):
        caption = " ".join(fig["caption"].split())
        assert re.match(r"Fig\. \d+\b", caption), f"figure {fig['id'] or fig['images'][0][:40]} is not numbered"
        assert len(caption.split(maxsplit=2)) == 3 and len(caption) > 40, f"{fig['id']}: no caption ({caption!r})"
        assert fig["id"] and f'href="#{fig["id"]}"' in html, f"{fig['id'] or caption[:30]}: the text never refers to it"
