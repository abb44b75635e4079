"""Figures for the chapters. Pure plotting: every number comes from the experiments' results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from .saliency import MEASURES
from .tasks import get_task

__all__ = ["flow_panels", "loyalty_bars", "loyalty_sweep", "saliency_matrix", "saliency_explorer", "auc_panels",
           "attention_example"]

COLORS = {"S_wp": "#1f77b4", "S_pq": "#d62728", "S_ww": "#7f7f7f"}
LABELS = {"S_wp": r"$S_{wp}$ (text → label)", "S_pq": r"$S_{pq}$ (label → target)", "S_ww": r"$S_{ww}$ (other)"}


def _grid(n: int, width: float = 3.4, height: float = 2.8):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False, constrained_layout=True)
    return fig, axes[0]


def flow_panels(curves: Mapping[str, np.ndarray], title: str = "") -> plt.Figure:
    """One panel per task: normalised S_wp, S_pq, S_ww per layer (3, L)."""
    fig, axes = _grid(len(curves))
    for ax, (task, c) in zip(axes, curves.items()):
        layers = np.arange(1, c.shape[1] + 1)
        for m, row in zip(MEASURES, c):
            ax.plot(layers, row, label=LABELS[m], color=COLORS[m], lw=2)
        ax.set_title(get_task(task).title)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative size")
    axes[0].legend(fontsize=8, loc="center right")
    if title:
        fig.suptitle(title)
    return fig


def loyalty_bars(table: Mapping[str, Mapping[str, float]], k: int = 5, word_key: str = "word loyalty@5",
                 title: str = "") -> plt.Figure:
    """The paper's Figure 4: loyalty after isolating label / random words in the first / last k layers."""
    fig, axes = _grid(2, width=4.2, height=3.0)
    conds = [("label", "first"), ("random", "first"), ("label", "last"), ("random", "last")]
    names = ["label words,\nfirst", "random,\nfirst", "label words,\nlast", "random,\nlast"]
    colors = ["#d62728", "#ff9896", "#1f77b4", "#aec7e8"]
    for ax, metric in zip(axes, ["label loyalty", word_key]):
        vals = [table[f"{w}-{p}-{k}"][metric] for w, p in conds]
        ax.bar(range(4), vals, color=colors)
        ax.axhline(100, color="k", lw=1, ls="--")
        ax.set_xticks(range(4), names, fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_title(f"{metric} (%)")
        for i, v in enumerate(vals):
            ax.text(i, v + 1.5, f"{v:.0f}", ha="center", fontsize=8)
    fig.suptitle(title or f"isolation in the first / last {k} layers")
    return fig


def loyalty_sweep(table: Mapping[str, Mapping[str, float]], ks: Sequence[int], metric: str = "label loyalty",
                  ax=None) -> plt.Axes:
    """Loyalty against the number k of isolated layers, for the four conditions."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 3.0), constrained_layout=True)
    styles = {("label", "first"): ("#d62728", "-"), ("random", "first"): ("#ff9896", "--"),
              ("label", "last"): ("#1f77b4", "-"), ("random", "last"): ("#aec7e8", "--")}
    for (what, where), (color, ls) in styles.items():
        xs = [k for k in ks if f"{what}-{where}-{k}" in table]
        ax.plot(xs, [table[f"{what}-{where}-{k}"][metric] for k in xs], color=color, ls=ls, marker="o",
                label=f"{'label words' if what == 'label' else 'random'}, {where}")
    ax.set_xlabel("isolated layers k")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 105)
    ax.set_xticks(list(ks))
    ax.grid(alpha=0.3)
    return ax


def saliency_matrix(ax, matrix: np.ndarray, tokens: Sequence[str], label_positions: Sequence[int], target: int,
                    title: str = "") -> None:
    """One layer's saliency I_l (T, T) with the label-word rows/columns and the target row marked."""
    t = len(tokens)
    ax.imshow(np.sqrt(matrix[:t, :t].astype(float)), cmap="magma_r", interpolation="nearest")
    for p in label_positions:
        ax.axhline(p, color="#1f77b4", lw=0.6, alpha=0.6)
        ax.axvline(p, color="#1f77b4", lw=0.6, alpha=0.6)
    ax.axhline(target, color="#2ca02c", lw=0.8)
    ticks = sorted(set(label_positions) | {target})
    ax.set_xticks(ticks, [tokens[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [tokens[i] for i in ticks], fontsize=7)
    ax.set_xlabel("from token j")
    ax.set_ylabel("into token i")
    ax.set_title(title, fontsize=9)


def saliency_explorer(examples: Mapping[str, Mapping[str, np.ndarray]], tokenizer):
    """An ipywidgets view: pick a task, an example and a layer; see the saliency matrix and that example's flows."""
    import ipywidgets as widgets

    from .saliency import flows_at

    task_w = widgets.Dropdown(options=list(examples), description="task")
    example_w = widgets.IntSlider(0, 0, 2, description="example")
    n_layers = next(iter(examples.values()))["matrices"].shape[1]
    layer_w = widgets.IntSlider(0, 0, n_layers - 1, description="layer")
    out = widgets.Output()

    def draw(*_):
        ex = examples[task_w.value]
        i, layer = example_w.value, layer_w.value
        example_w.max = len(ex["lengths"]) - 1
        n = int(ex["lengths"][i])
        tokens = tokenizer.convert_ids_to_tokens(ex["input_ids"][i][:n].tolist())
        mats = ex["matrices"][i][:, :n, :n].astype(float)
        labels, target = [int(p) for p in ex["label_positions"][i]], int(ex["target"][i])
        flows = flows_at(mats, labels, target)
        flows = flows / flows.sum(axis=0, keepdims=True)
        with out:
            out.clear_output(wait=True)
            fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2), constrained_layout=True)
            saliency_matrix(a, mats[layer], tokens, labels, target,
                            f"saliency, layer {layer + 1} (sqrt scale, per-layer max = 1)")
            for m, row in zip(MEASURES, flows):
                b.plot(np.arange(1, len(row) + 1), row, color=COLORS[m], label=LABELS[m], lw=2)
            b.axvline(layer + 1, color="k", lw=0.8, ls=":")
            b.set_xlabel("layer")
            b.set_title("this example's flows (normalised per layer)", fontsize=9)
            b.legend(fontsize=8)
            plt.show()

    for w in (task_w, example_w, layer_w):
        w.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([task_w, example_w, layer_w]), out])


