"""Deep layers: the target's attention to the label words versus the model's prediction (paper §2.3, Appendix E).

For each layer l and class i, the attention from the target q to class i's label word, summed over heads (and over
class i's positions when there are several shots per class)::

    A_l(q, p_i) = sum_h sum_{p in P_i} A_{h,l}(q, p)

We store these as an array of shape (N, L, C) - example, layer, class - and name the layout explicitly, which avoids
the official notebook's layout bug (pitfall P7: class-major data read as layer-major).

* AUCROC_l (:func:`auc_per_layer`): how well A_l(q, p_i) predicts the **model's own prediction** (not the gold
  label). Classes the model never predicts are dropped; with two classes left it is the binary AUC of the attention
  on the second one, otherwise the attention is renormalised over the remaining classes and the one-vs-one macro AUC
  is taken (sklearn ``roc_auc_score(multi_class="ovo")``), as the official notebook does.
* R_l (:func:`cumulative_contribution`): R_l = sum_{i<=l} (AUCROC_i - 0.5) / sum_{i<=L} (AUCROC_i - 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .attention import Record, intervene
from .prompts import Prompt, check_prompts, collate, label_token_ids, target_logits
from .runs import Profile, cached_run, make_prompts, settings_of
from .tasks import Task, TaskData

__all__ = ["LAYOUT", "label_attention", "auc_per_layer", "cumulative_contribution", "extraction_runs",
           "auc_curves", "layer_passing", "attention_shares"]

LAYOUT = ("example", "layer", "class")


def label_attention(lm, task: Task, prompts: Sequence[Prompt], batch_size: int = 8,
                    progress: bool = True) -> dict[str, np.ndarray]:
    """Run the prompts once, recording the target row of every layer's attention.

    Returns ``attention`` (N, L, C) as in the module docstring, ``first_token`` (N, L) the target's attention to
    position 0 (the attention sink) summed over heads, ``probs`` (N, C) the label probabilities, ``pred`` (N,),
    ``gold`` (N,).
    """
    from tqdm.auto import tqdm

    check_prompts(lm, prompts, task)
    label_ids = list(label_token_ids(task, lm.tokenizer))
    n_classes = task.n_classes
    att, sink, probs = [], [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"attention {task.name}", disable=not progress):
        chunk = list(prompts[start : start + batch_size])
        batch = collate(chunk, lm.tokenizer.pad_token_id)
        record = Record(rows=batch.target)
        with torch.no_grad(), intervene(record):
            logits = target_logits(lm.model, batch)[:, label_ids].float()
        rows = record.stacked()[:, :, :, 0, :].sum(dim=2).float().cpu()  # (L, B, S): heads summed
        for b, p in enumerate(chunk):
            per_class = torch.stack(
                [rows[:, b, list(p.positions_of_class(c))].sum(dim=-1) for c in range(n_classes)], dim=-1
            )  # (L, C)
            att.append(per_class.numpy())
            sink.append(rows[:, b, 0].numpy())
        probs.append(torch.softmax(logits, dim=-1).cpu().numpy())
    probs_arr = np.concatenate(probs)
    return {
        "attention": np.stack(att),
        "first_token": np.stack(sink),
        "probs": probs_arr,
        "pred": probs_arr.argmax(-1),
        "gold": np.array([p.label for p in prompts]),
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


def cumulative_contribution(auc: np.ndarray) -> np.ndarray:
    """R_l = cumsum(AUCROC - 0.5) / sum(AUCROC - 0.5)."""
    excess = np.asarray(auc, dtype=np.float64) - 0.5
    return np.cumsum(excess) / excess.sum()


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
        out.append(cached_run("extraction", lm, data, settings, compute, **kw))
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
