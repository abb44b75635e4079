"""Figures for the chapters. Pure plotting: every number comes from the experiments' results.

Conventions (the book's pages are ~700 px wide): figures at most :data:`PAGE_WIDTH` inches wide, fonts >= 9 pt
(:data:`BOOK_RC`), integer layer ticks numbered from 1 (:func:`layer_ticks`), legends outside the data, 95% bootstrap
bands or error bars wherever an :class:`helpers.core.stats.Estimate` is given, and the sample size ``n`` in the title.
Gemma 3's global-attention layers can be marked (:func:`global_layers`, :func:`mark_layers`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from ..core.saliency import MEASURES
from ..core.stats import Estimate
from ..core.tasks import get_task
from ..experiments.extraction import R_LIMITS  # R_l's axes: the bounds of its test of "undetermined"

__all__ = ["flow_panels", "loyalty_bars", "loyalty_sweep", "saliency_matrix", "saliency_strip", "saliency_explorer",
           "auc_panels", "attention_example", "layer_ticks", "global_layers", "mark_layers", "BOOK_RC",
           "PAGE_WIDTH", "panel_grid"]

PAGE_WIDTH = 7.0  # inches; shown at ~100 px per inch on the book's page, so 10 pt text stays ~10 pt
BOOK_RC = {
    "font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
    "legend.fontsize": 9, "figure.titlesize": 11, "figure.dpi": 110, "savefig.dpi": 150,
    "axes.spines.top": False, "axes.spines.right": False,
}
plt.rcParams.update(BOOK_RC)

COLORS = {"S_wp": "#1f77b4", "S_pq": "#d62728", "S_ww": "#7f7f7f"}
LABELS = {"S_wp": r"$S_{wp}$ (text → label)", "S_pq": r"$S_{pq}$ (label → target)", "S_ww": r"$S_{ww}$ (other)"}
TASK_COLORS = {"sst2": "#1f77b4", "trec": "#ff7f0e", "agnews": "#2ca02c", "emoc": "#9467bd"}
GLOBAL_STYLE = {"color": "#bbbbbb", "lw": 6, "alpha": 0.35, "zorder": 0}


def _grid(n: int, width: float = 3.4, height: float = 2.8):
    """``n`` panels side by side, scaled down to the page's width when they would be wider."""
    scale = min(1.0, PAGE_WIDTH / (width * n))
    fig, axes = plt.subplots(1, n, figsize=(width * n * scale, height * max(scale, 0.8)), squeeze=False,
                             constrained_layout=True)
    return fig, axes[0]


def panel_grid(n: int, row_height: float = 2.5, extra: float = 0.9, xlabel: str = "", ylabel: str = "",
               cols: int = 2) -> tuple[plt.Figure, list]:
    """``n`` panels at the page's width, ``cols`` a row (more side by side shrink their labels below reading size),
    sharing both axes: the x label and tick labels on the bottom panel of each column, the y label on the first of
    each row, the unused slots hidden. Returns the figure and the ``n`` axes in reading order."""
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PAGE_WIDTH, row_height * rows + extra), squeeze=False, sharex=True,
                             sharey=True, layout="constrained")
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    for i, ax in enumerate(flat[:n]):
        if i >= n - cols:  # the lowest panel of its column
            ax.set_xlabel(xlabel)
            ax.xaxis.set_tick_params(labelbottom=True)
        if i % cols == 0:
            ax.set_ylabel(ylabel)
    return fig, flat[:n]


def layer_ticks(n_layers: int) -> list[int]:
    """Integer layer ticks numbered from 1: 1, then every 3rd (every ~L/8th for deep models), always ending at L."""
    step = 3 if n_layers <= 30 else max(1, round(n_layers / 8))
    ticks = [1] + list(range(step, n_layers + 1, step))
    return ticks if ticks[-1] == n_layers else ticks + [n_layers]


def global_layers(model_or_config) -> list[int]:
    """The 1-based layers with full (global) attention when a model mixes them with sliding-window layers (Gemma 3:
    6, 12, 18 of 18), read from ``config.layer_types``; ``[]`` when all layers are alike."""
    cfg = getattr(model_or_config, "model", model_or_config)
    cfg = getattr(cfg, "config", cfg)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    types = list(getattr(cfg, "layer_types", None) or [])
    if len(set(types)) < 2:
        return []
    return [i + 1 for i, t in enumerate(types) if t == "full_attention"]


