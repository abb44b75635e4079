"""The "Extraction" chapter's tables, figures and glued values (paper §2.3, Appendices E and F).

The chapter runs the experiments (:mod:`helpers.experiments.extraction`) and passes their results here. ``runs`` is
``{model: {task: extraction_runs(...)}}`` (one result per seed) and ``est`` ``{model: {task: auc_estimates(...)}}``,
i.e. ``(AUCROC_l, R_l)`` Estimates; the two-shot runs ``runs2`` and ``est2`` are ``{task: ...}`` for one model.

* one demonstration per class: :func:`auc_figure`, :func:`deep_estimates`, :func:`accuracy_table`, :func:`auc_table`,
  :func:`one_shot_values`, :func:`sink_figure`, :func:`renorm_figure`, :func:`renorm_values`,
  :func:`example_figure`, :func:`example_outcome`;
* two per class: :func:`two_shot_figure`, :func:`two_shot_table`, :func:`accuracy_change`, :func:`two_shot_values`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import plots
from .summaries import summarised
from ..core.stats import layer_text, paired_difference
from ..core.tasks import get_task
from ..experiments.extraction import (accuracy_estimate, attention_shares, auc_estimates, deep_auc_estimate,
                                      layer_estimates, layer_passing, r_determined)

__all__ = ["PAPER_ACC", "auc_estimates_of", "layer_estimates_of", "auc_figure", "deep_estimates", "accuracy_table", "auc_table", "one_shot_values",
           "sink_figure", "renorm_figure", "renorm_values", "example_figure", "example_outcome", "two_shot_figure",
           "two_shot_table", "accuracy_change", "two_shot_values"]

PAPER_ACC = {"sst2": 61.28, "trec": 57.56, "agnews": 73.32, "emoc": 15.44}  # Table 1, GPT2-XL, 1 demo per class
_SHOTS = {1: "one demonstration", 2: "two demonstrations"}


def _n(est: Mapping[str, Mapping[str, tuple]]) -> str:
    """Examples × seeds of the first row's first task (the same for every task)."""
    return next(iter(next(iter(est.values())).values()))[0].n


def _determined(r) -> bool:
    """Whether R_l is pinned down (:func:`helpers.experiments.extraction.r_determined`)."""
    return r_determined(r)


def _passing_or_undetermined(r, n_layers: bool = False) -> str:
    """Where R_l first reaches 0.5 ("14", or "14 of 18"), "never", or "undetermined" (:func:`_determined`)."""
    if not _determined(r):
        return "undetermined"
    passing = layer_passing(r.value)
    if passing is None:
        return "never"
    return f"{passing + 1} of {len(r.value)}" if n_layers else f"{passing + 1}"


def _undetermined_limits() -> str:
    low, high = plots.R_LIMITS
    return f"[{low:g}, {high:g}]"


def auc_figure(est: Mapping[str, Mapping[str, tuple]], marked_layers: Mapping[str, Sequence[int]] | None = None,
               shots: int = 1) -> plt.Figure:
    """AUCROC_l and R_l per layer, one row per model (or run) of ``est``, with 95% bands
    (:func:`helpers.pages.plots.auc_panels`); ``marked_layers`` maps a row to its global-attention layers.

    Returns the figure. Used in: Extraction (``auc_fig``).
    """
    return plots.auc_panels(est, title=f"AUCROC$_l$ and $R_l$, {_SHOTS.get(shots, f'{shots} demonstrations')} per "
                                       "class", n=f"{_n(est)} per task", marked_layers=marked_layers)


@summarised("extraction/auc-estimates")
def auc_estimates_of(per_task: Mapping[str, Sequence[dict]], renormalise_binary: bool = False) -> dict:
    """``{task: auc_estimates(runs)}`` (:func:`helpers.experiments.extraction.auc_estimates`: the (AUCROC_l, R_l)
    Estimates), computed once per content of the runs (a stored summary, :mod:`helpers.pages.summaries`).

    Used in: Extraction."""
    return {name: auc_estimates(rs, renormalise_binary=renormalise_binary) for name, rs in per_task.items()}


