"""The run cache (its key, where results live, what it refuses) and the isolation / loyalty helpers."""

import json
import os
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers.core import runs
from helpers.experiments.isolation import isolated_layers, label_loyalty, random_positions, word_loyalty
from helpers.core.prompts import Prompt
from helpers.core.runs import (
    PROFILES,
    MissingResultError,
    NonFiniteResultError,
    cached_run,
    find_result,
    key_fields,
    result_path,
    run_key,
    settings_of,
)
from helpers.core.tasks import TASKS, Example, TaskData


_COMMITTED = runs.committed_results_dir  # before the fixture below replaces it


def fake_lm(name="m/x", dtype=torch.float32, device="cpu", **identity):
    """What the key reads from a LoadedModel, without a model."""
    ident = {"kind": "offline", "name": name, "packages": {"pkg": "1.0"}, **identity}
    return SimpleNamespace(name=name, identity=ident, dtype=dtype, device=torch.device(device))


def fake_data(texts=("a", "b"), task="sst2"):
    rows = tuple(Example(t, i % 2) for i, t in enumerate(texts))
    return TaskData(TASKS[task], rows, rows, "memory")


@pytest.fixture(autouse=True)
def isolated_results(tmp_path, monkeypatch):
    """Every test: an empty user cache and an empty 'committed' folder, never the repository's results."""
    monkeypatch.setenv("ANCHORS_RESULTS", str(tmp_path / "user"))
    monkeypatch.setattr(runs, "committed_results_dir", lambda: tmp_path / "committed")
    monkeypatch.delenv("ANCHORS_REQUIRE_CACHED", raising=False)
    return tmp_path


