"""Which heads move the task? Three per-head measures on one layer × head grid, and how far they agree (beyond the
paper).

The paper works per layer: its saliency sums the heads, its isolation cuts every head of a layer. Later work names
heads instead: induction heads (Olsson et al. 2022), which copy what followed an earlier occurrence of the current
token, and heads that move label information to the last token (Yu & Ananiadou 2024). Per (layer, head):

* ``induction`` - the **prefix-matching score** (Olsson et al. 2022): on a random token sequence repeated once
  (``[BOS] x_1 .. x_T x_1 .. x_T``, tokens drawn without replacement, so each occurs once per copy), the attention
  from each token of the second copy to the token that followed its first occurrence, averaged over the positions
  of the second copy (:func:`induction_scores`). No task is involved: the sequences are drawn per (task, seed) only
  so that every (task, seed) run holds its own draw.
* ``saliency`` - **S_pq per head**: the saliency of Eq. 1 before its sum over heads, ``|A_h ⊙ dL/dA_h|`` from the
  target q to each label word, averaged over the label words (:func:`head_saliency`). The paper's S_pq takes the
  absolute value after summing the heads; per head it is taken per head (the signed per-head values are stored, and
  their sum over heads gives the paper's S_pq exactly: tested).
* ``isolation`` - the **effect of cutting one head**: the target's attention to every label-word token is removed
  in that head alone (its pre-softmax scores set to -1e4, the official code's fill, so the head re-distributes its
  attention over the other tokens), and the label-restricted log-probability of the prediction of the uncut prompt
  falls by the effect (:func:`head_isolation`). Only the target's row changes, so every prompt runs once without its
  last token and the last token once per head over that key/value cache (checked against full passes).

Prompts: one fixed demonstration set per seed (one demonstration per class), the same prompts for saliency and
isolation. :func:`overlap` compares the measures' rankings of the heads: Spearman's rank correlation and the
intersection of the top-k heads, each against a permutation baseline (the heads of one ranking shuffled).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.attention import Hook, Record, Saliency, intervene
from ..core.findings import NOT_REPRODUCED, PARTLY, REPRODUCED, TASK_NAMES, Finding, Measured
from ..core.prompts import Prompt, check_prompts, collate, label_token_ids, length_batches, target_label_logits
from ..core.runs import PROFILES, ModelKey, Profile, cached_run, make_prompts, settings_of
from ..core.stats import Estimate, bootstrap
from ..core.tasks import TaskData, load_task
from .protocol import Experiment
from .taskvectors import _split_last

__all__ = ["MEASURES", "HeadConfig", "configure", "repeated_random_tokens", "induction_scores", "head_saliency",
           "CutHead", "head_isolation", "head_run", "head_runs", "per_example", "head_map", "rank", "top_k",
           "overlap", "default_k", "saliency_matches_isolation", "agree", "EXPERIMENT", "FIELDS"]

MEASURES = ("induction", "saliency", "isolation")
FILL = -1e4  # the official code's isolation fill
# What the chapter reads from a cached run (passed to cached_run as ``expect``: a cached result without one of them is
# refused when read): the three measures' inputs (:func:`per_example`) and the gold labels (the sample size).
FIELDS = ("induction", "saliency", "isolation/base", "isolation/cut", "gold")


# --------------------------------------------------------------------------------------------------------------------
# Induction: the prefix-matching score on repeated random tokens
# --------------------------------------------------------------------------------------------------------------------


def repeated_random_tokens(tokenizer, n_sequences: int, length: int, seed: int) -> torch.Tensor:
    """(n_sequences, [1 +] 2 * length) token ids: ``length`` distinct tokens drawn from the vocabulary (special
    tokens excluded), then the same tokens again; the tokenizer's BOS first where it adds one.
    Used in: Where does the task live?"""
    if n_sequences < 1 or length < 2:
        raise ValueError(f"need at least one sequence of at least 2 tokens, got {n_sequences} x {length}")
    special = set(tokenizer.all_special_ids)
    pool = np.array([i for i in range(len(tokenizer)) if i not in special])
    if len(pool) < length:
        raise ValueError(f"the vocabulary has {len(pool)} ordinary tokens, fewer than the {length} asked for")
    bos = tokenizer("a").input_ids[:1] if _adds_bos(tokenizer) else []
    rng = np.random.default_rng([seed, 31])
    rows = []
    for _ in range(n_sequences):
        x = rng.choice(pool, size=length, replace=False).tolist()
        rows.append(bos + x + x)
    return torch.tensor(rows, dtype=torch.long)


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def induction_scores(model, ids: torch.Tensor) -> np.ndarray:
    """(L, H): per head, the mean attention from each token of the second copy to the token after its first
    occurrence (``ids`` from :func:`repeated_random_tokens`: an optional BOS, then two copies of T tokens). A head that
    attends uniformly scores about 1 / position; a perfect induction head scores 1. Used in: Where does the task live?"""
    b, width = ids.shape
    offset = width % 2  # 1 with a BOS
    t = (width - offset) // 2
    if t < 2 or not torch.equal(ids[:, offset:offset + t], ids[:, offset + t:]):
        raise ValueError("ids must hold an optional BOS, then the same T >= 2 tokens twice")
    rows = list(range(offset + t, offset + 2 * t))  # the second copy: token j of the copy at offset + t + j
    source = torch.tensor([offset + j + 1 for j in range(t)])  # the token after its first occurrence
    rec = Record(rows=torch.tensor([rows] * b))  # (B, K): K rows in every example
    device = next(model.parameters()).device
    with torch.no_grad(), intervene(rec):
        model.base_model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), use_cache=False)
    att = rec.stacked()  # (L, B, H, K, S)
    picked = att[:, :, :, torch.arange(t), source.to(att.device)]  # (L, B, H, K)
    return picked.float().mean(dim=(1, 3)).cpu().numpy()


# --------------------------------------------------------------------------------------------------------------------
# Saliency per head: S_pq before the sum over heads
# --------------------------------------------------------------------------------------------------------------------


def head_saliency(lm, task, prompts: Sequence[Prompt], batch_size: int = 4) -> np.ndarray:
    """(N, L, H, C): the signed saliency ``A_h ⊙ dL/dA_h`` (Eq. 1 before the sum over heads and the absolute value)
    from each prompt's target q to its label word of each class, the loss the cross-entropy of the label words'
    logits against the gold label. ``|.|`` averaged over C is S_pq per head; summed over heads, then ``|.|`` and
    averaged over C, it is the paper's S_pq (:func:`helpers.core.saliency.saliency_flow`). Prompts batched by length,
    each example's result that of a batch of one. Used in: Where does the task live?"""
    check_prompts(lm, prompts, task)
    label_ids = list(label_token_ids(task, lm.tokenizer))
    lengths = [len(p) for p in prompts]
    out: list[np.ndarray | None] = [None] * len(prompts)
    budget = batch_size * int(np.median(lengths))
    for idx in length_batches(lengths, budget, batch_size):
        chunk = [prompts[i] for i in idx]
        batch = collate(chunk, lm.tokenizer.pad_token_id)
        hook = Saliency()
        with torch.enable_grad(), intervene(hook):
            logits = target_label_logits(lm.model, batch, label_ids)
            loss = F.cross_entropy(logits.float(), batch.labels.to(logits.device), reduction="sum")
        loss.backward()
        grads = hook.per_layer()  # (L, B, H, T, S)
        for b, (i, p) in enumerate(zip(idx, chunk)):
            out[i] = grads[:, b, :, p.target][:, :, list(p.label_positions)].float().cpu().numpy()  # (L, H, C)
        del grads, hook
    return np.stack(out)


