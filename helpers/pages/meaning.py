"""The book layer of "Anchors without meaning" (``book/meaningless-labels``): its tables, figures and glued values.

The chapter computes (or reads back) its runs with :func:`helpers.experiments.meaning.chapter_runs` and wraps them in
a :class:`MeaningResults`; every function here then reads that object and returns what the chapter shows: a table
(a pandas ``Styler``), a figure (a ``matplotlib`` Figure, which the chapter closes once glued) or a dict
``{name: value}`` that the chapter glues in one loop. Nothing here loads a model. The estimates every table and
figure share (accuracy, flow gaps, loyalties, AUCROC_l) are computed once per :class:`MeaningResults` and stored as
summaries keyed on the content of the runs (:mod:`helpers.pages.summaries`): a build from the committed results and
summaries bootstraps nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..core.stats import layer_text
from ..core.findings import NOT_TESTABLE
from ..core.tasks import TASKS, TaskData, sample_fixed_demonstrations
from ..experiments import meaning
from ..experiments.aggregation import flow_gap_estimate, gap_over_layers
from ..experiments.extraction import auc_estimates, deep_auc_estimate
from ..experiments.meaning import REGIMES, SEVERAL_SHOTS, MeaningConfig, Scope, regime_data, regime_task
from . import plots

__all__ = ["REGIME_COLORS", "MeaningResults", "words_table", "example_prompts", "size_values", "accuracy_figure",
           "accuracy_table", "accuracy_values", "flow_figure", "crossover_table", "crossover_values",
           "isolation_figure", "isolation_table", "isolation_values", "auc_figure", "auc_table", "deep_auc_values",
           "f2_table", "f2_values", "summary_table", "verdict_values", "NEEDS_MAPPING"]

REGIME_COLORS = {"natural": "#222222", "abstract": "#1f77b4", "flipped": "#d62728", "random": "#2ca02c"}
FOLLOWS = "follows flip"  # the key of :func:`helpers.experiments.meaning.agreement_estimates` for flipped labels
FOLLOWS_COLUMN = "flipped: follows the flip"
# Regimes whose label words carry no meaning: only an in-context mapping can make them work, so their verdict needs
# one ("not testable on this model" when the SST-2 accuracy's 95% interval is not above chance, as on the verdict page).
NEEDS_MAPPING = ("abstract",)


@dataclass(eq=False)
class MeaningResults:
    """The chapter's runs for one or two models, and the estimates its tables and figures share.

    ``runs`` maps each model (the chapter's ``MODEL`` first, then ``SECOND_MODEL``) to what
    :func:`helpers.experiments.meaning.chapter_runs` returns for it; ``scopes`` maps each model to its
    :class:`~helpers.experiments.meaning.Scope`; ``config`` is the chapter's :class:`MeaningConfig`. The glued
    names number the models in that order: ``acc1_...`` for the first, ``acc2_...`` for the second.

    Used in: Anchors without meaning.
    """

    runs: Mapping[str, dict]
    scopes: Mapping[str, Scope]
    config: MeaningConfig

    @property
    def models(self) -> list[str]:
        """The models, the chapter's first model first."""
        return list(self.runs)

    @property
    def k(self) -> int:
        """The number of first / last layers in which the label words are isolated."""
        return self.config.isolation_k

    @cached_property
    def _content(self) -> str:
        """The content hash of the runs, scopes and configuration: what the stored estimates are keyed on."""
        from .summaries import content_hash

        return content_hash((self.runs, self.scopes, self.config))

    def _stored(self, kind: str, compute) -> dict:
        """``compute()``, stored as the summary ``meaning/<kind>/<content hash>`` (:mod:`helpers.pages.summaries`):
        a build from the committed results and summaries bootstraps nothing."""
        from .summaries import summary

        return summary(f"meaning/{kind}/{self._content}", compute)

    def key(self, model: str) -> str:
        """``"1"`` for the chapter's first model, ``"2"`` for the second (the suffix of its glued names)."""
        return str(self.models.index(model) + 1)

    def predicted_classes(self, model: str, task: str, regime: str, shots: int = 1, pooled: bool = False) -> int:
        """Distinct classes predicted: the fewest in one seed, or (``pooled``) over all seeds together."""
        rs = self.runs[model]["attention"][task, regime, shots]
        if pooled:
            return len(np.unique(np.concatenate([r["pred"] for r in rs])))
        return min(len(np.unique(r["pred"])) for r in rs)

    @cached_property
    def acc(self) -> dict:
        """``{(model, task, regime, shots): {"accuracy": Estimate[, "follows flip": Estimate]}}``: one
        demonstration per class on every task, then :data:`SEVERAL_SHOTS` on the tasks that ran them."""
        return self._stored("acc", self._acc)

    def _acc(self) -> dict:
        def of(m, task, regime, shots=1):
            return meaning.agreement_estimates(self.runs[m]["attention"][task, regime, shots],
                                               regime_task(task, regime))

        out = {(m, t, r, 1): of(m, t, r) for m in self.models for t in self.scopes[m].tasks for r in REGIMES}
        for m in self.models:
            for t in self.scopes[m].several_tasks:
                for r in REGIMES:
                    out[m, t, r, SEVERAL_SHOTS] = of(m, t, r, SEVERAL_SHOTS)
        return out

    @cached_property
    def saliency(self) -> dict:
        """``{(model, task, regime, shots): per-seed flows}``."""
        return {(m, t, r, s): v for m in self.models for (t, r, s), v in self.runs[m]["saliency"].items()}

    @cached_property
    def gaps(self) -> dict:
        """S_pq - S_wp per layer with its bootstrap band, per saliency run."""
        return self._stored("gaps", self._gaps)

    def _gaps(self) -> dict:
        return {k: flow_gap_estimate(v) for k, v in self.saliency.items()}

    @cached_property
    def shots_list(self) -> list[int]:
        """The demonstrations per class that any saliency run used, in increasing order."""
        return sorted({s for (_, _, _, s) in self.saliency})

    @cached_property
    def cross(self) -> dict:
        """``{(model, regime, shots): crossover layer or None}``."""
        return {(m, r, s): meaning.crossover(v) for (m, t, r, s), v in self.saliency.items()}

    @cached_property
    def cross_est(self) -> dict:
        """``{(model, regime, shots): (crossover Estimate, number of layers)}``: the crossover layer with its interval
        over seeds and examples (:func:`helpers.experiments.aggregation.crossover_estimate`)."""
        return self._stored("cross-est", self._cross_est)

    def _cross_est(self) -> dict:
        from ..experiments.aggregation import crossover_estimate

        return {(m, r, s): (crossover_estimate(v), np.asarray(v[0]).shape[-1])
                for (m, t, r, s), v in self.saliency.items()}

    @cached_property
    def isolation(self) -> dict:
        """``{(model, task, regime, shots): per-seed isolation runs}``."""
        return {(m, t, r, s): v for m in self.models for (t, r, s), v in self.runs[m]["isolation"].items()}

    @cached_property
    def loy(self) -> dict:
        """Label loyalty with the label words isolated in the first / last k layers, per isolation run."""
        return self._stored("loy", self._loy)

    def _loy(self) -> dict:
        return {k: meaning.loyalties(v, self.k) for k, v in self.isolation.items()}

    @cached_property
    def igap(self) -> dict:
        """Loyalty, last k minus first k layers isolated (points), per isolation run."""
        return self._stored("igap", self._igap)

    def _igap(self) -> dict:
        return {k: meaning.isolation_gap(v, self.k) for k, v in self.isolation.items()}

    @cached_property
    def aucs(self) -> dict:
        """``{(model, task, regime): (AUCROC_l, R_l)}``, one demonstration per class."""
        return self._stored("aucs", self._aucs)

    def _aucs(self) -> dict:
        return {(m, t, r): auc_estimates(self.runs[m]["attention"][t, r, 1])
                for m in self.models for t in self.scopes[m].tasks for r in REGIMES}

    @cached_property
    def deep(self) -> dict:
        """``{(model, regime): deep AUCROC_l}``, the seeds of all the model's tasks pooled (mean over tasks)."""
        return self._stored("deep", self._deep)

    def _deep(self) -> dict:
        return {(m, r): deep_auc_estimate([x for t in self.scopes[m].tasks
                                           for x in self.runs[m]["attention"][t, r, 1]])
                for m in self.models for r in REGIMES}

    @cached_property
    def signatures(self) -> dict:
        """``{(model, regime): {signature: Estimate}}``: isolation and flow on SST-2, one per class, and the deep
        AUCROC_l of the four tasks."""
        return self._stored("signatures", self._signatures)

    def _signatures(self) -> dict:
        out = {}
        for m in self.models:
            for r in REGIMES:
                sig = meaning.signatures(None, self.runs[m]["isolation"]["sst2", r, 1],
                                         self.runs[m]["saliency"]["sst2", r, 1], k=self.k)
                sig["deep AUCROC"] = self.deep[m, r]
                out[m, r] = sig
        return out

    def at_chance(self, model: str, regime: str, shots: int = 1) -> bool:
        """Whether the SST-2 accuracy's 95% interval fails to lie above chance (50%)."""
        return not self.acc[model, "sst2", regime, shots]["accuracy"].low > 100 / TASKS["sst2"].n_classes

    @cached_property
    def verdicts(self) -> dict:
        """``{(model, regime): verdict}`` (``"(reference)"`` for the natural words). A regime of
        :data:`NEEDS_MAPPING` whose SST-2 accuracy is at chance is ``"not testable on this model"``: with no working
        mapping there is nothing for the label words to anchor."""
        out = {}
        for m in self.models:
            for r in REGIMES:
                one_class = self.predicted_classes(m, "sst2", r, pooled=True) == 1  # one class in every seed
                if r == "natural":
                    out[m, r] = "(reference)"
                    continue
                why = ["one class predicted"] if one_class else []
                if r in NEEDS_MAPPING and self.at_chance(m, r):
                    out[m, r] = f"{NOT_TESTABLE} ({'; '.join(['SST-2 accuracy at chance'] + why)})"
                    continue
                out[m, r] = meaning.verdict(self.signatures[m, r], self.signatures[m, "natural"], one_class)
                if one_class:
                    out[m, r] += " (one class predicted on SST-2)"
        return out

    def holding(self, model: str, regime: str) -> str:
        """The signatures whose 95% interval lies on the anchor side, comma-separated (``"none"``)."""
        sig = self.signatures[model, regime]
        return ", ".join(k for k, e in sig.items() if meaning.holds(k, e)) or "none"


def _new_figure(n_rows: int, n_cols: int, height: float) -> tuple[Figure, np.ndarray]:
    return plt.subplots(n_rows, n_cols, figsize=(plots.PAGE_WIDTH, height), squeeze=False, layout="constrained",
                        sharey=True)


def _not_run(ax) -> None:
    """A panel with no results: no axes and no reference lines (they drew an empty plot), only a note."""
    for artist in [*ax.lines, *ax.patches, *ax.collections]:
        artist.remove()
    ax.set_axis_off()
    ax.text(0.5, 0.5, "not run on this model", ha="center", va="center", transform=ax.transAxes, color="#555")


def _yerr(e) -> list[list[float]]:
    return [[e.value - e.low], [e.high - e.value]]


# --------------------------------------------------------------------------------------------------------------------
# The regimes
# --------------------------------------------------------------------------------------------------------------------


def words_table(tasks: Mapping = TASKS):
    """The label words of each regime per task, in class order: a ``Styler`` with its caption.

    Used in: Anchors without meaning."""
    rows = []
    for task in tasks.values():
        rows.append({"task": task.title, **{r: " / ".join(w.strip() for w in regime_task(task, r).label_words)
                                            for r in ("natural", "abstract", "flipped")},
                     "random": "natural words, each demonstration's label drawn uniformly"})
    return pd.DataFrame(rows).set_index("task").style.set_caption(
        "The label words of each regime, in class order (the flipped regime shows class c with the word of class "
        "c + 1, cyclically).")


def example_prompts(data: TaskData, seed: int = 42, query: int = 0) -> str:
    """The same demonstrations (one per class, drawn with ``seed``) and test query under each regime, texts cut at
    60 characters, the query's gold class in brackets: the text the chapter prints.

    Used in: Anchors without meaning."""
    blocks = []
    q = data.test[query]
    for r in REGIMES:
        d = regime_data(data, r)
        demos, _ = sample_fixed_demonstrations(d, 1, seed)
        shown = "\n".join(f"{d.task.input_prefix}: {d.train[i].text.strip()[:60]}...\n{d.task.label_prefix}:"
                          f"{d.task.label_words[d.train[i].label]}" for i in demos)
        blocks.append(f"--- {r} ---\n{shown}\n{d.task.input_prefix}: {q.text.strip()[:60]}...\n{d.task.label_prefix}:"
                      f"   [gold: {data.task.class_names[q.label]}]\n")
    return "\n".join(blocks)


def size_values(res: MeaningResults) -> dict:
    """The sample sizes and names the chapter's text quotes: ``k_iso``, ``several``, ``model_name``,
    ``second_name`` and per model ``seeds1``, ``n_att1``, ``n_iso1``, ``n_sal1``, ``n_several1``,
    ``seeds_several1`` (``...2`` for the second model).

    Used in: Anchors without meaning."""
    config, models = res.config, res.models
    out = {"k_iso": res.k}
    for m in models:
        key, s = res.key(m), res.scopes[m]
        out[f"seeds{key}"] = ", ".join(map(str, s.seeds))
        out[f"n_att{key}"] = f"{config.n_test} × {len(s.seeds)}"
        out[f"n_iso{key}"] = f"{config.n_test_isolation} × {len(s.seeds)}"
        out[f"n_sal{key}"] = f"{config.n_test_saliency} × {len(s.seeds)}"
    out["several"] = SEVERAL_SHOTS
    for m in models:
        key, s = res.key(m), res.scopes[m]
        several = "sst2" in s.several_tasks
        out[f"n_several{key}"] = f"{config.n_test} × {len(s.seeds_for(SEVERAL_SHOTS))}" if several else "not run"
        out[f"seeds_several{key}"] = ", ".join(map(str, s.seeds_for(SEVERAL_SHOTS))) if several else "not run"
    out["model_name"] = models[0]
    out["second_name"] = models[1] if len(models) > 1 else "(none)"
    return out


# --------------------------------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------------------------------


def accuracy_figure(res: MeaningResults) -> Figure:
    """Accuracy per regime (filled) and, for flipped labels, agreement with the flip (open), with 95% intervals and
    the chance level, one row per model, one column per task and demonstrations per class.

    Used in: Anchors without meaning."""
    models = res.models
    fig, axes = _new_figure(len(models), 1, 2.7 * len(models) + 0.7)
    for ax, m in zip(axes[:, 0], models):
        cols = [(t, 1) for t in res.scopes[m].tasks] + [(t, SEVERAL_SHOTS) for t in res.scopes[m].several_tasks]
        for x, (t, shots) in enumerate(cols):
            ax.hlines(100 / TASKS[t].n_classes, x - 0.4, x + 0.4, color="#888", ls=":", lw=1)
            for j, r in enumerate(REGIMES):
                e = res.acc[m, t, r, shots]
                xx = x - 0.3 + 0.2 * j
                ax.errorbar(xx, e["accuracy"].value, yerr=_yerr(e["accuracy"]), fmt="o", color=REGIME_COLORS[r],
                            capsize=2, label=r if x == 0 else None)
                if FOLLOWS in e:
                    ax.errorbar(xx + 0.07, e[FOLLOWS].value, yerr=_yerr(e[FOLLOWS]), fmt="o", mfc="white",
                                color=REGIME_COLORS[r], capsize=2, label=FOLLOWS_COLUMN if x == 0 else None)
        ax.set_xticks(range(len(cols)), [f"{TASKS[t].title}\n{s} per class" for t, s in cols])
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"{m}\n% of examples")
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles.append(Line2D([], [], color="#888", ls=":"))
    labels.append("chance (100/C)")
    fig.legend(handles, labels, loc="outside lower center", ncol=6, frameon=False)
    fig.suptitle("Accuracy per regime (filled); flipped labels: agreement with the flip (open); 95% intervals")
    return fig