def mark_layers(ax, layers: Sequence[int], label: str | None = "global-attention layer") -> None:
    """Grey vertical bands at the given (1-based) layers."""
    for i, layer in enumerate(layers):
        ax.axvline(layer, label=label if i == 0 else None, **GLOBAL_STYLE)


def _parts(x):
    """(value, low, high) of an Estimate, or (x, None, None) of a plain array/number."""
    if isinstance(x, Estimate):
        return np.asarray(x.value), np.asarray(x.low), np.asarray(x.high)
    return np.asarray(x), None, None


def _layer_axis(ax, n_layers: int, label: bool = True) -> None:
    ax.set_xticks(layer_ticks(n_layers))
    ax.set_xlim(0.5, n_layers + 0.5)
    if label:
        ax.set_xlabel("layer")
    ax.grid(alpha=0.3)


def flow_panels(curves: Mapping[str, np.ndarray | Estimate], title: str = "", n: str = "",
                marked_layers: Sequence[int] = ()) -> plt.Figure:
    """One panel per task (2 per row): normalised S_wp, S_pq, S_ww per layer (3, L), with 95% bands for Estimates."""
    fig, axes = panel_grid(len(curves), xlabel="layer", ylabel="relative size")
    for ax, (task, c) in zip(axes, curves.items()):
        value, low, high = _parts(c)
        layers = np.arange(1, value.shape[1] + 1)
        mark_layers(ax, marked_layers)
        for i, m in enumerate(MEASURES):
            ax.plot(layers, value[i], label=LABELS[m], color=COLORS[m], lw=1.8, marker=".", ms=4)
            if low is not None:
                ax.fill_between(layers, low[i], high[i], color=COLORS[m], alpha=0.2, lw=0)
        ax.set_title(get_task(task).title)
        ax.set_ylim(0, 1)
        _layer_axis(ax, len(layers), label=False)
    handles, labels = axes[0].get_legend_handles_labels()
    if any(isinstance(c, Estimate) for c in curves.values()):
        labels = labels + ["95% bootstrap band"]
        handles = handles + [plt.Rectangle((0, 0), 1, 1, color="#999", alpha=0.3)]
    fig.legend(handles, labels, loc="outside lower center", ncol=3, frameon=False)
    if title or n:
        fig.suptitle(title + (f"\n(n = {n})" if n else ""))
    return fig


CONDITIONS = [("label", "first"), ("random", "first"), ("label", "last"), ("random", "last")]
CONDITION_NAMES = ["label words,\nfirst k", "random,\nfirst k", "label words,\nlast k", "random,\nlast k"]
CONDITION_COLORS = ["#d62728", "#ff9896", "#1f77b4", "#aec7e8"]


def loyalty_bars(table: Mapping[str, Mapping[str, float | Estimate]], k: int = 5, word_key: str = "word loyalty@5",
                 title: str = "", n: str = "") -> plt.Figure:
    """The paper's Figure 4: loyalty after isolating label / random words in the first / last k layers, with 95%
    intervals as error bars when the table holds Estimates."""
    fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 3.3), layout="constrained", sharey=True)
    names = [x.replace(" k", f" {k}") for x in CONDITION_NAMES]
    for ax, metric in zip(axes, ["label loyalty", word_key]):
        parts = [_parts(table[f"{w}-{p}-{k}"][metric]) for w, p in CONDITIONS]
        vals = np.array([float(v) for v, _, _ in parts])
        ax.bar(range(4), vals, color=CONDITION_COLORS, width=0.7)
        if parts[0][1] is not None:
            err = np.array([[v - float(lo), float(hi) - v] for (v, lo, hi) in parts]).T
            ax.errorbar(range(4), vals, yerr=err, fmt="none", ecolor="k", capsize=4, lw=1.2)
            tops = [float(hi) for _, _, hi in parts]
        else:
            tops = list(vals)
        ax.axhline(100, color="k", lw=1, ls="--")
        ax.set_xticks(range(4), names)
        ax.set_ylim(0, 118)
        ax.set_yticks(range(0, 101, 20))
        ax.set_title(f"{metric} (%)")
        for i, (v, top) in enumerate(zip(vals, tops)):
            ax.text(i, min(top, 100) + 3, f"{v:.0f}", ha="center", va="bottom", fontsize=9)
    axes[0].set_ylabel("% unchanged (100 = no isolation)")
    if title or n:
        fig.suptitle((title or f"isolation in the first / last {k} layers") + (f"\n(n = {n}; bars: 95% intervals)"
                                                                             if n else ""))
    return fig


