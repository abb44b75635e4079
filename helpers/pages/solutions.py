"""Solutions to the chapters' exercises: one function per exercise, named ``<chapter>_<number>``.

Each solution uses the book's own functions and runs at small sizes by default (a few test examples, one seed, one
task), so that it finishes quickly on the book's models; pass larger sizes to get tighter numbers. Every function
returns the numbers that answer its exercise (a dict of floats or arrays); none of them writes to the results cache.
``lm`` is a loaded model (:func:`helpers.load_model`; ``None`` loads the chapter's model) and ``data`` a task's data
(:func:`helpers.load_task`; ``None`` loads ``task``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Sequence
from unittest import mock

import numpy as np
import torch

from ..core.attention import Hook, Isolate, Record, RecordQK, intervene
from ..core.models import DEFAULT_MODEL, load_model
from ..core.patching import Read, Write
from ..core.prefix import build_prefix, suffix_logits
from ..core.prompts import Prompt, check_prompts, collate, label_token_ids, target_label_logits, target_logits
from ..core.runs import bench_file, make_prompts
from ..core.saliency import saliency_flow
from ..core.tasks import TaskData, load_task
from ..experiments import heads as hd
from ..experiments import taskvectors as tv
from ..experiments import tuning
from ..experiments.aggregation import flow_estimate, flow_gap_estimate, lead_layers
from ..experiments.compression import (anchor_positions, compression_run, demonstration_split, label_agreement,
                                       top_k_jaccard)
from ..experiments.diagnosis import (anchor_projection, default_layer, diagnose, flatten_heads, pair_spearman,
                                     predicted_confusion, predictors, real_confusion)
from ..experiments.extraction import auc_estimates, auc_per_layer, label_attention
from ..experiments.isolation import isolated_layers, label_loyalty, random_positions, word_loyalty
from ..experiments.meaning import regime_data, with_label_words
from ..experiments.reweighting import (LR_GRID, TrainConfig, batch_calibration, class_positions,
                                       contextual_calibration, evaluate, seed_setup, select_lr, train_beta,
                                       variant_positions)

__all__ = [
    "aggregation_1", "aggregation_2", "aggregation_3",
    "compression_1", "compression_2", "compression_3",
    "diagnosis_1", "diagnosis_2", "diagnosis_3",
    "extraction_1", "extraction_2", "extraction_3",
    "meaning_1", "meaning_2", "meaning_3",
    "reweighting_1", "reweighting_2", "reweighting_3", "reweighting_4",
    "taskvectors_1", "taskvectors_2", "taskvectors_3",
    "tuning_1", "tuning_2", "tuning_3",
]

SECOND_MODEL = "qwen2.5-coder-0.5b"


# --------------------------------------------------------------------------------------------------------------------
# Small shared steps
# --------------------------------------------------------------------------------------------------------------------


def _model(lm, name: str = DEFAULT_MODEL):
    return load_model(name) if lm is None else lm


def _task_data(data: TaskData | None, task: str) -> TaskData:
    return load_task(task) if data is None else data


def _answers(lm, prompts: Sequence[Prompt], hooks: Callable[[list[Prompt]], list] | None = None,
             batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class (N,) and top-10 next tokens (N, 10) at each prompt's target, full prompts, with the hooks
    ``hooks(chunk)`` active (one list of hooks per batch, e.g. an :class:`Isolate` with the batch's positions)."""
    preds, tops = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        batch = collate(chunk, lm.tokenizer.pad_token_id)
        active = hooks(chunk) if hooks is not None else []
        with torch.no_grad(), intervene(*active) if active else contextlib.nullcontext():
            logits = target_logits(lm.model, batch).float()
        first = chunk[0]  # each label word's first token, read where the prompt shows it (class order)
        label_ids = [first.input_ids[first.positions_of_class(c)[0]] for c in sorted(set(first.label_classes))]
        preds.append(logits[:, label_ids].argmax(-1).cpu().numpy())
        tops.append(logits.topk(10, dim=-1).indices.cpu().numpy())
    return np.concatenate(preds), np.concatenate(tops)


def _loyalties(pred, top, ref_pred, ref_top) -> dict[str, float]:
    return {"label loyalty": 100 * label_loyalty(pred, ref_pred), "word loyalty@5": 100 * word_loyalty(top, ref_top)}


def _accuracy(logits: np.ndarray, prompts: Sequence[Prompt]) -> float:
    gold = np.array([p.label for p in prompts])
    return float(100 * np.mean(np.asarray(logits).argmax(-1) == gold))


# --------------------------------------------------------------------------------------------------------------------
# Shallow layers gather, deep layers extract (aggregation)
# --------------------------------------------------------------------------------------------------------------------


def aggregation_1(lm=None, data: TaskData | None = None, task: str = "sst2", seed: int = 42, n_test: int = 8,
                  local_layers: Sequence[int] = (6, 7, 8), first_layers: Sequence[int] = (0, 1, 2)) -> dict:
    """Aggregation, exercise 1 (global layers, causally): isolate the label words only in ``local_layers`` (0-based;
    Gemma 3's local layers 7-9) and only in ``first_layers`` (layers 1-3), and compare the loyalties (in %) with the
    un-isolated predictions of the same prompts. Used in: Aggregation (exercise 1)."""
    lm, data = _model(lm), _task_data(data, task)
    prompts = make_prompts(lm, data, seed, n_test)
    ref_pred, ref_top = _answers(lm, prompts)
    out = {}
    for name, layers in (("local layers", local_layers), ("first layers", first_layers)):
        pred, top = _answers(lm, prompts, lambda chunk: [Isolate([p.label_positions for p in chunk], layers)])
        out[name] = _loyalties(pred, top, ref_pred, ref_top)
    return out


