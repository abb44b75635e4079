"""The tuning chapter's book layer (helpers.pages.tuning): its tables, figures and glued values, on a slice of the
committed results (seed 42; SST-2 and TREC with one method of every kind for Gemma 3 270M, SST-2 for the second model)
and on small constructed runs. No model is loaded."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers.core.runs import ModelKey  # noqa: E402
from helpers.core.tasks import TASKS, load_task  # noqa: E402
from helpers.experiments import tuning as tu  # noqa: E402
from helpers.pages import tuning as pt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL, SECOND = "gemma-3-270m", "qwen2.5-coder-0.5b"
ORDER = tu.methods_of(tu.SIZES["book"])  # the chapter's order: the slice lacks some of these methods
SLICE = ("icl-1", "anchor", "prompt-1", "prefix-1", "pez-8")  # one method of every kind
FIGURES = {"params_fig", "params_fig_2", "theorem_fig", "share_fig"}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def committed(data_dir):
    """(runs, floors) as the chapter collects them, seed 42 only: SST-2 and TREC (Gemma, at the searched learning
    rates), SST-2 (the second model, at the fixed rates)."""
    runs, floors = {}, {}
    for model, tasks, sizes in ((MODEL, ("sst2", "trec"), "book"), (SECOND, ("sst2",), "fixed")):
        config = dataclasses.replace(tu.SIZES[sizes], seeds=(42,))
        key = ModelKey.of(model)
        data = {t: load_task(t, data_dir) for t in tasks}
        runs[model] = {t: tu.collect(key, d, config, methods=SLICE) for t, d in data.items()}
        floors[model] = {t: tu.collect_floor(key, d, config) for t, d in data.items()}
        for t, r in runs[model].items():
            if "icl-1" not in r or "pez-8" not in r:
                pytest.fail(f"the committed tuning results of {model} on {t} are missing (results/tuning/)")
    return runs, floors


@pytest.fixture(scope="module")
def glued(committed):
    runs, floors = committed
    return pt.glued(runs, floors, ORDER, MODEL, SECOND)


@pytest.fixture(scope="module")
def table(committed):
    return pt.accuracy_table(committed[0][MODEL], ORDER)


@pytest.fixture(scope="module")
def figures(committed):
    """The chapter's three figures of the first model, drawn once from the slice."""
    runs, floors = committed
    figs = {"params": pt.params_figure(MODEL, runs[MODEL], ORDER),
            "theorem": pt.theorem_figure(MODEL, runs[MODEL], floors[MODEL], ORDER),
            "share": pt.share_figure(MODEL, runs[MODEL], ORDER)}
    yield figs
    for fig in figs.values():
        plt.close(fig)


def _result(correct, n_params=10, seed=0):
    correct = np.asarray(correct, float)
    return {"correct": correct, "test_index": np.arange(len(correct)), "n_params": np.array(n_params),
            "train_s": np.array(1.0)}


def _constructed(tasks=("sst2", "trec", "agnews", "emoc"), seeds=(1,)):
    """ICL right on every other example, anchor re-weighting on three in four, on every task and seed."""
    rng = np.random.default_rng(0)
    out = {}
    for t in tasks:
        out[t] = {"icl-1": {s: _result(np.arange(8) % 2 == 0, 0) for s in seeds},
                  "anchor": {s: _result(rng.permutation(np.arange(8) % 4 != 0), 144) for s in seeds}}
    return out


# --------------------------------------------------------------------------------------------------------------------
# Names and averages
# --------------------------------------------------------------------------------------------------------------------


def test_labels_and_parameter_counts(committed):
    assert pt.label("icl-1") == "ICL 1-shot"
    assert pt.label("anchor") == "anchor re-weighting"
    assert pt.label("prefix-16") == "prefix-tuning, m = 16"
    assert pt.label("pez-8") == "PEZ hard prompt, m = 8"
    with pytest.raises(ValueError):
        pt.label("lora-4")
    R = committed[0][MODEL]
    assert pt.n_params(R["sst2"], "anchor") == 144 and pt.n_params(R["trec"], "anchor") == 432  # L·H·C, C = 2 and 6
    assert pt.n_params(R["sst2"], "prefix-1") == 9216 and pt.n_params(R["sst2"], "prompt-1") == 640


