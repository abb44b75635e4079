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
# Compression (paper §3.2)
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
    fig, axes = plt.subplots(1, 3, figsize=(11.5, 3.9), constrained_layout=True)
    fig.get_layout_engine().set(wspace=0.08)
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
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16])
        ax.set_xticklabels(["1", "2", "4", "8", "16"])
        ax.set_xlabel("demonstrations per class")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