# --------------------------------------------------------------------------------------------------------------------
# Isolation per head: the target's attention to the label words cut in one head
# --------------------------------------------------------------------------------------------------------------------


class CutHead(Hook):
    """In layer ``layer``, head ``head`` only, set the pre-softmax scores of the pass's **last** query row to the
    key columns ``columns`` (one list per example: absolute positions, e.g. every label-word token) to ``fill``:
    that head of the last token no longer reads those tokens. Used in: Where does the task live?"""

    def __init__(self, layer: int, head: int, columns: Sequence[Sequence[int]], fill: float = FILL):
        super().__init__([layer])
        self.layer, self.head, self.fill = int(layer), int(head), float(fill)
        self.columns = [list(map(int, c)) for c in columns]
        if not self.columns or any(not c or min(c) < 0 for c in self.columns):
            raise ValueError("CutHead needs one non-empty list of positions >= 0 per example")

    def pre_softmax(self, layer, scores):
        b, h, t, s = scores.shape
        if self.head >= h:
            raise ValueError(f"CutHead: head {self.head} of layer {layer}, which has {h} heads")
        if len(self.columns) != b:
            raise ValueError(f"CutHead has columns for {len(self.columns)} examples, the batch has {b}")
        if max(max(c) for c in self.columns) >= s - 1:
            raise ValueError(f"CutHead: a column is at or beyond the last token ({s} keys): cut earlier tokens only")
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for i, cols in enumerate(self.columns):
            mask[i, self.head, t - 1, cols] = True
        # never raise a score: a column the mask already hides (a sliding window) stays hidden
        return torch.where(mask, torch.clamp(scores, max=self.fill), scores)


