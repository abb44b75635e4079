"""Shared-prefix execution (issue 12): running a seed's demonstrations once and each query as a suffix gives the
full prompts' numbers, on tiny models of every family (with a real tokenizer) and on a real offline model.

Each comparison is against the plain full-prompt path of the same function (``shared_prefix=False``), which the
other test files check against stock eager attention.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import TINY_FAMILIES, tiny_loaded_model

from helpers.experiments.extraction import label_attention
from helpers.experiments.isolation import run_isolation
from helpers.core.prefix import build_prefix, split_prompts, suffix_logits, to_original_positions
from helpers.core.prompts import collate, label_token_ids, length_batches, target_label_logits, target_logits
from helpers.core.runs import make_prompts
from helpers.core.saliency import saliency_flow
from helpers.core.tasks import load_task


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_lm(request, offline_tokenizers):
    return tiny_loaded_model(request.param, offline_tokenizers["smollm2-135m"], f"tiny-{request.param}")


@pytest.fixture(scope="module")
def sst2(data_dir):
    return load_task("sst2", data_dir)


def _prompts(lm, data, n=5, shots=1):
    return make_prompts(lm, data, seed=42, n_test=n, shots_per_class=shots)


def test_split_prompts_cuts_at_the_query_from_construction(family_lm, sst2):
    prompts = _prompts(family_lm, sst2)
    split = split_prompts(prompts)
    assert split.shared == tuple(range(len(prompts))) and split.apart == ()
    assert len(split.ids) == prompts[0].query_start
    assert all(max(p.label_positions) < len(split.ids) <= p.target for p in prompts)
    for p in prompts:
        assert split.ids + split.suffix(p) == p.input_ids


def test_a_prompt_whose_demonstration_tokens_differ_runs_in_full(family_lm, sst2):
    """The fallback: a prompt whose tokens before the query differ is set apart, and the results still equal the
    full path's (so the count of fallbacks is all that changes)."""
    prompts = _prompts(family_lm, sst2, n=4)
    odd = prompts[2]
    ids = list(odd.input_ids)
    ids[odd.query_start - 1] = ids[odd.query_start - 1] + 1  # the last demonstration token differs
    prompts[2] = dataclasses.replace(odd, input_ids=tuple(ids))
    split = split_prompts(prompts)
    assert split.apart == (2,) and split.shared == (0, 1, 3)
    a = label_attention(family_lm, sst2.task, prompts, batch_size=2, progress=False)
    b = label_attention(family_lm, sst2.task, prompts, batch_size=2, progress=False, shared_prefix=False)
    assert a["shared_prefix"].tolist() == [1, 1, 0, 1]
    np.testing.assert_allclose(a["attention"], b["attention"], atol=1e-6, rtol=0)


def test_isolation_shared_prefix_equals_full_prompts(family_lm, sst2):
    prompts = _prompts(family_lm, sst2, n=5, shots=2)
    kw = dict(ks=(1, 2), random_ks=(1,), seed=42, batch_size=2, progress=False)
    fast = run_isolation(family_lm, sst2.task, prompts, **kw)
    slow = run_isolation(family_lm, sst2.task, prompts, shared_prefix=False, **kw)
    assert fast["shared_prefix"].all() and not slow["shared_prefix"].any()
    assert set(fast) == set(slow)
    for key in slow:
        if key != "shared_prefix":
            np.testing.assert_array_equal(fast[key], slow[key], err_msg=key)
    # the intervention really acts: isolating the label words in the first layer changes the top-10 somewhere
    assert (fast["label-first-2/top"] != fast["none/top"]).any()


def test_isolated_prefix_equals_isolated_full_prompt_logits(family_lm, sst2):
    """The logits themselves (not only the argmax and top-10): isolation acting while the prefix is computed."""
    from helpers.core.attention import Isolate, intervene

    prompts = _prompts(family_lm, sst2, n=3)
    split = split_prompts(prompts)
    layers = [0, 1]
    prefix = build_prefix(family_lm.model, split.ids, [Isolate([prompts[0].label_positions], layers)])
    with torch.no_grad():
        fast = suffix_logits(family_lm.model, prefix, [split.suffix(p) for p in prompts], family_lm.tokenizer.pad_token_id)
        with intervene(Isolate([p.label_positions for p in prompts], layers)):
            slow = target_logits(family_lm.model, collate(prompts, family_lm.tokenizer.pad_token_id))
        plain = target_logits(family_lm.model, collate(prompts, family_lm.tokenizer.pad_token_id))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert (slow - plain).abs().max() > 1e-4  # isolation changed the computation


