"""The chapter "Tuning the context or tuning the anchors" (``book/tuning.ipynb``): its tables, figures and glued values.

Everything here reads the tuning experiment's results (:mod:`helpers.experiments.tuning`) in the shapes the chapter
collects them:

* ``runs = {model: {task: {method: {seed: result}}}}``: :func:`helpers.experiments.tuning.collect` per model and task
  (only tasks that have 1-shot ICL); ``by_task`` is one model's entry, ``runs[model]``;
* ``floors = {model: {task: {seed: result}}}``: :func:`helpers.experiments.tuning.collect_floor`, the float floor of the
  theorem check (positions shifted as by a prefix, nothing added);
* ``order``: the methods in the chapter's order, :func:`helpers.experiments.tuning.methods_of`.

Nothing here loads or runs a model. The tables' and figures' estimates (bootstraps) and the glued values are stored
summaries keyed on the content of the runs (:mod:`helpers.pages.summaries`), and the PEZ prompts are decoded once into
a summary (:func:`decoded_texts`): a build from the committed results and summaries bootstraps
nothing and needs no tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
import numpy as np
import pandas as pd

from ..core.tasks import TASKS
from ..experiments import tuning as tu
from .summaries import summarised

__all__ = ["FAMILY", "AVERAGE", "label", "n_params", "common_seeds", "averaged", "accuracy_table", "compact_table",
           "params_figure", "second_params_figure", "layer_curves", "floor_curve", "theorem_table", "theorem_figure",
           "share_curves", "share_figure", "pez_table", "decoded_texts", "coverage_text", "glued", "lr_table",
           "search_effect", "fixed_vs_anchor", "search_effect_table", "search_values"]

FAMILY = {"icl-1": "ICL 1-shot", "anchor": "anchor re-weighting", "prompt": "prompt tuning",
          "prefix": "prefix-tuning", "pez": "PEZ hard prompt"}
AVERAGE = "average over tasks"
COLORS = {"prompt": "tab:blue", "prefix": "tab:orange", "pez": "tab:green", "anchor": "tab:red"}
STYLES = {1: ":", 4: "--", 8: "-.", 16: "-", 0: "-"}  # line style per prompt / prefix length m
MARKERS = {0: "o", 1: "v", 4: "s", 8: "D", 16: "^"}  # marker per prompt / prefix length m (0: no m): a marker, not
# a text label, since prompt tuning's largest m and prefix-tuning's smallest train about as many parameters
CONTEXT = ("prompt", "prefix", "pez")  # the methods that change the context
SEARCHED_RATES = ("Each kind of method was trained at the learning rate that its held-out search on training examples "
                  "chose for the task (three rates per kind; the test examples are never used). ")  # the "In short" box

ByTask = Mapping[str, Mapping[str, Mapping[int, dict]]]  # {task: {method: {seed: result}}}


# --------------------------------------------------------------------------------------------------------------------
# Names, counts and averages
# --------------------------------------------------------------------------------------------------------------------


def label(method: str) -> str:
    """The method's name in tables and figures: ``"prefix-4"`` -> ``"prefix-tuning, m = 4"``.

    Used in: Tuning the context or tuning the anchors."""
    kind, m = tu.method_kind(method)
    return FAMILY[kind] + (f", m = {m}" if m else "")


def n_params(r: Mapping, method: str) -> int:
    """The number of trained parameters of ``method`` in one task's runs ``r`` (``{method: {seed: result}}``).

    Used in: Tuning the context or tuning the anchors."""
    return int(next(iter(r[method].values()))["n_params"])


def common_seeds(by_task: ByTask, order: Sequence[str]) -> list[int]:
    """The seeds on which every computed task has every method (the average over tasks uses only these).

    Used in: Tuning the context or tuning the anchors."""
    sets = [set(r[x]) for r in by_task.values() for x in order if x in r]
    return sorted(set.intersection(*sets)) if sets else []


@summarised("tuning/averaged")
def averaged(by_task: ByTask, order: Sequence[str]) -> dict:
    """``{method: (accuracy, gain over ICL or None)}`` (:class:`~helpers.core.stats.Estimate`\\ s) averaged over
    tasks (equal weight) on the common seeds; only for methods that every task has, and only with two tasks or more.

    Used in: Tuning the context or tuning the anchors."""
    return _averaged(by_task, order, _Estimates())


class _Estimates:
    """The estimates of :mod:`helpers.experiments.tuning`, each bootstrapped once per instance (the bootstrap is
    seeded, so an estimate of the same runs is the same every time). Keyed by the runs' identity; the memo holds
    them, so an identity is not reused while it lives."""

    def __init__(self):
        self._memo: dict = {}

    def _get(self, key, runs, compute):
        if key not in self._memo:
            self._memo[key] = (runs, compute())
        return self._memo[key][1]

    def accuracy_of(self, r, method: str):
        return self._get(("acc", id(r), method), r, lambda: tu.accuracy_of(r, method))

    def gain_over_icl(self, r, method: str, other: str = "icl-1"):
        return self._get(("gain", id(r), method, other), r, lambda: tu.gain_over_icl(r, method, other))

    def task_average(self, by_task, method: str, other: str | None = None, seeds: Sequence[int] | None = None):
        return self._get(("avg", id(by_task), method, other, None if seeds is None else tuple(seeds)), by_task,
                         lambda: tu.task_average(by_task, method, other, seeds=seeds))


def _averaged(by_task: ByTask, order: Sequence[str], est: _Estimates) -> dict:
    seeds, out = common_seeds(by_task, order), {}
    if len(by_task) < 2 or not seeds:
        return out
    for method in order:
        if all(method in r for r in by_task.values()):
            out[method] = (est.task_average(by_task, method, seeds=seeds),
                           None if method == "icl-1" else est.task_average(by_task, method, "icl-1", seeds=seeds))
    return out


def _fmt(e, sign: str = "") -> str:
    return f"{e.value:{sign}.1f} [{e.low:{sign}.1f}, {e.high:{sign}.1f}]"


def _params_range(by_task: ByTask, method: str) -> str:
    ps = sorted({n_params(r, method) for r in by_task.values() if method in r})
    return f"{ps[0]:,}" if len(ps) == 1 else f"{ps[0]:,}–{ps[-1]:,}"


def _kinds(methods, kind: str) -> list[str]:
    return [x for x in methods if tu.method_kind(x)[0] == kind]


def _verdict(e) -> str:
    return "interval above 0" if e.low > 0 else ("interval below 0" if e.high < 0 else "interval contains 0")


# --------------------------------------------------------------------------------------------------------------------
# Accuracy: the tables and the parameter figure
# --------------------------------------------------------------------------------------------------------------------


def accuracy_table(by_task: ByTask, order: Sequence[str]) -> pd.DataFrame:
    """The full accuracy table, indexed by (task, method): parameters, accuracy % with its 95% interval, n, the paired
    gain over 1-shot ICL in points and the training time per seed; rows of methods not computed say "not run"; the
    average over tasks (:func:`averaged`) at the end.

    Used in: Tuning the context or tuning the anchors."""
    return pd.DataFrame(_accuracy_rows(by_task, order)).set_index(["task", "method"])


@summarised("tuning/accuracy-rows")
def _accuracy_rows(by_task: ByTask, order: Sequence[str]) -> list[dict]:
    rows = []
    for name, r in by_task.items():
        for method in order:
            row = {"task": TASKS[name].title, "method": label(method)}
            if method not in r:
                rows.append({**row, "parameters": "", "accuracy % [95% CI]": "not run", "n": "",
                             "minus ICL, points [95% CI]": "", "train s per seed": ""})
                continue
            e = tu.accuracy_of(r, method)
            g = tu.gain_over_icl(r, method) if method != "icl-1" else None
            rows.append({**row, "parameters": f"{n_params(r, method):,}",
                         "accuracy % [95% CI]": _fmt(e), "n": e.n,
                         "minus ICL, points [95% CI]": "" if g is None else _fmt(g, "+"),
                         "train s per seed": "" if method == "icl-1" else
                         f"{np.mean([float(x['train_s']) for x in r[method].values()]):.0f}"})
    for method, (e, g) in averaged(by_task, order).items():
        rows.append({"task": AVERAGE, "method": label(method), "parameters": _params_range(by_task, method),
                     "accuracy % [95% CI]": _fmt(e), "n": f"{e.n} × {len(by_task)} tasks",
                     "minus ICL, points [95% CI]": "" if g is None else _fmt(g, "+"), "train s per seed": ""})
    return rows


@summarised("tuning/task-accuracies")
def _task_accuracies(by_task: ByTask, order: Sequence[str]) -> dict:
    """``{task: {method: accuracy Estimate}}``: the per-task panels of :func:`params_figure`."""
    return {name: {x: tu.accuracy_of(r, x) for x in order if x in r} for name, r in by_task.items()}


def compact_table(table: pd.DataFrame) -> pd.DataFrame:
    """Methods x tasks (and the average over tasks), from :func:`accuracy_table`'s ``table``: 1-shot ICL's accuracy in
    %, and every trained method's paired gain over it in points, with 95% intervals; the first column gives the
    parameter count (the average's range where there is one).

    Used in: Tuning the context or tuning the anchors."""
    t = table.reset_index()
    icl = t["method"] == label("icl-1")
    value = t["minus ICL, points [95% CI]"].where(~icl, t["accuracy % [95% CI]"] + " %")
    t["value"] = value.where(t["accuracy % [95% CI]"] != "not run", "not run")
    out = t.pivot(index="method", columns="task", values="value")
    tasks = list(dict.fromkeys(t["task"]))  # in the table's order, the average last
    methods = list(dict.fromkeys(t.loc[t["task"] == tasks[0], "method"]))  # every method of the order, per task
    out = out.reindex(index=methods, columns=[c for c in tasks if c in out.columns])
    out.insert(0, "parameters", [next((p for p in reversed(list(t[t["method"] == r]["parameters"])) if p), "")
                                 for r in out.index])
    out.columns.name = None
    return out


def params_figure(model: str, by_task: ByTask, order: Sequence[str]) -> plt.Figure:
    """Test accuracy against the number of trained parameters (log scale), one panel per task and one for the average
    over tasks; error bars are 95% bootstrap intervals, the grey band 1-shot ICL with its interval.

    Used in: Tuning the context or tuning the anchors."""
    avg = averaged(by_task, order)
    per_task = _task_accuracies(by_task, order)
    panels = list(by_task) + ([AVERAGE] if avg else [])
    ncols = min(2, len(panels))  # two panels a row at most: three side by side shrank the labels on the page
    nrows = -(-len(panels) // ncols)
    spare = nrows * ncols > len(panels)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.7 * ncols + 0.4, 3.2 * nrows + (0 if spare else 0.5)),
                             squeeze=False, constrained_layout=True)
    flat = axes.ravel()
    for ax, name in zip(flat, panels):
        if name == AVERAGE:
            est = {x: e for x, (e, _) in avg.items()}
            size = {x: float(np.mean([n_params(r, x) for r in by_task.values()])) for x in avg}
            title = f"average over {len(by_task)} tasks (n = {est['icl-1'].n} × {len(by_task)})"
        else:
            r = by_task[name]
            est = per_task[name]
            size = {x: n_params(r, x) for x in est}
            title = f"{TASKS[name].title} (n = {est['icl-1'].n})"
        icl = est["icl-1"]
        ax.axhspan(icl.low, icl.high, color="grey", alpha=0.2, lw=0)
        ax.axhline(icl.value, color="grey", lw=1, label="ICL 1-shot (band: 95% CI)")
        for kind, c in COLORS.items():
            ms = [x for x in order if x in est and tu.method_kind(x)[0] == kind]
            if not ms:
                continue
            xs = [max(1, size[x]) for x in ms]
            es = [est[x] for x in ms]
            ax.errorbar(xs, [e.value for e in es], yerr=[[e.value - e.low for e in es], [e.high - e.value for e in es]],
                        fmt="-", color=c, capsize=3, label=FAMILY[kind])
            for x, e, meth in zip(xs, es, ms):
                ax.plot(x, e.value, ls="none", marker=MARKERS[tu.method_kind(meth)[1] or 0], color=c, ms=6,
                        mec="white", mew=0.6)
        ax.set_xscale("log")
        ax.set_xlim(1, 3e5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("trained parameters (log)")
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3)
    handles, labels = flat[0].get_legend_handles_labels()
    lengths = sorted({m for x in order if (m := tu.method_kind(x)[1])})
    for m in lengths:  # the markers' meaning: prompt tokens, prefix positions or PEZ tokens
        handles.append(Line2D([], [], ls="none", marker=MARKERS[m], color="#555", ms=6))
        labels.append(f"m = {m} (tokens or prefix positions)" if m == lengths[0] else f"m = {m}")
    if spare:
        for ax in flat[len(panels):]:
            ax.axis("off")
        flat[-1].legend(handles, labels, loc="center", fontsize=10, frameon=False)
    else:
        fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=9)
    fig.suptitle(f"{model}: accuracy vs trained parameters (95% bootstrap intervals)", fontsize=11)
    return fig


def second_params_figure(model: str, by_task: ByTask | None, order: Sequence[str]) -> plt.Figure:
    """:func:`params_figure` for the second model, or (``by_task`` None: no results) a figure that says so.

    Used in: Tuning the context or tuning the anchors."""
    if by_task:
        return params_figure(model, by_task, order)
    fig, ax = plt.subplots(figsize=(6, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, f"{model}: no committed results", ha="center", va="center")
    return fig


# --------------------------------------------------------------------------------------------------------------------
# The theorem check: q's attention over the prompt, per layer
# --------------------------------------------------------------------------------------------------------------------


def layer_curves(by_task: ByTask, order: Sequence[str], field: str,
                 stat: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """``{method: (prompts, L)}``: an attention-report field (``att_<field>``, per prompt, layer and head) reduced over
    heads by ``stat``, for every trained method, over the seeds and tasks computed for it.

    Used in: Tuning the context or tuning the anchors."""
    out = {}
    for method in order:
        if method == "icl-1":
            continue
        parts = [stat(np.concatenate([rr[f"att_{field}"] for rr in r[method].values()]))
                 for r in by_task.values() if method in r]
        if parts:
            out[method] = np.concatenate(parts)
    return out


def _largest(by_task: ByTask, order: Sequence[str]) -> dict[str, np.ndarray]:
    """(prompts, L): the largest change of q's renormalised content attention over heads (and positions)."""
    return layer_curves(by_task, order, "maxdiff", lambda a: a.max(-1))


def _mean_over_heads(by_task: ByTask, order: Sequence[str], field: str) -> dict[str, np.ndarray]:
    return layer_curves(by_task, order, field, lambda a: a.mean(-1))


def floor_curve(floors_of_model: Mapping[str, Mapping[int, dict]]) -> np.ndarray | None:
    """(N, L): per prompt and shift m, the largest change over heads of q's renormalised attention when every position
    is shifted by m and nothing is added (0 in exact arithmetic: the float floor of this comparison); None without
    floor results. ``floors_of_model`` is ``{task: {seed: result}}``.

    Used in: Tuning the context or tuning the anchors."""
    parts = [r["maxdiff"].max(-1).reshape(-1, r["maxdiff"].shape[2]) for f in floors_of_model.values()
             for r in f.values()]
    return np.concatenate(parts) if parts else None


def theorem_table(by_task: ByTask, order: Sequence[str], layer1_tv: bool = True) -> pd.DataFrame:
    """One row per trained method: the largest change of q's renormalised content attention in layer 1 and in the
    deeper layers, the mean total-variation distance from ICL (in layer 1 if ``layer1_tv``, and in the deepest
    layer) and n, the number of prompts.

    Used in: Tuning the context or tuning the anchors."""
    md, tv = _largest(by_task, order), _mean_over_heads(by_task, order, "tv")
    rows = {}
    for x in md:
        rows[label(x)] = {"layer 1: largest change": f"{md[x][:, 0].max():.1e}",
                          "deeper layers: largest change": f"{md[x][:, 1:].max():.2f}"}
        if layer1_tv:
            rows[label(x)]["mean TV, layer 1"] = f"{tv[x][:, 0].mean():.1e}"
        rows[label(x)].update({"mean TV, deepest layer": f"{tv[x][:, -1].mean():.3f}", "n (prompts)": len(md[x])})
    return pd.DataFrame(rows).T


def _layer_axis(ax, L: int) -> None:
    ax.set_xlabel("layer")
    ax.set_xticks(np.arange(1, L + 1)[:: max(1, L // 9)])
    ax.grid(alpha=0.3)


def theorem_figure(model: str, by_task: ByTask, floors_of_model: Mapping, order: Sequence[str]) -> plt.Figure:
    """Three panels per layer, at the target q: the largest change of q's renormalised content attention (log scale,
    with the float floor of :func:`floor_curve`), the mean total-variation distance from ICL (band: ±1.96 standard
    errors over prompts), and the attention on the prefix or soft tokens (band: 10th to 90th percentile over
    prompts); the fourth cell holds the legend.

    Used in: Tuning the context or tuning the anchors."""
    maxdev, tv = _largest(by_task, order), _mean_over_heads(by_task, order, "tv")
    outside = _mean_over_heads(by_task, order, "outside")
    floor = floor_curve(floors_of_model)
    fig, grid = plt.subplots(2, 2, figsize=(8, 6.4), constrained_layout=True)
    axes = [grid[0, 0], grid[0, 1], grid[1, 0]]
    grid[1, 1].axis("off")
    L = next(iter(maxdev.values())).shape[1]
    layers = np.arange(1, L + 1)
    for meth in maxdev:
        kind, mm = tu.method_kind(meth)
        kw = dict(color=COLORS[kind], ls=STYLES.get(mm, "-"), label=label(meth))
        axes[0].plot(layers, np.maximum(maxdev[meth].max(0), 1e-9), marker=".", **kw)
        mean = tv[meth].mean(0)
        sem = tv[meth].std(0, ddof=1) / np.sqrt(len(tv[meth])) if len(tv[meth]) > 1 else 0 * mean
        axes[1].plot(layers, mean, **kw)
        axes[1].fill_between(layers, mean - 1.96 * sem, mean + 1.96 * sem, color=COLORS[kind], alpha=0.12, lw=0)
        if kind != "anchor":
            o = outside[meth]
            axes[2].plot(layers, o.mean(0), **kw)
            axes[2].fill_between(layers, np.percentile(o, 10, axis=0), np.percentile(o, 90, axis=0),
                                 color=COLORS[kind], alpha=0.10, lw=0)
    if floor is not None:
        axes[0].plot(layers, np.maximum(floor.max(0), 1e-9), color="0.35", ls=(0, (1, 1)), lw=2,
                     label="positions shifted, nothing added\n(the float floor of this comparison)")
    axes[2].set_ylabel("attention on the prefix, α_q\n(band: 10-90% of prompts)")
    axes[0].set_yscale("log")
    axes[0].axhline(1e-5, color="k", lw=0.8, ls=":")
    axes[0].set_ylabel("largest change of renormalised\ncontent attention (log)")
    axes[1].set_ylabel("TV distance from ICL\n(mean over heads and prompts)")
    for ax in axes:
        _layer_axis(ax, L)
    handles, labels = axes[0].get_legend_handles_labels()
    grid[1, 1].legend(handles, labels, loc="center", fontsize=10, frameon=False)
    fig.suptitle(f"{model}: how far each method moves q's attention over the prompt\n(n ≥ "
                 f"{min(len(v) for v in maxdev.values())} prompts per method: examples × seeds × tasks)", fontsize=11)
    return fig


# --------------------------------------------------------------------------------------------------------------------
# The anchors' share of q's content attention
# --------------------------------------------------------------------------------------------------------------------


def share_curves(by_task: ByTask, order: Sequence[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``({method: (prompts, L)}, (prompts, L))``: the label words' share of q's renormalised content attention
    (mean over heads) after training each method, and with 1-shot ICL on the same prompts (the first method's).

    Used in: Tuning the context or tuning the anchors."""
    out, base = {}, []
    for method in order:
        if method == "icl-1":
            continue
        parts = [np.concatenate([rr["att_anchor_share"].mean(-1) for rr in r[method].values()])
                 for r in by_task.values() if method in r]
        bparts = [np.concatenate([rr["att_anchor_share_base"].mean(-1) for rr in r[method].values()])
                  for r in by_task.values() if method in r]
        if parts:
            out[method] = np.concatenate(parts)
            base.append(np.concatenate(bparts))
    return out, base[0]


def share_figure(model: str, by_task: ByTask, order: Sequence[str]) -> plt.Figure:
    """The label words' share of q's content attention per layer (mean over heads and prompts), for 1-shot ICL (black)
    and after training each method.

    Used in: Tuning the context or tuning the anchors."""
    shares, base = share_curves(by_task, order)
    L = base.shape[1]
    layers = np.arange(1, L + 1)
    fig, ax = plt.subplots(figsize=(7, 3.6), constrained_layout=True)
    ax.plot(layers, base.mean(0), color="k", lw=2, label="ICL 1-shot")
    for meth, v in shares.items():
        kind, mm = tu.method_kind(meth)
        ax.plot(layers, v.mean(0), color=COLORS[kind], ls=STYLES.get(mm, "-"), label=label(meth))
    _layer_axis(ax, L)
    ax.set_ylabel("label words' share of q's\ncontent attention (mean over heads)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    ax.set_title(f"{model}: the anchors' share, before and after training (n = {len(base)} prompts)", fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------------------------------
# PEZ's prompts and what was computed
# --------------------------------------------------------------------------------------------------------------------


def pez_table(runs: Mapping[str, ByTask], order: Sequence[str], tokenizers: Mapping) -> pd.DataFrame:
    """One row per model, task and seed of every PEZ run: the initial random tokens and the prompt found, as
    ``tokenizers[model]`` decodes them, their ids, and the accuracy on that seed's test examples. ``tokenizers[model]``
    is a tokenizer or a model (a :class:`helpers.pages.book.PageModel`): a model's decoded prompts are a stored summary
    (:func:`decoded_texts`), so the tokenizer loads only when they are not stored.

    Used in: Tuning the context or tuning the anchors."""
    pez = {m: [(name, seed, res) for name, r in by_task.items()
               for method in order if tu.method_kind(method)[0] == "pez" and method in r
               for seed, res in sorted(r[method].items())] for m, by_task in runs.items()}
    rows = []
    for m, found in pez.items():
        if not found:
            continue
        ids_of = [[int(i) for i in res[k]] for _, _, res in found for k in ("init_ids", "ids")]
        holder = tokenizers[m]
        text = (decoded_texts(holder, ids_of, "tuning-pez") if hasattr(holder, "identity")
                else {tuple(ids): holder.decode(ids) for ids in ids_of})
        for name, seed, res in found:
            ids = [int(i) for i in res["ids"]]
            rows.append({"model": m, "task": TASKS[name].title, "seed": seed,
                         "initial tokens": repr(text[tuple(int(i) for i in res["init_ids"])]),
                         "found prompt": repr(text[tuple(ids)]), "ids": ids,
                         "accuracy %": 100 * float(np.mean(res["correct"]))})
    return pd.DataFrame(rows)


def decoded_texts(lm, sequences, label: str) -> dict[tuple[int, ...], str]:
    """``{ids: lm.tokenizer.decode(ids)}`` for each sequence of token ids in ``sequences``, stored as the summary
    ``decoded/<model>/<label>`` (keyed on the model's identity and the ids): the chapter shows decoded prompts without
    a tokenizer when the summary is stored. ``lm`` without an identity (a bare tokenizer holder) is decoded each time.

    Used in: Tuning the context or tuning the anchors."""
    from .book import _identity_of, _safe
    from .summaries import summary

    wanted = sorted({tuple(int(i) for i in ids) for ids in sequences})

    def compute():
        tok = lm.tokenizer
        return [tok.decode(list(ids)) for ids in wanted]

    if not _identity_of(lm):
        return dict(zip(wanted, compute()))
    texts = summary(f"decoded/{_safe(lm.name)}/{_safe(label)}", compute,
                    depends={"model": dict(lm.identity), "ids": [list(ids) for ids in wanted]})
    return dict(zip(wanted, texts))


# --------------------------------------------------------------------------------------------------------------------
# The learning rates: each kind's held-out search, and what it changed
# --------------------------------------------------------------------------------------------------------------------

Searches = Mapping[str, Mapping[str, dict]]  # {task: {kind: helpers.experiments.tuning.lr_search_run result}}


def _rate(x: float) -> str:
    return f"{x:g}"


def lr_table(searches: Searches, config) -> pd.DataFrame:
    """Per (task, kind of method): the length it was searched on, the rates tried, the mean held-out cross-entropy
    and accuracy at each (over the folds), and the rate chosen, marked where it lies at an edge of the grid.

    Used in: Tuning the context or tuning the anchors."""
    rows = []
    for task, by_kind in searches.items():
        for kind, r in by_kind.items():
            grid, loss, acc = np.asarray(r["grid"]), np.asarray(r["heldout_loss"]), np.asarray(r["heldout_acc"])
            chosen = float(r["lr"])
            edge = chosen in (float(grid[0]), float(grid[-1]))
            rows.append({"task": TASKS[task].title, "searched on": label(tu.search_method(config, kind)),
                         "rates tried": " / ".join(_rate(x) for x in grid),
                         "held-out cross-entropy": " / ".join(f"{x:.2f}" for x in loss.mean(1)),
                         "held-out accuracy %": " / ".join(f"{100 * x:.0f}" for x in acc.mean(1)),
                         "chosen": _rate(chosen) + (" (edge)" if edge else "")})
    return pd.DataFrame(rows).set_index(["task", "searched on"])


def _fixed_rate(fixed_config, method: str) -> float:
    return dict(fixed_config.fixed_rates)[tu.method_kind(method)[0]]


@summarised("tuning/search-effect")
def search_effect(searched: ByTask, fixed: ByTask, order: Sequence[str]) -> dict:
    """``{method: (gain at the fixed rate, gain at the searched rate)}``: the paired gain over 1-shot ICL in points,
    averaged over the tasks both have (equal weight), on the seeds every one of them has, for every trained method
    present in both.

    Used in: Tuning the context or tuning the anchors."""
    tasks = [t for t in searched if t in fixed]
    out = {}
    for method in order[1:]:
        if not all(method in searched[t] and method in fixed[t] for t in tasks) or len(tasks) < 2:
            continue
        s = {t: searched[t] for t in tasks}
        f = {t: fixed[t] for t in tasks}
        seeds = sorted(set(common_seeds(s, ["icl-1", method])) & set(common_seeds(f, ["icl-1", method])))
        if seeds:
            out[method] = (tu.task_average(f, method, "icl-1", seeds=seeds),
                           tu.task_average(s, method, "icl-1", seeds=seeds))
    return out


@summarised("tuning/fixed-vs-anchor")
def fixed_vs_anchor(fixed: ByTask, order: Sequence[str]) -> dict:
    """``{method: paired difference to anchor re-weighting}`` at the fixed rates: accuracy points, averaged over the
    tasks (equal weight), on the seeds every one of them has, for every context method run on at least two tasks.

    Used in: Tuning the context or tuning the anchors."""
    out = {}
    if len(fixed) < 2:
        return out
    for method in order[1:]:
        if method == "anchor" or not all(method in r and "anchor" in r for r in fixed.values()):
            continue
        seeds = common_seeds(fixed, ["anchor", method])
        if seeds:
            out[method] = tu.task_average(fixed, method, "anchor", seeds=seeds)
    return out


def search_effect_table(searched: ByTask, fixed: ByTask, searches: Searches, fixed_config,
                        order: Sequence[str]) -> pd.DataFrame:
    """Per trained method: its fixed rate (``SIZES["fixed"]``), the rate the search chose per task, and the
    average gain over 1-shot ICL at each (:func:`search_effect`), with 95% intervals.

    Used in: Tuning the context or tuning the anchors."""
    effect = search_effect(searched, fixed, order)
    rows = []
    for method, (g_fixed, g_searched) in effect.items():
        kind = tu.method_kind(method)[0]
        chosen = " / ".join(f"{TASKS[t].title} {_rate(float(searches[t][kind]['lr']))}"
                            for t in searched if kind in searches.get(t, {}))
        rows.append({"method": label(method), "fixed rate": _rate(_fixed_rate(fixed_config, method)),
                     "rate chosen by the search": chosen,
                     "gain at the fixed rate, points": _fmt(g_fixed, "+"),
                     "gain at the chosen rate, points": _fmt(g_searched, "+")})
    return pd.DataFrame(rows).set_index("method")


def search_values(searched: ByTask, fixed: ByTask, searches: Searches, fixed_config, order: Sequence[str]) -> dict:
    """The glued values of the learning-rate search: how many choices lie at an edge of their grid, how many differ
    from the fixed rate, and per method the average gain at the fixed and at the chosen rate (or why there is none:
    fewer than two tasks, or the method missing at one of the rates).

    Used in: Tuning the context or tuning the anchors."""
    choices = [(t, k, r) for t, by in searches.items() for k, r in by.items()]
    edge = sum(float(r["lr"]) in (float(r["grid"][0]), float(r["grid"][-1])) for _, _, r in choices)
    moved = sum(float(r["lr"]) != dict(fixed_config.fixed_rates)[k] for _, k, r in choices)
    out = {"lr_n_choices": len(choices), "lr_n_edge": edge, "lr_n_moved": moved}
    effect = search_effect(searched, fixed, order)
    for method in order[1:]:  # every method, so a page quoting one never lacks its value
        g_fixed, g_searched = effect.get(method, (None, None))
        out[f"fixed_gain_{method}"] = g_fixed.fmt(1) if g_fixed else "not run at both rates on every task"
        out[f"searched_gain_{method}"] = g_searched.fmt(1) if g_searched else "not run at both rates on every task"
    vs = fixed_vs_anchor(fixed, order)
    for method in order[1:]:
        if method not in ("icl-1", "anchor"):
            out[f"fixed_vs_anchor_{method}"] = vs[method].fmt(1) if method in vs else "not run at the fixed rate"
    out["fixed_above_anchor"] = "; ".join(label(x) for x, e in vs.items() if e.low > 0) or "none"  # labels hold commas
    return out


def coverage_text(runs: Mapping[str, ByTask], models: Sequence[str], order: Sequence[str]) -> str:
    """What was computed, per model and task: the seeds, the methods not run and those with fewer seeds.

    Used in: Tuning the context or tuning the anchors."""
    parts = []
    for m in models:
        if m not in runs:
            parts.append(f"{m}: not run.")
            continue
        per = []
        for name in TASKS:
            r = runs[m].get(name)
            if not r:
                per.append(f"{TASKS[name].title} not run")
                continue
            full = [x for x in order if x in r]
            seeds = sorted({s for x in full for s in r[x]})
            missing = [x for x in order if x not in r]
            partial = [x for x in full if len(r[x]) < len(seeds)]
            txt = f"{TASKS[name].title}: seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
            txt += f"; not run: {', '.join(missing)}" if missing else "; every method"
            if partial:
                txt += f"; fewer seeds for {', '.join(partial)}"
            per.append(txt)
        parts.append(f"{m}: " + "; ".join(per) + ".")
    return (" ".join(parts) + " What is listed as not run is shown nowhere, and averages over tasks use only the "
            "seeds every task has.")


# --------------------------------------------------------------------------------------------------------------------
# The glued values
# --------------------------------------------------------------------------------------------------------------------


def _per_task(by_task: ByTask, order: Sequence[str], est: _Estimates, suffix: str = "") -> dict:
    """Per task of :data:`TASKS`: 1-shot ICL's accuracy and n, and every method's gain ("not run" where absent)."""
    out = {}
    for t in TASKS:
        r = by_task.get(t, {})
        out[f"acc{suffix}_icl_{t}"] = est.accuracy_of(r, "icl-1").fmt(1) if "icl-1" in r else "not run"
        out[f"n{suffix}_{t}"] = est.accuracy_of(r, "icl-1").n if "icl-1" in r else "not run"
        for method in order[1:]:
            out[f"gain{suffix}_{method}_{t}"] = est.gain_over_icl(r, method).fmt(1) if method in r else "not run"
    return out


def _accuracy_values(R: ByTask, order: Sequence[str], est: _Estimates) -> dict:
    """The accuracy section's values: per-task gains and ICL accuracy, and the averages over tasks."""
    def fmt_tasks(d):
        return "; ".join(f"{TASKS[t].title} {e.fmt(1)}" for t, e in d.items())

    out = {}
    for method in order[1:]:
        g = {name: est.gain_over_icl(r, method) for name, r in R.items() if method in r}
        out[f"gain_{method}"] = fmt_tasks(g) if g else "not run"
    out["tasks_shown"] = ", ".join(TASKS[t].title for t in R)
    out["n_params_anchor"] = ", ".join(f"{TASKS[t].title} {n_params(r, 'anchor')}" for t, r in R.items()
                                       if "anchor" in r)
    out["acc_icl"] = fmt_tasks({name: est.accuracy_of(r, "icl-1") for name, r in R.items() if "icl-1" in r})
    avg, avg_seeds = _averaged(R, order, est), common_seeds(R, order)
    vs_anchor = {x: est.task_average(R, x, "anchor", seeds=avg_seeds) for x in order
                 if x in avg and x not in ("icl-1", "anchor")}
    out["avg_n"] = f"{avg['icl-1'][0].n} × {len(R)} tasks" if avg else "not computed"
    out["avg_seeds"] = ", ".join(map(str, avg_seeds))
    out["avg_icl"] = avg["icl-1"][0].fmt(1) if avg else "not computed"
    for method in order[1:]:
        out[f"avg_acc_{method}"] = avg[method][0].fmt(1) if method in avg else "not run on every task"
        out[f"avg_gain_{method}"] = avg[method][1].fmt(1) if method in avg else "not run on every task"
    out["avg_vs_anchor"] = "; ".join(f"{label(x)} {e.fmt(1)}" for x, e in vs_anchor.items()) or "not computed"
    out["avg_above_anchor"] = ", ".join(label(x) for x, e in vs_anchor.items() if e.low > 0) or "none"
    out["avg_level_anchor"] = ", ".join(label(x) for x, e in vs_anchor.items() if e.low <= 0 <= e.high) or "none"
    out["avg_below_anchor"] = ", ".join(label(x) for x, e in vs_anchor.items() if e.high < 0) or "none"
    out["avg_missing"] = ", ".join(label(x) for x in order if x not in avg) or "none"
    return {**out, **_per_task(R, order, est)}


def _first_layer_values(by_task: ByTask, floors_of_model: Mapping, order: Sequence[str], prefix: str = "dev") -> dict:
    """The largest first-layer change per kind of method, and the float floor."""
    first = {meth: float(v[:, 0].max()) for meth, v in _largest(by_task, order).items()}
    floor = floor_curve(floors_of_model)
    out = {f"{prefix}_floor": f"{floor[:, 0].max():.1e}" if floor is not None else "not computed"}
    for kind in CONTEXT:
        out[f"{prefix}_{kind}"] = f"{max(first[m] for m in _kinds(first, kind)):.1e}" if _kinds(first, kind) \
            else "not run"
    out[f"{prefix}_anchor"] = f"{first['anchor']:.1e}" if "anchor" in first else "not run"
    return out


def _theorem_values(R: ByTask, floors_of_model: Mapping, order: Sequence[str]) -> dict:
    """The theorem section's values (the first model)."""
    maxdev, tv = _largest(R, order), _mean_over_heads(R, order, "tv")
    outside = _mean_over_heads(R, order, "outside")
    prefixes, prompts = _kinds(maxdev, "prefix"), _kinds(maxdev, "prompt") + _kinds(maxdev, "pez")
    deep_max = {m: float(v[:, 1:].max()) for m, v in maxdev.items()}
    return {
        **_first_layer_values(R, floors_of_model, order),
        "n_att": str(min(len(v) for v in maxdev.values())),
        "tv_deep_prefix": ", ".join(f"m = {tu.method_kind(m)[1]}: {tv[m][:, 1:].mean(0).max():.2f}" for m in prefixes),
        "tv_anchor_max": f"{tv['anchor'].mean(0).max():.3f}" if "anchor" in tv else "not run",
        "alpha_max": f"{max(outside[m].mean(0).max() for m in prefixes):.2f}",
        "alpha_prompt_max": f"{max(outside[m].mean(0).max() for m in prompts):.2f}",
        "deep_range": f"{min(deep_max.values()):.2f} to {max(deep_max.values()):.2f}",
        "tv_deep": ", ".join(f"{label(m)}: {tv[m][:, -1].mean():.2f}" for m in maxdev),
        "alpha_prefix_l1": ", ".join(f"m = {tu.method_kind(m)[1]}: {outside[m][:, 0].mean():.2f}" for m in prefixes),
    }


def _share_values(R: ByTask, order: Sequence[str]) -> dict:
    """The anchors' share in the second half of the layers, and the largest departure from ICL's."""
    shares, base = share_curves(R, order)
    deep = slice(base.shape[1] // 2, None)

    def deep_share(kind):
        return ", ".join(f"m = {tu.method_kind(m)[1]}: {100 * shares[m][:, deep].mean():.1f}%"
                         for m in shares if tu.method_kind(m)[0] == kind)

    dep = {meth: v.mean(0) - base.mean(0) for meth, v in shares.items()}  # per layer, in share units
    worst = max(dep, key=lambda x: np.abs(dep[x]).max())
    wl = int(np.abs(dep[worst]).argmax())
    return {
        "share_base_deep": f"{100 * base[:, deep].mean():.1f}%",
        "share_anchor_deep": f"{100 * shares['anchor'][:, deep].mean():.1f}%" if "anchor" in shares else "not run",
        "share_prefix_deep": deep_share("prefix"),
        "share_prompt_deep": deep_share("prompt"),
        "share_max_dep": f"{100 * max(np.abs(d).max() for d in dep.values()):.1f}",
        "share_worst": f"{label(worst)}, layer {wl + 1}: {100 * base.mean(0)[wl]:.1f}% with ICL, "
                       f"{100 * shares[worst].mean(0)[wl]:.1f}% after training",
    }


def _second_values(R2: ByTask | None, floors_of_model: Mapping, order: Sequence[str],
                   est: _Estimates) -> dict:
    """The second model's values; "not run" throughout without its results."""
    if not R2:
        names = ["dev2_prefix", "dev2_prompt", "dev2_pez", "dev2_anchor", "dev2_floor", "second_tasks", "second_gains"]
        return {**{name: "not run" for name in names}, **{k: "not run" for k in _per_task({}, order, est, "2")}}
    return {
        **_first_layer_values(R2, floors_of_model, order, "dev2"),
        **_per_task(R2, order, est, "2"),
        "second_tasks": ", ".join(f"{TASKS[t].title} (n = {est.accuracy_of(r, 'icl-1').n})" for t, r in R2.items()),
        "second_gains": "; ".join(
            f"{TASKS[t].title}: ICL {est.accuracy_of(r, 'icl-1').fmt(1)}%, " + ", ".join(
                f"{label(x)} {est.gain_over_icl(r, x).fmt(1)}" for x in order if x in r and x != "icl-1")
            for t, r in R2.items()),
    }


def _summary_values(R: ByTask, floors_of_model: Mapping, order: Sequence[str], est: _Estimates) -> dict:
    """The "In short" text and the closing summary: the main task (SST-2 where computed), the best context method,
    the averages over tasks, how the learning rates were chosen (:data:`SEARCHED_RATES`) and the theorem in one
    sentence."""
    main = "sst2" if "sst2" in R else next(iter(R))
    Rm = R[main]
    context = [x for x in order if tu.method_kind(x)[0] in CONTEXT and x in Rm]
    best = max(context, key=lambda x: est.accuracy_of(Rm, x).value)
    g_anchor, g_best = est.gain_over_icl(Rm, "anchor"), est.gain_over_icl(Rm, best)
    d_best = est.gain_over_icl(Rm, best, "anchor")
    p_anchor, p_best = n_params(Rm, "anchor"), n_params(Rm, best)
    pez = [x for x in context if x.startswith("pez")]
    out = {
        "main_task": TASKS[main].title,
        "best_context": label(best),
        "gain_best": g_best.fmt(1),
        "gain_anchor_main": g_anchor.fmt(1),
        "best_minus_anchor": f"{d_best.fmt(1)} ({_verdict(d_best)})",
        "p_anchor": f"{p_anchor:,}",
        "p_best": f"{p_best:,}",
        "n_main": est.accuracy_of(Rm, "icl-1").n,
        "context_above": ", ".join(label(x) for x in context if est.gain_over_icl(Rm, x).low > 0) or "none",
        "closing_table": "; ".join(f"{label(x)} ({n_params(Rm, x):,} parameters): {est.accuracy_of(Rm, x).fmt(1)}%"
                                   for x in order if x in Rm),
        "vs_anchor": "; ".join(f"{label(x)} {est.gain_over_icl(Rm, x, 'anchor').fmt(1)} "
                               f"(n = {est.gain_over_icl(Rm, x, 'anchor').n})" for x in context),
        "gain_pez_main": est.gain_over_icl(Rm, pez[0]).fmt(1) if pez else "not run",
        "pez_changed": ", ".join(str(int(np.sum(r["ids"] != r["init_ids"]))) for r in Rm[pez[0]].values())
        if pez else "",
    }
    first = {meth: float(v[:, 0].max()) for meth, v in _largest(R, order).items()}
    floor = floor_curve(floors_of_model)
    theorem_text = (f"In the first layer a trained prefix changes q's relative attention over the prompt by at most "
                    f"{max(first[m] for m in _kinds(first, 'prefix')):.0e} (shifting the positions alone, with "
                    f"nothing added, gives {floor[:, 0].max():.0e}: float error), as the theorem says, while "
                    f"re-weighting moves it by up to {first['anchor']:.0e}; from the second layer on every method "
                    "moves it.")
    avg = _averaged(R, order, est)
    if avg:
        seeds = common_seeds(R, order)
        best_avg = max([x for x in order if x in avg and tu.method_kind(x)[0] in CONTEXT],
                       key=lambda x: avg[x][0].value)
        d_avg = est.task_average(R, best_avg, "anchor", seeds=seeds)
        out["best_avg"] = label(best_avg)
        out["best_avg_minus_anchor"] = f"{d_avg.fmt(1)} ({_verdict(d_avg)})"
        accuracy_text = (
            f"Averaged over {len(R)} tasks with Gemma 3 270M (n = {avg['icl-1'][0].n} test examples × seeds × "
            f"{len(R)} tasks), trained on the same 4 examples per class, anchor re-weighting "
            f"({_params_range(R, 'anchor')} parameters) raises 1-shot accuracy by {avg['anchor'][1].fmt(1)} points "
            f"and {label(best_avg)} ({_params_range(R, best_avg)} parameters), the best context method on these "
            f"examples, by {avg[best_avg][1].fmt(1)}; paired, they differ by {d_avg.fmt(1)} points "
            f"({_verdict(d_avg)}; optimistic, as the best was chosen on the same examples). On {TASKS[main].title} "
            f"alone the best context method there, {label(best)}, differs from re-weighting by {d_best.fmt(1)} "
            f"points ({_verdict(d_best)}). ")
    else:
        out["best_avg"] = out["best_avg_minus_anchor"] = "not computed"
        accuracy_text = (
            f"On {TASKS[main].title} with Gemma 3 270M (n = {est.accuracy_of(Rm, 'icl-1').n} test examples × seeds), "
            f"anchor re-weighting ({p_anchor:,} parameters) changes 1-shot accuracy by {g_anchor.fmt(1)} points and "
            f"the best context method, {label(best)} ({p_best:,} parameters), by {g_best.fmt(1)}; paired, they "
            f"differ by {d_best.fmt(1)} ({_verdict(d_best)}). ")
    out["closing_table_avg"] = "; ".join(f"{label(x)} ({_params_range(R, x)} parameters): {avg[x][0].fmt(1)}%"
                                         for x in order if x in avg) if avg else "not computed"
    out["in_short"] = accuracy_text + SEARCHED_RATES + theorem_text
    return out


@summarised("tuning/glued-values")
def glued(runs: Mapping[str, ByTask], floors: Mapping[str, Mapping], order: Sequence[str], model: str,
          second: str | None = None) -> dict[str, object]:
    """Every text value the chapter glues, ``{name: value}``: accuracies, gains and averages over tasks of ``model``,
    the theorem check and the anchors' share, the second model's values ("not run" without its results), the
    summary texts and what was computed (``coverage``).

    Used in: Tuning the context or tuning the anchors."""
    R, fl, est = runs[model], floors.get(model, {}), _Estimates()
    return {
        **_accuracy_values(R, order, est),
        **_theorem_values(R, fl, order),
        **_share_values(R, order),
        **_second_values(runs.get(second) if second else None, floors.get(second, {}) if second else {}, order,
                          est),
        **_summary_values(R, fl, order, est),
        "coverage": coverage_text(runs, [x for x in (model, second) if x], order),
    }