def head_isolation(lm, task, prompts: Sequence[Prompt], layers: Sequence[int], batch_size: int = 16,
                   ) -> dict[str, np.ndarray]:
    """The label words' logits at each prompt's target, uncut (``base`` (N, C)) and with the target's attention to
    every label-word token cut in one head at a time (``cut`` (N, len(layers), H, C)), via :func:`CutHead` over one
    key/value cache of each prompt without its target. Used in: Where does the task live?"""
    check_prompts(lm, prompts, task)
    for p in prompts:
        if p.target != len(p) - 1:
            raise ValueError("the target must be each prompt's last token")
    label_ids = list(label_token_ids(task, lm.tokenizer))
    rows = [p.input_ids for p in prompts]
    cols = [[i for start, end in p.label_spans for i in range(start, end)] for p in prompts]
    heads = range(lm.n_heads)
    steps = [lambda idx: []] + [
        (lambda idx, layer=layer, head=head: [CutHead(layer, head, [cols[i] for i in idx])])
        for layer in layers for head in heads]
    out = _split_last(lm, rows, label_ids, steps, batch_size)
    cut = torch.stack(out[1:]).reshape(len(layers), lm.n_heads, len(prompts), -1).permute(2, 0, 1, 3)
    return {"base": out[0].numpy().astype(np.float32), "cut": cut.numpy().astype(np.float32)}


# --------------------------------------------------------------------------------------------------------------------
# One (task, seed)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadConfig:
    """The sizes: ``n_test`` prompts per (task, seed) for saliency and isolation, ``n_sequences`` repeated random
    sequences of ``length`` tokens for the induction score, ``n_seeds`` seeds of the profile."""

    profile: Profile
    n_test: int
    n_sequences: int
    length: int
    n_seeds: int


_SIZES = {"quick": (4, 2, 16, 1), "book": (16, 8, 32, 3), "paper": (64, 16, 64, 5)}


def configure(profile: str = "book") -> HeadConfig:
    return HeadConfig(PROFILES[profile], *_SIZES[PROFILES[profile].name])


def _seeds(config: HeadConfig, model: str) -> tuple[int, ...]:
    return config.profile.seeds_for(config.n_seeds)


