"""The committed `book`-profile results: complete, found under the current cache key, and what the code computes.

* :func:`test_the_book_finds_every_committed_result` (fast, no model weights): replays the chapters' calls with
  ``ANCHORS_REQUIRE_CACHED=1`` and an empty user cache, so every result the book build needs must be found in the
  committed folder under the current key (a stale key after a code or version change fails here).
* :func:`test_committed_files_are_current`: every committed file's name is the key of its own ``.json`` fields, and
  those fields are what this environment computes (models, data, versions): no orphan, no stale file.
* :func:`test_committed_slice_equals_recomputation` (slow): for every committed (experiment, model, task), recompute
  the first examples of seed 42 from scratch and compare with the committed arrays.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers.core import runs

COMMITTED = Path(runs.REPO_ROOT) / "results"
BOOK_MODELS = {"aggregation": ("gemma-3-270m",), "extraction": ("gemma-3-270m", "qwen2.5-coder-0.5b")}
SLICE = 4  # examples recomputed per (experiment, model, task)


# Committed folders that are not run-cache results (the benchmarks' timings; checked in tests/test_speed_bench.py and
# tests/test_compression_results.py::test_bench_file_is_consistent).
NOT_RUN_CACHE = {"compression-bench", "speed-bench", "summaries", "build-bench"}  # not run-cache results


def _infos() -> list[tuple[Path, dict]]:
    return [(p, json.loads(p.read_text())) for p in sorted(COMMITTED.glob("*/*.json"))
            if p.parent.name not in NOT_RUN_CACHE]


# Experiments whose committed results are re-checked by a dedicated slow test next to their module's tests (their
# recomputation needs the experiment's own set-up: training, caches). Each must exist; see
# test_every_committed_experiment_is_covered.
DEDICATED = {
    "reweighting": ("test_reweighting.py", "test_committed_reweighting_slice"),
    "diagnosis": ("test_results_diagnosis.py", "test_diagnosis_slice"),
    "compression": ("test_compression_results.py", "test_table2_slice"),
    "meaning-attention": ("test_meaning.py", "test_committed_meaning_slice"),
    "meaning-isolation": ("test_meaning.py", "test_committed_meaning_slice"),
    "meaning-saliency": ("test_meaning.py", "test_committed_meaning_slice"),
    "tuning": ("test_tuning_results.py", "test_committed_tuning_slice"),
    "taskvectors": ("test_taskvectors.py", "test_committed_taskvectors_slice"),
    "heads": ("test_heads.py", "test_committed_heads_slice"),
}


def _cases(dedicated: bool = False) -> list[tuple[str, str, str]]:
    cases = {(i["experiment"], i["model"]["name"], i["task"]) for _, i in _infos()}
    return sorted(c for c in cases if dedicated or c[0] not in DEDICATED)


def _stand_in(name: str):
    """What the cache key reads from a model loaded by the chapters (float32, CPU), without its weights."""
    from helpers.core.runs import ModelKey

    return ModelKey.of(name)


@pytest.fixture(scope="module")
def all_data(data_dir):
    from helpers import TASKS, load_task

    return {name: load_task(name, data_dir) for name in TASKS}


@pytest.fixture
def only_committed(tmp_path, monkeypatch):
    monkeypatch.setenv("ANCHORS_RESULTS", str(tmp_path / "empty-user-cache"))
    monkeypatch.setenv("ANCHORS_REQUIRE_CACHED", "1")
    assert runs.committed_results_dir() == COMMITTED


def test_every_committed_experiment_is_covered():
    for experiment in {e for e, _, _ in _cases(dedicated=True)} & set(DEDICATED):
        file, test = DEDICATED[experiment]
        source = (Path(__file__).parent / file).read_text()
        assert f"def {test}(" in source, f"{experiment}: its dedicated committed-results test {file}::{test} is missing"
    cases = _cases()
    experiments = {e for e, _, _ in cases}
    assert {"saliency", "saliency-examples", "isolation", "extraction"} <= experiments
    assert {m for _, m, _ in cases} == {"gemma-3-270m", "qwen2.5-coder-0.5b"}
    for e in experiments:
        for m in {m for e2, m, _ in cases if e2 == e}:
            assert {t for e2, m2, t in cases if (e2, m2) == (e, m)} == {"sst2", "trec", "agnews", "emoc"}, (e, m)


def test_the_book_finds_every_committed_result(all_data, only_committed):
    """The chapters' own calls, book profile, on the models they load: nothing may need computing."""
    from helpers.experiments.aggregation import isolation_runs, saliency_examples, saliency_runs
    from helpers.experiments.extraction import extraction_runs

    profile = runs.PROFILES["book"]
    for name in BOOK_MODELS["aggregation"]:
        lm = _stand_in(name)
        for data in all_data.values():
            assert len(saliency_runs(lm, data, profile)) == len(profile.seeds)
            saliency_examples(lm, data)
            isolation_runs(lm, data, profile)
    for name in BOOK_MODELS["extraction"]:
        lm = _stand_in(name)
        for data in all_data.values():
            extraction_runs(lm, data, profile, shots=1)
    for data in all_data.values():  # the chapter's 2-shot comparison is on its first model
        extraction_runs(_stand_in(BOOK_MODELS["extraction"][0]), data, profile, shots=2)


