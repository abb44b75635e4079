"""Every bad input of issue 7 gets a clear error (or the correct behaviour), and killed runs are cleaned up.

Each test names the case it covers. Numerics (float16) are here too.
"""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import build_tiny_model

from helpers.core import attention, models
from helpers.core.attention import Isolate, Reweight, intervene
from helpers.core.prompts import build_prompt, check_prompts, collate, target_logits
from helpers.core.tasks import TASKS, Example, default_data_dir, get_task, load_task


def _write_task(root, name, labels, train, test):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.json").write_text(json.dumps({str(i): n for i, n in enumerate(labels)}))
    for split, rows in (("train", train), ("test", test)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return folder


SST2 = ["negative", "positive"]


# --------------------------------------------------------------------------------------------------------------------
# Interventions
# --------------------------------------------------------------------------------------------------------------------

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 11, 23], [7, 9, 13, 15, 17, 19, 21, 25]])


@pytest.fixture(scope="module")
def llama():
    model = build_tiny_model("llama")
    attention.enable(model, "anchors")
    return model


def test_isolate_negative_position_is_refused():
    """Was: a negative position isolated a token counted from the end."""
    with pytest.raises(ValueError, match="negative position in example 0: \\[3, -1\\].*0-based"):
        Isolate([[3, -1]], layers=[0])
    with pytest.raises(ValueError, match="negative position"):
        Isolate({0: [[2], [-4]]})


def test_isolate_flat_list_is_refused():
    """Was: Isolate([3, 5]) failed with an unclear TypeError deep in the mask."""
    with pytest.raises(ValueError, match=r"one sequence of positions per example, e.g. \[\[3, 5\]\]"):
        Isolate([3, 5], layers=[0])
    with pytest.raises(ValueError, match="integers"):
        Isolate([[1.5]], layers=[0])


def test_isolate_position_beyond_the_sequence(llama):
    hook = Isolate([[3], [8]], layers=[0])
    with pytest.raises(ValueError, match="position 8 of example 1 is beyond the sequence \\(8 tokens\\)"):
        with torch.no_grad(), intervene(hook):
            llama(input_ids=IDS)


def test_isolate_accepts_tensors_and_still_changes_the_output(llama):
    with torch.no_grad():
        plain = llama(input_ids=IDS).logits
        with intervene(Isolate(torch.tensor([[5], [6]]), layers=[0, 1])):
            isolated = llama(input_ids=IDS).logits
    assert not torch.allclose(plain, isolated)


def test_reweight_target_for_another_batch(llama):
    """Was: a target sized for another batch was silently broadcast or mis-indexed."""
    beta = torch.zeros(3, 4, 2)
    with pytest.raises(ValueError, match=r"target must be \(batch,\) = \(2,\)"):
        Reweight(beta, torch.tensor([7, 7, 7]), torch.tensor([[1, 2], [1, 2]]))
    hook = Reweight(beta, torch.tensor([7, 7, 7]), torch.tensor([[1, 2], [1, 2], [1, 2]]))  # built for 3
    with pytest.raises(ValueError, match="built for a batch of 3 examples, the batch has 2"):
        with torch.no_grad(), intervene(hook):
            llama(input_ids=IDS)


def test_reweight_beta_with_fewer_layers_than_the_model(llama):
    """Was: beta (2, H, C) on a 3-layer model re-weighted 2 layers and left the third alone, silently."""
    hook = Reweight(torch.zeros(2, 4, 2), torch.tensor([7, 7]), torch.tensor([[1, 2], [1, 2]]))
    with pytest.raises(ValueError, match="beta has 2 layers, the model has more \\(layer 2\\)"):
        with torch.no_grad(), intervene(hook):
            llama(input_ids=IDS)
    more = Reweight(torch.zeros(4, 4, 2), torch.tensor([7, 7]), torch.tensor([[1, 2], [1, 2]]))
    with pytest.raises(RuntimeError, match="did not reach layers \\[3\\]"):
        with torch.no_grad(), intervene(more):
            llama(input_ids=IDS)
    with pytest.raises(ValueError, match="layers, heads, classes"):
        Reweight(torch.zeros(4, 2), torch.tensor([7, 7]), torch.tensor([[1, 2], [1, 2]]))


# --------------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toks(offline_tokenizers):
    return offline_tokenizers


