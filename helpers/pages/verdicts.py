"""The verdict page: each finding of the paper, its number, ours per model with its interval, and a verdict.

Everything here **reads cached results only**; nothing is computed from a model. The findings come from the
experiments (each experiment module declares its own, :mod:`helpers.experiments.protocol`); what a finding is, the
shared rules and the words of a verdict are in :mod:`helpers.core.findings`. A finding whose results are missing for
a model shows "not yet run".

A researcher can plug another measurement into a row with :func:`register` (or the :func:`computes` decorator)::

    from helpers.pages.verdicts import computes

    @computes("reweighting-gain")
    def reweighting_gain(model, profile):      # -> Measured | None
        ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import re
from dataclasses import asdict, replace

import numpy as np

from ..core.findings import (NOT_REPRODUCED, NOT_TESTABLE, NOT_YET_RUN, PARTLY, REPRODUCED,  # noqa: F401
                             TASK_NAMES, TOO_FEW_SEEDS, VERDICTS, Finding, Measured, above_zero, barely_matters,
                             lookup, majority, near_point_eight, rule_text, second_half, strongly_lowers)
from ..core.runs import PROFILES, Profile
from ..core.tasks import get_task
from ..experiments import all_experiments
from ..experiments.compression import faster, keeps_most  # noqa: F401  (the rules, for the page and the tests)
from ..experiments.diagnosis import confusion_rule  # noqa: F401
from ..experiments.reweighting import beats_every_control  # noqa: F401
from ..experiments.protocol import evaluate
from . import summaries
from ..experiments.tuning import float_error  # noqa: F401

__all__ = ["Finding", "Measured", "FINDINGS", "VERDICTS", "REPRODUCED", "PARTLY", "NOT_REPRODUCED", "NOT_YET_RUN",
           "register", "computes", "evaluate", "cached_evaluate", "verdict_rows", "lookup", "MODELS", "to_html", "summary_counts",
           "landing_figure",
           # the rules, re-exported for the page's readers (helpers.core.findings and the experiments define them)
           "above_zero", "majority", "strongly_lowers", "barely_matters", "near_point_eight", "second_half", "faster",
           "keeps_most", "confusion_rule", "float_error", "beats_every_control", "TASK_NAMES", "TOO_FEW_SEEDS",
           "NOT_TESTABLE", "verdict_of"]

MODELS = ("gemma-3-270m", "qwen2.5-coder-0.5b")  # the page's columns

# Every experiment's findings, in the experiments' order (helpers.experiments.ORDER).
FINDINGS: dict[str, Finding] = {f.id: f for exp in all_experiments() for f in exp.findings}


def register(finding_id: str, compute: Callable[[str, Profile], Measured | None],
             rule: Callable[[Measured], str] | None = None, chapter: str | None = None, anchor: str | None = None
             ) -> Finding:
    """Plug a compute function (and optionally its rule, page and anchor) into a registered finding."""
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


def cached_evaluate(finding: Finding, model: str, profile: Profile | str = "book") -> tuple[Measured | None, str]:
    """:func:`~helpers.experiments.protocol.evaluate`, computed once: a stored summary
    (:func:`helpers.pages.summaries.summary`) that is recomputed only when a result it reads, or the code that
    computes it, changes. The verdict page, the landing page and each chapter's conclusions read verdicts this way.
    A finding whose compute function lives outside this package (plugged in with :func:`register`) is evaluated
    every time."""
    profile = PROFILES[profile] if isinstance(profile, str) else profile
    compute = finding.compute
    module = getattr(compute, "__module__", "") or ""
    if compute is None or not module.startswith("helpers."):
        return evaluate(finding, model, profile)
    name = f"verdicts/{finding.id}/{_safe(model)}/{_safe(profile.name)}"
    depends = {"profile": asdict(profile), "compute": f"{module}.{compute.__qualname__}",
               "rule": f"{getattr(finding.rule, '__module__', '')}.{getattr(finding.rule, '__qualname__', '')}"}
    return summaries.summary(name, lambda: evaluate(finding, model, profile), depends)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "--", str(text)).strip("-") or "x"


def verdict_rows(models: Sequence[str] = MODELS, profile: Profile | str = "book") -> list[dict]:
    """One dict per finding: the finding, and per model ``(Measured | None, verdict)`` (:func:`cached_evaluate`)."""
    return [{"finding": f, **{m: cached_evaluate(f, m, profile) for m in models}} for f in FINDINGS.values()]


def to_html(rows: list[dict], models: Sequence[str] = MODELS, link_prefix: str = "") -> str:
    """The verdict table as HTML: each finding links to its section (``link_prefix`` + page + ``.html#`` + anchor)."""
    import html

    colors = {REPRODUCED: "rgba(40,160,60,.22)", PARTLY: "rgba(230,160,0,.25)", NOT_REPRODUCED: "rgba(220,50,50,.22)",
              TOO_FEW_SEEDS: "rgba(128,128,128,.15)", NOT_TESTABLE: "rgba(128,128,128,.15)",
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
        rule = rule_text(f.rule)
        if f.needs_mapping:
            rule += " Needs a working mapping: the model's accuracy must lie above chance."
        claim += f'<br><small><b>Rule.</b> {html.escape(rule)}</small>' if rule else ""
        cells = []
        for m in models:
            measured, verdict = row[m]
            body = f'<span style="background:{colors[verdict]};padding:0 .3em;border-radius:.2em">{verdict}</span>'
            if measured is not None:
                per_seed = measured.seed_texts()  # an undefined value says why, not "nan"
                seeds = f"; per seed {' / '.join(per_seed)}" if 1 < len(per_seed) <= 6 else ""
                body = (f"<b>{html.escape(measured.text())}</b><br>{body}<br><small>n = "
                        f"{html.escape(measured.n)}{html.escape(seeds)}; {html.escape(measured.note)}</small>")
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


def verdict_of(finding_id: str, model: str = MODELS[0], profile: Profile | str = "book") -> str:
    """The verdict word of one finding for one model: what the verdict page shows, and what a chapter glues in its
    own conclusion, so the two cannot disagree."""
    return cached_evaluate(FINDINGS[finding_id], model, profile)[1]


def chapter_verdicts(chapter: str, models: Sequence[str] = MODELS, profile: Profile | str = "book") -> dict[str, str]:
    """``{glue name: verdict word}`` for the findings shown in ``chapter`` ("book/reweighting"):
    ``verdict_<finding>`` for the default model and ``verdict_<finding>__<model>`` for each model (names with "_"
    for "-" and "."). A chapter glues these in its conclusions; the verdict page computes the same words."""
    out = {}
    for f in FINDINGS.values():
        if f.chapter != chapter:
            continue
        name = "verdict_" + f.id.replace("-", "_")
        for i, m in enumerate(models):
            word = cached_evaluate(f, m, profile)[1]
            out[f"{name}__{m.replace('-', '_').replace('.', '_')}"] = word
            if i == 0:
                out[name] = word
    return out


def rules_markdown(link_prefix: str = "") -> str:
    """The verdict page's "How a verdict is decided": the common rules, then each finding's own rule, its claim
    linked to the finding's section (``link_prefix`` + page + ``.html#`` + anchor, as :func:`to_html`)."""
    from ..core.findings import MIN_SEEDS
    from ..core.stats import LEVEL, WEAK_LEVEL

    lines = [f"Every rule reads intervals, never a point estimate alone: *reproduced* needs the {LEVEL:.0%} interval "
             "past the finding's threshold; *partly* needs a stated weaker condition, most often the "
             f"{WEAK_LEVEL:.0%} interval of the same bootstrap replicates past that threshold (each rule below says "
             "which). Before any rule, a measurement on fewer than "
             f"{MIN_SEEDS} demonstration sets (seeds) says *{TOO_FEW_SEEDS}*, and a finding that presupposes a "
             "working in-context mapping (abstract labels, diagnosing confusions) says "
             f"*{NOT_TESTABLE}* when the model's accuracy is not above chance (its {LEVEL:.0%} interval). A "
             f"comparison of two interventions also says *{NOT_TESTABLE}* when the side it would call ahead does "
             "not itself work (its rule says when): a difference between two things that do nothing is not a "
             "reproduction.", ""]
    for f in FINDINGS.values():
        page = f.chapter.split("/")[-1] if f.chapter else ""
        # the finding's section, as the table's rows link (a cell's Markdown output is not resolved by the build,
        # so the link is to the built page)
        link = f"[{f.claim}]({link_prefix}{page}.html{'#' + f.anchor if f.anchor else ''})" if page else f.claim
        lines.append(f"- {link}: {rule_text(f.rule)}")
    return "\n".join(lines)


def summary_counts(rows: list[dict], models: Sequence[str] = MODELS) -> dict[str, dict[str, int]]:
    """How many findings got each verdict, per model."""
    return {m: {v: sum(row[m][1] == v for row in rows) for v in VERDICTS} for m in models}


def landing_figure(model: str = MODELS[0], task: str = "sst2", profile: Profile | str = "book"):
    """A real result for the landing page: S_wp and S_pq per layer on one task, with 95% bands; None if not cached."""
    import matplotlib.pyplot as plt

    from . import plots
    from ..experiments.aggregation import flow_estimate, saliency_runs

    profile = PROFILES[profile] if isinstance(profile, str) else profile

    def estimate():
        runs = lookup(saliency_runs, model, task, profile)
        return None if runs is None else flow_estimate(runs)

    est = summaries.summary(f"landing/{_safe(model)}/{task}/{_safe(profile.name)}", estimate,
                            depends={"profile": asdict(profile)})
    if est is None:
        return None
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