def test_extraction_shared_prefix_equals_full_prompts(family_lm, sst2):
    prompts = _prompts(family_lm, sst2, n=5, shots=2)
    fast = label_attention(family_lm, sst2.task, prompts, batch_size=2, progress=False)
    slow = label_attention(family_lm, sst2.task, prompts, batch_size=3, progress=False, shared_prefix=False)
    assert fast["shared_prefix"].all()
    np.testing.assert_allclose(fast["attention"], slow["attention"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(fast["first_token"], slow["first_token"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(fast["probs"], slow["probs"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(fast["pred"], slow["pred"])


def test_label_only_logits_equal_the_full_vocabulary_columns(family_lm, sst2):
    prompts = _prompts(family_lm, sst2, n=3)
    ids = list(label_token_ids(sst2.task, family_lm.tokenizer))
    batch = collate(prompts, family_lm.tokenizer.pad_token_id)
    with torch.no_grad():
        full = target_logits(family_lm.model, batch)[:, ids].float()
        only = target_label_logits(family_lm.model, batch, ids)
        split = split_prompts(prompts)
        prefix = build_prefix(family_lm.model, split.ids)
        suffix = suffix_logits(family_lm.model, prefix, [split.suffix(p) for p in prompts],
                               family_lm.tokenizer.pad_token_id, label_ids=ids)
    torch.testing.assert_close(only, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(suffix, full, rtol=1e-5, atol=1e-5)


def test_recorded_rows_map_back_to_original_positions_when_a_window_drops_entries(offline_tokenizers, sst2):
    """Gemma 3's sliding layers (window 4 in the tiny model) drop unreachable cache entries: the recorded rows are
    put back at their original positions, zero where the window hides a token (as the full prompt's attention)."""
    lm = tiny_loaded_model("gemma3", offline_tokenizers["smollm2-135m"], "tiny-gemma3")
    prompts = _prompts(lm, sst2, n=2)
    prefix = build_prefix(lm.model, split_prompts(prompts).ids)
    assert prefix.entries()[0] < prefix.length == prefix.entries()[1]  # layer 0 slides, layer 1 is global
    rows = torch.arange(1, prefix.entries()[0] + 3, dtype=torch.float32)[None]  # 2 suffix columns
    full = to_original_positions(prefix, 0, rows, 2)
    assert full.shape == (1, prefix.length + 2)
    assert (full[0, : prefix.length - prefix.entries()[0]] == 0).all()
    assert full[0, -1] == rows[0, -1]
    with pytest.raises(ValueError):
        to_original_positions(prefix, 1, rows, 2)


def test_length_batches_cover_every_index_once_within_the_budget():
    lengths = [50, 10, 30, 10, 200, 40, 45]
    batches = length_batches(lengths, token_budget=100, max_batch=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100
    assert [lengths[i] for i in flat] == sorted(lengths)  # sorted by length: little padding
    assert [4] in batches  # a prompt longer than the budget gets a batch of its own
    with pytest.raises(ValueError):
        length_batches(lengths, 0)


def test_saliency_length_batches_return_the_input_order_and_equal_batch_one(family_lm, data_dir):
    data = load_task("agnews", data_dir)
    prompts = make_prompts(family_lm, data, seed=42, n_test=5, shots_per_class=1, per_example=True)
    assert len({len(p) for p in prompts}) > 1
    batched = saliency_flow(family_lm, data.task, prompts, batch_size=3, progress=False,
                            token_budget=3 * max(len(p) for p in prompts))
    one = np.stack([saliency_flow(family_lm, data.task, [p], batch_size=1, progress=False)[0] for p in prompts])
    np.testing.assert_allclose(batched, one, rtol=1e-5, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sst2", "agnews"])
def test_real_model_shared_prefix_equals_full_prompts(offline_model, data_dir, task):
    """gemma-3-270m (the book's model): isolation identical, extraction to 1e-6, label logits to 1e-5."""
    lm = offline_model("gemma-3-270m")
    data = load_task(task, data_dir)
    prompts = make_prompts(lm, data, seed=43, n_test=6, shots_per_class=1)
    kw = dict(ks=(1, 5), random_ks=(5,), seed=43, batch_size=3, progress=False)
    fast = run_isolation(lm, data.task, prompts, **kw)
    slow = run_isolation(lm, data.task, prompts, shared_prefix=False, **kw)
    assert fast["shared_prefix"].all()
    for key in slow:
        if key != "shared_prefix":
            np.testing.assert_array_equal(fast[key], slow[key], err_msg=key)
    a = label_attention(lm, data.task, prompts, batch_size=3, progress=False)
    b = label_attention(lm, data.task, prompts, batch_size=3, progress=False, shared_prefix=False)
    np.testing.assert_allclose(a["attention"], b["attention"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-5, rtol=0)
    ids = list(label_token_ids(data.task, lm.tokenizer))
    batch = collate(prompts[:3], lm.tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(target_label_logits(lm.model, batch, ids),
                                   target_logits(lm.model, batch)[:, ids].float(), rtol=1e-5, atol=1e-5)