def accuracy_table(res: MeaningResults):
    """Accuracy (%) per model, task, demonstrations per class and regime, and for flipped labels agreement with the
    flip, with 95% intervals; ``(1 class)`` where the model predicts a single class in every seed. A ``Styler``.

    Used in: Anchors without meaning."""
    rows = {}
    for (m, t, r, shots), e in res.acc.items():
        row = rows.setdefault((m, TASKS[t].title, shots), {})
        one = " (1 class)" if res.predicted_classes(m, t, r, shots, pooled=True) == 1 else ""
        row[r] = e["accuracy"].fmt(1) + one
        if FOLLOWS in e:
            row[FOLLOWS_COLUMN] = e[FOLLOWS].fmt(1)
    df = pd.DataFrame.from_dict(rows, orient="index")[list(REGIMES) + [FOLLOWS_COLUMN]]
    df.index.names = ["model", "task", "per class"]
    models, config = res.models, res.config
    seeds = "".join(f", × {len(res.scopes[m].seeds)} for {m}" for m in models[1:])
    return df.style.set_caption(
        f"Accuracy (%) against the gold label per regime and, for flipped labels, agreement with the flipped mapping "
        f"(95% intervals). '(1 class)': the model predicts a single class in every seed. n = {config.n_test} examples"
        f" × {len(res.scopes[models[0]].seeds)} seeds for {models[0]}{seeds}.")


