"""The verdict page: each finding of the paper, its number, ours per model with its interval, and a verdict.

Everything here **reads cached results only** (``cached_run`` in lookup-only mode, through the experiments' own run
functions, so the settings that key a run are the chapters' settings); nothing is computed from a model. A finding
whose results are missing for a model shows "not yet run".

**Registry.** :data:`FINDINGS` maps an id to a frozen :class:`Finding`: the paper's claim in one sentence, the
paper's number as text, the chapter and section anchor that shows it, a ``compute(model, profile)`` that returns a
:class:`Measured` (an :class:`~helpers.core.stats.Estimate` and a note) or ``None`` when results are missing, and a
``rule`` turning that into a verdict. Findings of chapters that do not exist yet have ``compute=None``; a chapter's
helper module plugs its function in with :func:`register` (or the :func:`computes` decorator)::

    from helpers.pages.verdicts import computes

    @computes("reweighting-gain")
    def reweighting_gain(model, profile):      # -> Measured | None
        ...

**Verdict rules** (stated once, here, and printed on the page). With a 95% interval [low, high]:

* a difference "A > B" is *reproduced* when low > 0, *partly* when only the point estimate is > 0;
* "barely matters" (a loyalty) is *reproduced* when low >= 90%, *partly* when the point is >= 90% or, for the
  random control, when the label words still cost significantly more than random tokens;
* "strongly lowers" (a loyalty) is *reproduced* when high < 90%, *partly* when high < 100%;
* "AUCROC approaches 0.8 in deep layers" is *reproduced* when the interval reaches 0.8 and lies above 0.5 on every
  task, *partly* when the mean over tasks lies above 0.5, *not reproduced* otherwise;
* "R_l rises in the second half" is *reproduced* when R at the middle layer has high < 0.5, *partly* when its point
  is < 0.5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ..core.runs import PROFILES, ModelKey, Profile
from ..core.stats import Estimate
from ..core.tasks import TASKS, get_task, load_task

__all__ = ["Finding", "Measured", "FINDINGS", "VERDICTS", "REPRODUCED", "PARTLY", "NOT_REPRODUCED", "NOT_YET_RUN",
           "register", "computes", "evaluate", "verdict_rows", "lookup", "MODELS"]

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_YET_RUN = "reproduced", "partly", "not reproduced", "not yet run"
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_YET_RUN)
MODELS = ("gemma-3-270m", "qwen2.5-coder-0.5b")  # the page's columns
TASK_NAMES = tuple(TASKS)


@dataclass(frozen=True)
class Measured:
    """Our number for one model: the estimate shown, how to print it, and supporting estimates for the rule."""

    estimate: Estimate
    unit: str = ""
    digits: int = 2
    note: str = ""
    support: dict = field(default_factory=dict)
    n_text: str = ""  # overrides ``estimate.n`` (e.g. "16 × 3 seeds × 4 tasks" when tasks are pooled)

    @property
    def n(self) -> str:
        return self.n_text or self.estimate.n

    def text(self) -> str:
        return f"{self.estimate.fmt(self.digits)}{self.unit}"


@dataclass(frozen=True)
class Finding:
    id: str
    claim: str  # the paper's claim, one sentence
    paper: str  # the paper's number (or "qualitative, Figure N") as text
    where: str  # paper section / figure / table
    chapter: str | None  # book page without extension ("book/aggregation"); None: a planned chapter
    anchor: str = ""  # a label in that page ("sec-isolation", "fig-flow")
    compute: Callable[[str, Profile], Measured | None] | None = None
    rule: Callable[[Measured], str] | None = None
    planned: str = ""  # the planned chapter's name, when ``chapter`` is None


# ----------------------------------------------------------------------------------------------------------------
# Reading cached results
# ----------------------------------------------------------------------------------------------------------------


def lookup(run_function, model: str, task: str, profile: Profile, **kw) -> list | None:
    """The per-seed results of ``run_function`` (e.g. :func:`helpers.experiments.aggregation.isolation_runs`) from the cache, or
    ``None`` if any seed is missing. No model is loaded: only its name keys the cache."""
    lm = ModelKey.of(model)  # float32 on the CPU, as the chapters load it
    data = load_task(task)  # its fingerprint keys the cache
    out = run_function(lm, data, profile, lookup_only=True, **kw)
    return None if any(r is None for r in out) else out


def _all_tasks(run_function, model, profile, **kw) -> dict[str, list] | None:
    runs = {t: lookup(run_function, model, t, profile, **kw) for t in TASK_NAMES}
    return None if any(r is None for r in runs.values()) else runs


# ----------------------------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------------------------


def above_zero(m: Measured) -> str:
    e = m.estimate
    return REPRODUCED if e.low > 0 else PARTLY if e.value > 0 else NOT_REPRODUCED


def majority(m: Measured) -> str:
    e = m.estimate
    return REPRODUCED if e.low > 0.5 else PARTLY if e.value > 0.5 else NOT_REPRODUCED


def strongly_lowers(m: Measured) -> str:
    e = m.estimate
    return REPRODUCED if e.high < 90 else PARTLY if e.high < 100 else NOT_REPRODUCED


def barely_matters(m: Measured) -> str:
    e = m.estimate
    if e.low >= 90:
        return REPRODUCED
    if e.value >= 90:
        return PARTLY
    margin = m.support.get("label words cost more")
    if margin is not None and margin.low > 0:
        return PARTLY
    return NOT_REPRODUCED


def near_point_eight(m: Measured) -> str:
    e = m.estimate
    every_task_above = all(t.low > 0.5 for t in m.support.values())
    if e.high >= 0.8 and every_task_above:
        return REPRODUCED
    return PARTLY if e.low > 0.5 else NOT_REPRODUCED


def second_half(m: Measured) -> str:
    e = m.estimate
    early = [t for t, layer in m.support.get("passing", {}).items() if layer is not None and layer <= m.support["mid"]]
    if e.high < 0.5 and not early:
        return REPRODUCED
    return PARTLY if e.value < 0.5 else NOT_REPRODUCED


# ----------------------------------------------------------------------------------------------------------------
# Our numbers, from the cache
# ----------------------------------------------------------------------------------------------------------------

def _pooled_n(e: Estimate) -> str:
    return f"{e.n_examples} × {e.n_seeds // len(TASK_NAMES)} seeds × {len(TASK_NAMES)} tasks"


SHALLOW_K = 5  # the paper's k for "shallow" / "deep" in §2.2, used for the flow findings too


def _flows(model, profile):
    from ..experiments.aggregation import saliency_runs

    runs = _all_tasks(saliency_runs, model, profile)
    return None if runs is None else [f for t in TASK_NAMES for f in runs[t]]


def flow_shallow(model: str, profile: Profile) -> Measured | None:
    from ..experiments.aggregation import gap_over_layers

    flows = _flows(model, profile)
    if flows is None:
        return None
    est = gap_over_layers(flows, 1, SHALLOW_K).scaled(-1)
    return Measured(est, note=f"S_wp − S_pq (normalised), layers 1–{SHALLOW_K}, mean of 4 tasks",
                    n_text=_pooled_n(est))


def flow_deep(model: str, profile: Profile) -> Measured | None:
    from ..experiments.aggregation import flow_gap_estimate, gap_over_layers, lead_layers, saliency_runs

    flows = _flows(model, profile)
    if flows is None:
        return None
    n_layers = flows[0].shape[-1]
    est = gap_over_layers(flows, n_layers - SHALLOW_K + 1, n_layers)
    per_task = _all_tasks(saliency_runs, model, profile)
    flips = {t: lead_layers(flow_gap_estimate(per_task[t], n_boot=200))["flip_backs"] for t in TASK_NAMES}
    flip_text = "; ".join(f"{get_task(t).title} {', '.join(map(str, v))}" for t, v in flips.items() if v)
    return Measured(est, note=f"S_pq − S_wp (normalised), last {SHALLOW_K} layers, mean of 4 tasks; S_wp leads "
                              f"again at layers: {flip_text or 'none'}", n_text=_pooled_n(est))


def flow_ww(model: str, profile: Profile) -> Measured | None:
    from ..experiments.aggregation import ww_smallest_share

    flows = _flows(model, profile)
    if flows is None:
        return None
    est = ww_smallest_share(flows).scaled(100)
    return Measured(est, unit="%", digits=0, note="share of layers where S_ww is below both; mean of 4 tasks",
                    n_text=_pooled_n(est))


def _iso(model, profile):
    from ..experiments.aggregation import isolation_runs

    runs = _all_tasks(isolation_runs, model, profile)
    return None if runs is None else [r for t in TASK_NAMES for r in runs[t]]


def _loyalty(condition: str, metric: str = "label loyalty"):
    def compute(model: str, profile: Profile) -> Measured | None:
        from ..experiments.aggregation import loyalty_difference, loyalty_per_example
        from ..core.stats import mean_estimate

        runs = _iso(model, profile)
        if runs is None:
            return None
        est = mean_estimate([loyalty_per_example(r, condition)[metric] for r in runs])
        word = mean_estimate([loyalty_per_example(r, condition)["word loyalty@5"] for r in runs])
        support = {}
        note = f"label loyalty, mean of 4 tasks; word loyalty@5 {word.fmt(0)}%"
        if condition.startswith("random"):
            label = condition.replace("random", "label")
            support["label words cost more"] = loyalty_difference(runs, condition, label)
            note += f"; label words cost {support['label words cost more'].fmt(0)} points more"
        return Measured(est, unit="%", digits=0, note=note, support=support, n_text=_pooled_n(est))

    return compute


def _extraction(model, profile, shots=1):
    from ..experiments.extraction import extraction_runs

    return _all_tasks(extraction_runs, model, profile, shots=shots)


def deep_auc(model: str, profile: Profile) -> Measured | None:
    from ..experiments.extraction import deep_auc_estimate

    runs = _extraction(model, profile)
    if runs is None:
        return None
    per_task = {get_task(t).title: deep_auc_estimate(runs[t], n_boot=300) for t in TASK_NAMES}
    est = deep_auc_estimate([r for t in TASK_NAMES for r in runs[t]])
    low = [f"{name} {e.fmt(2)}" for name, e in per_task.items() if e.low <= 0.5]
    note = "last third of the layers, mean of 4 tasks"
    if low:
        note += "; not above chance: " + ", ".join(low)
    return Measured(est, note=note, support=per_task, n_text=_pooled_n(est))


def _r_mid(shots: int):
    def compute(model: str, profile: Profile) -> Measured | None:
        from ..experiments.extraction import auc_per_layer_weighted, cumulative_contribution, layer_passing
        from ..core.stats import bootstrap_weighted

        runs = _extraction(model, profile, shots)
        if runs is None:
            return None
        pooled = [(r["attention"], r["pred"]) for t in TASK_NAMES for r in runs[t]]
        n_layers = pooled[0][0].shape[1]
        mid = n_layers // 2
        est = bootstrap_weighted(pooled, auc_per_layer_weighted, then=cumulative_contribution)
        r_mid = Estimate(est.value[mid - 1], est.low[mid - 1], est.high[mid - 1], est.n_examples, est.n_seeds,
                         est.seed_values[:, mid - 1], est.level)
        passing = layer_passing(est.value)
        per_task = {}
        for t in TASK_NAMES:
            auc = np.nanmean([auc_per_layer_weighted(r["attention"], r["pred"], np.ones((1, len(r["pred"]))))[0]
                              for r in runs[t]], axis=0)
            p = layer_passing(cumulative_contribution(auc))
            per_task[get_task(t).title] = None if p is None else p + 1
        early = [f"{t} (layer {layer})" for t, layer in per_task.items() if layer is not None and layer <= mid]
        note = (f"R_l at layer {mid} of {n_layers} (AUC averaged over 4 tasks); it reaches 0.5 at layer "
                f"{passing + 1 if passing is not None else 'never'}")
        if early:
            note += "; per task, R_l reaches 0.5 in the first half on " + ", ".join(early)
        return Measured(r_mid, note=note, support={"passing": per_task, "mid": mid}, n_text=_pooled_n(r_mid))

    return compute


FINDINGS: dict[str, Finding] = {f.id: f for f in [
    Finding("flow-shallow", "In shallow layers the text → label-word flow S_wp dominates the label → target flow S_pq.",
            "qualitative (Figures 3, 7)", "§2.1", "book/aggregation", "fig-flow", flow_shallow, above_zero),
    Finding("flow-deep", "In deep layers the label-word → target flow S_pq dominates.",
            "qualitative (Figures 3, 7)", "§2.1", "book/aggregation", "fig-flow", flow_deep, above_zero),
    Finding("flow-ww", "S_wp and S_pq are usually above the flow among other tokens, S_ww.",
            "qualitative (Figures 3, 7)", "§2.1", "book/aggregation", "sec-global-layers", flow_ww, majority),
    Finding("isolation-first", "Isolating the label words in the first 5 layers strongly lowers loyalty.",
            "qualitative (Figure 4)", "§2.2", "book/aggregation", "fig-loyalty", _loyalty("label-first-5"),
            strongly_lowers),
    Finding("isolation-last", "Isolating the label words in the last 5 layers barely matters.",
            "qualitative (Figure 4), ≈ 100%", "§2.2", "book/aggregation", "fig-loyalty", _loyalty("label-last-5"),
            barely_matters),
    Finding("isolation-random", "Isolating as many random non-label tokens in the first 5 layers barely matters.",
            "qualitative (Figure 4), ≈ 100%", "§2.2", "book/aggregation", "sec-isolation",
            _loyalty("random-first-5"), barely_matters),
    Finding("deep-auc", "The target's attention to the label words predicts the output in deep layers: AUCROC ≈ 0.8.",
            "≈ 0.8", "§2.3, Figure 5", "book/extraction", "fig-auc", deep_auc, near_point_eight),
    Finding("r-second-half", "The cumulative contribution R_l is small in shallow layers and rises in the middle and "
            "late layers.", "qualitative (Figure 5)", "§2.3", "book/extraction", "fig-auc", _r_mid(1), second_half),
    Finding("two-shot", "With 2 demonstrations per class the conclusions are the same (shown here: R_l, as above).",
            "qualitative (Figures 9–11)", "Appendix F.1", "book/extraction", "fig-auc2", _r_mid(2), second_half),
    Finding("reweighting-gain", "Anchor re-weighting improves 1-shot ICL accuracy, on average over the 4 tasks.",
            "+16.7 points (51.90 → 68.64, GPT2-XL, Table 1)", "§3.1", None, planned="Re-weighting"),
    Finding("reweighting-vs-controls", "(beyond the paper) The gain is about anchors: re-weighting beats the best "
            "equally cheap correction trained on the same examples.", "not run in the paper", "§3.1", None,
            planned="Re-weighting"),
    Finding("compression-speedup", "Anchor-only context compression (Hidden_anchor) speeds up inference.",
            "1.8× on average (1.1–2.9×, Tables 3 and 6)", "§3.2", None, planned="Compression"),
    Finding("compression-loyalty", "Hidden_anchor keeps most of the model's predictions.",
            "label loyalty 79.47 (GPT2-XL), 89.06 (GPT-J); Table 2", "§3.2", None, planned="Compression"),
    Finding("diagnosis", "Distances between the label words' keys predict which categories the model confuses.",
            "most confused pair Description–Entity (TREC, Figure 6)", "§3.3", None, planned="Diagnosis"),
    Finding("prefix-theorem", "(beyond the paper) A trained prefix leaves q's first-layer attention over the prompt, "
            "renormalised over the prompt, unchanged (Petrov, Torr & Bibi 2024); anchor re-weighting changes it.",
            "a theorem (exact), not in the paper", "§3.1 vs prefix-tuning", None, planned="Tuning the context"),
    Finding("anchors-without-meaning", "Label words without meaning ('A'/'B') still act as anchors.",
            "LLaMA-33B, SST-2, 8 per class: 83.0% accuracy (Figures 12, 13)", "Appendix F.2", None,
            planned="Anchors without meaning"),
]}


# ----------------------------------------------------------------------------------------------------------------
# Findings of the later chapters (each reads its chapter's cached runs; None until every task has a common seed)
# ----------------------------------------------------------------------------------------------------------------


def _reweighting_runs(model: str, profile: Profile) -> dict | None:
    """``{task: {method: [run per seed]}}`` over the seeds cached for every task and method, or None."""
    from ..experiments import reweighting as rw

    lm = ModelKey.of(model)
    data = {t: load_task(t) for t in TASK_NAMES}
    seeds = set(rw.reweighting_seeds(profile))
    for d in data.values():
        seeds &= set(rw.available_seeds(lm, d, profile))
    if not seeds:
        return None
    seeds = tuple(s for s in rw.reweighting_seeds(profile) if s in seeds)
    return {t: rw.reweighting_runs(lm, d, profile, seeds=seeds, progress=False) for t, d in data.items()}


def reweighting_gain(model: str, profile: Profile) -> Measured | None:
    runs = _reweighting_runs(model, profile)
    if runs is None:
        return None
    from ..experiments import reweighting as rw

    gain = rw.difference(runs, "anchor", "icl-1")
    icl, anchor = rw.accuracy(runs, "icl-1"), rw.accuracy(runs, "anchor")
    return Measured(gain, unit=" points", digits=1, n_text=f"{gain.n} seeds × 4 tasks",
                    note=f"paired: re-weighting {anchor.fmt(1)}% minus 1-shot ICL {icl.fmt(1)}%, mean of 4 tasks")


def reweighting_vs_controls(model: str, profile: Profile) -> Measured | None:
    runs = _reweighting_runs(model, profile)
    if runs is None:
        return None
    from ..experiments import reweighting as rw

    best = rw.best_control(runs)
    diff = rw.difference(runs, "anchor", best)
    per_task = {t: rw.difference(runs, "anchor", best, task=t) for t in TASK_NAMES}
    ahead = [get_task(t).title for t, e in per_task.items() if e.low > 0]
    behind = [get_task(t).title for t, e in per_task.items() if e.high < 0]
    return Measured(diff, unit=" points", digits=1, n_text=f"{diff.n} seeds × 4 tasks",
                    note=f"paired: re-weighting minus the best control ({rw.METHOD_TITLES.get(best, best)}, chosen on "
                         f"the test examples), mean of 4 tasks; ahead on {', '.join(ahead) or 'no task'}, behind on "
                         f"{', '.join(behind) or 'no task'}, indistinguishable elsewhere")


def diagnosis_trec(model: str, profile: Profile) -> Measured | None:
    """Spearman ρ between predicted (anchor keys, query PCA, M = 10, two thirds of the depth) and real confusion on
    TREC, over the seeds cached; the exact permutation p-value per seed goes into the note and the rule."""
    from ..experiments import diagnosis as dg

    lm = ModelKey.of(model)
    data = load_task("trec")
    cached = {seed: dg.diagnosis_runs(lm, data, profile, seeds=[seed], lookup_only=True)[0] for seed in profile.seeds}
    seeds = [seed for seed, r in cached.items() if r is not None]
    if not seeds:
        return None
    runs = [cached[seed] for seed in seeds]
    n_layers = runs[0]["khat"].shape[0]
    layer = dg.default_layer(n_layers)
    s = dg.summary(runs, layer, 10)
    p = max(s["p"])
    names = TASKS["trec"].class_names
    pair = lambda ij: f"{names[ij[0]]}–{names[ij[1]]}"  # noqa: E731
    pred, real = pair(s["pairs"][0]["predicted"]), pair(s["pairs"][0]["real"])
    return Measured(s["rho"], digits=2, n_text=f"{s['rho'].n} (15 class pairs)",
                    note=f"Spearman ρ over class pairs, layer {layer + 1} of {n_layers}, M = 10; exact permutation "
                         f"p = {p:.3f}; most confused pair predicted {pred}, real {real} (seed {seeds[0]})",
                    support={"p": p})


def compression_loyalty(model: str, profile: Profile) -> Measured | None:
    """Hidden_anchor's label loyalty (% of full-ICL predictions kept), mean of 4 tasks, with the paired difference to
    Hidden_random (one random text token per demonstration kept instead) on the same examples."""
    from ..experiments import compression as cp
    from ..core.stats import mean_estimate, paired_difference

    lm = ModelKey.of(model)
    runs = {t: cp.compression_runs(lm, load_task(t), profile, lookup_only=True) for t in TASK_NAMES}
    if any(r is None for per_seed in runs.values() for r in per_seed):
        return None
    per = [(cp.variant_metrics(r, "anchor"), cp.variant_metrics(r, "random")) for rs in runs.values() for r in rs]
    loyalty = mean_estimate([a["label"] for a, _ in per]).scaled(100)
    vs_random = paired_difference([a["label"] for a, _ in per], [b["label"] for _, b in per]).scaled(100)
    n_seeds = len(next(iter(runs.values())))
    return Measured(loyalty, unit="%", digits=1, n_text=f"{loyalty.n_examples} × {n_seeds} seeds × 4 tasks",
                    note=f"label loyalty of Hidden_anchor (BOS kept), mean of 4 tasks; minus Hidden_random on the same "
                         f"examples: {vs_random.fmt(1)} points",
                    support={"vs random": vs_random})


def compression_speedup(model: str, profile: Profile, batch_size: str = "8") -> Measured | None:
    """Full ICL time / Hidden_anchor time from the committed benchmark (``python -m helpers.cli.bench compression``), mean
    over the 4 tasks of the per-task median; the range is the mean of the per-task min and max over the interleaved
    repetitions (a timing spread, not a bootstrap)."""
    import json

    from ..core.runs import bench_file

    path = bench_file("compression-bench", model)
    if not path.is_file():
        return None
    tasks = json.loads(path.read_text())["tasks"]
    if set(tasks) != set(TASK_NAMES) or any(batch_size not in t for t in tasks.values()):
        return None
    rows = [tasks[t][batch_size] for t in TASK_NAMES]
    ratio = lambda r, k: r["ratios"]["full/anchor"][k]  # noqa: E731
    per_task = np.array([[ratio(r, "median"), ratio(r, "min"), ratio(r, "max")] for r in rows])
    value, low, high = per_task.mean(axis=0)
    est = Estimate(float(value), float(low), float(high), int(rows[0]["n"]), int(rows[0]["reps"]),
                   per_task[:, 0])
    b1 = np.mean([tasks[t]["1"]["ratios"]["full/anchor"]["median"] for t in TASK_NAMES]) if all(
        "1" in tasks[t] for t in TASK_NAMES) else float("nan")
    per = ", ".join(f"{get_task(t).title} {ratio(r, 'median'):.2f}×" for t, r in zip(TASK_NAMES, rows))
    return Measured(est, unit="×", digits=2,
                    n_text=f"{rows[0]['n']} queries × {rows[0]['reps']} repetitions × 4 tasks, CPU",
                    note=f"batch {batch_size} ({per}); batch 1: {b1:.2f}×; range over repetitions, not a bootstrap")


def faster(m: Measured) -> str:
    """Reproduced: even the slowest repetitions are faster than full ICL (low > 1); partly: the median only."""
    return REPRODUCED if m.estimate.low > 1 else PARTLY if m.estimate.value > 1 else NOT_REPRODUCED


def keeps_most(m: Measured) -> str:
    """Reproduced: the interval lies at or above 75% (the paper: 79–89%) and Hidden_anchor keeps significantly more
    predictions than Hidden_random; partly: one of the two; not reproduced otherwise."""
    high_enough = m.estimate.low >= 75
    beats_random = m.support.get("vs random") is not None and m.support["vs random"].low > 0
    return REPRODUCED if high_enough and beats_random else PARTLY if high_enough or beats_random else NOT_REPRODUCED


def confusion_rule(m: Measured) -> str:
    """Reproduced: ρ's interval above 0 and the permutation test significant (p < 0.05) in every seed; partly: ρ's
    interval above 0 (or its point) without significance; not reproduced otherwise."""
    if m.estimate.low > 0 and m.support.get("p", 1.0) < 0.05:
        return REPRODUCED
    return PARTLY if m.estimate.value > 0 else NOT_REPRODUCED


def _meaning_finding(model: str, profile: Profile) -> Measured | None:
    from ..experiments.meaning import abstract_anchor_finding

    return abstract_anchor_finding(model, profile)


def prefix_theorem(model: str, profile: Profile) -> Measured | None:
    """Mean over SST-2 test prompts of the largest first-layer change (over heads and positions) of q's renormalised
    content attention under every trained prefix (all lengths), in units of 1e-6, from the tuning chapter's cached
    runs; anchor re-weighting's in the support. The chapter has its own sizes (``helpers.experiments.tuning.SIZES``)."""
    from ..experiments import tuning as tu
    from ..core.stats import mean_estimate

    config = tu.SIZES["book"]
    methods = [m for m in tu.methods_of(config) if m.startswith("prefix-")] + ["anchor"]
    runs = tu.collect(ModelKey.of(model), load_task("sst2"), config, methods=methods)
    prefixes = [m for m in runs if m.startswith("prefix-")]
    if not prefixes or "anchor" not in runs:
        return None
    seeds = sorted(set.intersection(*(set(runs[m]) for m in prefixes)))
    if not seeds:
        return None
    per_seed = [np.concatenate([runs[m][s]["att_maxdiff"][:, 0].max(-1) for m in prefixes]) for s in seeds]
    est = mean_estimate(per_seed).scaled(1e6)
    anchor = mean_estimate([r["att_maxdiff"][:, 0].max(-1) for _, r in sorted(runs["anchor"].items())]).scaled(1e6)
    support = {"anchor": anchor}
    floor_note = ""
    floors = tu.collect_floor(ModelKey.of(model), load_task("sst2"), config)
    if floors:  # the same statistic with positions shifted by m and nothing added: float error in exact arithmetic
        floor = mean_estimate([r["maxdiff"][:, :, 0].max(-1).max(-1) for _, r in sorted(floors.items())]).scaled(1e6)
        support["floor"] = floor
        floor_note = f"; positions shifted, nothing added (float floor): {floor.fmt(2)} × 1e-6"
    return Measured(est, unit=" × 1e-6", digits=2, support=support,
                    n_text=f"{config.n_attention} prompts × {len(prefixes)} prefix lengths × {est.n_seeds} seeds, SST-2",
                    note=f"largest first-layer change per prompt, prefix lengths {', '.join(p[7:] for p in prefixes)}; "
                         f"anchor re-weighting: {anchor.fmt(0)} × 1e-6{floor_note}")


