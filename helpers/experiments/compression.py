"""Anchor-only context compression (paper §3.2; ``compress.py`` and ``compress_top.py`` of the official code).

If the label words, with the template's formatting tokens, hold what the model needs from the demonstrations, the
demonstrations' input text can be dropped from the key/value cache. The demonstrations are run once
(:func:`helpers.core.prefix.build_prefix`); in **every layer** only the kept positions' keys and values remain; each
query is answered from that short cache with position ids continuing from the uncompressed length
(:func:`helpers.core.prefix.suffix_hidden`, :func:`helpers.core.prefix.output_logits`).

Variants (Table 2 of the paper, plus two ablations of ours):

* ``full`` - vanilla ICL, the reference for loyalty (computed over the uncompressed prefix cache, which gives the
  full prompt's logits; every run re-checks that on its first batch and stores the difference);
* ``anchor`` - Hidden_anchor: formatting tokens + every token of each label word + tokens the tokenizer added
  (Gemma's BOS) (:func:`anchor_positions`);
* ``anchor-nobos`` - the same without the BOS (ablation; models with an attention sink are expected to collapse);
* ``labels-only`` - label-word tokens (+ BOS) only, the paper's footnote 6 ("label words alone" fail);
* ``random`` - Hidden_random: each label word's first token replaced by a random token of the same demonstration's
  text (:func:`random_positions`); 20 seeded draws, each from the anchor set afresh (the official ``compress_top.py``
  never reset its mask, so its later draws kept ever more tokens). Hidden_random is the first draw; Hidden_random-top the draw with the best
  label loyalty **chosen on the test examples themselves** (optimistic, as in the paper);
* ``text`` - Text_anchor: the demonstrations as text with their input reduced to the bare prefix
  (``Review:\\nSentiment: Negative\\n...``, :func:`text_anchor_text`), a normal forward pass.

Two more variants, not in Table 2's run (:data:`EXTRA_VARIANTS`), and one more setting, each its own cached run
beside it (:data:`TABLE2_EXTRAS`):

* ``formatting`` - the formatting-only cache: Hidden_anchor's kept set without the label words' tokens
  (:func:`formatting_positions`): how much loyalty the template alone keeps;
* ``zero-shot`` - no demonstrations at all: the tokens the tokenizer added and the query, a plain forward pass
  (:func:`zero_shot_ids`): the loyalty any cache gets for free;
* ``restart_positions=True`` - full ICL over the cache and Hidden_anchor with the query's positions restarted at 0
  (the official GPT-2 run).

Metrics (per example, then averaged): label loyalty (prediction equals the full-ICL prediction), word loyalty
(Jaccard of the top-5 full-vocabulary tokens with full ICL's), accuracy (against gold).
"""

from __future__ import annotations

from collections.abc import Sequence

from dataclasses import dataclass

import numpy as np
import torch

from ..core.prefix import PrefixCache, build_prefix, output_logits, split_prompts, suffix_hidden
from ..core.prompts import Prompt, collate, label_token_ids, target_logits
from ..core.runs import Profile, cached_run, make_prompts, settings_of
from ..core.stats import Estimate, mean_estimate
from ..core.tasks import Example, Task, TaskData, sample_fixed_demonstrations, subsample_test
from ..core.findings import NOT_REPRODUCED, PARTLY, REPRODUCED, TASK_NAMES, Finding, Measured
from ..core.runs import PROFILES, ModelKey
from ..core.tasks import get_task, load_task
from .protocol import Experiment

__all__ = [
    "PAPER_TABLE2", "PAPER_SPEEDUP", "PAPER_LENGTHS", "TABLE2_VARIANTS", "EXTRA_VARIANTS", "VARIANTS", "TABLE2_EXTRAS",
    "SHOTS_VARIANTS", "TOP_K_STORED", "demonstration_split", "anchor_positions", "labels_only_positions",
    "formatting_positions", "zero_shot_ids", "random_positions", "random_trials", "text_anchor_text", "compression_run",
    "compression_runs", "expected_fields", "table2_has_extras", "table2_extras", "table2_n_test", "table2_n_random", "table2_seeds", "shots_sweep", "SWEEP_SHOTS", "label_agreement", "top_k_jaccard", "best_trial", "variant_metrics", "table2",
]

