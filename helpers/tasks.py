"""The four classification tasks of the paper: templates, label words, data, test subsets and demonstrations.

Templates and label words are the paper's (Table 4; ``../shared/docs/paper-spec.md`` §1.2-1.3). Label words carry
their leading space and are capitalised, in the Hugging Face label order.

Data come from a local folder in the ``shared/data`` format (``<folder>/<task>/{train,test}.jsonl`` and
``labels.json``) or from the Hugging Face hub. Which one is one rule, :func:`default_data_dir`:

1. ``data_dir=`` passed to :func:`load_task`;
2. else ``$ANCHORS_DATA`` (``ANCHORS_DATA=hub`` forces the hub);
3. else, in a source checkout, ``../shared/data`` next to the repository if it exists;
4. else the Hugging Face hub (what a Colab reader gets): parquet exports, which ``datasets>=4`` can load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = [
    "Task",
    "TASKS",
    "Example",
    "TaskData",
    "get_task",
    "load_task",
    "subsample_test",
    "sample_fixed_demonstrations",
    "sample_demonstrations_per_example",
    "DATA_ENV",
    "default_data_dir",
    "data_fingerprint",
]

DATA_ENV = "ANCHORS_DATA"
_REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Task:
    """A task's prompt format: ``"{input_prefix}: {text}\\n{label_prefix}:{label word}"``."""

    name: str
    title: str
    input_prefix: str
    label_prefix: str
    label_words: tuple[str, ...]  # index = HF label id; each with its leading space
    hub: tuple[str, str | None, str, str, str, str]  # repo, config, train split, test split, text col, label col

    @property
    def n_classes(self) -> int:
        return len(self.label_words)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(w.strip() for w in self.label_words)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("sst2", "SST-2", "Review", "Sentiment", (" Negative", " Positive"),
             ("nyu-mll/glue", "sst2", "train", "validation", "sentence", "label")),
        Task("trec", "TREC", "Question", "Answer Type",
             (" Abbreviation", " Entity", " Description", " Person", " Location", " Number"),
             ("CogComp/trec", None, "train", "test", "text", "coarse_label")),
        Task("agnews", "AG News", "Article", "Answer", (" World", " Sports", " Business", " Technology"),
             ("fancyzhx/ag_news", None, "train", "test", "text", "label")),
        Task("emoc", "EmoC", "Dialogue", "Emotion", (" Others", " Happy", " Sad", " Angry"),
             ("SemEvalWorkshop/emo", None, "train", "test", "text", "label")),
    ]
}
_ALIASES = {"emo": "emoc", "ag_news": "agnews", "sst-2": "sst2"}


def get_task(name: str | Task) -> Task:
    """The task called ``name`` (``sst2``, ``trec``, ``agnews``, ``emoc``; ``emo`` is accepted)."""
    if isinstance(name, Task):
        return name
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ValueError(f"Unknown task {name!r}. Choose one of: {', '.join(TASKS)}")
    return TASKS[key]


@dataclass(frozen=True)
class Example:
    text: str
    label: int


def data_fingerprint(task: Task, train: tuple[Example, ...], test: tuple[Example, ...]) -> str:
    """A content hash of a task's examples: every (text, label) of train then test, in order.

    It identifies the data in the results cache's key. It hashes the examples rather than the files, so the same
    rows give the same fingerprint whether they come from a local folder or from the hub (the committed results are
    then found by both), and an edited, reordered or different subset gives another one.
    """
    h = hashlib.sha256(f"{task.name}\0{task.n_classes}\0".encode())
    for split, rows in (("train", train), ("test", test)):
        h.update(f"{split}\0{len(rows)}\0".encode())
        for e in rows:
            h.update(e.text.encode("utf-8"))
            h.update(f"\0{e.label}\n".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class TaskData:
    task: Task
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    source: str  # the folder or hub id the data came from
    # content hash of the examples (see data_fingerprint), computed at load time; part of every cached result's key
    fingerprint: str = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "fingerprint", data_fingerprint(self.task, self.train, self.test))

    def labels(self, split: str = "train") -> np.ndarray:
        return np.array([e.label for e in getattr(self, split)])


def _read_jsonl(path: Path) -> tuple[Example, ...]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out.append(Example(row["text"], int(row["label"])))
    return tuple(out)


def default_data_dir() -> Path | None:
    """The data folder used when ``load_task`` gets no ``data_dir``; ``None`` means the Hugging Face hub.

    ``$ANCHORS_DATA`` if set (``hub`` for the hub); else ``../shared/data`` next to the repository in a source
    checkout, if that folder exists; else the hub.
    """
    env = os.environ.get(DATA_ENV, "").strip()
    if env:
        return None if env.lower() == "hub" else Path(env).expanduser().resolve()
    sibling = _REPO_ROOT.parent / "shared" / "data"
    if (_REPO_ROOT / "pyproject.toml").is_file() and sibling.is_dir():
        return sibling.resolve()
    return None


def load_task(name: str | Task, data_dir: str | os.PathLike | None = None) -> TaskData:
    """Load a task's train (demonstration pool) and test splits.

    ``data_dir`` is a folder holding ``<task>/train.jsonl``, ``<task>/test.jsonl`` and ``<task>/labels.json``; by
    default :func:`default_data_dir` decides (``$ANCHORS_DATA``, ``../shared/data`` in a checkout, else the hub).
    """
    task = get_task(name)
    folder = Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir()
    if folder is not None:
        return _load_local(task, str(folder))
    return _load_hub(task)


