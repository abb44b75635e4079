"""The committed diagnosis results are what the code computes (slow: real models).

Per committed (model, task, seed 42) result: recompute the first batch of prompts and compare the label
probabilities, predictions and the label-word keys of every layer. For Gemma on TREC (the paper's Figure 6), recompute
the whole run (500 prompts, a few minutes on a CPU) and compare the PCA-based quantities too.
"""

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SEED = 42


def _committed(model, task):
    from helpers.diagnosis import M_MAX, n_test_of
    from helpers.runs import PROFILES, load_result, result_path, settings_of

    profile = PROFILES["book"]
    n = n_test_of(profile)
    path = result_path("diagnosis", model, task, settings_of(profile, seed=SEED, shots=1, n_test=n, m_max=M_MAX))
    if not path.exists():
        pytest.skip(f"no committed diagnosis result for {model} / {task} (not computed yet): {path}")
    return load_result(path), n


@pytest.fixture(scope="module", params=["gemma-3-270m", "qwen2.5-coder-0.5b"])
def lm(request):
    from helpers import load_model

    return load_model(request.param)


@pytest.mark.parametrize("task", ["trec", "agnews", "emoc"])
def test_diagnosis_slice(lm, task, data_dir):
    from helpers import load_task
    from helpers.diagnosis import record_qk
    from helpers.runs import make_prompts

    committed, n = _committed(lm.name, task)
    data = load_task(task, data_dir)
    prompts = make_prompts(lm, data, SEED, n, 1)[:8]
    fresh = record_qk(lm, data.task, prompts, batch_size=8, progress=False)
    np.testing.assert_allclose(fresh["probs"], committed["probs"][:8], atol=1e-4)
    np.testing.assert_array_equal(fresh["pred"], committed["pred"][:8])
    np.testing.assert_array_equal(fresh["gold"], committed["gold"][:8])
    keys = fresh["keys"].reshape(committed["keys"].shape)
    np.testing.assert_allclose(keys, committed["keys"], atol=1e-4 * np.abs(committed["keys"]).max())


def test_diagnosis_full_trec_gemma(data_dir):
    from helpers import load_model, load_task
    from helpers.diagnosis import diagnose, predicted_confusion
    from helpers.runs import make_prompts

    committed, n = _committed("gemma-3-270m", "trec")
    lm = load_model("gemma-3-270m")
    data = load_task("trec", data_dir)
    fresh = diagnose(lm, data.task, make_prompts(lm, data, SEED, n, 1), progress=False)
    for key in ["probs", "sigma", "explained", "class_query_dist", "embedding_dist"]:
        np.testing.assert_allclose(fresh[key], committed[key], rtol=1e-3, atol=1e-5, err_msg=key)
    for layer in range(lm.n_layers):  # principal directions have arbitrary signs: compare sign-free quantities
        np.testing.assert_allclose(predicted_confusion(fresh["khat"][layer, :, :10]),
                                   predicted_confusion(committed["khat"][layer, :, :10]), atol=1e-3)
