"""The speed benchmark of shared-prefix execution (``python -m helpers.cli.bench speed``; see :mod:`helpers.cli.bench`).

The old paths are kept here, only as the benchmark's reference: isolation and extraction with full prompts
(``shared_prefix=False`` of the functions themselves) and saliency with full-vocabulary logits in fixed batches.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..experiments.aggregation import KS, RANDOM_KS
from ..core.attention import Saliency, intervene
from ..experiments.extraction import label_attention
from ..experiments.isolation import run_isolation
from ..core.models import load_model, synchronize
from ..core.prompts import collate, label_head, label_token_ids, target_logits
from ..core.runs import bench_file, make_prompts, write_json
from ..core.saliency import flow_measures, saliency_flow
from ..core.tasks import load_task

__all__ = ["bench_speed", "speed_path", "old_saliency_flow", "TARGETS"]

# The targets: old/new per experiment and task; saliency: new/floor at most 1.15.
TARGETS = {("isolation", "agnews"): 2.0, ("isolation", "sst2"): 1.5, ("extraction", "agnews"): 2.0,
           ("extraction", "sst2"): 1.5}
SALIENCY_FLOOR_TARGET = 1.15


def old_saliency_flow(lm, task, prompts, batch_size: int = 4) -> np.ndarray:
    """The path before issue 12: full-vocabulary logits, batches of ``batch_size`` in input order."""
    ids = list(label_token_ids(task, lm.tokenizer))
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = collate(chunk, lm.tokenizer.pad_token_id)
        hook = Saliency()
        with torch.enable_grad(), intervene(hook):
            logits = target_logits(lm.model, batch)[:, ids]
            loss = F.cross_entropy(logits.float(), batch.labels.to(logits.device), reduction="sum")
        loss.backward()
        mats = hook.per_layer().sum(dim=2).abs().float().cpu()
        for b, p in enumerate(chunk):
            out.append(flow_measures(mats[:, b, : len(p), : len(p)], p))
    return np.stack(out)


def _forward_floor(lm, prompts) -> None:
    """One plain forward pass per prompt at its real length, batch 1, logits at the last token only.

    Isolation's floor is ``n_conditions`` such passes per prompt: timed once and multiplied (the passes are
    identical), which saves the benchmark a third of its time."""
    with torch.no_grad():
        for p in prompts:
            lm.model(input_ids=torch.tensor([p.input_ids], device=lm.device), logits_to_keep=1, use_cache=False)


def _gradient_floor(lm, task, prompts) -> None:
    """Forward plus the backward pass to the input embeddings, per prompt at its real length, batch 1."""
    ids = list(label_token_ids(task, lm.tokenizer))
    emb = lm.model.get_input_embeddings()
    for p in prompts:
        x = emb(torch.tensor([p.input_ids], device=emb.weight.device)).detach().requires_grad_()
        with torch.enable_grad():
            hidden = lm.model.base_model(inputs_embeds=x, use_cache=False).last_hidden_state[:, -1]
            logits = label_head(lm.model, hidden, ids)
            loss = F.cross_entropy(logits, torch.tensor([p.label], device=logits.device))
        loss.backward()


def _time(fn, device="cpu") -> float:
    """Seconds ``fn`` takes, its work on ``device`` finished (see :func:`helpers.core.models.synchronize`)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def _interleaved(modes: dict, reps: int, device="cpu") -> dict[str, list[float]]:
    """Each mode once as warm-up (excluded), then ``reps`` rounds, the order rotating every round; each time taken
    with ``device``'s work finished (:func:`_time`)."""
    names = list(modes)
    for name in names:
        modes[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(_time(modes[name], device))
    return times


def _summary(times: dict[str, list[float]], n: int) -> dict:
    return {name: {"median_s_per_prompt": statistics.median(t) / n, "min_s_per_prompt": min(t) / n,
                   "times_s": t} for name, t in times.items()}


def _ratio(times, a, b) -> dict:
    r = [x / y for x, y in zip(times[a], times[b])]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def bench_task(lm, data, n: int, reps: int, seed: int = 42) -> dict:
    task = data.task
    fixed = make_prompts(lm, data, seed, n, 1, per_example=False)
    own = make_prompts(lm, data, seed, n, 1, per_example=True)
    n_conditions = 1 + 2 * len(KS) + 2 * len(RANDOM_KS)
    out: dict = {"n_prompts": n, "mean_tokens_fixed": float(np.mean([len(p) for p in fixed])),
                 "mean_tokens_saliency": float(np.mean([len(p) for p in own])),
                 "demonstration_tokens": fixed[0].query_start}
    iso_kw = dict(ks=KS, random_ks=RANDOM_KS, seed=seed, batch_size=8, progress=False)
    res: dict = {}
    modes = {
        "new": lambda: res.__setitem__("new", run_isolation(lm, task, fixed, **iso_kw)),
        "old": lambda: res.__setitem__("old", run_isolation(lm, task, fixed, shared_prefix=False, **iso_kw)),
        "floor": lambda: _forward_floor(lm, fixed),  # one pass per prompt; the floor is n_conditions of them
    }
    t = _interleaved(modes, reps, lm.device)
    t["floor"] = [x * n_conditions for x in t["floor"]]
    same = all(np.array_equal(res["new"][k], res["old"][k]) for k in res["old"] if k != "shared_prefix")
    out["isolation"] = {**_summary(t, n), "old/new": _ratio(t, "old", "new"), "new/floor": _ratio(t, "new", "floor"),
                        "old/floor": _ratio(t, "old", "floor"), "conditions": n_conditions,
                        "equal_predictions_and_top10": bool(same),
                        "fallback_prompts": int(n - res["new"]["shared_prefix"].sum())}
    modes = {
        "new": lambda: res.__setitem__("new", label_attention(lm, task, fixed, batch_size=8, progress=False)),
        "old": lambda: res.__setitem__("old", label_attention(lm, task, fixed, batch_size=8, progress=False,
                                                              shared_prefix=False)),
        "floor": lambda: _forward_floor(lm, fixed),
    }
    t = _interleaved(modes, reps, lm.device)
    out["extraction"] = {**_summary(t, n), "old/new": _ratio(t, "old", "new"), "new/floor": _ratio(t, "new", "floor"),
                         "old/floor": _ratio(t, "old", "floor"),
                         "attention_max_rel_diff": _max_rel(res["new"]["attention"], res["old"]["attention"]),
                         "equal_predictions": bool(np.array_equal(res["new"]["pred"], res["old"]["pred"])),
                         "fallback_prompts": int(n - res["new"]["shared_prefix"].sum())}
    modes = {
        "new": lambda: res.__setitem__("new", saliency_flow(lm, task, own, batch_size=4, progress=False)),
        "new-batch1": lambda: res.__setitem__("new1", saliency_flow(lm, task, own, batch_size=1, progress=False)),
        "old": lambda: res.__setitem__("old", old_saliency_flow(lm, task, own, batch_size=4)),
        "floor": lambda: _gradient_floor(lm, task, own),
    }
    t = _interleaved(modes, reps, lm.device)
    out["saliency"] = {**_summary(t, n), "old/new": _ratio(t, "old", "new"), "new/floor": _ratio(t, "new", "floor"),
                       "new-batch1/floor": _ratio(t, "new-batch1", "floor"), "old/floor": _ratio(t, "old", "floor"),
                       "flows_max_rel_diff": _max_rel(res["new"], res["old"])}
    return out


def speed_path(model: str, write: bool = False) -> Path:
    return bench_file("speed-bench", model, write)


def bench_speed(model: str, tasks, n: int, reps: int, out: Path, device=None) -> dict:
    if torch.device(device or "cpu").type == "cpu":  # one CPU thread, as every committed run; not on a GPU
        torch.set_num_threads(1)
    lm = load_model(model, device=device)
    result = {"model": model, "device": str(lm.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.machine(), "cpu_count": os.cpu_count(),
              "note": "CPU shared with other processes; ratios within one process, modes interleaved",
              "targets": {f"{e}/{t}": v for (e, t), v in TARGETS.items()},
              "saliency_floor_target": SALIENCY_FLOOR_TARGET, "tasks": {}}
    for name in tasks:
        t0 = time.perf_counter()
        r = result["tasks"][name] = bench_task(lm, load_task(name), n=n, reps=reps)
        write_json(out, result)
        print(f"{name}: isolation {r['isolation']['old/new']['median']:.2f}x, extraction "
              f"{r['extraction']['old/new']['median']:.2f}x, saliency {r['saliency']['old/new']['median']:.2f}x "
              f"(new/floor {r['saliency']['new/floor']['median']:.2f}); {time.perf_counter() - t0:.0f} s", flush=True)
    return result