# The paper's numbers (Tables 2, 3 and 6; ../shared/docs/paper-spec.md §6), for side-by-side tables.
PAPER_TABLE2 = {  # model -> variant -> (label loyalty, word loyalty, accuracy), in %, averaged over 4 tasks, 5 seeds
    "GPT2-XL": {"full": (100.00, 100.00, 51.90), "text": (51.05, 36.65, 38.77), "random": (48.96, 5.59, 39.96),
                "random-top": (57.52, 4.49, 41.72), "anchor": (79.47, 62.17, 45.04)},
    "GPT-J": {"full": (100.00, 100.00, 56.82), "text": (53.45, 43.85, 40.83), "random": (49.03, 2.16, 31.51),
              "random-top": (71.10, 11.36, 52.34), "anchor": (89.06, 75.04, 55.59)},
}
PAPER_SPEEDUP = {  # Table 3: Hidden_anchor over full ICL, per task
    "GPT2-XL": {"sst2": 1.1, "trec": 1.5, "agnews": 2.5, "emoc": 1.4},
    "GPT-J": {"sst2": 1.5, "trec": 2.2, "agnews": 2.9, "emoc": 1.9},
}
PAPER_LENGTHS = {"sst2": (18, 19), "trec": (61, 7), "agnews": (151, 37), "emoc": (53, 12)}  # Table 6: L_demo, L_x

TABLE2_VARIANTS = ("full", "anchor", "anchor-nobos", "labels-only", "random", "text")
EXTRA_VARIANTS = ("formatting", "zero-shot")  # run beside Table 2 (TABLE2_EXTRAS), not in its run: its key stays
VARIANTS = TABLE2_VARIANTS + EXTRA_VARIANTS  # every variant compression_run knows
# The runs beside Table 2 (same seeds, tasks and test examples; for the default model, :func:`table2_extras`):
# part name -> compression_runs options. Each is its own cached run, so Table 2's results are read unchanged.
TABLE2_EXTRAS = {
    "formatting and zero-shot": {"variants": ("full", "formatting", "zero-shot")},
    "restarted positions": {"variants": ("full", "anchor"), "restart_positions": True},
}
SHOTS_VARIANTS = ("full", "anchor", "text")
TOP_K_STORED = 10
_MAX_BATCH_ENTRIES = 4096  # cap on batch × cached tokens for one batched query pass (memory on a CPU)


# --------------------------------------------------------------------------------------------------------------------
# What is kept
# --------------------------------------------------------------------------------------------------------------------


def demonstration_split(prompts: Sequence[Prompt]) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """The shared demonstration prefix (tokens before the query) and each prompt's query suffix
    (:func:`helpers.core.prefix.split_prompts`, the one shared-prefix mechanism of every fixed-demonstration experiment).

    Raises if the prompts do not share their demonstrations token for token (scheme A shares them): compression
    compares caches of one demonstration set, so a prompt that differs cannot be answered from them.
    """
    if not prompts:
        raise ValueError("no prompts")
    split = split_prompts(prompts)
    if split.apart:
        raise ValueError("the prompts do not share one demonstration prefix (fixed demonstrations are needed); "
                         f"prompts {list(split.apart)[:5]} differ")
    return split.ids, [split.suffix(p) for p in prompts]


def _demo_label_tokens(prompt: Prompt) -> list[int]:
    return [i for start, end in prompt.label_spans for i in range(start, end)]


def anchor_positions(prompt: Prompt, bos: bool = True) -> tuple[int, ...]:
    """Hidden_anchor's kept positions: in the demonstrations, every formatting token (``Review``, ``:``, ``\\n``,
    ``Sentiment``, ``:``, ``\\n``), every token of each label word, and (``bos``) the tokens the tokenizer added.

    All from prompt construction: no token ids are searched (the official ``ContextSolver`` matched token strings).
    """
    kept = {p for p in prompt.format_positions if p < prompt.query_start}
    kept |= set(_demo_label_tokens(prompt))
    if bos:
        kept |= set(prompt.special_positions)
    return tuple(sorted(kept))


def labels_only_positions(prompt: Prompt, bos: bool = True) -> tuple[int, ...]:
    """Every token of each label word (and the added tokens): the paper's footnote-6 ablation."""
    kept = set(_demo_label_tokens(prompt)) | (set(prompt.special_positions) if bos else set())
    return tuple(sorted(kept))


def formatting_positions(prompt: Prompt, bos: bool = True) -> tuple[int, ...]:
    """The formatting-only cache: :func:`anchor_positions` without the label words' tokens (the template's
    formatting tokens of the demonstrations and, with ``bos``, the tokens the tokenizer added)."""
    labels = set(_demo_label_tokens(prompt))
    return tuple(i for i in anchor_positions(prompt, bos) if i not in labels)