def test_committed_files_are_current(all_data):
    from helpers.core.runs import _hash_fields, key_fields

    models = {}
    for meta, info in _infos():
        assert info.get("format") == 2, f"{meta}: old-format result; run scripts/rekey_results.py"
        assert meta.with_suffix(".npz").is_file(), f"{meta}: no .npz"
        fields = {k: info[k] for k in ("experiment", "model", "dtype", "device", "task", "data", "settings",
                                       "versions")}
        assert meta.stem.endswith("__" + _hash_fields(fields)), f"{meta}: name is not the key of its fields"
        name = info["model"]["name"]
        lm = models.setdefault(name, _stand_in(name))
        data = all_data.get(info["task"])
        if data is None:  # a label-word regime's task ("sst2+flipped", helpers.experiments.meaning): its own data value
            from helpers.experiments.meaning import base_name, regime_data, regime_of

            data = regime_data(all_data[base_name(info["task"])], regime_of(info["task"]))
        assert fields == key_fields(info["experiment"], lm, data, info["settings"]), meta


# --------------------------------------------------------------------------------------------------------------------
# Recomputation (slow)
# --------------------------------------------------------------------------------------------------------------------


def _seed42(experiment: str, model: str, task: str) -> tuple[Path, dict]:
    rows = [(p, i) for p, i in _infos() if (i["experiment"], i["model"]["name"], i["task"]) == (experiment, model, task)]
    rows.sort(key=lambda r: (r[1]["settings"].get("seed", 0) != 42, r[1]["settings"].get("shots", 1)))
    return rows[0]


@pytest.mark.slow
@pytest.mark.parametrize("experiment,model,task", _cases())
def test_committed_slice_equals_recomputation(experiment, model, task, offline_model, all_data, tmp_path):
    from helpers.core.runs import load_result, make_prompts

    meta, info = _seed42(experiment, model, task)
    committed = load_result(meta.with_suffix(".npz"))
    s = info["settings"]
    lm = offline_model(model)
    data = all_data[task]
    if experiment == "saliency":
        from helpers.core.saliency import saliency_flow

        prompts = make_prompts(lm, data, s["seed"], s["n_test"], s["shots"], per_example=True)[:2]
        fresh = saliency_flow(lm, data.task, prompts, batch_size=2, progress=False)
        np.testing.assert_allclose(fresh, committed["flows"][:2], rtol=1e-3, atol=1e-9)
    elif experiment == "saliency-control":  # the position draws run in input order: a prefix of the prompts is a slice
        from helpers.core.saliency import saliency_flow

        prompts = make_prompts(lm, data, s["seed"], s["n_test"], s["shots"], per_example=True)[:2]
        fresh = saliency_flow(lm, data.task, prompts, batch_size=2, progress=False, control_seed=s["seed"])
        np.testing.assert_allclose(fresh, committed["flows"][:2], rtol=1e-3, atol=1e-9)
    elif experiment == "isolation":
        from helpers.experiments.isolation import run_isolation

        prompts = make_prompts(lm, data, s["seed"], s["n_test"], s["shots"])[:SLICE]
        k = s["random_ks"][0]
        fresh = run_isolation(lm, data.task, prompts, ks=(k,), seed=s["seed"], batch_size=SLICE, progress=False,
                              random_ks=(k,))
        results = set(fresh) - {"shared_prefix"}  # how each prompt ran (bookkeeping), not a result
        assert results <= set(committed)
        for key in results:
            np.testing.assert_array_equal(fresh[key], committed[key][:SLICE], err_msg=key)
    elif experiment == "extraction":
        from helpers.experiments.extraction import label_attention

        prompts = make_prompts(lm, data, s["seed"], s["n_test"], s["shots"])[:SLICE]
        fresh = label_attention(lm, data.task, prompts, batch_size=SLICE, progress=False)
        for key in ("attention", "first_token", "probs"):
            np.testing.assert_allclose(fresh[key], committed[key][:SLICE], rtol=1e-5, atol=1e-5, err_msg=key)
        np.testing.assert_array_equal(fresh["pred"], committed["pred"][:SLICE])
        np.testing.assert_array_equal(fresh["gold"], committed["gold"][:SLICE])
    elif experiment == "saliency-examples":
        from helpers.experiments.aggregation import saliency_examples

        fresh = saliency_examples(lm, data, n=s["n"], seed=s["seed"], pool=s["pool"], directory=tmp_path)
        for key in ("lengths", "label_positions", "target", "input_ids"):
            np.testing.assert_array_equal(fresh[key], committed[key], err_msg=key)
        diff = np.abs(fresh["matrices"].astype(int) - committed["matrices"].astype(int))
        assert diff.max() <= 1, "saliency matrices (uint8) differ by more than rounding"
    else:
        pytest.fail(f"no recomputation check for the committed experiment {experiment!r}: add one here")
