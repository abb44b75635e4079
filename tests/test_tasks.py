"""Tasks: the paper's label words, the shared data, and the paper's samplers (reimplemented here to compare)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from helpers.core.tasks import (
    TASKS,
    get_task,
    load_task,
    sample_demonstrations_per_example,
    sample_fixed_demonstrations,
    subsample_test,
)

# lancopku/label-words-are-anchors, icl/util_classes/arg_classes.py: label_dict per task, HF label order.
PAPER_LABEL_WORDS = {
    "sst2": (" Negative", " Positive"),
    "trec": (" Abbreviation", " Entity", " Description", " Person", " Location", " Number"),
    "agnews": (" World", " Sports", " Business", " Technology"),
    "emoc": (" Others", " Happy", " Sad", " Angry"),
}
# labels.json of shared/data (HF ClassLabel names), in the same order as the label words.
HF_NAMES = {
    "sst2": ["negative", "positive"],
    "trec": ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"],
    "agnews": ["World", "Sports", "Business", "Sci/Tech"],
    "emoc": ["others", "happy", "sad", "angry"],
}
# shared/data/README.md: rows and per-class counts
COUNTS = {
    "sst2": ((29_780, 37_569), (428, 444)),
    "trec": ((86, 1_250, 1_162, 1_223, 835, 896), (9, 94, 138, 65, 81, 113)),
    "agnews": ((2_858, 2_826, 2_829, 3_098), (1_900,) * 4),
    "emoc": ((14_948, 4_243, 5_463, 5_506), (4_677, 284, 250, 298)),
}
TOTALS = {"sst2": (67_349, 872), "trec": (5_452, 500), "agnews": (11_611, 7_600), "emoc": (30_160, 5_509)}


def test_label_words_are_the_papers():
    assert set(TASKS) == set(PAPER_LABEL_WORDS)
    for name, words in PAPER_LABEL_WORDS.items():
        task = get_task(name)
        assert task.label_words == words
        assert task.n_classes == len(words)
        assert task.class_names == tuple(w.strip() for w in words)


def test_task_aliases():
    assert get_task("emo") is TASKS["emoc"]
    assert get_task("SST-2") is TASKS["sst2"]
    assert get_task("ag_news") is TASKS["agnews"]
    assert get_task(TASKS["trec"]) is TASKS["trec"]


@pytest.mark.parametrize("name", list(TASKS))
def test_shared_data_counts_and_label_order(name, data_dir):
    data = load_task(name, data_dir)
    n_train, n_test = TOTALS[name]
    assert len(data.train) == n_train and len(data.test) == n_test
    train_counts, test_counts = COUNTS[name]
    k = data.task.n_classes
    assert tuple(Counter(e.label for e in data.train)[c] for c in range(k)) == train_counts
    assert tuple(Counter(e.label for e in data.test)[c] for c in range(k)) == test_counts
    labels = json.loads((data_dir / name / "labels.json").read_text())
    assert [labels[str(c)] for c in range(k)] == HF_NAMES[name]
    assert all(isinstance(e.text, str) and e.text for e in data.test[:50])
    assert data.labels("test").shape == (n_test,)
    # rows are in the file's (= HF) order
    with open(data_dir / name / "test.jsonl", encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert (data.test[0].text, data.test[0].label) == (first["text"], first["label"])


def test_sst2_keeps_trailing_space(data_dir):
    data = load_task("sst2", data_dir)
    assert data.test[0].text == "it 's a charming and often affecting journey . "


def test_load_task_uses_env(data_dir, monkeypatch):
    monkeypatch.setenv("ANCHORS_DATA", str(data_dir))
    data = load_task("trec")
    assert len(data.test) == 500 and data.source.endswith("trec")


# --------------------------------------------------------------------------------------------------------------------
# Test subset: HF `test.shuffle(seed).select(range(min(1000, n)))`
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("seed", [42, 43])
def test_subsample_test(name, seed, data_dir):
    data = load_task(name, data_dir)
    n = len(data.test)
    got = subsample_test(data, seed)
    k = min(1000, n)
    assert len(got) == k and len(set(got)) == k
    assert got == [int(i) for i in np.random.default_rng(seed).permutation(n)[:k]]
    assert subsample_test(data, seed, n=10) == got[:10]
    if n <= 1000:  # SST-2 and TREC: everything, shuffled
        assert sorted(got) == list(range(n))
    try:
        import datasets
    except ImportError:
        return
    ds = datasets.Dataset.from_dict({"i": list(range(n))})
    assert got == ds.shuffle(seed=seed)["i"][:k]


def test_subsample_differs_across_seeds(data_dir):
    data = load_task("agnews", data_dir)
    assert subsample_test(data, 1) != subsample_test(data, 2)


# --------------------------------------------------------------------------------------------------------------------
# Scheme A: one demonstration set per seed (official sample_two_set_with_shot_per_class)
# --------------------------------------------------------------------------------------------------------------------


def reference_two_sets(labels, a_shot, b_shot, seed):
    """The official sampler, reimplemented with the global legacy RNG: np.random.seed + np.random.shuffle."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        order = list(range(len(labels)))
        np.random.shuffle(order)
    finally:
        np.random.set_state(state)
    a_count, b_count, a, b = {}, {}, [], []
    for i in order:
        y = int(labels[i])
        if a_count.get(y, 0) < a_shot:
            a.append(i)
            a_count[y] = a_count.get(y, 0) + 1
        elif b_count.get(y, 0) < b_shot:
            b.append(i)
            b_count[y] = b_count.get(y, 0) + 1
    return a, b


