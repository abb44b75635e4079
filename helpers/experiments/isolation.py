"""Shallow-layer isolation of label words (paper §2.2; ``shallow_layer.py`` and ``shallow_layer_non_label.py``).

Isolating a position p in a layer blocks the flow from every earlier token into p in that layer (a pre-softmax
-1e4 on S[p, j<p], :class:`helpers.core.attention.Isolate`). The paper isolates the label words in the first k or the
last k layers, and, as a control, the same number of random non-label positions. It then measures how much the
model's output stays the same:

* **label loyalty**: the fraction of examples whose isolated prediction equals the un-isolated one (not accuracy);
* **word loyalty**: the mean Jaccard similarity of the top-k next-token sets (full vocabulary) with and without
  isolation. The paper says k = 5; the official notebook used k = 10. We store the top 10 and report both.

Random control: the official code redraws the random positions in every layer and every forward pass with an
unseeded ``random``. We redraw per layer too, but from a generator seeded by (seed, example index), so results are
reproducible and independent of the batch size. Candidates are {0, ..., q-2} minus the label positions, as in the
official code, and minus tokens the tokenizer added (a BOS at 0 has no earlier keys: isolating it would do nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..core.attention import Isolate, intervene
from ..core.prefix import SharedPrefix, build_prefix, split_prompts, suffix_logits
from ..core.prompts import Prompt, check_prompts, collate, label_token_ids, target_logits
from ..core.tasks import Task

__all__ = ["TOP_K_STORED", "isolated_layers", "random_positions", "condition_name", "run_isolation",
           "label_loyalty", "word_loyalty", "label_loyalty_per_example", "word_loyalty_per_example"]

TOP_K_STORED = 10


def isolated_layers(n_layers: int, k: int, where: str) -> list[int]:
    """``first``: layers [0, k); ``last``: layers [L-k, L) (0-based)."""
    if not 1 <= k <= n_layers:
        raise ValueError(f"k must be in 1..{n_layers}, got {k}")
    if where == "first":
        return list(range(k))
    if where == "last":
        return list(range(n_layers - k, n_layers))
    raise ValueError(f"where must be 'first' or 'last', got {where!r}")


def random_positions(prompt: Prompt, layers: Sequence[int], seed: int, index: int) -> dict[int, list[int]]:
    """Random non-label positions, as many as label words, drawn afresh for each layer (seeded by seed, index)."""
    excluded = set(prompt.label_positions) | set(prompt.special_positions)
    candidates = np.array([i for i in range(prompt.target - 1) if i not in excluded])
    rng = np.random.default_rng([seed, index])
    n = len(prompt.label_positions)
    return {layer: sorted(int(x) for x in rng.choice(candidates, n, replace=False)) for layer in layers}


def condition_name(what: str, where: str, k: int) -> str:
    return f"{what}-{where}-{k}"


def run_isolation(
    lm,
    task: Task,
    prompts: Sequence[Prompt],
    ks: Sequence[int] = (1, 3, 5, 7),
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    random_ks: Sequence[int] | None = None,
    shared_prefix: bool = True,
) -> dict[str, np.ndarray]:
    """Predictions and top-10 tokens at q with no isolation and under every (label|random, first|last, k) condition.

    Label words are isolated for every k in ``ks``; the random control for every k in ``random_ks`` (default: all of
    ``ks``; the book profile runs it at k = 5 only, to save compute on a CPU).

    ``shared_prefix`` (prompts with one fixed demonstration set): the "none" and label conditions run the
    demonstrations once per condition, with the label words isolated while that prefix is computed
    (:func:`helpers.core.prefix.build_prefix`), and each query as a suffix over it: the same numbers as full prompts
    (tested), a fraction of the work. The random control draws positions in the query too and differs per example:
    it always runs full prompts, as do prompts whose demonstration tokens differ (``split_prompts``).

    Returns arrays keyed ``"none/pred"``, ``"none/top"`` and ``"<what>-<where>-<k>/pred"``, ``.../top``: predicted
    class (N,) and the ids of the top-10 full-vocabulary tokens (N, 10), plus ``"gold"`` (N,) and ``"shared_prefix"``
    (N,) - 1 where the example ran as a suffix over the shared demonstrations, 0 where it ran as a full prompt.
    """
    from tqdm.auto import tqdm

    check_prompts(lm, prompts, task)
    label_ids = list(label_token_ids(task, lm.tokenizer))
    random_ks = ks if random_ks is None else random_ks
    conditions = [("none", "", 0)] + [
        (w, p, k) for k in ks for p in ("first", "last") for w in ("label", "random") if w == "label" or k in random_ks
    ]
    n = len(prompts)
    split = split_prompts(prompts) if shared_prefix else SharedPrefix((), (), tuple(range(n)))
    preds = {("none" if w == "none" else condition_name(w, p, k)): np.zeros(n, dtype=np.int64) for w, p, k in conditions}
    tops = {name: np.zeros((n, TOP_K_STORED), dtype=np.int64) for name in preds}

    def store(name, idx, logits):
        logits = logits.float()
        preds[name][idx] = logits[:, label_ids].argmax(-1).cpu().numpy()
        tops[name][idx] = logits.topk(TOP_K_STORED, dim=-1).indices.cpu().numpy()

    def full_hooks(what, where, k, chunk, idx):
        if what == "label":
            return [Isolate([p.label_positions for p in chunk], isolated_layers(lm.n_layers, k, where))]
        if what == "random":
            layers = isolated_layers(lm.n_layers, k, where)
            per_example = [random_positions(p, layers, seed, i) for i, p in zip(idx, chunk)]
            return [Isolate({layer: [r[layer] for r in per_example] for layer in layers})]
        return []

    shared = list(split.shared)
    if shared:
        labels = {prompts[i].label_positions for i in shared}
        if len(labels) != 1:
            raise ValueError("prompts sharing their demonstration tokens have different label positions")
        label_positions = list(next(iter(labels)))
    full_runs = [(c, list(range(n)) if c[0] == "random" else list(split.apart)) for c in conditions]
    prefix_runs = [c for c in conditions if c[0] != "random"] if shared else []
    total = sum(-(-len(i) // batch_size) for _, i in full_runs) + len(prefix_runs) * -(-len(shared) // batch_size)
    bar = tqdm(total=total, desc=f"isolation {task.name}", disable=not progress)
    for what, where, k in prefix_runs:
        name = "none" if what == "none" else condition_name(what, where, k)
        hooks = [Isolate([label_positions], isolated_layers(lm.n_layers, k, where))] if what == "label" else []
        prefix = build_prefix(lm.model, split.ids, hooks)
        for start in range(0, len(shared), batch_size):
            idx = shared[start : start + batch_size]
            with torch.no_grad():
                logits = suffix_logits(lm.model, prefix, [split.suffix(prompts[i]) for i in idx],
                                       lm.tokenizer.pad_token_id)
            store(name, idx, logits)
            bar.update()
    for (what, where, k), indices in full_runs:
        name = "none" if what == "none" else condition_name(what, where, k)
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            chunk = [prompts[i] for i in idx]
            batch = collate(chunk, lm.tokenizer.pad_token_id)
            with torch.no_grad(), intervene(*full_hooks(what, where, k, chunk, idx)):
                logits = target_logits(lm.model, batch)
            store(name, idx, logits)
            bar.update()
    bar.close()
    out = {"gold": np.array([p.label for p in prompts])}
    for name in preds:
        out[f"{name}/pred"] = preds[name]
        out[f"{name}/top"] = tops[name]
    flags = np.zeros(n, dtype=np.int64)
    flags[shared] = 1
    out["shared_prefix"] = flags
    return out


def label_loyalty_per_example(pred: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """1.0 where the prediction equals the un-isolated prediction, else 0.0: shape (N,). Its mean is the label
    loyalty; keeping it per example lets :mod:`helpers.core.stats` put an interval on that mean."""
    pred, reference = np.asarray(pred), np.asarray(reference)
    if pred.shape != reference.shape:
        raise ValueError(f"predictions {pred.shape} and reference {reference.shape} must match")
    return (pred == reference).astype(float)


def word_loyalty_per_example(top: np.ndarray, reference_top: np.ndarray, k: int = 5) -> np.ndarray:
    """Jaccard similarity of each example's top-k token set with the reference's: shape (N,).

    ``top`` and ``reference_top`` are (N, K) token ids sorted by logit, best first; only the first ``k`` are used.
    """
    top, reference_top = np.asarray(top), np.asarray(reference_top)
    if top.shape != reference_top.shape:
        raise ValueError(f"top tokens {top.shape} and reference {reference_top.shape} must match")
    if k > top.shape[1]:
        raise ValueError(f"only the top {top.shape[1]} tokens are stored, asked for k={k}")
    scores = []
    for a, b in zip(top[:, :k], reference_top[:, :k]):
        sa, sb = set(a.tolist()), set(b.tolist())
        scores.append(len(sa & sb) / len(sa | sb))
    return np.array(scores, dtype=float)


def label_loyalty(pred: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of examples whose prediction equals the un-isolated prediction (paper §2.2)."""
    return float(np.mean(label_loyalty_per_example(pred, reference)))


def word_loyalty(top: np.ndarray, reference_top: np.ndarray, k: int = 5) -> float:
    """Mean Jaccard similarity of the top-k token sets (rows of token ids sorted by logit, best first)."""
    return float(np.mean(word_loyalty_per_example(top, reference_top, k)))
