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

**Safety.** Results are a flat dict of numpy arrays saved as ``.npz`` (no pickles) next to a ``.json`` with the key's
fields, both written atomically (a temporary ``.tmp-*`` file, then ``os.replace``; those of killed runs are removed
after :data:`STALE_TEMP_SECONDS`). A result with a NaN or an infinity is refused (:class:`NonFiniteResultError`,
nothing cached) unless the experiment names the fields where NaN is legitimate (``allow_nan``). A cached file that
cannot be read, or holds non-finite numbers, is reported (a warning with its path) and recomputed. With
``ANCHORS_REQUIRE_CACHED=1`` a missing result is an error instead of a computation (a book build that must only read).

Profiles size the runs:

* ``quick`` - a few examples, one seed: the whole book in minutes (CI);
* ``book`` - the published results on this 2-core CPU: a few hundred test prompts per task over 3 seeds;
* ``paper`` - the paper's settings (up to 1000 test examples, 5 seeds): for a GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .prompts import Prompt, build_prompt
from .tasks import TaskData, sample_demonstrations_per_example, sample_fixed_demonstrations, subsample_test

__all__ = ["ModelKey", "Profile", "PROFILES", "RESULTS_VERSION", "RESULTS_ENV", "results_dir", "committed_results_dir",
           "search_dirs", "key_fields", "run_key", "result_path", "find_result", "load_result", "cached_run",
           "make_prompts", "settings_of", "NonFiniteResultError", "UnreadableResultError", "MissingResultError",
           "check_finite", "clean_stale_temporaries", "transformers_version", "write_json", "bench_file"]

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


class MissingResultError(LookupError):
    """``ANCHORS_REQUIRE_CACHED=1`` and a result is not in any results folder."""


# --------------------------------------------------------------------------------------------------------------------
# Where results live
# --------------------------------------------------------------------------------------------------------------------


def results_dir() -> Path:
    """The writable results folder: ``$ANCHORS_RESULTS``, or ``~/.cache/anchors/results``."""
    env = os.environ.get(RESULTS_ENV)
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "anchors" / "results"


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
    cache, then the committed results); with ``write``, where a new run goes (:func:`results_dir`)."""
    rel = Path(folder) / f"{model.replace('/', '--')}.json"
    if not write:
        for d in search_dirs():
            if (d / rel).is_file():
                return d / rel
    return results_dir() / rel

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
    import transformers

    return ".".join(transformers.__version__.split(".")[:2])


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


def key_fields(experiment: str, lm, data: TaskData, settings: dict) -> dict:
    """Everything that identifies a run's numbers (the key is a hash of this; it is also saved beside the result)."""
    identity = dict(getattr(lm, "identity", None) or {})
    if not identity:
        raise ValueError(f"{lm!r} has no identity: load models with helpers.load_model")
    return {
        "experiment": experiment,
        "model": identity,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": lm.device.type,
        "task": data.task.name,
        "data": data.fingerprint,
        "settings": settings,
        "versions": _versions(),
    }


def _hash_fields(fields: dict) -> str:
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_key(experiment: str, lm, data: TaskData, settings: dict) -> str:
    """A short hash of :func:`key_fields`."""
    return _hash_fields(key_fields(experiment, lm, data, settings))


def _file_name(fields: dict, key: str) -> str:
    model = re.sub(r"[^A-Za-z0-9._-]+", "--", str(fields["model"].get("name", "model"))).strip("-") or "model"
    return f"{model}__{fields['task']}__{key}.npz"


def _relative_path(fields: dict) -> Path:
    return Path(fields["experiment"]) / _file_name(fields, _hash_fields(fields))


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


def _read_valid(path: Path, allow_nan: Collection[str]) -> dict[str, np.ndarray] | None:
    try:
        result = load_result(path)
        check_finite(result, allow_nan, what=f"cached result {path}")
    except (UnreadableResultError, NonFiniteResultError) as err:
        warnings.warn(f"{err} -- ignoring it and recomputing", stacklevel=3)
        return None
    return result


def find_result(experiment: str, lm, data: TaskData, settings: dict, directory: Path | None = None) -> Path | None:
    """The first existing ``.npz`` of this run in :func:`search_dirs`, or ``None``."""
    rel = _relative_path(key_fields(experiment, lm, data, settings))
    for d in search_dirs(directory):
        if (d / rel).is_file():
            return d / rel
    return None