def float_error(m: Measured) -> str:
    """Reproduced: the prefix's change is float error and re-weighting's is not; partly: only the first; not
    reproduced otherwise. Float error: below 1e-5, or at most twice the float floor (the same statistic with the
    positions shifted as by the prefix and nothing added, which is 0 in exact arithmetic; a model with large
    query/key norms such as Qwen2 has a floor near 1e-4). "Not float error": above 1e-4 and ten times the floor."""
    floor = m.support.get("floor")
    tolerance = max(10.0, 2 * float(floor.high)) if floor is not None else 10.0
    exact = m.estimate.high < tolerance
    anchor = m.support.get("anchor")
    moves = anchor is not None and anchor.low > max(100.0, 10 * tolerance)
    return REPRODUCED if exact and moves else PARTLY if exact else NOT_REPRODUCED


_CHAPTER_FINDINGS = {  # plugged in below, once register() exists
    "prefix-theorem": dict(compute=prefix_theorem, rule=float_error, chapter="book/tuning", anchor="fig-tuning-theorem"),
    "reweighting-gain": dict(compute=reweighting_gain, rule=None, chapter="book/reweighting", anchor=""),
    "reweighting-vs-controls": dict(compute=reweighting_vs_controls, rule=None, chapter="book/reweighting",
                                    anchor=""),
    "compression-speedup": dict(compute=compression_speedup, rule=faster, chapter="book/compression", anchor=""),
    "compression-loyalty": dict(compute=compression_loyalty, rule=keeps_most, chapter="book/compression", anchor=""),
    "diagnosis": dict(compute=diagnosis_trec, rule=confusion_rule, chapter="book/diagnosis", anchor=""),
    "anchors-without-meaning": dict(compute=lambda model, profile: _meaning_finding(model, profile), rule=None,
                                    chapter="book/meaningless-labels", anchor="fig-meaning-iso"),
}