def _text_positions(prompt: Prompt, layers: Sequence[int], seed: int, index: int) -> dict[int, list[int]]:
    """As many random positions as label words, drawn per layer from the demonstrations' text tokens only (no label
    word, no formatting token, no BOS), seeded like :func:`helpers.experiments.isolation.random_positions`."""
    candidates = np.array(sorted(i for text in prompt.text_positions for i in text))
    rng = np.random.default_rng([seed, index])
    n = len(prompt.label_positions)
    return {layer: sorted(int(x) for x in rng.choice(candidates, n, replace=False)) for layer in layers}


def aggregation_2(lm=None, data: TaskData | None = None, task: str = "sst2", seed: int = 42, n_test: int = 8,
                  k: int = 5) -> dict:
    """Aggregation, exercise 2 (random control, closer): loyalty (in %) when isolating, in the first ``k`` layers, the
    label words, as many random non-label positions (the chapter's control, formatting tokens included) and as many
    random positions among the demonstrations' text tokens only. Used in: Aggregation (exercise 2)."""
    lm, data = _model(lm), _task_data(data, task)
    prompts = make_prompts(lm, data, seed, n_test)
    layers = isolated_layers(lm.n_layers, k, "first")
    ref_pred, ref_top = _answers(lm, prompts)
    index = {id(p): i for i, p in enumerate(prompts)}

    def drawn(draw):
        def hooks(chunk):
            per_example = [draw(p, layers, seed, index[id(p)]) for p in chunk]
            return [Isolate({layer: [r[layer] for r in per_example] for layer in layers})]
        return hooks

    conditions = {
        "label words": lambda chunk: [Isolate([p.label_positions for p in chunk], layers)],
        "random non-label positions": drawn(random_positions),
        "random text tokens": drawn(_text_positions),
    }
    return {name: _loyalties(*_answers(lm, prompts, hooks), ref_pred, ref_top) for name, hooks in conditions.items()}


def aggregation_3(lm=None, data: TaskData | None = None, task: str = "sst2", seeds: Sequence[int] = (42,),
                  n_test: int = 8, n_boot: int = 200) -> dict:
    """Aggregation, exercise 3 (another model): the saliency flows on Qwen2.5-Coder 0.5B (default) and where
    S_pq leads S_wp: :func:`helpers.experiments.aggregation.lead_layers` (layers from 1; ``flip_backs`` are the
    layers where S_wp leads again after S_pq first led), with the normalised curves (3, L).
    Used in: Aggregation (exercise 3)."""
    lm, data = _model(lm, SECOND_MODEL), _task_data(data, task)
    flows = [saliency_flow(lm, data.task, make_prompts(lm, data, s, n_test, per_example=True), progress=False)
             for s in seeds]
    return {**lead_layers(flow_gap_estimate(flows, n_boot=n_boot)), "curves": flow_estimate(flows, n_boot=n_boot).value}


# --------------------------------------------------------------------------------------------------------------------
# Anchor-only context compression
# --------------------------------------------------------------------------------------------------------------------


def _predictions_over(lm, cache, suffixes, label_ids, batch_size: int = 8, restart_positions: bool = False):
    out = []
    with torch.no_grad():
        for start in range(0, len(suffixes), batch_size):
            logits = suffix_logits(lm.model, cache, suffixes[start : start + batch_size], lm.tokenizer.pad_token_id,
                                   restart_positions=restart_positions, label_ids=label_ids)
            out.append(logits.argmax(-1).cpu().numpy())
    return np.concatenate(out)


def compression_1(lm=None, data: TaskData | None = None, task: str = "sst2", seed: int = 42, n_test: int = 8,
                  ks: Sequence[int] = (0, 1, 2, 4, 8), plot: bool = False) -> dict:
    """Compression, exercise 1 (how much text is enough?): label loyalty (in %, against full ICL) when the cache
    keeps the anchors (formatting, label words, BOS) and the last k text tokens of each demonstration, for every k
    of ``ks``; k = 0 is Hidden_anchor. ``plot``: also draw loyalty against k. Used in: Compression (exercise 1)."""
    lm, data = _model(lm), _task_data(data, task)
    prompts = make_prompts(lm, data, seed, n_test)
    label_ids = list(label_token_ids(data.task, lm.tokenizer))
    prefix_ids, suffixes = demonstration_split(prompts)
    full = build_prefix(lm.model, prefix_ids)
    reference = _predictions_over(lm, full, suffixes, label_ids)
    first = prompts[0]
    loyalty, kept = [], []
    for k in ks:
        positions = set(anchor_positions(first)) | {i for text in first.text_positions for i in text[len(text) - k:]}
        cache = full.keep(sorted(positions))
        loyalty.append(100 * label_agreement(_predictions_over(lm, cache, suffixes, label_ids), reference).mean())
        kept.append(len(positions))
    out = {"k": np.array(ks), "label loyalty": np.array(loyalty), "kept tokens": np.array(kept),
           "demonstration tokens": len(prefix_ids)}
    if plot:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 3))
        ax.plot(out["k"], out["label loyalty"], marker="o")
        ax.set_xlabel("text tokens kept per demonstration (k)")
        ax.set_ylabel("label loyalty (%)")
        out["figure"] = fig
    return out


def compression_2(bench: dict | str | None = None, model: str = DEFAULT_MODEL) -> dict:
    """Compression, exercise 2 (where batching stops paying): from the output of ``python -m helpers.cli.bench
    compression`` (a dict, the path of its JSON, or ``None`` for the one the chapter reads), each task's measured
    speed-up over its token-count ceiling per batch size, and the batch size that comes closest to the ceiling.
    Used in: Compression (exercise 2)."""
    if not isinstance(bench, dict):
        bench = json.loads(open(bench or bench_file("compression-bench", model), encoding="utf-8").read())
    out = {}
    for task, by_batch in bench["tasks"].items():
        fraction = {int(b): float(r["fraction_of_ceiling"]) for b, r in by_batch.items()}
        out[task] = {"fraction of ceiling": fraction, "closest": max(fraction, key=fraction.get)}
    return out


