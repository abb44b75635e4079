"""The verdict page's scale view: each finding's number for our models side by side against the model's size, with
the paper's number where it gives one, and a reading of what grows with size.

Everything here reads what the verdict page already computed (:func:`helpers.pages.verdicts.verdict_rows`: per
finding and model a :class:`~helpers.core.findings.Measured` or ``None``, and the verdict word); nothing is typed
by hand:

* **sizes** (:func:`parameter_count`): the registry (:mod:`helpers.core.models`) records no parameter counts, so each
  model's count is computed once, by loading it and summing its parameters' sizes (shared tensors once), and stored
  as a page summary (:mod:`helpers.pages.summaries`) keyed on the model's identity; a book built from committed
  summaries loads no model. The paper's models sit at their stated sizes (:data:`PAPER_SIZES`).
* **the paper's numbers** (:func:`paper_numbers`): per model from the experiments' copies of the paper's tables
  (``PAPER_TABLE1``, ``PAPER_TABLE2``, ``PAPER_SPEEDUP``), or an approximate number the finding's own paper text
  states with "≈" (and no model).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from ..core.findings import NOT_REPRODUCED, NOT_TESTABLE, PARTLY, REPRODUCED, TOO_FEW_SEEDS, Finding, Measured
from . import plots

__all__ = ["SHORT_NAMES", "short_name", "PAPER_SIZES", "VERDICT_COLORS", "parameter_count", "size_text", "paper_numbers", "scale_points",
           "scale_figure", "compare", "scale_reading", "scale_facts"]

# The paper's models at their stated sizes (../shared/docs/paper-spec.md §1.1: "gpt2-xl: 1.5B parameters"; GPT-J is
# "gpt-j-6b", 6B by its name).
PAPER_SIZES = {"GPT2-XL": 1.5e9, "GPT-J": 6e9}

# The verdict words in the colours of the verdict table's badges (solid here); grey: no verdict from the rule.
VERDICT_COLORS = {REPRODUCED: "#28a03c", PARTLY: "#e69f00", NOT_REPRODUCED: "#dc3232", TOO_FEW_SEEDS: "#808080",
                  NOT_TESTABLE: "#808080"}
UNCOMPARED = (TOO_FEW_SEEDS, NOT_TESTABLE)  # a number that the reading does not compare across sizes

# Short names of the findings for the panels and the reading (the table gives each claim in full).
SHORT_NAMES = {
    "flow-shallow": "S_wp leads, shallow layers", "flow-deep": "S_pq leads, deep layers",
    "flow-ww": "S_wp, S_pq above S_ww", "isolation-first": "isolating labels, first 5 layers",
    "isolation-last": "isolating labels, last 5 layers", "isolation-random": "isolating random tokens, first 5",
    "deep-auc": "deep-layer AUCROC", "r-second-half": "R_l in shallow layers", "two-shot": "R_l, two per class",
    "reweighting-gain": "re-weighting gain", "reweighting-vs-controls": "re-weighting minus closest control",
    "compression-speedup": "Hidden_anchor speed-up", "compression-loyalty": "Hidden_anchor label loyalty",
    "diagnosis": "confusion diagnosis ρ", "prefix-theorem": "prefix's first-layer change",
    "anchors-without-meaning": "abstract labels as anchors", "task-vector-recovers": "task vector recovers ICL",
    "label-states-carry": "label words' states carry the task", "task-vector-vs-labels": "task vector minus label states",
    "heads-saliency-isolation": "per-head S_pq vs head cuts",
}


def short_name(finding) -> str:
    """The finding's short name in the scale view (its id where none is given). Used in: Verdicts (the scale view)."""
    return SHORT_NAMES.get(finding.id, finding.id)



