"""The Hugging Face hub path of load_task, with ``datasets.load_dataset`` mocked (no network): which repository,
configuration, revision, splits and columns are read, the label order check, the AG News subset selection, and the
errors."""

from __future__ import annotations

import gzip

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from helpers.core import tasks
from helpers.core.tasks import TASKS, Example, TaskData, load_task

# What each hub dataset looks like (split names, text and label columns, ClassLabel names), as the paper's code
# (datasets 2.10) and the parquet exports have them.
HUB = {
    "sst2": (("train", "validation", "test"), "sentence", "label", ["negative", "positive"]),
    "trec": (("train", "test"), "text", "coarse_label", ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"]),
    "agnews": (("train", "test"), "text", "label", ["World", "Sports", "Business", "Sci/Tech"]),
    "emoc": (("train", "test"), "text", "label", ["others", "happy", "sad", "angry"]),
}


def _dataset(task, names=None, rows=None, drop=None, extra_cols=True):
    splits, text_col, label_col, hub_names = HUB[task]
    names = names or hub_names
    out = {}
    for split in splits:
        data = rows or [(f"{split} text {i}", i % len(names)) for i in range(2 * len(names))]
        cols = {text_col: [t for t, _ in data], label_col: [y for _, y in data]}
        feats = {text_col: Value("string"), label_col: ClassLabel(names=names)}
        if extra_cols and task == "sst2":
            cols["idx"] = list(range(len(data)))
            feats["idx"] = Value("int32")
        if drop:
            cols.pop(drop)
            feats.pop(drop)
        out[split] = Dataset.from_dict(cols, features=Features(feats))
    return DatasetDict(out)


@pytest.fixture
def hub(monkeypatch):
    """Route load_task to the hub and record load_dataset's calls; ``hub.serve(task, **kw)`` sets what it returns."""
    import datasets

    calls = []
    state = {}

    def load_dataset(repo, config=None, revision=None, **kw):
        calls.append((repo, config, revision))
        if "error" in state:
            raise state["error"]
        return state["ds"]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setenv("ANCHORS_DATA", "hub")
    tasks._load_hub.cache_clear()
    yield type("Hub", (), {"calls": calls, "serve": lambda self, task, **kw: state.update(ds=_dataset(task, **kw)),
                           "fail": lambda self, err: state.update(error=err)})()
    tasks._load_hub.cache_clear()


@pytest.mark.parametrize("name", ["sst2", "trec", "emoc"])
def test_hub_repository_splits_and_columns(hub, name):
    hub.serve(name)
    data = load_task(name)
    repo, config, train_split, test_split, text_col, label_col = TASKS[name].hub
    revision = "refs/convert/parquet" if name in ("trec", "emoc") else None
    assert hub.calls == [(repo, config, revision)]
    assert data.source == f"hub:{repo}"
    assert data.train[0] == Example("train text 0", 0)
    assert data.test[1] == Example(f"{test_split} text 1", 1)  # SST-2: the paper evaluates on GLUE validation
    assert len(data.train) == 2 * TASKS[name].n_classes


def test_same_rows_from_the_hub_and_a_folder_have_the_same_fingerprint(hub, tmp_path):
    """So a hub reader finds results computed on the local copy when the rows are the same (cache key)."""
    import json

    hub.serve("sst2")
    from_hub = load_task("sst2")
    folder = tmp_path / "sst2"
    folder.mkdir()
    (folder / "labels.json").write_text(json.dumps({"0": "negative", "1": "positive"}))
    for split, rows in (("train", from_hub.train), ("test", from_hub.test)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n"
                                                       for e in rows))
    assert load_task("sst2", tmp_path).fingerprint == from_hub.fingerprint


def test_hub_label_order_is_checked(hub):
    hub.serve("sst2", names=["positive", "negative"])
    with pytest.raises(ValueError, match="the same classes in another order"):
        load_task("sst2")


def test_old_trec_label_order_is_refused(hub):
    """trec 1.x had another coarse-label order (DESC, ENTY, ABBR, HUM, NUM, LOC): it must not pass silently."""
    hub.serve("trec", names=["DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC"])
    with pytest.raises(ValueError, match="another order"):
        load_task("trec")


def test_hub_missing_column(hub):
    hub.serve("sst2", drop="sentence")
    with pytest.raises(ValueError, match=r"no column\(s\) \['sentence'\]"):
        load_task("sst2")


def test_hub_unreachable_gives_a_clear_error(hub):
    hub.fail(OSError("Max retries exceeded with url: https://huggingface.co/..."))
    with pytest.raises(ConnectionError, match="(?s)Could not load 'agnews'.*Offline\\? Set ANCHORS_DATA"):
        load_task("agnews")


def test_agnews_subset_is_selected_by_hash_in_the_books_order(hub, monkeypatch, tmp_path):
    book_rows = [("a story about football", 1), ("markets fell", 2), ("new  chip", 3)]  # note the double space
    hub_rows = [("unrelated", 0), ("new chip", 3), ("markets fell", 2), ("a story about football", 1), ("x", 0)]
    subset = tmp_path / "subset.txt.gz"
    with gzip.open(subset, "wt") as f:
        f.write("".join(" ".join(tasks.text_hashes(t)) + "\n" for t, _ in book_rows))
    monkeypatch.setattr(tasks, "AGNEWS_SUBSET", subset)
    hub.serve("agnews", rows=hub_rows)
    data = load_task("agnews")
    # the book's order; "new  chip" found through the whitespace-normalised hash
    assert [e.text for e in data.train] == ["a story about football", "markets fell", "new chip"]
    assert len(data.test) == len(hub_rows), "the test split is the hub's whole test split"
    # rows missing from the hub: a warning, the rows found
    with gzip.open(subset, "at") as f:
        f.write(" ".join(tasks.text_hashes("not on the hub")) + "\n")
    tasks._load_hub.cache_clear()
    with pytest.warns(UserWarning, match="1 of the book's 4 rows were not found"):
        assert len(load_task("agnews").train) == 3


def test_shipped_agnews_hashes_select_the_local_subset_exactly(data_dir):
    """The shipped hash list reproduces the book's 11,611 rows, in order, from any superset (here: shuffled, with
    extra rows) -- what a hub reader gets if the hub has the same texts."""
    import random

    local = load_task("agnews", data_dir)
    hashes = tasks.agnews_subset_hashes()
    assert len(hashes) == len(local.train) == 11611
    pool = list(local.train) + [Example(f"other {i}", i % 4) for i in range(500)]
    random.Random(0).shuffle(pool)
    picked = tasks.select_by_hashes(tuple(pool), hashes, "test")
    assert picked == local.train
    assert TaskData(local.task, picked, local.test, "hub").fingerprint == local.fingerprint
