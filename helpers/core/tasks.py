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

import gzip
import hashlib
import json
import math
import os
import re
import warnings
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
    "check_path_name",
]

DATA_ENV = "ANCHORS_DATA"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_PATH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def check_path_name(name, what: str = "name") -> str:
    """``name`` if it is safe as one path component (a task, an experiment or a benchmark folder becomes part of a
    results path): letters, digits and ``. _ + -``, not starting with a dot, no ``..``, no separator. Anything
    else is a ``ValueError`` naming it (a name like ``../../x`` would otherwise write outside the results folder)."""
    if not isinstance(name, str) or not _PATH_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} cannot be part of a file name: use letters, digits and '.', '_', '+', '-' only "
            "(no path separator, no '..', not starting with '.')"
        )
    return name


@dataclass(frozen=True)
class Task:
    """A task's prompt format: ``"{input_prefix}: {text}\\n{label_prefix}:{label word}"``."""

    name: str
    title: str
    input_prefix: str
    label_prefix: str
    label_words: tuple[str, ...]  # index = HF label id; each with its leading space
    hub: tuple[str, str | None, str, str, str, str]  # repo, config, train split, test split, text col, label col
    hub_label_names: tuple[str, ...] = ()  # the hub's ClassLabel names, in label-id order (checked when loading)

    def __post_init__(self):
        check_path_name(self.name, "a task name")  # it names the data sub-folder and every result file
        words = tuple(self.label_words)
        if not words:
            raise ValueError(f"task {self.name!r} has no label words")
        for i, w in enumerate(words):
            if not isinstance(w, str) or not w.strip():
                raise ValueError(f"task {self.name!r}: label word {i} is {w!r}; every label word must be a non-empty "
                                 "string (with its leading space, e.g. ' Positive')")
        if len(set(words)) != len(words):
            raise ValueError(f"task {self.name!r} has the same label word twice: {list(words)}")

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
             ("nyu-mll/glue", "sst2", "train", "validation", "sentence", "label"), ("negative", "positive")),
        Task("trec", "TREC", "Question", "Answer Type",
             (" Abbreviation", " Entity", " Description", " Person", " Location", " Number"),
             ("CogComp/trec", None, "train", "test", "text", "coarse_label"),
             ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM")),
        Task("agnews", "AG News", "Article", "Answer", (" World", " Sports", " Business", " Technology"),
             ("fancyzhx/ag_news", None, "train", "test", "text", "label"), ("World", "Sports", "Business", "Sci/Tech")),
        Task("emoc", "EmoC", "Dialogue", "Emotion", (" Others", " Happy", " Sad", " Angry"),
             ("SemEvalWorkshop/emo", None, "train", "test", "text", "label"), ("others", "happy", "sad", "angry")),
    ]
}
_ALIASES = {"emo": "emoc", "ag_news": "agnews", "sst-2": "sst2"}


def get_task(name: str | Task) -> Task:
    """The task called ``name`` (``sst2``, ``trec``, ``agnews``, ``emoc``; ``emo`` is accepted)."""
    if isinstance(name, Task):
        return name
    if not isinstance(name, str):
        raise TypeError(f"a task is a name ({', '.join(TASKS)}) or a Task, not {name!r}")
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

    Computed once per process for the same example tuples (immutable, so the same tuples mean the same content):
    a task wrapped again (another label regime sharing the splits, a reloaded cached folder) costs nothing.
    """
    key = (task.name, task.n_classes, id(train), id(test))
    hit = _FINGERPRINTS.get(key)
    if hit is not None and hit[0] is train and hit[1] is test:
        return hit[2]
    h = hashlib.sha256(f"{task.name}\0{task.n_classes}\0".encode())
    for split, rows in (("train", train), ("test", test)):
        h.update(f"{split}\0{len(rows)}\0".encode())
        for e in rows:
            h.update(e.text.encode("utf-8"))
            h.update(f"\0{e.label}\n".encode())
    if len(_FINGERPRINTS) >= 64:
        _FINGERPRINTS.pop(next(iter(_FINGERPRINTS)))
    _FINGERPRINTS[key] = (train, test, h.hexdigest()[:16])
    return _FINGERPRINTS[key][2]


_FINGERPRINTS: dict[tuple, tuple] = {}  # (task, id(train), id(test)) -> (train, test, fingerprint); the tuples are
# kept, so an id is never reused by other tuples while its entry exists


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
    """Rows ``{"text": str, "label": int, ...}``; a bad line raises ``ValueError`` naming the file and line (1-based)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict) or "text" not in row or "label" not in row:
                raise ValueError(f"{path}, line {lineno}: expected an object with 'text' and 'label', got {line[:80]!r}")
            label = row["label"]
            if (isinstance(label, bool) or not isinstance(label, (int, float))
                    or (isinstance(label, float) and not math.isfinite(label)) or int(label) != label):
                raise ValueError(f"{path}, line {lineno}: the label must be an integer class id, got "
                                 f"{json.dumps(label)}")
            if not isinstance(row["text"], str):
                raise ValueError(f"{path}, line {lineno}: the text must be a string, got {row['text']!r}")
            out.append(Example(row["text"], int(label)))
    return tuple(out)


