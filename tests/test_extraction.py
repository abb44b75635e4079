"""Metrics of the extraction chapter: AUCROC_l, R_l, the stored layout, and the data they read."""

import numpy as np
import pytest
import torch

from helpers.experiments.extraction import LAYOUT, auc_per_layer, cumulative_contribution, label_attention, layer_passing


def test_auc_binary_perfect_and_inverted():
    pred = np.array([0, 0, 1, 1])
    att = np.zeros((4, 2, 2))
    att[:, 0, 1] = [0.1, 0.2, 0.8, 0.9]  # layer 0: attention on class 1 separates perfectly
    att[:, 1, 1] = [0.9, 0.8, 0.2, 0.1]  # layer 1: perfectly inverted
    np.testing.assert_allclose(auc_per_layer(att, pred), [1.0, 0.0])


def test_auc_binary_known_value():
    # scores of positives {0.4, 0.9}, negatives {0.5, 0.1}: 3 of 4 pairs ordered -> 0.75
    pred = np.array([1, 1, 0, 0])
    att = np.zeros((4, 1, 2))
    att[:, 0, 1] = [0.4, 0.9, 0.5, 0.1]
    assert auc_per_layer(att, pred)[0] == pytest.approx(0.75)


def test_auc_drops_never_predicted_classes_and_uses_second_remaining():
    # 3 classes, class 1 never predicted: binary AUC on the attention to class 2
    pred = np.array([0, 2, 0, 2])
    att = np.zeros((4, 1, 3))
    att[:, 0, 2] = [0.1, 0.9, 0.2, 0.8]
    att[:, 0, 1] = [0.9, 0.1, 0.9, 0.1]  # would invert the result if it were used
    assert auc_per_layer(att, pred)[0] == pytest.approx(1.0)


def test_auc_multiclass_ovo_macro_matches_sklearn_after_renormalisation():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, size=60)
    att = rng.random((60, 2, 3))
    att[np.arange(60), 1, pred] += 1.0  # layer 1 is informative
    auc = auc_per_layer(att, pred)
    expected = roc_auc_score(pred, att[:, 0] / att[:, 0].sum(1, keepdims=True), multi_class="ovo")
    assert auc[0] == pytest.approx(expected)
    assert auc[1] > 0.9 > auc[0]


def test_auc_undefined_with_one_predicted_class():
    assert np.isnan(auc_per_layer(np.ones((3, 4, 2)), np.zeros(3, dtype=int))).all()


def test_renormalised_binary_removes_a_shared_scale():
    pred = np.array([0, 1, 0, 1])
    att = np.zeros((4, 1, 2))
    att[:, 0, 0] = [0.2, 0.1, 0.02, 0.01]
    att[:, 0, 1] = [0.1, 0.2, 0.01, 0.02]  # examples 3-4: same ratio, 10x smaller (a bigger sink)
    assert auc_per_layer(att, pred)[0] < 1.0
    assert auc_per_layer(att, pred, renormalise_binary=True)[0] == pytest.approx(1.0)


def test_cumulative_contribution_definition():
    auc = np.array([0.5, 0.6, 0.9, 0.5])
    r = cumulative_contribution(auc)
    np.testing.assert_allclose(r, [0.0, 0.2, 1.0, 1.0])
    assert layer_passing(r) == 2
    assert layer_passing(np.array([0.1, 0.2])) is None


@pytest.fixture(scope="module")
def tiny_lm(offline_tokenizers):
    """A tiny random Llama with SmolLM2's real tokenizer, wrapped as load_model would return it."""
    from conftest import tiny_loaded_model

    return tiny_loaded_model("llama", offline_tokenizers["smollm2-135m"], "tiny-llama")


@pytest.fixture(scope="module")
def sst2_prompts(tiny_lm, data_dir):
    from helpers.core.runs import make_prompts
    from helpers.core.tasks import load_task

    data = load_task("sst2", data_dir)
    return data.task, make_prompts(tiny_lm, data, seed=42, n_test=3, shots_per_class=2)


def test_label_attention_layout_matches_recorded_attention(tiny_lm, sst2_prompts):
    lm, (task, prompts) = tiny_lm, sst2_prompts
    out = label_attention(lm, task, prompts, batch_size=2, progress=False)
    assert LAYOUT == ("example", "layer", "class")
    n, L, C = out["attention"].shape
    assert (n, L, C) == (len(prompts), lm.n_layers, 2)
    # independent reference: stock eager attention of the same model, one prompt at a time
    from helpers.core.attention import enable

    enable(lm.model, "eager")
    try:
        for i, p in enumerate(prompts):
            ids = torch.tensor([p.input_ids])
            with torch.no_grad():
                atts = lm.model(input_ids=ids, output_attentions=True).attentions
            for layer in range(L):
                row = atts[layer][0, :, p.target, :].sum(0)
                for c in range(C):
                    expected = float(row[list(p.positions_of_class(c))].sum())
                    assert out["attention"][i, layer, c] == pytest.approx(expected, abs=1e-5)
            assert out["first_token"][i, 0] == pytest.approx(float(atts[0][0, :, p.target, 0].sum()), abs=1e-5)
    finally:
        enable(lm.model, "anchors")
    assert out["probs"].shape == (len(prompts), 2)
    np.testing.assert_allclose(out["probs"].sum(1), 1, atol=1e-5)
    assert (out["pred"] == out["probs"].argmax(1)).all()


