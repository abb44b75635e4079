"""Summaries that a page shows, computed once: verdict estimates, bootstraps, per-chapter tables' numbers, a
model's facts. Each is cached beside the committed results (``results/summaries/``) and reused for as long as what
it was computed from is unchanged.

**What a summary depends on** is recorded while it is computed, not declared by hand:

* every cached result it asked the results cache for (:func:`helpers.core.runs.cached_run`, found or not, and every
  benchmark read through :func:`helpers.core.runs.bench_file`): its path and the sha256 of the file that answered
  (the first one found in :func:`helpers.core.runs.search_dirs`), or "absent";
* the model identities in those requests (an upgraded model package changes them);
* every source file of this package that ran while computing it, hashed without docstrings and comments (an edited
  bootstrap, rule or page function changes it; an edited docstring does not);
* the base data of the four tasks (their fingerprints), the results' version and transformers' major.minor version,
  and whatever the caller adds (``depends``: e.g. the content of arrays it passes in, :func:`content_hash`).

A summary is read back only if all of these are still what they were; otherwise it is recomputed (and, where a
summaries folder is writable, stored again). So a changed, added or removed result invalidates exactly the summaries
that read it. The requests are recorded with a trace function that is active only while a summary is computed.

**Where they live.** Read from ``$ANCHORS_SUMMARIES`` (if set), then from the committed ``results/summaries/`` (in
an installed package, ``helpers/_results/summaries/``). Written to ``$ANCHORS_SUMMARIES`` only: ``make book`` sets it
to ``results/summaries`` in a checkout, so the summaries a build computed are committed with the results they come
from and a build from a clean clone reads them. Without it (a test, a reader's notebook) a recomputed summary is kept
in memory for the process.

**Format.** One JSON file per summary, no pickles: numbers, strings, lists, dicts, numpy arrays and scalars (dtype
and exact bytes) and a few dataclasses of this package (:data:`DATACLASSES`) are encoded; anything else is refused
when computed, naming it.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import hashlib
import importlib
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..core import runs as _runs

__all__ = ["summary", "summarised", "content_hash", "SUMMARIES_ENV", "summary_dirs", "encode", "decode", "DATACLASSES",
           "last_status", "is_current", "Dependencies"]

T = TypeVar("T")
SUMMARIES_ENV = "ANCHORS_SUMMARIES"
FORMAT = 1
_PACKAGE = Path(__file__).resolve().parents[1]  # helpers/
_RUNS_FILE = str(Path(_runs.__file__).resolve())

# Dataclasses a summary may hold, by qualified name (decoding imports nothing else).
DATACLASSES = ("helpers.core.stats.Estimate", "helpers.core.findings.Measured", "helpers.core.prompts.Prompt")

_MEMORY: dict[str, tuple[dict, Any]] = {}  # name -> (record without value, value), this process
_STATUS: dict[str, str] = {}  # name -> "read" | "computed", this process


# --------------------------------------------------------------------------------------------------------------------
# Encoding: exact, no pickles
# --------------------------------------------------------------------------------------------------------------------

def encode(value, where: str = "summary"):
    """``value`` as plain JSON, exactly: numpy arrays and scalars keep their dtype and bytes, tuples stay tuples,
    floats that JSON cannot hold (NaN, infinities) are tagged. ``TypeError`` naming ``where`` for anything else."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int) and not isinstance(value, np.integer):
        return value
    if isinstance(value, float) and not isinstance(value, np.floating):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufcU":
            raise TypeError(f"{where} is an array of {value.dtype}: a summary holds numeric or string arrays only")
        a = np.ascontiguousarray(value)
        return {"__array__": a.dtype.str, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}
    if isinstance(value, np.generic):
        return {"__scalar__": value.dtype.str, "data": base64.b64encode(np.asarray(value).tobytes()).decode()}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value) and not any(k.startswith("__") for k in value):
            return {k: encode(v, f"{where}.{k}") for k, v in value.items()}
        return {"__items__": [[encode(k, f"{where} key"), encode(v, f"{where}[{k!r}]")] for k, v in value.items()]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = f"{type(value).__module__}.{type(value).__qualname__}"
        if name not in DATACLASSES:
            raise TypeError(f"{where} is a {name}, which a summary cannot hold (allowed dataclasses: "
                            f"{', '.join(DATACLASSES)})")
        return {"__dataclass__": name, "fields": {f.name: encode(getattr(value, f.name), f"{where}.{f.name}")
                                                  for f in dataclasses.fields(value)}}
    raise TypeError(f"{where} is a {type(value).__name__}, which a summary cannot hold: return numbers, strings, "
                    "lists, dicts, numpy arrays or an Estimate / Measured")


def decode(obj):
    """The inverse of :func:`encode`."""
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__array__" in obj:
        raw = base64.b64decode(obj["data"])
        return np.frombuffer(raw, dtype=np.dtype(obj["__array__"])).reshape(obj["shape"]).copy()
    if "__scalar__" in obj:
        return np.frombuffer(base64.b64decode(obj["data"]), dtype=np.dtype(obj["__scalar__"]))[0]
    if "__tuple__" in obj:
        return tuple(decode(v) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_hashable(decode(k)): decode(v) for k, v in obj["__items__"]}
    if "__dataclass__" in obj:
        name = obj["__dataclass__"]
        if name not in DATACLASSES:
            raise ValueError(f"a summary holds a {name}, which is not an allowed dataclass")
        module, cls = name.rsplit(".", 1)
        return getattr(importlib.import_module(module), cls)(**{k: decode(v) for k, v in obj["fields"].items()})
    return {k: decode(v) for k, v in obj.items()}


def _hashable(key):
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def content_hash(obj) -> str:
    """A sha256 of ``obj``'s content (arrays by dtype, shape and bytes; dicts, lists, tuples, numbers, strings,
    dataclasses recursively): what a summary computed from arrays in hand is keyed on."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, np.ndarray):
            a = np.ascontiguousarray(x)
            h.update(f"A{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes() if a.dtype.kind != "O" else repr(a.tolist()).encode())
        elif isinstance(x, Mapping):
            h.update(b"D")
            for k in sorted(x, key=repr):
                walk(k)
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            h.update(type(x).__qualname__.encode())
            for f in dataclasses.fields(x):
                walk(getattr(x, f.name))
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    walk(obj)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------------
# What a summary depends on
# --------------------------------------------------------------------------------------------------------------------

class Dependencies:
    """Records, while a summary is computed, the package's source files that run and the results asked of the cache.

    A trace function (``sys.settrace``) sees every Python call: it notes the file of each call into this package,
    and the return value of :func:`helpers.core.runs._relative_path` (a result's path, with its key fields) and the
    path :func:`helpers.core.runs.bench_file` resolves. A trace function set before (a coverage tool, a debugger) is
    called too, and restored afterwards."""

    def __init__(self):
        self.files: set[str] = set()
        self.results: dict[str, dict] = {}  # relative path -> the model identity asked for
        self.benches: set[str] = set()
        self._previous = None

    def _global(self, frame, event, arg):
        local = self._previous(frame, event, arg) if self._previous is not None else None
        code = frame.f_code
        filename = code.co_filename
        if filename.startswith(_PACKAGE_STR):
            self.files.add(filename)
            if filename == _RUNS_FILE and code.co_name in ("_relative_path", "bench_file"):
                return self._returns(local)
        return local

    def _returns(self, inner):
        def trace(frame, event, arg):
            if event == "return" and arg is not None:
                if frame.f_code.co_name == "_relative_path":
                    fields = frame.f_locals.get("fields") or {}
                    self.results[str(arg)] = dict(fields.get("model") or {})
                elif frame.f_code.co_name == "bench_file" and not frame.f_locals.get("write"):
                    rel = frame.f_locals.get("rel")
                    if rel is not None:
                        self.benches.add(str(rel))
            return inner(frame, event, arg) if inner is not None else trace
        return trace

    def __enter__(self):
        self._previous = sys.gettrace()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc):
        sys.settrace(self._previous)
        return False


_PACKAGE_STR = str(_PACKAGE) + os.sep
_CODE_HASHES: dict[tuple, str] = {}


def _code_hash(path: Path) -> str:
    """A file's code without docstrings and comments (its AST), hashed; ``"absent"`` for a removed file."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "absent"
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _CODE_HASHES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        _CODE_HASHES[memo] = hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]
    return _CODE_HASHES[memo]


_FILE_HASHES: dict[tuple, str] = {}


def _file_hash(path: Path) -> str:
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_HASHES:
        _FILE_HASHES[memo] = _runs.file_sha256(path)[:16]
    return _FILE_HASHES[memo]


def _answer(rel: str) -> str:
    """The sha256 of the file that answers a request for ``rel`` now (the first found), or ``"absent"``."""
    for d in _runs.search_dirs():
        p = d / rel
        if p.is_file():
            meta = p.with_suffix(".json")
            return _file_hash(p) + (("+" + _file_hash(meta)) if p.suffix == ".npz" and meta.is_file() else "")
    return "absent"


_IDENTITIES: dict[str, dict] = {}


def _identity(name: str) -> dict:
    if name not in _IDENTITIES:
        from ..core.models import model_identity

        try:
            _IDENTITIES[name] = dict(model_identity(name))
        except Exception as err:  # noqa: BLE001 - an identity that cannot be known now never matches
            _IDENTITIES[name] = {"error": f"{type(err).__name__}: {err}"}
    return _IDENTITIES[name]


_CONTEXT: dict | None = None


def _context() -> dict:
    """What every summary depends on: the results' version, transformers' major.minor, the tasks' base data."""
    global _CONTEXT
    if _CONTEXT is None:
        from ..core.tasks import TASKS, load_task

        data = {}
        for task in TASKS:
            try:
                data[task] = load_task(task).fingerprint
            except Exception as err:  # noqa: BLE001 - no data: summaries that need it are recomputed (and fail)
                data[task] = f"unavailable ({type(err).__name__})"
        _CONTEXT = {"results": _runs.RESULTS_VERSION, "transformers": _runs.transformers_version(), "data": data}
    return _CONTEXT


def _record(name: str, deps: Dependencies, depends: dict) -> dict:
    files = sorted(Path(f) for f in deps.files if Path(f).is_file())
    return {
        "format": FORMAT,
        "name": name,
        "context": _context(),
        "depends": depends,
        "code": {str(p.relative_to(_PACKAGE.parent)): _code_hash(p) for p in files},
        "results": {rel: {"sha256": _answer(rel), "model": model} for rel, model in sorted(deps.results.items())},
        "benchmarks": {rel: _answer(rel) for rel in sorted(deps.benches)},
    }


def _why_stale(record: dict, depends: dict) -> str:
    """``""`` if ``record`` is current; else the first thing that changed."""
    if record.get("format") != FORMAT:
        return "another format"
    if record.get("depends") != depends:
        return "other inputs"
    if record.get("context") != _context():
        return "another results version, transformers version or data"
    for rel, h in record.get("code", {}).items():
        if _code_hash(_PACKAGE.parent / rel) != h:
            return f"{rel} changed"
    for rel, info in record.get("results", {}).items():
        model = info.get("model") or {}
        if model.get("name") and model.get("kind") in ("offline", "folder") and _identity(model["name"]) != model:
            return f"the model {model['name']} changed"
        if _answer(rel) != info.get("sha256"):
            return f"the result {rel} changed"
    for rel, h in record.get("benchmarks", {}).items():
        if _answer(rel) != h:
            return f"the benchmark {rel} changed"
    return ""


def is_current(record: dict, depends: dict | None = None) -> str:
    """``""`` if a stored summary's record is current (see the module docstring), else why not."""
    return _why_stale(record, _normal(depends if depends is not None else record.get("depends", {})))


# --------------------------------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------------------------------

def summary_dirs() -> list[Path]:
    """Where summaries are read, in order: ``$ANCHORS_SUMMARIES`` (if set), then the committed ones."""
    dirs = []
    env = _runs.resolve_env_folder(SUMMARIES_ENV, _runs.REPO_ROOT if (_runs.REPO_ROOT / "pyproject.toml").is_file()
                                   else None)
    if env is not None:
        dirs.append(env)
    committed = _runs.committed_results_dir()
    if committed is not None and (committed / "summaries").resolve() not in [d.resolve() for d in dirs]:
        dirs.append(committed / "summaries")
    return dirs


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+=-]*(_[A-Za-z0-9.+=-]+)*(/[A-Za-z0-9][A-Za-z0-9.+=-]*(_[A-Za-z0-9.+=-]+)*)*")


