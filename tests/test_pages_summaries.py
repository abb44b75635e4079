"""Stored page summaries (helpers.pages.summaries): exact round trips, computed once, recomputed exactly when a
result they read changes, appears or disappears; the unused ones pruned. Everything is written under tmp_path."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers.core import runs
from helpers.core.stats import Estimate
from helpers.pages import summaries as S


@pytest.fixture
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("ANCHORS_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv(S.SUMMARIES_ENV, str(tmp_path / "summaries"))
    monkeypatch.setattr(runs, "committed_results_dir", lambda: None)  # only what this test writes
    S._MEMORY.clear()
    return tmp_path


LM = SimpleNamespace(identity={"kind": "test", "name": "tiny"}, dtype=torch.float32, device=torch.device("cpu"))
DATA = SimpleNamespace(task=SimpleNamespace(name="sst2"), fingerprint="data-1")


def _store(value: int, seed: int = 1) -> None:
    runs.cached_run("toy", LM, DATA, {"seed": seed, "n_test": 1}, lambda: {"x": np.full(3, value)}, recompute=True)


def _read(seed: int = 1):
    r = runs.cached_run("toy", LM, DATA, {"seed": seed, "n_test": 1}, None, lookup_only=True)
    return None if r is None else int(r["x"].sum())


def test_encode_decode_is_exact():
    est = Estimate(np.float64(0.5), 0.25, 0.75, 10, 3, np.arange(3, dtype=np.float32), weak_low=0.3, weak_high=0.7)
    value = {"b": (1, 2.5, None), "a": [np.int64(7), np.float32(0.1), float("nan"), -float("inf")],
             ("model", "sst2"): est, "text": "ü", "arr": np.arange(6, dtype=np.int16).reshape(2, 3)}
    back = S.decode(json.loads(json.dumps(S.encode(value))))
    assert list(back) == list(value)  # the order of a dict is kept
    assert back["b"] == (1, 2.5, None) and isinstance(back["b"], tuple)
    assert type(back["a"][0]) is np.int64 and type(back["a"][1]) is np.float32 and back["a"][1] == np.float32(0.1)
    assert np.isnan(back["a"][2]) and back["a"][3] == -float("inf")
    e = back[("model", "sst2")]
    assert isinstance(e, Estimate) and type(e.value) is np.float64 and e.seed_values.dtype == np.float32
    assert e.weak_low == 0.3 and e.n == "10 × 3"
    assert back["arr"].dtype == np.int16 and back["arr"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_what_cannot_be_stored_is_refused_by_name():
    with pytest.raises(TypeError, match=r"summary\.table is a set"):
        S.encode({"table": {1, 2}}, "summary")
    with pytest.raises(TypeError, match="array of object"):
        S.encode(np.array([object()]))
    with pytest.raises(ValueError, match="not an allowed dataclass"):
        S.decode({"__dataclass__": "os.system", "fields": {}})
    with pytest.raises(ValueError, match="summary name"):
        S.summary("../x", lambda: 1)


def test_a_summary_is_computed_once_and_recomputed_when_its_result_changes(folders):
    calls = []

    def total():
        calls.append(1)
        return _read()

    _store(1)
    assert S.summary("toy/total", total) == 3 and len(calls) == 1
    S._MEMORY.clear()  # as a new process would
    assert S.summary("toy/total", total) == 3 and len(calls) == 1, "read back, not recomputed"
    assert S.last_status()["toy/total"] == "read"
    stored = json.loads((folders / "summaries" / "toy__total.json").read_text())
    assert list(stored["results"]) == ["toy/" + runs.find_result("toy", LM, DATA, {"seed": 1, "n_test": 1}).name]
    assert "helpers/core/runs.py" in stored["code"]

    _store(5)  # the result it read changed
    S._MEMORY.clear()
    assert S.summary("toy/total", total) == 15 and len(calls) == 2
    assert S.last_status()["toy/total"] == "computed"


def test_a_result_that_appears_later_invalidates_the_summary_that_missed_it(folders):
    assert S.summary("toy/missing", lambda: _read(seed=2)) is None
    _store(2, seed=2)
    S._MEMORY.clear()
    assert S.summary("toy/missing", lambda: _read(seed=2)) == 6


def test_other_inputs_are_another_summary(folders):
    assert S.summary("toy/dep", lambda: 1, depends={"k": 1}) == 1
    assert S.summary("toy/dep", lambda: 2, depends={"k": 2}) == 2


_CALLS: list[int] = []


@S.summarised("toy/sum")
def _summed(arrays):
    _CALLS.append(1)
    return float(sum(a.sum() for a in arrays))


def test_summarised_keys_on_the_content_of_the_arguments(folders):
    _CALLS.clear()
    assert _summed([np.ones(3), np.arange(3.0)]) == 6.0
    S._MEMORY.clear()
    assert _summed([np.ones(3), np.arange(3.0)]) == 6.0 and len(_CALLS) == 1
    assert _summed([np.ones(3), np.arange(4.0)]) == 9.0 and len(_CALLS) == 2


def test_code_hash_ignores_docstrings_not_code(tmp_path):
    a, b, c = (tmp_path / n for n in ("a.py", "b.py", "c.py"))
    a.write_text('"""One."""\ndef f():\n    """Doc."""\n    return 1  # a comment\n')
    b.write_text('"""Two."""\ndef f():\n    """Other doc."""\n    return 1\n')
    c.write_text('def f():\n    return 2\n')
    assert S._code_hash(a) == S._code_hash(b) != S._code_hash(c)


def test_prune_removes_what_the_build_did_not_use(folders):
    S.summary("toy/kept", lambda: 1)
    folder = folders / "summaries"
    (folder / "toy__old.json").write_text("{}")
    removed, used, computed = S.prune(folder)
    assert [p.name for p in removed] == ["toy__old.json"]
    assert used == computed == {"toy/kept"}
    assert (folder / "toy__kept.json").is_file() and not (folder / S.USED_LOG).exists()
    assert S.prune(folder) == ([], set(), set()), "nothing is removed without a build's log"


def test_without_a_summaries_folder_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(S.SUMMARIES_ENV, raising=False)
    monkeypatch.setattr(runs, "committed_results_dir", lambda: tmp_path / "committed")
    S._MEMORY.clear()
    assert S.summary("toy/memory", lambda: 4) == 4
    assert not (tmp_path / "committed").exists()
