"""The Extraction chapter's tables, figures and glued values (helpers.pages.extraction), on a small slice of the
committed results (two models, two tasks, two seeds, a few examples each) and on small synthetic estimates; no model
is loaded."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers.core.stats import Estimate  # noqa: E402
from helpers.pages import extraction as page  # noqa: E402

MODEL, SECOND = "gemma-3-270m", "qwen2.5-coder-0.5b"
TASKS = ("sst2", "agnews")
N, SEEDS, N_BOOT = 24, 2, 50


def _slice(per_seed):
    return [{k: v[:N] for k, v in r.items()} for r in per_seed[:SEEDS]]


@pytest.fixture(scope="module")
def committed(data_dir):
    """One- and two-shot extraction runs of the committed book results, sliced small, with their estimates."""
    from helpers import load_task
    from helpers.core.runs import PROFILES, ModelKey
    from helpers.experiments.extraction import auc_estimates, extraction_runs

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANCHORS_REQUIRE_CACHED", "1")
        profile = PROFILES["book"]
        data = {t: load_task(t, data_dir) for t in TASKS}
        runs = {m: {t: _slice(extraction_runs(ModelKey.of(m), d, profile, shots=1)) for t, d in data.items()}
                for m in (MODEL, SECOND)}
        runs2 = {t: _slice(extraction_runs(ModelKey.of(MODEL), d, profile, shots=2)) for t, d in data.items()}
    est = {m: {t: auc_estimates(r, n_boot=N_BOOT) for t, r in per.items()} for m, per in runs.items()}
    est2 = {t: auc_estimates(r, n_boot=N_BOOT) for t, r in runs2.items()}
    return SimpleNamespace(runs=runs, est=est, runs2=runs2, est2=est2, n_layers=runs[MODEL]["sst2"][0]["attention"]
                           .shape[1])


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _estimate(value, low=None, high=None, n_examples=10, n_seeds=2):
    value = np.asarray(value, dtype=float)
    low = value - 0.1 if low is None else np.asarray(low, dtype=float)
    high = value + 0.1 if high is None else np.asarray(high, dtype=float)
    return Estimate(value[()], low[()], high[()], n_examples, n_seeds, np.stack([value] * n_seeds))


def _curves(ax):
    return [line for line in ax.get_lines() if len(line.get_xdata()) > 2]


# -- one demonstration per class -----------------------------------------------------------------------------------


def test_auc_figure_draws_auc_and_r_per_model(committed):
    fig = page.auc_figure(committed.est, marked_layers={MODEL: [6, 12], SECOND: []})
    assert len(fig.axes) == 4  # (AUCROC_l, R_l) × two models
    assert fig.axes[0].get_ylabel() == f"{MODEL}\nAUCROC$_l$" and fig.axes[2].get_ylabel() == f"{SECOND}\nAUCROC$_l$"
    first = _curves(fig.axes[0])
    assert [line.get_label() for line in first] == ["SST-2", "AG News"]
    assert list(first[0].get_ydata()) == pytest.approx(list(committed.est[MODEL]["sst2"][0].value), nan_ok=True)
    assert fig.get_suptitle().startswith("AUCROC$_l$ and $R_l$, one demonstration per class\n")
    assert f"(n = {N} × {SEEDS} per task;" in fig.get_suptitle()


def test_deep_estimates_per_model_and_task(committed):
    from helpers.experiments.extraction import deep_auc_estimate

    deep = page.deep_estimates(committed.runs)
    assert list(deep) == [(m, t) for m in (MODEL, SECOND) for t in TASKS]
    assert deep[SECOND, "agnews"].value == pytest.approx(deep_auc_estimate(committed.runs[SECOND]["agnews"]).value)


def test_accuracy_table_beside_the_paper(committed):
    from helpers.experiments.extraction import accuracy_estimate

    styler = page.accuracy_table(committed.runs, committed.est)
    df = styler.data
    assert list(df.index) == [(m, title) for m in (MODEL, SECOND) for title in ("SST-2", "AG News")]
    assert df.loc[(MODEL, "SST-2"), "paper, GPT2-XL"] == "61.3"
    assert df.loc[(SECOND, "AG News"), "paper, GPT2-XL"] == "73.3"
    assert df.loc[(MODEL, "AG News"), "accuracy % (ours)"] == accuracy_estimate(committed.runs[MODEL]["agnews"]).fmt(1)
    predicted = len(np.unique(np.concatenate([r["pred"] for r in committed.runs[MODEL]["agnews"]])))
    assert df.loc[(MODEL, "AG News"), "classes predicted"] == f"{predicted} of 4"
    assert f"n = {N} × {SEEDS} per row" in styler.caption


R_WIDE = {  # R_l Estimates: (expected table entry, estimate); "undetermined" exactly where the figure draws dashes
    "sst2": ("3 of 4", _estimate([0.1, 0.3, 0.6, 1.0])),                                    # narrow interval
    "trec": ("never", _estimate([0.1, 0.2, 0.3, 0.4])),
    "agnews": ("3 of 4", _estimate([0.1, 0.3, 0.6, 1.0], low=[-1.4, 0, 0, 0], high=[1, 1, 1.9, 1])),  # wide, inside
    "emoc": ("undetermined", _estimate([0.1, 0.3, 0.6, 1.0], low=[-2, 0, 0, 0], high=[1, 1, 1, 1])),  # leaves the axes
}


def test_auc_table_reads_the_peak_and_where_r_passes_one_half():
    auc = _estimate([0.5, 0.9, 0.7, 0.6])
    est = {"m": {t: (auc, r) for t, (_, r) in R_WIDE.items()}}
    deep = {("m", t): _estimate(0.75) for t in R_WIDE}
    styler = page.auc_table(est, deep)
    df = styler.data
    assert df["R_l ≥ 0.5 from layer"].tolist() == [entry for entry, _ in R_WIDE.values()]
    assert df["peak (layer)"].tolist() == ["0.90 (2)"] * 4
    assert df["AUCROC, last third"].tolist() == ["0.75 [0.65, 0.85]"] * 4
    assert "n = 10 × 2 per row" in styler.caption and "leaves [-1.5, 2]" in styler.caption


def test_the_tables_call_undetermined_what_the_figure_draws_dashed():
    auc = _estimate([0.5, 0.9, 0.7, 0.6])
    fig = page.auc_figure({"m": {t: (auc, r) for t, (_, r) in R_WIDE.items()}})
    dashed = {line.get_label(): line.get_linestyle() == "--" for line in _curves(fig.axes[1])}
    from helpers.core.tasks import get_task

    assert dashed == {get_task(t).title: entry == "undetermined" for t, (entry, _) in R_WIDE.items()}


def test_one_shot_values(committed):
    from helpers.experiments.extraction import accuracy_estimate, layer_passing

    deep = page.deep_estimates(committed.runs)
    values = page.one_shot_values(committed.runs, committed.est, deep, MODEL, SECOND)
    assert values["model_name"] == MODEL and values["second_name"] == SECOND
    assert values["deep_sst2"] == deep[MODEL, "sst2"].fmt(2) and values["deep2_agnews"] == deep[SECOND, "agnews"].fmt(2)
    assert values["acc_agnews"] == accuracy_estimate(committed.runs[MODEL]["agnews"]).fmt(1)
    assert values["n_classes_agnews"] == min(len(np.unique(r["pred"])) for r in committed.runs[MODEL]["agnews"])
    assert values["r_min_sst2"] == f"{np.nanmin(committed.est[MODEL]['sst2'][1].value):.1f}"
    passing = layer_passing(committed.est[MODEL]["agnews"][1].value)
    determined = f"{MODEL} AG News" not in values["undetermined_text"]
    assert values["pass1_agnews"] == ((str(passing + 1) if passing is not None else "never") if determined
                                      else "undetermined")
    assert values["undetermined_text"] == "none" or values["undetermined_text"].split(", ")[0].split(" ")[0] in (
        MODEL, SECOND)
    assert values["r_limits"] == "[-1.5, 2]"
    for key, m in (("", MODEL), ("2", SECOND)):
        below = [title for t, title in zip(TASKS, ("SST-2", "AG News")) if not deep[m, t].low > 0.5]
        assert values[f"n_above_chance{key}"] == f"{len(TASKS) - len(below)} of {len(TASKS)}"
        assert values[f"not_above_chance{key}"] == (", ".join(below) or "none")
    places = {}
    for key in ("inside", "above", "below"):
        for title in filter(None, values[f"acc_paper_{key}"].replace("none", "").split(", ")):
            places.setdefault(title, []).append(key)
    assert sorted(places) == ["AG News", "SST-2"] and all(len(v) == 1 for v in places.values())
    acc = accuracy_estimate(committed.runs[MODEL]["agnews"])
    expected = "inside" if acc.low <= page.PAPER_ACC["agnews"] <= acc.high else (
        "above" if page.PAPER_ACC["agnews"] > acc.high else "below")
    assert places["AG News"] == [expected]
    alone = page.one_shot_values({MODEL: committed.runs[MODEL]}, {MODEL: committed.est[MODEL]}, deep, MODEL, None)
    assert alone["second_name"] == "(none)" and not any(k.startswith("deep2_") for k in alone)
    assert "n_above_chance2" not in alone


def test_sink_figure_draws_the_sink_and_label_shares(committed):
    from helpers.experiments.extraction import attention_shares

    n_heads = {MODEL: 4, SECOND: 14}
    fig = page.sink_figure(committed.runs, n_heads, {MODEL: [6, 12, 18], SECOND: []}, n=f"{N} × {SEEDS}")
    assert [ax.get_title() for ax in fig.axes] == [MODEL, SECOND]
    for ax, m in zip(fig.axes, (MODEL, SECOND)):
        lines = _curves(ax)
        assert len(lines) == 2 * len(TASKS)  # solid: first token; dashed: all label words
        sink, labels = attention_shares(committed.runs[m]["agnews"], n_heads[m])
        assert list(lines[2].get_ydata()) == pytest.approx(list(sink))
        assert list(lines[3].get_ydata()) == pytest.approx(list(labels)) and lines[3].get_linestyle() == "--"
    assert fig.get_suptitle() == f"Where q's attention goes (mean over n = {N} × {SEEDS} examples per task)"
    assert tuple(fig.get_size_inches()) == pytest.approx((7.0, 3.3))


def test_renorm_figure_draws_both_scores(committed):
    from helpers.experiments.extraction import auc_estimates

    raw = committed.est[MODEL]["sst2"][0]
    ren = auc_estimates(committed.runs[MODEL]["sst2"], n_boot=N_BOOT, renormalise_binary=True)[0]
    fig = page.renorm_figure(raw, ren, MODEL, [6])
    (ax,) = fig.axes
    lines = _curves(ax)
    assert [line.get_label() for line in lines] == ["official: raw attention on the 2nd label word",
                                                     "renormalised over the two label words"]
    assert list(lines[1].get_ydata()) == pytest.approx(list(ren.value), nan_ok=True)
    assert ax.get_title() == f"{MODEL}, SST-2 (n = {N} × {SEEDS}; 95% bands)"


def test_renorm_values(committed):
    from helpers.experiments.extraction import deep_auc_estimate

    raw, ren = _estimate([0.4, 0.6, 0.7]), _estimate([0.6, 0.6, 0.2])
    values = page.renorm_values(committed.runs[MODEL]["sst2"], raw, ren)
    assert values == {"sink_diff": "0.50", "sink_diff_layer": 3, "opposite_layers": "1, 3",
                      "deep_ren_sst2": deep_auc_estimate(committed.runs[MODEL]["sst2"], renormalise_binary=True)
                      .fmt(2)}
    assert page.renorm_values(committed.runs[MODEL]["sst2"], raw, raw)["opposite_layers"] == "none"


def test_example_figure_and_outcome(committed):
    r = committed.runs[MODEL]["sst2"][0]
    fig = page.example_figure(r, "sst2", n_heads=4, marked_layers=[6])
    a, b = fig.axes
    lines = _curves(a)
    assert [line.get_label() for line in lines] == ["Negative", "Positive", "first token (sink)"]
    assert list(lines[0].get_ydata()) == pytest.approx(list(r["attention"][0][:, 0] / 4))
    assert [p.get_width() for p in b.patches] == pytest.approx(list(r["probs"][0]))
    assert a.get_xlabel() == "layer" and b.get_xlabel() == "probability"  # both axes labelled
    run = {"gold": np.array([1, 0]), "pred": np.array([0, 0])}
    assert page.example_outcome(run, "sst2") == "gold: Positive, predicted: Negative"
    assert page.example_outcome(run, "sst2", i=1) == "gold: Negative, predicted: Negative"


# -- two demonstrations per class ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # R_l undefined in a layer of this small slice
def test_two_shot_figure(committed):
    fig = page.two_shot_figure(committed.est2, MODEL, [6, 12])
    assert len(fig.axes) == 2
    assert fig.axes[0].get_ylabel() == f"{MODEL}, 2 per class\nAUCROC$_l$"
    assert fig.get_suptitle().startswith("AUCROC$_l$ and $R_l$, two demonstrations per class\n")
    assert list(_curves(fig.axes[0])[1].get_ydata()) == pytest.approx(list(committed.est2["agnews"][0].value),
                                                                      nan_ok=True)


def test_two_shot_table_and_values(committed):
    from helpers.experiments.extraction import accuracy_estimate, deep_auc_estimate

    styler = page.two_shot_table(committed.runs[MODEL], committed.runs2, committed.est2, MODEL)
    df = styler.data
    assert list(df.index) == ["SST-2", "AG News"]
    assert df.loc["SST-2", "accuracy %, 1 per class"] == accuracy_estimate(committed.runs[MODEL]["sst2"]).fmt(1)
    assert df.loc["SST-2", "2 per class"] == accuracy_estimate(committed.runs2["sst2"]).fmt(1)
    assert df.loc["AG News", "AUCROC, last third"] == deep_auc_estimate(committed.runs2["agnews"]).fmt(2)
    assert styler.caption.startswith(f"{MODEL}, one vs two demonstrations per class (95% intervals; n = {N} × "
                                     f"{SEEDS} per task). 'undetermined': the interval of R_l leaves [-1.5, 2].")
    values = page.two_shot_values(committed.runs[MODEL], committed.runs2, committed.est2)
    assert set(values) == {f"{k}_{t}" for k in ("acc2", "acc_change", "pass2", "deep2shot") for t in TASKS} | {
        "undetermined2_text"}
    assert values["acc2_sst2"] == df.loc["SST-2", "2 per class"]
    assert values["pass2_agnews"] == df.loc["AG News", "R_l ≥ 0.5 from layer"]
    assert values["deep2shot_agnews"] == df.loc["AG News", "AUCROC, last third"]
    assert values["acc_change_sst2"] == page.accuracy_change(committed.runs[MODEL]["sst2"], committed.runs2["sst2"]
                                                             ).fmt(1)


def test_two_shot_table_and_figure_agree_on_undetermined(committed):
    auc = _estimate(np.full(committed.n_layers, 0.6))
    r = {t: _estimate(np.linspace(0, 1, committed.n_layers)) for t in TASKS}
    r["sst2"] = _estimate(np.linspace(0, 1, committed.n_layers), low=np.full(committed.n_layers, -3.0))
    est2 = {t: (auc, r[t]) for t in TASKS}
    df = page.two_shot_table(committed.runs[MODEL], committed.runs2, est2, MODEL).data
    assert df.loc["SST-2", "R_l ≥ 0.5 from layer"] == "undetermined"
    assert df.loc["AG News", "R_l ≥ 0.5 from layer"] != "undetermined"
    values = page.two_shot_values(committed.runs[MODEL], committed.runs2, est2)
    assert values["pass2_sst2"] == "undetermined" and values["undetermined2_text"] == "SST-2"
    fig = page.two_shot_figure(est2, MODEL)
    styles = {line.get_label(): line.get_linestyle() for line in _curves(fig.axes[1])}
    assert styles == {"SST-2": "--", "AG News": "-"}


def test_accuracy_change_is_paired_over_the_same_examples():
    one = [{"gold": np.array([0, 1, 0, 1]), "pred": np.array([0, 1, 0, 1])}] * 3
    two = [{"gold": np.array([0, 1, 0, 1]), "pred": np.array([0, 1, 1, 0])}] * 3
    assert page.accuracy_change(one, two).fmt(1).startswith("-50.0 [")
    assert page.accuracy_change(one, one).fmt(1) == "0.0 [0.0, 0.0]"
    with pytest.raises(ValueError, match="same test examples"):
        page.accuracy_change(one, [{"gold": np.array([1, 1, 0, 1]), "pred": np.array([0, 1, 0, 1])}] * 3)
