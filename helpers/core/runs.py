"""Running an experiment for (model, data, settings) with its results cached on disk.

**The key.** A run is identified by a hash of everything that changes its numbers (:func:`key_fields`):

* the experiment's name and its settings (profile sizes, seed, shots, ...);
* the model's identity (:func:`helpers.core.models.model_identity`: the PyPI package versions of an offline model, a
  content hash of a local folder, the resolved commit of a hub id), its dtype and its device type (cpu, cuda, mps);
* the data: a content hash of the task's examples (:attr:`helpers.core.tasks.TaskData.fingerprint`);
* this package's ``RESULTS_VERSION`` (bumped whenever a computation changes) and transformers' major.minor
  version. Not the patch version: patch releases fix bugs without changing these models' numerics, and keying on
  them would make the committed results stale at every patch upgrade. The package pins transformers' minor series
  (``pyproject.toml``), so a Colab reader gets the version the committed results were made with, and the slow test
  ``tests/test_results.py`` recomputes a slice of every committed result to catch any drift.

**Where results live.** Reading order: the user cache (``$ANCHORS_RESULTS``, default ``~/.cache/anchors/results``),
then the committed results, read-only (``results/`` in a source checkout; the same files shipped inside the package
as ``helpers/_results`` in a non-editable install). New results are written to the user cache only, never into
site-packages. To refresh the committed results, point ``ANCHORS_RESULTS`` at them on purpose
(``python -m helpers.cli.compute <chapter> --into-committed`` does that).

**Where a relative folder points.** A relative ``ANCHORS_RESULTS`` is resolved once per process, at its first use
(:func:`helpers.core.models.resolve_env_folder`; ``ANCHORS_CACHE`` follows the same rule): against the repository
root in a source checkout (``ANCHORS_RESULTS=results`` is the repository's ``results/`` whether a chapter runs from
the root or from ``book/``), else against the working directory; the absolute path is written back to the
environment, so kernels and subprocesses started later agree.

**Safety.** Results are a flat dict of numeric numpy arrays saved as ``.npz`` (no pickles: an object array is
refused when computed) next to a ``.json`` with the key's fields, the ``.npz``'s sha256 and its fields' dtypes and
shapes. Both are written atomically (a temporary ``.tmp-anchors-*`` file, then ``os.replace``); the temporaries of
killed runs are removed after :data:`STALE_TEMP_SECONDS` from the experiment's own sub-folder, and no other file is
ever removed, whatever its name (a results folder may be a folder the user keeps other files in). Before computing,
the target folder is probed with a real write (:func:`check_results_folder`: a read-only file system, a full disk or
a path that is a file is a :class:`ResultsFolderError` naming the folder, before any work); a write that fails after
computing keeps the result: it is returned, and saved in :func:`fallback_dir` with a warning naming it.

A result with a NaN or an infinity is refused (:class:`NonFiniteResultError`, nothing cached) unless the experiment
names the fields where NaN is legitimate (``allow_nan``). A cached file is checked before it is returned
(:func:`read_result`): its ``.json`` must describe the run asked for (every key field), and the file must be
readable, finite and, where the ``.json`` records them, have its sha256 and its fields' shapes. In the user cache a
file that fails is reported (a warning with its path) and recomputed; in the committed results a mismatch is a
:class:`MismatchedResultError`. Settings are normalised (:func:`normalise_settings`: numpy scalars are Python numbers,
a float where a count is meant, a set or an object is refused naming the setting). Names that become paths
(experiments, tasks, benchmark folders) are checked (:func:`helpers.core.tasks.check_path_name`). With
``ANCHORS_REQUIRE_CACHED=1`` a missing result is an error instead of a computation (a book build that must only
read).

Profiles size the runs:

* ``quick`` - a few examples, one seed: the whole book in minutes (CI);
* ``book`` - the published results on this 2-core CPU: a few hundred test prompts per task over 3 seeds;
* ``paper`` - the paper's settings (up to 1000 test examples, 5 seeds): for a GPU.
"""

from __future__ import annotations

import errno
import importlib.metadata
import hashlib
import json
import math
import os
import shutil
import re
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .models import resolve_env_folder
from .prompts import Prompt, build_prompt
from .tasks import (TaskData, check_path_name, sample_demonstrations_per_example, sample_fixed_demonstrations,
                    subsample_test)

__all__ = ["ModelKey", "Profile", "PROFILES", "RESULTS_VERSION", "RESULTS_ENV", "results_dir", "committed_results_dir",
           "search_dirs", "key_fields", "run_key", "result_path", "find_result", "load_result", "cached_run",
           "make_prompts", "settings_of", "NonFiniteResultError", "UnreadableResultError", "MissingResultError",
           "check_finite", "clean_stale_temporaries", "transformers_version", "write_json", "bench_file",
           "MismatchedResultError", "ResultsFolderError", "UnsavedResultWarning", "KEY_FIELDS", "TEMP_PREFIX",
           "normalise_settings", "read_result", "file_sha256", "check_arrays", "check_results_folder", "fallback_dir",
           "resolve_env_folder", "bench_covers", "CachedResult", "MissingFieldError"]