def register(finding_id: str, compute: Callable[[str, Profile], Measured | None],
             rule: Callable[[Measured], str] | None = None, chapter: str | None = None, anchor: str | None = None
             ) -> Finding:
    """Plug a chapter's compute function (and optionally its rule, page and anchor) into a registered finding."""
    if finding_id not in FINDINGS:
        raise KeyError(f"unknown finding {finding_id!r}; known: {', '.join(FINDINGS)}")
    old = FINDINGS[finding_id]
    FINDINGS[finding_id] = replace(old, compute=compute, rule=rule or old.rule or above_zero,
                                   chapter=chapter if chapter is not None else old.chapter,
                                   anchor=anchor if anchor is not None else old.anchor,
                                   planned="" if chapter is not None else old.planned)
    return FINDINGS[finding_id]


def computes(finding_id: str, **kw):
    """Decorator form of :func:`register`."""
    def wrap(fn):
        register(finding_id, fn, **kw)
        return fn

    return wrap


for _id, _kw in _CHAPTER_FINDINGS.items():
    register(_id, _kw["compute"], _kw["rule"], _kw["chapter"], _kw["anchor"])


def evaluate(finding: Finding, model: str, profile: Profile | str = "book") -> tuple[Measured | None, str]:
    """Our measurement of ``finding`` for ``model`` and its verdict ("not yet run" when there is nothing cached)."""
    profile = PROFILES[profile] if isinstance(profile, str) else profile
    if finding.compute is None:
        return None, NOT_YET_RUN
    measured = finding.compute(model, profile)
    if measured is None:
        return None, NOT_YET_RUN
    return measured, (finding.rule or above_zero)(measured)