def _path(folder: Path, name: str) -> Path:
    """One flat folder (an installed package ships it as one package-data folder): ``a/b/c`` is ``a__b__c.json``."""
    return folder / f"{name.replace('/', '__')}.json"


def _normal(depends) -> dict:
    return json.loads(json.dumps(encode(dict(depends or {}), "depends"), sort_keys=True))


def last_status() -> dict[str, str]:
    """``{summary name: "read" | "computed"}`` for the summaries this process asked for."""
    return dict(_STATUS)


USED_LOG = ".used"  # in $ANCHORS_SUMMARIES: the names of the summaries a build asked for (see prune)


def _note_use(name: str, computed: bool = False) -> None:
    target = os.environ.get(SUMMARIES_ENV, "").strip()
    if target:
        folder = summary_dirs()[0]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / USED_LOG, "a", encoding="utf-8") as f:
                f.write(("! " if computed else "") + name + "\n")
        except OSError:
            pass


def prune(folder: str | os.PathLike) -> tuple[list[Path], set[str], set[str]]:
    """Remove the summaries in ``folder`` that the last build did not ask for (not named in its ``.used`` log), and
    the log: what ``make book`` runs after a complete build, so the committed summaries are exactly what the book
    reads. Nothing is removed without a log. Returns what was removed, the names used and those computed."""
    folder = Path(folder)
    log = folder / USED_LOG
    if not log.is_file():
        return [], set(), set()
    lines = [line.strip() for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    computed = {line[2:] for line in lines if line.startswith("! ")}
    used = {line.removeprefix("! ") for line in lines}
    removed = []
    keep = {_path(folder, name).name for name in used}
    for p in sorted(folder.glob("*.json")):
        if p.name not in keep:
            p.unlink()
            removed.append(p)
    log.unlink()
    return removed, used, computed


def summary(name: str, compute: Callable[[], T], depends: Mapping | None = None) -> T:
    """``compute()``, or its stored value while everything it was computed from is unchanged (module docstring).

    ``name`` identifies the summary and names its file in a summaries folder (``verdicts/flow-shallow/
    gemma-3-270m/book`` is ``verdicts__flow-shallow__gemma-3-270m__book.json``: letters, digits and ``. _ + = -``,
    ``/`` between parts); ``depends`` adds what the
    computation reads besides the results cache and the package's code (JSON values, or :func:`content_hash` of
    arrays passed in)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"a summary name must be parts of letters, digits and '._+=-' joined by '/', not {name!r}")
    depends = _normal(depends)
    _note_use(name)
    if name in _MEMORY and not _why_stale(_MEMORY[name][0], depends):
        _STATUS[name] = "read"
        return _MEMORY[name][1]
    for folder in summary_dirs():
        path = _path(folder, name)
        if not path.is_file():
            continue
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            warnings.warn(f"cannot read the summary {path} ({type(err).__name__}: {err}); recomputing it",
                          stacklevel=2)
            continue
        if not _why_stale(stored, depends):
            value = decode(stored["value"])
            stored.pop("value")
            _MEMORY[name] = (stored, value)
            _STATUS[name] = "read"
            return value
    start = time.perf_counter()
    with Dependencies() as deps:
        value = compute()
    record = _record(name, deps, depends)
    encoded = encode(value, f"the summary {name!r}")
    _MEMORY[name] = (record, decode(encoded))  # the same value a later read would return
    _STATUS[name] = "computed"
    _note_use(name, computed=True)
    target = os.environ.get(SUMMARIES_ENV, "").strip()
    if target:
        _write(_path(summary_dirs()[0], name), {**record, "seconds": round(time.perf_counter() - start, 2),
                                                 "value": encoded})
    return _MEMORY[name][1]


def _write(path: Path, record: dict) -> None:
    text = json.dumps(record, indent=1) + "\n"  # key order kept: a dict's order is part of its value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(_runs.TEMP_PREFIX + path.name)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"cannot store the summary {path} ({type(err).__name__}: {err}); it is recomputed next time "
                      f"(set {SUMMARIES_ENV} to a writable folder)", stacklevel=3)


def summarised(prefix: str):
    """Decorator: the function's value as a summary named ``<prefix>/<content hash of its arguments>``, so a
    page function of results in hand (runs, estimates) is computed once per content of those results. Its value
    must be encodable (:func:`encode`)."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            return summary(f"{prefix}/{content_hash((args, kwargs))}", lambda: fn(*args, **kwargs))

        return inner

    return wrap


def main(argv=None) -> int:
    """``python -m helpers.pages.summaries --prune FOLDER``: :func:`prune` (after a complete build)."""
    import argparse

    p = argparse.ArgumentParser(description="Stored page summaries.")
    p.add_argument("--prune", type=Path, required=True, help="remove the summaries the last build did not use")
    args = p.parse_args(argv)
    removed, used, computed = prune(args.prune)
    print(f"page summaries: {len(used) - len(computed)} read, {len(computed)} computed, {len(removed)} unused removed "
          f"({args.prune})")
    for name in sorted(computed):
        print(f"  computed: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
