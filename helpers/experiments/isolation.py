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
from ..core.prefix import SharedPrefix, build_prefix, output_logits, split_prompts, suffix_hidden
from ..core.prompts import Prompt, check_prompts, collate, label_token_ids
from ..core.tasks import Task

__all__ = ["TOP_K_STORED", "isolated_layers", "random_positions", "condition_name", "isolation_fields",
           "run_isolation", "label_loyalty", "word_loyalty", "label_loyalty_per_example", "word_loyalty_per_example"]

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


def _conditions(ks: Sequence[int], random_ks: Sequence[int] | None) -> list[tuple[str, str, int]]:
    """(what, where, k) of every condition :func:`run_isolation` runs, ``("none", "", 0)`` first."""
    random_ks = ks if random_ks is None else random_ks
    return [("none", "", 0)] + [
        (w, p, k) for k in ks for p in ("first", "last") for w in ("label", "random") if w == "label" or k in random_ks
    ]


def isolation_fields(ks: Sequence[int] = (1, 3, 5, 7), random_ks: Sequence[int] | None = None) -> tuple[str, ...]:
    """The fields the readers of a :func:`run_isolation` result read (the loyalties,
    :func:`helpers.experiments.aggregation.loyalty_per_example`): ``"<condition>/pred"`` and ``".../top"`` of every
    condition it runs with these ``ks`` and ``random_ks``, ``"none"`` included. The experiments pass them to
    :func:`helpers.core.runs.cached_run` as ``expect``: a cached result without one is refused when read."""
    names = ["none" if w == "none" else condition_name(w, p, k) for w, p, k in _conditions(ks, random_ks)]
    return tuple(f"{name}/{part}" for name in names for part in ("pred", "top"))


def _first_drawn(per_layer: dict[int, list[int]]) -> int:
    """The earliest position a random draw isolates in any layer: every token before it is computed as without
    isolation, in every layer (a token attends only to itself and earlier ones)."""
    return min(min(v) for v in per_layer.values())


def _target_hidden(model, chunk: Sequence[Prompt], pad_id: int) -> torch.Tensor:
    """Final hidden states at each full prompt's target q: (B, D) (the rows :func:`target_logits` sends through the
    output layer)."""
    batch = collate(chunk, pad_id)
    device = next(model.parameters()).device
    hidden = model.base_model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                              use_cache=False).last_hidden_state
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.target.to(hidden.device)]