@pytest.fixture(scope="module")
def tiny_lm(toks):
    from helpers.core.models import LoadedModel, model_facts

    tok = toks["smollm2-135m"]
    model = build_tiny_model("llama", vocab_size=len(tok))
    model.config.max_position_embeddings = 1024
    attention.enable(model, "anchors")
    return LoadedModel(name="tiny", model=model, tokenizer=tok, identity={"kind": "test", "name": "tiny"},
                       **model_facts(model, tok))


DEMOS = [Example("a fine film", 1), Example("a dull film", 0)]


def test_prompts_from_another_models_tokenizer_are_refused(toks, tiny_lm):
    """Was: prompts tokenised by Qwen ran through a model with another vocabulary, silently."""
    from helpers.experiments.extraction import label_attention
    from helpers.experiments.isolation import run_isolation
    from helpers.core.saliency import saliency_flow

    task = get_task("sst2")
    ours = [build_prompt(task, DEMOS, Example("so so", 0), tiny_lm.tokenizer)]
    other = [build_prompt(task, DEMOS, Example("so so", 0), toks["qwen2.5-coder-0.5b"])]
    check_prompts(tiny_lm, ours, task)
    for run in (lambda p: saliency_flow(tiny_lm, task, p, progress=False),
                lambda p: label_attention(tiny_lm, task, p, progress=False),
                lambda p: run_isolation(tiny_lm, task, p, ks=(1,), progress=False)):
        with pytest.raises(ValueError, match="another tokenizer than 'tiny'"):
            run(other)
    with pytest.raises(ValueError, match="different tokenizers"):
        collate(ours + other, 0)
    assert len(label_attention(tiny_lm, task, ours, progress=False)["pred"]) == 1  # the right ones run


def test_empty_prompt_list(tiny_lm):
    """Was: an empty list failed deep inside numpy (np.stack / concatenate of nothing)."""
    from helpers.experiments.extraction import label_attention
    from helpers.experiments.isolation import run_isolation
    from helpers.core.saliency import saliency_flow

    task = get_task("sst2")
    for run in (saliency_flow, label_attention, lambda lm, t, p, **kw: run_isolation(lm, t, p, ks=(1,), **kw)):
        with pytest.raises(ValueError, match="no prompts"):
            run(tiny_lm, task, [], progress=False)


@pytest.mark.parametrize("label", [-1, 2])
def test_query_label_out_of_range(tiny_lm, label):
    """Was: a query label of 2 in SST-2 was accepted (and indexed the wrong class in the loss)."""
    with pytest.raises(ValueError, match=f"query label {label} outside 0..1 for sst2"):
        build_prompt("sst2", DEMOS, Example("so so", label), tiny_lm.tokenizer)
    good = build_prompt("sst2", DEMOS, Example("so so", 1), tiny_lm.tokenizer)
    bad = SimpleNamespace(**{**good.__dict__, "label": label})
    with pytest.raises(ValueError, match=f"query labels \\[{label}\\]"):
        check_prompts(tiny_lm, [bad], get_task("sst2"))


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def test_load_task_none():
    """Was: AttributeError: 'NoneType' object has no attribute 'lower'."""
    with pytest.raises(TypeError, match="a task is a name \\(sst2, trec, agnews, emoc\\) or a Task, not None"):
        load_task(None)


def test_labels_json_in_another_order(tmp_path):
    """Was: accepted; every label then meant the other class."""
    _write_task(tmp_path, "sst2", ["positive", "negative"], [("x", 0), ("z", 1)], [("y", 1)])
    with pytest.raises(ValueError, match="the same classes in another order.*\\['negative', 'positive'\\]"):
        load_task("sst2", tmp_path)
    _write_task(tmp_path, "sst2", ["bad", "good"], [("x", 0), ("z", 1)], [("y", 1)])
    with pytest.raises(ValueError, match="other class names"):
        load_task("sst2", tmp_path)
    _write_task(tmp_path, "sst2", ["Negative", "Positive"], [("x", 0), ("z", 1)], [("y", 1)])  # the label words
    assert load_task("sst2", tmp_path).task.name == "sst2"


def test_the_shared_data_label_files_pass(data_dir):
    for name in TASKS:
        assert load_task(name, data_dir).task.name == name


