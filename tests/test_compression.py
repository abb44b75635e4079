"""Shared-prefix caching and anchor-only compression (paper §3.2).

* With nothing removed, the cached path gives the full prompt's logits, on tiny models of every family.
* With positions removed, it equals an independent reference: the full prompt in one forward pass where the query
  tokens are masked from the removed positions (so rotary/absolute positions are those of the full prompt). The same
  check fails when the query positions restart at 0 (the official GPT-2 quirk), so a position bug cannot pass.
* The kept positions are exactly the formatting, label and added tokens of the demonstrations (decoded back to text
  on the three offline tokenizers); Hidden_random never keeps a label's first token; Text_anchor's prompt is the
  paper's string.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from conftest import OFFLINE_NAMES, TINY_FAMILIES, build_tiny_model

from helpers.core import attention
from helpers.experiments.compression import (
    anchor_positions, demonstration_split, label_agreement, labels_only_positions, random_positions, random_trials,
    text_anchor_text, top_k_jaccard,
)
from helpers.experiments.isolation import label_loyalty, word_loyalty
from helpers.core.prefix import build_prefix, layer_windows, suffix_logits
from helpers.core.prompts import build_prompt
from helpers.core.tasks import TASKS, Example, get_task, load_task, sample_fixed_demonstrations, subsample_test

TOL = 1e-4
N_PREFIX = 25  # longer than the tiny Gemma models' sliding window (4): the window really cuts the cache
G = torch.Generator().manual_seed(3)
IDS = torch.randint(3, 100, (N_PREFIX + 12,), generator=G).tolist()
PREFIX, REST = IDS[:N_PREFIX], IDS[N_PREFIX:]
SUFFIXES = [REST, REST[:5], REST[:9]]  # right-padded in one batch
KEPT = [0, 3, 4, 10, 17, 21, 23, 24]  # an arbitrary subset (includes positions inside and outside the window)


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family):
        if family not in cache:
            model = build_tiny_model(family)
            attention.enable(model)
            cache[family] = model
        return cache[family]

    return get


def reference_logits(model, suffix, kept=None) -> torch.Tensor:
    """Last-token logits of prefix + suffix in one plain forward pass, the query rows masked from the removed prefix
    positions (kept=None: nothing removed, the model's own masks)."""
    ids = torch.tensor([PREFIX + list(suffix)])
    if kept is None:
        with torch.no_grad():
            return model(input_ids=ids).logits[0, -1]
    n, t = N_PREFIX, ids.shape[1]
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    removed = torch.ones(t, dtype=torch.bool)
    removed[kept] = False
    removed[n:] = False
    masks = {}
    types, windows = layer_windows(model)
    for layer_type, window in zip(types, windows):
        allowed = j <= i
        if window is not None:
            allowed &= (i - j) < window
        allowed &= ~((i >= n) & removed[None, :])
        masks[layer_type] = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
    config = model.config.get_text_config(decoder=True)
    mask = masks if getattr(config, "layer_types", None) is not None else next(iter(masks.values()))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[0, -1]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_nothing_removed_gives_the_full_prompt(models, family):
    model = models(family)
    prefix = build_prefix(model, PREFIX)
    with torch.no_grad():
        got = suffix_logits(model, prefix, SUFFIXES)
    ref = torch.stack([reference_logits(model, s) for s in SUFFIXES])
    assert (got - ref).abs().max().item() <= TOL
    # the reference really depends on the prefix (else the check would be empty)
    other = build_prefix(model, [7] * N_PREFIX)
    with torch.no_grad():
        assert (suffix_logits(model, other, SUFFIXES) - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_compressed_cache_equals_masked_full_prompt_and_positions_continue(models, family):
    model = models(family)
    small = build_prefix(model, PREFIX).keep(KEPT)
    with torch.no_grad():
        got = suffix_logits(model, small, SUFFIXES)
        restarted = suffix_logits(model, small, SUFFIXES, restart_positions=True)
    ref = torch.stack([reference_logits(model, s, KEPT) for s in SUFFIXES])
    full = torch.stack([reference_logits(model, s) for s in SUFFIXES])
    assert (got - ref).abs().max().item() <= TOL
    assert (got - full).abs().max().item() > 1e-3  # removing positions changes the computation
    # query positions restarting at 0 would give other logits: this test fails for a position bug
    assert (restarted - ref).abs().max().item() > 1e-3


def test_prefix_cache_bookkeeping(models):
    model = models("gemma3")  # sliding window 4 in layers 0 and 2
    prefix = build_prefix(model, PREFIX)
    assert prefix.length == N_PREFIX
    assert prefix.entries() == (3, N_PREFIX, 3)  # a window of 4: the query at N sees N-3..N-1 only
    small = prefix.keep(KEPT)
    assert small.kept_positions(1) == KEPT
    assert small.kept_positions(0) == [23, 24]
    assert small.nbytes() < prefix.nbytes()
    with pytest.raises(ValueError, match="lie in"):
        prefix.keep([N_PREFIX])
    with pytest.raises(ValueError, match="no longer"):
        small.keep([5])


# --------------------------------------------------------------------------------------------------------------------
# What is kept, on real tokenizers and data
# --------------------------------------------------------------------------------------------------------------------


def squash(s: str) -> str:
    return re.sub(r"\s", "", s)


def _prompts(tok, data, n=3, shots=1, seed=42):
    demos = [data.train[j] for j in sample_fixed_demonstrations(data, shots, seed)[0]]
    test = [data.test[i] for i in subsample_test(data, seed, n)]
    return demos, test, [build_prompt(data.task, demos, q, tok) for q in test]


@pytest.mark.parametrize("name", OFFLINE_NAMES)
@pytest.mark.parametrize("task_name", tuple(TASKS))
def test_kept_positions_are_formatting_labels_and_added_tokens(offline_tokenizers, data_dir, name, task_name):
    tok = offline_tokenizers[name]
    data = load_task(task_name, data_dir)
    task = data.task
    demos, _, prompts = _prompts(tok, data)
    p = prompts[0]
    kept = anchor_positions(p)
    assert all(i < p.query_start for i in kept)
    # decoded, the kept tokens are the template's text and the label words, demonstration after demonstration
    expected = "".join(f"{task.input_prefix}:\n{task.label_prefix}:{task.label_words[d.label]}\n" for d in demos)
    pieces = [tok.decode([p.input_ids[i]], skip_special_tokens=True) for i in kept]
    # a token that merges the end of the input text with the newline (Qwen's "?\n") is a formatting token by
    # priority (helpers.core.prompts) and is kept: only its newline belongs to the template
    pieces = ["\n" if s.endswith("\n") and s.rstrip("\n").strip() else s for s in pieces]
    assert squash("".join(pieces)) == squash(expected)
    # the added tokens (Gemma's BOS) are kept, and only they are dropped without bos
    assert set(p.special_positions) <= set(kept)
    assert set(kept) - set(anchor_positions(p, bos=False)) == set(p.special_positions)
    assert (tok.bos_token_id is not None and p.input_ids[0] == tok.bos_token_id) == bool(p.special_positions)
    # every token of every label word (TREC's multi-token " Abbreviation" included)
    for start, end in p.label_spans:
        assert set(range(start, end)) <= set(kept)
    assert set(labels_only_positions(p, bos=False)) == {i for s, e in p.label_spans for i in range(s, e)}
    # no input text is kept
    assert not set(kept) & {i for d in p.text_positions for i in d}


@pytest.mark.parametrize("task_name", ("sst2", "trec"))
def test_hidden_random_never_keeps_a_label_token(offline_tokenizers, data_dir, task_name):
    tok = offline_tokenizers["gemma-3-270m"]
    data = load_task(task_name, data_dir)
    _, _, prompts = _prompts(tok, data)
    p = prompts[0]
    anchors = set(anchor_positions(p))
    trials = random_trials(p, seed=42, n=20)
    assert trials == random_trials(p, seed=42, n=20)  # seeded
    assert len(set(trials)) > 1  # the draws differ
    for kept in trials:
        kept = set(kept)
        assert len(kept) == len(anchors)  # the same number of tokens
        assert not kept & set(p.label_positions)  # never a label word's first token
        extra = sorted(kept - anchors)
        assert len(extra) == len(p.label_positions)
        for d, i in enumerate(extra):  # one token from each demonstration's own text
            assert i in p.text_positions[d]
        # further subword tokens of a label stay (TREC's " Abbreviation"), as in the official code
        for start, end in p.label_spans:
            assert set(range(start + 1, end)) <= kept
    with pytest.raises(ValueError, match="no text token"):
        random_positions(dataclasses.replace(p, text_positions=((),) * len(p.text_positions)), np.random.default_rng(0))


def test_text_anchor_prompt_is_the_papers():
    task = get_task("sst2")
    demos = [Example("a gripping film", 1), Example("dull", 0)]
    got = text_anchor_text(task, demos, Example("fine work", 1))
    assert got == "Review:\nSentiment: Positive\nReview:\nSentiment: Negative\nReview: fine work\nSentiment:"
    trec = text_anchor_text(get_task("trec"), [Example("What is NASA ?", 0)], "Who ?")
    assert trec == "Question:\nAnswer Type: Abbreviation\nQuestion: Who ?\nAnswer Type:"


def test_demonstration_split(offline_tokenizers, data_dir):
    tok = offline_tokenizers["qwen2.5-coder-0.5b"]
    data = load_task("agnews", data_dir)
    _, _, prompts = _prompts(tok, data)
    prefix, suffixes = demonstration_split(prompts)
    for p, s in zip(prompts, suffixes):
        assert tuple(prefix) + tuple(s) == p.input_ids
    other = build_prompt(data.task, [data.train[0]], data.test[0], tok)
    with pytest.raises(ValueError, match="share"):
        demonstration_split(prompts + [other])


def test_metrics_agree_with_isolation_loyalties():
    rng = np.random.default_rng(0)
    pred, ref = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    top, ref_top = rng.integers(0, 20, (50, 10)), rng.integers(0, 20, (50, 10))
    assert label_agreement(pred, ref).mean() == pytest.approx(label_loyalty(pred, ref))
    assert top_k_jaccard(top, ref_top, 5).mean() == pytest.approx(word_loyalty(top, ref_top, 5))
    assert top_k_jaccard(ref_top, ref_top).min() == 1.0
    with pytest.raises(ValueError):
        top_k_jaccard(top, ref_top, 11)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compression_run_returns_label_logits_and_can_restart_positions(offline_tokenizers, data_dir, family):
    """Label logits agree with the stored predictions; restarting query positions at 0 (the official GPT-2 run)
    changes the numbers over a cache, and full ICL then no longer equals a plain forward pass."""
    from conftest import tiny_loaded_model

    from helpers.core.runs import make_prompts
    from helpers.experiments.compression import compression_run

    lm = tiny_loaded_model(family, offline_tokenizers["smollm2-135m"], f"tiny-{family}")
    data = load_task("sst2", data_dir)
    prompts = make_prompts(lm, data, seed=42, n_test=4, shots_per_class=1)
    variants = ("full", "anchor", "random")
    out = compression_run(lm, data.task, prompts, seed=42, n_random=2, variants=variants, batch_size=2,
                          progress=False)
    assert out["full/label_logits"].shape == (4, 2) and out["random/label_logits"].shape == (2, 4, 2)
    np.testing.assert_array_equal(out["anchor/label_logits"].argmax(-1), out["anchor/pred"])
    np.testing.assert_array_equal(out["random/label_logits"].argmax(-1), out["random/pred"])
    assert out["check/full_prompt_max_diff"] < 1e-4
    bare = compression_run(lm, data.task, prompts, seed=42, n_random=2, variants=variants, batch_size=2,
                           progress=False, label_logits=False)
    assert not any(k.endswith("/label_logits") for k in bare)
    np.testing.assert_array_equal(bare["anchor/pred"], out["anchor/pred"])
    restarted = compression_run(lm, data.task, prompts, seed=42, n_random=2, variants=variants, batch_size=2,
                                progress=False, restart_positions=True)
    moved = np.abs(restarted["anchor/label_logits"] - out["anchor/label_logits"]).max()
    assert moved > 1e-5  # other position ids: other numbers (absolute positions and rotary alike)
    assert restarted["check/full_prompt_max_diff"] > 1e-5


@pytest.mark.parametrize("name", OFFLINE_NAMES)
@pytest.mark.parametrize("task_name", ("sst2", "trec"))
def test_formatting_only_cache_and_zero_shot_prompt(offline_tokenizers, data_dir, name, task_name):
    """The formatting-only cache is Hidden_anchor's set less every label-word token (the added tokens stay); the
    zero-shot prompt is the added tokens then the query's own tokens, which is the query tokenised on its own."""
    from helpers.experiments.compression import formatting_positions, zero_shot_ids

    tok = offline_tokenizers[name]
    data = load_task(task_name, data_dir)
    _, test, prompts = _prompts(tok, data)
    for p, q in zip(prompts, test):
        labels = {i for s, e in p.label_spans for i in range(s, e)}
        kept = formatting_positions(p)
        assert set(kept) == set(anchor_positions(p)) - labels and not set(kept) & labels
        assert set(kept) | set(labels_only_positions(p)) == set(anchor_positions(p))
        assert set(p.special_positions) <= set(kept)
        assert set(formatting_positions(p, bos=False)) == set(kept) - set(p.special_positions)
        pieces = [tok.decode([p.input_ids[i]], skip_special_tokens=True) for i in kept]
        pieces = "".join("\n" if s.endswith("\n") and s.rstrip("\n").strip() else s for s in pieces)  # Qwen's "?\n"
        assert squash(pieces) == squash((f"{data.task.input_prefix}:\n{data.task.label_prefix}:\n") * len(p.label_spans))
        ids = zero_shot_ids(p)
        assert ids[len(ids) - (len(p) - p.query_start):] == p.input_ids[p.query_start:]
        alone = tok(f"{data.task.input_prefix}: {q.text}\n{data.task.label_prefix}:").input_ids
        assert list(ids) == list(alone)


def test_compression_run_formatting_and_zero_shot(offline_tokenizers, data_dir):
    """The two variants beside Table 2 on a tiny model: the formatting-only cache holds the anchor cache less the
    label tokens, and zero-shot equals a plain forward pass of the added tokens and the query."""
    from conftest import tiny_loaded_model

    from helpers.core.prompts import label_token_ids
    from helpers.core.runs import make_prompts
    from helpers.experiments.compression import compression_run, formatting_positions, zero_shot_ids

    lm = tiny_loaded_model("llama", offline_tokenizers["gemma-3-270m"], "tiny-llama")
    data = load_task("sst2", data_dir)
    prompts = make_prompts(lm, data, seed=42, n_test=4, shots_per_class=1)
    out = compression_run(lm, data.task, prompts, seed=42, n_random=0, variants=("full", "formatting", "zero-shot"),
                          batch_size=2, progress=False)
    assert int(out["kept/formatting"]) == len(formatting_positions(prompts[0])) and int(out["kept/zero-shot"]) == -1
    labels = list(label_token_ids(data.task, lm.tokenizer))
    for i, p in enumerate(prompts):
        with torch.no_grad():
            plain = lm.model(torch.tensor([zero_shot_ids(p)])).logits[0, -1, labels]
        np.testing.assert_allclose(out["zero-shot/label_logits"][i], plain.numpy(), atol=1e-4)
    assert out["check/full_prompt_max_diff"] < 1e-4
    with pytest.raises(ValueError, match="unknown variants"):
        compression_run(lm, data.task, prompts, variants=("full", "nothing"), progress=False)
