"""The tables, figures and glued values of the chapter *Re-weighting: learning to trust the anchors*.

Every function reads runs as :func:`helpers.experiments.reweighting.reweighting_runs` returns them, one model's as
``{task: {method: [result per seed]}}`` (``R`` below) and all models' as ``{model: R}``; none of them loads a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..core.runs import Profile
from ..core.tasks import TASKS, TaskData
from ..experiments import reweighting as rw
from . import plots

__all__ = ["ORDER", "SHORT", "seeds_shown", "has_average", "accuracy_table", "headline_values", "forest_estimates",
           "forest_figure", "beta_figure", "beta_layers_figure", "beta_values", "training_figure", "loss_table",
           "prior_table", "prior_values", "cost_frame", "cost_values", "second_model_values", "glued_values"]

ORDER = ["icl-1", "icl-5", "anchor", "random", "bias", "contextual"]
SHORT = {"icl-1": "ICL 1-shot", "icl-5": "ICL 5-shot (AG News 3)", "anchor": "anchor re-weighting",
         "random": "random-position re-weighting", "bias": "learned label bias", "contextual": "contextual calibration"}
TRAINED = ["anchor", "random", "bias"]  # the methods with a training loss
FOREST_XLABEL = "accuracy difference, points (95% paired bootstrap interval)"

Runs = Mapping[str, Mapping[str, Sequence[dict]]]  # one model's runs: {task: {method: [result per seed]}}


def seeds_shown(lm, data: Mapping[str, TaskData], profile: Profile) -> dict[str, tuple[int, ...]]:
    """Which seeds to show, per task: ``{task: seeds}``. The ``book`` profile shows what is cached: the seeds complete
    for every task if there are any (so that the average over tasks is defined), otherwise each task's own (tasks
    with none are left out). Other profiles compute all of their re-weighting seeds.

    Used in: Anchor re-weighting."""
    if profile.name != "book":
        return {name: rw.reweighting_seeds(profile) for name in data}
    per_task = {name: rw.available_seeds(lm, d, profile) for name, d in data.items()}
    common = set.intersection(*(set(s) for s in per_task.values()))
    if common:
        return {name: tuple(sorted(common)) for name in data}
    return {name: s for name, s in per_task.items() if s}


def has_average(R: Runs) -> bool:
    """Whether the average over tasks is defined: every task was run, all with the same number of seeds.

    Used in: Anchor re-weighting."""
    seeds = {len(v["icl-1"]) for v in R.values()}
    return len(R) == len(TASKS) and len(seeds) == 1


def _cell(e) -> str:
    """mean ± std over seeds [95% bootstrap interval]; no std with a single seed."""
    std = f" ± {e.seed_std:.1f}" if e.n_seeds > 1 else ""
    return f"{e.value:.1f}{std} [{e.low:.1f}, {e.high:.1f}]"


def _model_rows(model: str, R: Runs) -> list[dict]:
    rows = []
    for method in ORDER:
        row = {"model": model, "method": rw.METHOD_TITLES[method]}
        for name in TASKS:
            row[TASKS[name].title] = _cell(rw.accuracy(R, method, name)) if name in R else "not run"
        row["Average"] = _cell(rw.accuracy(R, method)) if has_average(R) else "—"
        row["n per task"] = rw.accuracy(R, method, next(iter(R))).n
        rows.append(row)
    return rows


def accuracy_table(runs: Mapping[str, Runs]) -> pd.DataFrame:
    """The accuracy table (the paper's Table 1 rows for GPT2-XL, then every method of every model): one row per
    (model, method), one column per task, the average over tasks and n per task; cells are "mean ± std over seeds
    [95% bootstrap interval]", "not run" for a task without runs, "—" where the average is not defined.

    Used in: Anchor re-weighting."""
    paper_rows = [{"model": "GPT2-XL (paper)", "method": rw.METHOD_TITLES[k],
                   **{TASKS[t].title: f"{v:.2f}" for t, v in rw.PAPER_TABLE1[k].items() if t != "average"},
                   "Average": f"{rw.PAPER_TABLE1[k]['average']:.2f}", "n per task": "≤1000 × 5"}
                  for k in ["icl-1", "icl-5", "anchor"]]
    rows = paper_rows + [r for m, R in runs.items() for r in _model_rows(m, R)]
    return pd.DataFrame(rows).set_index(["model", "method"])


def _per_task(R: Runs, a: str, b: str) -> str:
    return "; ".join(f"{TASKS[t].title} {rw.difference(R, a, b, t).fmt(1)}" for t in R)


def _verdict(e) -> str:
    return "above 0" if e.low > 0 else ("below 0" if e.high < 0 else "contains 0")


def headline_values(R: Runs, seeds: Sequence[int], profile: Profile) -> dict[str, object]:
    """The default model's headline numbers, ``{glue name: value}``: sizes (``n_test``, ``n_seeds``, ``seeds``,
    ``missing_seeds``, ``n_params``), every method's average accuracy (``acc_<method>``, ``acc_<method>_v``), the
    paired differences (``gain``, ``gain_vs_best``, ``gain_vs_icl5``, ``<method>_minus_icl1``, ...) with their
    verdicts and per-task values, the best control and the paper's Table 1 averages. ``seeds`` are the seeds shown.

    Used in: Anchor re-weighting."""
    best = rw.best_control(R)
    d_icl = rw.difference(R, "anchor", "icl-1")
    d_best = rw.difference(R, "anchor", best)
    paper = rw.PAPER_TABLE1
    out: dict[str, object] = {
        "n_test": len(R["sst2"]["icl-1"][0]["correct"]),
        "n_seeds": len(R["sst2"]["icl-1"]),
        "seeds": ", ".join(str(x) for x in seeds),
        "missing_seeds": ", ".join(str(x) for x in rw.reweighting_seeds(profile) if x not in seeds) or "none",
    }
    for k in ORDER:
        e = rw.accuracy(R, k)
        out[f"acc_{k}"] = e.fmt(1)
        out[f"acc_{k}_v"] = f"{e.value:.1f}"
    out.update({
        "gain": d_icl.fmt(1),
        "gain_v": f"{d_icl.value:+.1f}",
        "gain_vs_best": d_best.fmt(1),
        "gain_vs_icl5": rw.difference(R, "anchor", "icl-5").fmt(1),
        "best_control": SHORT[best],
        "paper_gain": f"{paper['anchor']['average'] - paper['icl-1']['average']:+.1f}",
        "paper_anchor": f"{paper['anchor']['average']:.2f}",
        "paper_icl1": f"{paper['icl-1']['average']:.2f}",
        "paper_icl5": f"{paper['icl-5']['average']:.2f}",
        "gain_tasks": _per_task(R, "anchor", "icl-1"),
        "best_tasks": _per_task(R, "anchor", best),
        "gain_verdict": _verdict(d_icl),
        "best_verdict": _verdict(d_best),
    })
    for k in ["icl-5", "contextual", "bias", "random"]:
        out[f"{k.replace('-', '')}_minus_icl1"] = rw.difference(R, k, "icl-1").fmt(1)
    out["anchor_minus_random"] = rw.difference(R, "anchor", "random").fmt(1)
    out["n_params"] = ", ".join(f"{TASKS[t].title} {R[t]['anchor'][0]['beta'].size}" for t in R)
    return out


def forest_estimates(R: Runs) -> dict[str, object]:
    """Anchor re-weighting minus every other method, per task and (where defined) on the average over tasks:
    ``{"vs <method>: <task>": Estimate}`` in points.

    Used in: Anchor re-weighting."""
    est = {}
    for other in ["icl-1", "icl-5", "random", "bias", "contextual"]:
        for name in list(TASKS) + ["average"]:
            if name == "average" and not has_average(R):
                continue
            if name != "average" and name not in R:
                continue
            label = f"vs {SHORT[other]}: {'Average' if name == 'average' else TASKS[name].title}"
            est[label] = rw.difference(R, "anchor", other, None if name == "average" else name)
    return est


def forest_figure(R: Runs, model: str) -> plt.Figure:
    """The paired differences of :func:`forest_estimates` as a forest plot (green above 0, red below, grey
    containing 0), titled with the model and n per task; returns the Figure.

    Used in: Anchor re-weighting (the default model and the second model)."""
    est = forest_estimates(R)
    first = next(iter(est.values()))
    title = f"{model}: anchor re-weighting minus each method (n = {first.n} per task)"
    return plots.difference_forest(est, title=title, xlabel=FOREST_XLABEL)


def _figure(drawn) -> plt.Figure:
    """The figure a plotting function drew (also when it returned nothing)."""
    return drawn if drawn is not None else plt.gcf()


def beta_figure(R: Runs, model: str) -> plt.Figure:
    """Heatmaps of the learned β of anchor re-weighting, averaged over seeds, one panel per task (layers × heads
    grouped by class); returns the Figure.

    Used in: Anchor re-weighting."""
    betas = {name: np.mean([r["beta"] for r in R[name]["anchor"]], axis=0) for name in R}
    title = f"{model}: learned β, mean over {len(R['sst2']['anchor'])} seeds"
    return _figure(plots.beta_heatmaps(betas, title=title))


def _mean_abs_beta(results: Sequence[dict]) -> np.ndarray:
    """(seeds, layers): mean |β| over heads and classes, per seed and layer."""
    return np.array([np.abs(r["beta"]).mean(axis=(1, 2)) for r in results])


def beta_layers_figure(R: Runs) -> plt.Figure:
    """Mean |β| per layer (over heads and classes), anchor against random-position re-weighting, one panel per task
    (line: mean over seeds; band: range over seeds); returns the Figure.

    Used in: Anchor re-weighting."""
    fig, axes = plt.subplots(1, len(R), figsize=(11, 2.7), sharey=True, squeeze=False, constrained_layout=True)
    axes = axes[0]
    for ax, name in zip(axes, R):
        for method, style in [("anchor", "-"), ("random", "--")]:
            per_layer = _mean_abs_beta(R[name][method])
            layers = np.arange(1, per_layer.shape[1] + 1)
            ax.plot(layers, per_layer.mean(0), style, marker=".", label=SHORT[method])
            ax.fill_between(layers, per_layer.min(0), per_layer.max(0), alpha=0.2, lw=0)
        ax.set_title(TASKS[name].title, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_xticks(layers[:: max(1, len(layers) // 6)])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean |β| over heads and classes")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=9)
    return fig


def beta_values(R: Runs) -> dict[str, str]:
    """``{"beta_deep_share": "NN%"}``: the share of anchor re-weighting's total |β| (mean over seeds) held by the
    second half of the layers, averaged over tasks.

    Used in: Anchor re-weighting."""
    deep = {name: _mean_abs_beta(R[name]["anchor"]).mean(axis=0) for name in R}
    n_layers = len(next(iter(deep.values())))
    share = np.mean([v[n_layers // 2:].sum() / v.sum() for v in deep.values()])
    return {"beta_deep_share": f"{100 * share:.0f}%"}


def training_figure(R: Runs, model: str) -> plt.Figure:
    """The training loss per epoch of the trained methods (anchor, random positions, learned bias), one panel per
    task (mean over seeds, band: range over seeds); returns the Figure.

    Used in: Anchor re-weighting."""
    curves = {name: {SHORT[m]: np.array([r["epoch_loss"] for r in R[name][m]]) for m in TRAINED} for name in R}
    title = f"{model}: mean training loss per epoch (band: range over seeds)"
    return _figure(plots.training_curves(curves, title=title))


def loss_table(R: Runs) -> pd.DataFrame:
    """Per (task, trained method), means over seeds: the training loss with β = 0 and at the end, and the training
    accuracy at the end (%), rounded to 3 decimals.

    Used in: Anchor re-weighting."""
    rows = []
    for name in R:
        gold = [r["train_gold"] for r in R[name]["icl-1"]]
        for m in TRAINED:
            rs = R[name][m]
            rows.append({"task": TASKS[name].title, "method": SHORT[m],
                         "loss at start": np.mean([float(r["loss_start"]) for r in rs]),
                         "loss at end": np.mean([float(r["loss_end"]) for r in rs]),
                         "train accuracy at end %": 100 * np.mean([np.mean(r["train_logits"].argmax(1) == g)
                                                                   for r, g in zip(rs, gold, strict=True)])})
    return pd.DataFrame(rows).set_index(["task", "method"]).round(3)


def _majority_share(results: Sequence[dict]) -> float:
    """Share (%) of the test predictions that go to the most-predicted class, per seed, averaged."""
    return 100 * np.mean([np.bincount(r["pred"], minlength=r["logits"].shape[1]).max() / len(r["pred"])
                          for r in results])


def prior_table(R: Runs) -> pd.DataFrame:
    """Per task, the share (%) of the test predictions on the most-predicted class for every method, beside the
    share of the most frequent gold class (means over seeds, rounded to 1 decimal).

    Used in: Anchor re-weighting."""
    rows = []
    for name in R:
        gold = np.mean([100 * np.bincount(r["gold"]).max() / len(r["gold"]) for r in R[name]["icl-1"]])
        row = {"task": TASKS[name].title, "gold (most frequent class)": gold}
        row.update({SHORT[m]: _majority_share(R[name][m]) for m in ORDER})
        rows.append(row)
    return pd.DataFrame(rows).set_index("task").round(1)


def prior_values(R: Runs) -> dict[str, str]:
    """``majority_icl1``, ``majority_anchor``, ``majority_gold``: the columns of :func:`prior_table` averaged over
    tasks, as "NN%".

    Used in: Anchor re-weighting."""
    prior = prior_table(R)
    return {"majority_icl1": f"{prior[SHORT['icl-1']].mean():.0f}%",
            "majority_anchor": f"{prior[SHORT['anchor']].mean():.0f}%",
            "majority_gold": f"{prior['gold (most frequent class)'].mean():.0f}%"}


def cost_frame(R: Runs) -> pd.DataFrame:
    """The cost table (:func:`helpers.experiments.reweighting.cost_table`) indexed by task title, rounded to 2
    decimals: training time and peak memory of anchor re-weighting beside one vanilla evaluation pass.

    Used in: Anchor re-weighting."""
    cost = pd.DataFrame(rw.cost_table(R)).set_index("task").round(2)
    cost.index = [TASKS[t].title for t in cost.index]
    return cost


def cost_values(R: Runs) -> dict[str, str]:
    """Ranges over tasks of :func:`cost_frame`: ``train_s``, ``train_ratio``, ``step_ratio`` (naive / one-token
    step), ``threads``, ``peak_train``, ``peak_eval``, ``peak_diff`` and ``naive_extra`` (MB).

    Used in: Anchor re-weighting."""
    cost = cost_frame(R)
    step = cost["naive step s"] / cost["step s"]
    return {
        "train_ratio": f"{cost['training / evaluation'].min():.1f}-{cost['training / evaluation'].max():.1f}",
        "train_s": f"{cost['training s'].min():.0f}-{cost['training s'].max():.0f}",
        "step_ratio": f"{step.min():.1f}-{step.max():.1f}",
        "threads": str(int(cost["threads"].iloc[0])),
        "peak_train": f"{cost['training peak MB'].max():.0f}",
        "peak_eval": f"{cost['evaluation peak MB'].max():.0f}",
        "peak_diff": f"{(cost['training peak MB'] - cost['evaluation peak MB']).abs().max():.0f}",
        "naive_extra": f"{cost['naive step extra MB'].min():.0f}-{cost['naive step extra MB'].max():.0f}",
    }


def second_model_values(R2: Runs, seeds: Mapping[str, Sequence[int]]) -> dict[str, str]:
    """The second model's numbers: per-task differences of anchor re-weighting against 1-shot ICL, contextual
    calibration, random positions and the learned bias (``second_*_tasks``), the seeds and tasks run, and a sentence
    on the average over tasks (``second_average_note``). ``seeds``: the seeds shown per task.

    Used in: Anchor re-weighting."""
    out = {f"second_{key}_tasks": _per_task(R2, "anchor", other)
           for key, other in [("gain", "icl-1"), ("ctx", "contextual"), ("rnd", "random"), ("bias", "bias")]}
    out["second_seeds"] = ", ".join(map(str, sorted({s for ss in seeds.values() for s in ss})))
    out["second_tasks"] = ", ".join(TASKS[t].title for t in R2)
    if has_average(R2):
        b2 = rw.best_control(R2)
        out["second_average_note"] = (f"Averaged over the four tasks, anchor re-weighting minus 1-shot ICL is "
                                      f"{rw.difference(R2, 'anchor', 'icl-1').fmt(1)} points, and minus the best "
                                      f"control ({SHORT[b2]}) {rw.difference(R2, 'anchor', b2).fmt(1)}.")
    else:
        out["second_average_note"] = "With fewer than four tasks there is no average for this model."
    return out


def glued_values(runs: Mapping[str, Runs], seeds: Mapping[str, Mapping[str, Sequence[int]]], model: str,
                 second_model: str | None, profile: Profile) -> dict[str, object]:
    """Every value the chapter glues, ``{name: value}``: :func:`headline_values`, :func:`beta_values`,
    :func:`prior_values` and :func:`cost_values` of ``model``, and :func:`second_model_values` where the second model
    has runs. ``seeds``: ``{model: {task: seeds shown}}`` (:func:`seeds_shown`).

    Used in: Anchor re-weighting."""
    R = runs[model]
    out = headline_values(R, seeds[model]["sst2"], profile)
    out |= beta_values(R) | prior_values(R) | cost_values(R)
    if second_model and runs.get(second_model):
        out |= second_model_values(runs[second_model], seeds[second_model])
    return out
