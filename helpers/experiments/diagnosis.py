"""Anchor distances for error diagnosis (paper §3.3, Appendices J and K): do classes whose label-word keys lie close
together, seen from the directions the target's queries vary in, get confused by the model?

**Recording.** One forward pass per prompt through the book's one attention function, with the
:class:`~helpers.core.attention.RecordQK` hook: at every layer, the query vector at the target q and the key vectors at
the label-word positions p_i, exactly as the attention receives them (after the model's rotary embedding and q/k
norms, before the scaling). Heads are flattened into one vector per token, as the paper does for GPT2-XL
(25 × 64 = 1600 dimensions).

**Grouped-query attention.** A GQA model has H query heads but only H_kv < H key heads; query head h scores against
key head ``h // (H / H_kv)``. We record the H_kv key heads as they are, and flatten by **repeating each key head for
its query heads** (:func:`flatten_heads`), exactly as the attention does before ``Q K^T``. Then query and key live in
the same H·D-dimensional space and the flattened dot product q·k is the sum over heads of the per-head scores,
which is what makes "the directions the queries vary in" meaningful for the keys.

**Demonstrations.** One demonstration per class, one set per seed (scheme A), shared by every test prompt. Because
attention is causal, the label words' keys depend only on the demonstrations before them, so they are the same in
every prompt of a seed: we keep those of the first prompt and store how much they vary over the prompts
(``key_spread``, relative; numerical noise only).

**Predicted confusion** (Appendix J, :func:`anchor_projection`, :func:`predicted_confusion`): fit a PCA on the T
target queries of a layer, keep the top M directions v_1..v_M with standard deviations σ_i, and project each label
key: k̂_i = (σ_1 v_1ᵀk_i, ..., σ_M v_Mᵀk_i). Then Confusion_pred_ij = ‖k̂_i − k̂_j‖ / max_{s≠t} ‖k̂_s − k̂_t‖
(0 = most confusable).

**Real confusion** (Appendix K, :func:`real_confusion`): for each class pair, the AUC-ROC of p_i / (p_i + p_j) at
separating the test examples of gold class i from those of gold class j (0.5 = fully confused).

**Agreement** (beyond the paper): Spearman's ρ between the two over the C(C−1)/2 class pairs
(:func:`pair_spearman`), with an exact permutation test that relabels the classes of one matrix
(:func:`permutation_test`); the rank of the most-confused pair among the predicted ones (:func:`most_confused`).
Baselines without anchors: distances between the mean query of each gold class, and between the label words' input
embeddings (:func:`normalised_distances` on those vectors).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

from ..core.attention import RecordQK, intervene
from ..core.prompts import Prompt, collate, label_token_ids, target_logits
from ..core.runs import Profile, cached_run, make_prompts, settings_of
from ..core.tasks import Task, TaskData
from ..core.findings import NOT_REPRODUCED, PARTLY, REPRODUCED, Finding, Measured
from ..core.runs import PROFILES, ModelKey
from ..core.tasks import TASKS, load_task
from .protocol import Experiment

__all__ = ["M_MAX", "MS", "N_QUERY_PCS", "default_layer", "flatten_heads", "record_qk", "anchor_projection",
           "normalised_distances", "predicted_confusion", "real_confusion", "pairwise_auc", "pair_values",
           "pair_names", "pair_spearman", "permutation_test", "pooled_permutation_test", "pooled_p_text", "most_confused",
           "diagnose", "diagnosis_runs",
           "n_test_of", "BASELINES", "predictors", "spearman_estimate", "layer_curve", "summary", "FIELDS"]

M_MAX = 50  # principal directions kept in the stored results (the paper: M = 10; Figure 14 up to 200)
MS = (5, 10, 20, 50)  # the M sweep of the chapter
# What the chapter reads from a cached run (passed to cached_run as ``expect``: a cached result without one of them is
# refused when read); ``sigma`` and ``query_pc`` are stored for inspection, not read.
FIELDS = ("probs", "pred", "gold", "keys", "key_spread", "khat", "explained", "class_query_dist", "embedding_dist")
N_QUERY_PCS = 3  # coordinates of each query on the first principal directions, kept for the scatter plot


def default_layer(n_layers: int) -> int:
    """The paper's layer, 32 of GPT2-XL's 48 (0-based), as a fraction of the depth: round(2/3 · n_layers)."""
    return int(round(2 * n_layers / 3))


def flatten_heads(vectors: np.ndarray | torch.Tensor, n_heads: int) -> np.ndarray:
    """(..., H_x, D) -> (..., n_heads·D), repeating each of the H_x heads n_heads / H_x times (GQA keys).

    For queries (H_x = n_heads) this is a plain reshape. For the keys of a grouped-query model each key head is
    repeated for the query heads that use it, in the order of ``repeat_interleave`` (as the attention function), so
    that ``flatten_heads(q) · flatten_heads(k)`` = Σ_h q_h · k_{h // groups}.
    """
    x = np.asarray(vectors, dtype=np.float32)
    h = x.shape[-2]
    if n_heads % h:
        raise ValueError(f"{n_heads} query heads cannot share {h} key heads evenly")
    x = np.repeat(x, n_heads // h, axis=-2)
    return x.reshape(*x.shape[:-2], -1)


def record_qk(lm, task: Task, prompts: Sequence[Prompt], batch_size: int = 8,
              progress: bool = True) -> dict[str, np.ndarray]:
    """One forward pass per prompt (batched) recording Q at q and K at the label words in every layer.

    Every prompt must have one demonstration per class and the same demonstrations (scheme A).
    Prompts are batched by length (less padding); results come back in the order of ``prompts``.
    Returns ``queries`` (N, L, H·D) float32 (heads flattened), ``keys`` (L, C, H_kv, D) float32 from the shortest
    prompt (class order), ``key_spread`` (L,) the largest ``|k - k_first|`` over prompts
    relative to the largest ``|k_first|``, ``probs``
    (N, C) label probabilities, ``pred`` (N,), ``gold`` (N,).
    """
    from tqdm.auto import tqdm

    if not prompts:
        raise ValueError("record_qk needs at least one prompt")
    label_ids = list(label_token_ids(task, lm.tokenizer))
    layers = range(lm.n_layers)
    queries: list[np.ndarray | None] = [None] * len(prompts)
    probs: list[np.ndarray | None] = [None] * len(prompts)
    keys0: np.ndarray | None = None
    spread = np.zeros(lm.n_layers)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))  # similar lengths batched: less padding
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"Q/K {task.name}", disable=not progress):
        idx = order[start: start + batch_size]
        batch = collate([prompts[i] for i in idx], lm.tokenizer.pad_token_id)
        hook = RecordQK(batch.target, batch.label_positions(), layers)
        with torch.no_grad(), intervene(hook):
            logits = target_logits(lm.model, batch)[:, label_ids].float()
        q = torch.stack([hook.queries[layer] for layer in layers], dim=1)  # (B, L, H, D)
        k = torch.stack([hook.keys[layer] for layer in layers], dim=1).float().cpu().numpy()  # (B, L, C, H_kv, D)
        p = torch.softmax(logits, dim=-1).cpu().numpy()
        for b, i in enumerate(idx):
            queries[i] = q[b].reshape(q.shape[1], -1).float().cpu().numpy()
            probs[i] = p[b]
        if keys0 is None:
            keys0 = k[0]
        scale = np.abs(keys0).reshape(lm.n_layers, -1).max(axis=1)
        spread = np.maximum(spread, np.abs(k - keys0).reshape(len(idx), lm.n_layers, -1).max(axis=(0, 2)) / scale)
    probs_arr = np.stack(probs)
    return {
        "queries": np.stack(queries),
        "keys": keys0,
        "key_spread": spread,
        "probs": probs_arr,
        "pred": probs_arr.argmax(-1),
        "gold": np.array([p.label for p in prompts]),
    }


def anchor_projection(queries: np.ndarray, keys: np.ndarray, m: int) -> dict[str, np.ndarray]:
    """Paper Appendix J: k̂_i = (σ_1 v_1ᵀk_i, ..., σ_M v_Mᵀk_i), v the top-M principal directions of the queries.

    ``queries`` (T, D) and ``keys`` (C, D) in the same flattened space (see :func:`flatten_heads`). The keys are
    projected without centring, as the official notebook (a common translation cancels in distances).
    Returns ``khat`` (C, M), ``sigma`` (M,) the standard deviation of the queries along each direction,
    ``explained`` (M,) the explained-variance ratios, ``query_pc`` (T, M) the centred queries' coordinates.
    """
    from sklearn.decomposition import PCA

    queries = np.asarray(queries, dtype=np.float64)
    keys = np.asarray(keys, dtype=np.float64)
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries (T, D) and keys (C, D) must share D; got {queries.shape} and {keys.shape}")
    if not 1 <= m <= min(queries.shape) - 1:
        raise ValueError(f"M = {m} principal directions need more than M queries and dimensions ({queries.shape})")
    pca = PCA(n_components=m, svd_solver="full").fit(queries)
    sigma = np.sqrt(pca.explained_variance_)
    return {
        "khat": (keys @ pca.components_.T) * sigma,
        "sigma": sigma,
        "explained": pca.explained_variance_ratio_,
        "query_pc": pca.transform(queries),
    }


def normalised_distances(vectors: np.ndarray) -> np.ndarray:
    """‖x_i − x_j‖ / max_{s≠t} ‖x_s − x_t‖ for the rows of ``vectors`` (C, D): (C, C), diagonal 1 (for display)."""
    x = np.asarray(vectors, dtype=np.float64)
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    off = ~np.eye(len(x), dtype=bool)
    top = d[off].max()
    if not top > 0:
        raise ValueError("all vectors coincide: normalised distances are undefined")
    d = d / top
    np.fill_diagonal(d, 1.0)
    return d


def predicted_confusion(khat: np.ndarray) -> np.ndarray:
    """Paper Appendix J: Confusion_pred_ij = ‖k̂_i − k̂_j‖ / max_{s≠t} ‖k̂_s − k̂_t‖ (0 = most confusable; diagonal 1)."""
    return normalised_distances(khat)


def pairwise_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUC-ROC of ``scores`` for the boolean ``positive`` (ties count one half), via the Mann-Whitney U statistic."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def real_confusion(probs: np.ndarray, gold: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """Paper Appendix K: (C, C) AUC-ROC of p_i / (p_i + p_j) separating gold class i from gold class j.

    Symmetric; 0.5 = the model cannot tell i from j, 1 = perfectly separated. Diagonal 1. NaN for a pair whose class
    has no test example.
    """
    probs = np.asarray(probs, dtype=np.float64)
    gold = np.asarray(gold)
    c = n_classes or probs.shape[1]
    out = np.ones((c, c))
    for i, j in itertools.combinations(range(c), 2):
        keep = (gold == i) | (gold == j)
        p = probs[keep]
        with np.errstate(invalid="ignore", divide="ignore"):
            score = p[:, i] / (p[:, i] + p[:, j])
        out[i, j] = out[j, i] = pairwise_auc(np.nan_to_num(score, nan=0.5), gold[keep] == i)
    return out


def pair_values(matrix: np.ndarray) -> np.ndarray:
    """The C(C−1)/2 values above the diagonal, in the order of :func:`pair_names`."""
    matrix = np.asarray(matrix)
    i, j = np.triu_indices(len(matrix), k=1)
    return matrix[i, j]


def pair_names(class_names: Sequence[str]) -> list[str]:
    i, j = np.triu_indices(len(class_names), k=1)
    return [f"{class_names[a]}–{class_names[b]}" for a, b in zip(i, j)]


def pair_spearman(predicted: np.ndarray, real: np.ndarray) -> float:
    """Spearman's ρ over class pairs between a predicted-confusion matrix (a distance: small = confusable) and the
    real one (an AUC: small = confused). Positive ρ = agreement. NaN pairs are dropped."""
    from scipy.stats import spearmanr

    a, b = pair_values(predicted), pair_values(real)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


def permutation_test(predicted: np.ndarray, real: np.ndarray, max_exact: int = 40320, n_random: int = 20000,
                     seed: int = 0) -> tuple[float, float, int]:
    """One-sided permutation p-value of :func:`pair_spearman` by relabelling the classes of ``predicted``.

    Class pairs are not independent (each class is in C−1 pairs), so the pairs are not exchangeable; the classes
    are (a Mantel test): under "no relation", any relabelling of the C classes of one matrix is as likely. All C!
    relabellings are enumerated when C! <= ``max_exact`` (exact test; the identity included, so p >= 1/C!), else
    ``n_random`` random ones (p = (hits + 1) / (n + 1)). Returns (ρ, p, number of permutations).
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    real = np.asarray(real, dtype=np.float64)
    c = len(predicted)
    rho = pair_spearman(predicted, real)
    if not np.isfinite(rho):
        return rho, float("nan"), 0
    if math.factorial(c) <= max_exact:
        perms = itertools.permutations(range(c))
        exact = True
    else:
        rng = np.random.default_rng(seed)
        perms = (rng.permutation(c) for _ in range(n_random))
        exact = False
    hits = n = 0
    for perm in perms:
        perm = np.asarray(perm)
        r = pair_spearman(predicted[np.ix_(perm, perm)], real)
        hits += r >= rho - 1e-12
        n += 1
    p = hits / n if exact else (hits + 1) / (n + 1)
    return rho, float(p), n


def pooled_permutation_test(predicted: Sequence[np.ndarray], real: Sequence[np.ndarray], max_exact: int = 40320,
                            n_random: int = 20000, seed: int = 0) -> tuple[float, float, int]:
    """:func:`permutation_test` of the mean ρ over demonstration sets (seeds): one relabelling of the C classes is
    applied to every seed's predicted matrix at once, so the seeds' shared structure is kept under the null and the
    test asks whether the seeds *together* match the real confusion better than shuffled class names do. With one
    seed it is :func:`permutation_test`. Returns (mean ρ, p, number of permutations)."""
    predicted = [np.asarray(a, dtype=np.float64) for a in predicted]
    real = [np.asarray(b, dtype=np.float64) for b in real]
    c = len(predicted[0])

    def mean_rho(perm):
        return float(np.mean([pair_spearman(a[np.ix_(perm, perm)], b) for a, b in zip(predicted, real)]))

    rho = mean_rho(np.arange(c))
    if not np.isfinite(rho):
        return rho, float("nan"), 0
    exact = math.factorial(c) <= max_exact
    if exact:
        perms = itertools.permutations(range(c))
    else:
        rng = np.random.default_rng(seed)
        perms = (rng.permutation(c) for _ in range(n_random))
    hits = n = 0
    for perm in perms:
        hits += mean_rho(np.asarray(perm)) >= rho - 1e-12
        n += 1
    p = hits / n if exact else (hits + 1) / (n + 1)
    return rho, float(p), n


def pooled_p_text(per_seed: Sequence[dict[str, np.ndarray]], layer: int, m: int = 10,
                  predictor: str = "anchor keys, query PCA") -> str:
    """The p-value of :func:`pooled_permutation_test` on the seeds of one (model, task) at ``layer`` and ``m``
    ("0.022"), the test the verdict's *partly* needs. Used in: Diagnosis."""
    mats = [predictors(r, layer, m)[predictor] for r in per_seed]
    reals = [real_confusion(r["probs"], r["gold"], mats[0].shape[0]) for r in per_seed]
    return f"{pooled_permutation_test(mats, reals)[1]:.3f}"


def most_confused(predicted: np.ndarray, real: np.ndarray) -> dict:
    """The most-confused pair in reality (lowest AUC) and in prediction (smallest distance), and the rank (1 = first)
    of the real one among the predicted pairs, ties counted in its favour. Pairs are index tuples (i, j), i < j."""
    a, b = pair_values(predicted), pair_values(real)
    i, j = np.triu_indices(len(predicted), k=1)
    real_k = int(np.nanargmin(b))
    pred_k = int(np.nanargmin(a))
    return {
        "real": (int(i[real_k]), int(j[real_k])),
        "predicted": (int(i[pred_k]), int(j[pred_k])),
        "rank_of_real": int((a < a[real_k]).sum()) + 1,
        "n_pairs": len(a),
    }


def diagnose(lm, task: Task, prompts: Sequence[Prompt], batch_size: int = 8, m_max: int = M_MAX,
             progress: bool = True, key_prompts: Sequence[Prompt] | None = None) -> dict[str, np.ndarray]:
    """Record Q/K once for all layers and reduce them to the small arrays the chapter needs (stored results).

    Queries come from ``prompts``; the label words' keys from ``key_prompts`` when given (default: ``prompts``
    themselves, which then share one demonstration set). The official code builds it the other way round from the
    book's default: keys from one fixed prompt, queries from prompts whose demonstrations rotate; pass that fixed
    prompt as ``key_prompts=[prompt]`` and the rotating ones as ``prompts``. Every key prompt must share its
    demonstrations (``key_spread`` says how far their keys differ). Used in: Diagnosing confusions.

    Returns, with L layers, C classes, M = min(m_max, N − 1) directions:
    ``probs`` (N, C), ``pred``, ``gold`` (N,); ``keys`` (L, C, H_kv·D) the un-repeated label keys;
    ``key_spread`` (L,); ``khat`` (L, C, M), ``sigma`` (L, M), ``explained`` (L, M) from :func:`anchor_projection`;
    ``query_pc`` (N, L, 3) the first coordinates of each query; ``class_query_dist`` (L, C, C) distances between
    the mean queries of each gold class (NaN for a class without examples); ``embedding_dist`` (C, C) distances
    between the label words' (first-token) input embeddings.
    """
    rec = record_qk(lm, task, prompts, batch_size=batch_size, progress=progress)
    queries, keys, gold = rec["queries"], rec["keys"], rec["gold"]
    spread = rec["key_spread"]
    if key_prompts is not None:  # keys from other prompts (e.g. one fixed prompt, as the official code)
        key_rec = record_qk(lm, task, key_prompts, batch_size=batch_size, progress=progress)
        keys, spread = key_rec["keys"], key_rec["key_spread"]
    n, n_layers, _ = queries.shape
    m = min(m_max, n - 1)
    c = task.n_classes
    keys_flat = flatten_heads(keys, lm.n_heads)  # (L, C, H·D)
    khat, sigma, explained, query_pc, class_dist = [], [], [], [], []
    for layer in range(n_layers):
        proj = anchor_projection(queries[:, layer], keys_flat[layer], m)
        khat.append(proj["khat"])
        sigma.append(proj["sigma"])
        explained.append(proj["explained"])
        query_pc.append(proj["query_pc"][:, :N_QUERY_PCS])
        means = np.stack([queries[gold == k, layer].mean(0) if (gold == k).any() else
                          np.full(queries.shape[-1], np.nan) for k in range(c)])
        class_dist.append(np.sqrt(((means[:, None] - means[None]) ** 2).sum(-1)))
    emb = lm.model.get_input_embeddings().weight.detach()[list(label_token_ids(task, lm.tokenizer))].float().cpu()
    emb = emb.numpy().astype(np.float64)
    return {
        "probs": rec["probs"].astype(np.float32),
        "pred": rec["pred"],
        "gold": gold,
        "keys": keys.reshape(n_layers, c, -1).astype(np.float32),
        "key_spread": spread,
        "khat": np.stack(khat).astype(np.float32),
        "sigma": np.stack(sigma).astype(np.float32),
        "explained": np.stack(explained).astype(np.float32),
        "query_pc": np.stack(query_pc, axis=1).astype(np.float32),
        "class_query_dist": np.stack(class_dist),
        "embedding_dist": np.sqrt(((emb[:, None] - emb[None]) ** 2).sum(-1)),
    }


def n_test_of(profile: Profile) -> int:
    """Test examples per (task, seed) for this chapter: ``profile.n_test_diagnosis`` (or ``n_test``)."""
    return getattr(profile, "n_test_diagnosis", 0) or profile.n_test


def diagnosis_runs(lm, data: TaskData, profile: Profile, seeds: Sequence[int] | None = None,
                   **kw) -> list[dict[str, np.ndarray]]:
    """One :func:`diagnose` result per seed (scheme A, one demonstration per class), cached."""
    out = []
    n_test = n_test_of(profile)
    for seed in (profile.seeds if seeds is None else seeds):
        def compute(seed=seed):
            prompts = make_prompts(lm, data, seed, n_test, 1, per_example=False)
            return diagnose(lm, data.task, prompts, batch_size=profile.batch_size)

        settings = settings_of(profile, seed=seed, shots=1, n_test=n_test, m_max=M_MAX)
        # a class with no test example has no mean query: NaN distances (documented in diagnose)
        out.append(cached_run("diagnosis", lm, data, settings, compute, allow_nan=("class_query_dist",),
                              expect=FIELDS, **kw))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Reading the stored results (the chapter's numbers)
# --------------------------------------------------------------------------------------------------------------------

BASELINES = {
    "anchor keys, query PCA": "k̂ of the label words (the paper's predictor)",
    "anchor keys, all dimensions": "the label words' keys, no PCA (every direction weighs the same)",
    "mean query per gold class": "no anchors: distances between the mean target queries of each gold class",
    "label-word embeddings": "no anchors, no context: distances between the label words' input embeddings",
}


def predictors(result: dict[str, np.ndarray], layer: int, m: int) -> dict[str, np.ndarray]:
    """The (C, C) predicted-confusion matrices of :data:`BASELINES` for one stored result, layer and M."""
    if m > result["khat"].shape[-1]:
        raise ValueError(f"M = {m}, but only {result['khat'].shape[-1]} directions are stored")
    return {
        "anchor keys, query PCA": predicted_confusion(result["khat"][layer, :, :m]),
        "anchor keys, all dimensions": normalised_distances(result["keys"][layer]),
        "mean query per gold class": _normalise(result["class_query_dist"][layer]),
        "label-word embeddings": _normalise(result["embedding_dist"]),
    }


def _normalise(d: np.ndarray) -> np.ndarray:
    d = np.array(d, dtype=np.float64)
    off = ~np.eye(len(d), dtype=bool)
    d = d / np.nanmax(d[off])
    np.fill_diagonal(d, 1.0)
    return d


def _rank_rows(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def _spearman_rows(pred_ranks: np.ndarray, real_pairs: np.ndarray) -> np.ndarray:
    """Spearman's ρ of each row of ``pred_ranks`` (K, P), already ranked, with ``real_pairs`` (P,)."""
    ok = np.isfinite(real_pairs)
    r = _rank_rows(real_pairs[ok])
    a = pred_ranks[:, ok] if ok.all() else _rank_rows(pred_ranks[:, ok])
    a = a - a.mean(1, keepdims=True)
    r = r - r.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a @ r) / np.sqrt((a ** 2).sum(1) * (r ** 2).sum())


_REAL_CACHE: dict[tuple[bytes, bytes], np.ndarray] = {}


def spearman_estimate(per_seed: Sequence[dict[str, np.ndarray]], matrices: Sequence[np.ndarray], **kw):
    """Spearman's ρ between predicted and real confusion, averaged over seeds, with a bootstrap interval.

    ``matrices``: per seed, one predicted (C, C) matrix or a stack (K, C, C) of them (e.g. one per layer): the
    statistic is then a curve of K values. The bootstrap (:func:`helpers.core.stats.bootstrap`) resamples the seeds,
    then the test examples within each drawn seed, and recomputes the real confusion; the predicted matrices are held
    fixed (the PCA is not refitted), so the interval covers which demonstrations and test examples were drawn, not
    the PCA's own noise. The real confusion of a
    resample is cached (the bootstrap's resamples are the same in every call), which makes many estimates cheap.
    """
    import hashlib

    from ..core.stats import bootstrap

    ranks = [_rank_rows(np.stack([pair_values(m) for m in np.reshape(mat, (-1, *np.shape(mat)[-2:]))]))
             for mat in matrices]
    scalar = np.ndim(matrices[0]) == 2
    c = np.shape(matrices[0])[-1]
    size = max(len(r["gold"]) for r in per_seed)
    token = hashlib.blake2b(b"".join(np.ascontiguousarray(r[k]).tobytes() for r in per_seed for k in ("probs", "gold")),
                            digest_size=16).digest()
    if len(_REAL_CACHE) > 200_000:
        _REAL_CACHE.clear()

    def statistic(probs, gold, ids):
        key = (token, hashlib.blake2b(ids.tobytes(), digest_size=16).digest())
        real = _REAL_CACHE.get(key)
        if real is None:
            real = _REAL_CACHE[key] = pair_values(real_confusion(probs, gold, c))
        rho = _spearman_rows(ranks[int(ids[0]) // size], real)
        return rho[0] if scalar else rho

    items = [(r["probs"], r["gold"], s * size + np.arange(len(r["gold"]))) for s, r in enumerate(per_seed)]
    return bootstrap(items, statistic, **kw)


def layer_curve(per_seed: Sequence[dict[str, np.ndarray]], m: int = 10, predictor: str = "anchor keys, query PCA",
                **kw):
    """ρ at every layer (an :class:`~helpers.core.stats.Estimate` over layers) for one predictor."""
    n_layers = per_seed[0]["khat"].shape[0]
    stacks = [np.stack([predictors(r, layer, m)[predictor] for layer in range(n_layers)]) for r in per_seed]
    return spearman_estimate(per_seed, stacks, **kw)


def summary(per_seed: Sequence[dict[str, np.ndarray]], layer: int, m: int = 10,
            predictor: str = "anchor keys, query PCA", **kw) -> dict:
    """The chapter's numbers for one (model, task) at one layer and M.

    ``rho``: the :class:`~helpers.core.stats.Estimate` of ρ (mean over seeds, bootstrap interval); ``p``: the exact
    permutation p-value per seed; ``p_pooled``: that of the seeds together (:func:`pooled_permutation_test`);
    ``pairs``: :func:`most_confused` per seed; ``accuracy``: per seed.
    """
    mats = [predictors(r, layer, m)[predictor] for r in per_seed]
    reals = [real_confusion(r["probs"], r["gold"], mats[0].shape[0]) for r in per_seed]
    tests = [permutation_test(a, b) for a, b in zip(mats, reals)]
    return {
        "rho": spearman_estimate(per_seed, mats, **kw),
        "rho_per_seed": [t[0] for t in tests],
        "p": [t[1] for t in tests],
        "p_pooled": pooled_permutation_test(mats, reals)[1],
        "n_permutations": tests[0][2],
        "pairs": [most_confused(a, b) for a, b in zip(mats, reals)],
        "accuracy": [float(np.mean(r["pred"] == r["gold"])) for r in per_seed],
        "predicted": mats,
        "real": reals,
    }


# ------------------------------------------------------------------------------------------------------------------
# The verdict rows (helpers.core.findings)
# ------------------------------------------------------------------------------------------------------------------


def diagnosis_trec(model: str, profile: Profile) -> Measured | None:
    """Spearman ρ between predicted (anchor keys, query PCA, M = 10, two thirds of the depth) and real confusion on
    TREC, over the seeds cached; the exact permutation p-value per seed goes into the note and the rule."""

    lm = ModelKey.of(model)
    data = load_task("trec")
    cached = {seed: diagnosis_runs(lm, data, profile, seeds=[seed], lookup_only=True)[0] for seed in profile.seeds}
    seeds = [seed for seed, r in cached.items() if r is not None]
    if not seeds:
        return None
    runs = [cached[seed] for seed in seeds]
    n_layers = runs[0]["khat"].shape[0]
    layer = default_layer(n_layers)
    s = summary(runs, layer, 10)
    p = max(s["p"])
    names = TASKS["trec"].class_names
    pair = lambda ij: f"{names[ij[0]]}–{names[ij[1]]}"  # noqa: E731
    pred, real = pair(s["pairs"][0]["predicted"]), pair(s["pairs"][0]["real"])
    from ..core.stats import mean_estimate

    accuracy = mean_estimate([(r["pred"] == r["gold"]).astype(float) for r in runs]).scaled(100)
    return Measured(s["rho"], digits=2, n_text=f"{s['rho'].n} (15 class pairs)",
                    note=f"Spearman ρ over class pairs, layer {layer + 1} of {n_layers}, M = 10; exact permutation "
                         f"p = {p:.3f} (largest over the seeds), {s['p_pooled']:.3f} over the seeds together; most "
                         f"confused pair predicted {pred}, real {real} (seed {seeds[0]}); TREC "
                         f"accuracy {accuracy.fmt(1)}% (chance {100 / len(names):.1f}%)",
                    support={"p": p, "p_pooled": s["p_pooled"]}, accuracy=accuracy, chance=100 / len(names))


def confusion_rule(m: Measured) -> str:
    """Reproduced: ρ's 95% interval lies above 0 and the exact permutation test, which relabels the classes, is
    significant (p < 0.05) in every seed. Partly: ρ's 95% interval lies above 0 and the permutation test of the
    seeds together (one relabelling applied to every seed, on their mean ρ) is significant (p < 0.05). Not
    reproduced otherwise: the bootstrap interval resamples test examples and seeds but not the classes, so without
    the permutation test it cannot tell a match of which anchor is which from chance."""
    if not m.estimate.low > 0:
        return NOT_REPRODUCED
    if m.support.get("p", 1.0) < 0.05:
        return REPRODUCED
    return PARTLY if m.support.get("p_pooled", 1.0) < 0.05 else NOT_REPRODUCED


# --------------------------------------------------------------------------------------------------------------------
# The experiment (helpers.experiments.protocol)
# --------------------------------------------------------------------------------------------------------------------


def run(lm, data: TaskData, config: Profile, seed: int, lookup_only: bool = False) -> dict:
    """One (task, seed): :func:`diagnose` on the seed's prompts."""
    return {"diagnosis": diagnosis_runs(lm, data, config, seeds=[seed], lookup_only=lookup_only)[0]}


EXPERIMENT = Experiment(
    name="diagnosis", title="Diagnosing confusions from the anchors' keys", chapter="book/diagnosis",
    configure=lambda profile="book": PROFILES[profile], seeds=lambda config, model: config.seeds, run=run,
    findings=(
        Finding("diagnosis", "Distances between the label words' keys predict which categories the model confuses.",
                "most confused pair Description–Entity (TREC, Figure 6)", "§3.3", "book/diagnosis", "sec-diagnosis-trec",
                diagnosis_trec, confusion_rule, needs_mapping=True),
    ),
)
