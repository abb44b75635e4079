"""The speed benchmark of shared-prefix execution (``python -m helpers.cli.bench speed``; see :mod:`helpers.cli.bench`).

The earlier paths are kept here, only as the benchmark's reference: isolation as it ran before its queries were
sorted by length and its output layer batched (:func:`previous_isolation`), extraction with full prompts
(``shared_prefix=False``) and saliency with full-vocabulary logits in fixed batches. Every path is set beside two
floors: its like-for-like floor (the same batches with no hook: :func:`_isolation_floor`, :func:`_extraction_floor`,
:func:`_gradient_floor`) and its physical floor (its own work's FLOPs, :func:`isolation_flops` and the like, at the
GEMM rate measured in the same rounds on the model's own weight shapes, :class:`helpers.cli.bench.GemmRate`).
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

__all__ = ["bench_speed", "speed_path", "old_saliency_flow", "previous_isolation", "isolation_flops",
           "extraction_flops", "saliency_flops"]



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


def previous_isolation(lm, task, prompts, ks=KS, seed: int = 0, batch_size: int = 8, random_ks=RANDOM_KS,
                       probabilities: bool = False) -> dict[str, np.ndarray]:
    """Isolation as it ran before queries were sorted by length and the output layer batched: the "none" and label
    conditions as suffixes over each condition's prefix in input order, the random control as full prompts, the
    output layer once per batch. The benchmark's and the tests' reference for :func:`run_isolation` (the same
    outputs, ``probabilities`` as there)."""
    from ..core.prefix import build_prefix, split_prompts, suffix_logits
    from ..core.attention import Isolate
    from ..experiments.isolation import TOP_K_STORED, condition_name, isolated_layers, random_positions

    label_ids = list(label_token_ids(task, lm.tokenizer))
    conditions = [("none", "", 0)] + [
        (w, p, k) for k in ks for p in ("first", "last") for w in ("label", "random") if w == "label" or k in random_ks
    ]
    n = len(prompts)
    split = split_prompts(prompts)
    out: dict[str, np.ndarray] = {"gold": np.array([p.label for p in prompts])}

    def store(name, idx, logits):
        logits = logits.float()
        for key, shape in (("pred", ()), ("top", (TOP_K_STORED,))):
            out.setdefault(f"{name}/{key}", np.zeros((n, *shape), dtype=np.int64))
        out[f"{name}/pred"][idx] = logits[:, label_ids].argmax(-1).cpu().numpy()
        top = logits.topk(TOP_K_STORED, dim=-1)
        out[f"{name}/top"][idx] = top.indices.cpu().numpy()
        if probabilities:
            out.setdefault(f"{name}/prob", np.zeros((n, TOP_K_STORED)))
            out.setdefault(f"{name}/label_prob", np.zeros((n, len(label_ids))))
            out[f"{name}/prob"][idx] = (top.values - torch.logsumexp(logits, -1, keepdim=True)).exp().cpu().numpy()
            out[f"{name}/label_prob"][idx] = torch.softmax(logits[:, label_ids], -1).cpu().numpy()

    def full_hooks(what, where, k, chunk, idx):
        if what == "label":
            return [Isolate([p.label_positions for p in chunk], isolated_layers(lm.n_layers, k, where))]
        if what == "random":
            layers = isolated_layers(lm.n_layers, k, where)
            per_example = [random_positions(p, layers, seed, i) for i, p in zip(idx, chunk)]
            return [Isolate({layer: [r[layer] for r in per_example] for layer in layers})]
        return []

    shared = list(split.shared)
    label_positions = list(prompts[shared[0]].label_positions) if shared else []
    for what, where, k in conditions:
        name = "none" if what == "none" else condition_name(what, where, k)
        if what != "random" and shared:
            hooks = [Isolate([label_positions], isolated_layers(lm.n_layers, k, where))] if what == "label" else []
            prefix = build_prefix(lm.model, split.ids, hooks)
            for start in range(0, len(shared), batch_size):
                idx = shared[start : start + batch_size]
                with torch.no_grad():
                    logits = suffix_logits(lm.model, prefix, [split.suffix(prompts[i]) for i in idx],
                                           lm.tokenizer.pad_token_id)
                store(name, idx, logits)
        indices = list(range(n)) if what == "random" else list(split.apart)
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            chunk = [prompts[i] for i in idx]
            with torch.no_grad(), intervene(*full_hooks(what, where, k, chunk, idx)):
                logits = target_logits(lm.model, collate(chunk, lm.tokenizer.pad_token_id))
            store(name, idx, logits)
    flags = np.zeros(n, dtype=np.int64)
    flags[shared] = 1
    out["shared_prefix"] = flags
    return out


def _isolation_floor(lm, task, prompts, ks=KS, random_ks=RANDOM_KS, seed: int = 0, batch_size: int = 8) -> None:
    """Isolation's like-for-like floor: the very passes :func:`run_isolation` makes (each condition's prefix, the
    same length-sorted suffix batches, the random control from the same cut over the plain prefix, one output-layer
    product), with no hook: what isolation costs beyond plain inference."""
    from ..core.prefix import build_prefix, output_logits, split_prompts, suffix_hidden
    from ..experiments.isolation import _by_length, _first_drawn, isolated_layers, random_positions

    split = split_prompts(prompts)
    n_demo, shared, pad = len(split.ids), list(split.shared), lm.tokenizer.pad_token_id
    rows = []
    with torch.no_grad():
        plain = build_prefix(lm.model, split.ids, drop_unreachable=False)
        for k in ks:
            for where in ("first", "last"):
                prefix = build_prefix(lm.model, split.ids)  # the label condition's prefix pass, unhooked
                for idx in _by_length(shared, lambda i: len(prompts[i]), batch_size):
                    rows.append(suffix_hidden(lm.model, prefix, [split.suffix(prompts[i]) for i in idx], pad))
                if k in random_ks:
                    layers = isolated_layers(lm.n_layers, k, where)
                    for idx in _by_length(shared, lambda i: len(prompts[i]), batch_size):
                        cut = min(n_demo, min(_first_drawn(random_positions(prompts[i], layers, seed, i))
                                              for i in idx))
                        rows.append(suffix_hidden(lm.model, plain.truncate(cut), [prompts[i].input_ids[cut:]
                                                                                   for i in idx], pad))
        none = plain.keep(range(n_demo))
        for idx in _by_length(shared, lambda i: len(prompts[i]), batch_size):
            rows.append(suffix_hidden(lm.model, none, [split.suffix(prompts[i]) for i in idx], pad))
        output_logits(lm.model, torch.cat(rows))


def isolation_flops(lm, prompts, ks=KS, random_ks=RANDOM_KS, seed: int = 0) -> float:
    """FLOPs of isolation's own work, no padding: per "none" and label condition the demonstrations once and every
    query's tokens over them; per random condition each example from its own first drawn position on; one
    output-layer row per example and condition (prompts that share their demonstrations)."""
    from ..core.prefix import split_prompts
    from ..experiments.isolation import _first_drawn, isolated_layers, random_positions
    from .floors import forward_flops, head_flops

    split = split_prompts(prompts)
    n_demo = len(split.ids)
    model = lm.model
    per_condition = forward_flops(model, n_demo) + sum(forward_flops(model, len(p) - n_demo, n_demo) for p in prompts)
    n_plain = 1 + 2 * len(ks)
    flops = n_plain * per_condition
    for k in random_ks:
        for where in ("first", "last"):
            layers = isolated_layers(lm.n_layers, k, where)
            for i, p in enumerate(prompts):
                cut = min(n_demo, _first_drawn(random_positions(p, layers, seed, i)))
                flops += forward_flops(model, len(p) - cut, cut)
    return flops + head_flops(model, (n_plain + 2 * len(random_ks)) * len(prompts))


def _extraction_floor(lm, task, prompts, batch_size: int = 8) -> None:
    """Extraction's like-for-like floor: the demonstrations once and the same suffix batches (input order), the
    label words' logits only, with no hook recording attention."""
    from ..core.prefix import build_prefix, split_prompts, suffix_logits

    split = split_prompts(prompts)
    ids = list(label_token_ids(task, lm.tokenizer))
    shared = list(split.shared)
    with torch.no_grad():
        prefix = build_prefix(lm.model, split.ids)
        for start in range(0, len(shared), batch_size):
            idx = shared[start : start + batch_size]
            suffix_logits(lm.model, prefix, [split.suffix(prompts[i]) for i in idx], lm.tokenizer.pad_token_id,
                          label_ids=ids)