def test_cached_run_computes_once_and_reloads(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.arange(3), "y": np.ones((2, 2))}

    lm, data = fake_lm(), fake_data()
    a = cached_run("exp", lm, data, {"n": 1}, compute, directory=tmp_path)
    b = cached_run("exp", lm, data, {"n": 1}, compute, directory=tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(a["x"], b["x"])
    path = result_path("exp", lm, data, {"n": 1}, tmp_path)
    info = json.loads(path.with_suffix(".json").read_text())
    assert path.exists() and info["settings"] == {"n": 1}
    assert {k: info[k] for k in key_fields("exp", lm, data, {"n": 1})} == key_fields("exp", lm, data, {"n": 1})
    assert not list(tmp_path.rglob(".tmp-*")), "temporary files left behind"
    cached_run("exp", lm, data, {"n": 2}, compute, directory=tmp_path)
    assert len(calls) == 2, "other settings must not reuse the cache"


def test_failed_compute_leaves_no_file(tmp_path):
    def boom():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached_run("exp", fake_lm(), fake_data(), {}, boom, directory=tmp_path)
    assert not list(tmp_path.rglob("*.npz"))


def test_run_key_depends_on_everything(monkeypatch):
    lm, data, s = fake_lm(), fake_data(), {"a": 1}
    base = run_key("e", lm, data, s)
    variants = {
        "experiment": run_key("e2", lm, data, s),
        "model name": run_key("e", fake_lm("m2"), data, s),
        "package version": run_key("e", fake_lm(packages={"pkg": "1.1"}), data, s),
        "dtype": run_key("e", fake_lm(dtype=torch.float16), data, s),
        "bfloat16": run_key("e", fake_lm(dtype=torch.bfloat16), data, s),
        "device": run_key("e", fake_lm(device="meta"), data, s),
        "task": run_key("e", lm, fake_data(task="trec"), s),
        "data content": run_key("e", lm, fake_data(("a", "c")), s),
        "data order": run_key("e", lm, fake_data(("b", "a")), s),
        "settings": run_key("e", lm, data, {"a": 2}),
    }
    # the same examples from another source (folder or hub) are the same data
    assert run_key("e", lm, TaskData(data.task, data.train, data.test, "hub:x"), s) == base
    monkeypatch.setattr(runs, "RESULTS_VERSION", "999")
    variants["RESULTS_VERSION"] = run_key("e", lm, data, s)
    monkeypatch.undo()
    monkeypatch.setattr(runs, "transformers_version", lambda: "5.999")
    variants["transformers"] = run_key("e", lm, data, s)
    assert len(set(variants.values()) | {base}) == len(variants) + 1, variants


def test_transformers_key_is_major_minor():
    import transformers

    assert runs.transformers_version() == ".".join(transformers.__version__.split(".")[:2])


def test_a_model_without_identity_is_refused():
    lm = SimpleNamespace(name="m", dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="no identity"):
        run_key("e", lm, fake_data(), {})


def test_float16_nan_is_never_cached_nor_handed_to_float32(tmp_path):
    """The issue's first wrong-number case: a float16 run's NaNs must not come back for a float32 run."""
    data = fake_data()
    with pytest.raises(NonFiniteResultError, match=r"flows: 2 NaN and 0 inf of 3.*bfloat16"):
        cached_run("exp", fake_lm(dtype=torch.float16), data, {}, lambda: {"flows": np.array([np.nan, 1, np.nan])})
    assert not list(tmp_path.rglob("*.npz")), "a non-finite result was cached"
    out = cached_run("exp", fake_lm(), data, {}, lambda: {"flows": np.array([0.5, 1.0, 2.0])})
    np.testing.assert_array_equal(out["flows"], [0.5, 1.0, 2.0])
    # even if float16 had produced finite numbers, a float32 run does not read them
    cached_run("exp2", fake_lm(dtype=torch.float16), data, {}, lambda: {"x": np.zeros(1)})
    assert cached_run("exp2", fake_lm(), data, {}, lambda: {"x": np.ones(1)})["x"][0] == 1


def test_allow_nan_names_the_fields_where_nan_is_legitimate(tmp_path):
    lm, data = fake_lm(), fake_data()
    out = cached_run("exp", lm, data, {}, lambda: {"auc": np.array([np.nan, 0.7]), "n": np.arange(2)},
                     allow_nan=("auc",))
    assert np.isnan(out["auc"][0])
    again = cached_run("exp", lm, data, {}, lambda: pytest.fail("recomputed"), allow_nan=("auc",))
    assert np.isnan(again["auc"][0])
    with pytest.raises(NonFiniteResultError, match="other"):  # only the named field
        cached_run("exp3", lm, data, {}, lambda: {"auc": np.ones(1), "other": np.array([np.nan])}, allow_nan=("auc",))
    with pytest.raises(NonFiniteResultError, match="1 inf"):  # never an infinity
        cached_run("exp4", lm, data, {}, lambda: {"auc": np.array([np.inf])}, allow_nan=("auc",))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "pickle"])
