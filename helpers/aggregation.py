"""The "Aggregation" chapter's experiments (paper §2.1 and §2.2), run per seed and cached.

* :func:`saliency_runs` - S_wp, S_pq, S_ww per layer for every test prompt (scheme B demonstrations, as the
  official ``attention_attr.py``), one cached run per seed;
* :func:`saliency_examples` - the full saliency matrices of a few short prompts, for the interactive view;
* :func:`isolation_runs` - predictions and top-10 tokens with and without isolation (scheme A), per seed;
* :func:`flow_curves`, :func:`crossover_layer`, :func:`loyalty_table` - the numbers the chapter shows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .isolation import condition_name, label_loyalty, run_isolation, word_loyalty
from .prompts import collate, label_token_ids
from .runs import Profile, cached_run, make_prompts, settings_of
from .saliency import normalise_per_layer, saliency_flow, saliency_matrices
from .tasks import TaskData

__all__ = ["saliency_runs", "saliency_examples", "isolation_runs", "flow_curves", "crossover_layer",
           "loyalty_table", "KS", "RANDOM_KS"]

KS = (1, 3, 5, 7)
RANDOM_KS = (5,)  # the random control at k = 5 (the main figure); pass random_ks=KS for the full sweep


def saliency_runs(lm, data: TaskData, profile: Profile, shots: int = 1, **kw) -> list[np.ndarray]:
    """One (N, 3, L) array of flows per seed."""
    out = []
    for seed in profile.seeds:
        def compute(seed=seed):
            prompts = make_prompts(lm, data, seed, profile.n_test, shots, per_example=True)
            return {"flows": saliency_flow(lm, data.task, prompts, batch_size=max(1, profile.batch_size // 2))}

        settings = settings_of(profile, seed=seed, shots=shots)
        out.append(cached_run("saliency", lm, data, settings, compute, **kw)["flows"])
    return out


def saliency_examples(lm, data: TaskData, n: int = 3, seed: int = 42, pool: int = 16, **kw) -> dict[str, np.ndarray]:
    """Saliency matrices of the ``n`` shortest of ``pool`` prompts, per layer scaled to 0..255 (uint8) to stay small.

    Returns ``matrices`` (n, L, T, T) zero-padded, ``lengths`` (n,), ``label_positions`` (n, C), ``target`` (n,),
    ``input_ids`` (n, T).
    """
    def compute():
        prompts = make_prompts(lm, data, seed, pool, 1, per_example=True)
        prompts = sorted(prompts, key=len)[:n]
        mats = saliency_matrices(lm.model, collate(prompts, lm.tokenizer.pad_token_id),
                                 label_token_ids(data.task, lm.tokenizer)).numpy()  # (L, n, T, T)
        mats = mats.transpose(1, 0, 2, 3).copy()
        for m in mats:
            for layer in m:
                np.fill_diagonal(layer, 0.0)
        scale = mats.max(axis=(2, 3), keepdims=True)
        scaled = np.round(255 * mats / np.where(scale > 0, scale, 1)).astype(np.uint8)
        t = scaled.shape[-1]
        return {
            "matrices": scaled,
            "lengths": np.array([len(p) for p in prompts]),
            "label_positions": np.array([p.label_positions for p in prompts]),
            "target": np.array([p.target for p in prompts]),
            "input_ids": np.array([list(p.input_ids) + [lm.tokenizer.pad_token_id] * (t - len(p)) for p in prompts]),
        }

    return cached_run("saliency-examples", lm, data, {"n": n, "seed": seed, "pool": pool}, compute,
                      **kw)


def isolation_runs(lm, data: TaskData, profile: Profile, ks: Sequence[int] = KS, shots: int = 1,
                   random_ks: Sequence[int] = RANDOM_KS, **kw) -> list[dict[str, np.ndarray]]:
    """One :func:`helpers.isolation.run_isolation` result per seed."""
    out = []
    n_test = profile.n_test_isolation or profile.n_test
    for seed in profile.seeds:
        def compute(seed=seed):
            prompts = make_prompts(lm, data, seed, n_test, shots, per_example=False)
            return run_isolation(lm, data.task, prompts, ks, seed=seed, batch_size=profile.batch_size,
                                 random_ks=random_ks)

        settings = settings_of(profile, seed=seed, shots=shots, ks=list(ks), random_ks=list(random_ks),
                               n_test=n_test)
        out.append(cached_run("isolation", lm, data, settings, compute, **kw))
    return out


def flow_curves(per_seed: Sequence[np.ndarray]) -> np.ndarray:
    """The paper's aggregation: per seed, mean over examples and normalise per layer; then mean over seeds. (3, L)"""
    return np.mean([normalise_per_layer(f) for f in per_seed], axis=0)


def crossover_layer(curves: np.ndarray) -> int | None:
    """The first layer (0-based) where S_pq exceeds S_wp in the normalised curves; ``None`` if it never does."""
    over = np.nonzero(curves[1] > curves[0])[0]
    return int(over[0]) if len(over) else None


def loyalty_table(per_seed: Sequence[dict[str, np.ndarray]], ks: Sequence[int] = KS) -> dict[str, dict[str, float]]:
    """Label loyalty and word loyalty (top-5 and top-10), in %, per condition, averaged over seeds."""
    table = {}
    for k in ks:
        for where in ("first", "last"):
            for what in ("label", "random"):
                name = condition_name(what, where, k)
                if f"{name}/pred" not in per_seed[0]:
                    continue
                rows = [
                    (
                        label_loyalty(r[f"{name}/pred"], r["none/pred"]),
                        word_loyalty(r[f"{name}/top"], r["none/top"], 5),
                        word_loyalty(r[f"{name}/top"], r["none/top"], 10),
                    )
                    for r in per_seed
                ]
                lab, w5, w10 = (100 * float(np.mean(c)) for c in zip(*rows))
                table[name] = {"label loyalty": lab, "word loyalty@5": w5, "word loyalty@10": w10}
    return table