def extraction_flops(lm, prompts) -> float:
    """FLOPs of extraction's work: the demonstrations once, every query over them (the label rows of the output
    layer are negligible)."""
    from ..core.prefix import split_prompts
    from .floors import forward_flops

    n_demo = len(split_prompts(prompts).ids)
    return forward_flops(lm.model, n_demo) + sum(forward_flops(lm.model, len(p) - n_demo, n_demo) for p in prompts)


def _gradient_floor(lm, task, prompts, batch_size: int = 4) -> None:
    """Saliency's like-for-like floor: forward plus the backward pass to the input embeddings, on the same
    length-sorted batches as :func:`saliency_flow` (its default token budget), no hook."""
    from ..core.prompts import length_batches

    ids = list(label_token_ids(task, lm.tokenizer))
    emb = lm.model.get_input_embeddings()
    lengths = [len(p) for p in prompts]
    for idx in length_batches(lengths, batch_size * int(np.median(lengths)), batch_size):
        batch = collate([prompts[i] for i in idx], lm.tokenizer.pad_token_id)
        device = emb.weight.device
        x = emb(batch.input_ids.to(device)).detach().requires_grad_()
        with torch.enable_grad():
            hidden = lm.model.base_model(inputs_embeds=x, attention_mask=batch.attention_mask.to(device),
                                         use_cache=False).last_hidden_state
            rows = hidden[torch.arange(len(idx), device=hidden.device), batch.target.to(hidden.device)]
            logits = label_head(lm.model, rows, ids)
            loss = F.cross_entropy(logits, batch.labels.to(logits.device), reduction="sum")
        loss.backward()


