"""The Diagnosis chapter's tables, figures and glued values (helpers.pages.diagnosis), on a small slice of the
committed results (two models, two tasks, seed 42, the first test examples; Gemma's three TREC seeds for the verdict's
table) and on small synthetic estimates; no model is loaded."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers.core.stats import Estimate  # noqa: E402
from helpers.pages import diagnosis as page  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
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
def trec3(data_dir):
    """Gemma's stored TREC results (seeds 42, 43, 44 are committed) as the chapter reads them, whole and cut to their
    first test examples, with the summary of the cut ones."""
    from helpers import load_task
    from helpers.core.runs import PROFILES, ModelKey
    from helpers.experiments import diagnosis as dg

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANCHORS_REQUIRE_CACHED", "1")
        stored = page.stored_runs(ModelKey.of(MODEL), load_task("trec", data_dir), PROFILES["book"], (SEED,))
    assert {42, 43, 44} <= set(stored), "the committed TREC seeds 43 and 44 are missing"
    cut = [{k: v[:N] if k in PER_EXAMPLE else v for k, v in r.items()} for r in stored.values()]
    layer = dg.default_layer(cut[0]["khat"].shape[0])
    return SimpleNamespace(stored=stored, seeds=list(stored), layer=layer,
                           summary=dg.summary(cut, layer, M, n_boot=N_BOOT))


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


def test_stored_runs_adds_every_stored_seed_of_the_profile(monkeypatch):
    from helpers.experiments import diagnosis as dg

    calls = []

    def fake_runs(lm, data, profile, seeds, lookup_only=False):
        (seed,) = seeds
        calls.append((seed, lookup_only))
        return [{"seed": seed} if not lookup_only or seed in (44, 42) else None]

    monkeypatch.setattr(dg, "diagnosis_runs", fake_runs)
    profile = SimpleNamespace(seeds=(42, 43, 44))
    out = page.stored_runs("lm", "data", profile, (43, 7))
    assert list(out) == [42, 43, 44, 7]  # the profile's order, then the chapter's own extra seeds
    assert calls == [(42, True), (43, False), (44, True), (7, False)]  # only the chapter's seeds are computed
    assert list(page.stored_runs("lm", "data", SimpleNamespace(seeds=(43, 45)), ())) == []


def test_stored_runs_read_the_seeds_the_verdict_reads(trec3):
    from helpers.core.runs import PROFILES
    from helpers.experiments import diagnosis as dg

    measured = dg.diagnosis_trec(MODEL, PROFILES["book"])
    whole = list(trec3.stored.values())
    s = dg.summary(whole, dg.default_layer(whole[0]["khat"].shape[0]), M)  # the chapter's default replicates
    assert s["rho"].fmt(2) == measured.estimate.fmt(2)  # one number, one interval, on the chapter and the page
    assert s["rho_per_seed"] == pytest.approx(list(measured.estimate.seed_values))
    assert max(s["p"]) == pytest.approx(measured.support["p"])


def test_run_values(committed):
    seeds_of = {m: {t: [SEED] for t in TASKS} for m in (MODEL, SECOND)}
    values = page.run_values(committed.runs, committed.n_layers, committed.layer_of, seeds_of, MODEL, SECOND)
    assert values == {"n_trec": N, "n_emoc": N, "seeds_main_trec": "42", "nseeds_main_trec": 1,
                      "seeds_main_emoc": "42", "nseeds_main_emoc": 1, "seeds_second_trec": "42",
                      "nseeds_second_trec": 1, "seeds_second_emoc": "42", "nseeds_second_emoc": 1,
                      "layer_main": committed.layer_of[MODEL] + 1, "layers_main": 18,
                      "layer_second": committed.layer_of[SECOND] + 1, "layers_second": 24,
                      "max_key_spread": values["max_key_spread"]}
    spread = max(float(r["key_spread"].max()) for per in committed.runs.values() for rs in per.values() for r in rs)
    assert values["max_key_spread"] == f"{spread:.1e}"
    alone = page.run_values({MODEL: committed.runs[MODEL]}, committed.n_layers, committed.layer_of,
                            {MODEL: {"trec": [42, 43, 44]}}, MODEL)
    assert "layer_second" not in alone and alone["seeds_main_trec"] == "42, 43, 44" and alone["nseeds_main_trec"] == 3


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
    assert row["exact p per seed"] == f"{s['p'][0]:.3f}" and row["smallest possible p"] == f"1/{s['n_permutations']}"
    assert row["ρ per seed"] == f"{s['rho_per_seed'][0]:.2f}"
    assert row["most confused (real), first seed"] == page.pair_text("emoc", s["pairs"][0]["real"])
    assert row["rank of the real one"] == f"{s['pairs'][0]['rank_of_real']} of 6"  # 4 classes: 6 pairs


def test_agreement_values(committed):
    values = page.agreement_values(committed.summaries, committed.runs, MODEL)
    per_case = ("rho", "rhoseeds", "p", "psig", "ranks", "real", "pred", "rank", "realauc", "realn", "acc")
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


def test_agreement_values_over_several_seeds(trec3):
    s = trec3.summary
    values = page.agreement_values({MODEL: {"trec": s}}, {MODEL: {"trec": [{"gold": r["gold"][:N]}
                                                                            for r in trec3.stored.values()]}}, MODEL)
    assert values["rho_main_trec"] == s["rho"].fmt(2) and s["rho"].n_seeds == len(trec3.seeds)
    assert values["rhoseeds_main_trec"] == " / ".join(f"{r:.2f}" for r in s["rho_per_seed"])
    assert values["p_main_trec"] == " / ".join(f"{p:.3f}" for p in s["p"])
    assert values["ranks_main_trec"] == " / ".join(str(pr["rank_of_real"]) for pr in s["pairs"])
    assert values["n_tests"] == len(trec3.seeds)  # one permutation test per seed
    assert values["psig_main_trec"] == f"{sum(p < 0.05 for p in s['p'])} of {len(trec3.seeds)}"
    assert values["acc_main_trec"] == f"{100 * np.mean(s['accuracy']):.0f}%"


def test_trec_seed_table(trec3):
    s = trec3.summary
    df = page.trec_seed_table({MODEL: {"trec": s}, SECOND: {"emoc": s}}, {MODEL: {"trec": trec3.seeds}})
    assert list(df.index) == [(MODEL, str(seed)) for seed in trec3.seeds] + [(MODEL, "all seeds")]  # no TREC: no rows
    first = df.loc[(MODEL, str(trec3.seeds[1]))]
    assert first["ρ"] == f"{s['rho_per_seed'][1]:.2f}" and first["exact p"] == f"{s['p'][1]:.3f}"
    assert first["most confused (real)"] == page.pair_text("trec", s["pairs"][1]["real"])
    assert first["accuracy %"] == round(100 * s["accuracy"][1], 1)
    pooled = df.loc[(MODEL, "all seeds")]
    assert pooled["ρ"] == f"{s['rho'].fmt(2)} (n = {N} × {len(trec3.seeds)})"
    assert pooled["exact p"] == f"< 0.05 in {sum(p < 0.05 for p in s['p'])} of {len(trec3.seeds)}"


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
    import inspect

    from helpers.core.stats import N_BOOT as BOOK_BOOT
    from helpers.experiments import diagnosis as dg

    # by default the M column of the chapter repeats the agreement table's interval (the same replicates)
    assert inspect.signature(page.direction_sweep).parameters["n_boot"].default == BOOK_BOOT

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
    three = {SECOND: {p: {**per, "trec": _estimate(0.2, n_examples=N, n_seeds=3)} for p, per in base[SECOND].items()}}
    title = page.baseline_figure(three, SECOND, committed.layer_of, M).axes[0].get_title()
    assert title.endswith(f"M = {M}\nn = {N} × 3 (TREC); {N} × 1 (EmoC)")  # the tasks' seeds differ: n per task

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
    seeds_of = {m: {t: [SEED] for t in TASKS} for m in (MODEL, SECOND)}
    assert page.summary_table(committed.summaries, committed.curves, base, seeds_of)["seeds"].tolist() == ["42"] * 4
    df = page.summary_table(committed.summaries, committed.curves, base)
    assert "seeds" not in df.columns
    assert list(df.index) == [(m, t) for m in (MODEL, SECOND) for t in ("TREC", "EmoC")]
    s, est = committed.summaries[SECOND]["trec"], committed.curves[SECOND]["trec"]
    row = df.loc[(SECOND, "TREC")]
    pairs = s["pairs"][0]
    assert row["most confused: predicted / real"] == (f"{page.pair_text('trec', pairs['predicted'])} / "
                                                      f"{page.pair_text('trec', pairs['real'])}")
    best = int(np.nanargmax(est.value))
    assert row["best layer (ρ)"] == f"{best + 1} ({est.value[best]:.2f})"
    assert row["no anchors: embeddings ρ"] == base[SECOND]["label-word embeddings"]["trec"].fmt(2)


def test_the_chapter_glues_names_the_page_makes_and_states_its_verdict(committed, base, trec3, monkeypatch):
    from helpers.pages import verdicts

    seeds_of = {m: {t: [SEED] for t in TASKS} for m in (MODEL, SECOND)}
    values = (page.run_values(committed.runs, committed.n_layers, committed.layer_of, seeds_of, MODEL, SECOND)
              | page.agreement_values(committed.summaries, committed.runs, MODEL)
              | page.best_layer_values(committed.curves, MODEL) | page.baseline_values(base, MODEL) | {"m_span": ""})
    monkeypatch.setattr(verdicts, "evaluate", lambda finding, model, profile: (None, "partly"))  # the names only
    values |= verdicts.chapter_verdicts("book/diagnosis")
    from helpers.experiments import diagnosis as dg

    for role, m in (("main", MODEL), ("second", SECOND)):  # the chapter glues the seeds-together test on TREC
        task = next(iter(committed.runs[m]))  # the fixture's task stands in for TREC
        values[f"ppooled_{role}_trec"] = dg.pooled_p_text(committed.runs[m][task], committed.layer_of[m])
    names = set(values) | {k.replace("_emoc", "_agnews") for k in values}  # the fixture has EmoC, not AG News
    cells = json.loads((ROOT / "book" / "diagnosis.ipynb").read_text())["cells"]
    prose = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    used = set(re.findall(r"\{glue:text\}`([^`]+)`", prose))
    assert used and used <= names, used - names
    assert {"verdict_diagnosis", "rho_main_trec", "rhoseeds_main_trec", "p_main_trec", "ppooled_main_trec"} <= used
    assert "(sec-diagnosis-trec)=" in prose