def test_unreadable_cached_file_is_reported_and_recomputed(damage):
    lm, data = fake_lm(), fake_data()
    cached_run("exp", lm, data, {}, lambda: {"x": np.arange(100.0)})
    path = find_result("exp", lm, data, {})
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": b"not an npz at all" * 10, "empty": b"",
                      "pickle": b"\x80\x04K\x01."}[damage])
    with pytest.warns(UserWarning, match=f"cannot read the cached result {path}.*recomputing") as record:
        out = cached_run("exp", lm, data, {}, lambda: {"x": np.arange(3.0)})
    assert "allow_pickle" not in str(record[0].message)
    np.testing.assert_array_equal(out["x"], np.arange(3.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: read back silently
        np.testing.assert_array_equal(cached_run("exp", lm, data, {}, lambda: pytest.fail("again"))["x"], np.arange(3.0))


def test_cached_file_with_nan_is_reported_and_recomputed():
    lm, data = fake_lm(), fake_data()
    cached_run("exp", lm, data, {}, lambda: {"x": np.ones(2)})
    path = find_result("exp", lm, data, {})
    np.savez(path, x=np.array([1.0, np.nan]))  # e.g. written by an older version that did not check
    with pytest.warns(UserWarning, match="non-finite"):
        out = cached_run("exp", lm, data, {}, lambda: {"x": np.zeros(2)})
    np.testing.assert_array_equal(out["x"], np.zeros(2))


def test_reads_user_cache_then_committed_and_writes_only_the_user_cache(isolated_results):
    lm, data = fake_lm(), fake_data()
    committed = isolated_results / "committed"
    cached_run("exp", lm, data, {}, lambda: {"x": np.array([1.0])}, directory=committed)  # "the book's result"
    snapshot = sorted(p.name for p in committed.rglob("*"))
    assert cached_run("exp", lm, data, {}, lambda: pytest.fail("recomputed"))["x"][0] == 1.0
    assert find_result("exp", lm, data, {}).is_relative_to(committed)
    # another dtype / data / model is not the book's result: computed, written to the user cache only
    cached_run("exp", fake_lm(dtype=torch.float16), data, {}, lambda: {"x": np.array([2.0])})
    cached_run("exp", lm, fake_data(("other", "data")), {}, lambda: {"x": np.array([3.0])})
    assert sorted(p.name for p in committed.rglob("*")) == snapshot, "wrote into the committed results"
    assert len(list((isolated_results / "user").rglob("*.npz"))) == 2
    # the user cache is read first
    cached_run("exp", lm, data, {}, lambda: {"x": np.array([9.0])}, recompute=True)
    assert cached_run("exp", lm, data, {}, lambda: pytest.fail("recomputed"))["x"][0] == 9.0
    assert find_result("exp", lm, data, {}).is_relative_to(isolated_results / "user")


def test_default_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("ANCHORS_RESULTS")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert runs.results_dir() == tmp_path / ".cache" / "anchors" / "results"


def test_never_writes_into_site_packages(monkeypatch):
    import sysconfig

    monkeypatch.setenv("ANCHORS_RESULTS", os.path.join(sysconfig.get_paths()["purelib"], "results"))
    with pytest.raises(PermissionError, match="installed package"):
        cached_run("exp", fake_lm(), fake_data(), {}, lambda: {"x": np.ones(1)})


def test_committed_results_of_a_checkout():
    assert _COMMITTED() == runs.REPO_ROOT / "results"  # no helpers/_results in a checkout: the repository's folder


def test_require_cached(monkeypatch):
    monkeypatch.setenv("ANCHORS_REQUIRE_CACHED", "1")
    with pytest.raises(MissingResultError, match="no cached result for exp / m/x / sst2"):
        cached_run("exp", fake_lm(), fake_data(), {"n": 1}, lambda: pytest.fail("computed"))


def test_stale_temporary_files_are_cleaned(isolated_results, monkeypatch):
    folder = isolated_results / "user" / "exp"
    folder.mkdir(parents=True)
    old, new = folder / f"{runs.TEMP_PREFIX}killed.npz", folder / f"{runs.TEMP_PREFIX}running.npz"
    users = folder / ".tmp-draft-chapter3.tex"  # not ours: never removed, however old
    for p in (old, new, users):
        p.write_bytes(b"x")
    past = time.time() - runs.STALE_TEMP_SECONDS - 60
    os.utime(old, (past, past))
    os.utime(users, (past, past))
    monkeypatch.setattr(runs, "_CLEANED", set())
    cached_run("exp", fake_lm(), fake_data(), {}, lambda: {"x": np.ones(1)})
    assert not old.exists() and new.exists() and users.exists()


def test_unknown_profile_lists_the_profiles():
    with pytest.raises(KeyError, match="Unknown profile 'boook'. Choose one of: quick, book, paper"):
        PROFILES["boook"]


def test_settings_ignore_batch_size():
    p = PROFILES["book"]
    assert settings_of(p, seed=1, n_test=4) == settings_of(type(p)(**{**p.__dict__, "batch_size": 1}), seed=1, n_test=4)


def test_settings_key_one_run_not_the_profile():
    """Adding seeds or changing another experiment's size leaves a run's key unchanged; its own n_test changes it."""
    p = PROFILES["book"]
    more = type(p)(**{**p.__dict__, "seeds": p.seeds + (99,), "n_test": 7, "n_test_isolation": 3})
    assert settings_of(p, seed=42, n_test=16) == settings_of(more, seed=42, n_test=16)
    assert settings_of(p, seed=42, n_test=16) != settings_of(p, seed=42, n_test=17)
    with pytest.raises(ValueError, match="n_test"):
        settings_of(p, seed=42)


def test_profile_seeds_for():
    p = PROFILES["book"]
    assert p.seeds == (42, 43, 44, 45, 46)
    assert p.seeds_for(3) == (42, 43, 44) and p.seeds_for(0) == p.seeds


def test_isolated_layers():
    assert isolated_layers(18, 5, "first") == [0, 1, 2, 3, 4]
    assert isolated_layers(18, 5, "last") == [13, 14, 15, 16, 17]
    with pytest.raises(ValueError):
        isolated_layers(18, 0, "first")
    with pytest.raises(ValueError):
        isolated_layers(18, 5, "middle")


def _prompt(labels, target, special=(0,)):
    return Prompt("", tuple(range(target + 1)), tuple(labels), tuple(range(len(labels))), (), (), (), (), 0,
                  target, 0, tuple(special))


def test_random_positions_exclude_labels_and_bos_and_are_seeded():
    p = _prompt([3, 7, 11], target=20)
    a = random_positions(p, [0, 1, 2], seed=42, index=5)
    assert a == random_positions(p, [0, 1, 2], seed=42, index=5)
    assert a != random_positions(p, [0, 1, 2], seed=43, index=5)
    for layer, pos in a.items():
        assert len(pos) == 3 and len(set(pos)) == 3
        assert not set(pos) & {0, 3, 7, 11}
        assert all(0 <= x <= 18 for x in pos)  # {0..q-2}
    assert len({tuple(v) for v in a.values()}) > 1, "redrawn per layer"


def test_loyalties():
    assert label_loyalty(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])) == 0.75
    top = np.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    ref = np.array([[1, 2, 3, 4, 5, 7], [9, 8, 7, 6, 5, 0]])
    # row 1: top-5 identical -> 1; row 2: {1..5} vs {9,8,7,6,5}: 1 shared of 9 -> 1/9
    assert word_loyalty(top, ref, 5) == pytest.approx((1 + 1 / 9) / 2)
    with pytest.raises(ValueError):
        word_loyalty(top, ref, 10)


