"""Task vectors vs the label words' states (helpers.experiments.taskvectors): the prompts, the split last-token
path against full patched passes, one run on a tiny model, and the layer choice on held-out examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.core.patching import Write, patch
from helpers.core.prompts import label_token_ids
from helpers.core.runs import make_prompts
from helpers.core.tasks import load_task, sample_fixed_demonstrations, subsample_test
from helpers.experiments import taskvectors as tv


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def lm(request, offline_tokenizers):
    from conftest import tiny_loaded_model

    tok = offline_tokenizers["gemma-3-270m" if request.param == "gemma3" else "smollm2-135m"]
    return tiny_loaded_model(request.param, tok, f"tiny-{request.param}")


def test_other_task_cycles_the_four():
    assert [tv.other_task(t) for t in ("sst2", "trec", "agnews", "emoc")] == ["trec", "agnews", "emoc", "sst2"]
    with pytest.raises(ValueError, match="no control task"):
        tv.other_task("imdb")


def test_zero_shot_and_skeleton_prompts(lm, data_dir):
    data = load_task("sst2", data_dir)
    p = make_prompts(lm, data, 42, 2)[0]
    zero = tv.zero_shot_ids(p)
    added = [p.input_ids[i] for i in p.special_positions if i < p.query_start]
    assert list(zero) == added + list(p.input_ids[p.query_start:])
    query = data.test[subsample_test(data, 42, 2)[0]]
    assert list(zero) == lm.tokenizer(f"Review: {query.text}\nSentiment:").input_ids  # the query read alone
    demos = [data.train[j] for j in sample_fixed_demonstrations(data, 1, 42)[0]]
    skel = tv.skeleton_prompt(data.task, demos, query, lm.tokenizer)
    assert skel.text.startswith("Review: \nSentiment:") and skel.text.endswith(p.text[p.text.rindex("Review"):])
    ids = label_token_ids(data.task, lm.tokenizer)
    assert [skel.input_ids[i] for i in skel.label_positions] == [ids[d.label] for d in demos]
    assert p.text_positions[0][0] <= tv.text_token(p, 42) <= p.text_positions[-1][-1]


def test_split_last_equals_full_patched_passes(lm, data_dir):
    """The rows but the last token once, then the last token per step: equal to one full pass with both patches."""
    data = load_task("sst2", data_dir)
    prompts = make_prompts(lm, data, 42, 3)
    rows = [p.input_ids for p in prompts]
    label_ids = list(label_token_ids(data.task, lm.tokenizer))
    d = lm.model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    vec, lab = torch.randn(3, d, generator=g), torch.randn(3, 1, d, generator=g)
    where = prompts[0].label_positions[:1]
    before = lambda idx: [Write(1, [where] * len(idx), lab[idx])]  # noqa: E731
    steps = [lambda idx: [], lambda idx: [Write(1, [[0]] * len(idx), vec[idx])]]
    plain, patched = tv._split_last(lm, rows, label_ids, steps, 2, before)

    def full(with_last):
        def ops(idx, chunk):
            out = [Write(1, [where] * len(idx), lab[idx])]
            if with_last:
                out.append(Write(1, [[len(r) - 1] for r in chunk], vec[idx]))
            return out
        return tv._run(lm, rows, label_ids, 2, ops)

    assert (plain - full(False)).abs().max().item() < 1e-4
    assert (patched - full(True)).abs().max().item() < 1e-4
    assert (patched - plain).abs().max().item() > 1e-4  # the last-token patch does something


def test_one_run_on_a_tiny_model(lm, data_dir):
    data, other = load_task("sst2", data_dir), load_task("trec", data_dir)
    out = tv.task_vector_run(lm, data, other, 42, 4, [0, 2], batch_size=2, progress=False)
    assert out["tv/pred"].shape == (2, 4) and out["labels/logits"].shape == (2, 4, 2)
    assert out["icl/pred"].shape == out["zero/pred"].shape == out["skeleton/pred"].shape == (4,)
    assert out["check/split_max_diff"] < 1e-4
    for v in tv.VARIANTS:
        np.testing.assert_array_equal(out[f"{v}/logits"].argmax(-1), out[f"{v}/pred"])
    d = lm.model.config.hidden_size
    assert out["floats/tv"] == d and out["floats/labels"] == out["positions/n_label_tokens"] * d
    assert out["floats/both"] == out["floats/labels"] + d
    assert out["floats/anchor_cache"] < out["floats/full_cache"]
    # the task vector patched at the last layer replaces the final state: the prediction is the dummy's ICL one
    np.testing.assert_array_equal(out["tv/pred"][-1], out["icl/pred"][[1, 2, 3, 0]])


def _fake_run(seed: int, n: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 2, n)
    run = {"gold": gold, "layers": np.array([0, 2, 4]), "icl/pred": gold.copy()}
    for v in tv.BASELINES[1:]:
        run[f"{v}/pred"] = 1 - gold
    for v in tv.PATCHED:
        pred = np.stack([1 - gold, 1 - gold, 1 - gold])
        pred[1, 0::2] = gold[0::2]  # layer 2 is right on the even examples only
        pred[2, 1::2] = gold[1::2]  # layer 4 on the odd ones only
        run[f"{v}/pred"] = pred
    return run


def test_layer_chosen_on_even_examples_reported_on_odd():
    runs = {t: [_fake_run(s) for s in range(3)] for t in ("sst2", "trec")}
    assert tv.best_layer(runs, "tv") == 2
    assert tv.at_layer(runs["sst2"][0], "tv", 2).sum() == 0  # held-out: layer 2 is wrong on every odd example
    assert tv.at_layer(runs["sst2"][0], "tv", 4).mean() == 1
    table = tv.best_layer_table(runs)
    assert table["trec"]["tv"][0] == 2 and table["trec"]["tv"][1].value == 0
    assert table["trec"]["icl"] == (None, table["trec"]["icl"][1]) and table["trec"]["icl"][1].value == 100
    with pytest.raises(ValueError, match="was not run"):
        tv.at_layer(runs["sst2"][0], "tv", 3)
    with pytest.raises(ValueError, match="acc"):
        tv.metric(runs["sst2"][0], "tv", "word")


def _verdict_runs(tv_right, icl_right=True, n: int = 16) -> dict:
    """Runs of the four tasks, 3 seeds: zero-shot and the controls wrong everywhere, ICL right (or wrong), the task
    vector right where ``tv_right(seed, example)``."""
    runs = {}
    for t, task in enumerate(("sst2", "trec", "agnews", "emoc")):
        rows = []
        for s in range(3):
            gold = np.random.default_rng([t, s]).integers(0, 2, n)
            run = {"gold": gold, "layers": np.array([0, 2]), "icl/pred": gold if icl_right else 1 - gold}
            for v in tv.BASELINES[1:]:
                run[f"{v}/pred"] = 1 - gold
            for v in tv.PATCHED:
                run[f"{v}/pred"] = np.stack([1 - gold, 1 - gold])
            run["tv/pred"][1] = [g if tv_right(t, s, i) else 1 - g for i, g in enumerate(gold)]
            rows.append(run)
        runs[task] = rows
    return runs


def test_the_verdict_rules_bite(monkeypatch):
    from helpers.core.findings import NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED, judge
    from helpers.core.stats import pooled_over

    finding = next(f for f in tv.EXPERIMENT.findings if f.id == "task-vector-recovers")
    assert finding.needs_mapping and "95% interval" in tv.beats_both.__doc__

    def verdict(runs):
        monkeypatch.setattr(tv, "_all_runs", lambda model, profile: runs)
        with pooled_over(4):
            m = tv.tv_recovers("m", None)
        return judge(finding, m), m

    v, m = verdict(_verdict_runs(lambda t, s, i: True))
    assert v == REPRODUCED and m.chance == (50 + 100 / 6 + 25 + 25) / 4
    # ICL wrong everywhere: no working mapping to recover, whatever the task vector does
    assert verdict(_verdict_runs(lambda t, s, i: True, icl_right=False))[0] == NOT_TESTABLE
    # a positive point estimate from one query of one seed is not enough
    v, m = verdict(_verdict_runs(lambda t, s, i: t == 0 and s == 0 and i < 2))  # the layer chosen on query 0
    assert m.estimate.value > 0 and v == NOT_REPRODUCED


# --------------------------------------------------------------------------------------------------------------------
# Committed book-profile results: a recomputed slice equals the committed one (slow: a real model)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_committed_taskvectors_slice(offline_model, data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("ANCHORS_RESULTS", str(tmp_path / "empty-user-cache"))
    lm = offline_model("gemma-3-270m")
    data = load_task("sst2", data_dir)
    committed = tv.taskvector_runs(lm, data, tv.configure("book"), [42], lookup_only=True, progress=False)[0]
    assert committed is not None, "committed task-vector results missing or stale (settings/version changed?)"
    n = len(committed["gold"])
    prompts = make_prompts(lm, data, 42, n, 1, per_example=False)[:5]
    label_ids = list(label_token_ids(data.task, lm.tokenizer))
    icl_rows = [p.input_ids for p in prompts]
    np.testing.assert_allclose(tv._run(lm, icl_rows[:4], label_ids, 4), committed["icl/logits"][:4], atol=1e-3)
    zero_rows = [tv.zero_shot_ids(p) for p in prompts[:4]]
    np.testing.assert_allclose(tv._run(lm, zero_rows, label_ids, 4), committed["zero/logits"][:4], atol=1e-3)
    # the task vector at one layer: query i gets the state at q of query i + 1's ICL prompt (full passes here)
    where = 2
    layer = int(committed["layers"][where])
    from helpers.core.patching import Read

    read = Read(layer, [[p.target] for p in prompts[1:5]])
    tv._run(lm, icl_rows[1:5], label_ids, 4, lambda _i, _c: [read])
    fresh = tv._run(lm, zero_rows, label_ids, 4,
                    lambda _i, chunk: [Write(layer, [[len(r) - 1] for r in chunk], read.value)])
    np.testing.assert_allclose(fresh, committed["tv/logits"][where, :4], atol=1e-3)


def test_ahead_needs_the_side_ahead_to_work():
    """A difference between two patches that do nothing is not a reproduction: the task vector 12.5 [6.2, 19.5]
    points ahead of the label words' states, while neither beats its own baseline, was once "reproduced"."""
    from helpers.core.findings import Measured, NOT_REPRODUCED, NOT_TESTABLE, PARTLY, REPRODUCED
    from helpers.core.stats import Estimate

    def est(value, low, high, weak=None):
        weak = weak or ((low + value) / 2, (value + high) / 2)
        return Estimate(value, low, high, 64, 3, np.array([value] * 3), 0.95, weak[0], weak[1])

    def m(diff, tv_gain, labels_gain):
        return Measured(diff, support={"own gain": {"tv": tv_gain, "labels": labels_gain}})

    ahead_by = est(12.5, 6.2, 19.5)
    neither = m(ahead_by, est(3.6, -1.8, 8.9), est(-0.3, -2.9, 2.1))
    assert tv.ahead(neither) == NOT_TESTABLE
    assert "neither" in tv.comparison_reading(neither)
    assert tv.ahead(m(ahead_by, est(3.6, -1.8, 8.9), est(5.0, 1.0, 9.0))) == NOT_TESTABLE  # the side ahead fails
    assert tv.ahead(m(ahead_by, est(9.0, 4.0, 14.0), est(-0.3, -2.9, 2.1))) == REPRODUCED
    assert tv.ahead(m(est(3.0, -1.0, 7.0, weak=(0.5, 5.5)), est(9.0, 4.0, 14.0), est(0.0, -2.0, 2.0))) == PARTLY
    # the label words ahead of a task vector that fails: the claim is refuted, not untestable
    assert tv.ahead(m(est(-8.0, -12.0, -4.0), est(1.0, -2.0, 4.0), est(9.0, 5.0, 13.0))) == NOT_REPRODUCED
    assert tv.ahead(Measured(ahead_by)) == NOT_TESTABLE  # without each side's own gain the rule cannot check it
    assert "does not itself beat" in " ".join(tv.ahead.__doc__.split())


def test_the_comparison_row_reads_each_sides_gain(monkeypatch):
    from helpers.core.findings import NOT_TESTABLE, REPRODUCED, judge
    from helpers.core.stats import pooled_over

    finding = next(f for f in tv.EXPERIMENT.findings if f.id == "task-vector-vs-labels")

    def verdict(runs):
        monkeypatch.setattr(tv, "_all_runs", lambda model, profile: runs)
        with pooled_over(4):
            m = tv.tv_versus_labels("m", None)
        return judge(finding, m), m

    v, m = verdict(_verdict_runs(lambda t, s, i: True))  # the task vector right everywhere, zero-shot wrong
    assert v == REPRODUCED and m.support["own gain"]["tv"].low > 0
    # nothing right anywhere but ICL: the task vector is level with the label words, neither works
    v, m = verdict(_verdict_runs(lambda t, s, i: False))
    assert v == NOT_TESTABLE and "not testable: neither" in m.note