def loyalty_sweep(table: Mapping[str, Mapping[str, float | Estimate]], ks: Sequence[int],
                  metric: str = "label loyalty", ax=None) -> plt.Axes:
    """Loyalty against the number k of isolated layers, for the four conditions (95% bands for Estimates)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(PAGE_WIDTH / 2, 3.0), layout="constrained")
    styles = {("label", "first"): ("#d62728", "-"), ("random", "first"): ("#ff9896", "--"),
              ("label", "last"): ("#1f77b4", "-"), ("random", "last"): ("#aec7e8", "--")}
    for (what, where), (color, ls) in styles.items():
        xs = [k for k in ks if f"{what}-{where}-{k}" in table]
        if not xs:
            continue
        parts = [_parts(table[f"{what}-{where}-{k}"][metric]) for k in xs]
        ax.plot(xs, [float(v) for v, _, _ in parts], color=color, ls=ls, marker="o",
                label=f"{'label words' if what == 'label' else 'random'}, {where} k")
        if parts[0][1] is not None:
            if len(xs) > 1:
                ax.fill_between(xs, [float(lo) for _, lo, _ in parts], [float(hi) for _, _, hi in parts],
                                color=color, alpha=0.2, lw=0)
            else:
                (v, lo, hi), = parts
                ax.errorbar(xs, [float(v)], yerr=[[float(v - lo)], [float(hi - v)]], color=color, capsize=4)
    ax.set_xlabel("isolated layers k")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 105)
    ax.set_xticks(list(ks))
    ax.grid(alpha=0.3)
    return ax


def saliency_matrix(ax, matrix: np.ndarray, tokens: Sequence[str], label_positions: Sequence[int], target: int,
                    title: str = "", colorbar: bool = True, ticks: bool = True):
    """One layer's saliency I_l (T, T) with the label-word rows/columns and the target row marked.

    Shown on a square-root scale, each layer divided by its largest entry (stored that way, 0..255), with a colour
    bar. Returns the image.
    """
    t = len(tokens)
    m = np.asarray(matrix[:t, :t], dtype=float)
    m = m / m.max() if m.max() > 0 else m
    im = ax.imshow(np.sqrt(m), cmap="magma_r", interpolation="nearest", vmin=0, vmax=1)
    for p in label_positions:
        ax.axhline(p, color="#1f77b4", lw=0.6, alpha=0.7)
        ax.axvline(p, color="#1f77b4", lw=0.6, alpha=0.7)
    ax.axhline(target, color="#2ca02c", lw=0.9)
    if ticks:
        tick_pos = sorted(set(int(p) for p in label_positions) | {int(target)})
        names = [tokens[i].replace("▁", " ").replace("Ġ", " ").strip() or repr(tokens[i]) for i in tick_pos]
        ax.set_xticks(tick_pos, names, rotation=90, fontsize=9)
        ax.set_yticks(tick_pos, names, fontsize=9)
        ax.set_xlabel("from token j")
        ax.set_ylabel("into token i")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    if colorbar:
        cb = plt.colorbar(im, ax=ax, shrink=0.8)
        cb.set_label(r"$\sqrt{I_l(i,j)\,/\,\max I_l}$")
    return im


def saliency_strip(matrices: np.ndarray, label_positions: Sequence[int], target: int,
                   marked_layers: Sequence[int] = (), title: str = "", cols: int = 6) -> plt.Figure:
    """Every layer's saliency matrix of one example, small multiples (the explorer, pre-rendered: no kernel needed).

    ``matrices`` (L, T, T) cropped to the prompt. Blue lines: label words; green: the target row. Layers in
    ``marked_layers`` get a grey title box.
    """
    n_layers = len(matrices)
    rows = -(-n_layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PAGE_WIDTH, 1.2 * rows + 0.9), squeeze=False,
                             layout="constrained")
    t = matrices.shape[-1]
    im = None
    for layer, ax in enumerate(axes.flat):
        if layer >= n_layers:
            ax.set_visible(False)
            continue
        im = saliency_matrix(ax, matrices[layer], [""] * t, label_positions, target, colorbar=False, ticks=False)
        mark = layer + 1 in marked_layers
        ax.set_title(f"layer {layer + 1}" + (" (global)" if mark else ""), fontsize=9,
                     bbox={"facecolor": "#dddddd", "edgecolor": "none", "pad": 1.5} if mark else None)
    cb = fig.colorbar(im, ax=axes, shrink=0.7, location="right")
    cb.set_label(r"$\sqrt{I_l / \max I_l}$")
    if title:
        fig.suptitle(title)
    return fig


def saliency_explorer(examples: Mapping[str, Mapping[str, np.ndarray]], tokenizer):
    """An ipywidgets view (live kernel only): pick a task, an example and a layer (numbered from 1, as in every figure);
    see the saliency matrix and that example's flows."""
    import ipywidgets as widgets

    from ..core.saliency import flows_at

    task_w = widgets.Dropdown(options=list(examples), description="task")
    example_w = widgets.IntSlider(1, 1, 3, description="example")
    n_layers = next(iter(examples.values()))["matrices"].shape[1]
    layer_w = widgets.IntSlider(1, 1, n_layers, description="layer")
    out = widgets.Output()

    def draw(*_):
        ex = examples[task_w.value]
        example_w.max = len(ex["lengths"])
        i, layer = example_w.value - 1, layer_w.value - 1
        n = int(ex["lengths"][i])
        tokens = tokenizer.convert_ids_to_tokens(ex["input_ids"][i][:n].tolist())
        mats = ex["matrices"][i][:, :n, :n].astype(float)
        labels, target = [int(p) for p in ex["label_positions"][i]], int(ex["target"][i])
        flows = flows_at(mats, labels, target)
        flows = flows / flows.sum(axis=0, keepdims=True)
        with out:
            out.clear_output(wait=True)
            fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
            saliency_matrix(a, mats[layer], tokens, labels, target, f"saliency, layer {layer + 1}")
            for m, row in zip(MEASURES, flows):
                b.plot(np.arange(1, len(row) + 1), row, color=COLORS[m], label=LABELS[m], lw=2)
            b.axvline(layer + 1, color="k", lw=0.8, ls=":")
            _layer_axis(b, len(flows[0]))
            b.set_title("this example's flows (normalised per layer)")
            b.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
            plt.show()

    for w in (task_w, example_w, layer_w):
        w.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([task_w, example_w, layer_w]), out])