def accuracy_values(res: MeaningResults) -> dict:
    """The accuracies the text quotes: ``acc1_<task>_<regime>``, ``follow1_<task>``, ``abstract_classes1`` (fewest
    classes predicted in one seed, SST-2, abstract labels), the same with ``_several`` on SST-2 where it ran, and
    ``emoc_majority`` (% of the first model's EmoC examples whose gold class is the first, Others; where it ran).

    Used in: Anchors without meaning."""
    out = {}
    first = res.models[0]
    if "emoc" in res.scopes[first].tasks:
        emoc_gold = np.concatenate([x["gold"] for x in res.runs[first]["attention"]["emoc", "natural", 1]])
        out["emoc_majority"] = f"{100 * np.mean(emoc_gold == 0):.0f}"
    for m in res.models:
        key, scope = res.key(m), res.scopes[m]
        for t in scope.tasks:
            for r in REGIMES:
                out[f"acc{key}_{t}_{r}"] = res.acc[m, t, r, 1]["accuracy"].fmt(1)
            out[f"follow{key}_{t}"] = res.acc[m, t, "flipped", 1][FOLLOWS].fmt(1)
        out[f"abstract_classes{key}"] = res.predicted_classes(m, "sst2", "abstract")
        if "sst2" in scope.several_tasks:
            for r in REGIMES:
                out[f"acc{key}_sst2_{r}_several"] = res.acc[m, "sst2", r, SEVERAL_SHOTS]["accuracy"].fmt(1)
            out[f"follow{key}_sst2_several"] = res.acc[m, "sst2", "flipped", SEVERAL_SHOTS][FOLLOWS].fmt(1)
            out[f"abstract_classes{key}_several"] = res.predicted_classes(m, "sst2", "abstract", SEVERAL_SHOTS)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Aggregation: the saliency flow and isolation
