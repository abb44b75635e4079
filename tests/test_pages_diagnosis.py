"""The Diagnosis chapter's tables, figures and glued values (helpers.pages.diagnosis), on a small slice of the
committed results (two models, two tasks, seed 42, the first test examples) and on small synthetic estimates; no
model is loaded."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers.core.stats import Estimate  # noqa: E402
from helpers.pages import diagnosis as page  # noqa: E402

MODEL, SECOND = "gemma-3-270m", "qwen2.5-coder-0.5b"
TASKS = ("trec", "emoc")
N, M, N_BOOT, SEED = 200, 10, 50, 42
PER_EXAMPLE = ("probs", "pred", "gold", "query_pc")  # the stored arrays with one row per test example


@pytest.fixture(scope="module")
def committed(data_dir):
    """The committed diagnosis results (seed 42), cut to their first test examples, with the chapter's estimates."""
    from helpers import load_task
    from helpers.core.runs import PROFILES, ModelKey
    from helpers.experiments import diagnosis as dg

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANCHORS_REQUIRE_CACHED", "1")
        data = {t: load_task(t, data_dir) for t in TASKS}
        runs = {m: {t: [{k: v[:N] if k in PER_EXAMPLE else v for k, v in r.items()}
                        for r in dg.diagnosis_runs(ModelKey.of(m), d, PROFILES["book"], seeds=(SEED,))]
                    for t, d in data.items()} for m in (MODEL, SECOND)}
    n_layers = {m: per["trec"][0]["khat"].shape[0] for m, per in runs.items()}
    layer_of = {m: dg.default_layer(n) for m, n in n_layers.items()}
    summaries = {m: {t: dg.summary(rs, layer_of[m], M, n_boot=N_BOOT) for t, rs in per.items()}
                 for m, per in runs.items()}
    curves = {m: {t: dg.layer_curve(rs, M, n_boot=N_BOOT) for t, rs in per.items()} for m, per in runs.items()}
    return SimpleNamespace(runs=runs, n_layers=n_layers, layer_of=layer_of, summaries=summaries, curves=curves)


@pytest.fixture(scope="module")
def base(committed):
    return page.baseline_estimates(committed.runs, committed.layer_of, M, n_boot=N_BOOT)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _estimate(value, n_examples=10, n_seeds=1):
    value = np.asarray(value, dtype=float)
    return Estimate(value[()], (value - 0.1)[()], (value + 0.1)[()], n_examples, n_seeds, value[None])


def test_pair_text_names_both_classes():
    assert page.pair_text("trec", (0, 2)) == "Abbreviation–Description"
    assert page.pair_text("trec", (5, 1)) == "Number–Entity"


def test_run_values(committed):
    values = page.run_values(committed.runs, committed.n_layers, committed.layer_of, (SEED,), MODEL, SECOND)
    assert values == {"n_trec": N, "n_emoc": N, "n_seeds": 1, "seeds": "42",
                      "layer_main": committed.layer_of[MODEL] + 1, "layers_main": 18,
                      "layer_second": committed.layer_of[SECOND] + 1, "layers_second": 24,
                      "max_key_spread": values["max_key_spread"]}
    spread = max(float(r["key_spread"].max()) for per in committed.runs.values() for rs in per.values() for r in rs)
    assert values["max_key_spread"] == f"{spread:.1e}"
    alone = page.run_values({MODEL: committed.runs[MODEL]}, committed.n_layers, committed.layer_of, (42, 43), MODEL)
    assert "layer_second" not in alone and alone["seeds"] == "42, 43" and alone["n_seeds"] == 2


def test_heatmap_figure_draws_predicted_beside_real(committed):
    s = committed.summaries[MODEL]["trec"]
    fig = page.heatmap_figure(committed.summaries, committed.runs, MODEL, "trec", committed.layer_of,
                              committed.n_layers, M, SEED)
    images = [ax for ax in fig.axes if ax.get_images()]
    assert [ax.get_title() for ax in images] == ["predicted: anchor distance", "real: AUC-ROC"]
    shown = images[1].get_images()[0].get_array()
    assert shown[0, 1] == pytest.approx(s["real"][0][0, 1])
    assert np.ma.is_masked(shown[0, 0]) or np.isnan(shown[0, 0])  # the diagonal is left blank
    layer = committed.layer_of[MODEL] + 1
    assert fig.get_suptitle() == f"{MODEL}, TREC: layer {layer} of 18, M = {M}, seed {SEED}, n = {N} test examples"