def test_per_example_loyalties_average_to_the_aggregates():
    from helpers.experiments.isolation import label_loyalty_per_example, word_loyalty_per_example

    pred, ref = np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])
    np.testing.assert_array_equal(label_loyalty_per_example(pred, ref), [1, 1, 0, 1])
    top = np.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    ref_top = np.array([[5, 4, 3, 2, 1, 9], [1, 7, 8, 9, 10, 6]])
    per = word_loyalty_per_example(top, ref_top, 5)
    np.testing.assert_allclose(per, [1.0, 1 / 9])
    assert word_loyalty(top, ref_top, 5) == pytest.approx(per.mean())
    with pytest.raises(ValueError):
        label_loyalty_per_example(pred, ref[:3])


def test_lookup_only_returns_none_for_a_missing_run_and_never_computes(tmp_path):
    from helpers.core.runs import cached_run

    def boom():
        raise AssertionError("computed in lookup-only mode")

    lm, data = fake_lm(), fake_data()

    assert cached_run("exp", lm, data, {"a": 1}, boom, directory=tmp_path, lookup_only=True) is None
    assert cached_run("exp", lm, data, {"a": 1}, None, directory=tmp_path) is None
    cached_run("exp", lm, data, {"a": 1}, lambda: {"x": np.arange(3)}, directory=tmp_path)
    got = cached_run("exp", lm, data, {"a": 1}, boom, directory=tmp_path, lookup_only=True)
    np.testing.assert_array_equal(got["x"], np.arange(3))


def test_model_key_stands_for_the_loaded_model_in_the_key():
    from helpers.core.runs import ModelKey

    key = ModelKey.of("gemma-3-270m")
    assert key.dtype == torch.float32 and key.device.type == "cpu" and key.identity["name"] == "gemma-3-270m"
    data = fake_data()
    same = SimpleNamespace(name="gemma-3-270m", identity=key.identity, dtype=torch.float32, device=torch.device("cpu"))
    assert run_key("e", key, data, {}) == run_key("e", same, data, {})
    assert run_key("e", ModelKey.of("gemma-3-270m", dtype="bfloat16"), data, {}) != run_key("e", key, data, {})
