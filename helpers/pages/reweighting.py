"""The tables, figures and glued values of the chapter *Re-weighting: learning to trust the anchors*.

Every function reads runs as :func:`helpers.experiments.reweighting.reweighting_runs` returns them, one model's as
``{task: {method: [result per seed]}}`` (``R`` below) and all models' as ``{model: R}``; none of them loads a model.
The numbers of the tables, the glued values and the forest plots' estimates (bootstraps) are stored summaries keyed on
the content of the runs (:mod:`helpers.pages.summaries`), and the equal-leverage section, whose runs need probes fitted,
is one summary keyed on the model and the profile (:func:`cached_leverage`): a build from the committed results and
summaries bootstraps and fits nothing.
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
from .summaries import summarised, summary

__all__ = ["ORDER", "SHORT", "TITLES", "CONTROLS", "COMPARED", "with_controls", "seeds_shown", "has_average",
           "accuracy_table", "headline_values", "forest_estimates", "forest_figure", "second_forest_figure",
           "controls_table",
           "controls_values", "fit_table", "fit_values", "resolution_values", "beta_figure", "beta_layers_figure", "beta_values",
           "training_figure", "loss_table", "prior_table", "prior_values", "cost_frame", "cost_values",
           "second_model_values", "glued_values", "lr_table", "lr_edge_values", "leverage_table", "leverage_figure", "leverage_values",
           "LEVERAGE_SHORT", "cached_leverage", "leverage_frame", "leverage_points_figure"]

ORDER = ["icl-1", "icl-5", "anchor", "random", "contextual", "bias", *rw.FITTED_CONTROLS]
SHORT = {"icl-1": "ICL 1-shot", "icl-5": "ICL 5-shot (AG News 3)", "anchor": "anchor re-weighting",
         "random": "random-position re-weighting", "contextual": "contextual calibration",
         "bias": "label bias trained like β", "bias-fit": "fitted label bias",
         "bias-temperature": "fitted bias and temperature", "batch": "batch calibration"}
TITLES = {**rw.METHOD_TITLES, **rw.FITTED_TITLES,
          "bias": "Control: label bias trained like β (Adam, 10 epochs)"}
CONTROLS = rw.CONTROLS  # what re-weighting must beat (the verdict "reweighting-vs-controls")
COMPARED = ["icl-1", "icl-5", "random", "contextual", "bias", *rw.FITTED_CONTROLS]  # re-weighting minus each
TRAINED = ["anchor", "random", "bias"]  # the methods with a training loss
FOREST_XLABEL = "points (thin: 95%, thick: 80% interval; paired bootstrap over {over})"

Runs = Mapping[str, Mapping[str, Sequence[dict]]]  # one model's runs: {task: {method: [result per seed]}}


def with_controls(R: Runs) -> Runs:
    """One model's runs with the controls fitted on the stored logits added as methods
    (:func:`helpers.experiments.reweighting.with_fitted_controls`); unchanged if they are there already.

    Used in: Anchor re-weighting."""
    if all(set(rw.FITTED_CONTROLS) <= set(by) for by in R.values()):
        return R
    return rw.with_fitted_controls(R)


def _key(method: str) -> str:
    """A method's name in glue names: "bias-fit" -> "bias_fit"."""
    return method.replace("-", "_")


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


@summarised("reweighting/accuracy-rows")
def _model_rows(model: str, R: Runs) -> list[dict]:
    R = with_controls(R)
    rows = []
    for method in ORDER:
        row = {"model": model, "method": TITLES[method]}
        for name in TASKS:
            row[TASKS[name].title] = _cell(rw.accuracy(R, method, name)) if name in R else "not run"
        row["Average"] = _cell(rw.accuracy(R, method)) if has_average(R) else "—"
        row["n per task"] = rw.accuracy(R, method, next(iter(R))).n
        rows.append(row)
    return rows