def compression_3(lm=None, data: TaskData | None = None, task: str = "sst2", seed: int = 42,
                  n_test: int = 8) -> dict:
    """Compression, exercise 3 (the official GPT-2 position quirk): label and word loyalty (in %) of full ICL and
    Hidden_anchor with the query's position ids restarting at 0, against full ICL with the positions the full prompt
    has; the continued-position Hidden_anchor beside them. Used in: Compression (exercise 3)."""
    lm, data = _model(lm), _task_data(data, task)
    prompts = make_prompts(lm, data, seed, n_test)
    runs = {restart: compression_run(lm, data.task, prompts, seed=seed, variants=("full", "anchor"), progress=False,
                                     restart_positions=restart, label_logits=False) for restart in (False, True)}
    ref = runs[False]
    out = {}
    for restart, run in runs.items():
        for variant in ("full", "anchor"):
            if variant == "full" and not restart:
                continue
            name = f"{variant}, positions {'restarted' if restart else 'continued'}"
            out[name] = {"label loyalty": 100 * label_agreement(run[f"{variant}/pred"], ref["full/pred"]).mean(),
                         "word loyalty@5": 100 * top_k_jaccard(run[f"{variant}/top"], ref["full/top"]).mean()}
    return out


# --------------------------------------------------------------------------------------------------------------------
# Diagnosing confusions
# --------------------------------------------------------------------------------------------------------------------


def _newline_positions(prompt: Prompt, n_classes: int) -> list[int]:
    """Per class (in class order), the first formatting token after that class's label word: the newline that ends
    its demonstration."""
    out = []
    for c in range(n_classes):
        d = prompt.label_classes.index(c)
        end = prompt.label_spans[d][1]
        out.append(min(f for f in prompt.format_positions if f >= end))
    return out


def _agreement_per_layer(queries: np.ndarray, keys: np.ndarray, n_heads: int, real: np.ndarray, m: int) -> np.ndarray:
    """Spearman's ρ between the k̂ distances of ``keys`` (L, C, H_kv, D) and ``real`` at every layer."""
    flat = flatten_heads(keys, n_heads)
    return np.array([pair_spearman(predicted_confusion(anchor_projection(queries[:, layer], flat[layer], m)["khat"]),
                                   real) for layer in range(len(flat))])


def diagnosis_1(lm=None, data: TaskData | None = None, task: str = "trec", seed: int = 42, n_test: int = 32,
                m: int = 10, batch_size: int = 8) -> dict:
    """Diagnosis, exercise 1 (another anchor): Spearman's ρ per layer between the real confusion (pairwise AUC) and
    the distances of the keys at the label words (the paper's anchor) and at the newline after each label word,
    both seen from the same target queries (M = ``m`` principal directions); ``layer`` is the chapter's layer
    (0-based). Used in: Diagnosis (exercise 1)."""
    lm, data = _model(lm), _task_data(data, task)
    n_classes = data.task.n_classes
    prompts = make_prompts(lm, data, seed, n_test)
    label_ids = list(label_token_ids(data.task, lm.tokenizer))
    queries, probs, keys = [], [], {"label words": None, "newlines": None}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = collate(chunk, lm.tokenizer.pad_token_id)
        hooks = {"label words": RecordQK(batch.target, batch.label_positions()),
                 "newlines": RecordQK(batch.target, torch.tensor([_newline_positions(p, n_classes) for p in chunk]))}
        with torch.no_grad(), intervene(*hooks.values()):
            logits = target_label_logits(lm.model, batch, label_ids)
        probs.append(torch.softmax(logits, -1).cpu().numpy())
        layers = sorted(hooks["label words"].queries)
        queries.append(torch.stack([hooks["label words"].queries[l] for l in layers], 1).flatten(2).numpy())
        for name, hook in hooks.items():  # the demonstrations are shared: the first prompt's keys are every prompt's
            if keys[name] is None:
                keys[name] = torch.stack([hook.keys[l][0] for l in layers]).numpy()
    queries, probs = np.concatenate(queries), np.concatenate(probs)
    real = real_confusion(probs, np.array([p.label for p in prompts]), n_classes)
    m = min(m, len(prompts) - 1)
    rho = {name: _agreement_per_layer(queries, k, lm.n_heads, real, m) for name, k in keys.items()}
    layer = default_layer(lm.n_layers)
    return {"layer": layer, "rho per layer": rho, "rho": {name: float(r[layer]) for name, r in rho.items()}}


def diagnosis_2(lm=None, data: TaskData | None = None, task: str = "trec", seeds: Sequence[int] = (42, 43, 44),
                n_test: int = 32, m: int = 10) -> dict:
    """Diagnosis, exercise 2 (other demonstrations): Spearman's ρ between predicted and real confusion at the
    chapter's layer for each seed (each seed draws other demonstrations) on Qwen2.5-Coder 0.5B (default), and its
    spread over the seeds; run it with ``lm`` = Gemma to compare. Used in: Diagnosis (exercise 2)."""
    lm, data = _model(lm, SECOND_MODEL), _task_data(data, task)
    layer, m = default_layer(lm.n_layers), min(m, n_test - 1)
    rho = {}
    for seed in seeds:
        result = diagnose(lm, data.task, make_prompts(lm, data, seed, n_test), progress=False)
        predicted = predictors(result, layer, m)["anchor keys, query PCA"]
        rho[seed] = pair_spearman(predicted, real_confusion(result["probs"], result["gold"], data.task.n_classes))
    values = np.array(list(rho.values()))
    return {"rho": rho, "spread": float(np.nanmax(values) - np.nanmin(values)), "layer": layer}