def test_agreement_table(committed):
    df = page.agreement_table(committed.summaries, committed.layer_of, committed.n_layers, M)
    assert list(df.index) == [(m, t) for m in (MODEL, SECOND) for t in ("TREC", "EmoC")]
    row = df.loc[(SECOND, "EmoC")]
    s = committed.summaries[SECOND]["emoc"]
    assert row[f"ρ (M = {M}) [95%]"] == s["rho"].fmt(2)
    assert row["layer"] == f"{committed.layer_of[SECOND] + 1} of 24"
    assert row["accuracy %"] == round(100 * s["accuracy"][0], 1)
    assert row["exact p"] == f"{s['p'][0]:.3f}" and row["smallest possible p"] == f"1/{s['n_permutations']}"
    assert row["most confused (real)"] == page.pair_text("emoc", s["pairs"][0]["real"])
    assert row["rank of the real one"] == f"{s['pairs'][0]['rank_of_real']} of 6"  # 4 classes: 6 pairs


def test_agreement_values(committed):
    values = page.agreement_values(committed.summaries, committed.runs, MODEL)
    per_case = ("rho", "p", "real", "pred", "rank", "realauc", "realn", "acc")
    assert set(values) == ({f"{k}_{key}_{t}" for k in per_case for key in ("main", "second") for t in TASKS}
                           | {"n_signif", "n_tests", "min_p"})
    s = committed.summaries[MODEL]["trec"]
    i, j = s["pairs"][0]["real"]
    gold = committed.runs[MODEL]["trec"][0]["gold"]
    assert values["realauc_main_trec"] == f"{s['real'][0][i, j]:.2f}"
    assert values["realn_main_trec"] == f"{np.sum(gold == i)} and {np.sum(gold == j)}"
    assert values["acc_main_trec"] == f"{100 * s['accuracy'][0]:.0f}%"
    all_p = [s["p"][0] for per in committed.summaries.values() for s in per.values()]
    assert values["n_tests"] == 4 and values["n_signif"] == sum(p < 0.05 for p in all_p)
    assert values["min_p"] == f"{min(all_p):.3f}"


def test_curves_figure_marks_the_chosen_layer(committed):
    fig = page.curves_figure(committed.curves, committed.layer_of, M)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [MODEL, SECOND]
    lines = [line for line in axes[1].get_lines() if len(line.get_xdata()) > 2]
    assert len(lines) == len(TASKS)
    assert list(lines[0].get_ydata()) == pytest.approx(list(committed.curves[SECOND]["trec"].value), nan_ok=True)
    marks = [line.get_xdata()[0] for line in axes[0].get_lines() if line.get_linestyle() == "--"]
    assert marks == [committed.layer_of[MODEL] + 1]
    assert fig.get_suptitle().startswith(f"agreement per layer (M = {M})")


def test_best_layer_table(committed):
    df = page.best_layer_table(committed.curves, committed.runs, committed.layer_of, M, n_boot=N_BOOT)
    assert list(df.index) == [(m, t) for m in (MODEL, SECOND) for t in ("TREC", "EmoC")]
    est = committed.curves[MODEL]["emoc"]
    row = df.loc[(MODEL, "EmoC")]
    assert row["best layer"] == int(np.nanargmax(est.value)) + 1 and row["of"] == 18
    assert row["ρ at the paper's depth"] == f"{est.value[committed.layer_of[MODEL]]:.2f}"
    assert row["layers with ρ > 0"] == f"{int(np.sum(est.value > 0))} of 18"


def test_best_layer_values_on_synthetic_curves():
    curves = {"a": {"trec": _estimate([0.1, 0.5, 0.2])}, "b": {"trec": _estimate([-0.2, 0.0, 0.4])}}
    assert page.best_layer_values(curves, "a") == {
        "best_main_trec": 2, "bestrho_main_trec": "0.50", "meanrho_main_trec": "0.27",
        "best_second_trec": 3, "bestrho_second_trec": "0.40", "meanrho_second_trec": "0.07",
        "layer_span_min": "0.40", "layer_span_max": "0.60"}