def parameter_count(model: str) -> int | None:
    """The number of parameters of ``model`` (embeddings included, a tensor shared between two places counted
    once): a stored summary ``parameters/<model>``, computed once by loading the model
    (:func:`helpers.core.models.load_model`) and summing its parameters' sizes. ``None`` for a model that cannot be
    loaded here (its package is not installed) and has no stored count. Used in: Verdicts."""
    from ..core.models import load_model, model_identity
    from .summaries import summary

    def count() -> int:
        lm = load_model(model)
        return int(sum(p.numel() for p in lm.model.parameters()))

    try:
        return summary(f"parameters/{_safe(model)}", count, depends={"model": dict(model_identity(model))})
    except (ImportError, OSError, ValueError):
        return None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "--", str(text)).strip("-") or "x"


def size_text(n: float) -> str:
    """``268M``, ``1.5B``, ``6B``: a parameter count as a tick label. Used in: Verdicts."""
    if n < 1e9:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e9:.1f}".rstrip("0").rstrip(".") + "B"


def paper_numbers(finding: Finding) -> dict[str | None, float]:
    """The paper's number for ``finding`` in our unit: ``{paper model: value}`` where the paper gives a number per
    model (re-weighting's gain on GPT2-XL, Table 1: its average minus 1-shot ICL's; Hidden_anchor's label loyalty,
    Table 2; the speed-up averaged over Table 3's four tasks), ``{None: value}`` for an approximate number the
    finding's paper text states with "≈" (no model), else ``{}``. Used in: Verdicts."""
    from ..experiments.compression import PAPER_SPEEDUP, PAPER_TABLE2
    from ..experiments.reweighting import PAPER_TABLE1

    if finding.id == "reweighting-gain":
        return {"GPT2-XL": PAPER_TABLE1["anchor"]["average"] - PAPER_TABLE1["icl-1"]["average"]}
    if finding.id == "compression-loyalty":
        return {m: table["anchor"][0] for m, table in PAPER_TABLE2.items()}
    if finding.id == "compression-speedup":
        return {m: float(np.mean(list(per_task.values()))) for m, per_task in PAPER_SPEEDUP.items()}
    approx = re.search(r"≈\s*(\d+(?:\.\d+)?)", finding.paper)
    return {None: float(approx.group(1))} if approx else {}


def scale_points(rows: Sequence[dict], sizes: Mapping[str, float | None], models: Sequence[str]
                 ) -> list[tuple[Finding, list[tuple[str, float, Measured, str]]]]:
    """Per finding with a number on at least one model of known size: ``(finding, [(model, size, measured,
    verdict), ...])``, the models by size. Used in: Verdicts."""
    out = []
    for row in rows:
        points = [(m, float(sizes[m]), *row[m]) for m in models
                  if m in row and row[m][0] is not None and sizes.get(m)]
        if points:
            out.append((row["finding"], sorted(points, key=lambda p: p[1])))
    return out


def _unit(measured: Measured) -> str:
    return measured.unit.strip()


