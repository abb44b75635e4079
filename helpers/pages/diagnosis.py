"""The "Diagnosis" chapter's tables, figures and glued values (paper §3.3, Appendices G and H).

The chapter runs the experiment (:mod:`helpers.experiments.diagnosis`) and passes its results here. ``runs`` is
``{model: {task: [stored result per seed]}}`` (:func:`stored_runs`: the chapter's seeds and every other seed of the
profile already computed, as the verdict page reads them; ``seeds_of`` names them, ``{model: {task: [seed]}}``);
``summaries`` ``{model: {task:
summary(...)}}`` at the chosen layer and M; ``curves`` ``{model: {task: layer_curve(...)}}``; ``base`` is
:func:`baseline_estimates`. ``layer_of`` maps a model to its chosen layer (0-based), ``n_layers`` to its depth, and
``m`` is the number of principal directions M. In the glue names, ``main`` is the chapter's first model and
``second`` the other.

* the runs: :func:`stored_runs`, :func:`run_values`;
* Figure 6 and how alike the two matrices are: :func:`heatmap_figure`, :func:`agreement_table`,
  :func:`agreement_values`; TREC seed by seed (the verdict's task): :func:`trec_seed_table`;
* which layer, how many directions: :func:`curves_figure`, :func:`best_layer_table`, :func:`best_layer_values`,
  :func:`direction_sweep`;
* predictors without anchors: :func:`baseline_estimates`, :func:`baseline_figure`, :func:`baseline_table`,
  :func:`baseline_values`; the closing summary: :func:`summary_table`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .summaries import summarised
from . import plots
from ..core.stats import N_BOOT
from ..core.tasks import get_task
from ..experiments import diagnosis as dg

__all__ = ["pair_text", "stored_runs", "run_values", "heatmap_figure", "agreement_table", "agreement_values",
           "trec_seed_table", "curves_figure", "best_layer_table", "best_layer_values", "direction_sweep",
           "baseline_estimates", "baseline_figure", "baseline_table", "baseline_values", "summary_table"]

Runs = Mapping[str, Mapping[str, Sequence[dict]]]  # {model: {task: [stored result per seed]}}
PCA = "anchor keys, query PCA"  # the paper's predictor
N_BOOT_SWEEP = 200  # bootstrap replicates where only a point value is shown (the best layer's most confused pair)


def _key(m: str, model: str) -> str:
    return "main" if m == model else "second"


def _rank_text(pair: dict) -> str:
    return f"{pair['rank_of_real']} of {pair['n_pairs']}"


def _p_text(s: dict) -> str:
    return " / ".join(f"{p:.3f}" for p in s["p"])


def _rho_seeds_text(s: dict) -> str:
    return " / ".join(f"{r:.2f}" for r in s["rho_per_seed"])


def pair_text(task: str, pair: Sequence[int]) -> str:
    """A class pair by name, ``"Description–Entity"``.

    Used in: Diagnosis."""
    names = get_task(task).class_names
    return f"{names[pair[0]]}–{names[pair[1]]}"


def stored_runs(lm, data, profile, seeds: Sequence[int]) -> dict[int, dict]:
    """``{seed: stored result}`` for one model and task: the results of ``seeds`` (computed where missing) and of
    every other seed of ``profile`` already stored, in the profile's order: the seeds the verdict page reads
    (:func:`helpers.experiments.diagnosis.diagnosis_trec`), so the chapter and the page show the same ρ.

    Used in: Diagnosis."""
    order = list(profile.seeds) + [s for s in seeds if s not in profile.seeds]
    out = {}
    for seed in order:
        (r,) = dg.diagnosis_runs(lm, data, profile, seeds=[seed], lookup_only=seed not in seeds)
        if r is not None:
            out[seed] = r
    return out


@summarised("diagnosis/summaries")
def summaries_of(runs: Runs, layer_of: Mapping[str, int], m: int) -> dict:
    """``{model: {task: helpers.experiments.diagnosis.summary(runs, layer, M)}}`` at each model's chosen layer,
    computed once per content of the runs (a stored summary, :mod:`helpers.pages.summaries`). Used in: Diagnosis."""
    return {mod: {name: dg.summary(rs, layer_of[mod], m) for name, rs in per.items()} for mod, per in runs.items()}


@summarised("diagnosis/curves")
def curves_of(runs: Runs, m: int) -> dict:
    """``{model: {task: helpers.experiments.diagnosis.layer_curve(runs, M)}}`` (ρ in every layer), computed once per
    content of the runs. Used in: Diagnosis."""
    return {mod: {name: dg.layer_curve(rs, m) for name, rs in per.items()} for mod, per in runs.items()}


@summarised("diagnosis/run-values")
def run_values(runs: Runs, n_layers: Mapping[str, int], layer_of: Mapping[str, int],
               seeds_of: Mapping[str, Mapping[str, Sequence[int]]], model: str,
               second_model: str | None = None) -> dict:
    """The sizes the method section quotes: test examples per task, the seeds of each model and task
    (``seeds_<main|second>_<task>``, ``nseeds_...``), each model's layer and depth, and the largest spread of the
    label words' keys within a class.

    Returns ``{glue name: value}``. Used in: Diagnosis.
    """
    values = {f"n_{name}": len(rs[0]["gold"]) for name, rs in runs[model].items()}
    for mod, per in seeds_of.items():
        for name, seeds in per.items():
            values[f"seeds_{_key(mod, model)}_{name}"] = ", ".join(map(str, seeds))
            values[f"nseeds_{_key(mod, model)}_{name}"] = len(seeds)
    values.update({"layer_main": layer_of[model] + 1, "layers_main": n_layers[model]})
    if second_model:
        values.update({"layer_second": layer_of[second_model] + 1, "layers_second": n_layers[second_model]})
    spread = max(float(r["key_spread"].max()) for per in runs.values() for rs in per.values() for r in rs)
    values["max_key_spread"] = f"{spread:.1e}"
    return values


def heatmap_figure(summaries: Mapping, runs: Runs, model: str, task: str, layer_of: Mapping[str, int],
                   n_layers: Mapping[str, int], m: int, seed: int) -> plt.Figure:
    """The paper's Figure 6 for one model and task: the predicted confusion (anchor distances) beside the real one
    (pairwise AUC), first seed (:func:`helpers.pages.plots.confusion_heatmaps`).

    Returns the figure. Used in: Diagnosis.
    """
    s = summaries[model][task]
    n = len(runs[model][task][0]["gold"])
    return plots.confusion_heatmaps(s["predicted"][0], s["real"][0], get_task(task).class_names,
                                    title=f"{model}, {get_task(task).title}: layer {layer_of[model] + 1} of "
                                          f"{n_layers[model]}, M = {m}, seed {seed}, n = {n} test examples")


def agreement_table(summaries: Mapping, layer_of: Mapping[str, int], n_layers: Mapping[str, int],
                    m: int) -> pd.DataFrame:
    """One row per model and task at the chosen layer: accuracy (mean over seeds), Spearman's ρ between predicted and
    real confusion with its interval (over seeds and test examples) and per seed, the exact permutation p-values per
    seed, and the most confused pair, real and predicted, of the first seed.

    Returns a DataFrame. Used in: Diagnosis.
    """
    rows = []
    for mod, per in summaries.items():
        for name, s in per.items():
            pr = s["pairs"][0]
            rows.append({
                "model": mod, "task": get_task(name).title,
                "accuracy %": round(100 * float(np.mean(s["accuracy"])), 1),
                "layer": f"{layer_of[mod] + 1} of {n_layers[mod]}",
                f"ρ (M = {m}) [95%]": s["rho"].fmt(2),
                "ρ per seed": _rho_seeds_text(s),
                "n": s["rho"].n,
                "exact p per seed": _p_text(s),
                "smallest possible p": f"1/{s['n_permutations']}",
                "most confused (real), first seed": pair_text(name, pr["real"]),
                "most confused (predicted), first seed": pair_text(name, pr["predicted"]),
                "rank of the real one": _rank_text(pr),
            })
    return pd.DataFrame(rows).set_index(["model", "task"])


def agreement_values(summaries: Mapping, runs: Runs, model: str) -> dict:
    """The agreement numbers the prose quotes, per model and task: ρ over all seeds with its interval (``rho_``), ρ
    and the exact p per seed (``rhoseeds_``, ``p_``, "a / b / c"), the rank of the real most confused pair per seed
    (``ranks_``), how many seeds reach p < 0.05 (``psig_``, "1 of 3"), the accuracy (mean over seeds); of the first seed, the real and predicted most confused pair, the
    rank of the real one, its AUC and its classes' test counts. Over all permutation tests (one per model, task and
    seed): how many reach p < 0.05 (``n_signif`` of ``n_tests``) and the smallest p.

    Returns ``{glue name: value}``. Used in: Diagnosis.
    """
    values = {}
    for mod, per in summaries.items():
        key = _key(mod, model)
        for name, s in per.items():
            pair = s["pairs"][0]
            i, j = pair["real"]
            gold = runs[mod][name][0]["gold"]
            values.update({
                f"rho_{key}_{name}": s["rho"].fmt(2),
                f"rhoseeds_{key}_{name}": _rho_seeds_text(s),
                f"p_{key}_{name}": _p_text(s),
                f"psig_{key}_{name}": f"{int(sum(p < 0.05 for p in s['p']))} of {len(s['p'])}",
                f"ranks_{key}_{name}": " / ".join(str(pr["rank_of_real"]) for pr in s["pairs"]),
                f"real_{key}_{name}": pair_text(name, pair["real"]),
                f"pred_{key}_{name}": pair_text(name, pair["predicted"]),
                f"rank_{key}_{name}": _rank_text(pair),
                f"realauc_{key}_{name}": f"{s['real'][0][i, j]:.2f}",
                f"realn_{key}_{name}": f"{int(np.sum(gold == i))} and {int(np.sum(gold == j))}",
                f"acc_{key}_{name}": f"{100 * np.mean(s['accuracy']):.0f}%",
            })
    all_p = [p for per in summaries.values() for s in per.values() for p in s["p"]]
    values.update({"n_signif": int(sum(p < 0.05 for p in all_p)), "n_tests": len(all_p), "min_p": f"{min(all_p):.3f}"})
    return values


def trec_seed_table(summaries: Mapping, seeds_of: Mapping[str, Mapping[str, Sequence[int]]],
                    task: str = "trec") -> pd.DataFrame:
    """The verdict's task seed by seed: per model, one row per seed (accuracy, ρ, exact p, the most confused pair
    real and predicted, the rank of the real one) and a row "all seeds" with ρ and its interval over seeds and test
    examples (the verdict's number) and how many seeds reach p < 0.05.

    Returns a DataFrame indexed by (model, seed). Used in: Diagnosis.
    """
    rows = []
    for mod, per in summaries.items():
        if task not in per:
            continue
        s, seeds = per[task], seeds_of[mod][task]
        for i, seed in enumerate(seeds):
            pr = s["pairs"][i]
            rows.append({"model": mod, "seed": str(seed), "accuracy %": round(100 * s["accuracy"][i], 1),
                         "ρ": f"{s['rho_per_seed'][i]:.2f}", "exact p": f"{s['p'][i]:.3f}",
                         "most confused (real)": pair_text(task, pr["real"]),
                         "most confused (predicted)": pair_text(task, pr["predicted"]),
                         "rank of the real one": _rank_text(pr)})
        rows.append({"model": mod, "seed": "all seeds", "accuracy %": round(100 * float(np.mean(s["accuracy"])), 1),
                     "ρ": f"{s['rho'].fmt(2)} (n = {s['rho'].n})",
                     "exact p": f"< 0.05 in {sum(p < 0.05 for p in s['p'])} of {len(seeds)}",
                     "most confused (real)": "", "most confused (predicted)": "", "rank of the real one": ""})
    return pd.DataFrame(rows).set_index(["model", "seed"])


def curves_figure(curves: Mapping, layer_of: Mapping[str, int], m: int) -> plt.Figure:
    """ρ per layer with its interval, one panel per model, the chosen layer dashed
    (:func:`helpers.pages.plots.agreement_curves`).

    Returns the figure. Used in: Diagnosis.
    """
    return plots.agreement_curves(curves, marks=layer_of, title=f"agreement per layer (M = {m}); dashed: two thirds "
                                                                "of the depth (the paper's layer)")


def best_layer_table(curves: Mapping, runs: Runs, layer_of: Mapping[str, int], m: int,
                     n_boot: int = N_BOOT_SWEEP) -> pd.DataFrame:
    """One row per model and task: the layer with the largest ρ and its value, ρ at the paper's depth, how many layers
    have ρ > 0, the mean over layers, and the rank of the real most-confused pair at the best layer.

    Returns a DataFrame. Used in: Diagnosis.
    """
    rows = []
    for mod, per in curves.items():
        for name, est in per.items():
            best = int(np.nanargmax(est.value))
            pair = dg.summary(runs[mod][name], best, m, n_boot=n_boot)["pairs"][0]
            rows.append({"model": mod, "task": get_task(name).title, "best layer": best + 1, "of": len(est.value),
                         "ρ there": f"{est.value[best]:.2f} [{est.low[best]:.2f}, {est.high[best]:.2f}]",
                         "ρ at the paper's depth": f"{est.value[layer_of[mod]]:.2f}",
                         "layers with ρ > 0": f"{int(np.sum(est.value > 0))} of {len(est.value)}",
                         "mean ρ over layers": round(float(np.nanmean(est.value)), 2),
                         "rank of the real most-confused pair there": _rank_text(pair)})
    return pd.DataFrame(rows).set_index(["model", "task"])


def best_layer_values(curves: Mapping, model: str) -> dict:
    """Per model and task: the best layer, ρ there and the mean ρ over layers; and the smallest and largest range of
    ρ over the layers.

    Returns ``{glue name: value}``. Used in: Diagnosis.
    """
    values = {}
    for mod, per in curves.items():
        key = _key(mod, model)
        for name, est in per.items():
            best = int(np.nanargmax(est.value))
            values[f"best_{key}_{name}"] = best + 1
            values[f"bestrho_{key}_{name}"] = f"{est.value[best]:.2f}"
            values[f"meanrho_{key}_{name}"] = f"{np.nanmean(est.value):.2f}"
    spans = [float(np.nanmax(e.value) - np.nanmin(e.value)) for per in curves.values() for e in per.values()]
    values.update({"layer_span_min": f"{min(spans):.2f}", "layer_span_max": f"{max(spans):.2f}"})
    return values


def direction_sweep(runs: Runs, layer_of: Mapping[str, int], m: int,
                    n_boot: int = N_BOOT) -> tuple[dict, pd.DataFrame]:
    """ρ at the chosen layer for every M of :data:`helpers.experiments.diagnosis.MS` that the stored results allow,
    with all dimensions of the keys (no PCA), and the share of the queries' variance in the top 10 directions. With
    the default ``n_boot`` the column of the chapter's M and the one without PCA repeat the agreement and baseline
    tables' intervals exactly (the same bootstrap replicates).

    Returns ``({"m_span": the largest range of ρ over M}, a DataFrame with a row per model and task)``.
    Used in: Diagnosis.
    """
    rows, spans = _sweep_rows(runs, layer_of, m, n_boot)
    return {"m_span": f"{max(spans):.2f}"}, pd.DataFrame(rows).set_index(["model", "task"])


@summarised("diagnosis/direction-sweep")
def _sweep_rows(runs: Runs, layer_of: Mapping[str, int], m: int, n_boot: int) -> tuple[list, list]:
    stored = min(r["khat"].shape[-1] for per in runs.values() for rs in per.values() for r in rs)
    ms = [mm for mm in dg.MS if mm <= stored]
    rows, spans = [], []
    for mod, per in runs.items():
        for name, rs in per.items():
            row = {"model": mod, "task": get_task(name).title}
            ests = {mm: dg.summary(rs, layer_of[mod], mm, n_boot=n_boot)["rho"] for mm in ms}
            row.update({f"M = {mm}": est.fmt(2) for mm, est in ests.items()})
            spans.append(max(e.value for e in ests.values()) - min(e.value for e in ests.values()))
            row["all dimensions (no PCA)"] = dg.summary(rs, layer_of[mod], m, predictor="anchor keys, all dimensions",
                                                        n_boot=n_boot)["rho"].fmt(2)
            row["variance in the top 10 directions %"] = round(100 * float(np.mean(
                [r["explained"][layer_of[mod], :10].sum() for r in rs])), 1)
            rows.append(row)
    return rows, [float(x) for x in spans]


@summarised("diagnosis/baselines")
def baseline_estimates(runs: Runs, layer_of: Mapping[str, int], m: int, n_boot: int = N_BOOT) -> dict:
    """ρ of every predictor of :data:`helpers.experiments.diagnosis.BASELINES` at the chosen layer.

    Returns ``{model: {predictor: {task: Estimate}}}``. Used in: Diagnosis.
    """
    return {mod: {p: {name: dg.summary(rs, layer_of[mod], m, predictor=p, n_boot=n_boot)["rho"]
                      for name, rs in per.items()}
                  for p in dg.BASELINES} for mod, per in runs.items()}


def baseline_figure(base: Mapping, model: str, layer_of: Mapping[str, int], m: int) -> plt.Figure:
    """ρ with its interval for each predictor and task, for one model (:func:`helpers.pages.plots.baseline_dots`),
    titled with n (per task where the tasks have different numbers of seeds).

    Returns the figure. Used in: Diagnosis.
    """
    table = base[model]
    by_n: dict[str, list[str]] = {}
    for name, est in table[PCA].items():
        by_n.setdefault(est.n, []).append(get_task(name).title)
    n = (f", n = {next(iter(by_n))}" if len(by_n) == 1  # else per task (more seeds on one), on a second line
         else "\nn = " + "; ".join(f"{n} ({', '.join(titles)})" for n, titles in by_n.items()))
    return plots.baseline_dots(table, title=f"{model}: layer {layer_of[model] + 1}, M = {m}{n}")


def baseline_table(base: Mapping) -> pd.DataFrame:
    """ρ [95%] per model and predictor (rows) and task (columns).

    Returns a DataFrame. Used in: Diagnosis.
    """
    rows = [{"model": mod, "predictor": p, **{get_task(name).title: est.fmt(2) for name, est in per.items()}}
            for mod, table in base.items() for p, per in table.items()]
    return pd.DataFrame(rows).set_index(["model", "predictor"])


def baseline_values(base: Mapping, model: str) -> dict:
    """The predictors without anchors against the paper's: their ρ per model and task, and in how many of the
    model-task cases the mean-query predictor or the embeddings do at least as well as the anchor keys (and how
    often the embeddings' ρ is negative).

    Returns ``{glue name: value}``. Used in: Diagnosis.
    """
    values = {}
    for mod, table in base.items():
        key = _key(mod, model)
        for name in table["mean query per gold class"]:
            values[f"base_query_{key}_{name}"] = table["mean query per gold class"][name].fmt(2)
            values[f"base_emb_{key}_{name}"] = table["label-word embeddings"][name].fmt(2)
    cases = [(t[PCA][n].value, t["mean query per gold class"][n].value, t["label-word embeddings"][n].value)
             for t in base.values() for n in t[PCA]]
    values.update({"n_cases": len(cases), "n_query_beats": int(sum(q >= a for a, q, _ in cases)),
                   "n_emb_beats": int(sum(e >= a for a, _, e in cases)),
                   "n_emb_negative": int(sum(e < 0 for _, _, e in cases))})
    return values


def summary_table(summaries: Mapping, curves: Mapping, base: Mapping,
                  seeds_of: Mapping[str, Mapping[str, Sequence[int]]] | None = None) -> pd.DataFrame:
    """The chapter's closing table, one row per model and task: the seeds (where ``seeds_of`` is given), the most
    confused pair predicted and real (first seed), the rank of the real one, ρ and p per seed, the best layer, and the
    two predictors without anchors.

    Returns a DataFrame. Used in: Diagnosis.
    """
    rows = []
    for mod, per in summaries.items():
        for name, s in per.items():
            est = curves[mod][name]
            best = int(np.nanargmax(est.value))
            pair = s["pairs"][0]
            seeds = {"seeds": ", ".join(map(str, seeds_of[mod][name]))} if seeds_of else {}
            rows.append({"model": mod, "task": get_task(name).title, **seeds,
                         "most confused: predicted / real": f"{pair_text(name, pair['predicted'])} / "
                                                           f"{pair_text(name, pair['real'])}",
                         "rank of the real one": _rank_text(pair),
                         "ρ [95%]": s["rho"].fmt(2), "exact p": _p_text(s),
                         "best layer (ρ)": f"{best + 1} ({est.value[best]:.2f})",
                         "no anchors: mean query ρ": base[mod]["mean query per gold class"][name].fmt(2),
                         "no anchors: embeddings ρ": base[mod]["label-word embeddings"][name].fmt(2)})
    return pd.DataFrame(rows).set_index(["model", "task"])