def zero_shot_ids(prompt: Prompt) -> tuple[int, ...]:
    """The prompt without its demonstrations: the tokens the tokenizer added before them (Gemma's BOS), then the
    query's tokens as the prompt tokenised them (from ``query_start``), so the query is token for token the one every
    other variant answers."""
    added = [prompt.input_ids[i] for i in prompt.special_positions if i < prompt.query_start]
    return tuple(added) + tuple(prompt.input_ids[prompt.query_start:])


def random_positions(prompt: Prompt, rng: np.random.Generator) -> tuple[int, ...]:
    """Hidden_random: the anchor set with each label word's **first** token replaced by one random token of the same
    demonstration's input text (``compress.py`` L136-176: candidates between the previous label and this one, not
    already kept). Further subword tokens of a label (TREC's ``bre``/``viation``) stay, as in the official code."""
    kept = set(anchor_positions(prompt))
    for d, first in enumerate(prompt.label_positions):
        candidates = [i for i in prompt.text_positions[d] if i not in kept]
        if not candidates:
            raise ValueError(f"demonstration {d} has no text token to draw from")
        kept.discard(first)
        kept.add(int(rng.choice(candidates)))
    return tuple(sorted(kept))


def random_trials(prompt: Prompt, seed: int, n: int) -> list[tuple[int, ...]]:
    """``n`` independent Hidden_random draws, each from the anchor set afresh, trial t seeded by (seed, t)."""
    return [random_positions(prompt, np.random.default_rng([seed, t])) for t in range(n)]


def text_anchor_text(task: Task, demos: Sequence[Example], query: Example | str) -> str:
    """Text_anchor's prompt (``ContextSolver.get_empty_demo_context``): each demonstration's input line reduced to its
    bare prefix, then the normal query, e.g. ``Review:\\nSentiment: Negative\\nReview: <query>\\nSentiment:``."""
    text = query.text if isinstance(query, Example) else query
    demo_part = "".join(f"{task.input_prefix}:\n{task.label_prefix}:{task.label_words[d.label]}\n" for d in demos)
    return f"{demo_part}{task.input_prefix}: {text}\n{task.label_prefix}:"


