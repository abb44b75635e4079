"""The book's Sphinx extension: which chapter uses each public function (added to its docstring on the API page),
and launch buttons only where Colab can open the page.

A function's "Used in" line is computed, not typed: a chapter uses a name when the name appears in the chapter's
code cells or in the chapter's own book-layer module (``helpers/pages/<experiment>.py``, which holds its tables and
figures). So the line cannot go stale when a chapter changes. Loaded as a Sphinx extension (``_config.yml``).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

__all__ = ["chapter_titles", "chapter_identifiers", "used_in", "setup"]


ROOT = Path(__file__).resolve().parents[2]
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _code(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def _title(notebook: Path) -> str:
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return notebook.stem


@cache
def chapter_titles(root: Path = ROOT) -> dict[str, str]:
    """``{page: title}`` for every chapter notebook in ``book/`` ("reweighting": "Anchor re-weighting")."""
    return {nb.stem: _title(nb) for nb in sorted((Path(root) / "book").glob("*.ipynb"))}


@cache
def chapter_identifiers(root: Path = ROOT) -> dict[str, frozenset[str]]:
    """``{page: identifiers}``: every identifier in a chapter's code cells and in the book-layer modules it
    imports (``from helpers.pages import reweighting as page``)."""
    root = Path(root)
    out = {}
    for nb in sorted((root / "book").glob("*.ipynb")):
        code = _code(nb)
        for module in set(re.findall(r"helpers\.pages(?:\.|\s+import\s+)(\w+)", code)):
            page = root / "helpers" / "pages" / f"{module}.py"
            if page.is_file() and module not in ("book", "plots", "verdicts", "api"):
                code += "\n" + page.read_text()
        out[nb.stem] = frozenset(_IDENT.findall(code))
    return out


def used_in(name: str, module: str = "", root: Path = ROOT) -> list[str]:
    """The chapters (titles) that use the public function or class ``name`` (a module's own book-layer page counts
    for its chapter only when the chapter imports it)."""
    titles = chapter_titles(root)
    if name.startswith("_"):
        return []
    return [titles[page] for page, ids in chapter_identifiers(root).items() if name in ids]


def _process_docstring(app, what, name, obj, options, lines):
    if what not in ("function", "class") or not name.startswith("helpers."):
        return
    chapters = used_in(name.rsplit(".", 1)[-1], name.rsplit(".", 1)[0])
    if chapters:
        lines.extend(["", f"*Used in:* {', '.join(chapters)}."])


def _launchable_only(app, pagename, templatename, context, doctree):
    """Drop the launch buttons of a page that is not a notebook in the repository (a MyST page such as the landing
    or verdict page): Colab cannot open a ``.md`` file, so its button would lead nowhere."""
    try:
        suffix = Path(app.env.doc2path(pagename)).suffix
    except Exception:  # a page without a source document (search, index)
        return
    if suffix != ".ipynb" and "header_buttons" in context:
        context["header_buttons"] = [b for b in context["header_buttons"] if b.get("label") != "launch-buttons"]


def setup(app):
    """The Sphinx extension: a "Used in" line under every documented function and class; launch buttons on notebook
    pages only."""
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("html-page-context", _launchable_only, priority=900)  # after the theme adds its buttons (501)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