@summarised("extraction/deep-estimates")
def deep_estimates(runs: Mapping[str, Mapping[str, Sequence[dict]]]) -> dict:
    """The mean AUCROC_l over the last third of the layers with its interval
    (:func:`helpers.experiments.extraction.deep_auc_estimate`), per model and task.

    Returns ``{(model, task): Estimate}``. Used in: Extraction.
    """
    return {(m, name): deep_auc_estimate(rs) for m, per_task in runs.items() for name, rs in per_task.items()}


def accuracy_table(runs: Mapping[str, Mapping[str, Sequence[dict]]], est: Mapping) -> "pd.io.formats.style.Styler":
    """Accuracy against the gold label per model and task (95% intervals), beside the paper's GPT2-XL one-shot
    accuracy, and how many classes the model predicts at all.

    Returns a pandas Styler with its caption. Used in: Extraction (``acc_table``).
    """
    return pd.DataFrame(_accuracy_rows(runs)).set_index(["model", "task"]).style.set_caption(
        f"Accuracy against the gold label with one demonstration per class (95% intervals; n = {_n(est)} per row), "
        "beside the paper's GPT2-XL accuracy (Table 1, 1-shot ICL).")


@summarised("extraction/accuracy-table")
def _accuracy_rows(runs: Mapping[str, Mapping[str, Sequence[dict]]]) -> list[dict]:
    rows = []
    for m, per_task in runs.items():
        for name, rs in per_task.items():
            task = get_task(name)
            rows.append({"model": m, "task": task.title, "accuracy % (ours)": accuracy_estimate(rs).fmt(1),
                         "paper, GPT2-XL": f"{PAPER_ACC[name]:.1f}",
                         "classes predicted": f"{len(np.unique(np.concatenate([x['pred'] for x in rs])))} of "
                                              f"{task.n_classes}"})
    return rows


@summarised("extraction/layer-estimates")
def layer_estimates_of(runs: Mapping[str, Mapping[str, Sequence[dict]]]) -> dict:
    """``{(model, task): (peak layer, first layer with R_l ≥ 0.5)}``, each an Estimate with the hierarchical
    bootstrap's interval (:func:`helpers.experiments.extraction.layer_estimates`), computed once per content of the
    runs (a stored summary).

    Used in: Extraction."""
    return {(m, name): layer_estimates(rs) for m, per_task in runs.items() for name, rs in per_task.items()}


def auc_table(est: Mapping, deep: Mapping, layers: Mapping | None = None) -> "pd.io.formats.style.Styler":
    """Per model and task: AUCROC_l over the last third of the layers, its peak and where, and the first layer where
    R_l reaches 0.5 ("undetermined" when the interval of R_l leaves the figure's axes, :func:`_determined`). With
    ``layers`` (:func:`layer_estimates_of`) both layers carry their 95% interval over seeds and examples.

    Returns a pandas Styler with its caption. Used in: Extraction.
    """
    rows = []
    for m, per_task in est.items():
        for name, (auc, r) in per_task.items():
            n_layers = len(auc.value)
            peak_layer = f"{int(np.nanargmax(auc.value)) + 1}"
            passing = _passing_or_undetermined(r, n_layers=True)
            if layers is not None and (m, name) in layers:
                peak_est, pass_est = layers[m, name]
                peak_layer = layer_text(peak_est, n_layers)
                if passing not in ("undetermined",):
                    passing = f"{layer_text(pass_est, n_layers)} of {n_layers}"
            rows.append({"model": m, "task": get_task(name).title,
                         "AUCROC, last third": deep[m, name].fmt(2),
                         "peak (layer)": f"{np.nanmax(auc.value):.2f} ({peak_layer})",
                         "R_l ≥ 0.5 from layer": passing})
    intervals = (" Layers with their 95% interval over seeds and examples; 'never' past the last layer."
                 if layers is not None else "")
    return pd.DataFrame(rows).set_index(["model", "task"]).style.set_caption(
        f"AUCROC averaged over the last third of the layers, its peak, and the first layer where R_l reaches 0.5 (95% "
        f"intervals; n = {_n(est)} per row). 'undetermined': the interval of R_l leaves {_undetermined_limits()} "
        f"(drawn dashed in the figure).{intervals}")