# --------------------------------------------------------------------------------------------------------------------
# Running the variants
# --------------------------------------------------------------------------------------------------------------------


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def _length_batches(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices sorted by length (stable), in batches of ``size``: a batch is padded only to its own longest."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s : s + size] for s in range(0, len(order), size)]


def _in_input_order(batches: list[list[int]], rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows computed batch by batch (``batches`` of indices) put back in input order."""
    order = torch.tensor([i for idx in batches for i in idx])
    out = torch.cat(rows)
    return out[torch.argsort(order).to(out.device)]


def _over_cache(lm, cache: PrefixCache, suffixes, batch_size: int, restart_positions: bool = False) -> torch.Tensor:
    """Logits (N, V) of every suffix over one cache, float32: suffixes sorted by length into batches sized to the
    cache, their last rows through the output layer together (:func:`helpers.core.prefix.output_logits`)."""
    size = max(1, min(batch_size, _MAX_BATCH_ENTRIES // max(1, max(cache.entries()))))
    batches = _length_batches([len(s) for s in suffixes], size)
    with torch.no_grad():
        rows = [suffix_hidden(lm.model, cache, [suffixes[i] for i in idx], lm.tokenizer.pad_token_id,
                              restart_positions=restart_positions) for idx in batches]
        return output_logits(lm.model, _in_input_order(batches, rows))


def _last_token_logits(lm, id_lists: Sequence[Sequence[int]], batch_size: int) -> torch.Tensor:
    """Logits (N, V) at the last token of each (complete) prompt, no cache: prompts sorted by length into
    right-padded batches, their last rows through the output layer together."""
    device = lm.device
    batches = _length_batches([len(r) for r in id_lists], batch_size)
    hidden = []
    for idx in batches:
        rows = [list(id_lists[i]) for i in idx]
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), lm.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
        last = mask.sum(1) - 1
        with torch.no_grad():
            h = lm.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    use_cache=False).last_hidden_state
            hidden.append(h[torch.arange(len(rows), device=h.device), last.to(h.device)])
    with torch.no_grad():
        return output_logits(lm.model, _in_input_order(batches, hidden)).cpu()


def _summarise(logits: torch.Tensor, label_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return logits[:, label_ids].argmax(-1).cpu().numpy(), logits.topk(TOP_K_STORED, dim=-1).indices.cpu().numpy()


def compression_run(
    lm,
    task: Task,
    prompts: Sequence[Prompt],
    text_prompts: Sequence[str] = (),
    seed: int = 0,
    n_random: int = 20,
    variants: Sequence[str] = TABLE2_VARIANTS,
    batch_size: int = 8,
    progress: bool = True,
    restart_positions: bool = False,
    label_logits: bool = True,
) -> dict[str, np.ndarray]:
    """Predictions and top-10 tokens at q for each variant, over prompts that share their demonstrations.

    Returns ``"<variant>/pred"`` (N,) and ``"<variant>/top"`` (N, 10); for ``random`` (n_random, N) and
    (n_random, N, 10); with ``label_logits``, ``"<variant>/label_logits"`` (N, C) float32, for ``random``
    (n_random, N, C); ``gold`` (N,); ``kept/<variant>`` (cached tokens per layer, for ``random`` per trial);
    ``lengths/demo`` (demonstration tokens, added tokens excluded), ``lengths/prefix`` (with them),
    ``lengths/query`` (N,); ``cache_bytes/full`` and ``cache_bytes/anchor``; ``check/full_prompt_max_diff``: the
    largest absolute logit difference between the cached full-ICL path and a plain forward pass of the full prompts of
    the first batch. ``kept/text`` and ``kept/zero-shot`` are -1 (a plain forward pass, no cache).

    ``restart_positions``: the query's position ids restart at 0 over every cache (the official GPT-2 run) instead of
    continuing from the uncompressed prefix's length (the default: the query sees the distances of the full
    prompt). Full ICL then differs from a plain forward pass too (``check/full_prompt_max_diff`` says by how much).
    Text_anchor and zero-shot have no cache and do not change with it.
    Used in: Anchor-only context compression.
    """
    from tqdm.auto import tqdm

    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if "text" in variants and len(text_prompts) != len(prompts):
        raise ValueError("Text_anchor needs one text prompt per prompt")
    label_ids = list(label_token_ids(task, lm.tokenizer))
    prefix_ids, suffixes = demonstration_split(prompts)
    p0 = prompts[0]
    n_special = sum(1 for i in p0.special_positions if i < p0.query_start)
    out: dict[str, np.ndarray] = {
        "gold": np.array([p.label for p in prompts]),
        "lengths/prefix": np.array(len(prefix_ids)),
        "lengths/demo": np.array(len(prefix_ids) - n_special),
        "lengths/query": np.array([len(s) for s in suffixes]),
    }
    steps = [v for v in variants if v != "random"] + (["random"] * n_random if "random" in variants else [])
    bar = tqdm(total=len(steps), desc=f"compression {task.name}", disable=not progress)
    full = build_prefix(lm.model, prefix_ids)
    out["cache_bytes/full"] = np.array(full.nbytes())

    trials_pred, trials_top, trials_kept, trials_logits = [], [], [], []
    logit_of: dict[str, np.ndarray] = {}

    def scored(logits: torch.Tensor, variant: str) -> tuple[np.ndarray, np.ndarray]:
        if label_logits:
            row = logits[:, label_ids].cpu().numpy().astype(np.float32)
            if variant == "random":
                trials_logits.append(row)
            else:
                logit_of[variant] = row
        return _summarise(logits, label_ids)

    def over(positions, variant: str) -> tuple[np.ndarray, np.ndarray, int, int]:
        cache = full.keep(positions)
        pred, top = scored(_over_cache(lm, cache, suffixes, batch_size, restart_positions), variant)
        return pred, top, max(cache.entries()), cache.nbytes()

    random_sets = random_trials(p0, seed, n_random) if "random" in variants else []
    for step, variant in enumerate(steps):
        if variant == "full":
            logits = _over_cache(lm, full, suffixes, batch_size, restart_positions)
            pred, top = scored(logits, variant)
            kept = max(full.entries())
            first = list(prompts[: min(len(prompts), batch_size)])
            with torch.no_grad():
                plain = target_logits(lm.model, collate(first, lm.tokenizer.pad_token_id)).float()
            out["check/full_prompt_max_diff"] = np.array((plain - logits[: len(first)]).abs().max().item())
        elif variant == "anchor":
            pred, top, kept, nbytes = over(anchor_positions(p0), variant)
            out["cache_bytes/anchor"] = np.array(nbytes)
        elif variant == "anchor-nobos":
            if not p0.special_positions:
                bar.update()
                continue  # identical to "anchor" when the tokenizer adds nothing
            pred, top, kept, _ = over(anchor_positions(p0, bos=False), variant)
        elif variant == "labels-only":
            pred, top, kept, _ = over(labels_only_positions(p0), variant)
        elif variant == "formatting":
            pred, top, kept, _ = over(formatting_positions(p0), variant)
        elif variant == "zero-shot":  # no cache: the added tokens and the query, positions from 0
            ids = [zero_shot_ids(p) for p in prompts]
            pred, top = scored(_last_token_logits(lm, ids, batch_size), variant)
            kept = -1
        elif variant == "text":
            ids = [lm.tokenizer(t).input_ids for t in text_prompts]
            pred, top = scored(_last_token_logits(lm, ids, batch_size), variant)
            kept = -1  # a text prompt: no cache
            out["lengths/text"] = np.array([len(i) for i in ids])
        else:  # one Hidden_random trial
            t = len(trials_pred)
            pred, top, kept, _ = over(random_sets[t], "random")
            trials_pred.append(pred)
            trials_top.append(top)
            trials_kept.append(kept)
            bar.update()
            continue
        out[f"{variant}/pred"], out[f"{variant}/top"], out[f"kept/{variant}"] = pred, top, np.array(kept)
        if variant in logit_of:
            out[f"{variant}/label_logits"] = logit_of[variant]
        bar.update()
    bar.close()
    if trials_pred:
        out["random/pred"] = np.stack(trials_pred)
        out["random/top"] = np.stack(trials_top)
        out["kept/random"] = np.array(trials_kept)
        if trials_logits:
            out["random/label_logits"] = np.stack(trials_logits)
    return out


def expected_fields(variants: Sequence[str], n_random: int) -> tuple[str, ...]:
    """The fields the chapter and the verdict read from a run of ``variants`` with ``n_random`` random draws (passed
    to ``cached_run`` as ``expect``: a cached result without one is refused when read, and
    ``scripts/check_expected_fields.py`` checks every committed result against it): ``gold``, full ICL's
    prediction, top tokens and full-prompt check, ``<variant>/pred`` and ``/top`` of every other variant but
    ``anchor-nobos`` (absent where the tokenizer adds no token: it would equal ``anchor``), and ``random/pred`` and
    ``/top`` when there are draws."""
    fields = ["gold"]
    if "full" in variants:
        fields += ["full/pred", "full/top", "check/full_prompt_max_diff"]
    for v in variants:
        if v not in ("full", "random", "anchor-nobos"):
            fields += [f"{v}/pred", f"{v}/top"]
    if "random" in variants and n_random > 0:
        fields += ["random/pred", "random/top"]
    return tuple(fields)


def _experiment(lm, data: TaskData, settings: dict, compute, lookup_only: bool = False):
    """The one place this module caches a run (Table 2, the runs beside it and the shots sweep alike);
    ``lookup_only``: None if not cached, never compute."""
    return cached_run("compression", lm, data, settings, compute, lookup_only=lookup_only,
                      expect=expected_fields(settings["variants"], settings["n_random"]))


def table2_n_test(profile: Profile, model: str) -> int:
    """Test examples per (task, seed) for Table 2: the profile's, a quarter of it (at least 8) for models other than
    the default (a second model is run for comparison only, and e.g. Qwen2.5-0.5B costs ~2.7x Gemma-3-270M on a
    CPU)."""
    from ..core.models import DEFAULT_MODEL

    n = profile.n_test_compression or profile.n_test
    return n if model == DEFAULT_MODEL else max(min(n, 8), n // 4)


def table2_n_random(profile: Profile, model: str) -> int:
    """Hidden_random draws per (task, seed): the profile's (0 = the paper's 20) for the default model; a single draw
    (Hidden_random only, no Hidden_random-top) for other models, whose runs cost more."""
    from ..core.models import DEFAULT_MODEL

    return (profile.n_random_compression or 20) if model == DEFAULT_MODEL else 1


def table2_seeds(profile: Profile, model: str) -> tuple[int, ...]:
    """Seeds for Table 2: the profile's, for every model (a verdict needs at least three demonstration sets; other
    models get fewer test examples per seed, :func:`table2_n_test`)."""
    del model
    return profile.seeds_for(profile.n_seeds_compression)


def compression_runs(
    lm, data: TaskData, profile: Profile, shots: int = 1, variants: Sequence[str] = TABLE2_VARIANTS,
    n_test: int | None = None, n_random: int | None = None, seeds: Sequence[int] | None = None,
    progress: bool = True, lookup_only: bool = False, restart_positions: bool = False,
) -> list[dict[str, np.ndarray] | None]:
    """One :func:`compression_run` per seed of the profile (scheme A demonstrations), cached.

    Defaults: :func:`table2_n_test` examples, :func:`table2_n_random` random draws, :func:`table2_seeds` seeds.
    ``restart_positions`` enters the settings only when set, so the runs with the default positions keep their keys.
    """
    n_test = n_test or table2_n_test(profile, lm.name)
    n_random = n_random if n_random is not None else table2_n_random(profile, lm.name)
    if "random" not in variants:
        n_random = 0
    out = []
    for seed in seeds or table2_seeds(profile, lm.name):
        def compute(seed=seed):
            prompts = make_prompts(lm, data, seed, n_test, shots, per_example=False)
            demos = [data.train[j] for j in sample_fixed_demonstrations(data, shots, seed)[0]]
            test = [data.test[i] for i in subsample_test(data, seed, n_test)]
            texts = [text_anchor_text(data.task, demos, q) for q in test]
            # the stored results keep the fields they were computed with (label logits would need a new key)
            return compression_run(lm, data.task, prompts, texts, seed=seed, n_random=n_random, variants=variants,
                                   batch_size=profile.batch_size, progress=progress, label_logits=False,
                                   restart_positions=restart_positions)

        settings = settings_of(profile, seed=seed, shots=shots, n_test=n_test, n_random=n_random,
                               variants=list(variants), **({"restart_positions": True} if restart_positions else {}))
        out.append(_experiment(lm, data, settings, compute, lookup_only))
    return out


def table2_has_extras(model: str) -> bool:
    """Whether the runs beside Table 2 (:data:`TABLE2_EXTRAS`) belong to ``model``'s protocol: the default model's
    only (the chapter's table of them is the default model's; a second model is run for comparison only)."""
    from ..core.models import DEFAULT_MODEL

    return model == DEFAULT_MODEL


def table2_extras(lm, data: TaskData, profile: Profile, seeds: Sequence[int] | None = None, progress: bool = True,
                  lookup_only: bool = False) -> dict[str, list[dict[str, np.ndarray] | None]]:
    """The runs beside Table 2, ``{part: [run per seed]}`` (:data:`TABLE2_EXTRAS`): the formatting-only cache and
    zero demonstrations, and full ICL and Hidden_anchor with the query's positions restarted at 0; each with full ICL
    (the reference for loyalty), on Table 2's seeds, tasks and test examples (:func:`compression_runs`' defaults)."""
    return {part: compression_runs(lm, data, profile, seeds=seeds, progress=progress, lookup_only=lookup_only,
                                   **options)
            for part, options in TABLE2_EXTRAS.items()}


SWEEP_SHOTS = (1, 2, 4, 8, 16)


def shots_sweep(
    lm, data: TaskData, profile: Profile, shots: Sequence[int] | None = None, progress: bool = True,
) -> dict[int, list[dict[str, np.ndarray]]]:
    """Full ICL, Hidden_anchor and Text_anchor with 1, 2, 4, 8, 16 demonstrations per class, on the profile's
    first seed only, cached.

    A shot count whose prompts do not fit the model's context is skipped (absent from the result).
    """
    out = {}
    n_test = profile.n_test_compression_shots or profile.n_test
    for k in shots or SWEEP_SHOTS:
        try:
            out[k] = compression_runs(lm, data, profile, shots=k, variants=SHOTS_VARIANTS, n_test=n_test,
                                      seeds=profile.seeds[:1], progress=progress)
        except ValueError as err:  # the prompt is longer than the context
            if "context" not in str(err):
                raise
    return out


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------


def label_agreement(pred: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per example: 1 if the prediction equals full ICL's (label loyalty is its mean)."""
    return (np.asarray(pred) == np.asarray(reference)).astype(float)


