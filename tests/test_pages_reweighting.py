"""The re-weighting chapter's tables, figures and glued values (helpers.pages.reweighting), without a model: tiny
constructed runs with the structure of the real ones, and a slice of the committed results (one seed)."""

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers.core.runs import PROFILES  # noqa: E402
from helpers.pages import plots  # noqa: E402
from helpers.pages import reweighting as page  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gemma-3-270m"
METHODS = ("icl-1", "icl-5", "anchor", "random", "bias", "contextual")
N_LAYERS, N_HEADS = 4, 2


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _result(correct, n_classes, deep=1.0):
    """One (task, method, seed) result with the fields the chapter reads; β is 1 in the first half of the layers and
    ``deep`` in the second."""
    correct = np.array(correct, dtype=np.int8)
    n = len(correct)
    gold = np.arange(n) % n_classes
    pred = np.where(correct == 1, gold, (gold + 1) % n_classes)
    train_gold = np.arange(2 * n_classes) % n_classes
    beta = np.ones((N_LAYERS, N_HEADS, n_classes), dtype=np.float32)
    beta[N_LAYERS // 2:] = deep
    return {"correct": correct, "test_index": np.arange(n), "gold": gold, "pred": pred,
            "logits": np.eye(n_classes, dtype=np.float32)[pred], "beta": beta,
            "epoch_loss": np.linspace(1.0, 0.5, 10), "loss_start": np.array(1.0), "loss_end": np.array(0.5),
            "bias": np.zeros(n_classes),
            "train_logits": np.eye(n_classes, dtype=np.float32)[train_gold], "train_gold": train_gold,
            "train_s": np.array(10.0), "eval_s": np.array(2.0), "step_s": np.array(0.1), "naive_step_s": np.array(0.5),
            "train_peak_mb": np.array(2100.0), "eval_peak_mb": np.array(2000.0), "naive_extra_mb": np.array(300.0),
            "threads": np.array(1)}


def _runs():
    """Two tasks, one seed, four test examples each. Accuracies (SST-2, TREC): ICL 1-shot 50/25, anchor 75/50,
    contextual 100/0, the others 25/25."""
    correct = {"sst2": {"icl-1": [1, 0, 0, 1], "anchor": [1, 1, 0, 1], "contextual": [1, 1, 1, 1]},
               "trec": {"icl-1": [1, 0, 0, 0], "anchor": [1, 1, 0, 0], "contextual": [0, 0, 0, 0]}}
    classes = {"sst2": 2, "trec": 6}
    return {t: {m: [_result(correct[t].get(m, [0, 0, 1, 0]), classes[t], deep=3.0 if m == "anchor" else 1.0)]
                for m in METHODS} for t in ("sst2", "trec")}


def _prior_runs():
    """Four tasks, one seed, two classes, four test examples each (gold 0, 1, 0, 1). 1-shot ICL's logits carry a
    prior of +2 for class 0 (on the test and the training prompts alike), so it predicts 0 everywhere (50%); a bias
    fitted on the training prompts removes it (100%, as batch calibration does); anchor re-weighting gets 75%, the
    other methods 25%."""
    gold = np.array([0, 1, 0, 1])
    prior = np.eye(2)[gold] + np.array([2.0, 0.0])
    runs = {}
    for t in ("sst2", "trec", "agnews", "emoc"):
        by = {m: [_result([1, 1, 1, 0] if m == "anchor" else [0, 0, 1, 0], 2)] for m in METHODS}
        by["icl-1"][0].update(logits=prior.astype(np.float32), pred=np.zeros(4, dtype=np.int64), gold=gold,
                              correct=np.array([1, 0, 1, 0], dtype=np.int8), train_logits=prior.astype(np.float32),
                              train_gold=gold)
        runs[t] = by
    return runs


@pytest.fixture(scope="module")
def committed(data_dir):
    """The committed runs of the default model, every task, seed 42 only."""
    from helpers.core.runs import ModelKey
    from helpers.core.tasks import TASKS, load_task
    from helpers.experiments.reweighting import reweighting_runs

    lm = ModelKey.of(MODEL)
    runs = {t: reweighting_runs(lm, load_task(t, data_dir), PROFILES["book"], seeds=(42,), progress=False)
            for t in TASKS}
    assert all(len(r["anchor"]) == 1 for r in runs.values())
    return runs


def test_has_average_needs_every_task_with_the_same_seeds():
    R = _runs()
    assert not page.has_average(R)
    four = {t: R["sst2"] for t in ("sst2", "trec", "agnews", "emoc")}
    assert page.has_average(four)
    four["emoc"] = {m: v * 2 for m, v in R["sst2"].items()}  # two seeds on one task
    assert not page.has_average(four)


def test_accuracy_table_has_the_paper_rows_and_marks_what_was_not_run():
    table = page.accuracy_table({"m": _runs()})
    assert list(table.index.get_level_values("model")) == ["GPT2-XL (paper)"] * 3 + ["m"] * 9
    assert list(table.columns) == ["SST-2", "TREC", "AG News", "EmoC", "Average", "n per task"]
    assert table.loc[("GPT2-XL (paper)", "Anchor re-weighting (1-shot per class)"), "Average"] == "68.64"
    methods = list(table.loc["m"].index)
    assert methods[-3:] == ["Control: label bias fitted to convergence",
                            "Control: label bias and temperature fitted to convergence",
                            "Control: batch calibration (no training)"]
    assert "Control: label bias trained like β (Adam, 10 epochs)" in methods
    row = table.loc[("m", "Anchor re-weighting (1-shot per class)")]
    assert row["SST-2"].startswith("75.0 [") and "±" not in row["SST-2"]  # one seed: no spread over seeds
    assert row["AG News"] == "not run" and row["Average"] == "—" and row["n per task"] == "4 × 1"


def test_headline_values():
    v = page.headline_values(_runs(), (42,), PROFILES["book"])
    assert v["n_test"] == 4 and v["n_seeds"] == 1 and isinstance(v["n_test"], int)
    assert v["seeds"] == "42" and v["missing_seeds"] == "43, 44"
    assert v["acc_anchor_v"] == "62.5" and v["acc_icl-1_v"] == "37.5" and v["acc_contextual_v"] == "50.0"
    assert v["gain_v"] == "+25.0" and v["gain"].startswith("25.0 [")
    assert not any("best" in k for k in v)  # no control is chosen on the test examples
    assert {"biasfit_minus_icl1", "biastemperature_minus_icl1", "batch_minus_icl1", "acc_batch"} <= set(v)
    assert v["trec_minus_icl1"].startswith("anchor re-weighting 25.0 [") and "; batch calibration " in v["trec_minus_icl1"]
    assert v["contextual_minus_icl1"].startswith("12.5 [") and v["random_minus_icl1"].startswith("-12.5 [")
    assert v["gain_tasks"].startswith("SST-2 25.0 [") and "; TREC 25.0 [" in v["gain_tasks"]
    assert v["n_params"] == f"SST-2 {N_LAYERS * N_HEADS * 2}, TREC {N_LAYERS * N_HEADS * 6}"
    assert v["paper_gain"] == "+16.7" and v["paper_icl1"] == "51.90"
    assert v["gain_verdict"] in {"above 0", "below 0", "contains 0"}


def test_forest_figure_has_one_panel_per_comparison():
    R = _runs()
    est = page.forest_estimates(R)
    assert list(est) == [page.SHORT[m] for m in page.COMPARED] and len(est) == 8
    assert list(est["ICL 1-shot"]) == ["SST-2", "TREC"]  # no average over two tasks
    assert est["ICL 1-shot"]["SST-2"].value == pytest.approx(25.0)
    fig = page.forest_figure(R, "m")
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert isinstance(fig, plt.Figure) and len(shown) == 8
    assert [t.get_text() for t in shown[0].get_yticklabels()] == ["SST-2", "TREC"]
    assert [ax.get_title() for ax in shown] == [f"minus {name}" for name in est]
    bold = {ax.get_title().removeprefix("minus ") for ax in shown if ax.title.get_fontweight() == "bold"}
    assert bold == {page.SHORT[c] for c in page.CONTROLS}
    assert fig._suptitle.get_text().startswith("m: anchor re-weighting minus each method\n(n = 4 × 1 per task")
    assert fig._supxlabel.get_text().endswith("paired bootstrap over test examples (one seed))")
    # each row: the 95% bar, the 80% bar and the point; the 95% bar spans the interval
    lines = shown[0].lines
    e = est["ICL 1-shot"]["SST-2"]
    np.testing.assert_allclose(lines[0].get_xdata(), [e.low, e.high])
    np.testing.assert_allclose(lines[1].get_xdata(), [e.weak_low, e.weak_high])
    assert lines[1].get_linewidth() > lines[0].get_linewidth()


def test_forest_figures_fit_the_page_and_the_second_model_always_has_one():
    fig = page.forest_figure(_runs(), "m")
    assert fig.get_size_inches()[0] <= plots.PAGE_WIDTH
    assert page.second_forest_figure(_runs(), "m").axes[0].get_title() == "minus ICL 1-shot"
    for missing in (None, {}):
        empty = page.second_forest_figure(missing, "q")
        assert isinstance(empty, plt.Figure) and empty.axes[0].texts[0].get_text() == "q: no committed results"


def test_forest_colours_follow_the_verdict_rule():
    from helpers.core.stats import Estimate

    def est(low, high, weak_low, weak_high):
        return Estimate(1.0, low, high, 10, 3, np.zeros(3), weak_low=weak_low, weak_high=weak_high)

    assert page._color(est(0.5, 2.0, 0.8, 1.5)) == "#2ca02c"  # 95% above 0
    assert page._color(est(-0.5, 2.0, 0.2, 1.5)) == "#e08a00"  # only the 80% interval above 0
    assert page._color(est(-3.0, -0.5, -2.0, -1.0)) == "#d62728"  # 95% below 0
    assert page._color(est(-1.0, 2.0, -0.5, 1.5)) == "#777777"


def test_forest_on_committed_runs_includes_the_average(committed):
    est = page.forest_estimates(committed)
    assert len(est) == 8 and all(list(per) == ["SST-2", "TREC", "AG News", "EmoC", "Average"] for per in est.values())
    fig = page.forest_figure(committed, MODEL)
    assert "(n = 64 × 1 per task" in fig._suptitle.get_text()


def test_with_controls_adds_the_fitted_controls_once():
    R = _prior_runs()
    F = page.with_controls(R)
    assert all(set(page.CONTROLS) | {"bias"} <= set(by) for by in F.values())
    assert page.with_controls(F) is F
    assert float(F["sst2"]["bias-fit"][0]["correct"].mean()) == 1.0  # the fitted bias removes the +2 prior
    assert float(F["sst2"]["batch"][0]["correct"].mean()) == 1.0


def test_controls_table_shows_every_control_and_nothing_chosen():
    table = page.controls_table({"m": _prior_runs(), "two tasks": _runs()})
    controls = [page.SHORT[c] for c in page.CONTROLS] + [page.SHORT["bias"]]
    assert list(table.loc["m"].index) == controls and list(table.loc["two tasks"].index) == controls
    fit = table.loc[("m", "fitted label bias")]
    assert fit["accuracy %"].startswith("100.0 [") and fit["re-weighting minus it, average (95%)"].startswith("-25.0 [")
    assert fit["SST-2"].startswith("-25.0 [")
    assert ("m", "label bias trained like β") in table.index
    assert re.fullmatch(r"\[-?\d+\.\d, -?\d+\.\d\]", fit["80% interval"])
    two = table.loc[("two tasks", "contextual calibration")]
    assert two["accuracy %"] == "—" and two["AG News"] == "not run" and two["SST-2"].startswith("-25.0 [")


def test_controls_values():
    v = page.controls_values(_prior_runs())
    assert v["ctrl_bias_fit_acc"].startswith("100.0 [") and v["ctrl_bias_fit_diff"].startswith("-25.0 [")
    assert v["ctrl_random_diff"].startswith("50.0 [") and v["ctrl_bias_diff"].startswith("50.0 [")
    assert v["closest_control"] in {"fitted label bias", "fitted bias and temperature", "batch calibration"}
    assert v["closest_diff"].startswith("-25.0 [") and v["closest_verdict"] in {"below 0", "contains 0"}
    assert v["closest_tasks"].startswith("SST-2 -25.0 [")
    assert "batch calibration" in v["controls_not_beaten"] and "batch calibration" not in v["controls_beaten"]
    assert re.fullmatch(r"\[-?\d+\.\d, -?\d+\.\d\]", v["closest_weak"])


def test_fit_table_and_values_compare_the_adam_bias_with_the_converged_fit():
    from helpers.experiments.reweighting import GTOL, fit_bias

    R = _prior_runs()
    table = page.fit_table({"m": R})
    icl = R["sst2"]["icl-1"][0]
    converged = float(fit_bias(icl["train_logits"], icl["train_gold"])["loss_end"])
    row = table.loc[("m", "SST-2")]
    assert row["bias, Adam"] == 0.5 and row["anchor re-weighting"] == 0.5  # the stored loss_end
    assert row["bias, fitted"] == pytest.approx(converged, abs=1e-3) and converged < row["loss at b = 0"]
    assert row["bias spread, Adam"] == 0.0 and row["bias spread, fitted"] == pytest.approx(2.0, abs=1e-3)
    assert row[f"fits with gradient < {GTOL:.0e}"].endswith(" of 2")
    v = page.fit_values(R)
    assert v["fit_gtol"] == "1e-09" and v["fit_n"] == "8" and v["fit_rule_met"].endswith(" of 8")
    assert v["fit_loss_tasks"].startswith(f"SST-2 0.500 → {converged:.3f}; TREC")
    assert v["fit_loss_adam"] == "0.500" and v["fit_loss_anchor"] == "0.500"
    assert v["fit_spread_adam"] == "0.0" and re.fullmatch(r"2\.0 \((SST-2|TREC|AG News|EmoC)\)", v["fit_spread_fit"])
    # the training examples are separable along the logits: with a temperature the loss goes to 0
    assert v["fit_separable"] == "4 of 4 fits (SST-2, TREC, AG News, EmoC)" and float(v["fit_scale_max"].split()[0]) > 5


def test_resolution_values():
    v = page.resolution_values(_prior_runs())
    lo, hi = (float(x) for x in v["halfwidth_task"].split("-"))
    assert 0 <= lo <= hi and v["halfwidth_avg"] != "—"
    assert page.resolution_values(_runs())["halfwidth_avg"] == "—"


def test_beta_figure_draws_one_heatmap_per_task():
    R = _runs()
    fig = page.beta_figure(R, "m")
    assert isinstance(fig, plt.Figure)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 2 and len(fig.axes) == 3  # two tasks and the colour bar
    assert images[1].get_array().shape == (N_LAYERS, N_HEADS * 6)


def test_beta_layers_figure_plots_mean_abs_beta_per_layer():
    fig = page.beta_layers_figure(_runs())
    width, _ = fig.get_size_inches()
    assert width <= plots.PAGE_WIDTH and len(fig.axes) == 2  # at the page's width: labels stay at their size
    assert fig.axes[0].get_xlabel() == "layer" and fig.axes[0].get_ylabel() == "mean |β|"
    anchor, random = fig.axes[0].lines
    np.testing.assert_allclose(anchor.get_ydata(), [1, 1, 3, 3])
    np.testing.assert_allclose(random.get_ydata(), [1, 1, 1, 1])
    assert anchor.get_label() == "anchor re-weighting" and fig.axes[1].get_title() == "TREC"


def test_beta_values_share_of_the_deep_layers():
    assert page.beta_values(_runs()) == {"beta_deep_share": "75%"}  # (3 + 3) / (1 + 1 + 3 + 3)


def test_training_figure_and_loss_table():
    R = _runs()
    R["sst2"]["random"][0]["train_logits"] = np.eye(2, dtype=np.float32)[[0, 0, 0, 0]]  # half right
    fig = page.training_figure(R, "m")
    assert isinstance(fig, plt.Figure)
    drawn = [ax for ax in fig.axes if ax.lines]
    assert len(drawn) == 2 and [ln.get_label() for ln in drawn[0].lines] == [page.SHORT[m] for m in page.TRAINED]
    np.testing.assert_allclose(drawn[0].lines[0].get_ydata(), np.linspace(1.0, 0.5, 10))
    loss = page.loss_table(R)
    assert loss.shape == (6, 3)
    assert loss.loc[("SST-2", "anchor re-weighting"), "train accuracy at end %"] == 100.0
    assert loss.loc[("SST-2", "random-position re-weighting"), "train accuracy at end %"] == 50.0
    assert loss.loc[("TREC", "label bias trained like β"), "loss at end"] == 0.5


def test_prior_table_and_values():
    R = _runs()
    R["sst2"]["icl-1"][0]["pred"] = np.zeros(4, dtype=np.int64)
    prior = page.prior_table(R)
    assert list(prior.columns) == ["gold (most frequent class)"] + [page.SHORT[m] for m in page.ORDER]
    assert prior.loc["SST-2", "ICL 1-shot"] == 100.0 and prior.loc["SST-2", "gold (most frequent class)"] == 50.0
    assert prior.loc["TREC", "gold (most frequent class)"] == 25.0
    v = page.prior_values(R)
    assert v == {"majority_icl1": f"{(100.0 + prior.loc['TREC', 'ICL 1-shot']) / 2:.0f}%",
                 "majority_anchor": f"{prior['anchor re-weighting'].mean():.0f}%", "majority_gold": "38%"}


def test_cost_frame_and_values():
    cost = page.cost_frame(_runs())
    assert list(cost.index) == ["SST-2", "TREC"] and cost.loc["SST-2", "training / evaluation"] == 5.0
    assert page.cost_values(_runs()) == {"train_ratio": "5.0-5.0", "train_s": "10-10", "step_ratio": "5.0-5.0",
                                         "threads": "1", "peak_train": "2100", "peak_eval": "2000",
                                         "peak_diff": "100", "naive_extra": "300-300"}


def test_second_model_values_without_an_average():
    v = page.second_model_values(_runs(), {"sst2": (43,), "trec": (42, 43)})
    assert v["second_seeds"] == "42, 43" and v["second_tasks"] == "SST-2, TREC" and v["second_n_seeds"] == "1"
    assert v["second_average_note"] == "With fewer than four tasks there is no average for this model."
    assert v["second_ctx_tasks"].startswith("SST-2 -25.0 [") and "; TREC 50.0 [" in v["second_ctx_tasks"]
    assert v["second_closest_control"] == v["second_closest_diff"] == "—"
    assert v["second_fit_tasks"].startswith("SST-2 ") and v["second_batch_tasks"].startswith("SST-2 ")


def test_second_model_values_with_an_average():
    v = page.second_model_values(_prior_runs(), {t: (42,) for t in ("sst2", "trec", "agnews", "emoc")})
    assert v["second_closest_diff"].startswith("-25.0 [")
    assert v["second_average_note"].startswith("Averaged over the four tasks, anchor re-weighting minus 1-shot ICL is")
    assert f"(closest: {v['second_closest_control']})." in v["second_average_note"]
    assert "random-position re-weighting 50.0 [" in v["second_average_note"]


def test_seeds_shown_reads_what_is_cached(data_dir):
    from helpers.core.runs import ModelKey
    from helpers.core.tasks import load_task

    data = {t: load_task(t, data_dir) for t in ("sst2", "trec")}
    shown = page.seeds_shown(ModelKey.of(MODEL), data, PROFILES["book"])
    assert shown == {"sst2": (42, 43, 44), "trec": (42, 43, 44)}
    assert page.seeds_shown(None, data, PROFILES["quick"]) == {"sst2": (42,), "trec": (42,)}  # computes: no lookup


def test_glued_values_cover_every_name_the_chapter_uses(committed):
    cells = json.loads((ROOT / "book" / "reweighting.ipynb").read_text())["cells"]
    prose = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    used = set(re.findall(r"\{glue:text\}`([^`]+)`", prose))
    seeds = {MODEL: {t: (42,) for t in committed}, "second": {t: (42,) for t in committed}}
    values = page.glued_values({MODEL: committed, "second": committed}, seeds, MODEL, "second", PROFILES["book"])
    values |= page.leverage_values(_leverage_runs(), {t: {"anchor": {"lr": np.array(0.1)}} for t in ("sst2", "trec")})
    verdicts = {n for n in used if n.startswith("verdict_")}  # glued from helpers.pages.verdicts.chapter_verdicts
    assert {"verdict_reweighting_gain", "verdict_reweighting_vs_controls"} <= verdicts
    assert used - verdicts and used - verdicts <= set(values), (used - verdicts) - set(values)
    assert "best_control" not in values and values["closest_control"] in {page.SHORT[c] for c in page.CONTROLS}
    assert values["lev_halves_note"] == ""  # the stand-in runs have no layer halves: no sentence about them
    assert values["n_test"] == 64 and values["n_seeds"] == 1 and values["missing_seeds"] == "43, 44"
    assert values["second_average_note"].startswith("Averaged over the four tasks, anchor re-weighting minus")
    without = page.glued_values({MODEL: committed}, seeds, MODEL, None, PROFILES["book"])
    assert not any(k.startswith("second_") for k in without)


def test_the_chapter_glues_the_verdict_words_it_uses(monkeypatch):
    """Every verdict name the prose uses is one that helpers.pages.verdicts.chapter_verdicts glues (the verdict
    page's words), and the chapter calls it."""
    from helpers.pages import verdicts

    from helpers.pages import summaries

    monkeypatch.setattr(summaries, "summary_dirs", lambda: [])  # no stored verdicts: they come from ``evaluate``
    monkeypatch.setattr(summaries, "_MEMORY", {})
    monkeypatch.setattr(verdicts, "evaluate", lambda finding, model, profile="book": (None, f"word of {model}"))
    glued = verdicts.chapter_verdicts("book/reweighting")
    assert glued["verdict_reweighting_vs_controls"] == f"word of {verdicts.MODELS[0]}"
    cells = json.loads((ROOT / "book" / "reweighting.ipynb").read_text())["cells"]
    text = "".join("".join(c["source"]) for c in cells)
    used = set(re.findall(r"\{glue:text\}`(verdict_[^`]+)`", text))
    assert used and used <= set(glued), used - set(glued)
    assert 'chapter_verdicts("book/reweighting"' in text
    assert "(sec-reweighting-gain)=" in text and "(sec-reweighting-controls)=" in text


# --------------------------------------------------------------------------------------------------------------------
# Equal-leverage controls
# --------------------------------------------------------------------------------------------------------------------


def _leverage_runs():
    """Two tasks, one seed, four examples: tuned re-weighting 100/75 (SST-2/TREC), every verdict control 50/25
    except the most-attended token (75/75); attention shares: label words 5%, most attended 20%, BOS 30%, the
    others 1%."""
    from helpers.experiments import reweighting as rw

    R = _runs()
    for t, by in R.items():
        c = 2 if t == "sst2" else 6
        by["anchor-tuned"] = [_result([1, 1, 1, 1] if t == "sst2" else [1, 1, 1, 0], c)]
        for m in rw.VERDICT_CONTROLS:
            by[m] = [_result([1, 1, 1, 0] if m == "beta-attended" else ([1, 0, 1, 0] if t == "sst2" else [1, 0, 0, 0]), c)]
        shares = {"label_words": 0.05, "most_attended": 0.2, "newline": 0.01, "colon": 0.01, "random_text": 0.01,
                  "BOS": 0.3}
        by["states"] = [{f"share_{k}": np.full(N_LAYERS, v) for k, v in shares.items()}]
    return R


def test_leverage_table_shows_each_controls_lever_and_the_paired_difference():
    R = _leverage_runs()
    table = page.leverage_table(R, MODEL)
    rows = table.loc[MODEL]
    assert rows.loc[page.LEVERAGE_SHORT["anchor-tuned"], "attention share %"] == "5.00"
    assert rows.loc[page.LEVERAGE_SHORT["beta-attended"], "attention share %"] == "20.00"
    assert rows.loc[page.LEVERAGE_SHORT["probe"], "attention share %"] == "—"
    assert rows.loc[page.LEVERAGE_SHORT["beta-attended"], "re-weighting minus it (95%)"].startswith("12.5")
    assert rows.loc[page.LEVERAGE_SHORT["batch"], "the verdict needs it beaten"] == "yes"
    values = page.leverage_values(R, {"sst2": {"anchor": {"lr": np.array(0.1)}}, "trec": {"anchor": {"lr": np.array(0.3)}}})
    assert values["lev_closest"] == page.LEVERAGE_SHORT["beta-attended"]
    assert values["lev_lrs"] == "SST-2 0.1; TREC 0.3"
    assert values["lev_beta_attended_share"] == "20.00%"
    fig = page.leverage_figure(R, MODEL)
    assert fig.axes[0].get_xscale() == "log" and len(fig.axes[0].texts) == 6  # anchor and the five position controls
    for c in ("random-tuned", "beta-newline", "beta-colon", "beta-attended", "beta-bos"):
        assert rows.loc[page.LEVERAGE_SHORT[c], "the verdict needs it beaten"] == "yes", c
        assert page.LEVERAGE_SHORT[c] in values["lev_positions_diffs"] and page.LEVERAGE_SHORT[c] in values["lev_controls"]
    from helpers.experiments import reweighting as rw

    assert values["lev_n_controls"] == str(len(rw.VERDICT_CONTROLS))


@pytest.mark.parametrize("position", ["random-tuned", "beta-newline", "beta-colon", "beta-attended", "beta-bos"])
def test_a_position_control_that_beats_re_weighting_is_the_closest_one_named(position):
    """The chapter's closest control is chosen over every position control: one that does better than re-weighting
    is named, with its side and its difference, and the verdict word the rule gives is "not reproduced"."""
    from helpers.experiments import reweighting as rw

    R = _leverage_runs()
    for t, by in R.items():
        by[position] = [_result([1, 1, 1, 1], 2 if t == "sst2" else 6)]
    values = page.leverage_values(R, {"sst2": {"anchor": {"lr": np.array(0.1)}}, "trec": {"anchor": {"lr": np.array(0.3)}}})
    assert values["lev_closest"] == page.LEVERAGE_SHORT[position]
    assert values["lev_closest_side"].startswith("does better than re-weighting")
    assert values["lev_closest_diff"].startswith("-12.5")
    assert page.LEVERAGE_SHORT[position] in values["lev_positions_not_beaten"]
    m = rw.controls_measured(R)
    assert rw._TITLE_SHORT[position] in m.note and rw.beats_every_control(m) == rw.NOT_REPRODUCED


def test_leverage_without_a_bos_token_leaves_the_bos_control_out_and_a_missing_control_fails():
    from helpers.experiments import reweighting as rw

    R = _leverage_runs()
    for by in R.values():
        del by["beta-bos"]
        del by["states"][0]["share_BOS"]
    table = page.leverage_table(R, MODEL).loc[MODEL]
    assert page.LEVERAGE_SHORT["beta-bos"] not in table.index
    assert page.LEVERAGE_SHORT["beta-newline"] in table.index
    for by in R.values():
        del by["beta-newline"]
    with pytest.raises(ValueError, match="beta-newline"):
        page.leverage_values(R, {"sst2": {"anchor": {"lr": np.array(0.1)}}})


def test_lr_table_lists_the_grid_and_the_choice():
    s = {"grid": np.array([0.01, 0.1, 0.3]), "heldout_loss": np.array([[0.9, 0.7], [0.5, 0.4], [0.6, 0.8]]),
         "lr": np.array(0.1)}
    table = page.lr_table({MODEL: {"sst2": {"anchor": s}}})
    row = table.iloc[0]
    assert row["chosen lr"] == "0.1" and row["held-out loss, lr 0.01"] == 0.8 and row["held-out loss, lr 0.1"] == 0.45


def test_lr_table_marks_and_the_glue_counts_the_choices_at_an_edge_of_the_grid():
    """As the tuning chapter's table: a chosen rate that is the smallest or the largest of the grid is marked
    " (edge)"; the glue counts them, top and bottom apart."""
    grid, loss = np.array([0.01, 0.1, 0.3]), np.array([[0.9, 0.7], [0.5, 0.4], [0.6, 0.8]])
    searches = {"sst2": {"anchor": {"grid": grid, "heldout_loss": loss, "lr": np.array(0.3)},
                         "random": {"grid": grid, "heldout_loss": loss, "lr": np.array(0.1)}},
                "trec": {"anchor": {"grid": grid, "heldout_loss": loss, "lr": 0.01},
                         "beta-newline": {"grid": grid, "heldout_loss": loss, "lr": 0.3}}}
    chosen = page.lr_table({MODEL: searches})["chosen lr"]
    assert list(chosen) == ["0.3 (edge)", "0.1", "0.01 (edge)", "0.3 (edge)"]
    values = page.lr_edge_values(searches)
    assert values == {"lr_n": "4", "lr_edge_n": "3", "lr_edge_top": "2", "lr_edge_bottom": "1", "lr_top": "0.3",
                      "lr_bottom": "0.01", "lr_edge_anchor": "SST-2"}


def test_the_layer_halves_sentence_says_which_half_falls_short():
    """With both halves computed the note reads their differences: a half as good as β in every layer and one that
    is wrong everywhere give "Only the shallow half ..."; two halves as good as β give "Both intervals include 0"."""
    R = _leverage_runs()
    for t, by in R.items():
        c = 2 if t == "sst2" else 6
        by["beta-deep"] = [dict(by["anchor-tuned"][0])]
        by["beta-shallow"] = [_result([0, 0, 0, 0], c)]
    searches = {"sst2": {"anchor": {"lr": np.array(0.1)}}, "trec": {"anchor": {"lr": np.array(0.3)}}}
    note = page.leverage_values(R, searches)["lev_halves_note"]
    assert note.startswith("Restricted to the deep half") and "Only the shallow half alone falls short" in note
    for by in R.values():
        by["beta-shallow"] = [dict(by["anchor-tuned"][0])]
    assert "Both intervals include 0" in page.leverage_values(R, searches)["lev_halves_note"]
