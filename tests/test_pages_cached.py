"""The cached path of the re-weighting, tuning and meaningless-labels chapters loads no model: their cells that
get a model or read runs keyed on one are executed here, as the chapter runs them, from the committed results and
summaries, with :func:`helpers.core.models.load_model` made to fail. (Their tables' and figures' numbers are stored
summaries, :mod:`helpers.pages.summaries`, tested with each page's module.)"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_model(monkeypatch, data_dir):
    """No model may load; summaries are read from the committed ones (and kept in memory, nothing written)."""
    from helpers.pages import summaries

    for where in ("helpers.core.models.load_model", "helpers.load_model"):  # the package re-exports it
        monkeypatch.setattr(where, lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.delenv(summaries.SUMMARIES_ENV, raising=False)
    monkeypatch.setattr(summaries, "_MEMORY", {})
    monkeypatch.setenv("ANCHORS_PROFILE", "book")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the chapters set it to the machine's cores


def _run(chapter: str, cells: list[int], ns: dict | None = None) -> dict:
    """Execute the code cells ``cells`` of ``book/<chapter>.ipynb`` in ``ns`` (a fresh namespace by default)."""
    nb = json.loads((ROOT / "book" / f"{chapter}.ipynb").read_text())["cells"]
    ns = {} if ns is None else ns
    for i in cells:
        assert nb[i]["cell_type"] == "code", (chapter, i)
        exec(compile("".join(nb[i]["source"]), f"{chapter}[{i}]", "exec"), ns)
    return ns


def _unloaded(models) -> bool:
    return all(getattr(lm, "_lm", "not a page model") is None for lm in models.values())


def test_reweighting_reads_its_runs_without_loading_a_model(no_model):
    ns = _run("reweighting", [2, 3, 11])  # the settings, the imports and models, the runs of every shown seed
    assert set(ns["models"]) == {ns["MODEL"], ns["SECOND_MODEL"]} and _unloaded(ns["models"])
    assert ns["seeds"][ns["MODEL"]]["sst2"] and set(ns["runs"][ns["MODEL"]]) == {"sst2", "trec", "agnews", "emoc"}
    assert repr(ns["models"][ns["MODEL"]]).startswith("LoadedModel('gemma-3-270m'")  # the facts: a stored summary
    assert _unloaded(ns["models"])


def test_tuning_reads_its_runs_and_decoded_prompts_without_loading_a_model(no_model):
    from helpers.pages import tuning as pt

    ns = _run("tuning", [2, 3, 9])  # the settings, the imports and model, the runs of both models
    assert ns["MODEL"] in ns["runs"] and _unloaded(ns["models"])

    class Tokenizer:  # stands in for the stored decoded prompts (a build reads them from results/summaries)
        def decode(self, ids):
            return " ".join(f"<{i}>" for i in ids)

    stand_ins = {m: SimpleNamespace(name=lm.name, identity=lm.identity, tokenizer=Tokenizer())
                 for m, lm in ns["models"].items()}
    stored = pt.pez_table(ns["runs"], ns["ORDER"], stand_ins)  # stores the summaries decoded/<model>/tuning-pez
    ns = _run("tuning", [22], ns)  # the PEZ table: the chapter's own models, unloaded
    assert _unloaded(ns["models"])
    table = pt.pez_table(ns["runs"], ns["ORDER"], ns["models"])
    assert table.equals(stored) and len(table)


def test_decoded_texts_need_the_tokenizer_only_when_not_stored(monkeypatch):
    from helpers.pages import summaries
    from helpers.pages.tuning import decoded_texts

    monkeypatch.delenv(summaries.SUMMARIES_ENV, raising=False)
    monkeypatch.setattr(summaries, "_MEMORY", {})
    monkeypatch.setattr(summaries, "summary_dirs", lambda: [])
    calls = []

    class Tokenizer:
        def decode(self, ids):
            calls.append(list(ids))
            return "|".join(map(str, ids))

    lm = SimpleNamespace(name="some-model", identity={"name": "some-model", "kind": "offline"}, tokenizer=Tokenizer())
    assert decoded_texts(lm, [[3, 1], [2], [3, 1]], "label") == {(2,): "2", (3, 1): "3|1"}
    assert len(calls) == 2
    lm.tokenizer = None  # stored now: no tokenizer needed for the same ids
    assert decoded_texts(lm, [[2], [3, 1]], "label") == {(2,): "2", (3, 1): "3|1"}
    lm.tokenizer = Tokenizer()
    assert decoded_texts(lm, [[5]], "label") == {(5,): "5"} and calls[-1] == [5]  # other ids: decoded again
    bare = Tokenizer()  # no identity: nothing to key a summary on, decoded each time
    assert decoded_texts(SimpleNamespace(tokenizer=bare), [[7]], "label") == {(7,): "7"}


def test_meaningless_labels_reads_its_runs_without_loading_a_model(no_model):
    ns = _run("meaningless-labels", [2, 3, 8])  # the settings, the imports and runs, the example prompts
    assert set(ns["runs"]) == {ns["MODEL"], ns["SECOND_MODEL"]}


def test_reweighting_leverage_is_one_summary_of_the_cached_runs(monkeypatch):
    """The equal-leverage section reads one summary; computing it reads the cached runs only (no model), and the
    table, figure and values built from it are those built from the runs."""
    from helpers.core.runs import PROFILES
    from helpers.experiments import reweighting as rw
    from helpers.pages import reweighting as page
    from helpers.pages import summaries

    calls = []
    runs, searches = object(), {"sst2": {"anchor": {"lr": 0.1}}}
    monkeypatch.setattr(rw, "cached_control_runs", lambda model, profile: calls.append(model) or runs)
    monkeypatch.setattr(rw, "cached_lr_searches", lambda model, profile, methods: searches)
    monkeypatch.setattr(page, "leverage_values", lambda R, s: {"lev_x": "1"})
    monkeypatch.setattr(page, "_leverage_rows", lambda R, model: [{"model": model, "method": "m", "a": "1"}])
    monkeypatch.setattr(page, "_leverage_points", lambda R: [])
    monkeypatch.delenv(summaries.SUMMARIES_ENV, raising=False)
    monkeypatch.setattr(summaries, "_MEMORY", {})
    monkeypatch.setattr(summaries, "summary_dirs", lambda: [])
    lev = page.cached_leverage("gemma-3-270m", PROFILES["book"])
    assert lev == {"searches": searches, "values": {"lev_x": "1"}, "rows": [{"model": "gemma-3-270m", "method": "m",
                                                                           "a": "1"}], "points": []}
    assert page.cached_leverage("gemma-3-270m", PROFILES["book"]) == lev and calls == ["gemma-3-270m"]  # read back
    assert page.leverage_frame(lev["rows"]).loc[("gemma-3-270m", "m"), "a"] == "1"