def top_k_jaccard(top: np.ndarray, reference_top: np.ndarray, k: int = 5) -> np.ndarray:
    """Per example: Jaccard similarity of the top-k token sets (word loyalty is its mean; the paper's k = 5)."""
    if k > top.shape[-1]:
        raise ValueError(f"only the top {top.shape[-1]} tokens are stored, asked for k={k}")
    out = []
    for a, b in zip(top[:, :k], reference_top[:, :k]):
        sa, sb = set(a.tolist()), set(b.tolist())
        out.append(len(sa & sb) / len(sa | sb))
    return np.array(out)


def best_trial(run: dict[str, np.ndarray]) -> int:
    """Hidden_random-top: the random draw with the highest label loyalty on these very test examples (optimistic)."""
    loyalty = [label_agreement(p, run["full/pred"]).mean() for p in run["random/pred"]]
    return int(np.argmax(loyalty))


def variant_metrics(run: dict[str, np.ndarray], variant: str, k: int = 5) -> dict[str, np.ndarray]:
    """Per-example label agreement, top-k Jaccard and correctness of one variant of one run.

    ``variant``: a stored variant, ``random`` (the first draw) or ``random-top`` (the best draw by label loyalty).
    """
    if variant in ("random", "random-top"):
        t = 0 if variant == "random" else best_trial(run)
        pred, top = run["random/pred"][t], run["random/top"][t]
    else:
        pred, top = run[f"{variant}/pred"], run[f"{variant}/top"]
    return {
        "label": label_agreement(pred, run["full/pred"]),
        "word": top_k_jaccard(top, run["full/top"], k),
        "acc": (pred == run["gold"]).astype(float),
    }


