"""Benchmarks (commands, not tests).

    python -m helpers.cli.bench speed --model gemma-3-270m          # shared-prefix execution vs the old path (issue 12)
    python -m helpers.cli.bench compression --model gemma-3-270m    # how much faster is answering from the anchors?
    python -m helpers.cli.bench forward-cost --model gemma-3-270m   # why batch 1 stays below the token ceiling
    python -m helpers.cli.bench cost                                # recorded CPU cost per chapter (committed results)

``speed``: per experiment (isolation, extraction, saliency) and task, the per-prompt cost of the current path, of
the path before it (isolation: queries in input order, the random control as full prompts, the output layer once
per batch; extraction: full prompts; saliency: full-vocabulary logits in fixed batches of 4 in input order), of its
like-for-like floor (the very same batches with no hook) and its physical floor: the FLOPs of the path's own work
(real tokens, no padding; :func:`forward_flops`) at this machine's matrix-product rate on the model's own weight
shapes, measured in the same rounds (:class:`GemmRate`). Timed in one process on the same prompts, one thread,
repetitions interleaved (the order rotates), a warm-up excluded; median and min over repetitions. The 1-minute load
average is read before and after every series; a series during which it moved by more than 1 is discarded and run
again (:func:`timed_series`). The results of the two paths are compared (predictions and top-10 identical;
attention and saliency to 1e-5 relative). Output: ``results/speed-bench/<model>.json``.

``compression``:

For each task (seed 42, one demonstration per class, the same test examples for every mode) three ways of answering
each query are timed, in one process, one thread, at batch 1 (as the paper's timing) and with batches of 8 queries
(right padding; the cache is shared by the batch):

* ``full`` - the full prompt (demonstrations + query), one plain forward pass per example (the paper's baseline);
* ``anchor`` - Hidden_anchor: only the query, over the compressed cache (formatting + label + added tokens);
* ``prefix`` - only the query, over the *uncompressed* demonstration cache (plain prefix caching, no compression).

The queries are sorted by length before batching. Repetitions are interleaved (the order of the modes rotates,
with a round of :class:`GemmRate` among them for each mode's physical floor), a warm-up pass of every mode is
excluded, the load average is checked around each series as for ``speed``, and each repetition's times give ratios; we report the median and the range over repetitions. The one-off cost of building the
caches (one forward pass over the demonstrations) is timed separately, with the number of queries after which it
pays for itself. The ceiling is the token-count ratio (L_demo + L_x) / L_x of Table 6: what the speed-up would be if
time were proportional to the tokens a forward pass processes. A pass also has a fixed cost (``forward-cost``: time
against length fitted as a + b·T, measured at the start of the run); at batch 1 the attainable ceiling is then
(a + b·L_full) / (a + b·L_x), recorded beside the token ceiling.

``--device cuda`` (``cuda:1``, ``mps``, ...) times every benchmark on that device instead of the CPU: the model is
moved there, the device is synchronised before every clock reading (a GPU's kernels run asynchronously), and the CPU's
threads are left as they are (on the CPU the benchmarks run on one thread). Sizes (``--n``, ``--reps``,
``--batch-sizes``, ...) must be at least 1.

The shots sweep repeats the measurement with 1, 2, 4, 8, 16 demonstrations per class (where the context allows) on
the chosen sweep tasks, with the cache memory of both caches. The output is a small JSON file under
``results/compression-bench/`` that the chapter reads.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .options import device_name, positive_int
from ..experiments.compression import anchor_positions, demonstration_split
from ..core.models import DEFAULT_MODEL, load_model, synchronize
from ..core.prefix import build_prefix, suffix_logits
from ..core.prompts import collate, target_logits
from ..core.runs import bench_file, make_prompts, write_json
from ..core.tasks import TASKS, load_task
from .floors import GemmRate, forward_flops, head_flops, load_average, timed_series

MODES = ("full", "anchor", "prefix")


def _time(fn, device="cpu") -> float:
    """Seconds ``fn`` takes, its work on ``device`` finished (see :func:`helpers.core.models.synchronize`)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def load_for_bench(model: str, device=None):
    """The model on ``device`` (default: the CPU), timed with one CPU thread when it runs on the CPU (as every
    committed benchmark; a GPU's speed does not depend on the CPU's threads, which are then left as they are)."""
    if torch.device(device or "cpu").type == "cpu":
        torch.set_num_threads(1)
    return load_model(model, device=device)