def diagnosis_3(lm=None, data: TaskData | None = None, task: str = "trec", seed: int = 42, n_test: int = 32,
                m: int = 10) -> dict:
    """Diagnosis, exercise 3 (another real confusion): Spearman's ρ of the anchor-key distances at the chapter's
    layer with the pairwise AUC and with the prediction confusion matrix's off-diagonal rates (how often gold i is
    predicted as j, averaged with j as i; one minus that, so that small means confused for both).
    Used in: Diagnosis (exercise 3)."""
    lm, data = _model(lm), _task_data(data, task)
    n_classes = data.task.n_classes
    result = diagnose(lm, data.task, make_prompts(lm, data, seed, n_test), progress=False)
    layer, m = default_layer(lm.n_layers), min(m, n_test - 1)
    predicted = predictors(result, layer, m)["anchor keys, query PCA"]
    gold, pred = result["gold"], result["pred"]
    counts = np.zeros((n_classes, n_classes))
    np.add.at(counts, (gold, pred), 1)
    with np.errstate(invalid="ignore"):
        rates = counts / counts.sum(1, keepdims=True)  # row i: how gold class i is predicted (NaN: no example)
    confused = 1 - (rates + rates.T) / 2
    return {"rho, pairwise AUC": pair_spearman(predicted, real_confusion(result["probs"], gold, n_classes)),
            "rho, confusion rates": pair_spearman(predicted, confused), "confusion rates": rates, "layer": layer}


# --------------------------------------------------------------------------------------------------------------------
# Deep layers extract (extraction)
# --------------------------------------------------------------------------------------------------------------------


def _attention_runs(lm, data: TaskData, seeds: Sequence[int], n_test: int) -> list[dict]:
    return [label_attention(lm, data.task, make_prompts(lm, data, s, n_test), progress=False) for s in seeds]


def extraction_1(lm=None, data: TaskData | None = None, task: str = "sst2", seeds: Sequence[int] = (42,),
                 n_test: int = 16, n_boot: int = 200) -> dict:
    """Extraction, exercise 1 (sink-free scoring for every task): AUCROC_l on Qwen2.5-Coder 0.5B (default) scored
    with the official a_2 and with the renormalised a_2 / (a_1 + a_2), as :class:`~helpers.core.stats.Estimate`
    curves (L,) with their intervals. Used in: Extraction (exercise 1)."""
    lm, data = _model(lm, SECOND_MODEL), _task_data(data, task)
    runs = _attention_runs(lm, data, seeds, n_test)
    return {"official": auc_estimates(runs, n_boot=n_boot)[0],
            "renormalised": auc_estimates(runs, n_boot=n_boot, renormalise_binary=True)[0]}


def extraction_2(lm=None, data: TaskData | None = None, task: str = "sst2", seeds: Sequence[int] = (42,),
                 n_test: int = 16) -> dict:
    """Extraction, exercise 2 (gold instead of prediction): AUCROC_l (L,) of the target's attention to the label
    words against the model's prediction and against the gold label (mean over seeds), and the accuracy (in %).
    Used in: Extraction (exercise 2)."""
    lm, data = _model(lm), _task_data(data, task)
    runs = _attention_runs(lm, data, seeds, n_test)
    with np.errstate(all="ignore"):
        return {"prediction": np.nanmean([auc_per_layer(r["attention"], r["pred"]) for r in runs], axis=0),
                "gold": np.nanmean([auc_per_layer(r["attention"], r["gold"]) for r in runs], axis=0),
                "accuracy": float(100 * np.mean([np.mean(r["pred"] == r["gold"]) for r in runs]))}


