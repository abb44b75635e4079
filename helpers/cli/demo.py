"""Smoke demo: per-layer saliency flow (S_wp, S_pq, S_ww) on a few real SST-2 prompts.

    python -m helpers.cli.demo [--model gemma-3-270m] [--task sst2] [--n 8] [--seed 42]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from .options import positive_int
from ..core.models import DEFAULT_MODEL, load_model
from ..core.prompts import build_prompt
from ..core.saliency import MEASURES, normalise_per_layer, saliency_flow
from ..core.tasks import load_task, sample_demonstrations_per_example, subsample_test


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--n", type=positive_int, default=8, help="test examples (at least 1)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data-dir", default=None, help="data folder (default: $ANCHORS_DATA, else the hub)")
    args = parser.parse_args(argv)

    try:
        data = load_task(args.task, args.data_dir)  # checked before the model loads
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        parser.error(str(err))
    t0 = time.perf_counter()
    lm = load_model(args.model)
    print(f"{lm}  (loaded in {time.perf_counter() - t0:.1f} s)")
    test = subsample_test(data, args.seed)[: args.n]
    demos = sample_demonstrations_per_example(data, len(test), 1, args.seed)
    prompts = [
        build_prompt(data.task, [data.train[j] for j in d], data.test[i], lm.tokenizer, lm.max_length)
        for i, d in zip(test, demos)
    ]
    t0 = time.perf_counter()
    flows = saliency_flow(lm, data.task, prompts, batch_size=4)
    print(f"saliency on {len(prompts)} {data.task.title} prompts in {time.perf_counter() - t0:.1f} s\n")
    norm = normalise_per_layer(flows)
    raw = flows.mean(axis=0)
    print("layer  " + "  ".join(f"{m:>7}" for m in MEASURES) + "   (normalised per layer)   raw: "
          + "  ".join(f"{m:>9}" for m in MEASURES))
    for layer in range(norm.shape[1]):
        lead = MEASURES[int(np.argmax(norm[:2, layer]))]
        print(f"{layer:5d}  " + "  ".join(f"{v:7.3f}" for v in norm[:, layer]) + f"   {lead:>8} leads        "
              + "  ".join(f"{v:9.2e}" for v in raw[:, layer]))
    over = np.nonzero(norm[1] > norm[0])[0]
    print(f"\nS_pq first exceeds S_wp at layer {over[0] if len(over) else 'never'} (0-based) of {norm.shape[1]}.")


if __name__ == "__main__":
    main()