def table2(runs: dict[str, Sequence[dict[str, np.ndarray]]], variants: Sequence[str], k: int = 5,
           ) -> dict[str, dict[str, Estimate]]:
    """Table 2: each metric (in %) per variant, averaged over seeds and tasks, with a bootstrap interval.

    ``runs``: {task: [run per seed]}. Every (task, seed) is one stratum of the bootstrap, so the value is the mean
    over tasks of the mean over seeds (equal seeds per task) and n = examples × (tasks × seeds).
    """
    out: dict[str, dict[str, Estimate]] = {}
    for variant in variants:
        per = [variant_metrics(r, variant, k) for task_runs in runs.values() for r in task_runs
               if (variant == "random" and "random/pred" in r)
               or (variant == "random-top" and "random/pred" in r and len(r["random/pred"]) > 1)
               or f"{variant}/pred" in r]
        if not per:
            continue
        out[variant] = {m: mean_estimate([p[m] for p in per]).scaled(100) for m in ("label", "word", "acc")}
    return out


# ------------------------------------------------------------------------------------------------------------------
# The verdict rows (helpers.core.findings)
# ------------------------------------------------------------------------------------------------------------------


def compression_loyalty(model: str, profile: Profile) -> Measured | None:
    """Hidden_anchor's label loyalty (% of full-ICL predictions kept), mean of 4 tasks, with the paired difference to
    Hidden_random (one random text token per demonstration kept instead) on the same examples."""
    from ..core.stats import mean_estimate, paired_difference

    lm = ModelKey.of(model)
    runs = {t: compression_runs(lm, load_task(t), profile, lookup_only=True) for t in TASK_NAMES}
    if any(r is None for per_seed in runs.values() for r in per_seed):
        return None
    per = [(variant_metrics(r, "anchor"), variant_metrics(r, "random")) for rs in runs.values() for r in rs]
    loyalty = mean_estimate([a["label"] for a, _ in per]).scaled(100)
    vs_random = paired_difference([a["label"] for a, _ in per], [b["label"] for _, b in per]).scaled(100)
    n_seeds = len(next(iter(runs.values())))
    return Measured(loyalty, unit="%", digits=1, n_text=f"{loyalty.n_examples} × {n_seeds} seeds × 4 tasks",
                    note=f"label loyalty of Hidden_anchor (BOS kept), mean of 4 tasks; minus Hidden_random on the same "
                         f"examples: {vs_random.fmt(1)} points",
                    support={"vs random": vs_random})


