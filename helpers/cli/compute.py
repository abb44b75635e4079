"""Compute (and cache) a chapter's results ahead of the book build.

    python -m helpers.cli.compute aggregation --profile book --model gemma-3-270m                   # the user cache
    python -m helpers.cli.compute aggregation --profile book --model gemma-3-270m --into-committed  # results/ (maintainers)

Results go to the user cache (``$ANCHORS_RESULTS`` or ``~/.cache/anchors/results``). ``--into-committed`` writes the
repository's committed ``results/`` instead (a source checkout only), to refresh the book's published numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

from ..core.models import DEFAULT_MODEL, load_model
from ..core.runs import PROFILES, REPO_ROOT, RESULTS_ENV
from ..core.tasks import TASKS, load_task


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapter", choices=["aggregation", "extraction", "reweighting", "diagnosis", "compression",
                                            "meaning", "tuning"])
    parser.add_argument("--profile", default="book", choices=sorted(PROFILES))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shots", type=int, nargs="*", default=None,
                        help="shots per class (extraction: default 1 2; compression's sweep: default 1 2 4 8 16)")
    parser.add_argument("--sweep", action="store_true", help="compression: run the shots sweep (instead of Table 2)")
    parser.add_argument("--into-committed", action="store_true",
                        help="write into the repository's committed results/ (maintainers refreshing the book)")
    parser.add_argument("--analyses-tasks", nargs="*", default=None,
                        help="meaning: tasks besides SST-2 that also get isolation and saliency")
    parser.add_argument("--seeds", type=int, nargs="*", default=None,
                        help="only these seeds of the profile (runs are per seed, so processes can split a chapter)")
    parser.add_argument("--methods", nargs="*", default=None,
                        help="tuning: only these methods (icl-1, anchor, prompt-m, prefix-m, pez-m, position-shift-floor), "
                             "in this order")
    args = parser.parse_args(argv)
    if args.into_committed:
        committed = REPO_ROOT / "results"
        if not (REPO_ROOT / "pyproject.toml").is_file() or not committed.is_dir():
            parser.error(f"--into-committed needs a source checkout with a results/ folder (not {committed})")
        os.environ[RESULTS_ENV] = str(committed)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    profile = PROFILES[args.profile]
    if args.chapter == "tuning":  # its own sizes (helpers.experiments.tuning.SIZES), seed-major, one file per method
        from ..experiments.tuning import FLOOR, SIZES, methods_of, shift_floor_run, tuning_run

        config = SIZES[args.profile] if args.profile in SIZES else SIZES["book"]
        for seed in args.seeds or config.seeds:
            for name in args.tasks:
                data = load_task(name)
                for method in args.methods or methods_of(config) + (FLOOR,):
                    t0 = time.perf_counter()
                    if method == FLOOR:  # the float-error floor of the theorem check (positions shifted, nothing added)
                        shift_floor_run(lm, data, config, seed)
                    else:
                        tuning_run(lm, data, config, seed, method)
                    print(f"tuning {args.model} {name} seed {seed} {method}: {time.perf_counter() - t0:.0f} s",
                          flush=True)
        return
    if args.seeds and args.chapter in ("aggregation", "extraction"):
        unknown = set(args.seeds) - set(profile.seeds)
        if unknown:
            parser.error(f"seeds {sorted(unknown)} are not in the {profile.name} profile {profile.seeds}")
        profile = dataclasses.replace(profile, seeds=tuple(args.seeds))  # a run's key does not hold the seed list
    if args.chapter == "meaning":  # importance-major (see helpers.experiments.meaning.compute_chapter); its own sizes
        from dataclasses import replace

        from ..experiments.meaning import CONFIGS, compute_chapter

        config = CONFIGS[args.profile]
        if args.seeds:  # a subset of the seeds (the keys of each seed's runs do not depend on the others)
            config = replace(config, seeds=tuple(args.seeds))
        compute_chapter(lm, {name: load_task(name) for name in args.tasks}, config,
                        analyses_tasks=args.analyses_tasks, log=lambda s: print(s, flush=True))
        return
    if args.chapter == "reweighting":  # seed-major, so that whole seeds finish first
        from ..experiments.reweighting import reweighting_runs, reweighting_seeds

        for seed in args.seeds or reweighting_seeds(profile):
            for name in args.tasks:
                t0 = time.perf_counter()
                reweighting_runs(lm, load_task(name), profile, seeds=[seed])
                print(f"reweighting {args.model} {name} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
        return
    for name in args.tasks:
        data = load_task(name)
        t0 = time.perf_counter()
        if args.chapter == "aggregation":
            from ..experiments.aggregation import isolation_runs, saliency_examples, saliency_runs

            saliency_runs(lm, data, profile)
            saliency_examples(lm, data)
            isolation_runs(lm, data, profile)
        elif args.chapter == "diagnosis":
            from ..experiments.diagnosis import diagnosis_runs

            diagnosis_runs(lm, data, profile, seeds=args.seeds)
        elif args.chapter == "compression":
            from ..experiments.compression import compression_runs, shots_sweep

            if args.sweep:
                shots_sweep(lm, data, profile, shots=args.shots or None)
            else:
                compression_runs(lm, data, profile)
        else:
            from ..experiments.extraction import extraction_runs

            for shots in args.shots or [1, 2]:
                extraction_runs(lm, data, profile, shots=shots)
        print(f"{args.chapter} {args.model} {name}: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