# --------------------------------------------------------------------------------------------------------------------


def flow_figure(res: MeaningResults) -> Figure:
    """S_pq - S_wp per layer on SST-2 per regime with 95% bands, one row per model, one column per number of
    demonstrations per class ("not run" where a model has none).

    Used in: Anchors without meaning."""
    models, shots_list = res.models, res.shots_list
    fig, axes = _new_figure(len(models), len(shots_list), 2.6 * len(models) + 0.8)
    for i, m in enumerate(models):
        for j, s in enumerate(shots_list):
            ax = axes[i, j]
            e = None
            for r in REGIMES:
                if (m, "sst2", r, s) not in res.gaps:
                    continue
                e = res.gaps[m, "sst2", r, s]
                layers = np.arange(1, len(e.value) + 1)
                ax.plot(layers, e.value, color=REGIME_COLORS[r], marker=".", label=r)
                ax.fill_between(layers, e.low, e.high, color=REGIME_COLORS[r], alpha=0.12, lw=0)
            ax.axhline(0, color="k", lw=0.8)
            ax.grid(alpha=0.3)
            if e is None:
                ax.set_title(f"{m}\nSST-2, {s} per class")
                _not_run(ax)
            else:
                ax.set_xticks(plots.layer_ticks(len(e.value)))
                ax.set_title(f"{m}\nSST-2, {s} per class (n = {e.n})")
            if i == len(models) - 1:
                ax.set_xlabel("layer")
        axes[i, 0].set_ylabel("$S_{pq} - S_{wp}$")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, frameon=False)
    fig.suptitle("Label words → target minus text → label words, per regime (shaded: 95% bootstrap bands)")
    return fig