@pytest.mark.parametrize("name", list(TASKS))
def test_fixed_demonstrations(name, data_dir):
    data = load_task(name, data_dir)
    labels = data.labels("train")
    demos, extra = sample_fixed_demonstrations(data, 1, 42)
    assert sorted(labels[demos].tolist()) == list(range(data.task.n_classes))  # one per class
    assert extra == []
    assert sample_fixed_demonstrations(data, 1, 42) == (demos, extra)  # deterministic
    assert (demos, extra) == reference_two_sets(labels, 1, 0, 42)
    others = {tuple(sample_fixed_demonstrations(data, 1, s)[0]) for s in (1, 2, 3)}
    assert tuple(demos) not in others and len(others) == 3  # different across seeds


def test_fixed_demonstrations_with_extra_set(data_dir):
    data = load_task("sst2", data_dir)
    labels = data.labels("train")
    demos, extra = sample_fixed_demonstrations(data, 2, 7, extra_per_class=4)
    assert (demos, extra) == reference_two_sets(labels, 2, 4, 7)
    assert Counter(labels[demos].tolist()) == {0: 2, 1: 2}
    assert Counter(labels[extra].tolist()) == {0: 4, 1: 4}
    assert not set(demos) & set(extra)


# --------------------------------------------------------------------------------------------------------------------
# Scheme B: fresh demonstrations per example (official attention_attr.py)
# --------------------------------------------------------------------------------------------------------------------


def reference_per_example(labels, n_classes, n_examples, shots, seed):
    """attention_attr.py: np.random.seed(seed); per example np.random.choice per class; HF shuffle(seed)."""
    by_class = [np.where(labels == c)[0] for c in range(n_classes)]
    perm = np.random.default_rng(seed).permutation(shots * n_classes)  # Dataset.select(ids).shuffle(seed)
    state = np.random.get_state()
    out = []
    try:
        np.random.seed(seed)
        for _ in range(n_examples):
            ids = []
            for pool in by_class:
                ids.extend(np.random.choice(pool, shots))
            out.append([int(ids[j]) for j in perm])
    finally:
        np.random.set_state(state)
    return out


@pytest.mark.parametrize("name", ["sst2", "trec"])
@pytest.mark.parametrize("shots", [1, 2])
def test_demonstrations_per_example(name, shots, data_dir):
    data = load_task(name, data_dir)
    labels = data.labels("train")
    k = data.task.n_classes
    got = sample_demonstrations_per_example(data, 20, shots, 42)
    assert got == reference_per_example(labels, k, 20, shots, 42)
    try:
        import datasets
    except ImportError:
        pass
    else:  # the official code's own step: Dataset.select(drawn ids).shuffle(seed)
        rng = np.random.RandomState(42)
        by_class = [np.where(labels == c)[0] for c in range(k)]
        for demo in got[:3]:
            drawn = [int(i) for pool in by_class for i in rng.choice(pool, shots)]
            assert demo == datasets.Dataset.from_dict({"i": drawn}).shuffle(seed=42)["i"]
    class_orders = {tuple(labels[d].tolist()) for d in got}
    assert len(class_orders) == 1  # the same class permutation for every example
    (order,) = class_orders
    assert Counter(order) == {c: shots for c in range(k)}
    assert len({tuple(d) for d in got}) > 15  # but fresh demonstrations
    assert got == sample_demonstrations_per_example(data, 20, shots, 42)
    assert got != sample_demonstrations_per_example(data, 20, shots, 43)
