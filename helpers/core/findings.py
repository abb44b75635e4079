"""What a verdict row is: a finding of the paper, our measurement of it, and the rule that turns the measurement into
a verdict.

Each experiment module (``helpers/experiments/``) declares the findings it contributes (its ``FINDINGS``); the
verdict page (:mod:`helpers.pages.verdicts`) lists them all. A finding's ``compute(model, profile)`` **reads cached
results only** (:func:`lookup`: the experiments' own run functions in lookup-only mode, with a
:class:`~helpers.core.runs.ModelKey` in place of a loaded model) and returns a :class:`Measured`, or ``None`` when
results are missing ("not yet run").

**Verdict rules** (stated once, here, and printed on the page). With a 95% interval [low, high]:

* a difference "A > B" is *reproduced* when low > 0, *partly* when only the point estimate is > 0;
* "barely matters" (a loyalty) is *reproduced* when low >= 90%, *partly* when the point is >= 90% or, for the
  random control, when the label words still cost significantly more than random tokens;
* "strongly lowers" (a loyalty) is *reproduced* when high < 90%, *partly* when high < 100%;
* "AUCROC approaches 0.8 in deep layers" is *reproduced* when the interval reaches 0.8 and lies above 0.5 on every
  task, *partly* when the mean over tasks lies above 0.5, *not reproduced* otherwise;
* "R_l rises in the second half" is *reproduced* when R at the middle layer has high < 0.5, *partly* when its point
  is < 0.5.

Experiment-specific rules (speed, loyalty of a compressed cache, a confusion test, a theorem's float floor) live
beside their findings, in the experiment's module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .runs import ModelKey, Profile
from .stats import Estimate
from .tasks import TASKS, load_task

__all__ = ["Finding", "Measured", "REPRODUCED", "PARTLY", "NOT_REPRODUCED", "NOT_YET_RUN", "VERDICTS", "TASK_NAMES",
           "lookup", "all_tasks", "pooled_n", "above_zero", "majority", "strongly_lowers", "barely_matters",
           "near_point_eight", "second_half"]

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_YET_RUN = "reproduced", "partly", "not reproduced", "not yet run"
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_YET_RUN)
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