@summarised("extraction/one-shot-values")
def one_shot_values(runs: Mapping[str, Mapping[str, Sequence[dict]]], est: Mapping, deep: Mapping, model: str,
                    second_model: str | None = None, layers: Mapping | None = None) -> dict:
    """The numbers the one-shot section's prose quotes: the models' names, the deep AUCROC and the accuracy per task,
    how many tasks' deep AUCROC lies above chance (its interval above 0.5) per model and which do not, where the
    paper's GPT2-XL accuracy lies against ``model``'s interval (inside, above, below), how many AG News classes are
    predicted, the smallest R_l on AG News and SST-2, the (model, task) pairs whose R_l is undetermined, the limits
    that define it, and the layer where R_l first reaches 0.5 (or "undetermined"), with its interval when ``layers``
    (:func:`layer_estimates_of`) is given.

    Returns ``{glue name: value}``. Used in: Extraction.
    """
    values = {"model_name": model, "second_name": second_model or "(none)"}
    for name in runs[model]:
        values[f"deep_{name}"] = deep[model, name].fmt(2)
        if second_model:
            values[f"deep2_{name}"] = deep[second_model, name].fmt(2)
        values[f"acc_{name}"] = accuracy_estimate(runs[model][name]).fmt(1)
    for key, m in (("", model), ("2", second_model)):
        if m:
            below = [get_task(name).title for name in runs[m] if not deep[m, name].low > 0.5]
            values[f"n_above_chance{key}"] = f"{len(runs[m]) - len(below)} of {len(runs[m])}"
            values[f"not_above_chance{key}"] = ", ".join(below) or "none"
    acc = {name: accuracy_estimate(runs[model][name]) for name in runs[model]}
    for key, test in (("inside", lambda e, x: e.low <= x <= e.high), ("above", lambda e, x: x > e.high),
                      ("below", lambda e, x: x < e.low)):
        values[f"acc_paper_{key}"] = ", ".join(get_task(n).title for n, e in acc.items() if test(e, PAPER_ACC[n])) \
            or "none"
    values["n_classes_agnews"] = min(len(np.unique(x["pred"])) for x in runs[model]["agnews"])
    values["r_min_agnews"] = f"{np.nanmin(est[model]['agnews'][1].value):.1f}"
    values["r_min_sst2"] = f"{np.nanmin(est[model]['sst2'][1].value):.1f}"
    undetermined = [f"{m} {get_task(name).title}" for m, per in est.items() for name, (_, r) in per.items()
                    if not _determined(r)]
    values["undetermined_text"] = ", ".join(undetermined) or "none"
    values["r_limits"] = _undetermined_limits()
    for name in est[model]:
        r = est[model][name][1]
        values[f"pass1_{name}"] = _passing_or_undetermined(r)
        if layers is not None and (model, name) in layers and values[f"pass1_{name}"] != "undetermined":
            values[f"pass1_{name}"] = layer_text(layers[model, name][1], len(r.value))
    return values


