"""scripts/rekey_results.py: old-key results get the current key (and are then found by cached_run), re-runnably."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from helpers.core.models import model_identity
from helpers.core.runs import cached_run, find_result, load_result
from helpers.core.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("rekey_results", ROOT / "scripts" / "rekey_results.py")
rekey = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rekey)


def _old(root: Path, experiment: str, settings: dict, arrays: dict, model="gemma-3-270m", task="sst2",
         rename=None) -> Path:
    info = {"experiment": experiment, "model": model, "task": task, "settings": settings,
            "versions": {"results": "1", "transformers": "5"}}
    key = rename or rekey.old_key(info)
    path = root / experiment / f"{model}__{task}__{key}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    path.with_suffix(".json").write_text(json.dumps(info))
    return path


def test_rekey(tmp_path, capsys):
    data_dir = tmp_path / "data"
    (data_dir / "sst2").mkdir(parents=True)
    (data_dir / "sst2" / "labels.json").write_text('{"0": "negative", "1": "positive"}')
    for split in ("train", "test"):
        (data_dir / "sst2" / f"{split}.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    root = tmp_path / "results"
    good = _old(root, "exp", {"seed": 1}, {"x": np.arange(4.0)})
    nan = _old(root, "auc", {"seed": 1}, {"auc": np.array([np.nan, 0.6])})
    orphan = _old(root, "exp", {"seed": 2}, {"x": np.ones(1)}, rename="0123456789abcdef")

    assert rekey.main([str(root), "--data", str(data_dir)]) == 1  # two left alone
    out = capsys.readouterr().out
    assert "1 re-keyed, 2 left alone" in out and "non-finite" in out and "does not match" in out
    assert not good.exists() and nan.exists() and orphan.exists()

    # the moved file is what cached_run now finds for the same run (float32, CPU, that data)
    lm = SimpleNamespace(name="gemma-3-270m", identity=model_identity("gemma-3-270m"), dtype=torch.float32,
                         device=torch.device("cpu"))
    data = load_task("sst2", data_dir)
    found = find_result("exp", lm, data, {"seed": 1}, directory=root)
    assert found is not None
    np.testing.assert_array_equal(cached_run("exp", lm, data, {"seed": 1}, lambda: 1 / 0, directory=root)["x"],
                                  np.arange(4.0))
    info = json.loads(found.with_suffix(".json").read_text())
    assert info["format"] == 2 and info["migrated_from"]["file"] == good.stem
    # another dtype does not find it
    assert find_result("exp", SimpleNamespace(**{**lm.__dict__, "dtype": torch.float16}), data, {"seed": 1},
                       directory=root) is None

    # re-runnable: nothing more to do for the good one; --allow-nan lets a legitimate NaN field through
    assert rekey.main([str(root), "--data", str(data_dir), "--allow-nan", "auc:auc"]) == 1  # the orphan stays
    assert "1 re-keyed, 1 left alone" in capsys.readouterr().out
    moved = find_result("auc", lm, data, {"seed": 1}, directory=root)
    assert np.isnan(load_result(moved)["auc"][0])
    assert json.loads(moved.with_suffix(".json").read_text())["allow_nan"] == ["auc"]
    assert cached_run("auc", lm, data, {"seed": 1}, lambda: 1 / 0, directory=root, allow_nan=("auc",))["auc"][1] == 0.6


def test_model_identity_rekeys_only_an_identity_that_gains_fields(tmp_path, capsys, monkeypatch):
    """--model-identity: the migration for an identity that gains the converted weights' sha256. Results whose
    identity the new one only extends are re-keyed (and then found by cached_run); one with other package versions
    (other weights) is left alone."""
    from helpers.core.runs import key_fields, read_result
    from helpers.core.tasks import TASKS, Example, TaskData

    rows = (Example("a", 0), Example("b", 1))
    data = TaskData(TASKS["sst2"], rows, rows, "memory")
    old_identity = {"kind": "offline", "name": "m", "packages": {"pkg": "1.0"}}
    new_identity = {**old_identity, "weights": "0123456789abcdef"}
    old_lm = SimpleNamespace(identity=old_identity, dtype=torch.float32, device=torch.device("cpu"))
    root = tmp_path / "results"
    cached_run("exp", old_lm, data, {"seed": 1}, lambda: {"x": np.arange(3.0)}, directory=root)
    other = SimpleNamespace(identity={**old_identity, "packages": {"pkg": "2.0"}}, dtype=torch.float32,
                            device=torch.device("cpu"))
    cached_run("exp", other, data, {"seed": 2}, lambda: {"x": np.ones(2)}, directory=root)
    monkeypatch.setattr(rekey, "model_identity", lambda name: new_identity)
    assert rekey.main([str(root), "--model-identity", "m", "--dry-run"]) == 1
    assert find_result("exp", old_lm, data, {"seed": 1}, root) is not None  # a dry run moves nothing
    assert rekey.main([str(root), "--model-identity", "m"]) == 1
    out = capsys.readouterr().out
    assert "1 re-keyed with the identity of m, 1 left alone" in out and "differs in ['packages']" in out
    new_lm = SimpleNamespace(identity=new_identity, dtype=torch.float32, device=torch.device("cpu"))
    path = find_result("exp", new_lm, data, {"seed": 1}, root)
    assert path is not None and find_result("exp", old_lm, data, {"seed": 1}, root) is None
    np.testing.assert_array_equal(read_result(path, key_fields("exp", new_lm, data, {"seed": 1}))["x"], np.arange(3.0))
    assert json.loads(path.with_suffix(".json").read_text())["identity_before"] == old_identity
    assert rekey.main([str(root), "--model-identity", "m"]) == 1  # re-runnable: the moved one is not moved again
    assert "0 re-keyed" in capsys.readouterr().out