def saliency_flops(lm, prompts) -> float:
    """FLOPs of saliency's work: each prompt's forward pass at its real length, and the backward pass to the inputs:
    the weights need no gradient, so each linear layer's product is done once more (for its input's gradient) and
    each attention product twice (for both operands)."""
    from .floors import forward_flops

    parts = [forward_flops(lm.model, len(p), split=True) for p in prompts]
    return sum(2 * linear + 3 * attention for linear, attention in parts)


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


def _series(modes: dict, reps: int, device, gemm, flops: dict[str, float]) -> tuple[dict, dict]:
    """One interleaved series of ``modes`` plus a GEMM round (:class:`helpers.cli.bench.GemmRate`), under the load
    check of :func:`helpers.cli.bench.timed_series`; each mode in ``flops`` gets its physical floor per round."""
    from .floors import timed_series

    t, record = timed_series(lambda: _interleaved({**modes, "gemm": gemm}, reps, device))
    for name, f in flops.items():
        t[f"physical:{name}"] = [gemm.floor_s(f, g) for g in t["gemm"]]
    record["gemm_gflop_per_s"] = [gemm.flops / g / 1e9 for g in t.pop("gemm")]
    return t, record


def bench_task(lm, data, n: int, reps: int, seed: int = 42, gemm=None) -> dict:
    """Every path, its previous version where there is one, its like-for-like floor (the same batches, no hook) and
    its physical floor (its FLOPs at the GEMM rate measured in the same rounds), one series per experiment."""
    from .floors import GemmRate

    gemm = gemm or GemmRate(lm.model)
    task = data.task
    fixed = make_prompts(lm, data, seed, n, 1, per_example=False)
    own = make_prompts(lm, data, seed, n, 1, per_example=True)
    n_conditions = 1 + 2 * len(KS) + 2 * len(RANDOM_KS)
    out: dict = {"n_prompts": n, "mean_tokens_fixed": float(np.mean([len(p) for p in fixed])),
                 "mean_tokens_saliency": float(np.mean([len(p) for p in own])),
                 "demonstration_tokens": fixed[0].query_start}
    iso_kw = dict(ks=KS, random_ks=RANDOM_KS, seed=seed, batch_size=8)
    res: dict = {}
    modes = {
        "new": lambda: res.__setitem__("new", run_isolation(lm, task, fixed, progress=False, **iso_kw)),
        "previous": lambda: res.__setitem__("previous", previous_isolation(lm, task, fixed, **iso_kw)),
        "floor": lambda: _isolation_floor(lm, task, fixed, **iso_kw),
    }
    flops = {"new": isolation_flops(lm, fixed, KS, RANDOM_KS, seed)}
    t, load = _series(modes, reps, lm.device, gemm, flops)
    same = all(np.array_equal(res["new"][k], res["previous"][k]) for k in res["previous"])
    out["isolation"] = {**_summary(t, n), "previous/new": _ratio(t, "previous", "new"),
                        "new/floor": _ratio(t, "new", "floor"), "new/physical": _ratio(t, "new", "physical:new"),
                        "previous/physical": _ratio(t, "previous", "physical:new"),
                        "floor/physical": _ratio(t, "floor", "physical:new"), "gflop": flops["new"] / 1e9,
                        "conditions": n_conditions, "equal_predictions_and_top10": bool(same),
                        "fallback_prompts": int(n - res["new"]["shared_prefix"].sum()), "load": load}
    modes = {
        "new": lambda: res.__setitem__("new", label_attention(lm, task, fixed, batch_size=8, progress=False)),
        "old": lambda: res.__setitem__("old", label_attention(lm, task, fixed, batch_size=8, progress=False,
                                                              shared_prefix=False)),
        "floor": lambda: _extraction_floor(lm, task, fixed, batch_size=8),
    }
    flops = {"new": extraction_flops(lm, fixed)}
    t, load = _series(modes, reps, lm.device, gemm, flops)
    out["extraction"] = {**_summary(t, n), "old/new": _ratio(t, "old", "new"), "new/floor": _ratio(t, "new", "floor"),
                         "new/physical": _ratio(t, "new", "physical:new"),
                         "floor/physical": _ratio(t, "floor", "physical:new"), "gflop": flops["new"] / 1e9,
                         "attention_max_rel_diff": _max_rel(res["new"]["attention"], res["old"]["attention"]),
                         "equal_predictions": bool(np.array_equal(res["new"]["pred"], res["old"]["pred"])),
                         "fallback_prompts": int(n - res["new"]["shared_prefix"].sum()), "load": load}
    modes = {
        "new": lambda: res.__setitem__("new", saliency_flow(lm, task, own, batch_size=4, progress=False)),
        "old": lambda: res.__setitem__("old", old_saliency_flow(lm, task, own, batch_size=4)),
        "floor": lambda: _gradient_floor(lm, task, own, batch_size=4),
    }
    flops = {"new": saliency_flops(lm, own)}
    t, load = _series(modes, reps, lm.device, gemm, flops)
    out["saliency"] = {**_summary(t, n), "old/new": _ratio(t, "old", "new"), "new/floor": _ratio(t, "new", "floor"),
                       "new/physical": _ratio(t, "new", "physical:new"),
                       "floor/physical": _ratio(t, "floor", "physical:new"), "gflop": flops["new"] / 1e9,
                       "flows_max_rel_diff": _max_rel(res["new"], res["old"]), "load": load}
    return out