RESULTS_VERSION = "1"
RESULTS_ENV = "ANCHORS_RESULTS"
REQUIRE_CACHED_ENV = "ANCHORS_REQUIRE_CACHED"
STALE_TEMP_SECONDS = 15 * 60  # a temporary file older than this belongs to a killed run
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Profile:
    name: str
    n_test: int  # test examples per (task, seed)
    seeds: tuple[int, ...]
    batch_size: int = 8
    n_test_extraction: int = 0  # extraction needs one forward pass per example: it can afford more (0 = n_test)
    n_test_isolation: int = 0  # isolation needs 11 forward passes per example: fewer on a CPU (0 = n_test)
    n_test_reweighting: int = 0  # re-weighting: six methods per example and training per seed (0 = n_test)
    n_test_diagnosis: int = 0  # diagnosis fits a PCA on the test queries: the paper's 500 (0 = n_test)
    n_test_compression: int = 0  # compression (Table 2): test examples per (task, seed) (0 = n_test)
    n_random_compression: int = 0  # Hidden_random-top: random draws per (task, seed) (0 = the paper's 20)
    n_test_compression_shots: int = 0  # compression's shots sweep: test examples per (task, seed) (0 = n_test)
    n_seeds_reweighting: int = 0  # re-weighting trains per seed: its first n seeds (0 = all)
    n_seeds_compression: int = 0  # compression's Table 2: its first n seeds (0 = all)

    def seeds_for(self, n: int) -> tuple[int, ...]:
        """The first ``n`` seeds of the profile (all of them for n = 0)."""
        return tuple(self.seeds[:n]) if n else tuple(self.seeds)


class _Profiles(dict):
    def __missing__(self, name):
        raise KeyError(f"Unknown profile {name!r}. Choose one of: {', '.join(self)}")


PROFILES: dict[str, Profile] = _Profiles({
    "quick": Profile("quick", n_test=8, seeds=(42,), n_test_diagnosis=32, n_random_compression=5),
    # The paper's five seeds. Saliency 48, isolation 64, extraction 128 examples per (task, seed): 2x, 4x and 4x the
    # sizes before shared-prefix execution (issue 12); the training and compression chapters keep 3 seeds.
    "book": Profile("book", n_test=48, seeds=(42, 43, 44, 45, 46), n_test_extraction=128, n_test_isolation=64,
                    n_test_reweighting=64, n_test_diagnosis=500,
                    n_test_compression=32, n_random_compression=10, n_test_compression_shots=16,
                    n_seeds_reweighting=3, n_seeds_compression=3),
    "paper": Profile("paper", n_test=1000, seeds=(42, 43, 44, 45, 46)),
})


class NonFiniteResultError(ValueError):
    """A computed result holds NaN or infinite values where the experiment does not allow them."""


class UnreadableResultError(OSError):
    """A cached result file exists but cannot be read."""


class MismatchedResultError(ValueError):
    """A cached result is not what its ``.json`` says (another checksum, other fields or shapes), or its ``.json``
    describes another run than the one asked for (another model, task, settings, ...)."""


class MissingResultError(LookupError):
    """``ANCHORS_REQUIRE_CACHED=1`` and a result is not in any results folder."""


class MissingFieldError(KeyError):
    """A cached result has no field of that name (written by another version of the experiment, or edited)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CachedResult(dict):
    """A result read from the cache: a plain dict of arrays that knows its file, so that asking for a field it does
    not hold is a :class:`MissingFieldError` naming the file, the field, the fields it has and the fix (not a bare
    ``KeyError`` far from the cache)."""

    def __init__(self, arrays: dict, path: Path):
        super().__init__(arrays)
        self.path = Path(path)

    def __missing__(self, name):
        raise MissingFieldError(
            f"the cached result {self.path} has no field {name!r} (it holds {sorted(self)}): it was written by "
            f"another version of the experiment, or edited. Delete {self.path.name} and its .json (the run is "
            "recomputed), or, in the committed results, restore them (git checkout results/)")


class ResultsFolderError(OSError):
    """The results folder cannot take a result (read-only, full, a file, no permission): raised *before* computing."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


class UnsavedResultWarning(UserWarning):
    """A computed result could not be written to the results folder: it was returned, and saved elsewhere if it
    could be (the warning names where)."""


# --------------------------------------------------------------------------------------------------------------------
# Where results live
# --------------------------------------------------------------------------------------------------------------------