def sink_figure(runs: Mapping[str, Mapping[str, Sequence[dict]]], n_heads: Mapping[str, int],
                marked_layers: Mapping[str, Sequence[int]], n: str) -> plt.Figure:
    """Where the target's attention goes, one panel per model: its share (mean over heads and examples) on the first
    token (solid) and on all label words (dashed), per layer and task. ``n`` is the sample size for the title.

    Returns the figure. Used in: Extraction (``sink_fig``).
    """
    fig, axes = plt.subplots(1, len(runs), figsize=(plots.PAGE_WIDTH, 3.3), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, (m, per_task) in zip(axes[0], runs.items()):
        plots.mark_layers(ax, marked_layers[m])
        for name, rs in per_task.items():
            sink, labels = attention_shares(rs, n_heads[m])
            layers = np.arange(1, len(sink) + 1)
            color = plots.TASK_COLORS[name]
            ax.plot(layers, sink, color=color, label=get_task(name).title)
            ax.plot(layers, labels, ls="--", color=color)
        ax.set_title(m)
        ax.set_xticks(plots.layer_ticks(len(layers)))
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("share of q's attention\n(mean over heads)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles += [plt.Line2D([], [], color="k"), plt.Line2D([], [], color="k", ls="--")]
    labels += ["first token (sink)", "all label words"]
    fig.legend(handles, labels, loc="outside lower center", ncol=4, frameon=False)
    fig.suptitle(f"Where q's attention goes (mean over n = {n} examples per task)")
    return fig


def renorm_figure(raw, ren, model: str, marked_layers: Sequence[int] = ()) -> plt.Figure:
    """SST-2 AUCROC_l per layer two ways, with 95% bands: the official score (raw attention on the second label word)
    and the attention renormalised over the two label words. ``raw``, ``ren``: the AUCROC_l Estimates.

    Returns the figure. Used in: Extraction (``renorm_fig``).
    """
    layers = np.arange(1, len(raw.value) + 1)
    fig, ax = plt.subplots(figsize=(plots.PAGE_WIDTH * 0.75, 3.3), layout="constrained")
    plots.mark_layers(ax, marked_layers)
    for e, label, color in [(raw, "official: raw attention on the 2nd label word", "#1f77b4"),
                            (ren, "renormalised over the two label words", "#ff7f0e")]:
        ax.plot(layers, e.value, marker=".", label=label, color=color)
        ax.fill_between(layers, e.low, e.high, alpha=0.2, color=color, lw=0)
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set_xticks(plots.layer_ticks(len(layers)))
    ax.set_xlabel("layer")
    ax.set_ylabel("AUCROC$_l$ (SST-2)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, frameon=False)
    ax.set_title(f"{model}, SST-2 (n = {raw.n}; 95% bands)")
    return fig


@summarised("extraction/renorm-values")
def renorm_values(runs: Sequence[dict], raw, ren) -> dict:
    """How much renormalising over the two label words changes SST-2's AUCROC_l: the largest difference and its
    layer, the layers where the two fall on opposite sides of 0.5, and the renormalised deep AUCROC.
    ``runs``: SST-2's runs (one per seed); ``raw``, ``ren``: the two AUCROC_l Estimates.

    Returns ``{glue name: value}``. Used in: Extraction.
    """
    diff = ren.value - raw.value
    opposite = [layer + 1 for layer in range(len(diff)) if (raw.value[layer] - 0.5) * (ren.value[layer] - 0.5) < 0]
    return {"sink_diff": f"{np.nanmax(np.abs(diff)):.2f}",
            "sink_diff_layer": int(np.nanargmax(np.abs(diff))) + 1,
            "opposite_layers": ", ".join(map(str, opposite)) or "none",
            "deep_ren_sst2": deep_auc_estimate(runs, renormalise_binary=True).fmt(2)}


def example_figure(run: dict, task: str, n_heads: int, marked_layers: Sequence[int] = (), i: int = 0) -> plt.Figure:
    """Example ``i`` of one seed's ``run``: the target's attention to each label word per layer and the label
    probabilities (:func:`helpers.pages.plots.attention_example`).

    Returns the figure. Used in: Extraction.
    """
    return plots.attention_example(run["attention"][i], run["probs"][i], get_task(task).class_names,
                                   run["first_token"][i], n_heads=n_heads, marked_layers=marked_layers)


def example_outcome(run: dict, task: str, i: int = 0) -> str:
    """``"gold: <class>, predicted: <class>"`` for example ``i`` of one seed's ``run``.

    Used in: Extraction.
    """
    names = get_task(task).class_names
    return f"gold: {names[run['gold'][i]]}, predicted: {names[run['pred'][i]]}"


# ------------------------------------------------------------------------------------------------------------------
# Two demonstrations per class
# ------------------------------------------------------------------------------------------------------------------


def two_shot_figure(est2: Mapping[str, tuple], model: str, marked_layers: Sequence[int] = ()) -> plt.Figure:
    """As :func:`auc_figure`, for ``model`` with two demonstrations per class (``est2``: ``{task: (auc, r)}``).

    Returns the figure. Used in: Extraction (``auc2_fig``).
    """
    row = f"{model}, 2 per class"
    return auc_figure({row: est2}, {row: marked_layers}, shots=2)


def two_shot_table(runs: Mapping[str, Sequence[dict]], runs2: Mapping[str, Sequence[dict]], est2: Mapping,
                   model: str) -> "pd.io.formats.style.Styler":
    """One vs two demonstrations per class, per task: both accuracies, the deep AUCROC and where R_l reaches 0.5 with
    two ("undetermined" as in :func:`auc_table`, drawn dashed by :func:`two_shot_figure`). ``runs``: the one-shot
    runs of ``model`` (``{task: [...]}``).

    Returns a pandas Styler with its caption. Used in: Extraction (``two_shot_table``).
    """
    return pd.DataFrame(_two_shot_rows(runs, runs2, est2)).set_index("task").style.set_caption(
        f"{model}, one vs two demonstrations per class (95% intervals; n = {est2[next(iter(est2))][0].n} per task). "
        f"'undetermined': the interval of R_l leaves {_undetermined_limits()}.")


@summarised("extraction/two-shot-table")
def _two_shot_rows(runs: Mapping[str, Sequence[dict]], runs2: Mapping[str, Sequence[dict]], est2: Mapping
                   ) -> list[dict]:
    rows = []
    for name, (_, r) in est2.items():
        rows.append({"task": get_task(name).title, "accuracy %, 1 per class": accuracy_estimate(runs[name]).fmt(1),
                     "2 per class": accuracy_estimate(runs2[name]).fmt(1),
                     "AUCROC, last third": deep_auc_estimate(runs2[name]).fmt(2),
                     "R_l ≥ 0.5 from layer": _passing_or_undetermined(r)})
    return rows


def _correct(run: dict) -> np.ndarray:
    return (run["pred"] == run["gold"]).astype(float)


def accuracy_change(runs: Sequence[dict], runs2: Sequence[dict]):
    """Accuracy with two demonstrations per class minus with one (in points), paired over the same test examples of
    each seed (both runs of a seed draw the same test subset; checked).

    Returns an Estimate. Used in: Extraction.
    """
    for a, b in zip(runs, runs2, strict=True):
        if not np.array_equal(a["gold"], b["gold"]):
            raise ValueError("the one- and two-shot runs of a seed must hold the same test examples")
    return paired_difference([_correct(b) for b in runs2], [_correct(a) for a in runs]).scaled(100)


@summarised("extraction/two-shot-values")
def two_shot_values(runs: Mapping[str, Sequence[dict]], runs2: Mapping[str, Sequence[dict]], est2: Mapping) -> dict:
    """The two-shot numbers the prose quotes, per task: accuracy, its change from one demonstration per class
    (:func:`accuracy_change`), the layer where R_l reaches 0.5 (or "undetermined") and the deep AUCROC; and the tasks
    whose R_l is undetermined. ``runs``: the one-shot runs of the same model (``{task: [...]}``).

    Returns ``{glue name: text}``. Used in: Extraction.
    """
    values = {}
    for name, (_, r) in est2.items():
        values[f"acc2_{name}"] = accuracy_estimate(runs2[name]).fmt(1)
        values[f"acc_change_{name}"] = accuracy_change(runs[name], runs2[name]).fmt(1)
        values[f"pass2_{name}"] = _passing_or_undetermined(r)
        values[f"deep2shot_{name}"] = deep_auc_estimate(runs2[name]).fmt(2)
    values["undetermined2_text"] = ", ".join(get_task(n).title for n, (_, r) in est2.items() if not _determined(r)) \
        or "none"
    return values
