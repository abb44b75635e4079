"""Compute (and cache) a chapter's results ahead of the book build.

    python -m helpers.compute aggregation --profile book --model gemma-3-270m
"""

from __future__ import annotations

import argparse
import time

import torch

from .models import DEFAULT_MODEL, load_model
from .runs import PROFILES
from .tasks import TASKS, load_task


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapter", choices=["aggregation", "extraction", "compression"])
    parser.add_argument("--profile", default="book", choices=sorted(PROFILES))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shots", type=int, nargs="*", default=None,
                        help="shots per class (extraction: default 1 2; compression's sweep: default 1 2 4 8 16)")
    parser.add_argument("--sweep", action="store_true", help="compression: run the shots sweep (instead of Table 2)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    profile = PROFILES[args.profile]
    for name in args.tasks:
        data = load_task(name)
        t0 = time.perf_counter()
        if args.chapter == "aggregation":
            from .aggregation import isolation_runs, saliency_examples, saliency_runs

            saliency_runs(lm, data, profile)
            saliency_examples(lm, data)
            isolation_runs(lm, data, profile)
        elif args.chapter == "compression":
            from .compression import compression_runs, shots_sweep

            if args.sweep:
                shots_sweep(lm, data, profile, shots=args.shots or None)
            else:
                compression_runs(lm, data, profile)
        else:
            from .extraction import extraction_runs

            for shots in args.shots or [1, 2]:
                extraction_runs(lm, data, profile, shots=shots)
        print(f"{args.chapter} {args.model} {name}: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