def test_averages_use_only_the_seeds_every_task_has():
    runs = _constructed(("sst2", "trec"), seeds=(1, 2, 3))
    del runs["trec"]["anchor"][3]
    assert pt.common_seeds(runs, ORDER) == [1, 2]
    avg = pt.averaged(runs, ORDER)
    assert set(avg) == {"icl-1", "anchor"} and avg["icl-1"][1] is None
    assert avg["icl-1"][0].n_seeds == 2 and avg["icl-1"][0].value == pytest.approx(50.0)
    assert avg["anchor"][1].value == pytest.approx(25.0)  # 75% - 50%, paired
    assert pt.averaged({"sst2": runs["sst2"]}, ORDER) == {}  # one task: no average


# --------------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------------


def _search(grid, losses, accs):
    losses = np.asarray(losses, float)
    return {"grid": np.asarray(grid, float), "heldout_loss": np.stack([losses, losses + 0.1], 1),
            "heldout_acc": np.stack([accs, accs], 1), "lr": np.array(float(grid[int(np.argmin(losses))]))}


def test_lr_table_and_values_give_every_choice_and_mark_the_grid_edge():
    searches = {"sst2": {"anchor": _search((0.01, 0.1, 0.3), [0.7, 0.5, 0.6], [0.5, 0.75, 0.5]),
                         "prompt": _search((0.001, 0.01, 0.1), [0.9, 0.8, 0.4], [0.5, 0.5, 1.0])}}
    table = pt.lr_table(searches, tu.SIZES["book"])
    assert list(table.index) == [("SST-2", "anchor re-weighting"), ("SST-2", "prompt tuning, m = 4")]
    assert list(table["chosen"]) == ["0.1", "0.1 (edge)"]
    assert table["held-out cross-entropy"].iloc[0] == "0.75 / 0.55 / 0.65"  # the mean of the two folds
    assert table["held-out accuracy %"].iloc[1] == "50 / 50 / 100"
    values = pt.search_values({}, {}, searches, tu.SIZES["fixed"], ORDER)
    assert {k: values[k] for k in ("lr_n_choices", "lr_n_edge", "lr_n_moved")} == {
        "lr_n_choices": 2, "lr_n_edge": 1, "lr_n_moved": 2}  # both moved from the fixed 0.01
    assert values["searched_gain_anchor"] == "not run at both rates on every task"  # no runs: said, never missing


def test_search_effect_pairs_each_method_at_the_fixed_and_the_chosen_rate():
    fixed = _constructed(("sst2", "trec"), seeds=(1, 2))
    searched = _constructed(("sst2", "trec"), seeds=(1, 2))
    for t in searched:  # at the searched rate anchor re-weighting is right everywhere
        searched[t]["anchor"] = {s: _result(np.ones(8), 144) for s in (1, 2)}
    effect = pt.search_effect(searched, fixed, ORDER)
    assert set(effect) == {"anchor"}
    g_fixed, g_searched = effect["anchor"]
    assert g_fixed.value == pytest.approx(25.0) and g_searched.value == pytest.approx(50.0)
    searches = {t: {"anchor": _search((0.01, 0.1, 0.3), [0.7, 0.5, 0.6], [0.5, 0.75, 0.5])} for t in searched}
    table = pt.search_effect_table(searched, fixed, searches, tu.SIZES["fixed"], ORDER)
    assert table.loc["anchor re-weighting", "fixed rate"] == "0.01"
    assert table.loc["anchor re-weighting", "rate chosen by the search"] == "SST-2 0.1 / TREC 0.1"
    assert table.loc["anchor re-weighting", "gain at the chosen rate, points"].startswith("+50.0")
    assert pt.search_effect({"sst2": searched["sst2"]}, fixed, ORDER) == {}  # one task: no average


