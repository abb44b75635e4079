"""Saliency-based information flow (paper §2.1, Eq. 1-4; ``attention_attr.py`` of the official code).

For layer l, the saliency matrix is (Eq. 1, heads summed, then the absolute value, as the official code does)::

    I_l = | sum_h A_{h,l} ⊙ dL/dA_{h,l} |

with L the cross-entropy of the label-restricted logits at q against the **gold** label. I_l(i, j) is the flow
from token j into token i. With the label-word positions p_1..p_C and the target q (diagonal zeroed):

* S_wp = sum_k sum_j I_l(p_k, j) / sum_k p_k          (Eq. 2: text -> label words; the row sum equals the sum over
  j < p_k by causality, and p_k, 0-based, is the number of earlier tokens)
* S_pq = sum_k I_l(q, p_k) / C                        (Eq. 3: label words -> target)
* S_ww = (sum_ij I_l - the two sums) / (q(q+1)/2 - sum_k p_k - C)   (Eq. 4: every other causal pair)

For plots the paper normalises per layer so that S_wp + S_pq + S_ww = 1 (:func:`normalise_per_layer`; without it
S_pq dominates everywhere, issue #14 of the official repository).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .attention import Saliency, intervene
from .prompts import Batch, Prompt, check_prompts, collate, label_token_ids, length_batches, target_label_logits
from .tasks import Task

__all__ = ["MEASURES", "saliency_matrices", "flow_measures", "flows_at", "saliency_flow", "normalise_per_layer",
           "random_non_label_positions"]

MEASURES = ("S_wp", "S_pq", "S_ww")


def saliency_matrices(model, batch: Batch, label_ids: Sequence[int]) -> torch.Tensor:
    """I_l for every layer and example: (L, B, T, T), float32 on the CPU, diagonal not yet zeroed.

    The loss is summed over the batch, so each example's saliency equals what a batch of one gives. Only the label
    words' logits are computed (:func:`helpers.core.prompts.target_label_logits`): the loss needs no other.
    """
    if any(p.label is None for p in batch.prompts):
        raise ValueError("saliency needs the gold label of every query")
    hook = Saliency()
    with torch.enable_grad(), intervene(hook):
        logits = target_label_logits(model, batch, label_ids)
        loss = F.cross_entropy(logits.float(), batch.labels.to(logits.device), reduction="sum")
    loss.backward()
    grads = hook.per_layer()  # (L, B, H, T, T) = A ⊙ dL/dA
    return grads.sum(dim=2).abs().float().cpu()


def flow_measures(saliency: torch.Tensor, prompt: Prompt) -> np.ndarray:
    """(S_wp, S_pq, S_ww) of one example's saliency matrix (T, T) or matrices (L, T, T); shape (3,) or (3, L)."""
    return flows_at(saliency, prompt.label_positions, prompt.target)


def flows_at(saliency: torch.Tensor, label_positions: Sequence[int], target: int) -> np.ndarray:
    """:func:`flow_measures` for explicit label positions p_1..p_C and target q."""
    s = torch.as_tensor(saliency).clone()
    if s.ndim == 2:
        return flows_at(s[None], label_positions, target)[:, 0]
    s = s.double()
    s.diagonal(dim1=-2, dim2=-1).zero_()
    p = torch.tensor([int(x) for x in label_positions])
    q = int(target)
    wp = s[:, p, :].sum(dim=(1, 2))
    pq = s[:, q, p].sum(dim=1)
    ww = s.sum(dim=(1, 2)) - wp - pq
    n_other = q * (q + 1) / 2 - float(p.sum()) - len(p)
    return torch.stack([wp / float(p.sum()), pq / len(p), ww / n_other]).numpy()


def random_non_label_positions(prompt: Prompt, rng: np.random.Generator) -> tuple[int, ...]:
    """As many positions as the prompt has label words, drawn without replacement from its demonstrations' tokens
    that are neither label-word tokens nor added by the tokenizer (the position control of the saliency flows).
    Used in: Aggregation."""
    labels = {i for start, end in prompt.label_spans for i in range(start, end)}
    pool = [i for i in range(prompt.query_start) if i not in labels and i not in set(prompt.special_positions)]
    if len(pool) < len(prompt.label_positions):
        raise ValueError("the demonstrations have fewer non-label tokens than label words")
    return tuple(sorted(int(i) for i in rng.choice(pool, size=len(prompt.label_positions), replace=False)))


def saliency_flow(
    lm,
    task: Task,
    prompts: Sequence[Prompt],
    batch_size: int = 4,
    progress: bool = True,
    token_budget: int | None = None,
    control_seed: int | None = None,
) -> np.ndarray:
    """(N, 3, L): S_wp, S_pq, S_ww per layer for each prompt (not normalised), in the input order.

    With ``control_seed``, (N, 2, 3, L): the flows at the label words, then the same flows computed from the same
    saliency matrices with the label positions replaced by as many random non-label positions of the
    demonstrations (:func:`random_non_label_positions`, one draw per prompt from ``control_seed``): what the
    measures give for positions that are not anchors. Used in: Aggregation.

    Prompts are batched by length (:func:`helpers.core.prompts.length_batches`): sorted, at most ``batch_size`` per
    batch and at most ``token_budget`` padded tokens (default: ``batch_size`` × the median length), so that little
    time goes to padding. Each example's result equals a batch of one (tested).
    """
    from tqdm.auto import tqdm

    check_prompts(lm, prompts, task)
    label_ids = label_token_ids(task, lm.tokenizer)
    lengths = [len(p) for p in prompts]
    if token_budget is None:
        token_budget = batch_size * int(np.median(lengths)) if lengths else 1
    out: list[np.ndarray | None] = [None] * len(prompts)
    controls = None
    if control_seed is not None:  # drawn in input order, so the draw does not depend on the batching
        rng = np.random.default_rng(control_seed)
        controls = [random_non_label_positions(p, rng) for p in prompts]
    for idx in tqdm(length_batches(lengths, token_budget, batch_size), desc=f"saliency {task.name}",
                    disable=not progress):
        chunk = [prompts[i] for i in idx]
        mats = saliency_matrices(lm.model, collate(chunk, lm.tokenizer.pad_token_id), label_ids)
        for b, (i, prompt) in enumerate(zip(idx, chunk)):
            t = len(prompt)
            real = flow_measures(mats[:, b, :t, :t], prompt)
            out[i] = real if controls is None else np.stack([real, flows_at(mats[:, b, :t, :t], controls[i],
                                                                            prompt.target)])
    return np.stack(out)


def normalise_per_layer(flows: np.ndarray) -> np.ndarray:
    """The paper's figures: average (N, 3, L) over examples, then scale each layer so the three measures sum to 1."""
    mean = flows.mean(axis=0)
    return mean / mean.sum(axis=0, keepdims=True)
