"""The committed results of the tuning chapter: a recomputed slice equals the committed files (slow: a real model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.core.tasks import load_task


@pytest.mark.slow
def test_committed_tuning_slice(data_dir):
    from helpers import load_model
    from helpers.experiments import tuning as tu
    from helpers.experiments.reweighting import evaluate, seed_setup

    lm = load_model("gemma-3-270m")
    data = load_task("sst2", data_dir)
    config = tu.SIZES["book"]

    def committed(method):
        found = tu.tuning_run(lm, data, config, 42, method, lookup_only=True)
        assert found is not None, f"committed {method} results missing or stale (settings/version changed?)"
        return found

    s = seed_setup(lm, data, 42, config.n_test, config.train)
    icl = committed("icl-1")
    np.testing.assert_array_equal(icl["test_index"], s.test)
    np.testing.assert_allclose(evaluate(lm, data.task, s.test_prompts[:8], progress=False), icl["logits"][:8],
                               rtol=1e-4, atol=1e-4)
    # a trained prefix and a PEZ prompt, re-evaluated from their committed parameters
    prefix = committed("prefix-4")
    kv = [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in zip(prefix["keys"], prefix["values"])]
    np.testing.assert_allclose(tu.evaluate_prefix(lm, data.task, s.test_prompts[:8], kv), prefix["logits"][:8],
                               rtol=1e-4, atol=1e-4)
    pez = committed("pez-8")
    hard = tu._embed(lm.model, [int(i) for i in pez["ids"]])
    np.testing.assert_allclose(tu.evaluate_soft(lm, data.task, s.test_prompts[:8], hard), pez["logits"][:8],
                               rtol=1e-4, atol=1e-4)
    # the first-layer theorem check, recomputed on two prompts
    report = tu.attention_report(lm, s.test_prompts[:2], "prefix-4", prefix, 2)
    assert report["maxdiff"][:, 0].max() < 1e-5
    np.testing.assert_allclose(report["tv"], prefix["att_tv"][:2], atol=1e-4)
    # retrain the smallest prefix from scratch at the rate the committed run was trained at (its kind's held-out
    # search; SST-2: 8 examples x 10 epochs) and compare
    small = committed("prefix-1")
    lr = tu.method_lr(lm, data, config, "prefix-1", lookup_only=True)
    assert lr is not None, "the committed learning-rate search of prefix-tuning is missing"
    again = tu.train_method(lm, data.task, s.train_prompts, "prefix-1", 42, config, lr)
    np.testing.assert_allclose(again["epoch_loss"], small["epoch_loss"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(again["keys"], small["keys"], rtol=1e-2, atol=1e-3)