def check_label_names(task: Task, names, where: str) -> None:
    """The data's class names, in label-id order, must be the task's (the hub's names or the label words)."""
    names = [str(n) for n in names]
    if len(names) != task.n_classes:
        raise ValueError(f"{where} lists {len(names)} labels, task {task.name!r} has {task.n_classes}")
    accepted = [{a.lower(), b.lower()} for a, b in zip(task.hub_label_names or task.class_names, task.class_names)]
    if all(n.strip().lower() in ok for n, ok in zip(names, accepted)):
        return
    expected = list(task.hub_label_names or task.class_names)
    same = sorted(n.strip().lower() for n in names) == sorted(e.lower() for e in expected)
    problem = "the same classes in another order" if same else "other class names"
    raise ValueError(
        f"{where} has {problem}: {names}; task {task.name!r} needs label ids in the order {expected} "
        f"(its label words {list(task.class_names)} are indexed by them)"
    )


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


def _load_local(task: Task, folder: str) -> TaskData:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Data folder {root} does not exist. Pass data_dir= or set {DATA_ENV} to a folder in the shared/data "
            f"format, or set {DATA_ENV}=hub to load from the Hugging Face hub."
        )
    sub = root / task.name
    files = [sub / "train.jsonl", sub / "test.jsonl", sub / "labels.json"]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Task {task.name!r}: missing {', '.join(missing)} in the data folder {root}")
    # The files' contents are the cache key: data edited in this process are re-read, even when the new file has
    # the old one's size and modification time (``cp -p``, ``rsync -t``).
    signature = tuple(_file_digest(p) for p in files)
    return _load_local_files(task, str(sub), signature)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=8)