def test_fixed_rate_methods_are_paired_against_re_weighting_at_the_fixed_rate():
    fixed = _constructed(("sst2", "trec"), seeds=(1, 2))
    for t in fixed:  # at the fixed rate a 4-position prefix is right everywhere, a 1-token prompt only like ICL
        fixed[t]["prefix-4"] = {s: _result(np.ones(8), 9216) for s in (1, 2)}
        fixed[t]["prompt-1"] = {s: _result(np.arange(8) % 2 == 0, 640) for s in (1, 2)}
    vs = pt.fixed_vs_anchor(fixed, ORDER)
    assert set(vs) == {"prefix-4", "prompt-1"}
    assert vs["prefix-4"].value == pytest.approx(25.0) and vs["prefix-4"].low > 0
    assert vs["prompt-1"].value == pytest.approx(-25.0)
    searches = {t: {"anchor": _search((0.01, 0.1, 0.3), [0.7, 0.5, 0.6], [0.5, 0.75, 0.5])} for t in fixed}
    values = pt.search_values(fixed, fixed, searches, tu.SIZES["fixed"], ORDER)
    assert values["fixed_above_anchor"] == "prefix-tuning, m = 4"
    assert values["fixed_vs_anchor_prefix-4"].startswith("25.0")
    assert values["fixed_vs_anchor_prefix-16"] == "not run at the fixed rate"
    assert "fixed_vs_anchor_anchor" not in values and "fixed_vs_anchor_icl-1" not in values
    assert pt.fixed_vs_anchor({"sst2": fixed["sst2"]}, ORDER) == {}  # one task: no average


def test_accuracy_table_gives_every_method_and_the_average(table):
    assert table.index.names == ["task", "method"]
    assert list(table.columns) == ["parameters", "accuracy % [95% CI]", "n", "minus ICL, points [95% CI]",
                                   "train s per seed"]
    assert len(table) == 2 * len(ORDER) + len(SLICE)  # every method per task, then the average of those computed
    icl, anchor = table.loc[("SST-2", "ICL 1-shot")], table.loc[("SST-2", "anchor re-weighting")]
    assert icl["accuracy % [95% CI]"] == "50.0 [37.5, 61.0]" and icl["n"] == "64 × 1"
    assert anchor["minus ICL, points [95% CI]"] == "-4.7 [-15.6, +6.2]" and anchor["parameters"] == "144"
    assert anchor["train s per seed"] == "10"
    assert table.loc[("TREC", "prompt tuning, m = 4"), "accuracy % [95% CI]"] == "not run"
    average = table.loc[("average over tasks", "anchor re-weighting")]
    assert average["parameters"] == "144–432" and average["n"] == "64 × 1 × 2 tasks"


def test_compact_table_is_methods_by_tasks(table):
    compact = pt.compact_table(table)
    assert list(compact.index) == [pt.label(x) for x in ORDER]
    assert list(compact.columns) == ["parameters", "SST-2", "TREC", "average over tasks"]
    assert compact.loc["ICL 1-shot", "SST-2"] == "50.0 [37.5, 61.0] %"
    assert compact.loc["anchor re-weighting", "TREC"] == "-4.7 [-14.1, +3.1]"
    assert compact.loc["prefix-tuning, m = 1", "average over tasks"] == "+3.9 [-3.1, +10.9]"
    assert compact.loc["anchor re-weighting", "parameters"] == "144–432"  # the average's range
    assert compact.loc["prefix-tuning, m = 4", "SST-2"] == "not run"


def test_theorem_table_separates_the_prefix_from_reweighting(committed):
    R = committed[0][MODEL]
    table = pt.theorem_table(R, ORDER)
    assert list(table.index) == [pt.label(x) for x in SLICE[1:]]
    assert list(table.columns) == ["layer 1: largest change", "deeper layers: largest change", "mean TV, layer 1",
                                   "mean TV, deepest layer", "n (prompts)"]
    assert float(table.loc["prefix-tuning, m = 1", "layer 1: largest change"]) < 1e-4  # the theorem
    assert float(table.loc["anchor re-weighting", "layer 1: largest change"]) > 1e-3
    assert set(table["n (prompts)"]) == {16 * 1 * 2}  # prompts × seeds × tasks
    short = pt.theorem_table(committed[0][SECOND], ORDER, layer1_tv=False)
    assert "mean TV, layer 1" not in short.columns and len(short.columns) == 4