def compression_speedup(model: str, profile: Profile, batch_size: str = "1") -> Measured | None:
    """Hidden_anchor against equal work, from the committed benchmark (``python -m helpers.cli.bench compression``):
    the time to answer the queries over the **uncompressed** demonstration cache divided by the time over the
    anchor-only cache, at batch 1 (the paper's setting), mean over the 4 tasks of the per-task median; the range is
    the mean of the per-task min and max over the interleaved repetitions (a timing spread, not a bootstrap). Full
    recomputation of every prompt (the paper's framing) is in the note."""
    import json

    from ..core.runs import bench_file

    path = bench_file("compression-bench", model)
    if not path.is_file():
        return None
    tasks = json.loads(path.read_text())["tasks"]
    if set(tasks) != set(TASK_NAMES) or any(batch_size not in t for t in tasks.values()):
        return None
    rows = [tasks[t][batch_size] for t in TASK_NAMES]
    ratio = lambda r, pair, k: r["ratios"][pair][k]  # noqa: E731
    per_task = np.array([[ratio(r, "prefix/anchor", k) for k in ("median", "min", "max")] for r in rows])
    value, low, high = per_task.mean(axis=0)
    est = Estimate(float(value), float(low), float(high), int(rows[0]["n"]), int(rows[0]["reps"]), per_task[:, 0])
    full = np.mean([ratio(r, "full/anchor", "median") for r in rows])
    per = ", ".join(f"{get_task(t).title} {ratio(r, 'prefix/anchor', 'median'):.2f}×" for t, r in zip(TASK_NAMES, rows))
    return Measured(est, unit="×", digits=2, support={"per task": per_task[:, 0]},
                    n_text=f"{rows[0]['n']} queries × {rows[0]['reps']} repetitions × 4 tasks, CPU, batch {batch_size}",
                    note=f"uncompressed demonstration cache / anchor-only cache ({per}); against recomputing every "
                         f"prompt in full (the paper's framing): {full:.2f}×; range over repetitions, not a bootstrap")


