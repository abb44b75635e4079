"""The chapter "Where does the task live?" (``book/task-vectors.ipynb``): its tables, figures and glued values.

Everything here reads the task-vector experiment's results (:mod:`helpers.experiments.taskvectors`) in the shape the
chapter collects them, ``runs = {task: [result per seed]}`` for one model. Nothing here loads or runs a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.ticker
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..core.tasks import get_task
from ..experiments import heads as hd
from ..experiments import taskvectors as tv
from . import plots

__all__ = ["NAMES", "COLORS", "best_layer_frame", "layer_figure", "floats_frame", "glued", "HEAD_NAMES",
           "head_maps_figure", "overlap_frame", "heads_glued", "finding_values", "COMPARISONS", "relation",
           "relations"]

NAMES = {"icl": "ICL (full prompt)", "zero": "zero-shot", "skeleton": "demonstrations without text",
         "tv": "task vector", "labels": "label words' states", "both": "both", "tv-other": "task vector, other task",
         "tv-text": "non-label token's state"}
COLORS = {"tv": "tab:blue", "labels": "tab:red", "both": "tab:purple", "tv-other": "tab:gray", "tv-text": "tab:olive"}
Runs = Mapping[str, Sequence[dict]]


def best_layer_frame(runs: Runs, what: str = "acc") -> pd.DataFrame:
    """One row per task: each variant's accuracy (or label loyalty) in % with its 95% interval, the patched ones at
    their layer (chosen on the even-indexed queries of all tasks, shown in the column name), on the odd-indexed
    queries. Used in: Where does the task live?"""
    table = tv.best_layer_table(runs, what)
    rows, columns = {}, None
    for task, row in table.items():
        rows[get_task(task).title] = {(NAMES[v] if layer is None else f"{NAMES[v]} (layer {layer + 1})"): est.fmt(1)
                                      for v, (layer, est) in row.items()}
        columns = list(rows[get_task(task).title])
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=columns)
    frame.index.name = "task"
    return frame


def layer_figure(runs: Runs, what: str = "acc", variants: Sequence[str] = tv.PATCHED) -> plt.Figure:
    """One panel per task: each patched variant's accuracy (or loyalty) in % per layer with its 95% band, the
    unpatched baselines as horizontal lines (ICL solid, zero-shot dashed, demonstrations without text dotted).
    Used in: Where does the task live?"""
    tasks = list(runs)
    fig, axes = plots.panel_grid(len(tasks), xlabel="layer patched",
                                 ylabel="accuracy (%)" if what == "acc" else "label loyalty (%)")
    for ax, task in zip(axes, tasks):
        layers = runs[task][0]["layers"]
        for v in variants:
            est = tv.layer_curve(runs[task], v, what)
            ax.plot(layers + 1, est.value, color=COLORS[v], label=NAMES[v], marker=".")
            ax.fill_between(layers + 1, est.low, est.high, color=COLORS[v], alpha=0.15, linewidth=0)
        if what == "acc":
            for base, style in (("icl", "-"), ("zero", "--"), ("skeleton", ":")):
                value = 100 * np.mean([tv.metric(r, base).mean() for r in runs[task]])
                ax.axhline(value, color="black", linestyle=style, linewidth=1, label=NAMES[base])
        ax.set_title(get_task(task).title)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # layers are whole numbers
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 3), frameon=False)
    return fig


def floats_frame(runs: Runs) -> pd.DataFrame:
    """Floats kept from the demonstrations, per task: a task vector, the label words' states, both, Hidden_anchor's
    key/value cache and the uncompressed demonstration cache (all layers). Used in: Where does the task live?"""
    rows = {}
    for task, task_runs in runs.items():
        r = task_runs[0]
        rows[get_task(task).title] = {NAMES["tv"]: int(r["floats/tv"]), NAMES["labels"]: int(r["floats/labels"]),
                                      NAMES["both"]: int(r["floats/both"]),
                                      "Hidden_anchor cache": int(r["floats/anchor_cache"]),
                                      "full demonstration cache": int(r["floats/full_cache"])}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "task"
    return frame


def glued(runs: Runs) -> dict[str, str]:
    """The numbers the chapter's text quotes: ``<variant>_<task>`` (accuracy in % at the variant's chosen layer,
    with its interval), ``layer_<variant>``, ``n_test``, ``n_seeds`` and ``n_layers_run``, ``ratio_anchor_tv`` (Hidden_anchor's floats
    over a task vector's, the smallest over tasks) and ``maxdiff`` (the split path's largest deviation from full
    passes). Used in: Where does the task live?"""
    table = tv.best_layer_table(runs)
    out: dict[str, str] = {}
    for task, row in table.items():
        for v, (layer, est) in row.items():
            out[f"{v.replace('-', '_')}_{task}"] = est.fmt(1)
            if layer is not None:
                out[f"layer_{v.replace('-', '_')}"] = str(layer + 1)
    first = next(iter(runs.values()))
    out["n_test"] = str(len(first[0]["gold"]))
    out["n_seeds"] = str(len(first))
    out["n_layers_run"] = str(len(first[0]["layers"]))
    ratios = [r[0]["floats/anchor_cache"] / r[0]["floats/tv"] for r in runs.values()]
    out["ratio_anchor_tv"] = f"{min(ratios):,.0f}"
    out["maxdiff"] = f"{max(float(r['check/split_max_diff']) for rs in runs.values() for r in rs):.1e}"
    return out


# --------------------------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------------------------

HEAD_NAMES = {"induction": "induction score", "saliency": "S_pq per head",
              "isolation": "effect of cutting the head (nats)"}
_PAIRS = (("induction", "saliency"), ("induction", "isolation"), ("saliency", "isolation"))


def head_maps_figure(head_runs: Runs, measures: Sequence[str] = hd.MEASURES) -> plt.Figure:
    """One layer × head map per measure (averaged over the tasks, seeds and prompts), the top-k heads of each
    outlined. Used in: Where does the task live?"""
    maps = {m: hd.head_map(head_runs, m) for m in measures}
    first = next(iter(maps.values()))
    k = hd.default_k(first.size)
    fig, axes = plt.subplots(1, len(measures), figsize=(2.6 * len(measures), 0.22 * first.shape[0] + 1.6),
                             squeeze=False)
    for ax, m in zip(axes[0], measures):
        values = maps[m]
        image = ax.imshow(values, aspect="auto", cmap="viridis", origin="lower",
                          extent=(-0.5, values.shape[1] - 0.5, 0.5, values.shape[0] + 0.5))  # layers from 1
        fig.colorbar(image, ax=ax, fraction=0.08, pad=0.03)
        for flat in hd.top_k(values, k):
            layer, head = divmod(flat, values.shape[1])
            ax.add_patch(plt.Rectangle((head - 0.5, layer + 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1.2))
        ax.set_title(HEAD_NAMES[m], fontsize=9)
        ax.set_xlabel("head")
        ax.set_xticks(range(0, values.shape[1], 1 if values.shape[1] <= 8 else 2))  # legible at 14 heads
    axes[0][0].set_ylabel("layer")
    fig.tight_layout()
    return fig


def overlap_frame(head_runs: Runs, k: int | None = None) -> pd.DataFrame:
    """Per pair of measures: Spearman's rank correlation over all heads of the mean maps, the top-k heads they share,
    and both against shuffled heads (the share of 10,000 shuffles at least as large; the shuffles' mean and 95th
    percentile for the shared heads). Used in: Where does the task live?"""
    maps = {m: hd.head_map(head_runs, m) for m in hd.MEASURES}
    k = k or hd.default_k(next(iter(maps.values())).size)
    rows = {}
    for a, b in _PAIRS:
        o = hd.overlap(maps[a], maps[b], k)
        rows[f"{HEAD_NAMES[a]} / {HEAD_NAMES[b]}"] = {
            "Spearman": f"{o['spearman']:.2f}", "p (shuffled heads)": f"{o['spearman_p']:.4f}",
            f"top-{k} shared": f"{o['top_k']:.0f}", "shuffled: mean": f"{o['top_k_null']:.2f}",
            "shuffled: 95th percentile": f"{o['top_k_null_95']:.0f}", "p (shared)": f"{o['top_k_p']:.4f}"}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "measures"
    return frame


def heads_glued(head_runs: Runs, config: hd.HeadConfig | None = None) -> dict[str, str]:
    """The numbers the heads section quotes: ``heads_n_test``, ``heads_n_seeds``, ``heads_total``, ``heads_k``, and
    with ``config`` ``heads_n_sequences`` and ``heads_length`` (the induction score's sequences); per measure ``top_<measure>`` (its highest head, "layer L, head
    H") and ``max_<measure>``; per pair ``rho_<a>_<b>``, ``shared_<a>_<b>``, ``null_<a>_<b>``, ``null95_<a>_<b>``,
    ``p_<a>_<b>`` (top-k shared heads' permutation p) and ``rhop_<a>_<b>``. Used in: Where does the task live?"""
    maps = {m: hd.head_map(head_runs, m) for m in hd.MEASURES}
    first_runs = next(iter(head_runs.values()))
    size = next(iter(maps.values())).size
    k = hd.default_k(size)
    out = {"heads_n_test": str(len(first_runs[0]["gold"])), "heads_n_seeds": str(len(first_runs)),
           "heads_total": str(size), "heads_k": str(k)}
    if config is not None:
        out["heads_n_sequences"], out["heads_length"] = str(config.n_sequences), str(config.length)
    for m, values in maps.items():
        layer, head = divmod(int(np.argmax(values)), values.shape[1])
        out[f"top_{m}"] = f"layer {layer + 1}, head {head}"
        out[f"max_{m}"] = f"{values.max():.2f}"
    for a, b in _PAIRS:
        o = hd.overlap(maps[a], maps[b], k)
        out[f"rho_{a}_{b}"] = f"{o['spearman']:.2f}"
        out[f"rhop_{a}_{b}"] = f"{o['spearman_p']:.4f}"
        out[f"shared_{a}_{b}"] = f"{o['top_k']:.0f}"
        out[f"null_{a}_{b}"] = f"{o['top_k_null']:.1f}"
        out[f"null95_{a}_{b}"] = f"{o['top_k_null_95']:.0f}"
        out[f"p_{a}_{b}"] = f"{o['top_k_p']:.4f}"
    return out


def finding_values(model: str, profile: str = "book") -> dict[str, str]:
    """The chapter's verdict rows as numbers: ``est_<finding>`` (the estimate with its 95% interval and unit) and
    ``n_<finding>`` (its sample size) for every finding of the task-vector and heads experiments, read from the
    cache; "not yet run" where a result is missing. Used in: Where does the task live?"""
    from ..experiments.protocol import evaluate

    out = {}
    for f in (*tv.EXPERIMENT.findings, *hd.EXPERIMENT.findings):
        name = f.id.replace("-", "_")
        measured, word = evaluate(f, model, profile)
        out[f"est_{name}"] = word if measured is None else measured.text()
        out[f"n_{name}"] = "" if measured is None else measured.n
    return out


# What the chapter's text compares, per task, at each variant's chosen layer (odd-indexed queries): (a, b).
COMPARISONS = (("tv", "zero"), ("labels", "skeleton"), ("tv", "labels"), ("both", "labels"), ("icl", "zero"),
               ("tv", "tv-other"), ("labels", "tv-text"))


def relation(diff) -> str:
    """The word the text uses for a paired difference a - b (an Estimate): "above" where its 95% interval lies above
    0, "below" where it lies below 0, "level with" otherwise. Used in: Where does the task live?"""
    return "above" if diff.low > 0 else "below" if diff.high < 0 else "level with"


def relations(runs: Runs) -> dict[str, str]:
    """Glued comparison words: ``rel_<a>_<b>_<task>`` (:func:`relation` of a - b on that task, paired, each variant
    at its layer chosen on the even-indexed queries of all tasks, reported on the odd ones), ``count_<a>_<b>`` (on how
    many tasks a is above b, "2 of 4") and ``rel_icl_chance_<task>`` (full ICL against chance accuracy, by its 95%
    interval). Used in: Where does the task live?"""
    from ..core.stats import mean_estimate, paired_difference

    layers = {v: tv.best_layer(runs, v) for v in tv.PATCHED}
    out: dict[str, str] = {}
    for a, b in COMPARISONS:
        above = 0
        for task, task_runs in runs.items():
            diff = paired_difference([tv.at_layer(r, a, layers.get(a)) for r in task_runs],
                                     [tv.at_layer(r, b, layers.get(b)) for r in task_runs])
            word = relation(diff)
            above += word == "above"
            out[f"rel_{a}_{b}_{task}".replace("-", "_")] = word
        out[f"count_{a}_{b}".replace("-", "_")] = f"{above} of {len(runs)}"
    n_above = 0
    for task, task_runs in runs.items():
        acc = mean_estimate([tv.at_layer(r, "icl", None) for r in task_runs]).scaled(100)
        chance = 100 / get_task(task).n_classes
        word = "above" if acc.low > chance else "below" if acc.high < chance else "level with"
        n_above += word == "above"
        out[f"rel_icl_chance_{task}"] = word
    out["count_icl_chance"] = f"{n_above} of {len(runs)}"
    return out
