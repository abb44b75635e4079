"""Real offline models (slow: each loads in a few seconds, the accuracy run takes about a minute on 2 cores).

Run with ``pytest -m slow``. Skipped when the offline packages are missing (a failure in strict mode: CI).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import OFFLINE_NAMES

from helpers.core import attention
from helpers.core.attention import Record, intervene
from helpers.core.prompts import build_prompt, collate, label_token_ids, target_logits
from helpers.core.saliency import flow_measures, saliency_matrices
from helpers.core.tasks import load_task, sample_fixed_demonstrations, subsample_test

pytestmark = pytest.mark.slow

EXPECTED_FACTS = {  # family, layers, heads, kv heads, BOS
    "gemma-3-270m": ("gemma3_text", 18, 4, 1, True),
    "qwen2.5-coder-0.5b": ("qwen2", 24, 14, 2, False),
    "smollm2-135m": ("llama", 30, 9, 3, False),
}

@pytest.fixture
def loaded(offline_model):
    return offline_model


def sst2_prompts(lm, data_dir, n):
    """Scheme A (seed 42): the same 1-shot-per-class demonstrations for the first n of subsample_test(seed 42)."""
    data = load_task("sst2", data_dir)
    demos = [data.train[i] for i in sample_fixed_demonstrations(data, 1, 42)[0]]
    return data, [
        build_prompt(data.task, demos, data.test[i], lm.tokenizer, lm.max_length) for i in subsample_test(data, 42)[:n]
    ]


def label_logits(lm, task, prompts, batch_size=8) -> torch.Tensor:
    ids = list(label_token_ids(task, lm.tokenizer))
    out = []
    with torch.no_grad():
        for s in range(0, len(prompts), batch_size):
            batch = collate(prompts[s : s + batch_size], lm.tokenizer.pad_token_id)
            out.append(target_logits(lm.model, batch)[:, ids])
    return torch.cat(out)


def auc(score: torch.Tensor, y: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties count half (Mann-Whitney)."""
    pos, neg = score[y == 1], score[y == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()).item()


@pytest.mark.parametrize("name", OFFLINE_NAMES)
def test_offline_model_facts_and_parity(name, data_dir, loaded):
    lm = loaded(name)
    family, layers, heads, kv, bos = EXPECTED_FACTS[name]
    assert (lm.family, lm.n_layers, lm.n_heads, lm.n_kv_heads, lm.adds_bos) == (family, layers, heads, kv, bos)
    assert lm.model.config._attn_implementation == "anchors"
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.padding_side == "right" and lm.tokenizer.pad_token_id is not None
    assert next(lm.model.parameters()).dtype == torch.float32

    data, prompts = sst2_prompts(lm, data_dir, 4)
    assert len({len(p) for p in prompts}) > 1  # padding in the batch
    rec = Record(rows=torch.tensor([p.target for p in prompts]))
    with intervene(rec):
        anchors = label_logits(lm, data.task, prompts, batch_size=4)
    assert rec.seen == set(range(layers))
    try:
        attention.enable(lm.model, "eager")
        eager = label_logits(lm, data.task, prompts, batch_size=4)
    finally:
        attention.enable(lm.model, "anchors")
    diff = (anchors - eager).abs().max().item()
    print(f"\n{name}: max |anchors - eager| label logit on 4 SST-2 prompts = {diff:.3e}")
    assert diff <= 1e-4
    # each example alone gives the same logits as in the padded batch
    alone = torch.cat([label_logits(lm, data.task, [p]) for p in prompts])
    torch.testing.assert_close(alone, anchors, rtol=1e-4, atol=1e-4)