def _by_length(indices: Sequence[int], length, batch_size: int) -> list[list[int]]:
    """``indices`` sorted by ``length(i)`` (stable), cut into batches of ``batch_size``: a batch is padded only to
    its own longest member."""
    ordered = sorted(indices, key=length)
    return [ordered[s : s + batch_size] for s in range(0, len(ordered), batch_size)]


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
    probabilities: bool = False,
    output_rows: int = 512,
) -> dict[str, np.ndarray]:
    """Predictions and top-10 tokens at q with no isolation and under every (label|random, first|last, k) condition.

    Label words are isolated for every k in ``ks``; the random control for every k in ``random_ks`` (default: all of
    ``ks``; the book profile runs it at k = 5 only, to save compute on a CPU).

    ``shared_prefix`` (prompts with one fixed demonstration set): the "none" and label conditions run the
    demonstrations once per condition, with the label words isolated while that prefix is computed
    (:func:`helpers.core.prefix.build_prefix`), and each query as a suffix over it: the same numbers as full prompts
    (tested), a fraction of the work. The random control draws different positions for every example, so each
    example runs from its first drawn position on (in any layer), over the un-isolated demonstrations' cache
    truncated there (:meth:`helpers.core.prefix.PrefixCache.truncate`: the tokens before it are computed as without
    isolation); prompts whose demonstration tokens differ run in full (``split_prompts``). Queries are sorted by
    length into batches, and the q rows of every condition go through the output layer together at the end
    (:func:`helpers.core.prefix.output_logits`, in products of ``output_rows`` rows). Against running every
    condition's batches in input order with the output layer per batch, predictions and top-10 tokens are identical
    and probabilities move by a few 1e-6 (float32 sums rounded in another order; tested).

    Returns arrays keyed ``"none/pred"``, ``"none/top"`` and ``"<what>-<where>-<k>/pred"``, ``.../top``: predicted
    class (N,) and the ids of the top-10 full-vocabulary tokens (N, 10), plus ``"gold"`` (N,) and ``"shared_prefix"``
    (N,) - 1 where the example ran as a suffix over the shared demonstrations, 0 where it ran as a full prompt.
    ``probabilities``: also ``".../prob"``, the full-vocabulary probabilities of the top-10 tokens (N, 10), and
    ``".../label_prob"``, the label words' probabilities renormalised over the labels (N, C) (not stored in the
    cached results; for checking two implementations against each other).
    Used in: Shallow layers gather, deep layers extract: saliency and isolation; Anchors without meaning.
    """
    from tqdm.auto import tqdm

    check_prompts(lm, prompts, task)
    label_ids = list(label_token_ids(task, lm.tokenizer))
    conditions = _conditions(ks, random_ks)
    n = len(prompts)
    pad = lm.tokenizer.pad_token_id
    split = split_prompts(prompts) if shared_prefix else SharedPrefix((), (), tuple(range(n)))
    names = ["none" if w == "none" else condition_name(w, p, k) for w, p, k in conditions]
    rows: dict[str, list] = {name: [] for name in names}  # (indices, final hidden states at q) per batch

    def full_hooks(what, where, k, idx):
        layers = isolated_layers(lm.n_layers, k, where) if what != "none" else []
        if what == "label":
            return [Isolate([prompts[i].label_positions for i in idx], layers)]
        if what == "random":
            per_example = [random_positions(prompts[i], layers, seed, i) for i in idx]
            return [Isolate({layer: [r[layer] for r in per_example] for layer in layers})]
        return []

    shared = list(split.shared)
    n_demo = len(split.ids)
    if shared:
        labels = {prompts[i].label_positions for i in shared}
        if len(labels) != 1:
            raise ValueError("prompts sharing their demonstration tokens have different label positions")
        label_positions = list(next(iter(labels)))
    suffix_length = lambda i: len(prompts[i]) - n_demo  # noqa: E731
    full_length = lambda i: len(prompts[i])  # noqa: E731
    apart_batches = _by_length(split.apart, full_length, batch_size)
    shared_batches = _by_length(shared, suffix_length, batch_size)
    random_batches = _by_length(shared, full_length, batch_size)
    total = len(conditions) * len(apart_batches) + len(conditions) * len(shared_batches)
    bar = tqdm(total=total, desc=f"isolation {task.name}", disable=not progress)
    with torch.no_grad():
        plain = build_prefix(lm.model, split.ids, drop_unreachable=False) if shared else None
        for (what, where, k), name in zip(conditions, names):
            if not shared:
                break
            if what == "random":  # each example from its first drawn position on, over the plain prefix up to it
                layers = isolated_layers(lm.n_layers, k, where)
                for idx in random_batches:
                    per_example = [random_positions(prompts[i], layers, seed, i) for i in idx]
                    cut = min(n_demo, min(_first_drawn(r) for r in per_example))
                    hook = Isolate({layer: [[q - cut for q in r[layer]] for r in per_example] for layer in layers})
                    suffixes = [prompts[i].input_ids[cut:] for i in idx]
                    with intervene(hook):
                        if cut == 0:
                            hidden = _target_hidden(lm.model, [prompts[i] for i in idx], pad)
                        else:
                            hidden = suffix_hidden(lm.model, plain.truncate(cut), suffixes, pad)
                    rows[name].append((idx, hidden))
                    bar.update()
                continue
            if what == "label":
                hooks = [Isolate([label_positions], isolated_layers(lm.n_layers, k, where))]
                prefix = build_prefix(lm.model, split.ids, hooks)
            else:
                prefix = plain.keep(range(n_demo))  # drops what sliding windows can no longer see, as build_prefix
            for idx in shared_batches:
                rows[name].append((idx, suffix_hidden(lm.model, prefix, [split.suffix(prompts[i]) for i in idx], pad)))
                bar.update()
        for (what, where, k), name in zip(conditions, names):
            for idx in apart_batches:
                with intervene(*full_hooks(what, where, k, idx)):
                    rows[name].append((idx, _target_hidden(lm.model, [prompts[i] for i in idx], pad)))
                bar.update()
        # every condition's q rows through the output layer together
        parts = [(name, idx, h) for name in names for idx, h in rows[name]]
        order = [(name, i) for name, idx, _ in parts for i in idx]
        logits = output_logits(lm.model, torch.cat([h.to(parts[0][2].device) for _, _, h in parts]),
                               rows_per_product=output_rows)
    bar.close()
    preds = logits[:, label_ids].argmax(-1).cpu().numpy()
    top = logits.topk(TOP_K_STORED, dim=-1)
    top_ids = top.indices.cpu().numpy()
    out = {"gold": np.array([p.label for p in prompts])}
    for name in names:
        out[f"{name}/pred"] = np.zeros(n, dtype=np.int64)
        out[f"{name}/top"] = np.zeros((n, TOP_K_STORED), dtype=np.int64)
        if probabilities:
            out[f"{name}/prob"] = np.zeros((n, TOP_K_STORED), dtype=np.float64)
            out[f"{name}/label_prob"] = np.zeros((n, len(label_ids)), dtype=np.float64)
    if probabilities:
        log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
        prob = (top.values - log_z).exp().cpu().numpy()
        label_prob = torch.softmax(logits[:, label_ids], dim=-1).cpu().numpy()
    for r, (name, i) in enumerate(order):
        out[f"{name}/pred"][i] = preds[r]
        out[f"{name}/top"][i] = top_ids[r]
        if probabilities:
            out[f"{name}/prob"][i] = prob[r]
            out[f"{name}/label_prob"][i] = label_prob[r]
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