def speed_path(model: str, write: bool = False) -> Path:
    return bench_file("speed-bench", model, write)


def bench_speed(model: str, tasks, n: int, reps: int, out: Path, device=None) -> dict:
    from .floors import GemmRate, load_average

    if torch.device(device or "cpu").type == "cpu":  # one CPU thread, as every committed run; not on a GPU
        torch.set_num_threads(1)
    datas = {name: load_task(name) for name in tasks}  # checked before the model loads
    lm = load_model(model, device=device)
    gemm = GemmRate(lm.model)
    result = {"model": model, "device": str(lm.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.machine(), "cpu_count": os.cpu_count(), "load_at_start": load_average(),
              "note": "CPU shared with other processes; ratios within one process, modes interleaved; a series "
                      "during which the 1-minute load average moved by more than 1 is discarded and run again",
              "gemm_rows": gemm.rows, "tasks": {}}
    for name in tasks:
        t0 = time.perf_counter()
        r = result["tasks"][name] = bench_task(lm, datas[name], n=n, reps=reps, gemm=gemm)
        write_json(out, result)
        iso, ext, sal = r["isolation"], r["extraction"], r["saliency"]
        print(f"{name}: isolation previous/new {iso['previous/new']['median']:.2f}x, new/floor "
              f"{iso['new/floor']['median']:.2f}, new/physical {iso['new/physical']['median']:.2f}; extraction old/new "
              f"{ext['old/new']['median']:.2f}x, new/physical {ext['new/physical']['median']:.2f}; saliency old/new "
              f"{sal['old/new']['median']:.2f}x, new/floor {sal['new/floor']['median']:.2f}, new/physical "
              f"{sal['new/physical']['median']:.2f}; {time.perf_counter() - t0:.0f} s", flush=True)
    return result