def bench_task(lm, data, shots: int, n: int, reps: int, batch_size: int = 1, seed: int = 42, gemm=None,
               fit: dict | None = None) -> dict:
    """Times of the three modes over the same ``n`` test examples, sorted by length into batches of ``batch_size``
    (right padding), with each mode's physical floor (its FLOPs at the GEMM rate of the same rounds) and, given a
    :func:`forward_times` ``fit``, the ceiling a fixed cost per pass leaves attainable."""
    prompts = make_prompts(lm, data, seed, n, shots, per_example=False)
    prefix_ids, suffixes = demonstration_split(prompts)
    model = lm.model
    device = lm.device
    pad = lm.tokenizer.pad_token_id
    kept = anchor_positions(prompts[0])
    gemm = gemm or GemmRate(model)

    def build():
        full = build_prefix(model, prefix_ids)
        return full, full.keep(kept)

    with torch.no_grad():
        build()  # warm-up
        build_times = []
        for _ in range(3):
            caches = []
            build_times.append(_time(lambda: caches.append(build()), device))
            full_cache, anchor_cache = caches[0]

        def run(mode: str, items) -> None:
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                if mode == "full" and batch_size == 1:
                    model(input_ids=torch.tensor([chunk[0][0].input_ids], device=device), logits_to_keep=1,
                          use_cache=False)
                elif mode == "full":
                    target_logits(model, collate([p for p, _ in chunk], pad))
                else:
                    suffix_logits(model, anchor_cache if mode == "anchor" else full_cache, [s for _, s in chunk], pad)

        items = sorted(zip(prompts, suffixes), key=lambda x: len(x[1]))  # by length: a batch pads to its longest
        for mode in MODES:  # warm-up, excluded
            run(mode, items[:2])

        def series():
            times: dict[str, list[float]] = {m: [] for m in (*MODES, "gemm")}
            for r in range(reps):
                order = (*MODES, "gemm")[r % 4 :] + (*MODES, "gemm")[: r % 4]
                for mode in order:
                    times[mode].append(_time(gemm if mode == "gemm" else (lambda: run(mode, items)), device))
            return times

        times, load = timed_series(series)
    gemm_s = times.pop("gemm")
    kept_n = max(anchor_cache.entries())
    flops = {
        "full": sum(forward_flops(model, len(p)) for p in prompts),
        "anchor": sum(forward_flops(model, len(x), kept_n) for x in suffixes),
        "prefix": sum(forward_flops(model, len(x), len(prefix_ids)) for x in suffixes),
    }
    flops = {m: f + head_flops(model, n) for m, f in flops.items()}
    physical = {m: [gemm.floor_s(f, g) for g in gemm_s] for m, f in flops.items()}

    ratios = {
        "full/anchor": [f / a for f, a in zip(times["full"], times["anchor"])],
        "prefix/anchor": [p / a for p, a in zip(times["prefix"], times["anchor"])],
        "full/prefix": [f / p for f, p in zip(times["full"], times["prefix"])],
    }
    n_special = sum(1 for i in prompts[0].special_positions if i < prompts[0].query_start)
    l_demo = len(prefix_ids) - n_special
    l_x = [len(s) for s in suffixes]
    l_full = [len(p) for p in prompts]
    ceiling = sum(l_full) / sum(l_x)
    build = statistics.median(build_times)
    per_query = {m: statistics.median(t) / n for m, t in times.items()}
    saving = per_query["full"] - per_query["anchor"]
    out = {
        "shots": shots,
        "batch_size": batch_size,
        "n": n,
        "reps": reps,
        "L_demo": l_demo,
        "L_prefix": len(prefix_ids),
        "L_x": float(np.mean(l_x)),
        "L_full": float(np.mean(l_full)),
        "kept": len(kept),
        "ceiling": ceiling,
        "times_s": times,
        "per_query_s": per_query,
        "ratios": {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v} for k, v in ratios.items()},
        "fraction_of_ceiling": statistics.median(ratios["full/anchor"]) / ceiling,
        "gflop": {m: f / 1e9 for m, f in flops.items()},
        "physical_floor_s": physical,
        "ratio_to_physical_floor": {m: statistics.median([t / f for t, f in zip(times[m], physical[m])])
                                    for m in MODES},
        "gemm_gflop_per_s": [gemm.flops / g / 1e9 for g in gemm_s],
        "load": load,
        "cache_build_s": build,
        "break_even_queries": build / saving if saving > 0 else None,
        "cache_bytes": {"full": full_cache.nbytes(), "anchor": anchor_cache.nbytes()},
    }
    if fit is not None:  # a pass costs a + b·T: at batch 1 the attainable speed-up is (a + b·L_full) / (a + b·L_x)
        a = fit["fixed_in_tokens"]
        attainable = (a * n + sum(l_full)) / (a * n + sum(l_x)) if batch_size == 1 else None
        out["attainable_ceiling"] = attainable
        out["fraction_of_attainable"] = (statistics.median(ratios["full/anchor"]) / attainable
                                         if attainable else None)
    return out