def results_dir() -> Path:
    """The writable results folder: ``$ANCHORS_RESULTS``, or ``~/.cache/anchors/results``.

    A relative ``$ANCHORS_RESULTS`` is resolved once (:func:`helpers.core.models.resolve_env_folder`, the rule ``ANCHORS_CACHE`` follows too): against the repository root in a
    source checkout, else against the working directory.
    """
    checkout = REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() else None
    env = resolve_env_folder(RESULTS_ENV, checkout)
    return env if env is not None else Path.home() / ".cache" / "anchors" / "results"


def committed_results_dir() -> Path | None:
    """The committed (``book``-profile) results, read-only: ``helpers/_results`` when the package is installed
    (package data, see ``pyproject.toml``), ``results/`` at the repository root in a source checkout."""
    shipped = Path(__file__).resolve().parents[1] / "_results"
    if shipped.is_dir():
        return shipped
    checkout = REPO_ROOT / "results"
    if checkout.is_dir() and (REPO_ROOT / "pyproject.toml").is_file():
        return checkout
    return None


def search_dirs(directory: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for a cached result, in order: ``directory`` alone if given, else the user cache then the
    committed results."""
    if directory is not None:
        return [Path(directory)]
    dirs = [results_dir()]
    committed = committed_results_dir()
    if committed is not None and committed.resolve() != dirs[0].resolve():
        dirs.append(committed)
    return dirs



def bench_file(folder: str, model: str, write: bool = False) -> Path:
    """A benchmark's JSON for ``model`` in ``folder``: for reading, the first found in :func:`search_dirs` (the user
    cache, then the committed results); with ``write``, where a new run goes (:func:`results_dir`).

    A user-cache benchmark that covers less than the committed one (a run interrupted after one task, or run with
    smaller sizes) never shadows it: the committed one is read, with a warning saying why (:func:`bench_covers`).
    """
    rel = Path(check_path_name(folder, "a benchmark folder")) / f"{_safe_model_name(model)}.json"
    if write:
        return results_dir() / rel
    found = [d / rel for d in search_dirs() if (d / rel).is_file()]
    if len(found) < 2:
        return found[0] if found else results_dir() / rel
    user, committed = found[0], found[-1]
    try:
        mine = json.loads(user.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        warnings.warn(f"cannot read the benchmark {user} ({type(err).__name__}: {err}); reading the committed "
                      f"{committed} instead", stacklevel=2)
        return committed
    try:
        theirs = json.loads(committed.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return user
    missing = bench_covers(mine, theirs)
    if missing:
        warnings.warn(f"the benchmark {user} covers less than the committed {committed} ({missing}); reading the "
                      "committed one. Re-run the benchmark in full (or delete that file) to use your own",
                      stacklevel=2)
        return committed
    return user


_BENCH_SIZES = ("n", "reps", "n_prompts")


def _bench_rows(obj, path=()) -> dict[tuple, dict]:
    """Every dict under a benchmark's ``tasks`` and ``sweep`` (its rows), with the sizes it records."""
    out: dict[tuple, dict] = {}
    if not isinstance(obj, dict):
        return out
    if path:
        out[path] = {k: obj[k] for k in _BENCH_SIZES if isinstance(obj.get(k), (int, float))}
    for k, v in obj.items():
        if isinstance(v, dict) and (path or k in ("tasks", "sweep")):
            out.update(_bench_rows(v, path + (str(k),)))
    return out


def bench_covers(mine: dict, reference: dict) -> str:
    """``""`` if the benchmark ``mine`` covers ``reference`` (every task, batch size and sweep point it has, each
    with at least its sizes ``n``, ``reps``, ``n_prompts``); else what is missing or smaller."""
    have, need = _bench_rows(mine), _bench_rows(reference)
    absent = sorted("/".join(p) for p in need if p not in have)
    if absent:
        return f"no {', '.join(absent[:4])}{' ...' if len(absent) > 4 else ''}"
    smaller = [f"{'/'.join(p)} {k} {have[p].get(k)} < {v}" for p, sizes in need.items() for k, v in sizes.items()
               if not have[p].get(k, 0) >= v]
    return ("smaller sizes: " + ", ".join(smaller[:4]) + (" ..." if len(smaller) > 4 else "")) if smaller else ""


def _site_packages() -> list[Path]:
    paths = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    try:
        import site

        paths.update(site.getsitepackages())
    except AttributeError:  # some virtualenv builds
        pass
    return [Path(p).resolve() for p in paths]


def _check_writable(directory: Path) -> None:
    d = directory.resolve()
    for sp in _site_packages():
        if d == sp or sp in d.parents:
            raise PermissionError(
                f"refusing to write results into the installed package ({d}); set {RESULTS_ENV} to a writable folder"
            )


