"""Deep layers: the target's attention to the label words versus the model's prediction (paper §2.3, Appendix E).

For each layer l and class i, the attention from the target q to class i's label word, summed over heads (and over
class i's positions when there are several shots per class)::

    A_l(q, p_i) = sum_h sum_{p in P_i} A_{h,l}(q, p)

We store these as an array of shape (N, L, C) - example, layer, class - and name the layout explicitly, which avoids
the official notebook's layout bug (class-major data read as layer-major).

* AUCROC_l (:func:`auc_per_layer`): how well A_l(q, p_i) predicts the **model's own prediction** (not the gold
  label). Classes the model never predicts are dropped; with two classes left it is the binary AUC of the attention
  on the second one, otherwise the attention is renormalised over the remaining classes and the one-vs-one macro AUC
  is taken (sklearn ``roc_auc_score(multi_class="ovo")``), as the official notebook does.
* R_l (:func:`cumulative_contribution`): R_l = sum_{i<=l} (AUCROC_i - 0.5) / sum_{i<=L} (AUCROC_i - 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..core.attention import Record, intervene
from ..core.prefix import SharedPrefix, build_prefix, split_prompts, suffix_logits, to_original_positions
from ..core.prompts import Prompt, check_prompts, collate, label_token_ids, target_label_logits
from ..core.runs import Profile, cached_run, make_prompts, settings_of
from ..core.stats import N_BOOT, Estimate, bootstrap_weighted, mean_estimate
from ..core.tasks import Task, TaskData
from ..core.findings import Finding, Measured, TASK_NAMES, all_tasks, near_point_eight, pooled_n, second_half
from ..core.runs import PROFILES
from ..core.tasks import get_task
from .protocol import Experiment

__all__ = ["LAYOUT", "label_attention", "auc_per_layer", "auc_per_layer_weighted", "cumulative_contribution",
           "extraction_runs", "auc_curves", "auc_estimates", "deep_auc_estimate", "accuracy_estimate", "layer_passing", "layer_estimates",
           "attention_shares", "FIELDS"]

LAYOUT = ("example", "layer", "class")
# What the chapter reads from a cached run (passed to cached_run as ``expect``: a cached result without one of them is
# refused when read): the attention and the sink's share (its figures), the probabilities (the worked example), the
# prediction and the gold label (AUCROC_l, R_l, accuracy). ``shared_prefix`` is a record of how it ran, not read.
FIELDS = ("attention", "first_token", "probs", "pred", "gold")


def label_attention(lm, task: Task, prompts: Sequence[Prompt], batch_size: int = 8,
                    progress: bool = True, shared_prefix: bool = True) -> dict[str, np.ndarray]:
    """Run the prompts once, recording the target row of every layer's attention.

    Returns ``attention`` (N, L, C) as in the module docstring, ``first_token`` (N, L) the target's attention to
    position 0 (the attention sink) summed over heads, ``probs`` (N, C) the label probabilities, ``pred`` (N,),
    ``gold`` (N,), ``shared_prefix`` (N,): 1 where the example ran as a suffix over the shared demonstrations.

    ``shared_prefix`` (one fixed demonstration set): the demonstrations run once
    (:func:`helpers.core.prefix.build_prefix`), each query as a suffix over them with q's row recorded there, and only
    the label words' logits computed (:func:`helpers.core.prompts.label_head`); equal to full prompts (tested).
    """
    from tqdm.auto import tqdm

    check_prompts(lm, prompts, task)
    label_ids = list(label_token_ids(task, lm.tokenizer))
    n_classes = task.n_classes
    n = len(prompts)
    split = split_prompts(prompts) if shared_prefix else SharedPrefix((), (), tuple(range(n)))
    att = np.zeros((n, lm.n_layers, n_classes), dtype=np.float32)
    sink = np.zeros((n, lm.n_layers), dtype=np.float32)
    logits_all = np.zeros((n, n_classes), dtype=np.float32)

    def store(idx, rows, logits):  # rows: (L, B, S) heads summed, at original positions
        for b, i in enumerate(idx):
            p = prompts[i]
            att[i] = torch.stack([rows[:, b, list(p.positions_of_class(c))].sum(dim=-1) for c in range(n_classes)],
                                 dim=-1).numpy()
            sink[i] = rows[:, b, 0].numpy()
        logits_all[idx] = logits.float().cpu().numpy()

    shared = list(split.shared)
    prefix = build_prefix(lm.model, split.ids) if shared else None
    bar = tqdm(total=-(-len(shared) // batch_size) + -(-len(split.apart) // batch_size),
               desc=f"attention {task.name}", disable=not progress)
    for start in range(0, len(shared), batch_size):
        idx = shared[start : start + batch_size]
        suffixes = [split.suffix(prompts[i]) for i in idx]
        t = max(len(x) for x in suffixes)
        record = Record(rows=torch.tensor([len(x) - 1 for x in suffixes]))
        with torch.no_grad(), intervene(record):
            logits = suffix_logits(lm.model, prefix, suffixes, lm.tokenizer.pad_token_id, label_ids=label_ids)
        rows = torch.stack([
            to_original_positions(prefix, layer, record.attentions[layer][:, :, 0, :].sum(dim=1).float().cpu(), t)
            for layer in sorted(record.attentions)
        ])  # (L, B, N + T)
        store(idx, rows, logits)
        bar.update()
    apart = list(split.apart)
    for start in range(0, len(apart), batch_size):
        idx = apart[start : start + batch_size]
        batch = collate([prompts[i] for i in idx], lm.tokenizer.pad_token_id)
        record = Record(rows=batch.target)
        with torch.no_grad(), intervene(record):
            logits = target_label_logits(lm.model, batch, label_ids)
        store(idx, record.stacked()[:, :, :, 0, :].sum(dim=2).float().cpu(), logits)  # (L, B, S): heads summed
        bar.update()
    bar.close()
    probs = torch.softmax(torch.from_numpy(logits_all), dim=-1).numpy()
    flags = np.zeros(n, dtype=np.int64)
    flags[shared] = 1
    return {
        "attention": att,
        "first_token": sink,
        "probs": probs,
        "pred": probs.argmax(-1),
        "gold": np.array([p.label for p in prompts]),
        "shared_prefix": flags,
    }


def auc_per_layer(attention: np.ndarray, pred: np.ndarray, renormalise_binary: bool = False) -> np.ndarray:
    """AUCROC_l of the attention (N, L, C) against the predictions (N,): shape (L,). NaN if only one class is ever
    predicted (the AUC is undefined).

    ``renormalise_binary``: with two classes, score with a_2 / (a_1 + a_2) instead of the official a_2, i.e. with
    the attention on everything else (the first-token sink included) divided out, as the multi-class case does.
    """
    from sklearn.metrics import roc_auc_score

    attention = np.asarray(attention, dtype=np.float64)
    pred = np.asarray(pred)
    kept = np.unique(pred)
    n_layers = attention.shape[1]
    if len(kept) < 2:
        return np.full(n_layers, np.nan)
    y = np.searchsorted(kept, pred)  # relabel the predicted classes 0..K-1
    out = np.empty(n_layers)
    for layer in range(n_layers):
        scores = attention[:, layer, kept]
        if len(kept) == 2 and not renormalise_binary:
            out[layer] = roc_auc_score(y, scores[:, 1])
        elif len(kept) == 2:
            total = scores.sum(axis=1)
            out[layer] = roc_auc_score(y, scores[:, 1] / np.where(total > 0, total, 1.0))
        else:
            total = scores.sum(axis=1, keepdims=True)
            scores = scores / np.where(total > 0, total, 1.0)
            out[layer] = roc_auc_score(y, scores, multi_class="ovo", average="macro", labels=np.arange(len(kept)))
    return out


def _ordered_pairs(scores: np.ndarray) -> np.ndarray:
    """(N, L) scores -> (N, N, L): 1 where score_i > score_j, 0.5 on ties, 0 otherwise (the Mann-Whitney kernel)."""
    d = scores[:, None, :] - scores[None, :, :]
    return (d > 0) + 0.5 * (d == 0)


def _weighted_pair_sum(w_pos: np.ndarray, kernel: np.ndarray, w_neg: np.ndarray) -> np.ndarray:
    """sum_ij w_pos[b, i] kernel[i, j, l] w_neg[b, j] for every replicate b: (B, L)."""
    return np.einsum("bil,bi->bl", np.tensordot(w_neg, kernel.transpose(1, 0, 2), axes=(1, 0)), w_pos)


def auc_per_layer_weighted(attention: np.ndarray, pred: np.ndarray, weights: np.ndarray,
                           renormalise_binary: bool = False) -> np.ndarray:
    """:func:`auc_per_layer` for many weightings of the examples at once: (B, L), for the bootstrap.

    ``weights`` (B, N) are example multiplicities (a bootstrap resample); row b gives exactly what
    :func:`auc_per_layer` gives on the resampled examples. The AUC is the Mann-Whitney statistic, the probability
    that a positive outscores a negative (ties count one half), computed as a weighted sum over pairs, so no loop over
    replicates or layers is needed. The classes kept (those predicted at least once) are decided per replicate, as
    the official rule does on each sample; with more than two, the one-vs-one macro average of sklearn's
    ``roc_auc_score(multi_class="ovo")``: for each pair (a, b), the mean of AUC(score a: a vs b) and AUC(score b:
    b vs a), averaged over pairs.
    """
    attention = np.asarray(attention, dtype=np.float64)
    pred = np.asarray(pred)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    n, n_layers, n_classes = attention.shape
    if pred.shape != (n,) or weights.shape[1] != n:
        raise ValueError(f"attention {attention.shape}, pred {pred.shape} and weights {weights.shape} disagree")
    onehot = (pred[:, None] == np.arange(n_classes)).astype(float)  # (N, C)
    kept_mask = (weights @ onehot) > 0  # (B, C)
    out = np.full((len(weights), n_layers), np.nan)
    for row in np.unique(kept_mask, axis=0):
        kept = np.nonzero(row)[0]
        if len(kept) < 2:
            continue
        reps = np.nonzero((kept_mask == row).all(axis=1))[0]
        w = weights[reps]
        scores = attention[:, :, kept]
        if len(kept) == 2:
            s = scores[..., 1]
            if renormalise_binary:
                total = scores.sum(-1)
                s = s / np.where(total > 0, total, 1.0)
            w_pos, w_neg = w * onehot[:, kept[1]], w * onehot[:, kept[0]]
            den = w_pos.sum(1) * w_neg.sum(1)
            out[reps] = _weighted_pair_sum(w_pos, _ordered_pairs(s), w_neg) / den[:, None]
            continue
        total = scores.sum(-1, keepdims=True)
        scores = scores / np.where(total > 0, total, 1.0)
        acc = np.zeros((len(reps), n_layers))
        n_pairs = 0
        for i in range(len(kept)):
            for j in range(i + 1, len(kept)):
                w_a, w_b = w * onehot[:, kept[i]], w * onehot[:, kept[j]]
                den = (w_a.sum(1) * w_b.sum(1))[:, None]
                ab = _weighted_pair_sum(w_a, _ordered_pairs(scores[..., i]), w_b) / den
                ba = _weighted_pair_sum(w_b, _ordered_pairs(scores[..., j]), w_a) / den
                acc += (ab + ba) / 2
                n_pairs += 1
        out[reps] = acc / n_pairs
    return out


def cumulative_contribution(auc: np.ndarray) -> np.ndarray:
    """R_l = cumsum(AUCROC - 0.5) / sum(AUCROC - 0.5) (along the last axis).

    R_l is a share of the *net* excess over chance: layers with AUCROC below 0.5 subtract from it, so R_l can be
    negative (early layers below chance) or exceed 1, and when the total excess is close to 0 the ratio is large
    and unstable (its interval says so).
    """
    excess = np.asarray(auc, dtype=np.float64) - 0.5
    return np.cumsum(excess, axis=-1) / excess.sum(axis=-1, keepdims=True)


def layer_passing(r: np.ndarray, level: float = 0.5) -> int | None:
    """First layer (0-based) where R_l reaches ``level``."""
    hits = np.nonzero(np.asarray(r) >= level)[0]
    return int(hits[0]) if len(hits) else None


def extraction_runs(lm, data: TaskData, profile: Profile, shots: int = 1, **kw) -> list[dict[str, np.ndarray]]:
    """One :func:`label_attention` result per seed (scheme A demonstrations), cached."""
    out = []
    for seed in profile.seeds:
        def compute(seed=seed):
            prompts = make_prompts(lm, data, seed, profile.n_test_extraction or profile.n_test, shots, per_example=False)
            return label_attention(lm, data.task, prompts, batch_size=profile.batch_size)

        settings = settings_of(profile, seed=seed, shots=shots, n_test=profile.n_test_extraction or profile.n_test)
        out.append(cached_run("extraction", lm, data, settings, compute, expect=FIELDS, **kw))
    return out


def attention_shares(per_seed: Sequence[dict[str, np.ndarray]], n_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean share of q's attention (averaged over heads) on the first token (the sink) and on all label words: (L,) each."""
    sink = np.concatenate([r["first_token"] for r in per_seed]).mean(0) / n_heads
    labels = np.concatenate([r["attention"].sum(-1) for r in per_seed]).mean(0) / n_heads
    return sink, labels