def scale_figure(rows: Sequence[dict], sizes: Mapping[str, float | None], models: Sequence[str],
                 row_height: float = 1.55):
    """One small panel per finding with a number on at least one model (the rows of
    :func:`helpers.pages.verdicts.verdict_rows`): x the parameter count (log scale; ``sizes``, e.g. from
    :func:`parameter_count`, and the paper's models at :data:`PAPER_SIZES`), our number per model with its 95%
    interval, coloured by its verdict word, and the paper's number (:func:`paper_numbers`): a black diamond at the
    paper model's size where it gives one per model, a dashed line where it states one without a model. Each panel
    keeps its finding's unit on its own y axis. Models without a number (not yet run) are absent; with no number
    at all, the figure says so in words. Two panels a row at the page's width: the layout of
    :func:`helpers.pages.plots.panel_grid`, which shares the y axis, here with a y axis per panel. Used in: Verdicts."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullLocator

    points = scale_points(rows, sizes, models)
    if not points:
        fig, ax = plt.subplots(figsize=(plots.PAGE_WIDTH, 1.0), layout="constrained")
        ax.set_axis_off()
        ax.text(0.5, 0.5, "No finding has a number on any model yet.", ha="center", va="center")
        return fig
    n, cols = len(points), 2
    cols = min(cols, n)
    n_rows = -(-n // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(plots.PAGE_WIDTH, row_height * n_rows + 1.1), squeeze=False,
                             sharex=True, layout="constrained")
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    xs = {p[1] for _, pts in points for p in pts}
    paper_x = set()
    shown: dict[str, object] = {}
    for i, (ax, (finding, pts)) in enumerate(zip(flat, points)):
        for model, x, measured, verdict in pts:
            e = measured.estimate
            color = VERDICT_COLORS.get(verdict, "#808080")
            ax.errorbar([x], [e.value], yerr=[[e.value - e.low], [e.high - e.value]], fmt="o", ms=5, capsize=3,
                        color=color, mfc="white" if verdict == NOT_TESTABLE else color, gid=f"ours-{model}")
            shown.setdefault(verdict, color)
        for paper_model, value in paper_numbers(finding).items():
            if paper_model is None:
                ax.axhline(value, color="#555555", ls="--", lw=1, gid="paper-approx")
                shown.setdefault("paper-approx", None)
            else:
                x = PAPER_SIZES[paper_model]
                paper_x.add(x)
                ax.plot([x], [value], marker="D", ms=5, color="k", mfc="white", ls="none", gid=f"paper-{paper_model}")
                shown.setdefault("paper-model", set()).add(paper_model)
        ax.set_title(short_name(finding), fontsize=9, loc="left")
        unit = _unit(pts[0][2])
        if unit:
            ax.set_ylabel(unit)
        ax.margins(y=0.25)
        ax.grid(alpha=0.3)
        if i >= n - cols:  # the lowest panel of its column
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("parameters (log scale)")
    ticks = sorted(xs | set(PAPER_SIZES.values()))
    ax = flat[0]
    ax.set_xscale("log")
    ax.set_xlim(min(ticks) / 1.6, max(ticks) * 1.6)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([size_text(t) for t in ticks])
    handles = []
    for verdict, color in VERDICT_COLORS.items():
        if verdict in shown:
            handles.append(Line2D([], [], marker="o", ls="none", color=color,
                                  mfc="white" if verdict == NOT_TESTABLE else color, label=verdict))
    if "paper-model" in shown:
        drawn = ", ".join(m for m in PAPER_SIZES if m in shown["paper-model"])
        handles.append(Line2D([], [], marker="D", ls="none", color="k", mfc="white", label=f"the paper ({drawn})"))
    if "paper-approx" in shown:
        handles.append(Line2D([], [], color="#555555", ls="--", lw=1, label="the paper, ≈ (no model stated)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3), frameon=False)
    return fig


def compare(smaller: Measured, larger: Measured) -> str:
    """``"grows"`` when the larger model's 95% interval lies wholly above the smaller's, ``"shrinks"`` when wholly
    below, else ``"cannot be told apart"`` (overlapping intervals: not a claim that the two are equal). Used in:
    Verdicts."""
    a, b = smaller.estimate, larger.estimate
    if b.low > a.high:
        return "grows"
    if b.high < a.low:
        return "shrinks"
    return "cannot be told apart"


OUTCOMES = ("grows", "shrinks", "cannot be told apart")


def _join(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def scale_reading(rows: Sequence[dict], sizes: Mapping[str, float | None], models: Sequence[str]) -> str:
    """The scale view's reading, from the numbers: for each pair of models next to each other in size, the
    findings with a number on both, grouped by :func:`compare` ("grows", "shrinks", "cannot be told apart"); the
    findings left out because one model's number has no verdict from its rule (too few seeds, not testable); the
    paper's direction from GPT2-XL to GPT-J where it gives both; and what so few models can say. Used in:
    Verdicts."""
    points = scale_points(rows, sizes, models)
    order = sorted({(p[1], p[0]) for _, pts in points for p in pts})
    ranked = [m for _, m in order]
    pairs: dict[tuple[str, str], dict[str, list[str]]] = {}
    skipped: list[str] = []
    for finding, pts in points:
        if len(pts) < 2:
            continue
        usable = [p for p in pts if p[3] not in UNCOMPARED]
        if len(usable) < len(pts):
            skipped.append(f"{short_name(finding)} ({_join([f'{p[0]}: {p[3]}' for p in pts if p[3] in UNCOMPARED])})")
        for (m1, _, a, _), (m2, _, b, _) in zip(usable, usable[1:]):
            word = compare(a, b)
            text = short_name(finding) if word == OUTCOMES[2] else f"{short_name(finding)} ({a.text()} → {b.text()})"
            pairs.setdefault((m1, m2), {}).setdefault(word, []).append(text)
    out = []
    if not pairs:
        out.append("No finding has a number on two of our models yet: nothing can be compared across sizes.")
    for (m1, m2), groups in sorted(pairs.items(), key=lambda kv: (ranked.index(kv[0][0]), ranked.index(kv[0][1]))):
        parts = [f"{word}: {_join(groups[word])}" for word in OUTCOMES if word in groups]
        out.append(f"From {m1} ({size_text(sizes[m1])} parameters) to {m2} ({size_text(sizes[m2])}), comparing the "
                   f"95% intervals, the number {'; '.join(parts)}.")
    if skipped:
        out.append(f"Not compared, because a measurement rests on too few seeds or the model's mapping does not "
                   f"work: {_join(skipped)}.")
    paper = []
    for finding, _ in points:
        numbers = paper_numbers(finding)
        if all(m in numbers for m in PAPER_SIZES):
            small, large = (numbers[m] for m in PAPER_SIZES)
            word = "grows" if large > small else "shrinks" if large < small else "stays"
            paper.append(f"{short_name(finding)} {word} ({small:.2f} → {large:.2f})")
    if paper:
        out.append(f"In the paper, from {' to '.join(PAPER_SIZES)}: {_join(paper)} (point values; the paper gives "
                   "no intervals).")
    if pairs:
        out.append(f"These {len(ranked)} models differ in more than their size (family, training data, tuning), so "
                   "they cannot separate an effect of size from one of the model: a difference here describes these "
                   "models, not a law of scale.")
    return " ".join(out)


def scale_facts(rows: Sequence[dict], sizes: Mapping[str, float | None], models: Sequence[str]) -> dict[str, str]:
    """What the scale figure's caption glues: ``scale_sizes`` (each model with a number and its parameter count),
    ``scale_panels`` (how many findings have a number), ``scale_n`` (the range of test examples per demonstration
    set and of demonstration sets behind the points), ``scale_absent`` (which of the page's models has no number,
    or no count, so is not drawn) and ``scale_paper_sizes`` (the paper's models at :data:`PAPER_SIZES`). Used in:
    Verdicts."""
    points = scale_points(rows, sizes, models)
    drawn = sorted({(p[1], p[0]) for _, pts in points for p in pts})
    examples = [p[2].estimate.n_examples for _, pts in points for p in pts]
    seeds = [p[2].n_seeds for _, pts in points for p in pts if p[2].n_seeds]
    span = lambda v: f"{min(v)}" if min(v) == max(v) else f"{min(v)} to {max(v)}"  # noqa: E731
    n = (f"{span(examples)} test examples per demonstration set and {span(seeds)} sets" if examples and seeds
         else "as in the table")
    absent = [m for m in models if m not in {d[1] for d in drawn}]
    return {"scale_sizes": _join([f"{m} {size_text(x)}" for x, m in drawn]) if drawn else "none",
            "scale_panels": str(len(points)), "scale_n": n,
            "scale_absent": f"{_join(absent)} has none" if absent else "every model of the table has one",
            "scale_paper_sizes": ", ".join(f"{m} {size_text(x)}" for m, x in PAPER_SIZES.items())}