def faster(m: Measured) -> str:
    """Reproduced: even the slowest repetitions are faster than the equal-work baseline (the range lies above 1).
    Partly: the median is faster on every task. Not reproduced otherwise."""
    per_task = m.support.get("per task")
    every_task = per_task is not None and bool(np.all(np.asarray(per_task) > 1))
    return REPRODUCED if m.estimate.low > 1 else PARTLY if every_task else NOT_REPRODUCED


def keeps_most(m: Measured) -> str:
    """Reproduced: the 95% interval lies at or above 75% (the paper: 79–89%) and Hidden_anchor keeps significantly
    more predictions than Hidden_random (the paired difference's 95% interval above 0). Partly: one of the two. Not
    reproduced otherwise."""
    high_enough = m.estimate.low >= 75
    beats_random = m.support.get("vs random") is not None and m.support["vs random"].low > 0
    return REPRODUCED if high_enough and beats_random else PARTLY if high_enough or beats_random else NOT_REPRODUCED


# --------------------------------------------------------------------------------------------------------------------
# The experiment (helpers.experiments.protocol)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompressionConfig:
    """The compression chapter's sizes: a profile; Table 2 (``sweep=False``) or the shots sweep (``sweep=True``,
    the profile's first seed, :data:`SWEEP_SHOTS` or ``shots``)."""

    profile: Profile
    sweep: bool = False
    shots: tuple[int, ...] | None = None


def configure(profile: str = "book", sweep: bool = False, shots=None) -> CompressionConfig:
    return CompressionConfig(PROFILES[profile], bool(sweep), tuple(shots) if shots else None)


def _seeds(config: CompressionConfig, model: str) -> tuple[int, ...]:
    return config.profile.seeds[:1] if config.sweep else table2_seeds(config.profile, model)


def run(lm, data: TaskData, config: CompressionConfig, seed: int, lookup_only: bool = False) -> dict:
    """One (task, seed): Table 2's variants and, for the default model, the runs beside it
    (:func:`table2_extras`); or (``sweep``) full ICL, Hidden_anchor and Text_anchor per shot count (a shot count
    whose prompts do not fit the context is absent)."""
    if not config.sweep:
        out = {"table 2": compression_runs(lm, data, config.profile, seeds=[seed], lookup_only=lookup_only,
                                           progress=not lookup_only)[0]}
        if table2_has_extras(lm.name):
            extras = table2_extras(lm, data, config.profile, seeds=[seed], lookup_only=lookup_only,
                                   progress=not lookup_only)
            out |= {part: per_seed[0] for part, per_seed in extras.items()}
        return out
    n_test = config.profile.n_test_compression_shots or config.profile.n_test
    out = {}
    for k in config.shots or SWEEP_SHOTS:
        try:
            out[f"{k}-shot"] = compression_runs(lm, data, config.profile, shots=k, variants=SHOTS_VARIANTS,
                                                n_test=n_test, seeds=[seed], lookup_only=lookup_only,
                                                progress=not lookup_only)[0]
        except ValueError as err:  # the prompt is longer than the context
            if "context" not in str(err):
                raise
    return out


EXPERIMENT = Experiment(
    name="compression", title="Anchor-only context compression", chapter="book/compression",
    configure=configure, seeds=_seeds, run=run, options=frozenset({"sweep", "shots"}),
    findings=(
        Finding("compression-speedup", "Anchor-only context compression (Hidden_anchor) speeds up inference.",
                "1.8× on average (1.1–2.9×, Tables 3 and 6; against recomputing the full prompt)", "§3.2",
                "book/compression", "sec-compression-speed", compression_speedup, faster, seeded=False),
        Finding("compression-loyalty", "Hidden_anchor keeps most of the model's predictions.",
                "label loyalty 79.47 (GPT2-XL), 89.06 (GPT-J); Table 2", "§3.2", "book/compression", "sec-compression-loyalty",
                compression_loyalty, keeps_most, pooled=True),
    ),
)