def _of(layer: str, n_layers: int) -> str:
    return layer if layer == "never" else f"{layer} of {n_layers}"


def crossover_table(res: MeaningResults):
    """Per model, demonstrations per class and regime (SST-2): the crossover layer and S_pq - S_wp averaged over the
    first and the last third of the layers, with 95% intervals. A ``Styler``.

    Used in: Anchors without meaning."""
    rows = []
    for (m, t, r, s), v in res.saliency.items():
        n_layers = len(res.gaps[m, t, r, s].value)
        shallow = gap_over_layers(v, 1, max(1, round(n_layers / 3)))
        deep = meaning.deep_flow_gap(v)
        rows.append({"model": m, "per class": s, "regime": r,
                     "S_pq > S_wp from layer": _of(layer_text(res.cross_est[m, r, s][0], n_layers), n_layers),
                     "gap, first third of the layers": shallow.fmt(2), "gap, last third": deep.fmt(2), "n": deep.n})
    return pd.DataFrame(rows).set_index(["model", "per class", "regime"]).style.set_caption(
        "The first layer where S_pq exceeds S_wp (the crossover; 'never' past the last layer), and the mean of "
        "S_pq - S_wp over the first and the last third of the layers (95% intervals over seeds and examples), SST-2.")


def crossover_values(res: MeaningResults) -> dict:
    """``cross1_<regime>_<shots>``: the crossover layer with its 95% interval (``"7 [6, 8]"``), or ``"never"``.

    Used in: Anchors without meaning."""
    return {f"cross{res.key(m)}_{r}_{s}": layer_text(e, n) for (m, r, s), (e, n) in res.cross_est.items()}


