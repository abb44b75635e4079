"""Check that every committed result holds every field its experiment passes to ``cached_run`` as ``expect``.

A field listed in ``expect`` that a committed result lacks makes that result an error when a chapter reads it
(:func:`helpers.core.runs.read_result`), so the lists must hold for every committed result, not only the newest::

    python scripts/check_expected_fields.py            # the committed results (git ls-files results/)
    python scripts/check_expected_fields.py --all      # also the files not (yet) committed, e.g. a running compute

Each result's fields are read from its ``.npz`` (the zip directory only); the expected fields from the experiment's
own lists, with the settings its ``.json`` records where they depend on them (isolation's conditions, re-weighting's
and tuning's method, compression's variants and random draws). Exit status 1 when a result lacks a field.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helpers.experiments import (aggregation, compression, diagnosis, extraction, heads, meaning,  # noqa: E402
                                 reweighting, taskvectors, tuning)
from helpers.experiments.isolation import isolation_fields  # noqa: E402

# experiment folder -> the fields its caller expects, from the run's settings (the lists the modules pass)
EXPECTED = {
    "saliency": lambda s: aggregation.FLOW_FIELDS,
    "saliency-control": lambda s: aggregation.FLOW_FIELDS,
    "saliency-examples": lambda s: aggregation.EXAMPLE_FIELDS,
    "isolation": lambda s: isolation_fields(s["ks"], s["random_ks"]),
    "extraction": lambda s: extraction.FIELDS,
    "diagnosis": lambda s: diagnosis.FIELDS,
    "meaning-attention": lambda s: meaning.ATTENTION_FIELDS,
    "meaning-isolation": lambda s: isolation_fields((s["k"],), ()),
    "meaning-saliency": lambda s: meaning.FLOW_FIELDS,
    "taskvectors": lambda s: taskvectors.FIELDS,
    "heads": lambda s: heads.FIELDS,
    "reweighting": lambda s: reweighting.expected_fields(s["method"]),
    "tuning": lambda s: tuning.expected_fields(s["method"]),
    "compression": lambda s: compression.expected_fields(s["variants"], s["n_random"]),
}


def npz_fields(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as z:
        return {n.removesuffix(".npy") for n in z.namelist()}


def expected_fields(path: Path) -> tuple[str, ...]:
    """The fields the experiment of the result ``path`` expects, with the settings its ``.json`` records."""
    settings = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))["settings"]
    return tuple(EXPECTED[path.parent.name](settings))


def missing_fields(path: Path) -> list[str]:
    """The expected fields the result ``path`` (an ``.npz``) lacks."""
    return sorted(set(expected_fields(path)) - npz_fields(path))


def tracked_files() -> set[Path] | None:
    """The files git tracks under ``results/``; ``None`` outside a git checkout (then every file counts)."""
    try:
        out = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {ROOT / p for p in out.stdout.split()}


def result_files(everything: bool = False) -> list[Path]:
    """The ``.npz`` of the results folders in :data:`EXPECTED`: the committed ones, or (``everything``) all."""
    tracked = None if everything else tracked_files()
    found = sorted(p for exp in EXPECTED for p in (ROOT / "results" / exp).glob("*.npz"))
    return [p for p in found if tracked is None or p in tracked]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="also results git does not track")
    args = parser.parse_args(argv)
    files = result_files(args.all)
    tracked = tracked_files()
    failures = []
    per_experiment: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        per_experiment[path.parent.name].append(path)
        missing = missing_fields(path)
        if missing:
            failures.append(f"{path.relative_to(ROOT)}: lacks {missing}")
    for exp in EXPECTED:
        paths = per_experiment.get(exp, [])
        fields = sorted({f for p in paths for f in expected_fields(p)})
        untracked = sum(tracked is not None and p not in tracked for p in paths)
        extra = f" ({untracked} not committed)" if untracked else ""
        print(f"{exp:18} {len(paths):4} results{extra}, expect {len(fields)} fields: {', '.join(fields)}")
    for line in failures:
        print("MISSING", line)
    print(f"{len(files)} results checked, {len(failures)} lack an expected field")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
