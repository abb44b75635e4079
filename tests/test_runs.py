"""The run cache and the isolation / loyalty helpers."""

import json

import numpy as np
import pytest

from helpers.isolation import isolated_layers, label_loyalty, random_positions, word_loyalty
from helpers.prompts import Prompt
from helpers.runs import PROFILES, cached_run, result_path, run_key, settings_of


def test_cached_run_computes_once_and_reloads(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.arange(3), "y": np.ones((2, 2))}

    a = cached_run("exp", "m/x", "sst2", {"n": 1}, compute, directory=tmp_path)
    b = cached_run("exp", "m/x", "sst2", {"n": 1}, compute, directory=tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(a["x"], b["x"])
    path = result_path("exp", "m/x", "sst2", {"n": 1}, tmp_path)
    assert path.exists() and json.loads(path.with_suffix(".json").read_text())["settings"] == {"n": 1}
    assert not list(tmp_path.rglob(".tmp-*")), "temporary files left behind"
    cached_run("exp", "m/x", "sst2", {"n": 2}, compute, directory=tmp_path)
    assert len(calls) == 2, "other settings must not reuse the cache"


def test_failed_compute_leaves_no_file(tmp_path):
    def boom():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached_run("exp", "m", "sst2", {}, boom, directory=tmp_path)
    assert not list(tmp_path.rglob("*.npz"))


def test_run_key_depends_on_everything():
    base = run_key("e", "m", "t", {"a": 1})
    assert len({base, run_key("e2", "m", "t", {"a": 1}), run_key("e", "m2", "t", {"a": 1}),
                run_key("e", "m", "t2", {"a": 1}), run_key("e", "m", "t", {"a": 2})}) == 5


def test_settings_ignore_batch_size():
    p = PROFILES["book"]
    assert settings_of(p, seed=1) == settings_of(type(p)(**{**p.__dict__, "batch_size": 1}), seed=1)


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
    from helpers.isolation import label_loyalty_per_example, word_loyalty_per_example

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
    from helpers.runs import cached_run

    def boom():
        raise AssertionError("computed in lookup-only mode")

    assert cached_run("exp", "m", "t", {"a": 1}, boom, directory=tmp_path, lookup_only=True) is None
    assert cached_run("exp", "m", "t", {"a": 1}, None, directory=tmp_path) is None
    cached_run("exp", "m", "t", {"a": 1}, lambda: {"x": np.arange(3)}, directory=tmp_path)
    got = cached_run("exp", "m", "t", {"a": 1}, boom, directory=tmp_path, lookup_only=True)
    np.testing.assert_array_equal(got["x"], np.arange(3))
