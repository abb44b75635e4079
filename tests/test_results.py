"""The committed `book`-profile results are what the code computes: recompute a small slice from scratch."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"


@pytest.fixture(scope="module")
def lm():
    from helpers import load_model

    return load_model(MODEL)


@pytest.fixture(scope="module")
def sst2(data_dir):
    from helpers import load_task

    return load_task("sst2", data_dir)


def _committed(experiment, task, settings):
    from helpers.runs import load_result, result_path

    path = result_path(experiment, MODEL, task, settings)
    assert path.exists(), f"committed results missing or stale (settings/version changed?): {path}"
    return load_result(path)


def test_saliency_slice(lm, sst2):
    from helpers.runs import PROFILES, make_prompts, settings_of
    from helpers.saliency import saliency_flow

    profile = PROFILES["book"]
    committed = _committed("saliency", "sst2", settings_of(profile, seed=42, shots=1))["flows"]
    prompts = make_prompts(lm, sst2, 42, profile.n_test, 1, per_example=True)[:2]
    fresh = saliency_flow(lm, sst2.task, prompts, batch_size=2, progress=False)
    np.testing.assert_allclose(fresh, committed[:2], rtol=1e-3, atol=1e-9)


def test_isolation_slice(lm, sst2):
    from helpers.aggregation import KS, RANDOM_KS
    from helpers.isolation import run_isolation
    from helpers.runs import PROFILES, make_prompts, settings_of

    profile = PROFILES["book"]
    n = profile.n_test_isolation
    committed = _committed("isolation", "sst2", settings_of(profile, seed=42, shots=1, ks=list(KS),
                                                           random_ks=list(RANDOM_KS), n_test=n))
    prompts = make_prompts(lm, sst2, 42, n, 1)[: profile.batch_size]
    fresh = run_isolation(lm, sst2.task, prompts, ks=(5,), seed=42, batch_size=profile.batch_size, progress=False)
    for key in ["none/pred", "label-first-5/pred", "random-first-5/pred", "label-last-5/pred", "none/top",
                "label-first-5/top"]:
        np.testing.assert_array_equal(fresh[key], committed[key][: len(prompts)], err_msg=key)


def test_extraction_slice(lm, sst2):
    from helpers.extraction import label_attention
    from helpers.runs import PROFILES, make_prompts, settings_of

    profile = PROFILES["book"]
    n = profile.n_test_extraction
    committed = _committed("extraction", "sst2", settings_of(profile, seed=42, shots=1, n_test=n))
    prompts = make_prompts(lm, sst2, 42, n, 1)[: profile.batch_size]
    fresh = label_attention(lm, sst2.task, prompts, batch_size=profile.batch_size, progress=False)
    np.testing.assert_allclose(fresh["attention"], committed["attention"][: len(prompts)], atol=1e-5)
    np.testing.assert_array_equal(fresh["pred"], committed["pred"][: len(prompts)])