def accuracy_table(runs: Mapping[str, Runs]) -> pd.DataFrame:
    """The accuracy table (the paper's Table 1 rows for GPT2-XL, then every method of every model, the fitted
    controls included): one row per (model, method), one column per task, the average over tasks and n per task;
    cells are "mean ± std over seeds [95% bootstrap interval]", "not run" for a task without runs, "—" where the
    average is not defined.

    Used in: Anchor re-weighting."""
    paper_rows = [{"model": "GPT2-XL (paper)", "method": TITLES[k],
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
    paired differences against 1-shot ICL (``gain``, ``gain_v``, ``gain_verdict``, ``gain_tasks``;
    ``<method>_minus_icl1`` for every other method, e.g. ``biasfit_minus_icl1``), against 5-shot ICL
    (``gain_vs_icl5``) and random positions (``anchor_minus_random``), every method on TREC against 1-shot ICL
    (``trec_minus_icl1``) and the paper's Table 1 averages. ``seeds`` are the seeds shown.

    Used in: Anchor re-weighting."""
    R = with_controls(R)
    d_icl = rw.difference(R, "anchor", "icl-1")
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
        "gain_vs_icl5": rw.difference(R, "anchor", "icl-5").fmt(1),
        "paper_gain": f"{paper['anchor']['average'] - paper['icl-1']['average']:+.1f}",
        "paper_anchor": f"{paper['anchor']['average']:.2f}",
        "paper_icl1": f"{paper['icl-1']['average']:.2f}",
        "paper_icl5": f"{paper['icl-5']['average']:.2f}",
        "gain_tasks": _per_task(R, "anchor", "icl-1"),
        "gain_verdict": _verdict(d_icl),
    })
    for k in ORDER:
        if k not in ("icl-1", "anchor"):  # anchor minus 1-shot ICL is the gain
            out[f"{k.replace('-', '')}_minus_icl1"] = rw.difference(R, k, "icl-1").fmt(1)
    out["anchor_minus_random"] = rw.difference(R, "anchor", "random").fmt(1)
    if "trec" in R:
        out["trec_minus_icl1"] = "; ".join(f"{SHORT[k]} {rw.difference(R, k, 'icl-1', 'trec').fmt(1)}"
                                           for k in ["anchor", "contextual", "bias-fit", "batch"])
    out["n_params"] = ", ".join(f"{TASKS[t].title} {R[t]['anchor'][0]['beta'].size}" for t in R)
    return out


@summarised("reweighting/forest-estimates")
def forest_estimates(R: Runs) -> dict[str, dict[str, object]]:
    """Anchor re-weighting minus every other method (:data:`COMPARED`), per task and (where defined) on the average
    over tasks: ``{method's short name: {task title or "Average": Estimate}}`` in points.

    Used in: Anchor re-weighting."""
    R = with_controls(R)
    names = [t for t in TASKS if t in R] + (["average"] if has_average(R) else [])
    return {SHORT[other]: {("Average" if name == "average" else TASKS[name].title):
                           rw.difference(R, "anchor", other, None if name == "average" else name) for name in names}
            for other in COMPARED}


def _color(e) -> str:
    """Green: the 95% interval lies above 0; orange: only the 80% one does; red: the 95% interval lies below 0;
    grey otherwise (the verdict page's colours)."""
    weak_low = e.low if e.weak_low is None else e.weak_low
    return "#2ca02c" if e.low > 0 else "#e08a00" if weak_low > 0 else "#d62728" if e.high < 0 else "#777777"


def forest_figure(R: Runs, model: str) -> plt.Figure:
    """The paired differences of :func:`forest_estimates` as a forest plot, one panel per compared method (rows:
    tasks and the average), thin bars the 95% interval and thick bars the 80% one, coloured by :func:`_color`;
    panels of the controls re-weighting must beat (:data:`CONTROLS`) are titled in bold. Returns the Figure.

    Used in: Anchor re-weighting (the default model and the second model)."""
    est = forest_estimates(R)
    rows = list(next(iter(est.values())))
    n_cols = 2  # two panels a row keep the labels at their size on the book's page (four made them ~7 px)
    n_rows = -(-len(est) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(plots.PAGE_WIDTH, 0.9 + n_rows * (0.26 * len(rows) + 0.62)),
                             sharex=True, sharey=True, squeeze=False, constrained_layout=True)
    by_name = {SHORT[m]: m for m in COMPARED}
    for ax, (name, per_row) in zip(axes.flat, est.items()):
        for i, e in enumerate(per_row.values()):
            c = _color(e)
            ax.plot([e.low, e.high], [i, i], color=c, lw=1.2)
            if e.weak_low is not None:
                ax.plot([e.weak_low, e.weak_high], [i, i], color=c, lw=4, solid_capstyle="butt")
            ax.plot([e.value], [i], "o", color=c, ms=4.5, mec="white", mew=0.6)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(rows)), rows, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        control = by_name[name] in CONTROLS
        ax.set_title(f"minus {name}", fontsize=9.5, fontweight="bold" if control else "normal")
    axes[0, 0].invert_yaxis()
    for ax in axes.flat[len(est):]:
        ax.set_visible(False)
    first = next(iter(est[SHORT["icl-1"]].values()))
    over = "seeds, then examples" if first.n_seeds > 1 else "test examples (one seed)"
    fig.supxlabel(FOREST_XLABEL.format(over=over), fontsize=9)
    fig.suptitle(f"{model}: anchor re-weighting minus each method\n(n = {first.n} per task; bold: the controls "
                 f"it must beat)", fontsize=10)
    return fig


def second_forest_figure(R2: Runs | None, model: str) -> plt.Figure:
    """:func:`forest_figure` for the second model, or (``R2`` None or empty: no runs) a figure that says so, so the
    chapter's numbered figure always has an image.

    Used in: Anchor re-weighting."""
    if R2:
        return forest_figure(R2, model)
    fig, ax = plt.subplots(figsize=(6, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, f"{model}: no committed results", ha="center", va="center")
    return fig


def controls_table(runs: Mapping[str, Runs]) -> pd.DataFrame:
    """Re-weighting at the paper's learning rate against each control, per model: one row per (model, control), the
    label-prior controls and random positions at the paper's rate (:data:`CONTROLS`) and the Adam-trained bias;
    columns: the control's average accuracy, re-weighting minus it on the average over tasks (95% and 80% intervals)
    and per task (95%). The verdict's comparison, every trained β at its own learning rate, is :func:`leverage_table`.
    Nothing is chosen on the test examples: every control is shown. Where the average is not defined, "—".

    Used in: Anchor re-weighting."""
    return pd.DataFrame(_controls_rows(runs)).set_index(["model", "control"])


@summarised("reweighting/controls-rows")
def _controls_rows(runs: Mapping[str, Runs]) -> list[dict]:
    rows = []
    for model, R in runs.items():
        R = with_controls(R)
        avg = has_average(R)
        for c in [*CONTROLS, "bias"]:
            d = rw.difference(R, "anchor", c) if avg else None
            row = {"model": model, "control": SHORT[c],
                   "accuracy %": rw.accuracy(R, c).fmt(1) if avg else "—",
                   "re-weighting minus it, average (95%)": d.fmt(1) if avg else "—",
                   "80% interval": f"[{d.weak_low:.1f}, {d.weak_high:.1f}]" if avg else "—"}
            row.update({TASKS[t].title: rw.difference(R, "anchor", c, t).fmt(1) if t in R else "not run"
                        for t in TASKS})
            rows.append(row)
    return rows


def controls_values(R: Runs) -> dict[str, str]:
    """One model's glue for the controls, needing the average over tasks: per control (:data:`CONTROLS` and the
    Adam bias, keys ``random``, ``contextual``, ``bias_fit``, ``bias_temperature``, ``batch``, ``bias``)
    ``ctrl_<key>_acc``, ``ctrl_<key>_diff`` (re-weighting minus it) and ``ctrl_<key>_tasks``; the control closest to
    re-weighting (``closest_control``, ``closest_diff``, ``closest_verdict``, ``closest_weak``: its 80% interval,
    ``closest_tasks``),
    the controls whose 95% interval lies above 0 (``controls_beaten``) and the others (``controls_not_beaten``).

    Used in: Anchor re-weighting."""
    R = with_controls(R)
    diffs = {c: rw.difference(R, "anchor", c) for c in [*CONTROLS, "bias"]}
    out = {}
    for c, d in diffs.items():
        out[f"ctrl_{_key(c)}_acc"] = rw.accuracy(R, c).fmt(1)
        out[f"ctrl_{_key(c)}_diff"] = d.fmt(1)
        out[f"ctrl_{_key(c)}_tasks"] = _per_task(R, "anchor", c)
    closest = min(CONTROLS, key=lambda c: float(diffs[c].value))
    e = diffs[closest]
    out.update({"closest_control": SHORT[closest], "closest_diff": e.fmt(1), "closest_verdict": _verdict(e),
                "closest_weak": f"[{e.weak_low:.1f}, {e.weak_high:.1f}]", "closest_tasks": _per_task(R, "anchor", closest),
                "controls_beaten": "; ".join(SHORT[c] for c in CONTROLS if diffs[c].low > 0) or "none",
                "controls_not_beaten": "; ".join(SHORT[c] for c in CONTROLS if not diffs[c].low > 0) or "none"})
    return out


def _fits(R: Runs, name: str, method: str, key: str) -> np.ndarray:
    return np.array([float(r[key]) for r in R[name][method]])


def fit_table(runs: Mapping[str, Runs]) -> pd.DataFrame:
    """How well each label-prior control fits its training examples, per (model, task), means over seeds: the mean
    training loss at b = 0, after the Adam-trained bias (10 epochs, lr 0.01, as β), after the bias fitted to
    convergence and the bias with a temperature (:func:`helpers.experiments.reweighting.fit_bias`), and after anchor
    re-weighting (for scale); the spread of the bias (largest minus smallest entry, in logits) of the Adam and the
    fitted bias; the fitted scale a = 1/T (largest over seeds), the largest gradient component where the fits
    stopped and how many fits met the stopping rule (every component below ``GTOL``).

    Used in: Anchor re-weighting."""
    rows = []
    for model, R in runs.items():
        R = with_controls(R)
        for name in R:
            fits = [r for m in ("bias-fit", "bias-temperature") for r in R[name][m]]
            grads = [float(r["grad_max"]) for r in fits]
            rows.append({"model": model, "task": TASKS[name].title,
                         "loss at b = 0": _fits(R, name, "bias-fit", "loss_start").mean(),
                         "bias, Adam": _fits(R, name, "bias", "loss_end").mean(),
                         "bias, fitted": _fits(R, name, "bias-fit", "loss_end").mean(),
                         "bias + temperature, fitted": _fits(R, name, "bias-temperature", "loss_end").mean(),
                         "anchor re-weighting": _fits(R, name, "anchor", "loss_end").mean(),
                         "bias spread, Adam": np.mean([np.ptp(r["bias"]) for r in R[name]["bias"]]),
                         "bias spread, fitted": np.mean([np.ptp(r["bias"]) for r in R[name]["bias-fit"]]),
                         "fitted scale a (largest)": _fits(R, name, "bias-temperature", "scale").max(),
                         "largest gradient at the stop": f"{max(grads):.1e}",
                         f"fits with gradient < {rw.GTOL:.0e}": f"{sum(g < rw.GTOL for g in grads)} of {len(grads)}"})
    return pd.DataFrame(rows).set_index(["model", "task"]).round(3)


def fit_values(R: Runs) -> dict[str, str]:
    """One model's glue for the fits: ``fit_gtol`` (the stopping rule's threshold), ``fit_rule_met`` ("n of m"
    fits that met it), ``fit_grad_worst`` (the largest gradient component left), ``fit_loss_tasks`` (per task, the
    mean training loss of the Adam bias -> the fitted bias), ``fit_loss_adam`` and ``fit_loss_fit`` (those averaged
    over tasks), ``fit_loss_anchor`` (anchor re-weighting's), ``fit_scale_max`` (the largest fitted scale and its
    task), ``fit_separable`` (the temperature fits whose training loss went to 0, by task), ``fit_n`` (how many fits)
    and ``fit_spread_adam`` / ``fit_spread_fit`` (the largest spread of the Adam and of the fitted bias, logits;
    the latter with its task).

    Used in: Anchor re-weighting."""
    R = with_controls(R)
    fits = [(name, r) for name in R for m in ("bias-fit", "bias-temperature") for r in R[name][m]]
    grads = [float(r["grad_max"]) for _, r in fits]
    adam = {t: _fits(R, t, "bias", "loss_end").mean() for t in R}
    fit = {t: _fits(R, t, "bias-fit", "loss_end").mean() for t in R}
    scale_task, scale = max(((t, float(r["scale"])) for t in R for r in R[t]["bias-temperature"]),
                            key=lambda x: x[1])
    separable = [t for t in R for r in R[t]["bias-temperature"] if float(r["loss_end"]) < 1e-6]
    spread = {m: max((float(np.ptp(r["bias"])), t) for t in R for r in R[t][m]) for m in ("bias", "bias-fit")}
    return {"fit_gtol": f"{rw.GTOL:.0e}", "fit_rule_met": f"{sum(g < rw.GTOL for g in grads)} of {len(grads)}",
            "fit_n": str(len(grads)),
            "fit_separable": (f"{len(separable)} of {sum(len(R[t]['bias-temperature']) for t in R)} fits ("
                              f"{', '.join(dict.fromkeys(TASKS[t].title for t in separable))})") if separable else "none",
            "fit_spread_adam": f"{spread['bias'][0]:.1f}",
            "fit_spread_fit": f"{spread['bias-fit'][0]:.1f} ({TASKS[spread['bias-fit'][1]].title})",
            "fit_grad_worst": f"{max(grads):.1e}",
            "fit_loss_tasks": "; ".join(f"{TASKS[t].title} {adam[t]:.3f} → {fit[t]:.3f}" for t in R),
            "fit_loss_adam": f"{np.mean(list(adam.values())):.3f}", "fit_loss_fit": f"{np.mean(list(fit.values())):.3f}",
            "fit_loss_anchor": f"{np.mean([_fits(R, t, 'anchor', 'loss_end').mean() for t in R]):.3f}",
            "fit_scale_max": f"{scale:.0f} ({TASKS[scale_task].title})"}


def resolution_values(R: Runs) -> dict[str, str]:
    """What the sizes resolve: ``halfwidth_task`` and ``halfwidth_avg``, the range of the half-widths (points) of
    the 95% intervals of re-weighting minus each other method, per task and on the average over tasks.

    Used in: Anchor re-weighting."""
    est = forest_estimates(R)
    half = {k: [(e.high - e.low) / 2 for per in est.values() for t, e in per.items() if (t == "Average") == k]
            for k in (False, True)}
    rng = {k: f"{min(v):.0f}-{max(v):.0f}" if v else "—" for k, v in half.items()}
    return {"halfwidth_task": rng[False], "halfwidth_avg": rng[True]}


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
    """Mean ``|β|`` per layer (over heads and classes), anchor against random-position re-weighting, one panel per task
    (line: mean over seeds; band: range over seeds); returns the Figure.

    Used in: Anchor re-weighting."""
    fig, axes = plots.panel_grid(len(R), row_height=2.3, extra=0.6, xlabel="layer", ylabel="mean |β|")
    for ax, name in zip(axes, R):
        for method, style in [("anchor", "-"), ("random", "--")]:
            per_layer = _mean_abs_beta(R[name][method])
            layers = np.arange(1, per_layer.shape[1] + 1)
            ax.plot(layers, per_layer.mean(0), style, marker=".", label=SHORT[method])
            ax.fill_between(layers, per_layer.min(0), per_layer.max(0), alpha=0.2, lw=0)
        ax.set_title(TASKS[name].title, fontsize=10)
        ax.set_xticks(plots.layer_ticks(len(layers)))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    return fig


def beta_values(R: Runs) -> dict[str, str]:
    """``{"beta_deep_share": "NN%"}``: the share of anchor re-weighting's total ``|β|`` (mean over seeds) held by the
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
    """Per task, the share (%) of the test predictions on the most-predicted class for every method (the fitted
    controls included), beside the share of the most frequent gold class (means over seeds, rounded to 1 decimal).

    Used in: Anchor re-weighting."""
    R = with_controls(R)
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
    """The second model's numbers: per-task differences of anchor re-weighting against 1-shot ICL, random positions,
    contextual calibration, the Adam bias, the fitted bias and batch calibration (``second_*_tasks``), the seeds
    and tasks run (``second_seeds``, ``second_n_seeds``, ``second_tasks``), a sentence on the average over tasks
    (``second_average_note``) and the control closest to re-weighting on that average (``second_closest_control``,
    ``second_closest_diff``; "—" without an average). ``seeds``: the seeds shown per task.

    Used in: Anchor re-weighting."""
    R2 = with_controls(R2)
    out = {f"second_{key}_tasks": _per_task(R2, "anchor", other)
           for key, other in [("gain", "icl-1"), ("ctx", "contextual"), ("rnd", "random"), ("bias", "bias"),
                              ("fit", "bias-fit"), ("batch", "batch")]}
    out["second_seeds"] = ", ".join(map(str, sorted({s for ss in seeds.values() for s in ss})))
    out["second_n_seeds"] = str(min(len(ss) for ss in seeds.values()))
    out["second_tasks"] = ", ".join(TASKS[t].title for t in R2)
    if has_average(R2):
        diffs = {c: rw.difference(R2, "anchor", c) for c in CONTROLS}
        closest = min(CONTROLS, key=lambda c: float(diffs[c].value))
        out["second_closest_control"], out["second_closest_diff"] = SHORT[closest], diffs[closest].fmt(1)
        out["second_average_note"] = (
            f"Averaged over the four tasks, anchor re-weighting minus 1-shot ICL is "
            f"{rw.difference(R2, 'anchor', 'icl-1').fmt(1)} points, and minus each control: "
            + "; ".join(f"{SHORT[c]} {d.fmt(1)}" for c, d in diffs.items())
            + f" (closest: {SHORT[closest]}).")
    else:
        out["second_average_note"] = "With fewer than four tasks there is no average for this model."
        out["second_closest_control"] = out["second_closest_diff"] = "—"
    return out


@summarised("reweighting/glued-values")
def glued_values(runs: Mapping[str, Runs], seeds: Mapping[str, Mapping[str, Sequence[int]]], model: str,
                 second_model: str | None, profile: Profile) -> dict[str, object]:
    """Every value the chapter glues, ``{name: value}``: :func:`headline_values`, :func:`controls_values`,
    :func:`fit_values`, :func:`resolution_values`, :func:`beta_values`, :func:`prior_values` and :func:`cost_values`
    of ``model``, and :func:`second_model_values` where the second model has runs. ``seeds``: ``{model: {task:
    seeds shown}}`` (:func:`seeds_shown`). (The verdict words come from :func:`helpers.pages.verdicts.chapter_verdicts`.)

    Used in: Anchor re-weighting."""
    R = with_controls(runs[model])
    out = headline_values(R, seeds[model]["sst2"], profile)
    out |= controls_values(R) | fit_values(R) | resolution_values(R)
    out |= beta_values(R) | prior_values(R) | cost_values(R)
    if second_model and runs.get(second_model):
        out |= second_model_values(runs[second_model], seeds[second_model])
    return out


# --------------------------------------------------------------------------------------------------------------------
# Controls with the same leverage, each trained at its own learning rate (helpers.experiments.reweighting)
# --------------------------------------------------------------------------------------------------------------------

LEVERAGE_SETS = {"anchor-tuned": "label words", "random-tuned": "random text", "beta-attended": "most attended",
                 "beta-newline": "newline", "beta-colon": "colon", "beta-bos": "BOS",
                 "beta-shallow": "label words", "beta-deep": "label words"}
LEVERAGE_SHORT = {"anchor-tuned": "anchor re-weighting (tuned lr)", "random-tuned": "random text tokens",
                  "beta-attended": "most-attended non-label token", "beta-newline": "newline after the label",
                  "beta-colon": "colon before the label", "beta-bos": "BOS token",
                  "beta-shallow": "label words, shallow half only", "beta-deep": "label words, deep half only",
                  "probe": "linear probe (β's parameter count)", "contextual-3": "contextual calibration (3 inputs)",
                  "bias-fit": "fitted label bias", "bias-temperature": "fitted bias and temperature",
                  "batch": "batch calibration"}


def _at_edge(s: Mapping) -> str | None:
    """"top" or "bottom" where a search's chosen rate is the largest or the smallest rate of its grid, else None."""
    grid = [float(x) for x in np.asarray(s["grid"]).ravel()]
    lr = float(np.asarray(s["lr"]).ravel()[0])
    return "top" if lr == max(grid) else "bottom" if lr == min(grid) else None


def lr_table(searches: Mapping[str, Mapping[str, Mapping[str, dict]]]) -> pd.DataFrame:
    """The learning-rate search of every trained β: ``searches`` is ``{model: {task: {method: search}}}``
    (:func:`helpers.experiments.reweighting.lr_search_run`); one row per (model, method, task), the mean held-out
    cross-entropy at each rate of the grid and the rate chosen (lowest held-out loss), marked " (edge)" where it is
    the smallest or the largest rate of the grid.

    Used in: Anchor re-weighting."""
    rows = []
    for model, by_task in searches.items():
        for task, by_method in by_task.items():
            for method, s in by_method.items():
                row = {"model": model, "trained β": LEVERAGE_SHORT.get(rw._tuned_key(method), method),
                       "task": TASKS[task].title}
                for lr, loss in zip(s["grid"], s["heldout_loss"].mean(1)):
                    row[f"held-out loss, lr {lr:g}"] = round(float(loss), 3)
                row["chosen lr"] = f"{float(s['lr']):g}" + (" (edge)" if _at_edge(s) else "")
                rows.append(row)
    return pd.DataFrame(rows).set_index(["model", "trained β", "task"])


def lr_edge_values(searches: Mapping[str, Mapping[str, dict]]) -> dict[str, str]:
    """Glue for the learning-rate table of one model (``{task: {method: search}}``): ``lr_n`` (how many rates were
    chosen), ``lr_edge_n`` (how many lie at an edge of the grid), ``lr_edge_top`` / ``lr_edge_bottom`` (at its
    largest / smallest rate), ``lr_top`` / ``lr_bottom`` (those rates) and ``lr_edge_anchor`` (the tasks where anchor
    re-weighting's rate is at the top edge, or "none").

    Used in: Anchor re-weighting."""
    found = [(t, m, _at_edge(s)) for t, by in searches.items() for m, s in by.items()]
    grids = [float(x) for by in searches.values() for s in by.values() for x in np.asarray(s["grid"]).ravel()]
    top = [x for x in found if x[2] == "top"]
    return {"lr_n": str(len(found)), "lr_edge_n": str(sum(e is not None for *_, e in found)),
            "lr_edge_top": str(len(top)), "lr_edge_bottom": str(sum(e == "bottom" for *_, e in found)),
            "lr_top": f"{max(grids):g}" if grids else "—", "lr_bottom": f"{min(grids):g}" if grids else "—",
            "lr_edge_anchor": ", ".join(TASKS[t].title for t, m, _ in top if m == "anchor") or "none"}


def _share(R: Runs, method: str) -> float | None:
    """q's attention share (%) of a trained β's positions: mean over layers, test prompts, seeds and tasks."""
    name = LEVERAGE_SETS.get(method)
    if name is None:
        return None
    key = "share_" + name.replace(" ", "_")
    vals = []
    for by in R.values():
        for st in by["states"]:
            if key not in st:
                return None
            share = np.asarray(st[key])
            if method == "beta-shallow":
                share = share[: len(share) // 2]
            elif method == "beta-deep":
                share = share[len(share) // 2 :]
            vals.append(float(share.mean()))
    return 100 * float(np.mean(vals))


def leverage_table(R: Runs, model: str) -> pd.DataFrame:
    """Anchor re-weighting at its chosen learning rate against every control of the verdict
    (:func:`helpers.experiments.reweighting.verdict_controls`: every position control, the BOS one where the
    tokenizer adds a BOS token) and, where computed, β in one half of the layers: per method, q's attention share of its positions (mean over layers; the lever it has), its
    accuracy, re-weighting minus it on the average over tasks (95% and 80% intervals) and per task, and whether the
    verdict needs it beaten. ``R`` holds one model's runs with the controls
    (:func:`helpers.experiments.reweighting.cached_control_runs`).

    Used in: Anchor re-weighting."""
    return leverage_frame(_leverage_rows(R, model))


def leverage_frame(rows: Sequence[dict]) -> pd.DataFrame:
    """:func:`leverage_table` from its rows (``cached_leverage(...)["rows"]``).

    Used in: Anchor re-weighting."""
    return pd.DataFrame(list(rows)).set_index(["model", "method"])


def _leverage_rows(R: Runs, model: str) -> list[dict]:
    rows = []
    controls = rw.verdict_controls(R)
    extra = [m for m in rw.OPTIONAL_BETAS if all(m in by for by in R.values())]
    for c in ["anchor-tuned", *controls, *extra]:
        share = _share(R, c)
        row = {"model": model, "method": LEVERAGE_SHORT[c],
               "attention share %": "—" if share is None else f"{share:.2f}",
               "accuracy %": rw.accuracy(R, c).fmt(1)}
        if c == "anchor-tuned":
            row.update({"re-weighting minus it (95%)": "—", "80% interval": "—"})
            row.update({TASKS[t].title: "—" for t in R})
            row["the verdict needs it beaten"] = "—"
        else:
            d = rw.difference(R, "anchor-tuned", c)
            row.update({"re-weighting minus it (95%)": d.fmt(1), "80% interval": f"[{d.weak_low:.1f}, {d.weak_high:.1f}]"})
            row.update({TASKS[t].title: rw.difference(R, "anchor-tuned", c, t).fmt(1) for t in R})
            row["the verdict needs it beaten"] = "yes" if c in controls else "no (locates the gain)"
        rows.append(row)
    return rows


def leverage_figure(R: Runs, model: str) -> plt.Figure:
    """Each trained β's effect against its lever: x, q's attention share of its positions (log scale); y, its
    accuracy minus 1-shot ICL on the average over tasks (95% interval), for anchor re-weighting and every position
    control. A control with as much attention as the label words that gains as much would mean the label words are
    not special. Returns the Figure.

    Used in: Anchor re-weighting."""
    return leverage_points_figure(_leverage_points(R), model)


def _leverage_points(R: Runs) -> list[tuple]:
    """``[(method, attention share %, its accuracy minus 1-shot ICL)]`` for :func:`leverage_points_figure`."""
    methods = [m for m in ("anchor-tuned", "random-tuned", "beta-attended", "beta-newline", "beta-colon", "beta-bos")
               if all(m in by for by in R.values())]
    return [(m, _share(R, m), rw.difference(R, m, "icl-1")) for m in methods]


def leverage_points_figure(points: Sequence[tuple], model: str) -> plt.Figure:
    """:func:`leverage_figure` from its points (``cached_leverage(...)["points"]``: ``(method, attention share %,
    Estimate of its accuracy minus 1-shot ICL)``).

    Used in: Anchor re-weighting."""
    fig, ax = plt.subplots(figsize=(5.4, 3.6), constrained_layout=True)  # one panel: the book's figure width
    for m, share, e in points:
        colour = "#1f77b4" if m == "anchor-tuned" else "#777777"
        ax.plot([share, share], [e.low, e.high], color=colour, lw=1.4)
        ax.plot([share], [e.value], "o", color=colour, ms=6, mec="white", mew=0.7)
        ax.annotate(LEVERAGE_SETS[m], (share, e.value), xytext=(6, 4), textcoords="offset points", fontsize=8.5,
                    color=colour)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi * 1.6)  # room for the rightmost label
    ax.set_xlabel("q's attention share of the re-weighted positions (%, log scale)")
    ax.set_ylabel("accuracy minus 1-shot ICL (points)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{model}: gain against leverage (95% intervals)", fontsize=10)
    return fig


def leverage_values(R: Runs, searches: Mapping[str, Mapping[str, dict]]) -> dict[str, str]:
    """Glue for the equal-leverage section: ``lev_<key>_share`` / ``lev_<key>_diff`` / ``lev_<key>_acc`` per method
    of :func:`leverage_table`, ``lev_closest`` and ``lev_closest_diff`` (the verdict control closest to tuned
    re-weighting, over every control of :func:`helpers.experiments.reweighting.verdict_controls`, each position
    control included), ``lev_closest_side`` (whether it does better than re-weighting or trails it, by the point
    estimate), ``lev_closest_verdict`` (where the 95% interval of re-weighting minus it lies), ``lev_controls`` and
    ``lev_n_controls`` (the verdict's controls and how many), ``lev_positions_diffs`` (re-weighting minus each
    position control, with its attention share), ``lev_positions_not_beaten`` (the position controls whose 95%
    interval does not lie above 0), ``lev_beaten`` / ``lev_not_beaten`` (verdict controls whose 95% interval of re-weighting minus
    them lies above 0, and the others), ``lev_anchor_gain`` (tuned re-weighting minus 1-shot ICL), ``lev_lrs``
    (the rates chosen for anchor re-weighting per task), ``lev_halves_note`` (the layer halves against β in every
    layer, where both are computed; else empty), ``lev_n_seeds``, ``lev_grid`` and :func:`lr_edge_values` of the
    searches that hold their grid.

    Used in: Anchor re-weighting."""
    out: dict[str, str] = {}
    controls = rw.verdict_controls(R)
    diffs = {c: rw.difference(R, "anchor-tuned", c) for c in controls}
    for c in ["anchor-tuned", *controls, *rw.OPTIONAL_BETAS]:
        if not all(c in by for by in R.values()):
            continue
        share = _share(R, c)
        k = _key(c)
        out[f"lev_{k}_share"] = "—" if share is None else f"{share:.2f}%"
        out[f"lev_{k}_acc"] = rw.accuracy(R, c).fmt(1)
        if c != "anchor-tuned":
            out[f"lev_{k}_diff"] = rw.difference(R, "anchor-tuned", c).fmt(1)
    closest = min(controls, key=lambda c: float(diffs[c].value))
    e = diffs[closest]
    out["lev_closest"], out["lev_closest_diff"] = LEVERAGE_SHORT[closest], e.fmt(1)
    out["lev_closest_side"] = ("does better than re-weighting on the point estimate" if e.value < 0 else
                               "trails re-weighting on the point estimate")
    out["lev_closest_verdict"] = _verdict(e)
    out["lev_controls"] = "; ".join(LEVERAGE_SHORT[c] for c in controls)
    out["lev_n_controls"] = str(len(controls))
    positions = [c for c in controls if c == "random-tuned" or c in rw.POSITION_CONTROLS]
    out["lev_positions_diffs"] = "; ".join(
        f"{LEVERAGE_SHORT[c]} ({out[f'lev_{_key(c)}_share']}) {diffs[c].fmt(1)}" for c in positions)
    out["lev_positions_not_beaten"] = "; ".join(LEVERAGE_SHORT[c] for c in positions
                                                if not diffs[c].low > 0) or "none of them"
    out["lev_beaten"] = "; ".join(LEVERAGE_SHORT[c] for c in controls if diffs[c].low > 0) or "none"
    out["lev_not_beaten"] = "; ".join(LEVERAGE_SHORT[c] for c in controls if not diffs[c].low > 0) or "none"
    out["lev_anchor_gain"] = rw.difference(R, "anchor-tuned", "icl-1").fmt(1)
    out["lev_lrs"] = "; ".join(f"{TASKS[t].title} {float(s['anchor']['lr']):g}" for t, s in searches.items())
    out |= lr_edge_values({t: {m: s for m, s in by.items() if "grid" in s} for t, by in searches.items()})
    out["lev_halves_note"] = ""
    if all(c in by for c in rw.LAYER_HALVES for by in R.values()):
        half = {c: rw.difference(R, "anchor-tuned", c) for c in rw.LAYER_HALVES}
        short = [c.removeprefix("beta-") for c in rw.LAYER_HALVES if half[c].low > 0]  # resolved shortfalls
        out["lev_halves_note"] = (
            f"Restricted to the deep half of the layers, β on the label words trails β in every layer by "
            f"{half['beta-deep'].fmt(1)} points; restricted to the shallow half, by {half['beta-shallow'].fmt(1)}. "
            + ("Both intervals include 0, so these seeds do not place the gain in one half." if not short else
               f"Only the {short[0]} half alone falls short of β in every layer (its 95% interval lies above 0)."
               if len(short) == 1 else
               "Each half alone falls short of β in every layer (both 95% intervals lie above 0)."))
    out["lev_n_seeds"] = str(len(next(iter(R.values()))["icl-1"]))
    out["lev_grid"] = ", ".join(f"{x:g}" for x in rw.LR_GRID)
    return out


def cached_leverage(model: str, profile: Profile) -> dict | None:
    """The equal-leverage section of ``model`` (what :func:`leverage_table`, :func:`leverage_figure`,
    :func:`leverage_values` and :func:`lr_table` show), computed from the cached runs
    (:func:`helpers.experiments.reweighting.cached_control_runs` and
    :func:`~helpers.experiments.reweighting.cached_lr_searches`; nothing is trained) and stored as the summary
    ``reweighting/leverage/<model>/<profile>``, so a build from the committed summaries reads no run and fits no probe:
    ``{"searches": {task: {method: search}}, "values": leverage_values, "rows": leverage_table's rows, "points":
    leverage_figure's points}``; None where no seed has every control cached.

    Used in: Anchor re-weighting."""
    from .book import _safe

    def compute():
        R = rw.cached_control_runs(model, profile)  # every control, over the seeds where all are cached
        if R is None:
            return None
        searches = rw.cached_lr_searches(model, profile, rw.TUNED)
        # a 0-d array (the chosen lr) as a number: a summary gives a 0-d array back with shape (1,)
        searches = {t: {m: {k: v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v for k, v in s.items()}
                        for m, s in by.items()} for t, by in searches.items()}
        return {"searches": searches, "values": leverage_values(R, searches), "rows": _leverage_rows(R, model),
                "points": _leverage_points(R)}

    return summary(f"reweighting/leverage/{_safe(model)}/{_safe(profile.name)}", compute)
