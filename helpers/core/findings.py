"""What a verdict row is: a finding of the paper, our measurement of it, and the rule that turns the measurement into
a verdict.

Each experiment module (``helpers/experiments/``) declares the findings it contributes (its ``FINDINGS``); the
verdict page (:mod:`helpers.pages.verdicts`) lists them all. A finding's ``compute(model, profile)`` **reads cached
results only** (:func:`lookup`: the experiments' own run functions in lookup-only mode, with a
:class:`~helpers.core.runs.ModelKey` in place of a loaded model) and returns a :class:`Measured`, or ``None`` when
results are missing ("not yet run").

**Verdicts.** A finding's rule is stated in its docstring, and the page prints it beside the row. Every rule is
read off intervals, never off a point estimate alone: *reproduced* needs the 95% interval past the finding's
threshold; *partly* needs a stated weaker condition, most often the 80% interval past it
(:data:`helpers.core.stats.WEAK_LEVEL`); else *not reproduced*. Before any rule: a measurement on fewer than :data:`MIN_SEEDS` demonstration sets says *too few
seeds*; a finding that presupposes a working in-context mapping (abstract labels, diagnosing confusions) says *not
testable on this model* when the model's accuracy on it is not above chance (its 95% interval); a rule comparing
two interventions says it too when the side it would call ahead does not itself work (the rule states when).
Intervals include
the demonstration draw: a hierarchical bootstrap over seeds, then examples (:mod:`helpers.core.stats`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .runs import ModelKey, Profile
from .stats import Estimate
from .tasks import TASKS, load_task

__all__ = ["Finding", "Measured", "REPRODUCED", "PARTLY", "NOT_REPRODUCED", "NOT_YET_RUN", "TOO_FEW_SEEDS",
           "NOT_TESTABLE", "MIN_SEEDS", "VERDICTS", "TASK_NAMES", "rule_text", "judge",
           "lookup", "all_tasks", "pooled_n", "above_zero", "majority", "strongly_lowers", "barely_matters",
           "near_point_eight", "second_half"]

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_YET_RUN = "reproduced", "partly", "not reproduced", "not yet run"
TOO_FEW_SEEDS, NOT_TESTABLE = "too few seeds", "not testable on this model"
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED, TOO_FEW_SEEDS, NOT_TESTABLE, NOT_YET_RUN)
MIN_SEEDS = 3  # demonstration sets a verdict needs
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
    n_seeds: int | None = None  # demonstration sets (seeds) per task behind it; None: not a seeded measurement
    accuracy: object = None  # an Estimate of the model's accuracy (%) where the finding needs a working mapping
    chance: float | None = None  # chance accuracy (%) for that check
    seed_notes: tuple = ()  # per demonstration set: why its value is undefined ("" where it is defined)

    @property
    def n(self) -> str:
        return self.n_text or self.estimate.n

    def seed_values(self) -> list[float]:
        """The statistic per demonstration set (averaged over the tasks when they are pooled), for the page."""
        values = np.asarray(self.estimate.seed_values, dtype=float)
        if values.ndim != 1 or not self.n_seeds or values.size % self.n_seeds:
            return []
        return [float(v) for v in values.reshape(-1, self.n_seeds).mean(0)]

    def seed_texts(self) -> list[str]:
        """:meth:`seed_values` as the page prints them: a value that is undefined says why (from ``seed_notes``,
        e.g. "undefined: SST-2 predicts one class"), never "nan"."""
        out = []
        for i, v in enumerate(self.seed_values()):
            if np.isfinite(v):
                out.append(f"{v:.{self.digits}f}")
            else:
                why = self.seed_notes[i] if i < len(self.seed_notes) and self.seed_notes[i] else ""
                out.append(why or "undefined")
        return out

    def text(self) -> str:
        return f"{self.estimate.fmt(self.digits)}{self.unit}"


@dataclass(frozen=True)
class Finding:
    """One row of the verdict page."""

    id: str
    claim: str  # the paper's claim, one sentence
    paper: str  # the paper's number (or "qualitative, Figure N") as text
    where: str  # paper section / figure / table
    chapter: str | None  # book page without extension ("book/aggregation"); None: a planned chapter
    anchor: str = ""  # a label in that page ("sec-isolation", "fig-flow")
    compute: Callable[[str, Profile], Measured | None] | None = None
    rule: Callable[[Measured], str] | None = None
    planned: str = ""  # the planned chapter's name, when ``chapter`` is None
    needs_mapping: bool = False  # presupposes a working in-context mapping (else "not testable on this model")
    pooled: bool = False  # the estimate pools the four tasks (a list task-major: every seed of a task, then the next)
    seeded: bool = True  # rests on demonstration draws (a benchmark's timing does not)


def rule_text(rule: Callable | None) -> str:
    """A rule's statement, as the page prints it (its docstring, on one line)."""
    return " ".join((getattr(rule, "__doc__", None) or "").split())