def auc_curves(per_seed: Sequence[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """AUCROC_l averaged over seeds (seeds where it is undefined are skipped), and R_l of that mean."""
    aucs = np.array([auc_per_layer(r["attention"], r["pred"]) for r in per_seed])
    mean = np.nanmean(aucs, axis=0)
    return mean, cumulative_contribution(mean)


def auc_estimates(per_seed: Sequence[dict[str, np.ndarray]], n_boot: int = N_BOOT, seed: int = 0,
                  renormalise_binary: bool = False) -> tuple[Estimate, Estimate]:
    """AUCROC_l and R_l (of the seed-mean AUCROC_l curve, as :func:`auc_curves`) with bootstrap intervals.

    Hierarchical bootstrap over seeds and examples (:func:`helpers.core.stats.bootstrap_weighted`); R_l is recomputed
    from each replicate's mean AUC curve, so its interval includes the instability of the normalisation.
    """
    data = [(r["attention"], r["pred"]) for r in per_seed]

    def stat(attention, pred, weights):
        return auc_per_layer_weighted(attention, pred, weights, renormalise_binary)

    auc = bootstrap_weighted(data, stat, n_boot=n_boot, seed=seed)
    r = bootstrap_weighted(data, stat, n_boot=n_boot, seed=seed, then=cumulative_contribution)
    return auc, r


def layer_estimates(per_seed: Sequence[dict[str, np.ndarray]], n_boot: int = N_BOOT, seed: int = 0,
                    level: float = 0.5, renormalise_binary: bool = False) -> tuple[Estimate, Estimate]:
    """The layer (1-based) where AUCROC_l peaks, and the first layer where R_l reaches ``level``, each with the
    interval of the hierarchical bootstrap of :func:`auc_estimates` (seeds, then examples): each replicate's mean AUC
    curve gives its own peak and its own R_l. A replicate in which R_l never reaches ``level`` counts as layer L + 1
    ("never", :func:`helpers.core.stats.layer_text`).

    Used in: Extraction (the table of AUCROC_l)."""
    data = [(r["attention"], r["pred"]) for r in per_seed]
    n_layers = per_seed[0]["attention"].shape[1]

    def stat(attention, pred, weights):
        return auc_per_layer_weighted(attention, pred, weights, renormalise_binary)

    def peak(auc):
        auc = np.asarray(auc, dtype=float)
        return float(np.nanargmax(auc) + 1) if np.isfinite(auc).any() else np.nan

    def passing(auc):
        auc = np.asarray(auc, dtype=float)
        if not np.isfinite(auc).all():
            return np.nan
        layer = layer_passing(cumulative_contribution(auc), level)
        return float(n_layers + 1 if layer is None else layer + 1)

    return (bootstrap_weighted(data, stat, n_boot=n_boot, seed=seed, then=peak),
            bootstrap_weighted(data, stat, n_boot=n_boot, seed=seed, then=passing))


def accuracy_estimate(per_seed: Sequence[dict[str, np.ndarray]], **kw) -> Estimate:
    """Accuracy against the gold label (in %), with its interval."""
    return mean_estimate([(r["pred"] == r["gold"]).astype(float) for r in per_seed], **kw).scaled(100)


def deep_auc_estimate(per_seed: Sequence[dict[str, np.ndarray]], share: float = 1 / 3, n_boot: int = N_BOOT,
                      renormalise_binary: bool = False) -> Estimate:
    """AUCROC_l averaged over the last ``share`` of the layers (the paper's "deep layers"), with its interval.

    ``per_seed`` may pool the seeds of several tasks: the value is then the mean over tasks (equal seeds per task).
    """
    n_layers = per_seed[0]["attention"].shape[1]
    start = n_layers - max(1, int(round(n_layers * share)))

    def stat(attention, pred, weights):
        auc = auc_per_layer_weighted(attention, pred, weights, renormalise_binary)[:, start:]
        ok = np.isfinite(auc)
        with np.errstate(invalid="ignore"):  # a replicate with one predicted class: NaN, skipped by the bootstrap
            return np.where(ok, auc, 0).sum(1) / ok.sum(1)

    return bootstrap_weighted([(r["attention"], r["pred"]) for r in per_seed], stat, n_boot=n_boot)


# ------------------------------------------------------------------------------------------------------------------
# The verdict rows (helpers.core.findings)
# ------------------------------------------------------------------------------------------------------------------


def _extraction(model, profile, shots=1):

    return all_tasks(extraction_runs, model, profile, shots=shots)


def deep_auc(model: str, profile: Profile) -> Measured | None:

    runs = _extraction(model, profile)
    if runs is None:
        return None
    per_task = {get_task(t).title: deep_auc_estimate(runs[t], n_boot=300) for t in TASK_NAMES}
    est = deep_auc_estimate([r for t in TASK_NAMES for r in runs[t]])
    low = [f"{name} {e.fmt(2)}" for name, e in per_task.items() if e.low <= 0.5]
    note = "last third of the layers, mean of 4 tasks"
    if low:
        note += "; not above chance: " + ", ".join(low)
    return Measured(est, note=note, support=per_task, n_text=pooled_n(est))


R_LIMITS = (-1.5, 2.0)  # R_l outside these bounds in some layer: its interval does not pin it down (figures' axes)


def r_determined(r) -> bool:
    """Whether R_l is pinned down: its 95% interval stays within :data:`R_LIMITS` in every layer (the extraction
    figures' axes, which draw an undetermined curve dashed; the chapter's tables and the verdict rows use this test).

    Used in: Extraction."""
    low, high = R_LIMITS
    if not (np.isfinite(r.low).any() and np.isfinite(r.high).any()):  # no interval at all
        return False
    return bool(np.nanmin(r.low) >= low and np.nanmax(r.high) <= high)


def _seed_notes(runs: dict) -> tuple[str, ...]:
    """Per seed, why a pooled per-seed R_l is undefined: the tasks on which that seed's model predicts one class
    only (its AUCROC_l is undefined), or "" where every task's is defined."""
    n_seeds = len(next(iter(runs.values())))
    notes = []
    for s in range(n_seeds):
        one = [get_task(t).title for t in TASK_NAMES if len(np.unique(runs[t][s]["pred"])) < 2]
        notes.append(f"undefined ({', '.join(one)} predicts one class)" if one else "")
    return tuple(notes)


def _r_mid(shots: int):
    def compute(model: str, profile: Profile) -> Measured | None:
        from ..core.stats import bootstrap_weighted, pooled_over

        runs = _extraction(model, profile, shots)
        if runs is None:
            return None
        pooled = [(r["attention"], r["pred"]) for t in TASK_NAMES for r in runs[t]]
        n_layers = pooled[0][0].shape[1]
        mid = n_layers // 2
        est = bootstrap_weighted(pooled, auc_per_layer_weighted, then=cumulative_contribution)
        r_mid = Estimate(est.value[mid - 1], est.low[mid - 1], est.high[mid - 1], est.n_examples, est.n_seeds,
                         est.seed_values[:, mid - 1], est.level, est.weak_low[mid - 1], est.weak_high[mid - 1],
                         est.hierarchical)
        passing = layer_passing(est.value)
        with pooled_over(1):  # one task at a time, as the chapter's table computes them, and its test of
            per_task_est = {t: auc_estimates(runs[t]) for t in TASK_NAMES}  # "undetermined": row and table agree
        per_task, undetermined = {}, []
        for t in TASK_NAMES:
            r = per_task_est[t][1]
            p = layer_passing(r.value)
            per_task[get_task(t).title] = None if p is None else p + 1
            if not r_determined(r):
                undetermined.append(get_task(t).title)
        early = [f"{t} (layer {layer})" for t, layer in per_task.items()
                 if t not in undetermined and layer is not None and layer <= mid]
        note = (f"R_l at layer {mid} of {n_layers} (AUC averaged over 4 tasks); it reaches 0.5 at layer "
                f"{passing + 1 if passing is not None else 'never'}")
        if undetermined:
            note += "; per task, R_l is undetermined on " + ", ".join(undetermined)
        if early:
            note += "; per task, R_l reaches 0.5 in the first half on " + ", ".join(early)
        return Measured(r_mid, note=note, support={"passing": per_task, "undetermined": undetermined, "mid": mid},
                        n_text=pooled_n(r_mid), seed_notes=_seed_notes(runs))

    return compute


# --------------------------------------------------------------------------------------------------------------------
# The experiment (helpers.experiments.protocol)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractionConfig:
    """The extraction chapter's sizes: a profile and the shots per class it runs (1 and 2, Appendix F.1)."""

    profile: Profile
    shots: tuple[int, ...] = (1, 2)


def configure(profile: str = "book", shots=None) -> ExtractionConfig:
    return ExtractionConfig(PROFILES[profile], tuple(shots) if shots else (1, 2))


def run(lm, data: TaskData, config: ExtractionConfig, seed: int, lookup_only: bool = False) -> dict:
    """One (task, seed): :func:`label_attention` with each number of shots per class."""
    one = replace(config.profile, seeds=(seed,))  # a run's key does not hold the seed list
    return {f"{k}-shot": extraction_runs(lm, data, one, shots=k, lookup_only=lookup_only)[0] for k in config.shots}


EXPERIMENT = Experiment(
    name="extraction", title="Deep layers read the label words: AUCROC_l and R_l", chapter="book/extraction",
    configure=configure, seeds=lambda config, model: config.profile.seeds, run=run, options=frozenset({"shots"}),
    findings=(
        Finding("deep-auc", "The target's attention to the label words predicts the output in deep layers: AUCROC ≈ "
                "0.8.", "≈ 0.8", "§2.3, Figure 5", "book/extraction", "fig-auc", deep_auc, near_point_eight,
                pooled=True),
        Finding("r-second-half", "The cumulative contribution R_l is small in shallow layers and rises in the middle "
                "and late layers.", "qualitative (Figure 5)", "§2.3", "book/extraction", "fig-auc", _r_mid(1),
                second_half, pooled=True),
        Finding("two-shot", "With 2 demonstrations per class the conclusions are the same (shown here: R_l, as "
                "above).", "qualitative (Figures 9–11)", "Appendix F.1", "book/extraction", "fig-auc2", _r_mid(2),
                second_half, pooled=True),
    ),
)