def test_pez_table_decodes_every_seeds_prompt(committed):
    class Tokenizer:
        def decode(self, ids):
            return " ".join(f"<{i}>" for i in ids)

    runs = committed[0]
    table = pt.pez_table(runs, ORDER, {MODEL: Tokenizer(), SECOND: Tokenizer()})
    assert len(table) == 3  # Gemma: SST-2 and TREC; the second model: SST-2 (one seed)
    assert list(table.columns) == ["model", "task", "seed", "initial tokens", "found prompt", "ids", "accuracy %"]
    row = table.iloc[0]
    res = runs[MODEL]["sst2"]["pez-8"][row["seed"]]
    assert row["found prompt"] == repr(" ".join(f"<{int(i)}>" for i in res["ids"])) and len(row["ids"]) == 8
    assert row["accuracy %"] == pytest.approx(100 * np.mean(res["correct"]))


def test_coverage_lists_what_was_and_was_not_run(committed):
    text = pt.coverage_text(committed[0], [MODEL, SECOND, "no-such-model"], ORDER)
    assert text.startswith("gemma-3-270m: SST-2: seed 42; not run: prompt-4, prompt-16, prefix-4, prefix-16; TREC:")
    assert "AG News not run" in text and "qwen2.5-coder-0.5b: SST-2: seed 42; not run:" in text
    assert "no-such-model: not run." in text


# --------------------------------------------------------------------------------------------------------------------
# Curves and figures
# --------------------------------------------------------------------------------------------------------------------


def test_layer_and_floor_curves_have_one_row_per_prompt(committed):
    runs, floors = committed
    curves = pt.layer_curves(runs[MODEL], ORDER, "maxdiff", lambda a: a.max(-1))
    assert list(curves) == list(SLICE[1:]) and {v.shape for v in curves.values()} == {(32, 18)}
    floor = pt.floor_curve(floors[MODEL])
    assert floor.shape == (16 * 3 * 1 * 2, 18)  # prompts × shifts × seeds × tasks
    assert floor[:, 0].max() < 1e-4
    assert pt.floor_curve({}) is None
    shares, base = pt.share_curves(runs[MODEL], ORDER)
    assert base.shape == (32, 18) and set(shares) == set(SLICE[1:]) and 0 < base.mean() < 1


def test_params_figure_one_panel_per_task_and_the_average(figures):
    fig = figures["params"]
    assert len(fig.axes) == 4 and tuple(fig.get_size_inches()) == pytest.approx((7.8, 6.4))  # two panels a row
    assert not fig.axes[-1].axison and fig.axes[-1].get_legend() is not None
    # each point's length m is its marker (prompt-16 and prefix-1 train about as many parameters: no text labels)
    markers = {(ln.get_color(), ln.get_marker()) for ln in fig.axes[0].lines if ln.get_linestyle() == "None"}
    assert ("tab:blue", "v") in markers and ("tab:orange", "v") in markers and ("tab:red", "o") in markers
    assert not fig.axes[0].texts
    legend = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert "m = 1 (tokens or prefix positions)" in legend and "m = 16" in legend
    assert [ax.get_title() for ax in fig.axes[:3]] == ["SST-2 (n = 64 × 1)", "TREC (n = 64 × 1)",
                                                       "average over 2 tasks (n = 64 × 1 × 2)"]
    assert all(ax.get_xscale() == "log" for ax in fig.axes[:3])
    assert len(fig.axes[0].containers) == 4  # error bars of anchor re-weighting, prompt, prefix and PEZ
    assert MODEL in fig._suptitle.get_text()


def test_params_figure_with_four_tasks_puts_the_legend_in_the_spare_panel():
    fig = pt.params_figure("toy", _constructed(), ORDER)
    assert len(fig.axes) == 6 and tuple(fig.get_size_inches()) == pytest.approx((7.8, 9.6))
    assert not fig.axes[-1].axison and fig.axes[-1].get_legend() is not None
    assert fig.axes[4].get_title() == "average over 4 tasks (n = 8 × 1 × 4)"


def test_second_params_figure_says_when_there_are_no_results(committed):
    empty = pt.second_params_figure(SECOND, None, ORDER)
    assert len(empty.axes) == 1 and tuple(empty.get_size_inches()) == pytest.approx((6, 1.2))
    assert empty.axes[0].texts[0].get_text() == f"{SECOND}: no committed results"
    drawn = pt.second_params_figure(SECOND, committed[0][SECOND], ORDER)
    assert len(drawn.axes) == 1 and drawn.axes[0].get_title() == "SST-2 (n = 64 × 1)"