def verdict_rows(models: Sequence[str] = MODELS, profile: Profile | str = "book") -> list[dict]:
    """One dict per finding: the finding, and per model ``(Measured | None, verdict)``."""
    return [{"finding": f, **{m: evaluate(f, m, profile) for m in models}} for f in FINDINGS.values()]


def to_html(rows: list[dict], models: Sequence[str] = MODELS, link_prefix: str = "") -> str:
    """The verdict table as HTML: each finding links to its section (``link_prefix`` + page + ``.html#`` + anchor)."""
    import html

    colors = {REPRODUCED: "rgba(40,160,60,.22)", PARTLY: "rgba(230,160,0,.25)", NOT_REPRODUCED: "rgba(220,50,50,.22)",
              NOT_YET_RUN: "rgba(128,128,128,.15)"}
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    out = ['<table class="verdicts"><thead><tr><th>finding (paper)</th><th>the paper</th>' + head +
           "</tr></thead><tbody>"]
    for row in rows:
        f: Finding = row["finding"]
        claim = html.escape(f.claim)
        if f.chapter:
            page = f.chapter.split("/")[-1]
            claim = f'<a href="{link_prefix}{page}.html#{f.anchor}">{claim}</a>'
        else:
            claim += f' <em>(planned chapter: {html.escape(f.planned)})</em>'
        cells = []
        for m in models:
            measured, verdict = row[m]
            body = f'<span style="background:{colors[verdict]};padding:0 .3em;border-radius:.2em">{verdict}</span>'
            if measured is not None:
                body = (f"<b>{html.escape(measured.text())}</b><br>{body}<br><small>n = "
                        f"{html.escape(measured.n)}; {html.escape(measured.note)}</small>")
            cells.append(f'<td style="vertical-align:top">{body}</td>')
        out.append(f'<tr><td style="vertical-align:top">{claim} <small>({html.escape(f.where)})</small></td>'
                   f'<td style="vertical-align:top">{html.escape(f.paper)}</td>'
                   + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    text = "\n".join(out)
    for sym in ("S_wp", "S_pq", "S_ww", "R_l"):  # subscripts, as in the chapters
        base, sub = sym.split("_")
        text = text.replace(sym, f"{base}<sub>{sub}</sub>")
    text = text.replace('<table class="verdicts">', '<table class="verdicts" style="vertical-align:top">')
    return f'<div style="overflow-x:auto">{text}</div>'  # a phone scrolls the table instead of clipping it


def summary_counts(rows: list[dict], models: Sequence[str] = MODELS) -> dict[str, dict[str, int]]:
    """How many findings got each verdict, per model."""
    return {m: {v: sum(row[m][1] == v for row in rows) for v in VERDICTS} for m in models}


def landing_figure(model: str = MODELS[0], task: str = "sst2", profile: Profile | str = "book"):
    """A real result for the landing page: S_wp and S_pq per layer on one task, with 95% bands; None if not cached."""
    import matplotlib.pyplot as plt

    from . import plots
    from ..experiments.aggregation import flow_estimate, saliency_runs

    profile = PROFILES[profile] if isinstance(profile, str) else profile
    runs = lookup(saliency_runs, model, task, profile)
    if runs is None:
        return None
    est = flow_estimate(runs)
    layers = np.arange(1, est.value.shape[1] + 1)
    fig, ax = plt.subplots(figsize=(plots.PAGE_WIDTH / 2, 3.2), layout="constrained")
    for i, m in enumerate(("S_wp", "S_pq")):
        ax.plot(layers, est.value[i], color=plots.COLORS[m], label=plots.LABELS[m], marker=".")
        ax.fill_between(layers, est.low[i], est.high[i], color=plots.COLORS[m], alpha=0.2, lw=0)
    ax.set_xticks(plots.layer_ticks(len(layers)))
    ax.set_xlabel("layer")
    ax.set_ylabel("relative size")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=1, frameon=False)
    ax.set_title(f"{model}, {get_task(task).title} (n = {est.n})")
    return fig