_CLEANED: set[Path] = set()


def clean_stale_temporaries(directory: Path, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove ``.tmp-*`` files older than ``max_age`` seconds (left by killed runs) in ``directory`` and its
    sub-folders. Returns what was removed."""
    removed = []
    if not Path(directory).is_dir():
        return removed
    now = time.time()
    for p in Path(directory).glob("**/.tmp-*"):
        try:
            if p.is_file() and now - p.stat().st_mtime > max_age:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:  # removed by someone else meanwhile
            pass
    return removed


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``path``, atomically (a benchmark's result; a killed run leaves no half
    file)."""
    _atomic_write(Path(path), lambda p: p.write_text(json.dumps(obj, indent=1) + "\n"))


def _torch_threads() -> int | None:
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        return None


def save_result(path: Path, result: dict[str, np.ndarray], info: dict) -> None:
    """Write ``path`` (.npz) and its ``.json`` atomically."""
    _atomic_write(path, lambda p: np.savez_compressed(p, **result))
    _atomic_write(path.with_suffix(".json"),
                  lambda p: p.write_text(json.dumps(info, indent=1, sort_keys=True, default=str) + "\n"))


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
) -> dict[str, np.ndarray] | None:
    """Return the cached result of a run, or ``compute()`` it and cache it.

    Lookup-only mode (``lookup_only=True`` or ``compute=None``): return the cached result, or ``None`` when there is
    none; never compute (the verdict page reads results this way, through the experiments' own run functions, with
    a :class:`ModelKey` in place of a loaded model).

    Args:
        experiment: the experiment's name (the results sub-folder).
        lm: the :class:`~helpers.core.models.LoadedModel` (its identity, dtype and device enter the key).
        data: the :class:`~helpers.core.tasks.TaskData` (its fingerprint enters the key).
        settings: what else changes the numbers (JSON-serialisable).
        compute: returns a flat dict of numpy arrays.
        directory: read and write only there (default: :func:`search_dirs`, writing to :func:`results_dir`).
        recompute: ignore cached results.
        allow_nan: fields of the result where NaN is legitimate (e.g. an AUC undefined in some layer).
        lookup_only: never compute; ``None`` when nothing is cached.
    """
    fields = key_fields(experiment, lm, data, settings)
    rel = _relative_path(fields)
    if not recompute:
        for d in search_dirs(directory):
            if (d / rel).is_file():
                result = _read_valid(d / rel, allow_nan)
                if result is not None:
                    return result
    if lookup_only or compute is None:
        return None
    target = (Path(directory) if directory is not None else results_dir()) / rel
    if os.environ.get(REQUIRE_CACHED_ENV) == "1" and not recompute:
        raise MissingResultError(
            f"{REQUIRE_CACHED_ENV}=1 and no cached result for {experiment} / {fields['model'].get('name')} / "
            f"{fields['task']} with settings {settings} in {[str(d) for d in search_dirs(directory)]} "
            f"(expected {rel})"
        )
    _check_writable(target.parent)
    root = target.parents[1]
    if root not in _CLEANED:
        clean_stale_temporaries(root)
        _CLEANED.add(root)
    wall, cpu = time.perf_counter(), time.process_time()
    result = {k: np.asarray(v) for k, v in compute().items()}
    cost = {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2),
            "threads": _torch_threads()}  # what this run cost (not part of the key)
    check_finite(result, allow_nan, what=f"{experiment} result for {fields['model'].get('name')} / {fields['task']}")
    save_result(target, result, {"format": 2, "key": rel.stem.rsplit("__", 1)[1], "allow_nan": sorted(allow_nan),
                                 **fields, "cost": cost})
    return result


def make_prompts(
    lm, data: TaskData, seed: int, n_test: int, shots_per_class: int = 1, per_example: bool = False
) -> list[Prompt]:
    """The paper's test subset for ``seed`` with its demonstrations, as prompts.

    ``per_example=False``: scheme A, one demonstration set per seed (every experiment but saliency).
    ``per_example=True``: scheme B, fresh demonstrations for each test example (saliency, §2.1).
    """
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
