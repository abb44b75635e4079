"""The one shape every experiment has, so the compute command and the verdict page iterate over experiments
instead of naming them.

An :class:`Experiment` is

* ``configure(profile, **options)`` - its **frozen config** for a profile name (``quick``, ``book``, ``paper``),
  with the few options it takes (shots, a sweep, methods, ...); an option it does not take is refused;
* ``seeds(config, model)`` - the seeds it runs for a model;
* ``run(lm, data, config, seed, lookup_only=False)`` - every **cached** result of one (task, seed), as
  ``{part: result}``; in lookup-only mode a missing part is ``None`` and nothing is computed;
* ``findings`` - the verdict rows it contributes (:class:`~helpers.core.findings.Finding`);
* :meth:`Experiment.summarise` - those findings' estimates, with intervals, for one model, from the cache.

Adding an experiment: a module in ``helpers/experiments/`` that ends with ``EXPERIMENT = Experiment(...)``, its
name in :data:`helpers.experiments.ORDER`, a chapter in ``book/``, and its findings appear on the verdict page.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dataclasses import replace

from ..core.findings import NOT_YET_RUN, TASK_NAMES, Finding, Measured, judge
from ..core.runs import PROFILES, Profile
from ..core.stats import pooled_over
from ..core.tasks import TASKS

__all__ = ["Experiment", "evaluate"]


def evaluate(finding: Finding, model: str, profile: Profile | str = "book") -> tuple[Measured | None, str]:
    """Our measurement of ``finding`` for ``model`` and its verdict (:func:`helpers.core.findings.judge`: "not yet
    run" when nothing is cached, "too few seeds", "not testable on this model", or the finding's rule).

    A finding that pools the four tasks is bootstrapped with the seeds drawn within each task
    (:func:`helpers.core.stats.pooled_over`); its number of seeds is per task."""
    profile = PROFILES[profile] if isinstance(profile, str) else profile
    if finding.compute is None:
        return None, NOT_YET_RUN
    blocks = len(TASK_NAMES) if finding.pooled else 1
    with pooled_over(blocks):
        measured = finding.compute(model, profile)
    if measured is None:
        return None, NOT_YET_RUN
    if measured.n_seeds is None and finding.seeded:
        measured = replace(measured, n_seeds=int(measured.estimate.n_seeds) // blocks)
    return measured, judge(finding, measured)


@dataclass(frozen=True)
class Experiment:
    """One experiment of the book (see the module docstring for the protocol)."""

    name: str
    title: str
    chapter: str  # the book page, "book/aggregation"
    configure: Callable[..., object]
    seeds: Callable[[object, str], Sequence[int]]
    run: Callable[..., dict]
    findings: tuple[Finding, ...] = ()
    options: frozenset[str] = frozenset()  # the options ``configure`` takes besides the profile
    tasks: tuple[str, ...] = tuple(TASKS)

    def config(self, profile: str = "book", **options) -> object:
        """:attr:`configure` with the options checked: one this experiment does not use is an error, not ignored."""
        unknown = {k for k, v in options.items() if v is not None} - set(self.options)
        if unknown:
            raise ValueError(f"the {self.name} experiment does not take {', '.join(sorted(unknown))} "
                             f"(it takes: {', '.join(sorted(self.options)) or 'no options'})")
        return self.configure(profile, **{k: v for k, v in options.items() if v is not None})

    def missing(self, lm, data, config, seed: int) -> list[str]:
        """The parts of one (task, seed) that are not cached yet."""
        return [part for part, r in self.run(lm, data, config, seed, lookup_only=True).items() if r is None]

    def summarise(self, model: str, profile: Profile | str = "book") -> dict[str, tuple[Measured | None, str]]:
        """``{finding id: (Measured | None, verdict)}`` for this experiment's findings on ``model``, read from the
        cache (nothing is computed)."""
        return {f.id: evaluate(f, model, profile) for f in self.findings}