def test_theorem_figure_draws_three_panels_and_a_legend(committed, figures):
    runs, floors = committed
    fig = figures["theorem"]
    assert len(fig.axes) == 4 and tuple(fig.get_size_inches()) == pytest.approx((8, 6.4))
    change, tv, outside, legend = fig.axes
    assert change.get_yscale() == "log"
    assert len(change.lines) == 4 + 1 + 1  # the methods, the float floor, the 1e-5 line
    assert len(outside.lines) == 3  # the context methods only: re-weighting adds no attention
    labels = [t.get_text() for t in legend.get_legend().get_texts()]
    assert "prefix-tuning, m = 1" in labels and any("float floor" in x for x in labels)
    assert "n ≥ 32 prompts" in fig._suptitle.get_text()
    assert len(pt.theorem_figure(MODEL, runs[MODEL], {}, ORDER).axes[0].lines) == 5  # no floor


def test_share_figure_draws_icl_and_every_method(figures):
    fig = figures["share"]
    assert len(fig.axes) == 1 and tuple(fig.get_size_inches()) == pytest.approx((7, 3.6))
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["ICL 1-shot"] + [pt.label(x) for x in SLICE[1:]]
    assert ax.lines[0].get_color() == "k" and len(ax.lines[0].get_xdata()) == 18
    assert "n = 32 prompts" in ax.get_title()


def test_figures_render(figures, tmp_path):
    for name, fig in figures.items():
        fig.savefig(tmp_path / f"{name}.png", dpi=40)
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


# --------------------------------------------------------------------------------------------------------------------
# The glued values
# --------------------------------------------------------------------------------------------------------------------


def test_every_value_the_chapter_quotes_is_glued(glued, committed, data_dir):
    runs = committed[0][MODEL]
    searches = {t: tu.collect_lr_searches(ModelKey.of(MODEL), load_task(t, data_dir), tu.SIZES["book"]) for t in runs}
    searched = pt.search_values(runs, runs, searches, tu.SIZES["fixed"], ORDER)  # the chapter's second set of values
    assert {"lr_n_choices", "lr_n_edge", "lr_n_moved", "fixed_gain_anchor", "searched_gain_pez-8"} <= set(searched)
    glued = {**glued, **searched}
    cells = json.loads((ROOT / "book" / "tuning.ipynb").read_text())["cells"]
    prose = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    quoted = set(re.findall(r"\{glue:text\}`([^`]+)`", prose))
    assert len(quoted) > 50
    from helpers.pages.verdicts import chapter_verdicts  # the verdict words, glued beside pt.glued's values

    verdicts = chapter_verdicts("book/tuning")
    assert {"verdict_prefix_theorem", "verdict_prefix_theorem__qwen2_5_coder_0_5b"} <= quoted & set(verdicts)
    assert quoted <= set(glued) | set(verdicts), sorted(quoted - set(glued) - set(verdicts))
    assert set(re.findall(r"\{glue:figure\} (\S+)", prose)) == FIGURES
    expected = {f"{p}_{m}_{t}" for p in ("gain", "gain2") for m in ORDER[1:] for t in TASKS}
    assert expected <= set(glued)