def auc_panels(curves: Mapping[str, Mapping[str, tuple]], title: str = "", n: str = "",
               marked_layers: Mapping[str, Sequence[int]] | None = None) -> plt.Figure:
    """AUCROC_l (left) and R_l (right) per layer, one row per model; ``curves[model][task] = (auc, r)`` as arrays or
    Estimates (then with 95% bands). R_l is clipped to :data:`R_LIMITS`: it is unstable when the total excess
    sum(AUCROC - 0.5) is near 0, and a curve whose interval leaves the axes is drawn dashed, without its band, and
    named in the panel."""
    marked_layers = marked_layers or {}
    rows = len(curves)
    fig, axes = plt.subplots(rows, 2, figsize=(PAGE_WIDTH, 2.8 * rows + 0.8), squeeze=False, layout="constrained")
    for row, (model, per_task) in enumerate(curves.items()):
        a, b = axes[row]
        clipped = []
        for task, (auc, r) in per_task.items():
            color = TASK_COLORS.get(task)
            av, alo, ahi = _parts(auc)
            rv, rlo, rhi = _parts(r)
            layers = np.arange(1, len(av) + 1)
            a.plot(layers, av, marker=".", color=color, label=get_task(task).title)
            unstable = rlo is not None and (np.nanmin(rlo) < R_LIMITS[0] or np.nanmax(rhi) > R_LIMITS[1])
            b.plot(layers, np.clip(rv, *R_LIMITS), marker=".", color=color, label=get_task(task).title,
                   ls="--" if unstable else "-", alpha=0.6 if unstable else 1.0)
            if alo is not None:
                a.fill_between(layers, alo, ahi, color=color, alpha=0.15, lw=0)
                if unstable:  # the band spans far beyond the plot: R_l is not determined by these data
                    clipped.append(get_task(task).title)
                else:
                    b.fill_between(layers, rlo, rhi, color=color, alpha=0.15, lw=0)
        for ax in (a, b):
            mark_layers(ax, marked_layers.get(model, ()))
            ax.axhline(0.5, color="k", lw=0.8, ls=":")
            _layer_axis(ax, len(av), label=row == rows - 1)
        a.axhline(0.8, color="#777", lw=0.8, ls="--")
        a.set_ylim(0, 1)
        b.set_ylim(*R_LIMITS)
        a.set_ylabel(f"{model}\nAUCROC$_l$")
        b.set_ylabel(r"$R_l$")
        if clipped:
            b.text(0.02, 0.03, "dashed, no band: $R_l$ undetermined\n(interval beyond the axes): " + ", ".join(clipped),
                   transform=b.transAxes, fontsize=8, color="#444")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(5, len(labels)), frameon=False)
    if title or n:
        fig.suptitle(title + (f"\n(n = {n}; shaded: 95% bootstrap bands)" if n else ""))
    return fig