# --------------------------------------------------------------------------------------------------------------------
# The key
# --------------------------------------------------------------------------------------------------------------------


def transformers_version() -> str:
    """transformers' major.minor version (see the module docstring for why not the patch)."""
    return ".".join(importlib.metadata.version("transformers").split(".")[:2])  # without importing transformers


def _versions() -> dict:
    return {"results": RESULTS_VERSION, "transformers": transformers_version()}


@dataclass(frozen=True)
class ModelKey:
    """What the cache key reads from a loaded model, without its weights: for looking results up (the verdict page,
    the committed-results check). ``ModelKey.of("gemma-3-270m")`` stands for the model as the chapters load it
    (float32 on the CPU)."""

    name: str
    identity: dict
    dtype: object  # torch.dtype
    device: object  # torch.device

    @classmethod
    def of(cls, name: str, dtype: str = "float32", device: str = "cpu") -> "ModelKey":
        import torch

        from .models import model_identity

        return cls(name, model_identity(name), getattr(torch, dtype), torch.device(device))


# Settings that count something (a seed, a size, a number of shots, ...): an int, never a float such as 42.0, which
# would give another key than 42 for the same run.
_INT_SETTING = re.compile(r"seeds?|n|k|ks|shots|epochs|pool|m_max|n_.+|.+_per_class|.+_ks|.+_seeds?|.+_shots")


def _json_setting(value, where: str, name: str):
    """One settings value as plain JSON (numpy scalars become Python numbers); ``TypeError`` naming ``where`` if it is
    not a JSON value."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"setting {where!r} is {v}: a setting must be a finite number")
        if _INT_SETTING.fullmatch(name):
            raise TypeError(f"setting {where!r} is the float {value!r}; it counts something: pass an int "
                            f"({int(v)!r} if that is what is meant)")
        return v
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_json_setting(v, f"{where}[{i}]", name) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"setting {where!r} has the key {k!r}: keys must be strings")
            out[k] = _json_setting(v, f"{where}.{k}", k)
        return out
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    raise TypeError(
        f"setting {where!r} is of type {type(value).__name__} ({text}), not a JSON "
        "value (a number, a string, a bool, None, or a list or dict of them): its text would not identify the run "
        "(a set has no fixed order, an object no stable text). Pass a sorted list, or the numbers that define it."
    )


def normalise_settings(settings) -> dict:
    """The settings as they enter the key: plain JSON, numpy scalars as Python numbers (``np.int64(42)`` and ``42``
    are one key), tuples as lists. A float where a count is meant (``seed=42.0``), a NaN, a set or any object is
    refused, naming the setting."""
    if not isinstance(settings, dict):
        raise TypeError(f"settings must be a dict, not {type(settings).__name__}")
    out = {}
    for name, value in settings.items():
        if not isinstance(name, str):
            raise TypeError(f"settings keys must be strings, got {name!r}")
        out[name] = _json_setting(value, name, name)
    return out


def key_fields(experiment: str, lm, data: TaskData, settings: dict) -> dict:
    """Everything that identifies a run's numbers (the key is a hash of this; it is also saved beside the result)."""
    identity = dict(getattr(lm, "identity", None) or {})
    if not identity:
        raise ValueError(f"{lm!r} has no identity: load models with helpers.load_model")
    return {
        "experiment": check_path_name(experiment, "an experiment name"),
        "model": identity,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": lm.device.type,
        "task": check_path_name(data.task.name, "a task name"),
        "data": data.fingerprint,
        "settings": normalise_settings(settings),
        "versions": _versions(),
    }


KEY_FIELDS = ("experiment", "model", "dtype", "device", "task", "data", "settings", "versions")


def _hash_fields(fields: dict) -> str:
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_key(experiment: str, lm, data: TaskData, settings: dict) -> str:
    """A short hash of :func:`key_fields`."""
    return _hash_fields(key_fields(experiment, lm, data, settings))


def _safe_model_name(name) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", str(name)).strip("-") or "model"


def _file_name(fields: dict, key: str) -> str:
    model = _safe_model_name(fields["model"].get("name", "model"))
    return f"{model}__{check_path_name(fields['task'], 'a task name')}__{key}.npz"


def _relative_path(fields: dict) -> Path:
    return Path(check_path_name(fields["experiment"], "an experiment name")) / _file_name(fields, _hash_fields(fields))


def result_path(experiment: str, lm, data: TaskData, settings: dict, directory: Path | None = None) -> Path:
    """Where the ``.npz`` of a run is written (the user cache, or ``directory``), whether or not it exists."""
    directory = Path(directory) if directory is not None else results_dir()
    return directory / _relative_path(key_fields(experiment, lm, data, settings))


# --------------------------------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------------------------------