def isolation_figure(res: MeaningResults) -> Figure:
    """Label loyalty after isolating the label words in the first (red) or last (blue) k layers, per regime on
    SST-2, with 95% intervals; one row per model, one column per number of demonstrations per class.

    Used in: Anchors without meaning."""
    models, shots_list, k = res.models, res.shots_list, res.k
    fig, axes = _new_figure(len(models), len(shots_list), 2.6 * len(models) + 0.8)
    for i, m in enumerate(models):
        for j, s in enumerate(shots_list):
            ax = axes[i, j]
            n = ""
            for x, r in enumerate(REGIMES):
                if (m, "sst2", r, s) not in res.loy:
                    continue
                for dx, where, color in [(-0.18, "first", "#d62728"), (0.18, "last", "#1f77b4")]:
                    e = res.loy[m, "sst2", r, s][where]
                    ax.bar(x + dx, e.value, width=0.34, color=color,
                           label=f"label words, {where} {k} layers" if x == 0 else None)
                    ax.errorbar(x + dx, e.value, yerr=_yerr(e), fmt="none", ecolor="k", capsize=3, lw=1)
                    n = e.n
            ax.axhline(100, color="k", lw=0.8, ls="--")
            ax.set_xticks(range(len(REGIMES)), REGIMES)
            ax.set_ylim(0, 110)
            ax.grid(alpha=0.3, axis="y")
            ax.set_title(f"{m}\nSST-2, {s} per class" + (f" (n = {n})" if n else ""))
            if not n:
                _not_run(ax)
        axes[i, 0].set_ylabel("label loyalty (%)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, frameon=False)
    fig.suptitle(f"Label loyalty after isolating the label words in the first or last {k} layers (bars: 95% intervals)")
    return fig


def isolation_table(res: MeaningResults):
    """Label loyalty (%) with the label words isolated in the first / last k layers and the paired difference, per
    model, demonstrations per class and regime (SST-2, 95% intervals). A ``Styler``.

    Used in: Anchors without meaning."""
    k = res.k
    rows = [{"model": m, "per class": s, "regime": r, f"first {k}": e["first"].fmt(0), f"last {k}": e["last"].fmt(0),
             "last minus first (points)": res.igap[m, t, r, s].fmt(0), "n": e["first"].n}
            for (m, t, r, s), e in res.loy.items()]
    return pd.DataFrame(rows).set_index(["model", "per class", "regime"]).style.set_caption(
        f"Label loyalty (%) with the label words isolated in the first / last {k} layers, and the paired difference "
        "(95% intervals), SST-2.")


def isolation_values(res: MeaningResults) -> dict:
    """``first1_<regime>_<shots>``, ``last1_...`` (label loyalty, %) and ``igap1_...`` (last minus first, points).

    Used in: Anchors without meaning."""
    out = {}
    for (m, t, r, s), e in res.loy.items():
        key = res.key(m)
        out[f"first{key}_{r}_{s}"] = e["first"].fmt(0)
        out[f"last{key}_{r}_{s}"] = e["last"].fmt(0)
        out[f"igap{key}_{r}_{s}"] = res.igap[m, t, r, s].fmt(0)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Extraction: AUCROC_l
# --------------------------------------------------------------------------------------------------------------------


def auc_figure(res: MeaningResults) -> Figure:
    """AUCROC_l per layer, regime and task with 95% bands, one demonstration per class; one row per model (a curve
    is left out where the model predicts one class only).

    Used in: Anchors without meaning."""
    models = res.models
    n_tasks = max(len(res.scopes[m].tasks) for m in models)
    fig, axes = _new_figure(len(models), n_tasks, 2.3 * len(models) + 0.9)
    for i, m in enumerate(models):
        for j, t in enumerate(res.scopes[m].tasks):
            ax = axes[i, j]
            for r in REGIMES:
                e, _ = res.aucs[m, t, r]
                n_layers = len(e.value)
                if np.all(np.isnan(e.value)):
                    continue
                layers = np.arange(1, n_layers + 1)
                ax.plot(layers, e.value, color=REGIME_COLORS[r], label=r, lw=1.4)
                ax.fill_between(layers, e.low, e.high, color=REGIME_COLORS[r], alpha=0.1, lw=0)
            ax.axhline(0.5, color="k", lw=0.8, ls=":")
            ax.axhline(0.8, color="#777", lw=0.8, ls="--")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ticks = plots.layer_ticks(n_layers)
            ax.set_xticks(ticks[::2] + ([n_layers] if len(ticks) % 2 == 0 else []))
            ax.set_title(f"{TASKS[t].title}" if i == 0 else "")
            if i == len(models) - 1:
                ax.set_xlabel("layer")
        axes[i, 0].set_ylabel(f"{m}\nAUCROC$_l$")
    handles = [Line2D([], [], color=REGIME_COLORS[r]) for r in REGIMES]
    fig.legend(handles, list(REGIMES), loc="outside lower center", ncol=4, frameon=False)
    fig.suptitle("AUCROC$_l$ per regime, one demonstration per class (dotted: chance; dashed: the paper's ≈ 0.8)")
    return fig


def auc_table(res: MeaningResults):
    """AUCROC_l averaged over the last third of the layers per model and regime: the mean over the model's tasks
    and each task's, with 95% intervals (``undefined`` where one class is predicted in every seed). A ``Styler``.

    Used in: Anchors without meaning."""
    rows = []
    for m in res.models:
        tasks = res.scopes[m].tasks
        for r in REGIMES:
            row = {"model": m, "regime": r, f"mean of {len(tasks)} tasks": res.deep[m, r].fmt(2)}
            for t in tasks:
                e = deep_auc_estimate(res.runs[m]["attention"][t, r, 1], n_boot=300)
                row[TASKS[t].title] = e.fmt(2) if np.isfinite(e.value) else "undefined"
            row["n per task"] = f"{res.config.n_test} × {len(res.scopes[m].seeds)}"
            rows.append(row)
    return pd.DataFrame(rows).set_index(["model", "regime"]).style.set_caption(
        "AUCROC_l averaged over the last third of the layers, one demonstration per class (95% intervals). "
        "'undefined': the model predicts one class in every seed.")


def deep_auc_values(res: MeaningResults) -> dict:
    """``deep1_<regime>``: the deep AUCROC_l averaged over the model's tasks.

    Used in: Anchors without meaning."""
    return {f"deep{res.key(m)}_{r}": res.deep[m, r].fmt(2) for m in res.models for r in REGIMES}


# --------------------------------------------------------------------------------------------------------------------
# Beside the paper's Appendix F.2
# --------------------------------------------------------------------------------------------------------------------


def _f2_shots(res: MeaningResults, model: str) -> int:
    """The most demonstrations per class the model ran on SST-2."""
    return SEVERAL_SHOTS if "sst2" in res.scopes[model].several_tasks else 1


def f2_table(res: MeaningResults):
    """The paper's Appendix F.2 (LLaMA-33B, SST-2, "A"/"B", 8 per class) beside each model with abstract labels on
    SST-2 and the most demonstrations per class it ran: accuracy, label loyalty after isolation, deep AUCROC_l. A
    ``Styler``.

    Used in: Anchors without meaning."""
    k = res.k
    rows = [{"": "paper, LLaMA-33B, 8 per class", "accuracy %": "83.0",
             f"label loyalty, first {k} layers isolated": "strongly lowered (Figure 12, bars only)",
             f"last {k} layers": "barely changed (Figure 12)",
             "deep AUCROC": "high in deep layers (Figure 13, curve only)"}]
    for m in res.models:
        s = _f2_shots(res, m)
        a = res.acc[m, "sst2", "abstract", s]["accuracy"]
        lo = res.loy[m, "sst2", "abstract", s]
        d = deep_auc_estimate(res.runs[m]["attention"]["sst2", "abstract", s])
        classes = res.predicted_classes(m, "sst2", "abstract", s, pooled=True)
        rows.append({"": f"{m}, {s} per class (n = {a.n})", "accuracy %": a.fmt(1),
                     f"label loyalty, first {k} layers isolated": lo["first"].fmt(0) + "%",
                     f"last {k} layers": lo["last"].fmt(0) + "%",
                     "deep AUCROC": d.fmt(2) if np.isfinite(d.value) else f"undefined: predicts {classes} class(es)"})
    return pd.DataFrame(rows).set_index("").style.set_caption(
        "Appendix F.2 beside ours: abstract labels on SST-2 (95% intervals; n = examples × seeds).")


def f2_values(res: MeaningResults) -> dict:
    """Per model, abstract labels on SST-2 with the most demonstrations per class it ran: ``f2_shots1``,
    ``f2_acc1`` (accuracy, %), ``f2_first1`` / ``f2_last1`` (label loyalty after isolating the first / last k
    layers, %), ``f2_igap1`` (last minus first, points) and ``f2_igap_seeds1`` (per seed), ``f2_classes1`` (classes
    predicted, seeds pooled), ``f2_answers_a1`` (per seed, how many examples get " A").

    Used in: Anchors without meaning."""
    out = {}
    for m in res.models:
        key, s = res.key(m), _f2_shots(res, m)
        lo, gap = res.loy[m, "sst2", "abstract", s], res.igap[m, "sst2", "abstract", s]
        preds = [r["pred"] for r in res.runs[m]["attention"]["sst2", "abstract", s]]
        out[f"f2_shots{key}"] = s
        out[f"f2_acc{key}"] = res.acc[m, "sst2", "abstract", s]["accuracy"].fmt(1)
        out[f"f2_first{key}"] = lo["first"].fmt(0)
        out[f"f2_last{key}"] = lo["last"].fmt(0)
        out[f"f2_igap{key}"] = gap.fmt(0)
        out[f"f2_igap_seeds{key}"] = " / ".join(f"{v:.0f}" for v in gap.seed_values)
        out[f"f2_classes{key}"] = res.predicted_classes(m, "sst2", "abstract", s, pooled=True)
        out[f"f2_answers_a{key}"] = " / ".join(str(int(np.sum(p == 0))) for p in preds) + f" of {len(preds[0])}"
    return out


# --------------------------------------------------------------------------------------------------------------------
# The verdict
# --------------------------------------------------------------------------------------------------------------------


def _agreement(a: dict | None) -> str:
    if a is None:
        return "not run"
    return a["accuracy"].fmt(1) + (f"; follows flip {a[FOLLOWS].fmt(1)}" if FOLLOWS in a else "")


def summary_table(res: MeaningResults):
    """Per model and regime: SST-2 accuracy (one and several per class), the crossover layer, label loyalty after
    isolation, deep AUCROC_l, the signatures that hold and the verdict (position, meaning or inconclusive). A
    ``Styler``.

    Used in: Anchors without meaning."""
    k, config, models = res.k, res.config, res.models
    rows = []
    for m in models:
        for r in REGIMES:
            lo = res.loy[m, "sst2", r, 1]
            n_layers = len(res.gaps[m, 'sst2', r, 1].value)
            several = ("not run" if (m, r, SEVERAL_SHOTS) not in res.cross_est
                       else layer_text(res.cross_est[m, r, SEVERAL_SHOTS][0], n_layers))
            rows.append({
                "model": m, "regime": r,
                "SST-2 accuracy %, 1 per class": _agreement(res.acc[m, "sst2", r, 1]),
                f"{SEVERAL_SHOTS} per class": _agreement(res.acc.get((m, "sst2", r, SEVERAL_SHOTS))),
                "crossover layer (1 / several per class)":
                    f"{layer_text(res.cross_est[m, r, 1][0], n_layers)} / {several} of {n_layers}",
                f"label loyalty, first {k} / last {k}": f"{lo['first'].fmt(0)} / {lo['last'].fmt(0)}",
                f"deep AUCROC ({len(res.scopes[m].tasks)} tasks)": res.deep[m, r].fmt(2),
                "signatures holding": res.holding(m, r),
                "verdict": res.verdicts[m, r]})
    seeds = "".join(f"; {m} × {len(res.scopes[m].seeds)} seed(s)" for m in models[1:])
    return pd.DataFrame(rows).set_index(["model", "regime"]).style.set_caption(
        f"Per regime and model: SST-2 accuracy (for flipped labels also agreement with the flipped mapping), the "
        f"crossover layer of the saliency flow, label loyalty after isolation (SST-2, one per class), deep AUCROC "
        f"(mean of the four tasks), the signatures whose 95% interval lies on the anchor side, and the verdict "
        f"('{NOT_TESTABLE}': abstract labels whose SST-2 accuracy is not above chance). "
        f"n: {models[0]} {config.n_test} (accuracy, AUCROC), {config.n_test_isolation} (isolation), "
        f"{config.n_test_saliency} (saliency) examples × {len(res.scopes[models[0]].seeds)} seeds{seeds}.")


def verdict_values(res: MeaningResults) -> dict:
    """``verdict1_<regime>`` (position, meaning, inconclusive, not testable on this model, or ``(reference)`` for the
    natural words) and
    ``holding1_<regime>`` (the signatures that hold).

    Used in: Anchors without meaning."""
    out = {}
    for m in res.models:
        for r in REGIMES:
            out[f"verdict{res.key(m)}_{r}"] = res.verdicts[m, r]
            out[f"holding{res.key(m)}_{r}"] = res.holding(m, r)
    return out