def _load_local_files(task: Task, folder: str, signature: tuple) -> TaskData:
    sub = Path(folder)
    labels_file = sub / "labels.json"
    try:
        labels = json.loads(labels_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{labels_file}: not valid JSON ({err.msg})") from None
    if isinstance(labels, dict):
        try:
            ids = sorted(int(k) for k in labels)
        except ValueError:
            raise ValueError(f"{labels_file}: keys must be label ids 0, 1, ..., got {list(labels)}") from None
        if ids != list(range(len(labels))):
            raise ValueError(f"{labels_file}: keys must be label ids 0..{len(labels) - 1}, got {list(labels)}")
        names = [labels[str(i)] if str(i) in labels else labels[i] for i in ids]
    else:
        names = list(labels)
    check_label_names(task, names, str(labels_file))
    data = TaskData(task, _read_jsonl(sub / "train.jsonl"), _read_jsonl(sub / "test.jsonl"), str(sub))
    for split in ("train", "test"):
        bad = {e.label for e in getattr(data, split)} - set(range(task.n_classes))
        if bad:
            raise ValueError(f"{sub}/{split}.jsonl has labels {sorted(bad)} outside 0..{task.n_classes - 1}")
        if not getattr(data, split):
            raise ValueError(f"{sub}/{split}.jsonl has no examples")
    return data


# The book's AG News demonstration pool is an 11,611-row subset of HF ag_news train (the full train.csv could not be
# obtained offline; see the data folder's README). To give a hub reader the same rows in the same order, the package
# ships two hashes of each row's text, in the local file's order: of the exact text, and of the text with its
# whitespace normalised (a fallback, should a copy differ in spacing). The hub loader picks HF train's rows by them.
AGNEWS_SUBSET = Path(__file__).resolve().parent / "data" / "agnews_train_subset.txt.gz"


def text_hashes(text: str) -> tuple[str, str]:
    """SHA-1 (first 12 hex digits) of a text, and of the text with its whitespace normalised."""
    def h(t: str) -> str:
        return hashlib.sha1(t.encode("utf-8")).hexdigest()[:12]

    return h(text), h(" ".join(text.split()))


def agnews_subset_hashes() -> list[tuple[str, str]]:
    """The (exact, normalised) text hashes of the book's AG News train rows, in order."""
    with gzip.open(AGNEWS_SUBSET, "rt", encoding="ascii") as f:
        return [tuple(line.split()) for line in f if line.strip()]


def select_by_hashes(rows: tuple[Example, ...], hashes: list[tuple[str, str]], what: str) -> tuple[Example, ...]:
    """The rows whose text hashes are in ``hashes``, in that order (exact text first, else normalised whitespace,
    each row used once); warns about the ones not found."""
    exact: dict[str, int] = {}
    loose: dict[str, list[int]] = {}
    for i, e in enumerate(rows):
        a, b = text_hashes(e.text)
        exact.setdefault(a, i)
        loose.setdefault(b, []).append(i)
    used: set[int] = set()
    picked = []
    for a, b in hashes:
        i = exact.get(a)
        if i is None or i in used:
            i = next((j for j in loose.get(b, ()) if j not in used), None)
        if i is not None:
            used.add(i)
            picked.append(i)
    if len(picked) < len(hashes):
        warnings.warn(
            f"{what}: {len(hashes) - len(picked)} of the book's {len(hashes)} rows were not found on the hub; using "
            f"the {len(picked)} found (demonstrations, and so results, differ from the book's)",
            stacklevel=3,
        )
    return tuple(rows[i] for i in picked)


@lru_cache(maxsize=8)
def _load_hub(task: Task) -> TaskData:
    repo, config, train_split, test_split, text_col, label_col = task.hub
    # Script-based datasets (trec, emo) are read from the hub's automatic parquet export.
    revision = "refs/convert/parquet" if repo in ("CogComp/trec", "SemEvalWorkshop/emo") else None
    try:
        from datasets import load_dataset

        ds = load_dataset(repo, config, revision=revision)
    except Exception as err:
        raise ConnectionError(
            f"Could not load {task.name!r} ({repo}) from the Hugging Face hub: {type(err).__name__}: {err}\n"
            f"Offline? Set {DATA_ENV} to a folder with <task>/train.jsonl, test.jsonl and labels.json."
        ) from err
    for split in (train_split, test_split):
        if split not in ds:
            raise ValueError(f"{repo} has no split {split!r} (it has {list(ds)})")
        missing = {text_col, label_col} - set(ds[split].column_names)
        if missing:
            raise ValueError(f"{repo} [{split}] has no column(s) {sorted(missing)} (it has {ds[split].column_names})")
        names = getattr(ds[split].features[label_col], "names", None)
        if names is not None:
            check_label_names(task, names, f"{repo} [{split}] column {label_col!r}")

    def rows(split):
        out = []
        for i, (t, y) in enumerate(zip(ds[split][text_col], ds[split][label_col])):
            if isinstance(y, bool) or not isinstance(y, (int, np.integer)) or not isinstance(t, str):
                raise ValueError(f"{repo} [{split}] row {i}: expected a text and an integer label, got "
                                 f"{t!r:.80} and {y!r}")
            out.append(Example(t, int(y)))
        return tuple(out)

    train = rows(train_split)
    if task.name == "agnews":
        train = select_by_hashes(train, agnews_subset_hashes(), f"{repo} train")
    data = TaskData(task, train, rows(test_split), f"hub:{repo}")
    for split in ("train", "test"):
        bad = {e.label for e in getattr(data, split)} - set(range(task.n_classes))
        if bad:
            raise ValueError(f"{repo} {split} has labels {sorted(bad)} outside 0..{task.n_classes - 1}")
    return data


# --------------------------------------------------------------------------------------------------------------------
# Sampling: the paper's test subset and its two demonstration samplers
# --------------------------------------------------------------------------------------------------------------------


def subsample_test(data: TaskData, seed: int, n: int = 1000) -> list[int]:
    """Indices of the test examples the paper evaluates: HF ``test.shuffle(seed).select(range(min(n, len)))``.

    HF's shuffle is ``np.random.default_rng(seed).permutation(len)``; we use the same, so the indices are the
    paper's. SST-2 has 872 test examples and TREC 500, so ``n=1000`` keeps all of them (in shuffled order).
    """
    _check_size(n, "n")
    perm = np.random.default_rng(seed).permutation(len(data.test))
    return [int(i) for i in perm[: min(n, len(data.test))]]


def _check_size(n, what: str) -> None:
    """A size must be an integer >= 0 (a negative one would slice "all but n")."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {n!r}")


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
    _check_size(n_examples, "n_examples")
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
