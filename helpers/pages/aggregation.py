"""The "Aggregation" chapter's tables, figures and glued values (paper §2.1 and §2.2).

The chapter runs the experiments (:mod:`helpers.experiments.aggregation`) and passes their results here:

* the saliency flows: :func:`flow_figure`, :func:`flow_table`, :func:`flow_values`, :func:`attention_window`;
* one example's saliency matrices: :func:`strip_figure`, :func:`matrix_figure`;
* the position control of the flows: :func:`control_estimate`, :func:`control_figure`, :func:`control_values`;
* isolating the label words: :func:`loyalty_figure`, :func:`loyalty_tables`, :func:`loyalty_values`,
  :func:`sweep_figure`.

``flows`` is ``{task: saliency_runs(...)}`` (one (N, 3, L) array per seed), ``flow_est`` ``{task: flow_estimate}``,
``lead`` ``{task: lead_layers(flow_gap_estimate)}``; ``iso`` is ``{task: isolation_runs(...)}`` (one run per seed),
``per_task`` ``{task: loyalty_estimates}`` and ``avg`` the loyalty estimates of all tasks' runs pooled (bootstrapped
with the seeds drawn within each task, :func:`helpers.core.stats.pooled_over`). ``ctrl`` is
``{task: saliency_control_runs(...)}`` (one (N, 2, 3, L) array per seed: the flows at the label words, then at random
non-label positions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from dataclasses import asdict

from . import plots
from .summaries import summarised, summary
from ..core.runs import Profile, make_prompts
from ..core.saliency import normalise_per_layer
from ..core.stats import Estimate, bootstrap, pooled_over
from ..core.tasks import TaskData, get_task
from ..experiments.aggregation import (KS, flow_estimate, flow_gap_estimate, gap_over_layers, lead_layers,
                                       loyalty_difference, loyalty_estimates, ww_smallest_share)

__all__ = ["SHALLOW_LAST", "CONDITIONS", "flow_estimates", "lead_of", "loyalty_summaries", "flow_figure", "flow_table", "flow_values", "attention_window",
           "control_estimate", "control_figure", "control_values", "strip_figure", "matrix_figure", "isolation_n",
           "loyalty_figure", "loyalty_tables", "loyalty_values", "sweep_figure"]

SHALLOW_LAST = 5  # the flow table's "shallow layers": 1..5
CONDITIONS = ["label-first-5", "random-first-5", "label-last-5", "random-last-5"]
CONDITION_COLUMNS = ["label words, first 5", "random, first 5", "label words, last 5", "random, last 5"]
TABLES = {"tbl_label": "label loyalty", "tbl_word5": "word loyalty@5", "tbl_word10": "word loyalty@10"}


def _joined(values) -> str:
    return ", ".join(map(str, values))


def _n_flow(flow_est: Mapping) -> str:
    """Examples × seeds of the flow estimates (the same for every task: the first task's)."""
    return next(iter(flow_est.values())).n


def _n_layers(flows: Mapping[str, Sequence[np.ndarray]]) -> int:
    return int(next(iter(flows.values()))[0].shape[-1])


# ------------------------------------------------------------------------------------------------------------------
# The flows
# ------------------------------------------------------------------------------------------------------------------


@summarised("aggregation/flow-estimates")
def flow_estimates(flows: Mapping[str, Sequence[np.ndarray]]) -> dict[str, Estimate]:
    """``{task: flow_estimate}`` (:func:`helpers.experiments.aggregation.flow_estimate`), computed once per content
    of ``flows`` (a stored summary, :mod:`helpers.pages.summaries`). Used in: Aggregation."""
    return {name: flow_estimate(f) for name, f in flows.items()}


@summarised("aggregation/lead-layers")
def lead_of(flows: Mapping[str, Sequence[np.ndarray]]) -> dict[str, dict]:
    """``{task: lead_layers(flow_gap_estimate)}``: where S_pq first leads, falls behind again and leads for good,
    computed once per content of ``flows``. Used in: Aggregation."""
    return {name: lead_layers(flow_gap_estimate(f)) for name, f in flows.items()}


def flow_figure(flow_est: Mapping, model: str, marked_layers: Sequence[int] = ()) -> plt.Figure:
    """The three flows per layer, one panel per task, with 95% bands (:func:`helpers.pages.plots.flow_panels`).

    Returns the figure. Used in: Aggregation (``flow_fig``).
    """
    return plots.flow_panels(flow_est, title=f"{model}: information flow per layer", n=f"{_n_flow(flow_est)} per task",
                             marked_layers=marked_layers)


def flow_table(flows: Mapping[str, Sequence[np.ndarray]], flow_est: Mapping, lead: Mapping[str, dict]):
    """Where S_pq overtakes S_wp, one row per task: the mean gap over layers 1-5 and over the layers where S_pq leads
    for good, the layers where it first leads, falls behind again and leads from, and whether all seeds agree.

    Returns a pandas Styler with its caption. Used in: Aggregation.
    """
    return pd.DataFrame(_flow_rows(flows, lead)).set_index("task").style.set_caption(
        f"Where S_pq (label → target) overtakes S_wp (text → label); layers numbered from 1. "
        f"Intervals: 95% bootstrap, n = {_n_flow(flow_est)} per task.")


@summarised("aggregation/flow-table")
def _flow_rows(flows: Mapping[str, Sequence[np.ndarray]], lead: Mapping[str, dict]) -> list[dict]:
    n_layers = _n_layers(flows)
    rows = []
    for name, f in flows.items():
        ld = lead[name]
        rows.append({
            "task": get_task(name).title,
            f"S_pq − S_wp, layers 1–{SHALLOW_LAST}": f"{gap_over_layers(f, 1, SHALLOW_LAST).fmt(2)}",
            "S_pq first ahead at": ld["first"],
            "S_wp ahead again at": _joined(ld["flip_backs"]) or "–",
            "S_pq ahead from": ld["for_good"],
            f"S_pq − S_wp, layers {ld['for_good'] or n_layers}–{n_layers}":
                f"{gap_over_layers(f, ld['for_good'] or n_layers, n_layers).fmt(2)}",
            "same signs in every seed": "yes" if ld["per_seed_agree"] else "no",
        })
    return rows


@summarised("aggregation/flow-values")
def flow_values(flows: Mapping[str, Sequence[np.ndarray]], flow_est: Mapping, lead: Mapping[str, dict]) -> dict:
    """The numbers the flow section's prose quotes: sample size, number of layers, where S_pq first leads and leads
    for good, the layers where S_wp leads again per task (how many in all, and how many of them with an interval
    wholly below 0), how many tasks agree in every seed, the largest upper end
    of the shallow gap, S_pq at layer 6, and how often S_ww is below the other two flows.

    Returns ``{glue name: value}``. Used in: Aggregation.
    """
    n_layers = _n_layers(flows)
    values = {
        "n_flow_text": _n_flow(flow_est),
        "n_layers": n_layers,
        "first_lead": _joined(sorted({ld["first"] for ld in lead.values()})),
        "for_good": _joined(sorted({ld["for_good"] for ld in lead.values()})),
    }
    for name, ld in lead.items():
        values[f"flips_{name}"] = _joined(ld["flip_backs"]) or "none"
    values["n_flips"] = sum(len(ld["flip_backs"]) for ld in lead.values())
    values["n_clear_flips"] = sum(len(ld["clear_flip_backs"]) for ld in lead.values())
    values["n_seed_agree"] = sum(ld["per_seed_agree"] for ld in lead.values())
    values["shallow_gap_max"] = f"{max(gap_over_layers(f, 1, SHALLOW_LAST).high for f in flows.values()):.2f}"
    values["pq_at_6"] = f"{min(e.value[1, 5] for e in flow_est.values()):.2f}" if n_layers >= 6 else "n/a"
    values["ww_above_pq"] = ", ".join(f"{int((e.value[2, :5] > e.value[1, :5]).sum())} ({get_task(t).title})"
                                      for t, e in flow_est.items())
    ww = {name: ww_smallest_share(f) for name, f in flows.items()}
    values["ww_share"] = ", ".join(f"{get_task(t).title} {100 * e.value:.0f}% [{100 * e.low:.0f}, {100 * e.high:.0f}]"
                                   for t, e in ww.items())
    return values


def attention_window(lm, data: Mapping[str, TaskData], profile: Profile, model: str,
                     global_layers: Sequence[int]) -> tuple[dict, pd.DataFrame]:
    """The model's attention window beside the prompts' length: its global-attention layers, sliding window, the
    longest prompt of the flow runs (in tokens) and the RoPE base of the local and global layers.

    ``lm`` is a :class:`helpers.pages.book.PageModel` (or a loaded model); the longest prompt is a stored summary
    keyed on the model and the data, so no tokenizer is loaded when it is stored.

    Returns ``({glue name: text}, a one-row DataFrame)``. Used in: Aggregation.
    """
    from .book import PageModel, _safe, attention_settings

    def longest():
        return max(len(p) for d in data.values() for seed in profile.seeds
                   for p in make_prompts(lm, d, seed, profile.n_test, 1, per_example=True))

    if isinstance(lm, PageModel):  # its facts and the longest prompt are stored summaries
        settings = lm.facts
        max_prompt = summary(f"aggregation/longest-prompt/{_safe(lm.name)}/{_safe(profile.name)}", longest,
                             depends={"model": dict(lm.identity), "profile": asdict(profile),
                                      "data": {t: d.fingerprint for t, d in data.items()}})
    else:
        settings, max_prompt = attention_settings(lm.model.config), longest()
    rope = settings.get("rope_theta") or {}

    def theta(kind):
        value = rope.get(kind)
        return f"{float(value):,.0f}" if value is not None else "n/a"

    window = settings.get("sliding_window")
    values = {"global_layers": _joined(global_layers) or "none (all layers alike)", "window": str(window),
              "max_prompt": str(max_prompt), "rope_local": theta("sliding_attention"),
              "rope_global": theta("full_attention")}
    table = pd.DataFrame({"global layers": [_joined(global_layers)], "sliding window": [window],
                          "longest prompt (tokens)": [max_prompt]}, index=[model])
    return values, table


# ------------------------------------------------------------------------------------------------------------------
# The position control of the flows
# ------------------------------------------------------------------------------------------------------------------

CONTROL_STYLES = {"label words": {"ls": "-", "marker": "."}, "random positions": {"ls": "--", "marker": None}}


def _control_curves(flows: np.ndarray) -> np.ndarray:
    """(2, 3, L): the flows at the label words and at the random positions, each normalised per layer as the main
    flow figure (mean over examples, then S_wp + S_pq + S_ww = 1 in every layer)."""
    return np.stack([normalise_per_layer(flows[:, 0]), normalise_per_layer(flows[:, 1])])


def control_estimate(per_seed: Sequence[np.ndarray]) -> Estimate:
    """The normalised flows (2, 3, L) at the label words ([0]) and at as many random non-label positions ([1]) of
    one task, with the book's bootstrap intervals (seeds, then examples). ``per_seed``: one task's
    ``saliency_control_runs``.

    Returns an Estimate (computed once per content of ``per_seed``). Used in: Aggregation.
    """
    return _control_estimate(per_seed)


@summarised("aggregation/control-estimate")
def _control_estimate(per_seed: Sequence[np.ndarray]) -> Estimate:
    return bootstrap(per_seed, _control_curves)


def control_figure(ctrl_est: Mapping[str, Estimate], model: str, marked_layers: Sequence[int] = ()) -> plt.Figure:
    """S_wp and S_pq per layer at the label words (solid) and at random non-label positions of the demonstrations
    (dashed), normalised as :func:`flow_figure`, one panel per task, with 95% bands. ``ctrl_est``:
    ``{task: control_estimate(...)}``.

    Returns the figure. Used in: Aggregation (``control_fig``).
    """
    n_tasks = len(ctrl_est)
    cols = min(2, n_tasks)
    rows = -(-n_tasks // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(plots.PAGE_WIDTH, 2.5 * rows + 1.1), squeeze=False, sharex=True,
                             sharey=True, layout="constrained")
    for ax, (task, e) in zip(axes.flat, ctrl_est.items()):
        layers = np.arange(1, e.value.shape[-1] + 1)
        plots.mark_layers(ax, marked_layers)
        for i, m in enumerate(("S_wp", "S_pq")):
            for where, (name, style) in enumerate(CONTROL_STYLES.items()):
                color = plots.COLORS[m]
                ax.plot(layers, e.value[where, i], color=color, lw=1.6, ms=4, label=f"{m}, {name}", **style)
                ax.fill_between(layers, e.low[where, i], e.high[where, i], color=color, lw=0,
                                alpha=0.2 if where == 0 else 0.1)
        ax.set_title(get_task(task).title)
        ax.set_ylim(0, 1)
        ax.set_xticks(plots.layer_ticks(len(layers)))
        ax.set_xlim(0.5, len(layers) + 0.5)
        ax.grid(alpha=0.3)
    for ax in axes.flat[n_tasks:]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("layer")
        ax.xaxis.set_tick_params(labelbottom=True)
    for ax in axes[:, 0]:
        ax.set_ylabel("relative size")
    handles, labels = axes.flat[0].get_legend_handles_labels()  # the global layers first, then the four curves
    order = [i for i, x in enumerate(labels) if x.startswith("S_")] + [i for i, x in enumerate(labels)
                                                                       if not x.startswith("S_")]
    names = {f"{m}, {w}": f"{plots.LABELS[m].split(' (')[0]} at the {w}" for m in ("S_wp", "S_pq")
             for w in CONTROL_STYLES}
    labels = [names.get(labels[i], labels[i]) for i in order] + ["95% bootstrap band"]
    handles = [handles[i] for i in order] + [plt.Rectangle((0, 0), 1, 1, color="#999", alpha=0.3)]
    fig.legend(handles, labels, loc="outside lower center", ncol=3, frameon=False)
    n = next(iter(ctrl_est.values())).n
    fig.suptitle(f"{model}: the flows at the label words and at random non-label positions\n(n = {n} per task; each "
                 "normalised per layer)")
    return fig


def _layer_mean(where: int, measure: int | None, first: int, last: int, raw: bool = False):
    """A statistic of one seed's (N, 2, 3, L) flows: the mean over layers ``first..last`` (1-based) of a measure
    (0 S_wp, 1 S_pq, None: S_pq - S_wp) at the label words (``where`` 0), at the random positions (1), or their
    difference (-1: label words minus random), normalised per layer; or (``raw``) the label words' raw flow summed
    over those layers, divided by the random positions'."""
    def stat(flows):
        if raw:
            mean = flows.mean(axis=0)[:, measure, first - 1:last].sum(axis=-1)
            return mean[0] / mean[1]
        c = _control_curves(flows)[..., first - 1:last]
        c = (c[:, 1] - c[:, 0] if measure is None else c[:, measure]).mean(axis=-1)
        return c[0] - c[1] if where < 0 else c[where]

    return stat


@summarised("aggregation/control-values")
def control_values(ctrl: Mapping[str, Sequence[np.ndarray]], deep_from: int) -> dict:
    """The numbers the control's prose quotes, each the mean of the tasks (the bootstrap draws the seeds within each
    task): normalised S_wp over layers 1-:data:`SHALLOW_LAST` and normalised S_pq over layers ``deep_from``-L at the
    label words, at the random positions and their difference (the same examples), S_pq over layers
    1-:data:`SHALLOW_LAST` and S_pq - S_wp over the last :data:`SHALLOW_LAST` layers (the verdict page's deep-layer
    measure) likewise, and the ratio of the raw (un-normalised) flows, label words over random positions: S_pq in
    the deep layers, S_wp in the shallow ones.

    Returns ``{glue name: text}``. Used in: Aggregation.
    """
    pooled = [f for runs in ctrl.values() for f in runs]
    n_layers = int(pooled[0].shape[-1])
    ranges = {"wp_shallow": (0, 1, SHALLOW_LAST), "pq_shallow": (1, 1, SHALLOW_LAST),
              "pq_deep": (1, deep_from, n_layers), "gap_last": (None, n_layers - SHALLOW_LAST + 1, n_layers)}
    first = next(iter(ctrl.values()))[0]
    values = {"ctrl_n": f"{len(first)} × {len(next(iter(ctrl.values())))}", "ctrl_deep_from": deep_from}
    with pooled_over(len(ctrl)):
        for key, (measure, a, b) in ranges.items():
            for where, suffix in ((0, "label"), (1, "random"), (-1, "diff")):
                values[f"ctrl_{key}_{suffix}"] = bootstrap(pooled, _layer_mean(where, measure, a, b)).fmt(2)
        values["ctrl_pq_deep_ratio"] = bootstrap(pooled, _layer_mean(0, 1, deep_from, n_layers, raw=True)).fmt(0)
        values["ctrl_wp_shallow_ratio"] = bootstrap(pooled, _layer_mean(0, 0, 1, SHALLOW_LAST, raw=True)).fmt(1)
    return values


# ------------------------------------------------------------------------------------------------------------------
# One example's saliency
# ------------------------------------------------------------------------------------------------------------------


def _example(examples: Mapping[str, Mapping[str, np.ndarray]], task: str, i: int):
    ex = examples[task]
    return ex, int(ex["lengths"][i])


def strip_figure(examples: Mapping[str, Mapping[str, np.ndarray]], marked_layers: Sequence[int] = (),
                 task: str = "sst2", i: int = 0) -> plt.Figure:
    """Example ``i`` of ``task``: its saliency matrix in every layer, small multiples
    (:func:`helpers.pages.plots.saliency_strip`). ``examples`` is ``{task: saliency_examples(...)}``.

    Returns the figure. Used in: Aggregation (``strip_fig``).
    """
    ex, n_tok = _example(examples, task, i)
    title = f"{get_task(task).title}, example {i + 1}: saliency in every layer"
    return plots.saliency_strip(ex["matrices"][i][:, :n_tok, :n_tok], ex["label_positions"][i], int(ex["target"][i]),
                                marked_layers, title=title)


def matrix_figure(examples: Mapping[str, Mapping[str, np.ndarray]], tokenizer, layers: Sequence[int] = (1, 10),
                  task: str = "sst2", i: int = 0) -> plt.Figure:
    """Example ``i`` of ``task``: its saliency matrix in two layers (numbered from 1), token names on the axes.

    Returns the figure. Used in: Aggregation (``matrix_fig``).
    """
    ex, n_tok = _example(examples, task, i)
    tokens = tokenizer.convert_ids_to_tokens(ex["input_ids"][i][:n_tok].tolist())
    fig, axes = plt.subplots(1, len(layers), figsize=(plots.PAGE_WIDTH, 3.9), layout="constrained")
    for ax, layer in zip(axes, layers):
        im = plots.saliency_matrix(ax, ex["matrices"][i][layer - 1], tokens, ex["label_positions"][i],
                                   int(ex["target"][i]), f"layer {layer}", colorbar=False)
    fig.colorbar(im, ax=axes, shrink=0.8, label=r"$\sqrt{I_l(i,j)\,/\,\max I_l}$")
    return fig


# ------------------------------------------------------------------------------------------------------------------
# Isolating the label words
# ------------------------------------------------------------------------------------------------------------------


def _n_iso(avg: Mapping) -> int:
    return avg["label-first-5"]["label loyalty"].n_examples


def isolation_n(avg: Mapping, iso: Mapping[str, Sequence]) -> str:
    """``"N examples × S seeds × T tasks"``: the sample behind the pooled loyalties.

    Used in: Aggregation (the loyalty figures' titles and ``n_iso_text``).
    """
    return f"{_n_iso(avg)} examples × {len(next(iter(iso.values())))} seeds × {len(iso)} tasks"


def loyalty_figure(avg: Mapping, iso: Mapping[str, Sequence], model: str) -> plt.Figure:
    """The paper's Figure 4 (label and word loyalty after isolation in the first / last 5 layers, mean of the tasks)
    with 95% intervals (:func:`helpers.pages.plots.loyalty_bars`).

    Returns the figure. Used in: Aggregation (``loyalty_fig``).
    """
    return plots.loyalty_bars(avg, k=5, title=f"{model}: isolation in the first / last 5 layers (mean of {len(iso)} "
                                               "tasks)", n=isolation_n(avg, iso))


def loyalty_tables(per_task: Mapping[str, Mapping], avg: Mapping, iso: Mapping[str, Sequence]) -> dict:
    """One table per loyalty metric (label loyalty, word loyalty@5, @10): a row per task and the average, a column
    per isolation condition (label words / random tokens, first / last 5 layers), in % with 95% intervals.

    Returns ``{glue name: pandas Styler}``. Used in: Aggregation.
    """
    n_seeds = len(next(iter(iso.values())))

    def frame(metric):
        rows = {get_task(t).title: {c: per_task[t][c][metric].fmt(0) for c in CONDITIONS} for t in per_task}
        rows["average"] = {c: avg[c][metric].fmt(0) for c in CONDITIONS}
        df = pd.DataFrame(rows).T
        df.columns = CONDITION_COLUMNS
        return df.style.set_caption(f"{metric} (%), 95% intervals; n = {_n_iso(avg)} examples × {n_seeds} seeds "
                                    "per task")

    return {key: frame(metric) for key, metric in TABLES.items()}


@summarised("aggregation/loyalty-summaries")
def loyalty_summaries(iso: Mapping[str, Sequence]) -> tuple[dict, dict]:
    """``(per_task, avg)``: :func:`helpers.experiments.aggregation.loyalty_estimates` of each task's isolation runs,
    and of all tasks' runs pooled (the seeds drawn within each task), computed once per content of ``iso``. Used in:
    Aggregation."""
    pooled = [r for runs in iso.values() for r in runs]
    per_task = {name: loyalty_estimates(r) for name, r in iso.items()}
    with pooled_over(len(iso)):  # the seeds are drawn within each task
        avg = loyalty_estimates(pooled)
    return per_task, avg


@summarised("aggregation/loyalty-values")
def loyalty_values(avg: Mapping, iso: Mapping[str, Sequence]) -> dict:
    """The numbers the isolation section's prose quotes: the sample, label and word loyalty per condition (k = 5),
    the cost of isolating random tokens, label words against random tokens (paired differences over the tasks'
    pooled runs, the seeds drawn within each task), and label loyalty for every k of the sweep.

    Returns ``{glue name: text}``. Used in: Aggregation.
    """
    pooled = [r for runs in iso.values() for r in runs]
    values = {"n_iso_text": isolation_n(avg, iso)}
    for c in CONDITIONS:
        values[f"ll_{c}"] = avg[c]["label loyalty"].fmt(0)
        values[f"wl_{c}"] = avg[c]["word loyalty@5"].fmt(0)
    random = avg["random-first-5"]["label loyalty"]
    values["random_cost"] = f"{100 - random.value:.0f} [{100 - random.high:.0f}, {100 - random.low:.0f}]"
    with pooled_over(len(iso)):  # the tasks stay fixed; the seeds are drawn within each task
        values["label_vs_random"] = loyalty_difference(pooled, "random-first-5", "label-first-5").fmt(0)
        values["label_vs_random_w"] = loyalty_difference(pooled, "random-first-5", "label-first-5",
                                                         "word loyalty@5").fmt(0)
    for k in KS:
        values[f"ll_first_{k}"] = avg[f"label-first-{k}"]["label loyalty"].fmt(0)
        values[f"ll_last_{k}"] = avg[f"label-last-{k}"]["label loyalty"].fmt(0)
    return values


def sweep_figure(avg: Mapping, iso: Mapping[str, Sequence], model: str, ks: Sequence[int] = KS) -> plt.Figure:
    """Label loyalty (left) and word loyalty@5 (right) against the number k of isolated layers, for label words and
    random tokens in the first and last layers (:func:`helpers.pages.plots.loyalty_sweep`).

    Returns the figure. Used in: Aggregation (``sweep_fig``).
    """
    fig, axes = plt.subplots(1, 2, figsize=(plots.PAGE_WIDTH, 3.5), layout="constrained")
    plots.loyalty_sweep(avg, ks, "label loyalty", axes[0])
    plots.loyalty_sweep(avg, ks, "word loyalty@5", axes[1])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, frameon=False)
    fig.suptitle(f"{model}: loyalty against the number k of isolated layers (mean of {len(iso)} tasks)\n"
                 f"(n = {isolation_n(avg, iso)})")
    return fig


def verdict_margins(model: str, profile="book") -> dict[str, str]:
    """The position-control margins the flow verdicts require (:func:`helpers.experiments.aggregation.control_margin`,
    as the verdict page computes them): ``flow_shallow_margin`` (S_wp over layers 1-5) and ``flow_deep_margin``
    (S_pq over the last 5 layers), label words minus random positions, or "not computed". Used in: Aggregation."""
    from .verdicts import FINDINGS, cached_evaluate

    out = {}
    for fid in ("flow-shallow", "flow-deep"):
        measured, _ = cached_evaluate(FINDINGS[fid], model, profile)
        margin = None if measured is None else measured.support.get("position control")
        out[fid.replace("-", "_") + "_margin"] = "not computed" if margin is None else margin.fmt(2)
    return out