def bench_compression(model: str, tasks, n: int, reps: int, sweep_tasks, sweep_shots, sweep_n: int,
                      sweep_reps: int, out: Path, batch_sizes=(1, 8), device=None) -> dict:
    datas = {name: load_task(name) for name in (*tasks, *sweep_tasks)}  # checked before the model loads
    lm = load_for_bench(model, device)
    gemm = GemmRate(lm.model)
    fit, fit_load = timed_series(lambda: forward_times(lm, reps=3))
    result = {
        "load_at_start": load_average(),
        "forward_cost": {**fit, "load": fit_load},
        "model": model,
        "device": str(lm.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "note": "CPU shared with other processes; ratios are taken within one process, modes interleaved; a series "
                "during which the 1-minute load average moved by more than 1 is discarded and run again",
        "tasks": {},
        "sweep": {},
    }
    for name in tasks:
        data = datas[name]
        result["tasks"][name] = {}
        for b in batch_sizes:
            t0 = time.perf_counter()
            r = result["tasks"][name][str(b)] = bench_task(lm, data, shots=1, n=n, reps=reps, batch_size=b, gemm=gemm,
                                                           fit=fit)
            extra = (f", attainable {r['attainable_ceiling']:.2f}x" if r.get("attainable_ceiling") else "")
            print(f"{name} batch {b}: full/anchor {r['ratios']['full/anchor']['median']:.2f}x "
                  f"(ceiling {r['ceiling']:.2f}x{extra}), over physical floor "
                  + ", ".join(f"{m} {v:.2f}" for m, v in r["ratio_to_physical_floor"].items())
                  + f"; {time.perf_counter() - t0:.0f} s", flush=True)
            write_json(out, result)
    for name in sweep_tasks:
        data = datas[name]
        result["sweep"][name] = {}
        for shots in sweep_shots:
            for b in batch_sizes:
                try:
                    r = bench_task(lm, data, shots=shots, n=sweep_n, reps=sweep_reps, batch_size=b, gemm=gemm)
                except ValueError as err:  # longer than the context
                    print(f"{name} {shots} shots skipped: {err}")
                    break
                result["sweep"][name].setdefault(str(shots), {})[str(b)] = r
                print(f"{name} {shots} shots batch {b}: full/anchor {r['ratios']['full/anchor']['median']:.2f}x "
                      f"(ceiling {r['ceiling']:.2f}x)", flush=True)
                write_json(out, result)
    return result


def forward_cost(model: str, lengths=(1, 4, 16, 64, 256), reps: int = 5, out: Path | None = None,
                 device=None) -> dict:
    """Time of one forward pass (batch 1, next-token logits at the last position only) against its length T,
    repetitions interleaved over the lengths, fitted as a + b·T by least squares on the medians.

    ``a / b`` is the fixed cost of a pass in "token equivalents": with it, the best speed-up a query over a short
    cache can reach is (a + b·L_full) / (a + b·L_x), not L_full / L_x.
    """
    lm = load_for_bench(model, device)
    result = {"model": model, "device": str(lm.device), **forward_times(lm, lengths, reps)}
    if out is not None:
        write_json(out, result)
    return result


def forward_times(lm, lengths=(1, 4, 16, 64, 256), reps: int = 5) -> dict:
    """:func:`forward_cost`'s measurement on a loaded model: the times per length and the fit."""
    g = torch.Generator().manual_seed(0)  # the same ids on every device: drawn on the CPU, then moved
    ids = {t: torch.randint(100, 1000, (1, t), generator=g).to(lm.device) for t in lengths}
    times: dict[int, list[float]] = {t: [] for t in lengths}
    with torch.no_grad():
        for t in lengths:  # warm-up
            lm.model(input_ids=ids[t], logits_to_keep=1, use_cache=False)
        for r in range(reps):
            for t in (lengths if r % 2 == 0 else lengths[::-1]):
                times[t].append(_time(lambda: lm.model(input_ids=ids[t], logits_to_keep=1, use_cache=False),
                                      lm.device))
    med = np.array([statistics.median(times[t]) for t in lengths])
    b, a = np.polyfit(np.array(lengths, dtype=float), med, 1)
    return {"lengths": list(lengths), "times_s": {str(t): v for t, v in times.items()},
            "median_s": med.tolist(), "fixed_s": float(a), "per_token_s": float(b), "fixed_in_tokens": float(a / b)}


# Results folders that are not an experiment's own name: the experiment whose chapter reads them.
_FOLDER_EXPERIMENT = {"saliency": "aggregation", "saliency-control": "aggregation", "saliency-examples": "aggregation",
                      "isolation": "aggregation", "meaning-attention": "meaning", "meaning-isolation": "meaning",
                      "meaning-saliency": "meaning"}


def cost_table(folder: Path, speed_bench: Path | None = None) -> list[dict]:
    """The recorded cost of the committed results, per chapter and model: results, how many recorded their cost
    (``cost`` in their ``.json``: wall and CPU seconds of the computation, its threads), and the CPU seconds they
    record. With the speed benchmark's JSON, isolation's CPU after the change (both chapters that run it) is
    estimated from it: the recorded CPU divided by the benchmark's previous/new median for the task (SST-2's where
    the task was not benchmarked); every other result's is its recorded CPU."""
    import json

    from ..experiments import get

    ratios = {}
    if speed_bench is not None and speed_bench.is_file():
        for task, r in json.loads(speed_bench.read_text())["tasks"].items():
            if "previous/new" in r.get("isolation", {}):
                ratios[task] = r["isolation"]["previous/new"]["median"]
    rows: dict[tuple[str, str], dict] = {}
    for path in sorted(folder.glob("*/*.json")):
        if path.parent.name in ("compression-bench", "speed-bench", "summaries"):
            continue
        info = json.loads(path.read_text())
        experiment = _FOLDER_EXPERIMENT.get(path.parent.name, path.parent.name)
        try:
            chapter = get(experiment).chapter
        except KeyError:
            chapter = experiment
        model = info.get("model", {}).get("name", "?") if isinstance(info.get("model"), dict) else str(info.get("model"))
        row = rows.setdefault((chapter, model), {"chapter": chapter, "model": model, "results": 0, "costed": 0,
                                                 "wall_s": 0.0, "cpu_s": 0.0, "cpu_s_after": 0.0})
        row["results"] += 1
        cost = info.get("cost")
        if not cost:
            continue
        row["costed"] += 1
        row["wall_s"] += cost.get("wall_s", 0.0)
        row["cpu_s"] += cost.get("cpu_s", 0.0)
        speed_up = ratios.get(info.get("task"), ratios.get("sst2")) if path.parent.name in ("isolation", "meaning-isolation") else None
        row["cpu_s_after"] += cost.get("cpu_s", 0.0) / speed_up if speed_up else cost.get("cpu_s", 0.0)
    return sorted(rows.values(), key=lambda r: (r["chapter"], r["model"]))


def print_cost_table(rows: list[dict]) -> None:
    print("| chapter | model | results (cost recorded) | CPU min recorded | CPU min after (isolation from the "
          "speed bench) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['chapter']} | {r['model']} | {r['results']} ({r['costed']}) | {r['cpu_s'] / 60:.1f} | "
              f"{r['cpu_s_after'] / 60:.1f} |")


def bench_path(model: str, write: bool = False) -> Path:
    """The benchmark's JSON for ``model``: for reading, the first found in the results folders (the user cache, then
    the committed results); with ``write``, where a new run goes (the user cache, or ``$ANCHORS_RESULTS``)."""
    return bench_file("compression-bench", model, write)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m helpers.cli.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["speed", "compression", "forward-cost", "cost"])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", type=device_name, default=None,
                   help="where the model runs: cpu (the default; timed on one thread), cuda, cuda:1, mps, ...")
    p.add_argument("--tasks", nargs="*", default=list(TASKS))
    p.add_argument("--n", type=positive_int, default=16, help="test examples per task")
    p.add_argument("--reps", type=positive_int, default=5, help="timed repetitions (a warm-up is excluded)")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 8])
    p.add_argument("--sweep-tasks", nargs="*", default=["sst2"])
    p.add_argument("--sweep-shots", type=positive_int, nargs="*", default=[1, 2, 4, 8, 16])
    p.add_argument("--sweep-n", type=positive_int, default=8)
    p.add_argument("--sweep-reps", type=positive_int, default=3)
    p.add_argument("--out", type=Path, default=None)
    return p


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.what in ("speed", "compression"):  # task names checked before anything loads (the data, then the model)
        from ..core.tasks import get_task

        try:
            for name in (*args.tasks, *(args.sweep_tasks if args.what == "compression" else ())):
                get_task(name)
        except ValueError as err:
            p.error(str(err))
        if not args.tasks and not (args.what == "compression" and args.sweep_tasks):
            p.error("--tasks without a value: nothing to benchmark (name at least one task, or leave --tasks out)")
    if args.what == "speed":
        from .speed import bench_speed, speed_path

        tasks = args.tasks if args.tasks != list(TASKS) else ["sst2", "agnews"]
        bench_speed(args.model, tasks, n=args.n, reps=args.reps, out=args.out or speed_path(args.model, write=True),
                    device=args.device)
        return
    if args.what == "cost":
        from ..core.runs import REPO_ROOT
        from .speed import speed_path

        print_cost_table(cost_table(Path(REPO_ROOT) / "results", speed_path(args.model)))
        return
    if args.what == "forward-cost":
        path = args.out or bench_path(args.model, write=True).with_name(f"{args.model.replace('/', '--')}-forward-cost.json")
        r = forward_cost(args.model, reps=args.reps, out=path, device=args.device)
        print(f"fixed {r['fixed_s']:.3f} s + {r['per_token_s'] * 1e3:.2f} ms/token "
              f"(fixed = {r['fixed_in_tokens']:.0f} tokens)")
        return
    bench_compression(args.model, args.tasks, args.n, args.reps, args.sweep_tasks, args.sweep_shots, args.sweep_n,
                      args.sweep_reps, args.out or bench_path(args.model, write=True), tuple(args.batch_sizes),
                      device=args.device)


if __name__ == "__main__":
    main()