@pytest.mark.parametrize(
    "lines,lineno,message",
    [
        (['{"text": "a", "label": 0}', "", '{"text": "b", "label": 1', '{"text": "c", "label": 0}'], 3,
         "not valid JSON"),
        (['{"text": "a", "label": 0}', '{"label": 1}'], 2, "expected an object with 'text' and 'label'"),
        (['{"text": "a", "label": "positive"}'], 1, "the label must be an integer"),
        (['{"text": "a", "label": 0}', '{"text": "a", "label": 0.5}'], 2, "the label must be an integer"),
        (['{"text": 3, "label": 0}'], 1, "the text must be a string"),
    ],
)
def test_malformed_jsonl_names_the_file_and_line(tmp_path, lines, lineno, message):
    """Was: a bare JSONDecodeError with no file name (and a line number within the line)."""
    folder = _write_task(tmp_path, "sst2", SST2, [("x", 0), ("z", 1)], [("y", 1)])
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"{folder / 'train.jsonl'}, line {lineno}: {message}"):
        load_task("sst2", tmp_path)


def test_data_edited_in_the_same_process_are_reloaded(tmp_path):
    """Was: an lru_cache keyed on the folder returned the old examples."""
    folder = _write_task(tmp_path, "sst2", SST2, [("x", 0), ("z", 1)], [("y", 1)])
    before = load_task("sst2", tmp_path)
    assert load_task("sst2", tmp_path) is before  # cached while unchanged
    (folder / "test.jsonl").write_text(json.dumps({"text": "new", "label": 0}) + "\n")
    after = load_task("sst2", tmp_path)
    assert after.test == (Example("new", 0),)
    assert after.fingerprint != before.fingerprint


def test_empty_split(tmp_path):
    folder = _write_task(tmp_path, "sst2", SST2, [("x", 0)], [("y", 1)])
    (folder / "test.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="test.jsonl has no examples"):
        load_task("sst2", tmp_path)


def test_default_data_dir_rule(monkeypatch, tmp_path):
    """One rule in code: ANCHORS_DATA (``hub`` = the hub), else ../shared/data beside a checkout, else the hub."""
    from helpers.core import tasks

    monkeypatch.setenv("ANCHORS_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path.resolve()
    monkeypatch.setenv("ANCHORS_DATA", "hub")
    assert default_data_dir() is None
    monkeypatch.delenv("ANCHORS_DATA")
    repo = tmp_path / "work" / "repo"
    repo.mkdir(parents=True)
    (repo / "pyproject.toml").write_text("")
    monkeypatch.setattr(tasks, "_REPO_ROOT", repo)
    assert default_data_dir() is None, "no ../shared/data: the hub"
    (tmp_path / "work" / "shared" / "data").mkdir(parents=True)
    assert default_data_dir() == (tmp_path / "work" / "shared" / "data").resolve()
    (repo / "pyproject.toml").unlink()  # an installed package (site-packages): never a sibling folder
    assert default_data_dir() is None


def test_default_data_dir_is_used_by_load_task(monkeypatch, tmp_path):
    _write_task(tmp_path, "sst2", SST2, [("x", 0), ("z", 1)], [("y", 1)])
    monkeypatch.setenv("ANCHORS_DATA", str(tmp_path))
    assert load_task("sst2").source == str(tmp_path.resolve() / "sst2")


# --------------------------------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_folder(toks, tmp_path_factory):
    def save(family, scale=1.0):
        tok = toks["smollm2-135m"]
        folder = tmp_path_factory.mktemp(f"{family}-{scale}")
        model = build_tiny_model(family, vocab_size=len(tok))
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        return folder

    return save


def test_gemma_in_float16_is_refused(saved_folder):
    """Was: Gemma 3 in float16 gave all-NaN saliency and logits, silently (measured on gemma-3-270m: 100% NaN)."""
    from helpers import load_model

    with pytest.raises(ValueError, match="overflows in float16.*bfloat16 or torch.float32"):
        load_model(str(saved_folder("gemma3")), dtype=torch.float16)
    assert load_model(str(saved_folder("gemma3")), dtype="bfloat16").dtype == torch.bfloat16


def test_float16_overflow_is_detected_on_load(saved_folder):
    from helpers import load_model

    assert load_model(str(saved_folder("llama")), dtype=torch.float16).dtype == torch.float16  # works: accepted
    with pytest.raises(ValueError, match="non-finite logits in float16.*bfloat16"):
        load_model(str(saved_folder("llama", scale=1e4)), dtype=torch.float16)
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(saved_folder("llama")), dtype="float17")


def test_non_finite_logits_are_caught_once_per_batch(tiny_lm):
    prompts = [build_prompt("sst2", DEMOS, Example("so so", 0), tiny_lm.tokenizer)] * 2
    batch = collate(prompts, tiny_lm.tokenizer.pad_token_id)
    assert torch.isfinite(target_logits(tiny_lm.model, batch)).all()
    weight = tiny_lm.model.get_output_embeddings().weight
    saved = weight[0].clone()
    try:
        with torch.no_grad():
            weight[0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match="non-finite logits for examples \\[0, 1\\]"):
            target_logits(tiny_lm.model, batch)
    finally:
        with torch.no_grad():
            weight[0] = saved


# --------------------------------------------------------------------------------------------------------------------
# Killed runs and conversions
# --------------------------------------------------------------------------------------------------------------------


def _age(path, seconds):
    past = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (past, past), follow_symlinks=False)