def test_glued_values_of_the_committed_slice(glued):
    assert glued["acc_icl_sst2"] == "50.0 [37.5, 61.0]" and glued["n_sst2"] == "64 × 1"
    assert glued["gain_anchor_trec"] == "-4.7 [-14.1, 3.1]" and glued["gain_prefix-1_sst2"] == "6.2 [-4.7, 15.6]"
    assert glued["gain_anchor"] == "SST-2 -4.7 [-15.6, 6.2]; TREC -4.7 [-14.1, 3.1]"
    assert glued["gain_prompt-4_sst2"] == "not run" and glued["acc_icl_agnews"] == "not run"
    assert glued["gain_prompt-4"] == "not run"
    assert glued["n_params_anchor"] == "SST-2 144, TREC 432"
    assert glued["tasks_shown"] == "SST-2, TREC"
    assert glued["main_task"] == "SST-2" and glued["best_context"] == "PEZ hard prompt, m = 8"
    assert glued["gain_anchor_main"] == "-4.7 [-15.6, 6.2]" and glued["p_best"] == "8"
    assert glued["best_minus_anchor"] == "31.2 [14.1, 46.9] (interval above 0)"
    assert glued["pez_changed"] == "8" and glued["gain_pez_main"] == "26.6 [12.5, 40.6]"
    assert glued["avg_n"] == "64 × 1 × 2 tasks" and glued["avg_seeds"] == "42"
    assert glued["avg_gain_anchor"] == "-4.7 [-11.7, 2.3]" and glued["avg_gain_prefix-4"] == "not run on every task"
    assert glued["best_avg"] == "PEZ hard prompt, m = 8" and glued["avg_missing"].startswith("prompt tuning, m = 4")
    # paired against re-weighting, averaged over the tasks: above, level with it (interval contains 0), below
    assert glued["avg_vs_anchor"].startswith("prompt tuning, m = 1 12.5 [3.9, 21.1]; prefix-tuning, m = 1 8.6")
    assert glued["avg_above_anchor"] == "prompt tuning, m = 1, prefix-tuning, m = 1, PEZ hard prompt, m = 8"
    assert glued["avg_level_anchor"] == "none"
    assert glued["avg_below_anchor"] == "none"
    assert glued["context_above"] == "prompt tuning, m = 1, PEZ hard prompt, m = 8"
    assert glued["closing_table_avg"].startswith("ICL 1-shot (0 parameters): 53.1 [44.5, 62.5]%; anchor "
                                                 "re-weighting (144–432 parameters): 48.4")
    # the anchors' share in the second half of the layers (layers 10 to 18 of 18), and its largest departure
    assert (glued["share_base_deep"], glued["share_anchor_deep"]) == ("8.5%", "6.0%")
    assert (glued["share_prefix_deep"], glued["share_prompt_deep"]) == ("m = 1: 5.7%", "m = 1: 8.0%")
    assert glued["share_max_dep"] == "8.4"
    assert glued["share_worst"] == "anchor re-weighting, layer 18: 11.8% with ICL, 3.4% after training"
    assert glued["deep_range"] == "0.18 to 0.82" and glued["tv_deep_prefix"] == "m = 1: 0.25"
    assert glued["acc2_icl_sst2"] == "81.2 [70.3, 90.6]" and glued["gain2_anchor_sst2"] == "-4.7 [-14.1, 3.1]"
    assert glued["acc2_icl_emoc"] == "not run" and glued["second_tasks"] == "SST-2 (n = 64 × 1)"
    assert float(glued["dev_prefix"]) < 1e-5 < 1e-3 < float(glued["dev_anchor"])  # the theorem, and re-weighting
    assert float(glued["dev_floor"]) < 1e-5 and float(glued["dev2_prefix"]) < 1e-3
    assert glued["in_short"].startswith("Averaged over 2 tasks with Gemma 3 270M (n = 64 × 1 test examples")
    assert "by 10.2 [1.6, 18.8]; paired, they differ by 14.8 [6.2, 22.7] points" in glued["in_short"]
    assert "as the theorem says" in glued["in_short"]
    assert "(interval above 0; optimistic, as the best was chosen on the same examples). On SST-2" in glued["in_short"]
    assert "its held-out search on training examples chose" in glued["in_short"]
    assert glued["coverage"].startswith("gemma-3-270m: SST-2: seed 42;")


def test_one_task_and_no_second_model(committed):
    runs, floors = committed
    values = pt.glued({MODEL: {"sst2": runs[MODEL]["sst2"]}}, floors, SLICE, MODEL, SECOND)
    second = {k: v for k, v in values.items() if k.startswith(("dev2_", "acc2_", "n2_", "gain2_", "second_"))}
    assert len(second) == 7 + len(TASKS) * (2 + len(SLICE) - 1)
    assert set(second.values()) == {"not run"}
    assert f"{SECOND}: not run." in values["coverage"]
    # one task: no average over tasks, and the summary speaks of SST-2 alone
    assert values["avg_n"] == values["best_avg"] == values["closing_table_avg"] == "not computed"
    assert values["in_short"].startswith("On SST-2 with Gemma 3 270M (n = 64 × 1 test examples × seeds), anchor "
                                         "re-weighting (144 parameters) changes 1-shot accuracy by -4.7 [-15.6, 6.2]")