def check_finite(result: dict[str, np.ndarray], allow_nan: Collection[str] = (), what: str = "result") -> None:
    """Raise :class:`NonFiniteResultError` if a float array holds NaN (outside ``allow_nan``) or an infinity."""
    bad = []
    for name, value in result.items():
        a = np.asarray(value)
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.complexfloating)):
            continue
        n_nan = int(np.isnan(a).sum())
        n_inf = int(np.isinf(a).sum())
        if n_inf or (n_nan and name not in allow_nan):
            bad.append(f"{name}: {n_nan} NaN and {n_inf} inf of {a.size}")
    if bad:
        raise NonFiniteResultError(
            f"the {what} has non-finite values ({'; '.join(bad)}). Nothing was cached. A float16 model often "
            "overflows: load it with dtype=torch.bfloat16 or torch.float32."
        )


def check_arrays(result, what: str = "result") -> dict[str, np.ndarray]:
    """``result`` as a flat dict of numeric (or string) numpy arrays; ``TypeError`` naming the field otherwise.

    An object array would be pickled into the ``.npz``, which this cache refuses to read back (so the run would be
    recomputed every time): it is refused when computed instead.
    """
    if not isinstance(result, dict):
        raise TypeError(f"the {what} must be a dict of numpy arrays, not {type(result).__name__}")
    out = {}
    for name, value in result.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"the {what} has the field name {name!r}: field names must be non-empty strings")
        a = np.asarray(value)
        if a.dtype.kind not in "biufcUS":
            raise TypeError(
                f"the {what} field {name!r} is an array of {a.dtype} ({type(value).__name__}): results must be "
                "numeric (or string) arrays, e.g. np.asarray(values, dtype=float); nothing was cached"
            )
        out[name] = a
    return out


