"""Isolation and compression with queries sorted by length, the random control over the un-isolated prefix up to
its first drawn position, and every q row through the output layer in one product: the same results as the
previous implementation (kept as the benchmark's reference, :func:`helpers.cli.speed.previous_isolation`).

Predictions and top-10 tokens must be identical. Probabilities move by a few 1e-6 (on gemma-3-270m at most 4e-6):
float32 dot products rounded in another order where a batch is padded to another length or the output layer runs
as one larger product; they are compared to 1e-5.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import TINY_FAMILIES, tiny_loaded_model

from helpers.cli.speed import previous_isolation
from helpers.core.prefix import build_prefix, output_logits, suffix_hidden, suffix_logits
from helpers.core.prompts import collate, target_logits
from helpers.core.runs import make_prompts
from helpers.core.tasks import load_task
from helpers.experiments.isolation import run_isolation

PROB_ATOL = 1e-5


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_lm(request, offline_tokenizers):
    return tiny_loaded_model(request.param, offline_tokenizers["smollm2-135m"], f"tiny-{request.param}")


@pytest.fixture(scope="module")
def sst2(data_dir):
    return load_task("sst2", data_dir)


def _assert_same(new: dict, old: dict, atol: float = PROB_ATOL) -> None:
    assert set(new) == set(old)
    for key in old:
        if key.endswith("prob"):
            np.testing.assert_allclose(new[key], old[key], atol=atol, rtol=0, err_msg=key)
        else:
            np.testing.assert_array_equal(new[key], old[key], err_msg=key)


def test_new_isolation_equals_the_previous_one(family_lm, sst2):
    prompts = make_prompts(family_lm, sst2, seed=42, n_test=7, shots_per_class=1)
    kw = dict(ks=(1, 2), random_ks=(2,), seed=42, batch_size=3)
    new = run_isolation(family_lm, sst2.task, prompts, progress=False, probabilities=True, **kw)
    old = previous_isolation(family_lm, sst2.task, prompts, probabilities=True, **kw)
    _assert_same(new, old)
    # the random control really ran over a truncated prefix for some batch, and isolation changed something
    assert any(not np.array_equal(new[f"{w}-first-2/top"], new["none/top"]) for w in ("label", "random"))


def test_a_prompt_apart_still_equals_the_previous_isolation(family_lm, sst2):
    prompts = make_prompts(family_lm, sst2, seed=42, n_test=5, shots_per_class=1)
    odd = prompts[1]
    ids = list(odd.input_ids)
    ids[odd.query_start - 1] += 1  # its last demonstration token differs: it runs as a full prompt
    prompts[1] = dataclasses.replace(odd, input_ids=tuple(ids))
    kw = dict(ks=(1,), random_ks=(1,), seed=3, batch_size=2)
    new = run_isolation(family_lm, sst2.task, prompts, progress=False, probabilities=True, **kw)
    assert new["shared_prefix"].tolist() == [1, 0, 1, 1, 1]
    _assert_same(new, previous_isolation(family_lm, sst2.task, prompts, probabilities=True, **kw))


def test_a_truncated_cache_is_the_shorter_prefix(family_lm, sst2):
    p = make_prompts(family_lm, sst2, seed=42, n_test=1, shots_per_class=1)[0]
    ids = p.input_ids[: p.query_start]
    full = build_prefix(family_lm.model, ids, drop_unreachable=False)
    cut = 7
    short = build_prefix(family_lm.model, ids[:cut])
    got = full.truncate(cut)
    assert got.length == cut and got.entries() == short.entries()
    for a, b in zip(got.keys + got.values, short.keys + short.values):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    suffix = [list(p.input_ids[cut:])]
    want = suffix_logits(family_lm.model, short, suffix)
    torch.testing.assert_close(suffix_logits(family_lm.model, got, suffix), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="truncated"):
        full.keep(range(3)).truncate(2)
    with pytest.raises(ValueError, match="1.."):
        full.truncate(0)


def test_output_logits_of_the_collected_rows_equal_the_forward_pass(family_lm, sst2):
    prompts = make_prompts(family_lm, sst2, seed=42, n_test=4, shots_per_class=1)
    n = prompts[0].query_start
    prefix = build_prefix(family_lm.model, prompts[0].input_ids[:n])
    suffixes = [p.input_ids[n:] for p in prompts]
    with torch.no_grad():
        rows = suffix_hidden(family_lm.model, prefix, suffixes, family_lm.tokenizer.pad_token_id)
        got = output_logits(family_lm.model, rows, rows_per_product=3)  # two products
        want = target_logits(family_lm.model, collate(prompts, family_lm.tokenizer.pad_token_id)).float()
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sst2", "agnews"])
def test_real_model_isolation_equals_the_previous_one(offline_model, data_dir, task):
    """gemma-3-270m, the book's conditions at k = 1 and 5: identical predictions and top-10, probabilities within
    1e-5."""
    lm = offline_model("gemma-3-270m")
    data = load_task(task, data_dir)
    prompts = make_prompts(lm, data, seed=44, n_test=6, shots_per_class=1)
    kw = dict(ks=(1, 5), random_ks=(5,), seed=44, batch_size=4)
    old = previous_isolation(lm, data.task, prompts, probabilities=True, **kw)
    _assert_same(run_isolation(lm, data.task, prompts, progress=False, probabilities=True, **kw), old)