def attention_example(attention: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                      first_token: np.ndarray | None = None, n_heads: int = 1,
                      marked_layers: Sequence[int] = ()) -> plt.Figure:
    """One prompt: the target's attention (heads averaged) to each label word per layer, and the label probabilities."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 3.2), gridspec_kw={"width_ratios": [2.4, 1]},
                               layout="constrained")
    layers = np.arange(1, attention.shape[0] + 1)
    mark_layers(a, marked_layers)
    for c, name in enumerate(class_names):
        a.plot(layers, attention[:, c] / n_heads, marker=".", label=name)
    if first_token is not None:
        a.plot(layers, first_token / n_heads, color="#999", ls="--", label="first token (sink)")
    _layer_axis(a, len(layers))
    a.set_ylabel("attention from q\n(mean over heads)")
    a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    b.barh(range(len(class_names)), probs, color="#555")
    b.set_yticks(range(len(class_names)), class_names)
    b.invert_yaxis()
    b.set_xlim(0, 1)
    b.set_xlabel("probability")
    b.set_title("label probabilities")
    return fig


# --------------------------------------------------------------------------------------------------------------------
# Re-weighting chapter (paper §3.1)
# --------------------------------------------------------------------------------------------------------------------

def beta_heatmaps(betas: Mapping[str, np.ndarray], title: str = "", vmax: float | None = None) -> plt.Figure:
    """Learned beta per task: one panel per task, layers (rows) × heads grouped by class (columns).

    ``betas[task]`` is (L, H, C), e.g. averaged over seeds. A diverging scale centred at 0 (= multiplier 1).
    """
    n = len(betas)
    widths = [max(b.shape[1] * b.shape[2], 4) for b in betas.values()]
    fig, axes = plt.subplots(1, n, figsize=(PAGE_WIDTH, 4.8), squeeze=False,
                             gridspec_kw={"width_ratios": widths}, constrained_layout=True)
    vmax = vmax or float(max(np.abs(b).max() for b in betas.values())) or 1.0
    image = None
    for ax, (task, beta) in zip(axes[0], betas.items()):
        n_layers, n_heads, n_classes = beta.shape
        grid = beta.transpose(0, 2, 1).reshape(n_layers, n_classes * n_heads)  # columns: class-major, then head
        image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, origin="lower",
                          interpolation="nearest")
        for c in range(1, n_classes):
            ax.axvline(c * n_heads - 0.5, color="k", lw=0.8)
        names = get_task(task).class_names
        ax.set_xticks([c * n_heads + (n_heads - 1) / 2 for c in range(n_classes)],
                      [names[c] for c in range(n_classes)], fontsize=8, rotation=90)
        step = max(1, n_layers // 6)
        ax.set_yticks(range(0, n_layers, step), [str(i + 1) for i in range(0, n_layers, step)], fontsize=8)
        ax.set_title(get_task(task).title, fontsize=10)
    axes[0, 0].set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=r"$\beta$ (heads within each class block)")

def training_curves(curves: Mapping[str, Mapping[str, np.ndarray]], title: str = "") -> plt.Figure:
    """Training loss per epoch: ``curves[task][method]`` is (seeds, epochs); mean line and min-max band over seeds."""
    fig, axes = _grid(len(curves), width=2.7, height=2.6)
    for ax, (task, per_method) in zip(axes, curves.items()):
        for method, arr in per_method.items():
            arr = np.atleast_2d(arr)
            epochs = np.arange(1, arr.shape[1] + 1)
            line, = ax.plot(epochs, arr.mean(0), marker=".", label=method)
            ax.fill_between(epochs, arr.min(0), arr.max(0), color=line.get_color(), alpha=0.2, lw=0)
        ax.set_title(get_task(task).title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs[:: max(1, len(epochs) // 5)])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9)

def difference_forest(estimates: Mapping[str, object], title: str = "", xlabel: str = "") -> plt.Figure:
    """Point and 95% interval of each estimate (an :class:`~helpers.core.stats.Estimate`), one row each, with a 0 line."""
    labels = list(estimates)
    fig, ax = plt.subplots(figsize=(6.8, 0.32 * len(labels) + 1.0), constrained_layout=True)
    for i, key in enumerate(labels):
        e = estimates[key]
        color = "#2ca02c" if e.low > 0 else ("#d62728" if e.high < 0 else "#555555")
        ax.errorbar(e.value, i, xerr=[[e.value - e.low], [e.high - e.value]], fmt="o", color=color, capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------------------------------
# Diagnosis chapter (paper §3.3, Figure 6)
# --------------------------------------------------------------------------------------------------------------------

TASK_COLORS = {"trec": "#1f77b4", "agnews": "#ff7f0e", "emoc": "#2ca02c", "sst2": "#9467bd"}

def confusion_heatmaps(predicted: np.ndarray, real: np.ndarray, class_names: Sequence[str], title: str = "",
                       labels: tuple[str, str] = ("predicted: anchor distance", "real: AUC-ROC")) -> plt.Figure:
    """The paper's Figure 6: predicted confusion (normalised anchor distances) beside the real one (pairwise AUC).

    Both read "darker = more confused". The diagonal is left blank.
    """
    c = len(class_names)
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.5 if c > 4 else 3.0), constrained_layout=True)
    low_auc = min(0.5, float(np.nanmin(np.where(np.eye(c, dtype=bool), np.nan, real))))  # AUC < 0.5: inverted
    for ax, mat, name, vrange in zip(axes, (predicted, real), labels, ((0, 1), (low_auc, 1))):
        shown = np.array(mat, dtype=float)
        np.fill_diagonal(shown, np.nan)
        im = ax.imshow(shown, cmap="viridis", vmin=vrange[0], vmax=vrange[1])
        for i in range(c):
            for j in range(c):
                if i != j and np.isfinite(shown[i, j]):
                    dark = shown[i, j] < vrange[0] + 0.55 * (vrange[1] - vrange[0])
                    ax.text(j, i, f"{shown[i, j]:.2f}", ha="center", va="center", fontsize=9,
                            color="white" if dark else "black")
        ax.set_xticks(range(c), class_names, rotation=40, ha="right", fontsize=9)
        ax.set_yticks(range(c), class_names, fontsize=9)
        ax.set_title(name, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig

def agreement_curves(curves: Mapping[str, Mapping[str, object]], marks: Mapping[str, int] | None = None,
                     title: str = "") -> plt.Figure:
    """Spearman's ρ (predicted vs real confusion) per layer with its interval: one panel per model, a line per task.

    ``curves[model][task]`` is a :class:`helpers.core.stats.Estimate` over layers; ``marks[model]`` a layer (0-based) to
    mark (the paper's two-thirds depth).
    """
    fig, axes = _grid(len(curves), width=3.6, height=3.6)
    for ax, (model, per_task) in zip(axes, curves.items()):
        for task, est in per_task.items():
            layers = np.arange(1, len(est.value) + 1)
            color = TASK_COLORS.get(task)
            ax.plot(layers, est.value, marker=".", lw=1.5, color=color, label=f"{get_task(task).title} (n = {est.n})")
            ax.fill_between(layers, est.low, est.high, color=color, alpha=0.15)
        if marks and model in marks:
            ax.axvline(marks[model] + 1, color="k", ls="--", lw=0.8)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylim(-1, 1)
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Spearman ρ over class pairs")
    for ax in axes:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig

def baseline_dots(table: Mapping[str, Mapping[str, object]], title: str = "") -> plt.Figure:
    """ρ with its interval for each predictor (rows) and each task (one marker per task). ``table[predictor][task]``
    is a scalar :class:`helpers.core.stats.Estimate`."""
    predictors_ = list(table)
    tasks = list(next(iter(table.values())))
    fig, ax = plt.subplots(figsize=(7.0, 0.55 * len(predictors_) + 1.2), constrained_layout=True)
    offsets = np.linspace(-0.22, 0.22, len(tasks))
    for k, task in enumerate(tasks):
        ys = np.arange(len(predictors_)) + offsets[k]
        vals = [table[p][task] for p in predictors_]
        ax.errorbar([v.value for v in vals], ys,
                    xerr=[[v.value - v.low for v in vals], [v.high - v.value for v in vals]],
                    fmt="o", ms=5, capsize=2, color=TASK_COLORS.get(task), label=get_task(task).title)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(predictors_)), predictors_, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(-1, 1)
    ax.set_xlabel("Spearman ρ with the real confusion (mean over seeds, 95% interval)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3, axis="x")
    if title:
        ax.set_title(title, fontsize=10)
    return fig

__all__ += ["confusion_heatmaps", "agreement_curves", "baseline_dots"]


# --------------------------------------------------------------------------------------------------------------------
# Compression chapter (paper §3.2)
# --------------------------------------------------------------------------------------------------------------------

def kept_tokens_html(tokens: Sequence[str], kept: Sequence[int], query_start: int, label_tokens: Sequence[int] = (),
                     special: Sequence[int] = ()) -> str:
    """One prompt as HTML: kept tokens highlighted (label words darker, added tokens boxed), the dropped demonstration
    text greyed and struck through, the query plain."""
    import html

    kept, labels, special = set(kept), set(label_tokens), set(special)
    out = []
    for i, tok in enumerate(tokens):
        text = html.escape(tok).replace("\n", "↵<br>")
        if i in special:
            style = "border:1px solid #333;background:#ffe08a"
        elif i in labels:
            style = "background:#f4a259;font-weight:bold"
        elif i in kept:
            style = "background:#ffe08a"
        elif i < query_start:
            style = "color:#999;text-decoration:line-through"
        else:
            style = ""
        out.append(f'<span style="{style}">{text}</span>')
    legend = ('<div style="font-size:85%;margin-top:6px"><span style="background:#ffe08a">kept</span> '
              '<span style="background:#f4a259;font-weight:bold">label word</span> '
              '<span style="color:#999;text-decoration:line-through">dropped</span> '
              '<span style="border:1px solid #333">added by the tokenizer</span> - after the last '
              'demonstration: the query, run over the kept cache</div>')
    return ('<div style="font-family:monospace;font-size:90%;line-height:1.7;white-space:pre-wrap">'
            + "".join(out) + "</div>" + legend)

def compression_sweep(speed: Mapping[str, tuple], ceiling: tuple, memory: tuple, quality: Mapping[str, tuple],
                      title: str = "") -> plt.Figure:
    """Three panels over demonstrations per class: measured speed-up (median, min-max bars) with the token-count
    ceiling; cache memory, full vs kept; label loyalty / accuracy with intervals.

    ``speed``: {label: (shots, median, low, high)}; ``ceiling``: (shots, values); ``memory``: (shots, full bytes,
    kept bytes); ``quality``: {label: (shots, value, low, high)}.
    """
    fig = plt.figure(figsize=(PAGE_WIDTH, 7.2), constrained_layout=True)
    mosaic = fig.subplot_mosaic([["speed", "memory"], ["quality", "quality"]])
    axes = [mosaic["speed"], mosaic["memory"], mosaic["quality"]]
    ax = axes[0]
    ax.plot(ceiling[0], ceiling[1], "k--", marker="_", label="ceiling (token counts)")
    for label, (x, med, lo, hi) in speed.items():
        ax.errorbar(x, med, yerr=[np.subtract(med, lo), np.subtract(hi, med)], marker="o", capsize=3, label=label)
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_ylabel("speed-up over full ICL (×)")
    ax.set_title("speed", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax = axes[1]
    x, full, kept = memory
    ax.plot(x, np.asarray(full) / 2**20, marker="o", label="full demonstration cache")
    ax.plot(x, np.asarray(kept) / 2**20, marker="o", label="anchors only")
    ax.set_ylabel("key/value cache (MiB)")
    ax.set_title("cache memory", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax = axes[2]
    for label, (x, val, lo, hi) in quality.items():
        line, = ax.plot(x, val, marker="o", label=label)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title("loyalty and accuracy", fontsize=10)
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.02, 0.5))
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16])
        ax.set_xticklabels(["1", "2", "4", "8", "16"])
        ax.set_xlabel("demonstrations per class")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