def test_killed_conversions_are_cleaned_on_the_next_run(tmp_path, monkeypatch):
    """Was: a killed conversion left a 242 MB temporary folder in the models cache forever."""
    root = tmp_path / "models"
    stale_ours = root / ".tmp-convert-abc123"
    stale_legacy = root / "tmpc503teg7"
    running = root / ".tmp-convert-running"
    unrelated = root / "tmpnotours"  # not one of ours (no gguf folder inside)
    for d in (stale_ours, stale_legacy, running):
        (d / "gguf").mkdir(parents=True)
        (d / "gguf" / "model.gguf").write_bytes(b"x" * 100)
    unrelated.mkdir()
    _age(stale_ours, 2 * models.STALE_CONVERSION_SECONDS)
    _age(stale_legacy, 2 * models.STALE_CONVERSION_SECONDS)
    _age(unrelated, 2 * models.STALE_CONVERSION_SECONDS)
    monkeypatch.setattr(models, "cache_dir", lambda: root)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a, **k: None)  # package missing
    with pytest.warns(UserWarning, match="killed model conversions"), pytest.raises(ModuleNotFoundError):
        models.load_model("smollm2-135m")
    assert not stale_ours.exists() and not stale_legacy.exists()
    assert running.exists() and unrelated.exists()


def test_conversions_use_the_cleanable_prefix(monkeypatch, tmp_path):
    """A conversion's temporary folder starts with CONVERSION_PREFIX (so a killed one can be recognised)."""
    seen = []

    class Boom(Exception):
        pass

    def write(target):
        seen.append(target.parent.parent.name)
        raise Boom

    entry = models.OfflineModel("x", "", ("x",), "os", write)
    monkeypatch.setattr(models, "cache_dir", lambda: tmp_path)
    with pytest.raises(Boom):
        models._offline_folder(entry, progress=False)
    assert seen[0].startswith(models.CONVERSION_PREFIX)
    assert not list(tmp_path.iterdir()), "a failed conversion leaves its temporary folder"


# --------------------------------------------------------------------------------------------------------------------
# Strict mode
# --------------------------------------------------------------------------------------------------------------------


def test_strict_mode_fails_instead_of_skipping(monkeypatch):
    import conftest

    monkeypatch.setattr(conftest, "STRICT", True)
    with pytest.raises(pytest.fail.Exception, match="strict mode"):
        conftest.unavailable("no data")
    monkeypatch.setattr(conftest, "STRICT", False)
    with pytest.raises(pytest.skip.Exception):
        conftest.unavailable("no data")


def test_strict_mode_follows_the_environment(tmp_path):
    """CI=1 or ANCHORS_STRICT=1 turns a missing data folder into a failure (the real conftest, in a subprocess)."""
    import subprocess
    import sys

    test = tmp_path / "test_probe.py"
    test.write_text("def test_needs_data(data_dir):\n    pass\n")
    conftest = os.path.join(os.path.dirname(__file__), "conftest.py")
    (tmp_path / "conftest.py").write_text(open(conftest).read())
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "ANCHORS_STRICT")}
    base["ANCHORS_DATA"] = str(tmp_path / "nowhere")
    results = {}
    for name, extra in {"plain": {}, "ci": {"CI": "true"}, "strict": {"ANCHORS_STRICT": "1"}}.items():
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                           cwd=tmp_path, env={**base, **extra}, capture_output=True, text=True)
        results[name] = (r.returncode, r.stdout.strip().splitlines()[-1])
    assert results["plain"][0] == 0 and "1 skipped" in results["plain"][1], results
    for name in ("ci", "strict"):
        assert results[name][0] == 1 and "1 error" in results[name][1], results  # a failed fixture: an error