def head_run(lm, data: TaskData, seed: int, n_test: int, n_sequences: int, length: int,
             batch_size: int = 8) -> dict[str, np.ndarray]:
    """Every per-head measure for one (task, seed): ``induction`` (L, H), ``saliency`` (N, L, H, C) signed,
    ``isolation/base`` (N, C) and ``isolation/cut`` (N, L, H, C) label-word logits, ``gold`` (N,).
    Used in: Where does the task live?"""
    task_index = list(TASK_NAMES).index(data.task.name) if data.task.name in TASK_NAMES else 0
    ids = repeated_random_tokens(lm.tokenizer, n_sequences, length, seed * 10 + task_index)
    induction = induction_scores(lm.model, ids)
    prompts = make_prompts(lm, data, seed, n_test, 1, per_example=False)
    saliency = head_saliency(lm, data.task, prompts, max(1, batch_size // 2))
    iso = head_isolation(lm, data.task, prompts, list(range(lm.n_layers)), 2 * batch_size)
    return {"induction": induction, "saliency": saliency.astype(np.float32), "isolation/base": iso["base"],
            "isolation/cut": iso["cut"], "gold": np.array([p.label for p in prompts])}


def head_runs(lm, data: TaskData, config: HeadConfig, seeds: Sequence[int] | None = None,
              lookup_only: bool = False) -> list[dict[str, np.ndarray] | None]:
    """One cached :func:`head_run` per seed. Used in: Where does the task live?"""
    out = []
    for seed in seeds if seeds is not None else _seeds(config, lm.name):
        settings = settings_of(config.profile, seed=seed, shots=1, n_test=config.n_test,
                               n_sequences=config.n_sequences, length=config.length)

        def compute(seed=seed):
            return head_run(lm, data, seed, config.n_test, config.n_sequences, config.length,
                            config.profile.batch_size)

        out.append(cached_run("heads", lm, data, settings, compute, lookup_only=lookup_only, expect=FIELDS))
    return out


def run(lm, data: TaskData, config: HeadConfig, seed: int, lookup_only: bool = False) -> dict:
    """One (task, seed): the three per-head measures."""
    return {"heads": head_runs(lm, data, config, [seed], lookup_only)[0]}


# --------------------------------------------------------------------------------------------------------------------
# Maps, rankings, overlap
# --------------------------------------------------------------------------------------------------------------------


def _log_probs(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=float)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def per_example(run: dict[str, np.ndarray], measure: str) -> np.ndarray:
    """(N, L, H) per example: S_pq per head (``saliency``), or the fall in the label-restricted log-probability of
    the uncut prediction when the head is cut (``isolation``); (1, L, H) for ``induction`` (one value per run)."""
    if measure == "induction":
        return np.asarray(run["induction"], dtype=float)[None]
    if measure == "saliency":
        return np.abs(np.asarray(run["saliency"], dtype=float)).mean(-1)
    if measure == "isolation":
        base = _log_probs(run["isolation/base"])  # (N, C)
        pred = base.argmax(-1)
        cut = _log_probs(run["isolation/cut"])  # (N, L, H, C)
        n = np.arange(len(pred))
        return base[n, pred][:, None, None] - cut[n, :, :, pred]
    raise ValueError(f"measure must be one of {', '.join(MEASURES)}, not {measure!r}")


def head_map(runs: dict[str, Sequence[dict]], measure: str) -> np.ndarray:
    """(L, H): ``measure`` averaged over examples, then seeds, then tasks. Used in: Where does the task live?"""
    return np.mean([np.mean([per_example(r, measure).mean(0) for r in rs], 0) for rs in runs.values()], 0)


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks (1 = smallest; ties get their mean rank) of a flattened map."""
    from scipy.stats import rankdata

    return rankdata(np.asarray(values, dtype=float).ravel())


def top_k(values: np.ndarray, k: int) -> set[int]:
    """The flat indices of the ``k`` largest entries (ties broken by the earlier index)."""
    flat = np.asarray(values, dtype=float).ravel()
    return set(np.argsort(-flat, kind="stable")[:k].tolist())


def overlap(a: np.ndarray, b: np.ndarray, k: int, n_permutations: int = 10_000, seed: int = 0) -> dict[str, float]:
    """How far two (L, H) maps rank the heads alike: ``spearman`` (rank correlation over all heads), ``top_k`` (how
    many of the k highest heads of ``a`` are among those of ``b``), and their permutation baselines: the same
    statistics with the heads of ``a`` shuffled (``spearman_p``, ``top_k_p``: the share of shuffles at least as
    large, one-sided; ``top_k_null``: the shuffles' mean, k² / heads in expectation; ``top_k_null_95``: their 95th
    percentile). Used in: Where does the task live?"""
    ra, rb = rank(a), rank(b)
    if ra.shape != rb.shape:
        raise ValueError(f"the maps must cover the same heads: {np.shape(a)} and {np.shape(b)}")
    n = ra.size
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the {n} heads, got {k}")
    rho = float(np.corrcoef(ra, rb)[0, 1])
    tb = top_k(b, k)
    inter = len(top_k(a, k) & tb)
    rng = np.random.default_rng(seed)
    flat = np.asarray(a, dtype=float).ravel()
    rhos, inters = np.empty(n_permutations), np.empty(n_permutations)
    for i in range(n_permutations):
        perm = rng.permutation(n)
        rhos[i] = np.corrcoef(ra[perm], rb)[0, 1]
        inters[i] = len(top_k(flat[perm], k) & tb)
    return {"spearman": rho, "spearman_p": float((1 + np.sum(rhos >= rho)) / (1 + n_permutations)),
            "top_k": float(inter), "k": float(k), "top_k_null": float(inters.mean()),
            "top_k_null_95": float(np.quantile(inters, 0.95)),
            "top_k_p": float((1 + np.sum(inters >= inter)) / (1 + n_permutations)), "heads": float(n)}


def default_k(n_heads_total: int) -> int:
    """The top-k the chapter compares: a tenth of the heads, at least 3."""
    return max(3, n_heads_total // 10)


# --------------------------------------------------------------------------------------------------------------------
# The verdict row
# --------------------------------------------------------------------------------------------------------------------


def _all_runs(model: str, profile: Profile) -> dict[str, list] | None:
    lm = ModelKey.of(model)
    config = configure(profile.name)
    runs = {t: head_runs(lm, load_task(t), config, lookup_only=True) for t in TASK_NAMES}
    return None if any(r is None for rs in runs.values() for r in rs) else runs


def _correlation_per_seed(runs: dict[str, Sequence[dict]], a: str, b: str) -> list[np.ndarray]:
    """Per (task, seed), the per-example Spearman correlation between measure ``a``'s head ranking on that
    example (the run's map for induction) and ``b``'s; task-major, for the pooled bootstrap."""
    from scipy.stats import spearmanr

    out = []
    for rs in runs.values():
        for r in rs:
            xa, xb = per_example(r, a), per_example(r, b)
            if xa.shape[0] == 1:
                xa = np.repeat(xa, xb.shape[0], 0)
            out.append(np.array([spearmanr(u.ravel(), v.ravel())[0] for u, v in zip(xa, xb)]))
    return out


def saliency_matches_isolation(model: str, profile: Profile) -> Measured | None:
    """Spearman's correlation between the heads' S_pq and the effect of cutting them, per example, averaged (4
    tasks pooled); beside it the top-k overlap of the two mean maps and its permutation baseline."""
    runs = _all_runs(model, profile)
    if runs is None:
        return None
    est: Estimate = bootstrap(_correlation_per_seed(runs, "saliency", "isolation"),
                              lambda x: float(np.nanmean(x)))
    sal, iso = head_map(runs, "saliency"), head_map(runs, "isolation")
    k = default_k(sal.size)
    o = overlap(sal, iso, k)
    n_seeds = len(next(iter(runs.values())))
    return Measured(est, digits=2, n_text=f"{est.n_examples} × {n_seeds} seeds × 4 tasks",
                    note=(f"top-{k} heads shared by the two mean maps: {o['top_k']:.0f} of {k} (shuffled heads: "
                          f"{o['top_k_null']:.1f} on average, 95th percentile {o['top_k_null_95']:.0f}); rank "
                          f"correlation of the mean maps {o['spearman']:.2f}"),
                    support={"overlap": o})


def agree(m: Measured) -> str:
    """Reproduced (the heads that carry the label words' information to the target by saliency are the ones whose
    cut moves the prediction): the 95% interval of the mean per-example rank correlation lies above 0 and the top-k
    overlap of the mean maps exceeds the 95th percentile of its permutation baseline. Partly: only the 80%
    interval lies above 0, or only one of the two holds. Not reproduced otherwise."""
    e, o = m.estimate, m.support.get("overlap", {})
    weak = e.low if e.weak_low is None else e.weak_low
    beyond = o.get("top_k", 0) > o.get("top_k_null_95", np.inf)
    if e.low > 0 and beyond:
        return REPRODUCED
    if weak > 0 or beyond:
        return PARTLY
    return NOT_REPRODUCED


EXPERIMENT = Experiment(
    name="heads", title="Where does the task live?", chapter="book/task-vectors",
    configure=configure, seeds=_seeds, run=run,
    findings=(
        Finding("heads-saliency-isolation", "The heads through which the label words' information reaches the "
                "target (per-head S_pq) are the heads whose cut changes the prediction.",
                "implied by §2.1-2.2 per layer; the paper gives no per-head number", "beyond the paper",
                "book/task-vectors", "sec-tv-heads", saliency_matches_isolation, agree, pooled=True),
    ),
)
