"""The Aggregation chapter's tables, figures and glued values (helpers.pages.aggregation), on a small slice of the
committed results (two tasks, two seeds, a few examples each); no model is loaded."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers.pages import aggregation as page  # noqa: E402

MODEL = "gemma-3-270m"
TASKS = ("sst2", "trec")
N, SEEDS, N_BOOT = 8, 2, 50


@pytest.fixture(scope="module")
def committed(data_dir):
    """Flows, saliency examples and isolation runs of the committed book results, sliced small."""
    from helpers import load_task
    from helpers.core.runs import PROFILES, ModelKey
    from helpers.experiments.aggregation import isolation_runs, saliency_control_runs, saliency_examples, saliency_runs

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANCHORS_REQUIRE_CACHED", "1")
        lm, profile = ModelKey.of(MODEL), PROFILES["book"]
        data = {t: load_task(t, data_dir) for t in TASKS}
        flows = {t: [f[:N] for f in saliency_runs(lm, d, profile)[:SEEDS]] for t, d in data.items()}
        iso = {t: [{k: v[:N] for k, v in r.items()} for r in isolation_runs(lm, d, profile)[:SEEDS]]
               for t, d in data.items()}
        examples = {t: saliency_examples(lm, d) for t, d in data.items()}
        ctrl = {t: [f[:N] for f in saliency_control_runs(lm, d, profile)[:SEEDS]] for t, d in data.items()}
    return SimpleNamespace(data=data, flows=flows, iso=iso, examples=examples, ctrl=ctrl)


@pytest.fixture(scope="module")
def flow(committed):
    from helpers.experiments.aggregation import flow_estimate, flow_gap_estimate, lead_layers

    est = {t: flow_estimate(f, n_boot=N_BOOT) for t, f in committed.flows.items()}
    lead = {t: lead_layers(flow_gap_estimate(f, n_boot=N_BOOT)) for t, f in committed.flows.items()}
    return SimpleNamespace(flows=committed.flows, est=est, lead=lead, n_layers=committed.flows["sst2"][0].shape[-1])


@pytest.fixture(scope="module")
def loyalty(committed):
    from helpers.experiments.aggregation import loyalty_estimates

    pooled = [r for runs in committed.iso.values() for r in runs]
    return SimpleNamespace(iso=committed.iso, pooled=pooled,
                           per_task={t: loyalty_estimates(r, n_boot=N_BOOT) for t, r in committed.iso.items()},
                           avg=loyalty_estimates(pooled, n_boot=N_BOOT))


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


# -- the flows ---------------------------------------------------------------------------------------------------


def test_flow_figure_draws_one_panel_per_task_with_three_flows(flow):
    fig = page.flow_figure(flow.est, MODEL, marked_layers=[6, 12])
    assert isinstance(fig, plt.Figure)
    axes = _visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["SST-2", "TREC"]
    for ax, task in zip(axes, TASKS):
        curves = [line for line in ax.get_lines() if line.get_label().startswith("$S_")]
        assert len(curves) == 3  # S_wp, S_pq, S_ww (the other lines mark the global layers)
        assert list(curves[1].get_ydata()) == pytest.approx(list(flow.est[task].value[1]))
    assert fig.get_suptitle() == f"{MODEL}: information flow per layer\n(n = {N} × {SEEDS} per task)"


def test_flow_table_has_a_row_per_task_and_the_lead_layers(flow):
    styler = page.flow_table(flow.flows, flow.est, flow.lead)
    df = styler.data
    assert list(df.index) == ["SST-2", "TREC"]
    assert df.columns[0] == "S_pq − S_wp, layers 1–5"
    for title, task in zip(df.index, TASKS):
        ld = flow.lead[task]
        assert df.loc[title, "S_pq first ahead at"] == ld["first"]
        assert df.loc[title, "S_wp ahead again at"] == (", ".join(map(str, ld["flip_backs"])) or "–")
        assert df.loc[title, "same signs in every seed"] == ("yes" if ld["per_seed_agree"] else "no")
        assert df.loc[title, "S_pq − S_wp, layers 1–5"].count("[") == 1
    assert f"n = {N} × {SEEDS} per task" in styler.caption


def test_flow_values_quote_the_estimates(flow):
    from helpers.experiments.aggregation import gap_over_layers

    values = page.flow_values(flow.flows, flow.est, flow.lead)
    assert set(values) == {"n_flow_text", "n_layers", "first_lead", "for_good", "flips_sst2", "flips_trec",
                           "n_flips", "n_clear_flips", "n_seed_agree", "shallow_gap_max", "pq_at_6", "ww_above_pq",
                           "ww_share"}
    assert values["n_flips"] == sum(len(ld["flip_backs"]) for ld in flow.lead.values())
    assert values["n_clear_flips"] == sum(len(ld["clear_flip_backs"]) for ld in flow.lead.values())
    assert values["n_clear_flips"] <= values["n_flips"]
    assert values["n_flow_text"] == f"{N} × {SEEDS}"
    assert values["n_layers"] == flow.n_layers
    assert values["first_lead"] == ", ".join(map(str, sorted({ld["first"] for ld in flow.lead.values()})))
    assert values["n_seed_agree"] == sum(ld["per_seed_agree"] for ld in flow.lead.values())
    assert values["pq_at_6"] == f"{min(e.value[1, 5] for e in flow.est.values()):.2f}"
    high = max(gap_over_layers(f, 1, 5).high for f in flow.flows.values())
    assert values["shallow_gap_max"] == f"{high:.2f}"
    assert values["ww_above_pq"].endswith("(TREC)") and "(SST-2), " in values["ww_above_pq"]
    assert values["ww_share"].startswith("SST-2 ") and "%" in values["ww_share"]


def test_attention_window_reads_the_config_and_the_longest_prompt(committed, offline_tokenizers):
    from helpers.core.runs import PROFILES, make_prompts

    tokenizer = offline_tokenizers[MODEL]
    profile = dataclasses.replace(PROFILES["book"], seeds=(42,), n_test=3)
    cfg = SimpleNamespace(sliding_window=512, rope_parameters={"sliding_attention": {"rope_theta": 10000.0},
                                                               "full_attention": {"rope_theta": 1000000.0}})
    lm = SimpleNamespace(model=SimpleNamespace(config=cfg), tokenizer=tokenizer, max_length=4096)
    values, table = page.attention_window(lm, committed.data, profile, MODEL, [6, 12, 18])
    longest = max(len(p) for d in committed.data.values() for p in make_prompts(lm, d, 42, 3, 1, per_example=True))
    assert values == {"global_layers": "6, 12, 18", "window": "512", "max_prompt": str(longest),
                      "rope_local": "10,000", "rope_global": "1,000,000"}
    assert list(table.index) == [MODEL]
    assert table.loc[MODEL].tolist() == ["6, 12, 18", 512, longest]

    bare = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace()), tokenizer=tokenizer, max_length=4096)
    values, _ = page.attention_window(bare, committed.data, profile, MODEL, [])
    assert values["global_layers"] == "none (all layers alike)"
    assert values["window"] == "None" and values["rope_local"] == values["rope_global"] == "n/a"


# -- the position control ------------------------------------------------------------------------------------------


def test_control_estimate_normalises_each_position_set_per_layer(committed):
    from helpers.core.saliency import normalise_per_layer

    runs = committed.ctrl["sst2"]
    assert runs[0].shape[:3] == (N, 2, 3)
    est = page.control_estimate(runs)
    assert est.value.shape == (2, 3, runs[0].shape[-1]) and est.n == f"{N} × {SEEDS}"
    for where in (0, 1):
        expected = sum(normalise_per_layer(f[:, where]) for f in runs) / SEEDS
        assert est.value[where] == pytest.approx(expected)
        assert est.value[where].sum(axis=0) == pytest.approx(1.0)
    assert (est.low <= est.value + 1e-12).all() and (est.value <= est.high + 1e-12).all()
    assert est.hierarchical  # the interval includes the demonstration draw


def test_control_figure_draws_label_words_beside_random_positions(committed):
    est = {t: page.control_estimate(c) for t, c in committed.ctrl.items()}
    fig = page.control_figure(est, MODEL, marked_layers=[6, 12])
    axes = _visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["SST-2", "TREC"]
    for ax, task in zip(axes, TASKS):
        curves = [line for line in ax.get_lines() if line.get_label().startswith("S_")]
        assert [c.get_label() for c in curves] == ["S_wp, label words", "S_wp, random positions",
                                                   "S_pq, label words", "S_pq, random positions"]
        assert [c.get_linestyle() for c in curves] == ["-", "--", "-", "--"]
        assert list(curves[3].get_ydata()) == pytest.approx(list(est[task].value[1, 1]))  # S_pq, random
        assert list(curves[0].get_ydata()) == pytest.approx(list(est[task].value[0, 0]))  # S_wp, label words
        assert len(ax.collections) == 4  # a band per curve
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:4] == ["$S_{wp}$ at the label words", "$S_{wp}$ at the random positions",
                          "$S_{pq}$ at the label words", "$S_{pq}$ at the random positions"]
    assert legend[-2:] == ["global-attention layer", "95% bootstrap band"]
    assert f"(n = {N} × {SEEDS} per task; each normalised per layer)" in fig.get_suptitle()


def test_control_values_quote_label_words_against_random_positions(committed):
    from helpers.core.saliency import normalise_per_layer

    values = page.control_values(committed.ctrl, deep_from=10)
    ranges = ("wp_shallow", "pq_shallow", "pq_deep", "gap_last")
    assert set(values) == ({"ctrl_n", "ctrl_deep_from", "ctrl_pq_deep_ratio", "ctrl_wp_shallow_ratio"}
                           | {f"ctrl_{r}_{w}" for r in ranges for w in ("label", "random", "diff")})
    assert values["ctrl_n"] == f"{N} × {SEEDS}" and values["ctrl_deep_from"] == 10
    pooled = [f for runs in committed.ctrl.values() for f in runs]
    n_layers = pooled[0].shape[-1]
    pq_random = np.mean([normalise_per_layer(f[:, 1])[1, 9:].mean() for f in pooled])
    assert values["ctrl_pq_deep_random"].startswith(f"{pq_random:.2f} [")
    wp_label = np.mean([normalise_per_layer(f[:, 0])[0, :5].mean() for f in pooled])
    assert values["ctrl_wp_shallow_label"].startswith(f"{wp_label:.2f} [")
    gap = np.mean([(lambda c: (c[1] - c[0])[n_layers - 5:].mean())(normalise_per_layer(f[:, 0])) for f in pooled])
    assert values["ctrl_gap_last_label"].startswith(f"{gap:.2f} [")
    ratio = np.mean([f[:, 0, 1, 9:].mean(0).sum() / f[:, 1, 1, 9:].mean(0).sum() for f in pooled])
    assert values["ctrl_pq_deep_ratio"].startswith(f"{ratio:.0f} [")


def test_control_values_see_no_difference_when_the_positions_are_the_label_words():
    """Random positions that carry the same flows as the label words: differences 0, raw ratios 1."""
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(3):
        f = rng.random((6, 1, 3, 18)) + 0.1
        runs.append(np.concatenate([f, f], axis=1))
    values = page.control_values({"sst2": runs, "trec": runs}, deep_from=10)
    for r in ("wp_shallow", "pq_shallow", "pq_deep", "gap_last"):
        assert values[f"ctrl_{r}_diff"] == "0.00 [0.00, 0.00]"
        assert values[f"ctrl_{r}_label"] == values[f"ctrl_{r}_random"]
    assert values["ctrl_pq_deep_ratio"] == "1 [1, 1]" and values["ctrl_wp_shallow_ratio"] == "1.0 [1.0, 1.0]"
    doubled = [np.concatenate([f[:, :1] * np.array([1, 2, 1])[:, None], f[:, 1:]], axis=1) for f in runs]
    assert page.control_values({"sst2": doubled}, deep_from=10)["ctrl_pq_deep_ratio"] == "2 [2, 2]"


# -- one example's saliency ----------------------------------------------------------------------------------------


def test_strip_figure_draws_every_layer(committed):
    ex = committed.examples["sst2"]
    n_layers = ex["matrices"].shape[1]
    fig = page.strip_figure(committed.examples, marked_layers=[6])
    images = [ax for ax in _visible_axes(fig) if ax.get_images()]
    assert len(images) == n_layers
    n_tok = int(ex["lengths"][0])
    assert images[0].get_images()[0].get_array().shape == (n_tok, n_tok)
    assert images[5].get_title() == "layer 6 (global)" and images[0].get_title() == "layer 1"
    assert fig.get_suptitle() == "SST-2, example 1: saliency in every layer"


def test_matrix_figure_draws_two_layers_with_token_names(committed):
    tokenizer = SimpleNamespace(convert_ids_to_tokens=lambda ids: [f"tok{i}" for i in ids])
    fig = page.matrix_figure(committed.examples, tokenizer, layers=(1, 10))
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert [ax.get_title() for ax in panels] == ["layer 1", "layer 10"]
    assert len(fig.axes) == 3  # two matrices and one colour bar
    ex = committed.examples["sst2"]
    ticks = [t.get_text() for t in panels[0].get_xticklabels()]
    assert ticks[-1] == f"tok{ex['input_ids'][0][int(ex['target'][0])]}"
    assert fig.get_size_inches()[1] == pytest.approx(3.9)


# -- isolation ---------------------------------------------------------------------------------------------------


def test_loyalty_figure_draws_four_bars_per_metric(loyalty):
    fig = page.loyalty_figure(loyalty.avg, loyalty.iso, MODEL)
    assert len(fig.axes) == 2
    for ax, metric in zip(fig.axes, ["label loyalty", "word loyalty@5"]):
        heights = [p.get_height() for p in ax.patches]
        assert heights == pytest.approx([loyalty.avg[c][metric].value for c in page.CONDITIONS])
    n = f"{N} examples × {SEEDS} seeds × {len(TASKS)} tasks"
    assert fig.get_suptitle().startswith(f"{MODEL}: isolation in the first / last 5 layers (mean of 2 tasks)")
    assert n in fig.get_suptitle()


def test_loyalty_tables_one_per_metric(loyalty):
    tables = page.loyalty_tables(loyalty.per_task, loyalty.avg, loyalty.iso)
    assert list(tables) == ["tbl_label", "tbl_word5", "tbl_word10"]
    for key, metric in page.TABLES.items():
        df = tables[key].data
        assert list(df.index) == ["SST-2", "TREC", "average"]
        assert list(df.columns) == page.CONDITION_COLUMNS
        assert df.loc["average", "random, first 5"] == loyalty.avg["random-first-5"][metric].fmt(0)
        assert df.loc["TREC", "label words, last 5"] == loyalty.per_task["trec"]["label-last-5"][metric].fmt(0)
        assert tables[key].caption == f"{metric} (%), 95% intervals; n = {N} examples × {SEEDS} seeds per task"


def test_loyalty_values(loyalty):
    from helpers.core.stats import pooled_over
    from helpers.experiments.aggregation import KS, loyalty_difference

    values = page.loyalty_values(loyalty.avg, loyalty.iso)
    expected = ({"n_iso_text", "random_cost", "label_vs_random", "label_vs_random_w"}
                | {f"{m}_{c}" for m in ("ll", "wl") for c in page.CONDITIONS}
                | {f"ll_{w}_{k}" for w in ("first", "last") for k in KS})
    assert set(values) == expected
    assert values["n_iso_text"] == f"{N} examples × {SEEDS} seeds × {len(TASKS)} tasks"
    assert values["ll_label-first-5"] == loyalty.avg["label-first-5"]["label loyalty"].fmt(0)
    assert values["wl_random-last-5"] == loyalty.avg["random-last-5"]["word loyalty@5"].fmt(0)
    assert values["ll_first_5"] == values["ll_label-first-5"]
    r = loyalty.avg["random-first-5"]["label loyalty"]
    assert values["random_cost"] == f"{100 - r.value:.0f} [{100 - r.high:.0f}, {100 - r.low:.0f}]"
    with pooled_over(len(TASKS)):  # the seeds are drawn within each task, as the verdict page draws them
        expected = loyalty_difference(loyalty.pooled, "random-first-5", "label-first-5")
    assert values["label_vs_random"] == expected.fmt(0)


def test_sweep_figure_draws_both_metrics_against_k(loyalty):
    from helpers.experiments.aggregation import KS

    fig = page.sweep_figure(loyalty.avg, loyalty.iso, MODEL)
    assert len(fig.axes) == 2
    assert [ax.get_ylabel() for ax in fig.axes] == ["label loyalty (%)", "word loyalty@5 (%)"]
    label_first = fig.axes[0].get_lines()[0]
    assert list(label_first.get_xdata()) == list(KS)
    assert list(label_first.get_ydata()) == pytest.approx(
        [loyalty.avg[f"label-first-{k}"]["label loyalty"].value for k in KS])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "label words, first k", "random, first k", "label words, last k", "random, last k"]
    assert f"(n = {N} examples × {SEEDS} seeds × 2 tasks)" in fig.get_suptitle()


def test_verdict_margins_are_the_verdict_pages_position_control():
    from helpers.pages import aggregation as page
    from helpers.pages.verdicts import FINDINGS, evaluate

    margins = page.verdict_margins("gemma-3-270m")
    measured, _ = evaluate(FINDINGS["flow-deep"], "gemma-3-270m")
    assert margins["flow_deep_margin"] == measured.support["position control"].fmt(2)
    assert set(margins) == {"flow_shallow_margin", "flow_deep_margin"}
    assert page.verdict_margins("smollm2-135m") == {"flow_shallow_margin": "not computed",
                                                     "flow_deep_margin": "not computed"}