def test_gemma_one_shot_sst2_above_chance(data_dir, loaded):
    """1-shot SST-2 (scheme A, seed 42) on 64 test examples (subsample_test seed 42).

    Raw accuracy is NOT a usable check for this model: gemma-3-270m (base, de-quantised Q4_K_M) has a strong bias
    towards " Negative" with these demonstrations and predicts it for most examples (accuracy 0.50 on these 64, at
    chance; seeds 43/44 give 0.55/0.78). The ranking of the label-logit difference is what shows that the model
    reads the review: its AUC is ~0.80 here. Under chance (no signal) the AUC of 64 examples (40 positive,
    24 negative) has standard deviation sqrt((n0 + n1 + 1) / (12 n0 n1)) ≈ 0.075, so > 0.70 is ~2.7 sd above 0.5.
    """
    lm = loaded("gemma-3-270m")
    data, prompts = sst2_prompts(lm, data_dir, 64)
    logits = label_logits(lm, data.task, prompts)
    y = torch.tensor([p.label for p in prompts])
    acc = (logits.argmax(-1) == y).double().mean().item()
    score_auc = auc(logits[:, 1] - logits[:, 0], y)
    print(f"\ngemma-3-270m 1-shot SST-2, 64 examples: accuracy {acc:.3f}, AUC {score_auc:.3f}, "
          f"{int(logits.argmax(-1).sum())} predicted positive, {int(y.sum())} positive")
    assert torch.isfinite(logits).all()
    assert score_auc > 0.70


def test_gemma_one_shot_sst2_accuracy_over_the_book_seeds(data_dir, loaded):
    """1-shot SST-2 accuracy, as the paper reports it: averaged over seeds (42, 43, 44: the book profile's), each seed
    with its own demonstrations (scheme A) and its first 64 test examples. Seed 42 alone is at chance (see above); the
    mean over the three seeds must be above chance: with 192 examples a coin has standard deviation 0.036, and the
    majority class is 51% of SST-2's test set, so > 0.58 is 2 standard deviations above it."""
    lm = loaded("gemma-3-270m")
    data = load_task("sst2", data_dir)
    accs = []
    for seed in (42, 43, 44):
        demos = [data.train[i] for i in sample_fixed_demonstrations(data, 1, seed)[0]]
        prompts = [build_prompt(data.task, demos, data.test[i], lm.tokenizer) for i in subsample_test(data, seed)[:64]]
        logits = label_logits(lm, data.task, prompts)
        accs.append((logits.argmax(-1) == torch.tensor([p.label for p in prompts])).double().mean().item())
    print(f"\ngemma-3-270m 1-shot SST-2 accuracy per seed (64 examples each): {accs}, mean {np.mean(accs):.3f}")
    assert np.mean(accs) > 0.58


def test_gemma_saliency_on_a_real_prompt(data_dir, loaded):
    lm = loaded("gemma-3-270m")
    data, prompts = sst2_prompts(lm, data_dir, 1)
    prompt = prompts[0]
    label_ids = label_token_ids(data.task, lm.tokenizer)
    sal = saliency_matrices(lm.model, collate([prompt], lm.tokenizer.pad_token_id), label_ids)
    assert sal.shape == (lm.n_layers, 1, len(prompt), len(prompt))
    assert torch.isfinite(sal).all() and torch.all(sal >= 0) and torch.all(sal[0, 0].triu(1) == 0)
    flows = flow_measures(sal[:, 0], prompt)
    assert flows.shape == (3, lm.n_layers)
    assert np.all(flows[0, -1] == 0)  # last layer: nothing flows into the label words that reaches the loss
    assert np.all(flows[1] > 0) and np.all(flows[2] > 0)
    assert not any(p.requires_grad for p in lm.model.parameters())  # saliency did not unfreeze the model


def test_gemma_in_float16_is_refused_with_a_clear_error():
    """Measured (gemma-3-270m, CPU, eager attention): float16 logits are 100% NaN, bfloat16 ones finite. So load_model
    refuses float16 for Gemma before loading the weights, and says what to use instead."""
    from helpers import load_model

    with pytest.raises(ValueError, match="overflows in float16.*bfloat16 or torch.float32"):
        load_model("gemma-3-270m", dtype=torch.float16)
