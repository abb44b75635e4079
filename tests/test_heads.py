"""The per-head measures (helpers.experiments.heads): induction scores against the model's own attentions, per-head
saliency against the paper's S_pq, the one-head cut over a cache against full passes, the overlap statistics and
their permutation baseline, and the verdict rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.core.findings import NOT_REPRODUCED, PARTLY, REPRODUCED, Measured
from helpers.core.prompts import collate, label_token_ids, target_label_logits
from helpers.core.attention import intervene
from helpers.core.runs import make_prompts
from helpers.core.saliency import saliency_flow
from helpers.core.stats import mean_estimate
from helpers.core.tasks import load_task
from helpers.experiments import heads as hd


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def lm(request, offline_tokenizers):
    from conftest import tiny_loaded_model

    tok = offline_tokenizers["gemma-3-270m" if request.param == "gemma3" else "smollm2-135m"]
    return tiny_loaded_model(request.param, tok, f"tiny-{request.param}")


def test_repeated_random_tokens(lm):
    ids = hd.repeated_random_tokens(lm.tokenizer, 3, 10, seed=1)
    offset = ids.shape[1] - 20
    assert ids.shape == (3, 20 + offset) and offset == int(lm.adds_bos)
    for row in ids.tolist():
        first, second = row[offset:offset + 10], row[offset + 10:]
        assert first == second and len(set(first)) == 10
        assert not set(first) & set(lm.tokenizer.all_special_ids)
    assert torch.equal(ids, hd.repeated_random_tokens(lm.tokenizer, 3, 10, seed=1))
    assert not torch.equal(ids, hd.repeated_random_tokens(lm.tokenizer, 3, 10, seed=2))
    with pytest.raises(ValueError, match="at least 2"):
        hd.repeated_random_tokens(lm.tokenizer, 1, 1, seed=0)


def test_induction_scores_read_the_models_own_attentions(lm):
    ids = hd.repeated_random_tokens(lm.tokenizer, 2, 6, seed=0)
    scores = hd.induction_scores(lm.model, ids)
    assert scores.shape == (lm.n_layers, lm.n_heads)
    with torch.no_grad():
        att = lm.model(input_ids=ids, output_attentions=True).attentions  # (B, H, T, T) per layer
    off = ids.shape[1] - 12
    expected = np.array([[np.mean([float(a[b, h, off + 6 + j, off + j + 1]) for b in range(2) for j in range(6)])
                          for h in range(lm.n_heads)] for a in att])
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="same T"):
        hd.induction_scores(lm.model, torch.arange(13)[None])


def test_head_saliency_sums_to_the_papers_s_pq(lm, data_dir):
    data = load_task("sst2", data_dir)
    prompts = make_prompts(lm, data, 42, 3, per_example=False)
    per_head = hd.head_saliency(lm, data.task, prompts, batch_size=2)
    assert per_head.shape == (3, lm.n_layers, lm.n_heads, len(prompts[0].label_positions))
    paper = saliency_flow(lm, data.task, prompts, batch_size=1, progress=False)[:, 1]  # (N, L): S_pq
    np.testing.assert_allclose(np.abs(per_head.sum(2)).mean(-1), paper, rtol=1e-4, atol=1e-9)
    # per head the absolute value comes first: at least the head-summed value, larger where heads cancel
    assert (np.abs(per_head).sum(2).mean(-1) >= paper * (1 - 1e-5)).all()


def test_a_cut_over_the_cache_equals_a_full_pass_with_the_cut(lm, data_dir):
    data = load_task("sst2", data_dir)
    prompts = make_prompts(lm, data, 42, 3, per_example=False)
    layer = 1  # full attention in every tiny model (the tiny Gemma's layers 0 and 2 see a window of 4 tokens)
    out = hd.head_isolation(lm, data.task, prompts, [0, layer], batch_size=2)
    assert out["cut"].shape == (3, 2, lm.n_heads, 2) and out["base"].shape == (3, 2)
    label_ids = list(label_token_ids(data.task, lm.tokenizer))
    for i, p in enumerate(prompts):  # one prompt per pass: its last row is its target
        cols = [[j for s, e in p.label_spans for j in range(s, e)]]
        batch = collate([p], lm.tokenizer.pad_token_id)
        with torch.no_grad():
            plain = target_label_logits(lm.model, batch, label_ids)
            with intervene(hd.CutHead(layer, 1, cols)):
                full = target_label_logits(lm.model, batch, label_ids)
        np.testing.assert_allclose(out["base"][i], plain[0].numpy(), atol=1e-4)
        np.testing.assert_allclose(out["cut"][i, 1, 1], full[0].numpy(), atol=1e-4)
    assert np.abs(out["cut"][:, 1] - out["base"][:, None]).max() > 1e-5  # a cut does something
    with pytest.raises(ValueError, match="heads"):
        with intervene(hd.CutHead(0, lm.n_heads, [[1]])):
            target_label_logits(lm.model, collate(prompts[:1], lm.tokenizer.pad_token_id), label_ids)


def test_one_run_and_its_maps(lm, data_dir):
    data = load_task("sst2", data_dir)
    run = hd.head_run(lm, data, 42, n_test=2, n_sequences=2, length=8, batch_size=2)
    assert run["induction"].shape == (lm.n_layers, lm.n_heads)
    for m in hd.MEASURES:
        x = hd.per_example(run, m)
        assert x.shape[1:] == (lm.n_layers, lm.n_heads) and np.isfinite(x).all()
    runs = {"sst2": [run, run]}
    np.testing.assert_allclose(hd.head_map(runs, "saliency"), hd.per_example(run, "saliency").mean(0))
    with pytest.raises(ValueError, match="measure"):
        hd.per_example(run, "heat")


def test_isolation_effect_is_the_fall_in_the_predictions_log_probability():
    base = np.log(np.array([[0.8, 0.2]]))
    cut = np.log(np.array([[0.5, 0.5], [0.8, 0.2]]))[None, :, None]  # (1, L=2, H=1, 2)
    effect = hd.per_example({"isolation/base": base, "isolation/cut": cut}, "isolation")
    np.testing.assert_allclose(effect[0, :, 0], [np.log(0.8 / 0.5), 0.0], atol=1e-12)


def test_overlap_and_its_permutation_baseline():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 5))
    same = hd.overlap(a, a, k=5, n_permutations=2000)
    assert same["spearman"] == pytest.approx(1) and same["top_k"] == 5 and same["top_k_p"] < 0.01
    assert same["top_k_null"] == pytest.approx(25 / 30, abs=0.15)  # k^2 / heads expected by chance
    flipped = hd.overlap(a, -a, k=5, n_permutations=2000)
    assert flipped["spearman"] == pytest.approx(-1) and flipped["top_k"] == 0 and flipped["spearman_p"] > 0.99
    noise = hd.overlap(a, rng.normal(size=(6, 5)), k=5, n_permutations=2000)
    assert noise["spearman_p"] > 0.01 or abs(noise["spearman"]) > 0.4
    assert hd.top_k(np.array([[1, 3], [2, 0]]), 2) == {1, 2}
    with pytest.raises(ValueError, match="same heads"):
        hd.overlap(a, a[:3], k=2)
    with pytest.raises(ValueError, match="k must"):
        hd.overlap(a, a, k=31)


def _measured(values: list, top_k: float, null_95: float) -> Measured:
    est = mean_estimate([np.array(v, dtype=float) for v in values])
    return Measured(est, support={"overlap": {"top_k": top_k, "top_k_null_95": null_95}})


def test_the_rule_needs_the_interval_and_the_baseline():
    high = [[0.5, 0.6, 0.4, 0.55]] * 3
    assert hd.agree(_measured(high, 5, 2)) == REPRODUCED
    assert hd.agree(_measured(high, 2, 2)) == PARTLY  # correlated, but the top heads no more shared than by chance
    around_zero = [[0.3, -0.3, 0.2, -0.25]] * 3
    assert hd.agree(_measured(around_zero, 5, 2)) == PARTLY
    assert hd.agree(_measured(around_zero, 1, 2)) == NOT_REPRODUCED
    assert hd.agree(_measured([[0.01, 0.02, 0.015, 0.012]] * 3, 2, 2)) == PARTLY  # a tiny positive point is not enough


# --------------------------------------------------------------------------------------------------------------------
# Committed book-profile results: a recomputed slice equals the committed one (slow: a real model)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_committed_heads_slice(offline_model, data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("ANCHORS_RESULTS", str(tmp_path / "empty-user-cache"))
    lm = offline_model("gemma-3-270m")
    data = load_task("sst2", data_dir)
    config = hd.configure("book")
    committed = hd.head_runs(lm, data, config, [42], lookup_only=True)[0]
    assert committed is not None, "committed heads results missing or stale (settings/version changed?)"
    ids = hd.repeated_random_tokens(lm.tokenizer, config.n_sequences, config.length, 42 * 10 + 0)
    np.testing.assert_allclose(hd.induction_scores(lm.model, ids), committed["induction"], rtol=1e-4, atol=1e-6)
    prompts = make_prompts(lm, data, 42, config.n_test, 1, per_example=False)[:2]
    np.testing.assert_allclose(hd.head_saliency(lm, data.task, prompts, 2), committed["saliency"][:2],
                               rtol=1e-3, atol=1e-7)
    layer = 11
    iso = hd.head_isolation(lm, data.task, prompts, [layer], batch_size=2)
    np.testing.assert_allclose(iso["base"], committed["isolation/base"][:2], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(iso["cut"][:, 0], committed["isolation/cut"][:2, layer], rtol=1e-4, atol=1e-4)