def auc_panels(curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], title: str = "") -> plt.Figure:
    """AUCROC_l (top) and R_l (bottom) per layer; ``curves[model][task] = (auc, r)``."""
    fig, axes = plt.subplots(2, len(curves), figsize=(4.6 * len(curves), 5.4), squeeze=False,
                             constrained_layout=True)
    for col, (model, per_task) in enumerate(curves.items()):
        for task, (auc, r) in per_task.items():
            layers = np.arange(1, len(auc) + 1)
            axes[0, col].plot(layers, auc, marker=".", label=get_task(task).title)
            axes[1, col].plot(layers, r, marker=".", label=get_task(task).title)
        axes[0, col].axhline(0.5, color="k", lw=0.8, ls=":")
        axes[0, col].axhline(0.8, color="#999", lw=0.8, ls="--")
        axes[0, col].set_title(model)
        axes[0, col].set_ylabel(r"AUCROC$_l$")
        axes[1, col].axhline(0.5, color="k", lw=0.8, ls=":")
        axes[1, col].set_ylabel(r"$R_l$")
        axes[1, col].set_xlabel("layer")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def attention_example(attention: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                      first_token: np.ndarray | None = None, n_heads: int = 1) -> plt.Figure:
    """One prompt: the target's attention (heads averaged) to each label word per layer, and the label probabilities."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [3, 1]}, constrained_layout=True)
    layers = np.arange(1, attention.shape[0] + 1)
    for c, name in enumerate(class_names):
        a.plot(layers, attention[:, c] / n_heads, marker=".", label=name)
    if first_token is not None:
        a.plot(layers, first_token / n_heads, color="#999", ls="--", label="first token (sink)")
    a.set_xlabel("layer")
    a.set_ylabel("attention from q (mean over heads)")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    b.barh(range(len(class_names)), probs, color="#555")
    b.set_yticks(range(len(class_names)), class_names)
    b.invert_yaxis()
    b.set_xlim(0, 1)
    b.set_title("label probabilities")
    return fig


# --------------------------------------------------------------------------------------------------------------------
# Re-weighting chapter
# --------------------------------------------------------------------------------------------------------------------


def beta_heatmaps(betas: Mapping[str, np.ndarray], title: str = "", vmax: float | None = None) -> plt.Figure:
    """Learned beta per task: one panel per task, layers (rows) × heads grouped by class (columns).

    ``betas[task]`` is (L, H, C), e.g. averaged over seeds. A diverging scale centred at 0 (= multiplier 1).
    """
    n = len(betas)
    widths = [max(b.shape[1] * b.shape[2], 4) for b in betas.values()]
    fig, axes = plt.subplots(1, n, figsize=(min(2.2 + 0.14 * sum(widths), 11), 4.6), squeeze=False,
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
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


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
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def difference_forest(estimates: Mapping[str, object], title: str = "", xlabel: str = "") -> plt.Figure:
    """Point and 95% interval of each estimate (an :class:`~helpers.stats.Estimate`), one row each, with a 0 line."""
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
