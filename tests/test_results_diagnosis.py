"""The committed diagnosis results are what the code computes (slow: real models).

Per committed (model, task, seed 42) result: recompute the first batch of prompts and compare the label
probabilities, predictions and the label-word keys of every layer. For Gemma on TREC (the paper's Figure 6), recompute
the whole run (500 prompts, a few minutes on a CPU) and compare the PCA-based quantities too.
"""

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SEED = 42
COMMITTED = Path(__file__).resolve().parents[1] / "results" / "diagnosis"
# Every committed (model, task) with a seed-42 result: each is re-checked below.
CASES = sorted({(i["model"]["name"], i["task"]) for i in (json.loads(p.read_text()) for p in COMMITTED.glob("*.json"))
                if i["settings"].get("seed") == SEED})


def _committed(model, data):
    from helpers.experiments.diagnosis import M_MAX, n_test_of
    from helpers.core.runs import PROFILES, ModelKey, cached_run, settings_of

    profile = PROFILES["book"]
    n = n_test_of(profile)
    settings = settings_of(profile, seed=SEED, shots=1, n_test=n, m_max=M_MAX)
    result = cached_run("diagnosis", ModelKey.of(model), data, settings, None, directory=COMMITTED.parent)
    assert result is not None, f"committed diagnosis result for {model} / {data.task.name} is stale (key changed)"
    return result, n


_MODELS = {}


@pytest.mark.parametrize("model,task", CASES)
def test_diagnosis_slice(model, task, data_dir):
    from helpers import load_model, load_task
    from helpers.experiments.diagnosis import record_qk
    from helpers.core.runs import make_prompts

    lm = _MODELS.get(model) or _MODELS.setdefault(model, load_model(model))
    data = load_task(task, data_dir)
    committed, n = _committed(model, data)
    prompts = make_prompts(lm, data, SEED, n, 1)[:8]
    fresh = record_qk(lm, data.task, prompts, batch_size=8, progress=False)
    np.testing.assert_allclose(fresh["probs"], committed["probs"][:8], atol=1e-4)
    np.testing.assert_array_equal(fresh["pred"], committed["pred"][:8])
    np.testing.assert_array_equal(fresh["gold"], committed["gold"][:8])
    keys = fresh["keys"].reshape(committed["keys"].shape)
    np.testing.assert_allclose(keys, committed["keys"], atol=1e-4 * np.abs(committed["keys"]).max())


def test_diagnosis_full_trec_gemma(data_dir):
    from helpers import load_model, load_task
    from helpers.experiments.diagnosis import diagnose, predicted_confusion
    from helpers.core.runs import make_prompts

    data = load_task("trec", data_dir)
    committed, n = _committed("gemma-3-270m", data)
    lm = _MODELS.get("gemma-3-270m") or load_model("gemma-3-270m")
    fresh = diagnose(lm, data.task, make_prompts(lm, data, SEED, n, 1), progress=False)
    for key in ["probs", "sigma", "explained", "class_query_dist", "embedding_dist"]:
        np.testing.assert_allclose(fresh[key], committed[key], rtol=1e-3, atol=1e-5, err_msg=key)
    for layer in range(lm.n_layers):  # principal directions have arbitrary signs: compare sign-free quantities
        np.testing.assert_allclose(predicted_confusion(fresh["khat"][layer, :, :10]),
                                   predicted_confusion(committed["khat"][layer, :, :10]), atol=1e-3)