def test_attention_shares_average_over_examples_seeds_and_heads():
    from helpers.experiments.extraction import attention_shares

    a = {"first_token": np.array([[2.0, 4.0]]), "attention": np.array([[[0.5, 0.5], [1.0, 1.0]]])}
    b = {"first_token": np.array([[4.0, 0.0]]), "attention": np.array([[[1.5, 0.5], [0.0, 0.0]]])}
    sink, labels = attention_shares([a, b], n_heads=2)
    np.testing.assert_allclose(sink, [1.5, 1.0])
    np.testing.assert_allclose(labels, [0.75, 0.5])


@pytest.mark.parametrize("n_classes,renormalise", [(2, False), (2, True), (3, False), (4, False), (6, False)])
def test_weighted_auc_equals_auc_on_the_resampled_examples(n_classes, renormalise):
    from helpers.experiments.extraction import auc_per_layer_weighted
    from helpers.core.stats import resample_counts

    rng = np.random.default_rng(n_classes)
    n = 24
    pred = rng.integers(0, n_classes, n)
    pred[:2] = n_classes - 1  # a rare class: some resamples lose it, and the kept classes change
    pred[2:] = np.where(pred[2:] == n_classes - 1, 0, pred[2:])
    att = rng.random((n, 4, n_classes))
    att[:, 1, 0] += 0.5 * (pred == 0)
    att[:5, 2] = 0.3  # ties
    weights = resample_counts(n, 150, rng)
    fast = auc_per_layer_weighted(att, pred, weights, renormalise)
    slow = np.array([auc_per_layer(att[np.repeat(np.arange(n), w.astype(int))],
                                   pred[np.repeat(np.arange(n), w.astype(int))], renormalise) for w in weights])
    np.testing.assert_allclose(fast, slow, atol=1e-12)
    np.testing.assert_allclose(auc_per_layer_weighted(att, pred, np.ones((1, n)), renormalise)[0],
                               auc_per_layer(att, pred, renormalise), atol=1e-12)


def test_weighted_auc_is_nan_with_one_predicted_class():
    from helpers.experiments.extraction import auc_per_layer_weighted

    w = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    out = auc_per_layer_weighted(np.random.default_rng(0).random((3, 2, 2)), np.array([0, 0, 1]), w)
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


def test_auc_estimates_interval_contains_the_point_curve():
    from helpers.experiments.extraction import auc_curves, auc_estimates

    rng = np.random.default_rng(5)
    runs = []
    for _ in range(3):
        pred = rng.integers(0, 2, 30)
        att = rng.random((30, 6, 2))
        att[:, 3:, 1] += pred[:, None]  # deep layers informative
        runs.append({"attention": att, "pred": pred})
    auc, r = auc_estimates(runs, n_boot=200)
    mean, r_mean = auc_curves(runs)
    np.testing.assert_allclose(auc.value, mean)
    np.testing.assert_allclose(r.value, r_mean)
    assert np.all(auc.low <= auc.value + 1e-12) and np.all(auc.value <= auc.high + 1e-12)
    assert (auc.low[3:] > 0.8).all() and auc.n == "30 × 3"


def test_layer_estimates_give_the_point_layers_and_intervals_that_widen_with_noise():
    """The peak layer and the layer where R_l reaches 0.5 are those of the point curves; a sharp signal gives a point
    interval, a weak one a wider interval that still holds the point; 'never' is layer L + 1."""
    from helpers.core.stats import layer_text
    from helpers.experiments.extraction import auc_curves, layer_estimates, layer_passing

    def runs(strength, seed=5, layers=8):
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(3):
            pred = rng.integers(0, 2, 40)
            att = rng.random((40, layers, 2))
            att[:, 5, 1] += strength * pred  # layer 6 (1-based) is the most informative
            att[:, 6:, 1] += 0.5 * strength * pred[:, None]
            out.append({"attention": att, "pred": pred})
        return out

    sharp, weak = runs(5.0), runs(0.15)
    for rs in (sharp, weak):
        peak, passing = layer_estimates(rs, n_boot=200)
        mean, r_mean = auc_curves(rs)
        assert peak.value == np.nanargmax(mean) + 1
        assert passing.value == layer_passing(r_mean) + 1
        assert peak.low <= peak.value <= peak.high and passing.low <= passing.value <= passing.high
    peak, _ = layer_estimates(sharp, n_boot=200)
    assert layer_text(peak, 8) == "6 [6, 6]"
    wide, _ = layer_estimates(weak, n_boot=200)
    assert wide.high - wide.low > 0
    never = layer_estimates([{**r, "attention": r["attention"][:, :, ::-1] * 0 + 0.5} for r in sharp], n_boot=50)[1]
    assert np.isnan(never.value) or never.value == 9  # constant attention: AUC 0.5 everywhere, R_l undefined


def test_layer_text_rounds_outwards_and_says_never():
    from helpers.core.stats import Estimate, layer_text

    def est(v, lo, hi):
        return Estimate(np.asarray(v), lo, hi, 10, 3, np.array([v]))

    assert layer_text(est(12.0, 10.4, 13.6), 18) == "12 [10, 14]"
    assert layer_text(est(18.0, 17.0, 19.0), 18) == "18 [17, never]"
    assert layer_text(est(19.0, 19.0, 19.0), 18) == "never"