def extraction_3(lm=None, data: TaskData | None = None, task: str = "sst2", seed: int = 42, n_test: int = 16,
                 top: int = 5, batch_size: int = 8) -> dict:
    """Extraction, exercise 3 (heads): AUCROC of each head's attention from q to the label words against the
    prediction, (L, H), and the ``top`` heads as (layer from 1, head from 0, AUC). Used in: Extraction (exercise 3)."""
    lm, data = _model(lm), _task_data(data, task)
    n_classes = data.task.n_classes
    prompts = make_prompts(lm, data, seed, n_test)
    label_ids = list(label_token_ids(data.task, lm.tokenizer))
    per_head, preds = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = collate(chunk, lm.tokenizer.pad_token_id)
        record = Record(rows=batch.target)
        with torch.no_grad(), intervene(record):
            preds.append(target_label_logits(lm.model, batch, label_ids).argmax(-1).cpu().numpy())
        rows = record.stacked()[:, :, :, 0, :].float().cpu()  # (L, B, H, S)
        for b, p in enumerate(chunk):  # (L, H, C): each head's attention on each class's label words
            per_head.append(torch.stack([rows[:, b, :, list(p.positions_of_class(c))].sum(-1)
                                         for c in range(n_classes)], -1).numpy())
    att = np.stack(per_head)  # (N, L, H, C)
    n, n_layers, n_heads, _ = att.shape
    auc = auc_per_layer(att.reshape(n, n_layers * n_heads, n_classes), np.concatenate(preds))
    auc = auc.reshape(n_layers, n_heads)
    order = np.argsort(np.nan_to_num(auc, nan=-1.0), axis=None)[::-1][:top]
    best = [(int(i // n_heads) + 1, int(i % n_heads), float(auc.flat[i])) for i in order]
    return {"auc": auc, "top": best}


# --------------------------------------------------------------------------------------------------------------------
# Anchors without meaning
# --------------------------------------------------------------------------------------------------------------------


def _prediction_shares(lm, data: TaskData, seed: int, n_test: int, shots: int = 1) -> dict:
    run = label_attention(lm, data.task, make_prompts(lm, data, seed, n_test, shots), progress=False)
    shares = np.bincount(run["pred"], minlength=data.task.n_classes) / len(run["pred"])
    return {"prediction shares": shares, "mean probability": run["probs"].mean(0),
            "accuracy": float(100 * np.mean(run["pred"] == run["gold"]))}


def meaning_1(lm=None, data: TaskData | None = None, task: str = "sst2", seed: int = 42, n_test: int = 16,
              shots: Sequence[int] = (1, 8)) -> dict:
    """Meaningless labels, exercise 1 (eight per class): with the abstract words (" A", " B") and 1 or 8
    demonstrations per class, the share of the test examples predicted as each word, the mean label
    probabilities and the accuracy (in %); the same runs as ``meaning.attention_runs``, not cached.
    Used in: Anchors without meaning (exercise 1)."""
    lm, data = _model(lm), _task_data(data, task)
    abstract = regime_data(data, "abstract")
    return {k: _prediction_shares(lm, abstract, seed, n_test, k) for k in shots}


def meaning_2(lm=None, data: TaskData | None = None, task: str = "sst2", seed: int = 42, n_test: int = 16,
              words: Sequence[str] = (" foo", " bar")) -> dict:
    """Meaningless labels, exercise 2 (other neutral words): whether each of ``words`` is a single token after the
    label prefix, and the prediction shares (the prior for the first word) with the abstract words and with
    ``words``. Used in: Anchors without meaning (exercise 2)."""
    lm, data = _model(lm), _task_data(data, task)
    neutral = with_label_words(data.task, words, "foobar")
    ids = label_token_ids(neutral, lm.tokenizer)  # raises if two words share their first token
    prefix_len = len(lm.tokenizer(f"{neutral.label_prefix}:", add_special_tokens=False)["input_ids"])
    single = {w: len(lm.tokenizer(f"{neutral.label_prefix}:{w}", add_special_tokens=False)["input_ids"])
              == prefix_len + 1 for w in words}
    regimes = {"abstract": regime_data(data, "abstract"),
               "neutral": TaskData(neutral, data.train, data.test, f"{data.source} [{neutral.name}]")}
    return {"single token": single, "token ids": ids,
            **{name: _prediction_shares(lm, d, seed, n_test) for name, d in regimes.items()}}


def meaning_3(lm=None, data: TaskData | None = None, task: str = "sst2", regime: str = "abstract",
              seeds: Sequence[int] = (42,), n_test: int = 16) -> dict:
    """Meaningless labels, exercise 3 (calibrated predictions): AUCROC_l (L,) against the raw prediction and against
    the prediction after subtracting, per seed, each class's mean log-probability, with how many classes each
    predicts. Used in: Anchors without meaning (exercise 3)."""
    lm, data = _model(lm), _task_data(data, task)
    runs = _attention_runs(lm, regime_data(data, regime), seeds, n_test)
    raw, calibrated, n_raw, n_cal = [], [], [], []
    for r in runs:
        log_p = np.log(r["probs"])
        pred = (log_p - log_p.mean(0)).argmax(-1)
        raw.append(auc_per_layer(r["attention"], r["pred"]))
        calibrated.append(auc_per_layer(r["attention"], pred))
        n_raw.append(len(np.unique(r["pred"])))
        n_cal.append(len(np.unique(pred)))
    with np.errstate(all="ignore"):
        return {"raw": np.nanmean(raw, 0), "calibrated": np.nanmean(calibrated, 0),
                "classes predicted, raw": n_raw, "classes predicted, calibrated": n_cal}


# --------------------------------------------------------------------------------------------------------------------
# Anchor re-weighting
# --------------------------------------------------------------------------------------------------------------------


def _trained_accuracy(lm, task, setup, where, seed: int, config: TrainConfig,
                      layers=None) -> tuple[float, torch.Tensor]:
    """Test accuracy (in %) of β trained on the seed's training prompts at ``where`` (in ``layers``), and β."""
    trained = train_beta(lm, task, setup.train_prompts, where, seed, config, progress=False, layers=layers)
    beta = torch.from_numpy(trained["beta"]).to(lm.device)
    return _accuracy(evaluate(lm, task, setup.test_prompts, beta, where, progress=False), setup.test_prompts), beta


def reweighting_1(lm=None, data: TaskData | None = None, task: str = "sst2", seed: int = 42, n_test: int = 16,
                  config: TrainConfig = TrainConfig()) -> dict:
    """Re-weighting, exercise 1 (where does the gain live?): test accuracy (in %) of 1-shot ICL, of β trained in
    every layer and of β trained only in the last third of the layers (the other rows held at 0, i.e. their
    gradient zeroed: ``train_beta(..., layers=...)``). Used in: Re-weighting (exercise 1)."""
    lm, data = _model(lm), _task_data(data, task)
    s = seed_setup(lm, data, seed, n_test, config)
    where = lambda p: class_positions(p, data.task.n_classes)  # noqa: E731
    last = range(lm.n_layers - max(1, lm.n_layers // 3), lm.n_layers)
    icl = _accuracy(evaluate(lm, data.task, s.test_prompts, progress=False), s.test_prompts)
    return {"icl-1": icl, "beta, every layer": _trained_accuracy(lm, data.task, s, where, seed, config)[0],
            "beta, last third": _trained_accuracy(lm, data.task, s, where, seed, config, layers=last)[0],
            "last-third layers (1-based)": [layer + 1 for layer in last]}


def reweighting_2(lm=None, data: TaskData | None = None, task: str = "sst2", seed: int = 42, n_test: int = 16,
                  config: TrainConfig = TrainConfig()) -> dict:
    """Re-weighting, exercise 2 (are the corrections additive?): test accuracy (in %) of 1-shot ICL and of
    re-weighting, each alone, with batch calibration and with contextual calibration (its content-free query run
    with the same β). Used in: Re-weighting (exercise 2)."""
    lm, data = _model(lm), _task_data(data, task)
    s = seed_setup(lm, data, seed, n_test, config)
    where = lambda p: class_positions(p, data.task.n_classes)  # noqa: E731
    _, beta = _trained_accuracy(lm, data.task, s, where, seed, config)
    out = {}
    for name, b in (("icl-1", None), ("re-weighting", beta)):
        kw = {} if b is None else {"beta": b, "positions": where}
        logits = evaluate(lm, data.task, s.test_prompts, progress=False, **kw)
        cf = evaluate(lm, data.task, [s.content_free], progress=False, **kw)[0]
        out[name] = _accuracy(logits, s.test_prompts)
        out[f"{name} + batch calibration"] = _accuracy(batch_calibration(logits), s.test_prompts)
        out[f"{name} + contextual calibration"] = _accuracy(contextual_calibration(logits, cf), s.test_prompts)
    return out


def reweighting_3(lm=None, data: TaskData | None = None, task: str = "trec", seed: int = 42, n_test: int = 16,
                  extra: Sequence[int] = (4, 8), config: TrainConfig = TrainConfig()) -> dict:
    """Re-weighting, exercise 3 (TREC): for each number of extra training examples per class, the test accuracy
    (in %) of 1-shot ICL and of re-weighting, and the class counts of the test subset beside those of the
    (balanced) training examples. Used in: Re-weighting (exercise 3)."""
    lm, data = _model(lm), _task_data(data, task)
    n_classes = data.task.n_classes
    where = lambda p: class_positions(p, n_classes)  # noqa: E731
    out = {}
    for e in extra:
        cfg = dataclasses.replace(config, extra_per_class=e)
        s = seed_setup(lm, data, seed, n_test, cfg)
        out[e] = {"icl-1": _accuracy(evaluate(lm, data.task, s.test_prompts, progress=False), s.test_prompts),
                  "re-weighting": _trained_accuracy(lm, data.task, s, where, seed, cfg)[0],
                  "test classes": np.bincount([p.label for p in s.test_prompts], minlength=n_classes),
                  "training classes": np.bincount([p.label for p in s.train_prompts], minlength=n_classes)}
    return out


def reweighting_4(lm=None, data: TaskData | None = None, task: str = "sst2", seed: int = 42, n_test: int = 16,
                  larger: float = 1.0, config: TrainConfig = TrainConfig()) -> dict:
    """Re-weighting, exercise 4 (the edge of the grid): with ``larger`` added to the learning-rate grid, the rate
    the held-out search chooses for β at the label words and at random positions, and their test accuracies (in %)
    at that rate. Used in: Re-weighting (exercise 4)."""
    lm, data = _model(lm), _task_data(data, task)
    s = seed_setup(lm, data, seed, n_test, config)
    grid = tuple(LR_GRID) + (larger,)
    out = {"grid": grid}
    for method in ("anchor", "random"):
        where = variant_positions(method, data.task.n_classes, seed)
        lr = float(select_lr(lm, data.task, s.train_prompts, where, seed, config=config, grid=grid,
                             progress=False)["lr"])
        out[method] = {"lr": lr, "accuracy": _trained_accuracy(lm, data.task, s, where, seed,
                                                               dataclasses.replace(config, lr=lr))[0]}
    out["anchor minus random"] = out["anchor"]["accuracy"] - out["random"]["accuracy"]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Tuning the context or the anchors
# --------------------------------------------------------------------------------------------------------------------


class _PrefixOnlyIn(Hook):
    """Hide the cached prefix's keys (the key columns before the query rows) in every layer but ``keep``: the prefix
    then exists in that layer alone. A forward pass without a cache is left as it is."""

    def __init__(self, keep: int, n_layers: int):
        super().__init__([layer for layer in range(n_layers) if layer != keep])

    def pre_softmax(self, layer, scores):
        offset = scores.shape[-1] - scores.shape[-2]
        if offset <= 0:
            return scores
        scores = scores.clone()
        scores[..., :offset] = torch.finfo(scores.dtype).min
        return scores


def tuning_1(lm=None, data: TaskData | None = None, task: str = "sst2", seed: int = 42, n_test: int = 4,
             m: int = 4, layer: int | None = None, trained: dict | None = None) -> dict:
    """Tuning, exercise 1 (splice the prefix in one layer only): a prefix of ``m`` keys and values (prefix-tuning's
    initialisation: m random tokens run through the model; the theorem holds for any prefix), or the prefix
    ``trained`` (``keys`` and ``values`` as :func:`helpers.experiments.tuning.train_prefix` returns them), visible in
    ``layer`` alone (0-based; default the middle layer); per layer, the largest change of q's renormalised content
    attention (``maxdiff``) and its mean total variation (``tv``) from
    :func:`helpers.experiments.tuning.attention_report`. Used in: Tuning (exercise 1)."""
    lm, data = _model(lm), _task_data(data, task)
    layer = lm.n_layers // 2 if layer is None else layer
    prompts = make_prompts(lm, data, seed, n_test)
    if trained is None:
        kv = tuning.init_prefix(lm.model, tuning.random_init_ids(lm.tokenizer, m, seed))
        trained = {"keys": np.stack([k.float().cpu().numpy() for k, _ in kv]),
                   "values": np.stack([v.float().cpu().numpy() for _, v in kv])}
    m = trained["keys"].shape[-2]
    with intervene(_PrefixOnlyIn(layer, lm.n_layers)):
        report = tuning.attention_report(lm, prompts, f"prefix-{m}", trained, data.task.n_classes)
    return {"layer": layer, "maxdiff": report["maxdiff"].max(axis=(0, 2)), "tv": report["tv"].mean(axis=(0, 2)),
            "prefix attention": report["outside"].mean(axis=(0, 2))}


def tuning_2(lm=None, data: TaskData | None = None, task: str = "sst2", seed: int = 42, n_test: int = 16,
             m: int = 1, n_attention: int = 4, config: TrainConfig = TrainConfig()) -> dict:
    """Tuning, exercise 2 (before BOS): a soft prompt of ``m`` tokens trained and evaluated after the BOS token (the
    chapter's slot) and before it, with its test accuracy (in %) and its first layer's largest change of q's
    renormalised content attention. On a model whose tokenizer adds no BOS both slots are the same.
    Used in: Tuning (exercise 2)."""
    lm, data = _model(lm), _task_data(data, task)
    s = seed_setup(lm, data, seed, n_test, config)
    out = {}
    for name, slot in (("after BOS", tuning.insert_slot), ("before BOS", lambda prompt: 0)):
        with mock.patch.object(tuning, "insert_slot", slot):
            trained = tuning.train_soft(lm, data.task, s.train_prompts, m, seed, config)
            soft = torch.from_numpy(trained["soft"]).to(lm.device)
            logits = tuning.evaluate_soft(lm, data.task, s.test_prompts, soft)
            report = tuning.attention_report(lm, s.test_prompts[:n_attention], f"prompt-{m}", trained,
                                             data.task.n_classes)
        out[name] = {"accuracy": _accuracy(logits, s.test_prompts),
                     "first-layer deviation": float(report["maxdiff"][:, 0].max())}
    return out


def tuning_3(lm=None, data: TaskData | None = None, task: str = "sst2", seed: int = 42, n_test: int = 16,
             m: int = 4, extra: Sequence[int] = (4, 16), config: TrainConfig = TrainConfig()) -> dict:
    """Tuning, exercise 3 (more data): for each number of training examples per class, the test accuracy (in %)
    of prefix-tuning with ``m`` positions and of anchor re-weighting, with their parameter counts.
    Used in: Tuning (exercise 3)."""
    lm, data = _model(lm), _task_data(data, task)
    n_classes = data.task.n_classes
    where = lambda p: class_positions(p, n_classes)  # noqa: E731
    out = {}
    for e in extra:
        cfg = dataclasses.replace(config, extra_per_class=e)
        s = seed_setup(lm, data, seed, n_test, cfg)
        trained = tuning.train_prefix(lm, data.task, s.train_prompts, m, seed, cfg)
        kv = [(torch.from_numpy(k).to(lm.device), torch.from_numpy(v).to(lm.device))
              for k, v in zip(trained["keys"], trained["values"])]
        out[e] = {f"prefix-{m}": _accuracy(tuning.evaluate_prefix(lm, data.task, s.test_prompts, kv),
                                           s.test_prompts),
                  "anchor": _trained_accuracy(lm, data.task, s, where, seed, cfg)[0]}
    out["parameters"] = {f"prefix-{m}": tuning.n_trained(lm.model, f"prefix-{m}", n_classes),
                         "anchor": tuning.n_trained(lm.model, "anchor", n_classes)}
    return out


# --------------------------------------------------------------------------------------------------------------------
# Where does the task live? (task vectors and heads)
# --------------------------------------------------------------------------------------------------------------------


def _patched_layers(lm, layer_step: int) -> list[int]:
    """Every ``layer_step``-th layer (0-based model indices: the residual stream after that decoder layer) and the
    last, as the chapter runs them."""
    return sorted(set(range(0, lm.n_layers, layer_step)) | {lm.n_layers - 1})


def _task_vector_states(lm, data: TaskData, seed: int, n_test: int, layers: Sequence[int], batch_size: int):
    """What :func:`helpers.experiments.taskvectors.task_vector_run` starts from, for one seed: the ICL prompts (one
    demonstration set), their zero-shot queries, the label words' ids, full ICL's label logits (N, C) and each ICL
    prompt's state at its target after each of ``layers`` ({layer: (N, D)}), all from one pass of each prompt."""
    label_ids = list(label_token_ids(data.task, lm.tokenizer))
    prompts = make_prompts(lm, data, seed, n_test)
    check_prompts(lm, prompts, data.task)
    reads: list[list[Read]] = []

    def ops_for(idx, _rows):
        ops = [Read(layer, [[prompts[i].target] for i in idx]) for layer in layers]
        reads.append(ops)
        return ops

    icl = tv._run(lm, [p.input_ids for p in prompts], label_ids, batch_size, ops_for)
    states = {layer: torch.cat([ops[j].value.cpu() for ops in reads])[:, 0] for j, layer in enumerate(layers)}
    return prompts, [tv.zero_shot_ids(p) for p in prompts], label_ids, icl, states


def _at_last(layer: int, values: torch.Tensor, add: bool = False):
    """One step of :func:`helpers.experiments.taskvectors._split_last`: write (or add) ``values`` (N, D) at the last
    token, row 0 of its one-token pass."""
    return lambda idx: [Write(layer, [[0]] * len(idx), values[idx], add=add)]


def _patched_accuracy(lm, prompts, zero_rows, label_ids, layers, vectors: dict, batch_size: int) -> dict:
    """Accuracy (in %) of the zero-shot queries unpatched (``zero``) and, per layer of ``layers``, with each of
    ``vectors`` ({name: (layer -> (N, D) values, add)}) at their last token: {name: (len(layers),)}."""
    steps = [lambda idx: []] + [_at_last(layer, make(layer), add) for layer in layers
                                for make, add in vectors.values()]
    logits = tv._split_last(lm, zero_rows, label_ids, steps, batch_size)
    per_layer = np.array([_accuracy(x.numpy(), prompts) for x in logits[1:]]).reshape(len(layers), len(vectors))
    return {"zero": _accuracy(logits[0].numpy(), prompts),
            **{name: per_layer[:, v] for v, name in enumerate(vectors)}}


def taskvectors_1(lm=None, data: TaskData | None = None, task: str = "sst2", seed: int = 42, n_test: int = 16,
                  layer_step: int = 3, batch_size: int = 8) -> dict:
    """Task vectors, exercise 1 (a mean task vector): accuracy (in %) of the zero-shot query per patched layer
    (``layers``: 0-based model indices, every ``layer_step``-th and the last) with the chapter's task vector (the
    next query's ICL state at its target, ``tv``) and with the mean of every query's ICL state of the seed written
    instead (``mean tv``: one vector for all queries), beside full ICL and the unpatched zero-shot query.
    Used in: Where does the task live? (exercise 1)."""
    lm, data = _model(lm), _task_data(data, task)
    layers = _patched_layers(lm, layer_step)
    prompts, zero_rows, label_ids, icl, states = _task_vector_states(lm, data, seed, n_test, layers, batch_size)
    n = len(prompts)
    dummy = [(i + 1) % n for i in range(n)]  # as the chapter: each query's vector comes from the next query's prompt
    vectors = {"tv": (lambda layer: states[layer][dummy], False),
               "mean tv": (lambda layer: states[layer].mean(0, keepdim=True).expand(n, -1), False)}
    return {"layers": np.array(layers), "icl": _accuracy(icl.numpy(), prompts),
            **_patched_accuracy(lm, prompts, zero_rows, label_ids, layers, vectors, batch_size)}


def taskvectors_2(lm=None, data: TaskData | None = None, task: str = "sst2", seed: int = 42, n_test: int = 16,
                  layer_step: int = 3, batch_size: int = 8) -> dict:
    """Task vectors, exercise 2 (add instead of replace): accuracy (in %) of the zero-shot query per patched layer
    (``layers``: 0-based model indices) with the task vector written in place of its state (``replace``, the
    chapter's ``tv``), with the next query's ICL state minus that query's zero-shot state (both at the target, same
    layer) added to it (``add``), and with that difference averaged over the seed's queries added (``add mean``: one
    direction for all queries, as a function vector), beside full ICL and the unpatched zero-shot query.
    Used in: Where does the task live? (exercise 2)."""
    lm, data = _model(lm), _task_data(data, task)
    layers = _patched_layers(lm, layer_step)
    prompts, zero_rows, label_ids, icl, states = _task_vector_states(lm, data, seed, n_test, layers, batch_size)
    zero_states = tv._read_states(lm, zero_rows, [[len(r) - 1] for r in zero_rows], layers, batch_size)
    n = len(prompts)
    dummy = [(i + 1) % n for i in range(n)]
    diff = {layer: states[layer] - zero_states[layer][:, 0] for layer in layers}
    vectors = {"replace": (lambda layer: states[layer][dummy], False),
               "add": (lambda layer: diff[layer][dummy], True),
               "add mean": (lambda layer: diff[layer].mean(0, keepdim=True).expand(n, -1), True)}
    return {"layers": np.array(layers), "icl": _accuracy(icl.numpy(), prompts),
            **_patched_accuracy(lm, prompts, zero_rows, label_ids, layers, vectors, batch_size)}


def taskvectors_3(lm=None, data: TaskData | None = None, task: str = "sst2", seed: int = 42, n_test: int = 16,
                  k: int | None = None, saliency_map: np.ndarray | None = None, batch_size: int = 8) -> dict:
    """Task vectors, exercise 3 (cut the top heads together): the target's attention to every label-word token cut
    at once (:class:`helpers.experiments.heads.CutHead`, one per head) in the ``k`` heads of highest S_pq (default
    :func:`helpers.experiments.heads.default_k`; the map (L, H) of these prompts, or ``saliency_map``, e.g. the
    chapter's ``hd.head_map(head_runs, "saliency")``) and in ``k`` random heads drawn from the others. Per condition
    the accuracy and the label loyalty to the uncut prediction (in %) and the mean fall of the uncut prediction's
    label-restricted log-probability (nats); ``heads``: the heads cut, as (layer from 1, head from 0).
    Used in: Where does the task live? (exercise 3)."""
    lm, data = _model(lm), _task_data(data, task)
    prompts = make_prompts(lm, data, seed, n_test)
    if saliency_map is None:
        saliency_map = hd.per_example({"saliency": hd.head_saliency(lm, data.task, prompts)}, "saliency").mean(0)
    if np.shape(saliency_map) != (lm.n_layers, lm.n_heads):
        raise ValueError(f"saliency_map must be (layers, heads) = ({lm.n_layers}, {lm.n_heads}), got "
                         f"{np.shape(saliency_map)}")
    k = hd.default_k(lm.n_layers * lm.n_heads) if k is None else k
    top = sorted(hd.top_k(saliency_map, k))
    others = np.setdiff1d(np.arange(lm.n_layers * lm.n_heads), top)
    drawn = sorted(int(i) for i in np.random.default_rng([seed, 11]).choice(others, k, replace=False))
    heads = {"top": [divmod(i, lm.n_heads) for i in top], "random": [divmod(i, lm.n_heads) for i in drawn]}
    cols = [[i for start, end in p.label_spans for i in range(start, end)] for p in prompts]

    def cut(chosen):
        return lambda idx: [hd.CutHead(layer, head, [cols[i] for i in idx]) for layer, head in chosen]

    label_ids = list(label_token_ids(data.task, lm.tokenizer))
    base, *cuts = tv._split_last(lm, [p.input_ids for p in prompts], label_ids,
                                 [lambda idx: []] + [cut(h) for h in heads.values()], batch_size)
    base_lp = torch.log_softmax(base.float(), -1)
    pred = base_lp.argmax(-1)
    n = torch.arange(len(prompts))
    out = {"k": k, "uncut": {"accuracy": _accuracy(base.numpy(), prompts)},
           "heads": {name: [(layer + 1, head) for layer, head in h] for name, h in heads.items()}}
    for name, logits in zip(heads, cuts):
        lp = torch.log_softmax(logits.float(), -1)
        out[name] = {"accuracy": _accuracy(logits.numpy(), prompts),
                     "label loyalty": float(100 * (lp.argmax(-1) == pred).float().mean()),
                     "fall": float((base_lp[n, pred] - lp[n, pred]).mean())}
    return out
