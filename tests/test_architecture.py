"""The package's layout: layers that import only downwards, no import circles, one protocol for every experiment."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "experiments", "pages", "cli")


def test_the_layers_contract_holds():
    pytest.importorskip("importlinter")
    out = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                          "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


def _graph():
    grimp = pytest.importorskip("grimp")
    g = grimp.build_graph("helpers")
    return {m: set(g.find_modules_directly_imported_by(m)) for m in g.modules}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(10_000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [{"a", "b"}]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_even_inside_functions():
    assert _cycles(_graph()) == []


def test_every_module_lives_in_a_layer():
    flat = sorted(p.name for p in (ROOT / "helpers").glob("*.py") if p.name != "__init__.py")
    assert flat == [], f"modules outside the layers: {flat}"
    for layer in LAYERS:
        assert (ROOT / "helpers" / layer / "__init__.py").is_file()


def test_every_experiment_follows_the_protocol():
    from helpers.experiments import ORDER, all_experiments, get
    from helpers.experiments.protocol import Experiment

    listed = sorted(p.stem for p in (ROOT / "helpers" / "experiments").glob("*.py")
                    if p.stem not in ("__init__", "protocol", "isolation"))
    assert sorted(ORDER) == listed  # isolation is a mechanism shared by aggregation and meaning, not a chapter
    ids = []
    for exp in all_experiments():
        assert isinstance(exp, Experiment)
        assert (ROOT / f"{exp.chapter}.ipynb").is_file(), exp.chapter
        config = exp.config("quick")
        hash(config)  # frozen
        assert exp.seeds(config, "gemma-3-270m")
        for f in exp.findings:
            assert f.chapter == exp.chapter and f.compute is not None and f.rule is not None
            ids.append(f.id)
    assert len(ids) == len(set(ids))
    with pytest.raises(KeyError, match="unknown experiment"):
        get("no-such-experiment")


def test_an_option_an_experiment_does_not_take_is_refused():
    from helpers.experiments import get

    with pytest.raises(ValueError, match="does not take shots"):
        get("diagnosis").config("quick", shots=[2])
    assert get("extraction").config("quick", shots=[2]).shots == (2,)


def test_reweighting_takes_the_controls_to_run_and_refuses_unknown_ones():
    from helpers.experiments import get
    from helpers.experiments.reweighting import PROTOCOL_BETAS

    rw = get("reweighting")
    assert rw.config("quick").betas == PROTOCOL_BETAS
    assert rw.config("quick", methods=["beta-shallow", "beta-bos"]).betas == ("beta-shallow", "beta-bos")
    with pytest.raises(ValueError, match="unknown re-weighting controls"):
        rw.config("quick", methods=["prompt-16"])


def test_the_verdict_page_lists_the_experiments_findings_in_order():
    from helpers.experiments import all_experiments
    from helpers.pages import verdicts

    assert list(verdicts.FINDINGS) == [f.id for exp in all_experiments() for f in exp.findings]


def test_the_readme_map_names_every_module_in_its_layer():
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| [a-z ]+ \| `helpers/(\w+)/` \|.*$", section, re.M)}
    assert set(rows) == set(LAYERS)
    for layer in LAYERS:
        modules = {p.stem for p in (ROOT / "helpers" / layer).glob("*.py") if p.stem != "__init__"}
        named = set(re.findall(r"`(\w+)`", rows[layer].split("|")[3]))
        assert modules - {"protocol"} <= named | ({"protocol"} if layer == "experiments" else set()), \
            f"helpers/{layer}/: {sorted(modules - named)} missing from the README's map"
        assert named - modules <= {"Experiment", "protocol.Experiment"}, f"README names {sorted(named - modules)}"


def test_api_page_documents_every_module():
    """``book/api.md`` is what ``scripts/api_page.py`` writes (rerun it after adding a module)."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import api_page

    api = (ROOT / "book" / "api.md").read_text()
    assert api == api_page.page(), "book/api.md is stale: run python scripts/api_page.py"
    for layer in LAYERS:
        for p in (ROOT / "helpers" / layer).glob("*.py"):
            if p.stem != "__init__":
                assert f".. automodule:: helpers.{layer}.{p.stem}" in api, f"helpers.{layer}.{p.stem}"


def test_used_in_lines_come_from_the_chapters():
    from helpers.pages import api

    titles = api.chapter_titles()
    assert "reweighting" in titles and titles["reweighting"]
    assert titles["reweighting"] in api.used_in("page_model")  # every chapter gets a model through page_model
    assert api.used_in("no_such_function_anywhere") == []
    assert api.used_in("_private") == []


def test_every_public_function_of_a_chapter_module_names_its_chapter():
    """The book layer's chapter modules say which chapter uses each public function (as d2l's "Defined in")."""
    import importlib
    import inspect

    pages = [p.stem for p in (ROOT / "helpers" / "pages").glob("*.py")
             if p.stem not in ("__init__", "book", "plots", "verdicts", "api", "summaries")]  # shared, not chapters
    assert len(pages) >= 7
    for name in pages:
        module = importlib.import_module(f"helpers.pages.{name}")
        for fname, obj in vars(module).items():
            if inspect.isfunction(obj) and obj.__module__ == module.__name__ and not fname.startswith("_"):
                assert "Used in" in (obj.__doc__ or ""), f"helpers.pages.{name}.{fname}"