def judge(finding: Finding, measured: Measured | None) -> str:
    """The verdict word: "not yet run", "too few seeds", "not testable on this model", or the finding's rule."""
    if measured is None:
        return NOT_YET_RUN
    if measured.n_seeds is not None and measured.n_seeds < MIN_SEEDS:
        return TOO_FEW_SEEDS
    if finding.needs_mapping:
        acc = measured.accuracy
        if acc is None or measured.chance is None or not acc.low > measured.chance:
            return NOT_TESTABLE
    return (finding.rule or above_zero)(measured)


# ----------------------------------------------------------------------------------------------------------------
# Reading cached results
# ----------------------------------------------------------------------------------------------------------------


def lookup(run_function, model: str, task: str, profile: Profile, **kw) -> list | None:
    """The per-seed results of ``run_function`` (e.g. :func:`helpers.experiments.aggregation.isolation_runs`) from
    the cache, or ``None`` if any seed is missing. No model is loaded: only its name keys the cache."""
    lm = ModelKey.of(model)  # float32 on the CPU, as the chapters load it
    data = load_task(task)  # its fingerprint keys the cache
    out = run_function(lm, data, profile, lookup_only=True, **kw)
    return None if any(r is None for r in out) else out


def all_tasks(run_function, model, profile, **kw) -> dict[str, list] | None:
    """:func:`lookup` on every task; ``None`` if any is missing."""
    runs = {t: lookup(run_function, model, t, profile, **kw) for t in TASK_NAMES}
    return None if any(r is None for r in runs.values()) else runs


def pooled_n(e: Estimate) -> str:
    """"n × seeds × 4 tasks" for an estimate pooled over the tasks (its seeds count task-seeds)."""
    return f"{e.n_examples} × {e.n_seeds // len(TASK_NAMES)} seeds × {len(TASK_NAMES)} tasks"


# ----------------------------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------------------------


def _weak(e) -> tuple:
    """The weaker interval (the 95% one where an estimate has none)."""
    return (e.low if e.weak_low is None else e.weak_low), (e.high if e.weak_high is None else e.weak_high)


def above(m: Measured, threshold: float) -> str:
    e = m.estimate
    return REPRODUCED if e.low > threshold else PARTLY if _weak(e)[0] > threshold else NOT_REPRODUCED


def below(m: Measured, threshold: float) -> str:
    e = m.estimate
    return REPRODUCED if e.high < threshold else PARTLY if _weak(e)[1] < threshold else NOT_REPRODUCED


def above_zero(m: Measured) -> str:
    """Reproduced: the 95% interval lies above 0. Partly: only the 80% interval does. Not reproduced otherwise."""
    return above(m, 0.0)


def majority(m: Measured) -> str:
    """Reproduced: the 95% interval lies above 50% (of layers). Partly: only the 80% interval does."""
    return above(m, 50.0)


def strongly_lowers(m: Measured) -> str:
    """Reproduced: the 95% interval of the loyalty lies below 90%. Partly: only the 80% interval does."""
    return below(m, 90.0)


def barely_matters(m: Measured) -> str:
    """Reproduced: the 95% interval of the loyalty lies at or above 90%. Partly: only the 80% interval does."""
    e = m.estimate
    return REPRODUCED if e.low >= 90 else PARTLY if _weak(e)[0] >= 90 else NOT_REPRODUCED


def near_point_eight(m: Measured) -> str:
    """Reproduced: the 95% interval reaches 0.8 and every task's interval lies above 0.5. Partly: the pooled 95%
    interval lies above 0.5 (above chance, short of 0.8). Not reproduced otherwise."""
    e = m.estimate
    every_task_above = all(t.low > 0.5 for t in m.support.values())
    if e.high >= 0.8 and every_task_above:
        return REPRODUCED
    return PARTLY if e.low > 0.5 else NOT_REPRODUCED


def second_half(m: Measured) -> str:
    """Reproduced: R_l at the middle layer (AUCROC averaged over the 4 tasks) has its 95% interval below 0.5, and
    every task's own R_l is determined (its 95% interval stays within [-1.5, 2] at every layer, as in the chapter's
    table; an undetermined task has no layer where it reaches 0.5) and first reaches 0.5 in the second half.
    Partly: only the 80% interval lies below 0.5, or it lies below 0.5 while a task's R_l is undetermined or reaches
    0.5 in the first half. Not reproduced otherwise."""
    e = m.estimate
    mid = m.support["mid"]
    undetermined = list(m.support.get("undetermined", ()))
    early = [t for t, layer in m.support.get("passing", {}).items()
             if t not in undetermined and layer is not None and layer <= mid]
    if e.high < 0.5 and not early and not undetermined:
        return REPRODUCED
    return PARTLY if _weak(e)[1] < 0.5 else NOT_REPRODUCED