@lru_cache(maxsize=8)
def _load_local(task: Task, folder: str) -> TaskData:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Data folder {root} does not exist. Pass data_dir= or set {DATA_ENV} to a folder in the shared/data "
            "format, or unset it to load from the Hugging Face hub."
        )
    sub = root / task.name
    files = [sub / "train.jsonl", sub / "test.jsonl", sub / "labels.json"]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Task {task.name!r}: missing {', '.join(missing)} in the data folder {root}")
    n_labels = len(json.loads(files[2].read_text()))
    if n_labels != task.n_classes:
        raise ValueError(f"{files[2]} lists {n_labels} labels, task {task.name!r} has {task.n_classes}")
    data = TaskData(task, _read_jsonl(files[0]), _read_jsonl(files[1]), str(sub))
    for split in ("train", "test"):
        bad = {e.label for e in getattr(data, split)} - set(range(task.n_classes))
        if bad:
            raise ValueError(f"{sub}/{split}.jsonl has labels {sorted(bad)} outside 0..{task.n_classes - 1}")
    return data


@lru_cache(maxsize=8)
def _load_hub(task: Task) -> TaskData:  # pragma: no cover - needs the network
    from datasets import load_dataset

    repo, config, train_split, test_split, text_col, label_col = task.hub
    # Script-based datasets (trec, emo) are read from the hub's automatic parquet export.
    revision = "refs/convert/parquet" if repo in ("CogComp/trec", "SemEvalWorkshop/emo") else None
    ds = load_dataset(repo, config, revision=revision)

    def rows(split):
        return tuple(Example(t, int(y)) for t, y in zip(ds[split][text_col], ds[split][label_col]))

    return TaskData(task, rows(train_split), rows(test_split), f"hub:{repo}")


# --------------------------------------------------------------------------------------------------------------------
# Sampling: the paper's test subset and its two demonstration samplers
# --------------------------------------------------------------------------------------------------------------------


def subsample_test(data: TaskData, seed: int, n: int = 1000) -> list[int]:
    """Indices of the test examples the paper evaluates: HF ``test.shuffle(seed).select(range(min(n, len)))``.

    HF's shuffle is ``np.random.default_rng(seed).permutation(len)``; we use the same, so the indices are the
    paper's. SST-2 has 872 test examples and TREC 500, so ``n=1000`` keeps all of them (in shuffled order).
    """
    perm = np.random.default_rng(seed).permutation(len(data.test))
    return [int(i) for i in perm[: min(n, len(data.test))]]


def sample_fixed_demonstrations(
    data: TaskData, shots_per_class: int, seed: int, extra_per_class: int = 0
) -> tuple[list[int], list[int]]:
    """Scheme A (every experiment but saliency): one demonstration set per seed, shared by all test examples.

    The official ``sample_two_set_with_shot_per_class``: shuffle all train indices with numpy's legacy RNG seeded
    with ``seed``, walk through them, and keep the first ``shots_per_class`` of each class as demonstrations (in
    order of appearance, so the class order is random but fixed per seed) and the next ``extra_per_class`` of each
    class as a second set (re-weighting's training set). Returns (demonstration indices, extra indices).
    """
    if shots_per_class < 1:
        raise ValueError("shots_per_class must be at least 1 (an empty demonstration set is not in-context learning)")
    order = list(range(len(data.train)))
    np.random.RandomState(seed).shuffle(order)
    counts_a: dict[int, int] = {}
    counts_b: dict[int, int] = {}
    demos, extra = [], []
    for i in order:
        y = data.train[i].label
        if counts_a.get(y, 0) < shots_per_class:
            demos.append(i)
            counts_a[y] = counts_a.get(y, 0) + 1
        elif counts_b.get(y, 0) < extra_per_class:
            extra.append(i)
            counts_b[y] = counts_b.get(y, 0) + 1
    short = [c for c in range(data.task.n_classes) if counts_a.get(c, 0) < shots_per_class]
    if short:
        raise ValueError(f"the train split has fewer than {shots_per_class} examples of classes {short}")
    return demos, extra


def sample_demonstrations_per_example(
    data: TaskData, n_examples: int, shots_per_class: int, seed: int
) -> list[list[int]]:
    """Scheme B (§2.1 saliency, ``attention_attr.py``): fresh demonstrations for every test example.

    ``np.random.seed(seed)`` once; for each example draw ``shots_per_class`` indices per class with
    ``np.random.choice`` (with replacement), concatenate in class order, then apply HF ``shuffle(seed)`` -- the same
    permutation for every example, since the size and seed never change.
    """
    if shots_per_class < 1:
        raise ValueError("shots_per_class must be at least 1 (an empty demonstration set is not in-context learning)")
    labels = data.labels("train")
    by_class = [np.where(labels == c)[0] for c in range(data.task.n_classes)]
    rng = np.random.RandomState(seed)
    size = shots_per_class * data.task.n_classes
    perm = np.random.default_rng(seed).permutation(size)
    out = []
    for _ in range(n_examples):
        drawn = np.concatenate([rng.choice(ids, shots_per_class) for ids in by_class])
        out.append([int(drawn[j]) for j in perm])
    return out
