"""Start-up: ``import helpers`` pulls in no heavy library a path does not need, the results key's transformers
version is read without importing transformers, and a task's fingerprint is hashed once per set of examples."""

from __future__ import annotations

import subprocess
import sys

from helpers.core import tasks

HEAVY = ("transformers", "sklearn", "scipy", "seaborn", "matplotlib", "datasets", "pandas")


def test_import_helpers_and_the_results_version_import_no_heavy_library():
    code = ("import sys, helpers; from helpers.core import runs; runs.transformers_version(); "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_transformers_version_is_the_installed_major_minor():
    import transformers

    from helpers.core.runs import transformers_version

    assert transformers_version() == ".".join(transformers.__version__.split(".")[:2])


def test_a_fingerprint_is_hashed_once_for_the_same_examples(monkeypatch):
    task = tasks.get_task("sst2")
    train = tuple(tasks.Example(f"row {i}", i % 2) for i in range(5))
    test = (tasks.Example("query", 1),)
    calls = []
    real = tasks.hashlib.sha256
    monkeypatch.setattr(tasks.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    first = tasks.data_fingerprint(task, train, test)
    assert tasks.data_fingerprint(task, train, test) == first and len(calls) == 1
    same_content = tuple(tasks.Example(e.text, e.label) for e in train)
    assert tasks.data_fingerprint(task, same_content, test) == first and len(calls) == 2  # other tuples: hashed
    edited = train[:-1] + (tasks.Example("row 4", 1),)
    assert tasks.data_fingerprint(task, edited, test) != first