def test_direction_sweep(committed):
    from helpers.experiments import diagnosis as dg

    values, df = page.direction_sweep(committed.runs, committed.layer_of, M, n_boot=N_BOOT)
    assert list(df.columns) == ["M = 5", "M = 10", "M = 20", "M = 50", "all dimensions (no PCA)",
                                "variance in the top 10 directions %"]
    rs = committed.runs[SECOND]["trec"]
    rhos = [dg.summary(rs, committed.layer_of[SECOND], mm, n_boot=N_BOOT)["rho"] for mm in dg.MS]
    assert df.loc[(SECOND, "TREC"), "M = 10"] == rhos[1].fmt(2)
    explained = round(100 * float(rs[0]["explained"][committed.layer_of[SECOND], :10].sum()), 1)
    assert df.loc[(SECOND, "TREC"), "variance in the top 10 directions %"] == explained
    assert set(values) == {"m_span"} and float(values["m_span"]) >= max(r.value for r in rhos) - min(
        r.value for r in rhos) - 0.005


def test_baseline_estimates_figure_and_table(committed, base):
    from helpers.experiments import diagnosis as dg

    assert list(base) == [MODEL, SECOND] and list(base[MODEL]) == list(dg.BASELINES)
    rs = committed.runs[MODEL]["emoc"]
    expected = dg.summary(rs, committed.layer_of[MODEL], M, predictor="label-word embeddings", n_boot=N_BOOT)["rho"]
    assert base[MODEL]["label-word embeddings"]["emoc"].value == pytest.approx(expected.value)

    fig = page.baseline_figure(base, SECOND, committed.layer_of, M)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == list(dg.BASELINES)
    assert ax.get_title() == f"{SECOND}: layer {committed.layer_of[SECOND] + 1}, M = {M}, n = {N} × 1"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["TREC", "EmoC"]

    df = page.baseline_table(base)
    assert list(df.index) == [(m, p) for m in (MODEL, SECOND) for p in dg.BASELINES]
    assert list(df.columns) == ["TREC", "EmoC"]
    assert df.loc[(SECOND, "mean query per gold class"), "EmoC"] == base[SECOND]["mean query per gold class"][
        "emoc"].fmt(2)


def test_baseline_values_count_the_cases_without_anchors():
    def table(anchor, query, emb):
        return {"anchor keys, query PCA": {"trec": _estimate(anchor)}, "anchor keys, all dimensions":
                {"trec": _estimate(0.0)}, "mean query per gold class": {"trec": _estimate(query)},
                "label-word embeddings": {"trec": _estimate(emb)}}

    values = page.baseline_values({"a": table(0.5, 0.6, -0.1), "b": table(0.3, 0.3, 0.2)}, "a")
    assert values == {"base_query_main_trec": "0.60 [0.50, 0.70]", "base_emb_main_trec": "-0.10 [-0.20, 0.00]",
                      "base_query_second_trec": "0.30 [0.20, 0.40]", "base_emb_second_trec": "0.20 [0.10, 0.30]",
                      "n_cases": 2, "n_query_beats": 2, "n_emb_beats": 0, "n_emb_negative": 1}  # a tie counts


def test_summary_table(committed, base):
    df = page.summary_table(committed.summaries, committed.curves, base)
    assert list(df.index) == [(m, t) for m in (MODEL, SECOND) for t in ("TREC", "EmoC")]
    s, est = committed.summaries[SECOND]["trec"], committed.curves[SECOND]["trec"]
    row = df.loc[(SECOND, "TREC")]
    pairs = s["pairs"][0]
    assert row["most confused: predicted / real"] == (f"{page.pair_text('trec', pairs['predicted'])} / "
                                                      f"{page.pair_text('trec', pairs['real'])}")
    best = int(np.nanargmax(est.value))
    assert row["best layer (ρ)"] == f"{best + 1} ({est.value[best]:.2f})"
    assert row["no anchors: embeddings ρ"] == base[SECOND]["label-word embeddings"]["trec"].fmt(2)


def test_public_functions_say_where_they_are_used():
    import inspect

    source = inspect.getsource(page)
    assert "helpers.cli" not in source and "from ..cli" not in source
    for name in page.__all__:
        obj = getattr(page, name)
        if callable(obj):
            assert "Used in: Diagnosis" in obj.__doc__, name
