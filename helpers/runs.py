"""Running an experiment for (model, task, settings) with its results cached on disk.

A run is identified by the experiment's name, the model, the task, its settings and the versions that could change
its numbers (this package's ``RESULTS_VERSION``, bumped whenever a computation changes, and transformers' major
version). Results are a flat dict of numpy arrays saved as ``.npz`` (no pickles) next to a ``.json`` with the
settings, both written atomically (a temporary file, then ``os.replace``), so a killed run leaves no half-written
file. A cached result is returned without touching the model.

Profiles size the runs:

* ``quick`` - a few examples, one seed: the whole book in minutes (CI);
* ``book`` - the published results on this 2-core CPU: a few hundred test prompts per task over 3 seeds;
* ``paper`` - the paper's settings (up to 1000 test examples, 5 seeds): for a GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .prompts import Prompt, build_prompt
from .tasks import TaskData, sample_demonstrations_per_example, sample_fixed_demonstrations, subsample_test

__all__ = ["Profile", "PROFILES", "RESULTS_VERSION", "results_dir", "run_key", "result_path", "load_result", "cached_run",
           "make_prompts", "settings_of"]

RESULTS_VERSION = "1"


@dataclass(frozen=True)
class Profile:
    name: str
    n_test: int  # test examples per (task, seed)
    seeds: tuple[int, ...]
    batch_size: int = 8
    n_test_extraction: int = 0  # extraction needs one forward pass per example: it can afford more (0 = n_test)
    n_test_isolation: int = 0  # isolation needs 11 forward passes per example: fewer on a CPU (0 = n_test)
    n_test_compression: int = 0  # compression (Table 2): test examples per (task, seed) (0 = n_test)
    n_random_compression: int = 0  # Hidden_random-top: random draws per (task, seed) (0 = the paper's 20)
    n_test_compression_shots: int = 0  # compression's shots sweep: test examples per (task, seed) (0 = n_test)


PROFILES: dict[str, Profile] = {
    "quick": Profile("quick", n_test=8, seeds=(42,), n_random_compression=5),
    "book": Profile("book", n_test=24, seeds=(42, 43, 44), n_test_extraction=32, n_test_isolation=16,
                    n_test_compression=32, n_random_compression=10, n_test_compression_shots=16),
    "paper": Profile("paper", n_test=1000, seeds=(42, 43, 44, 45, 46)),
}


def results_dir() -> Path:
    """``$ANCHORS_RESULTS`` or ``results/`` at the repository root (where the book's committed results live)."""
    env = os.environ.get("ANCHORS_RESULTS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "results"


def _versions() -> dict:
    import transformers

    return {"results": RESULTS_VERSION, "transformers": transformers.__version__.split(".")[0]}


def run_key(experiment: str, model: str, task: str, settings: dict) -> str:
    """A short hash of everything that identifies a run."""
    blob = json.dumps(
        {"experiment": experiment, "model": model, "task": task, "settings": settings, "versions": _versions()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


def result_path(experiment: str, model: str, task: str, settings: dict, directory: Path | None = None) -> Path:
    """Where the ``.npz`` of a run lives (whether or not it exists)."""
    directory = Path(directory) if directory is not None else results_dir()
    key = run_key(experiment, model, task, settings)
    return directory / experiment / f"{model.replace('/', '--')}__{task}__{key}.npz"


def load_result(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def cached_run(
    experiment: str,
    model: str,
    task: str,
    settings: dict,
    compute: Callable[[], dict[str, np.ndarray]],
    directory: Path | None = None,
    recompute: bool = False,
) -> dict[str, np.ndarray]:
    """Return the cached result of a run, or ``compute()`` it and cache it."""
    npz = result_path(experiment, model, task, settings, directory)
    meta = npz.with_suffix(".json")
    if npz.exists() and not recompute:
        return load_result(npz)
    result = compute()
    _atomic_write(npz, lambda p: np.savez_compressed(p, **result))
    info = {"experiment": experiment, "model": model, "task": task, "settings": settings, "versions": _versions()}
    _atomic_write(meta, lambda p: p.write_text(json.dumps(info, indent=1, sort_keys=True, default=str)))
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
    """The settings dict that keys a run: the profile's sizes plus experiment-specific ones."""
    d = asdict(profile)
    d.pop("name")
    d.pop("batch_size")  # does not change results
    d.pop("n_test_extraction")  # experiments that use these pass them explicitly
    d.pop("n_test_isolation")
    d.pop("n_test_compression")
    d.pop("n_random_compression")
    d.pop("n_test_compression_shots")
    d.update(extra)
    return d