def load_result(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a cached ``.npz``; :class:`UnreadableResultError` (naming the file) if it is damaged."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # numpy would try it as a pickle and suggest allow_pickle
                raise ValueError("not an .npz archive (damaged, or not written by this package)")
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as err:  # a truncated zip, a bad CRC, a file that is not an npz at all, ...
        raise UnreadableResultError(f"cannot read the cached result {path}: {type(err).__name__}: {err}") from None


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _canonical(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _short(value, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _array_facts(result: dict[str, np.ndarray]) -> dict:
    return {k: {"dtype": str(np.asarray(v).dtype), "shape": list(np.shape(v))} for k, v in result.items()}


def read_result(path: str | os.PathLike, fields: dict | None = None,
                allow_nan: Collection[str] = (), expect: Collection[str] = ()) -> dict[str, np.ndarray]:
    """Read a cached ``.npz`` and check it against its ``.json`` and against the run asked for.

    * the ``.json`` beside it must exist and be readable;
    * its key fields (experiment, model identity, dtype, device, task, data, settings, versions) and its key must be
      those of ``fields`` (the request), when given: a file copied or renamed from another run is not returned;
    * the ``.npz`` must be readable and finite (outside ``allow_nan``);
    * when the ``.json`` holds them (every result written since they were added): the file's sha256, and its fields'
      names, dtypes and shapes;
    * it must hold every field named in ``expect`` (what the experiment reads from it).

    Returns a :class:`CachedResult` (a dict whose missing field is an error naming the file).

    Raises :class:`MismatchedResultError`, :class:`UnreadableResultError` or :class:`NonFiniteResultError`, each
    naming the file.
    """
    path = Path(path)
    meta = path.with_suffix(".json")
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MismatchedResultError(
            f"the cached result {path} has no {meta.name} beside it (a write that failed half-way, or a file copied "
            "alone): nothing says which run it is") from None
    except (OSError, ValueError) as err:
        raise MismatchedResultError(f"cannot read {meta}, the record of the cached result {path}: "
                                    f"{type(err).__name__}: {err}") from None
    if not isinstance(info, dict):
        raise MismatchedResultError(f"{meta} is not a result's record (a JSON object)")
    if fields is not None:
        for k in KEY_FIELDS:
            if k not in info:
                raise MismatchedResultError(f"{meta} has no {k!r}: it is not the record of this run")
            if _canonical(info[k]) != _canonical(fields[k]):
                raise MismatchedResultError(
                    f"{meta} records {k} = {_short(info[k])}, but the run asked for has {k} = {_short(fields[k])}: "
                    f"{path.name} is another run's result (copied, renamed or edited)")
        key = _hash_fields(fields)
        if info.get("key") != key:
            raise MismatchedResultError(f"{meta} records the key {info.get('key')!r}, the run asked for is {key!r}")
    result = load_result(path)
    check_finite(result, allow_nan, what=f"cached result {path}")
    if "sha256" in info:
        digest = file_sha256(path)
        if digest != info["sha256"]:
            raise MismatchedResultError(
                f"the cached result {path} changed since it was written (its sha256 is {digest[:16]}..., its "
                f"{meta.name} records {str(info['sha256'])[:16]}...)")
    if "arrays" in info:
        facts = _array_facts(result)
        if facts != info["arrays"]:
            diff = sorted(set(facts) ^ set(info["arrays"])) or sorted(
                k for k in facts if facts[k] != info["arrays"].get(k))
            raise MismatchedResultError(
                f"the cached result {path} does not hold what its {meta.name} records (fields {diff}: "
                f"{_short({k: facts.get(k) for k in diff})} in the file, "
                f"{_short({k: info['arrays'].get(k) for k in diff})} recorded)")
    absent = sorted(set(expect) - set(result))
    if absent:
        raise MismatchedResultError(
            f"the cached result {path} has no field{'s' if len(absent) > 1 else ''} {absent}, which the experiment "
            f"needs (it holds {sorted(result)}): it was written by another version of the experiment, or edited")
    return CachedResult(result, path)


def _read_checked(path: Path, fields: dict, allow_nan: Collection[str], committed: bool,
                  expect: Collection[str] = ()):
    """A cached result that passes :func:`read_result`, or ``None`` (with a warning naming the file) so that the
    caller recomputes it. In the committed results a mismatch is an error: they are never silently replaced."""
    try:
        return read_result(path, fields, allow_nan, expect)
    except MismatchedResultError as err:
        if committed:
            raise MismatchedResultError(
                f"{err}. This is in the committed results, which must not be edited: restore them (git checkout "
                "results/, or reinstall the package), or recompute this run on purpose with --into-committed"
            ) from None
        warnings.warn(f"{err} -- ignoring it and recomputing", stacklevel=3)
    except (UnreadableResultError, NonFiniteResultError) as err:
        warnings.warn(f"{err} -- ignoring it and recomputing", stacklevel=3)
    return None


def find_result(experiment: str, lm, data: TaskData, settings: dict, directory: Path | None = None) -> Path | None:
    """The first existing ``.npz`` of this run in :func:`search_dirs`, or ``None`` (it is not read nor checked:
    :func:`read_result` does that)."""
    rel = _relative_path(key_fields(experiment, lm, data, settings))
    for d in search_dirs(directory):
        if (d / rel).is_file():
            return d / rel
    return None


# Every temporary file this package makes starts with this; the stale-temporary sweep removes nothing else.
TEMP_PREFIX = ".tmp-anchors-"
_CLEANED: set[Path] = set()


def clean_stale_temporaries(directory: Path, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove this package's temporary files (``.tmp-anchors-*``) older than ``max_age`` seconds, left by killed
    runs, directly in ``directory`` (an experiment's results sub-folder; not its sub-folders). Any other file is left
    alone, whatever its name or age (a results folder may be a folder the user also keeps files in). Returns what
    was removed."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    now = time.time()
    for p in directory.glob(TEMP_PREFIX + "*"):
        try:
            if p.is_file() and not p.is_symlink() and now - p.stat().st_mtime > max_age:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:  # removed by someone else meanwhile
            pass
    return removed


def _clean_once(directory: Path) -> None:
    directory = Path(directory)
    if directory not in _CLEANED:
        clean_stale_temporaries(directory)
        _CLEANED.add(directory)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``path``, atomically (a benchmark's result; a killed run leaves no half
    file). In a results sub-folder, stale temporaries of killed runs are removed first."""
    path = Path(path)
    text = json.dumps(obj, indent=1) + "\n"  # a value that is not JSON fails here, before anything is written
    if path.parent.parent == results_dir():
        _clean_once(path.parent)
    _atomic_write(path, lambda p: p.write_text(text))


def _torch_threads() -> int | None:
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        return None


def save_result(path: Path, result: dict[str, np.ndarray], info: dict) -> None:
    """Write ``path`` (.npz) and its ``.json`` atomically; the ``.json`` also records the ``.npz``'s sha256 and its
    fields' dtypes and shapes. If the ``.json`` cannot be written, the new ``.npz`` is removed (never one without the
    other)."""
    digest = {}

    def write_npz(p: Path) -> None:
        np.savez_compressed(p, **result)
        digest["sha256"] = file_sha256(p)

    _atomic_write(path, write_npz)
    info = {**info, "sha256": digest["sha256"], "arrays": _array_facts(result)}
    text = json.dumps(info, indent=1, sort_keys=True, default=str) + "\n"
    try:
        _atomic_write(path.with_suffix(".json"), lambda p: p.write_text(text))
    except BaseException:
        path.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------------------------
# Before computing: can the results folder take the result? After: never lose it.
# --------------------------------------------------------------------------------------------------------------------

PROBE_BYTES = 64 * 1024  # the probe's write: a full disk fails it
MIN_FREE_BYTES = 1 << 20  # less free space than this is a full disk


def _why(err: OSError) -> str:
    reasons = {
        errno.EROFS: "it is on a read-only file system",
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.ENOTDIR: "a part of its path is a file, not a folder",
        errno.EEXIST: "it is a file, not a folder",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
    }
    reason = reasons.get(getattr(err, "errno", None))
    detail = f"{type(err).__name__}: {err}"
    return f"{reason} ({detail})" if reason else detail


def _folder_fix(directory) -> str:
    if directory is not None:
        return "Pass a writable folder with free space as directory=."
    now = os.environ.get(RESULTS_ENV)
    return (f"Set {RESULTS_ENV} to a writable folder with free space "
            f"(it is {'now ' + repr(now) if now else 'unset, so the default ~/.cache/anchors/results is used'}).")


def check_results_folder(folder: str | os.PathLike, fix: str = "") -> None:
    """Make sure ``folder`` can take a result, *before* anything is computed: create it, write and remove a small
    temporary file there (a real write, not ``os.access``: a read-only mount, a full disk, a path that is a file
    all fail it, and so does a root user's write to a read-only file system), and check the free space.
    :class:`ResultsFolderError` naming the folder, the cause and ``fix`` otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX + "probe-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * PROBE_BYTES)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.unlink(tmp)
        free = shutil.disk_usage(folder).free
    except OSError as err:
        raise ResultsFolderError(f"cannot write results to {folder}: {_why(err)}. Nothing was computed. {fix}".strip(),
                                 getattr(err, "errno", None)) from err
    if free < MIN_FREE_BYTES:
        raise ResultsFolderError(f"cannot write results to {folder}: the disk is full ({free} bytes free). Nothing "
                                 f"was computed. {fix}".strip(), errno.ENOSPC)


def fallback_dir() -> Path:
    """Where a result goes when its results folder refuses the write after it was computed:
    ``<temp dir>/anchors-unsaved-results`` (same layout as a results folder)."""
    return Path(tempfile.gettempdir()) / "anchors-unsaved-results"


def _save_or_keep(target: Path, rel: Path, result: dict[str, np.ndarray], info: dict) -> None:
    """Save a computed result; if that fails (e.g. the disk filled up during the run), save it in
    :func:`fallback_dir` and warn, naming both folders. Never raises for a failed write: the caller gets the result."""
    try:
        save_result(target, result, info)
        return
    except OSError as err:
        first = err
    alt = fallback_dir() / rel
    try:
        save_result(alt, result, info)
    except OSError as err:
        warnings.warn(
            f"the computed result could not be written to {target.parent} ({_why(first)}), nor to {alt.parent} "
            f"({_why(err)}): it is returned but NOT cached; free some space or set {RESULTS_ENV} to a writable "
            "folder before the next run", UnsavedResultWarning, stacklevel=3)
        return
    warnings.warn(
        f"the computed result could not be written to {target.parent} ({_why(first)}); it is returned, and saved in "
        f"{alt.parent} instead. To use it, move {alt.name} and {alt.with_suffix('.json').name} into {target.parent} "
        f"(or set {RESULTS_ENV}={fallback_dir()})", UnsavedResultWarning, stacklevel=3)


def cached_run(
    experiment: str,
    lm,
    data: TaskData,
    settings: dict,
    compute: Callable[[], dict[str, np.ndarray]] | None,
    directory: Path | None = None,
    recompute: bool = False,
    allow_nan: Collection[str] = (),
    lookup_only: bool = False,
    expect: Collection[str] = (),
) -> dict[str, np.ndarray] | None:
    """Return the cached result of a run, or ``compute()`` it and cache it.

    Lookup-only mode (``lookup_only=True`` or ``compute=None``): return the cached result, or ``None`` when there is
    none; never compute (the verdict page reads results this way, through the experiments' own run functions, with
    a :class:`ModelKey` in place of a loaded model).

    A cached file is checked before it is returned (:func:`read_result`): one that fails is reported and recomputed
    in the user cache, and is an error (:class:`MismatchedResultError`) in the committed results. Before computing,
    the folder the result will go to is probed with a real write (:func:`check_results_folder`); if the write fails
    anyway after computing, the result is still returned, and saved in :func:`fallback_dir` (a warning names it).

    Args:
        experiment: the experiment's name (the results sub-folder).
        lm: the :class:`~helpers.core.models.LoadedModel` (its identity, dtype and device enter the key).
        data: the :class:`~helpers.core.tasks.TaskData` (its fingerprint enters the key).
        settings: what else changes the numbers (JSON values; see :func:`normalise_settings`).
        compute: returns a flat dict of numeric numpy arrays.
        directory: read and write only there (default: :func:`search_dirs`, writing to :func:`results_dir`).
        recompute: ignore cached results.
        allow_nan: fields of the result where NaN is legitimate (e.g. an AUC undefined in some layer).
        lookup_only: never compute; ``None`` when nothing is cached.
        expect: fields the caller reads from the result: a cached result without one of them is refused when read
            (recomputed in the user cache, an error in the committed results), and a computed result without one
            is an error. Without ``expect``, a cached result is a :class:`CachedResult`: asking it for a field it
            does not hold is an error naming the file.
    """
    fields = key_fields(experiment, lm, data, settings)
    rel = _relative_path(fields)
    if not recompute:
        for i, d in enumerate(search_dirs(directory)):
            if (d / rel).is_file():
                # search_dirs: the user cache (or ``directory``) first, then, only by default, the committed results
                result = _read_checked(d / rel, fields, allow_nan, committed=directory is None and i > 0,
                                       expect=expect)
                if result is not None:
                    return result
    if lookup_only or compute is None:
        return None
    target = (Path(directory) if directory is not None else results_dir()) / rel
    if os.environ.get(REQUIRE_CACHED_ENV) == "1" and not recompute:
        raise MissingResultError(
            f"{REQUIRE_CACHED_ENV}=1 and no cached result for {experiment} / {fields['model'].get('name')} / "
            f"{fields['task']} with settings {settings} in {[str(d) for d in search_dirs(directory)]} "
            f"(expected {rel}). Compute what is missing with `python -m helpers.cli.compute all --model "
            f"{fields['model'].get('name')}` (resumable), or build with ANCHORS_RECOMPUTE=1 to let the chapters compute it"
        )
    _check_writable(target.parent)
    check_results_folder(target.parent, _folder_fix(directory))
    _clean_once(target.parent)
    wall, cpu = time.perf_counter(), time.process_time()
    what = f"{experiment} result for {fields['model'].get('name')} / {fields['task']}"
    result = check_arrays(compute(), what)
    absent = sorted(set(expect) - set(result))
    if absent:
        raise KeyError(f"the {what} has no field {absent} of those the caller expects ({sorted(expect)}); nothing "
                       "was cached")
    cost = {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2),
            "threads": _torch_threads()}  # what this run cost (not part of the key)
    check_finite(result, allow_nan, what=what)
    _save_or_keep(target, rel, result, {"format": 2, "key": rel.stem.rsplit("__", 1)[1],
                                        "allow_nan": sorted(allow_nan), **fields, "cost": cost})
    return result


def make_prompts(
    lm, data: TaskData, seed: int, n_test: int, shots_per_class: int = 1, per_example: bool = False
) -> list[Prompt]:
    """The paper's test subset for ``seed`` with its demonstrations, as prompts.

    ``per_example=False``: scheme A, one demonstration set per seed (every experiment but saliency).
    ``per_example=True``: scheme B, fresh demonstrations for each test example (saliency, §2.1).
    """
    if isinstance(n_test, bool) or not isinstance(n_test, (int, np.integer)) or n_test < 0:
        raise ValueError(f"n_test must be an integer >= 0 (the number of test examples), got {n_test!r}")
    test = subsample_test(data, seed, n_test)
    if per_example:
        demo_sets = sample_demonstrations_per_example(data, len(test), shots_per_class, seed)
    else:
        demo_sets = [sample_fixed_demonstrations(data, shots_per_class, seed)[0]] * len(test)
    return [
        build_prompt(data.task, [data.train[j] for j in demos], data.test[i], lm.tokenizer, lm.max_length)
        for i, demos in zip(test, demo_sets)
    ]


def settings_of(profile: Profile, **extra) -> dict:
    """The settings dict that keys a run: the experiment-specific settings (seed, n_test, shots, ...).

    The profile's seed list and sizes are not in it: a run is one (task, seed) with its own ``n_test``, so adding
    seeds to a profile, or changing another experiment's size, leaves every cached run valid. Every experiment
    passes the ``n_test`` it uses.
    """
    if "n_test" not in extra:
        raise ValueError("settings_of needs the run's n_test (each experiment passes the size it uses)")
    d = asdict(profile)
    d.pop("name")
    d.pop("batch_size")  # does not change results
    d.pop("seeds")  # one run is one seed (in ``extra``)
    d.pop("n_test")
    d.pop("n_seeds_reweighting")
    d.pop("n_seeds_compression")
    d.pop("n_test_extraction")  # experiments that use these pass them explicitly
    d.pop("n_test_isolation")
    d.pop("n_test_reweighting")
    d.pop("n_test_diagnosis")
    d.pop("n_test_compression")
    d.pop("n_random_compression")
    d.pop("n_test_compression_shots")
    d.update(extra)
    return d
