"""The experiments: one module per experiment, each ending with an
:class:`~helpers.experiments.protocol.Experiment` (the one protocol: a frozen config, a cached ``run(lm, data, config,
seed)``, a ``summarise``, and the verdict rows it contributes).

:func:`all_experiments` lists them in the book's order; :func:`get` finds one by name. Modules here import from the
core and from each other (``meaning`` re-runs the analyses of ``aggregation`` and ``extraction``), never from the
book or command-line layers.
"""

from __future__ import annotations

import importlib

__all__ = ["ORDER", "all_experiments", "get"]

# The order of the verdict page's rows (the paper's order: analyses, then applications, then beyond the paper).
ORDER = ("aggregation", "extraction", "reweighting", "compression", "diagnosis", "tuning", "meaning", "taskvectors",
         "heads")


def get(name: str):
    """The :class:`~helpers.experiments.protocol.Experiment` called ``name``."""
    if name not in ORDER:
        raise KeyError(f"unknown experiment {name!r}; choose one of: {', '.join(ORDER)}")
    return importlib.import_module(f"{__name__}.{name}").EXPERIMENT


def all_experiments() -> list:
    """Every experiment, in :data:`ORDER`."""
    return [get(name) for name in ORDER]
