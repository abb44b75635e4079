"""Tuning the context (prompt tuning, prefix-tuning, PEZ) beside anchor re-weighting: the prefix theorem in the first
layer, the no-op cases, parameter counts, PEZ's projection, and the fast evaluation against full forward passes."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_FAMILIES

from helpers.core import attention
from helpers.experiments import tuning as tu
from helpers.core.prompts import Prompt
from helpers.experiments.reweighting import TrainConfig, label_head
from helpers.core.tasks import load_task

LABELS = [5, 9, 17]
ROTARY = tuple(f for f in TINY_FAMILIES if f != "gpt2")  # GPT-2's absolute positions move with a prefix


def _toy_prompt(ids, label_positions, label_classes, target, label=0, bos=False) -> Prompt:
    return Prompt(
        text="", input_ids=tuple(int(i) for i in ids), label_positions=tuple(label_positions),
        label_classes=tuple(label_classes), label_spans=tuple((p, p + 1) for p in label_positions),
        format_positions=(), text_positions=(), query_positions=(), query_start=12, target=target, label=label,
        special_positions=(0,) if bos else (),
    )


def _toy_prompts(bos=False):
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(3, 100, (12,), generator=g).tolist()
    if bos:
        shared[0] = 1
    out = []
    for n, y in [(5, 0), (3, 2), (7, 1)]:
        ids = shared + torch.randint(3, 100, (n,), generator=g).tolist()
        out.append(_toy_prompt(ids, (1, 3, 5, 7, 9, 11), (1, 0, 2, 0, 2, 1), len(ids) - 1, y, bos))
    return out


def _dims(model):
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    return (cfg.num_hidden_layers, heads, getattr(cfg, "num_key_value_heads", heads),
            getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, cfg.hidden_size)


@pytest.fixture(params=ROTARY)
def model(request, tiny_models):
    m = tiny_models(request.param)
    attention.enable(m, "anchors")
    return m


def _random_prefix(model, m=3, scale=3.0, seed=5):
    L, _, kv_heads, head_dim, _ = _dims(model)
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(1, kv_heads, m, head_dim, generator=g),
             scale * torch.randn(1, kv_heads, m, head_dim, generator=g)) for _ in range(L)]


def _short_prompt():
    """Three tokens: inside Gemma's tiny sliding window (4), so the first layer's target sees the whole prefix."""
    return _toy_prompt([4, 50, 23], (), (), 2)


def _plain_logits(model, prompt):
    ids = torch.tensor([list(prompt.input_ids)])
    hidden = model.base_model(input_ids=ids).last_hidden_state
    return label_head(model, hidden[0, prompt.target], LABELS)


# --------------------------------------------------------------------------------------------------------------------
# No-op cases
# --------------------------------------------------------------------------------------------------------------------


def test_empty_prefix_and_empty_prompt_leave_the_logits_unchanged(model):
    p = _toy_prompts()[0]
    with torch.no_grad():
        plain = _plain_logits(model, p)
        torch.testing.assert_close(tu.prefix_logits(model, p, None, LABELS), plain, rtol=0, atol=1e-6)
        torch.testing.assert_close(tu.soft_logits(model, p, None, LABELS), plain, rtol=0, atol=1e-6)
        empty = torch.zeros(0, _dims(model)[4])
        torch.testing.assert_close(tu.soft_logits(model, p, empty, LABELS), plain, rtol=0, atol=1e-6)
        # a real prefix does change them (so the comparisons above could fail)
        assert (tu.prefix_logits(model, p, _random_prefix(model), LABELS) - plain).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------------------
# The theorem (Petrov, Torr & Bibi 2024): in the first layer the content's relative attention is unchanged
# --------------------------------------------------------------------------------------------------------------------


def _renormalised(att, content):
    c = att[..., content]
    return c / c.sum(-1, keepdim=True)


@pytest.mark.parametrize("method", ["prefix-3", "prompt-3"])
def test_first_layer_relative_content_attention_is_invariant_to_a_random_prefix(model, method):
    lm = SimpleNamespace(model=model)
    p = _short_prompt()
    base, base_content = tu.attention_at_target(lm, p, "icl-1")
    if method == "prefix-3":
        kv = _random_prefix(model, scale=6.0)
        trained = {"keys": np.stack([k.numpy() for k, _ in kv]), "values": np.stack([v.numpy() for _, v in kv])}
    else:  # soft tokens at the very start (this toy prompt has no BOS): a prefix at the input
        g = torch.Generator().manual_seed(6)
        trained = {"soft": 6 * torch.randn(3, _dims(model)[4], generator=g).numpy()}
    att, content = tu.attention_at_target(lm, p, method, trained)
    assert len(content) == len(p) and att.shape[-1] == len(p) + 3
    prefix_mass = 1 - att[0][..., content].sum(-1)
    assert prefix_mass.max() > 0.1, "the prefix must take real attention for the check to mean anything"
    a0, b0 = _renormalised(att[0], content), base[0] / base[0].sum(-1, keepdim=True)
    torch.testing.assert_close(a0, b0, rtol=0, atol=2e-6)
    # ... and un-normalised, the content attention is scaled by (1 - alpha) in every head
    torch.testing.assert_close(att[0][..., content], (1 - prefix_mass)[..., None] * b0, rtol=0, atol=2e-6)
    # in deeper layers the content's hidden states change, and so does its relative attention (not a theorem case)
    deeper = max((_renormalised(att[l], content) - base[l] / base[l].sum(-1, keepdim=True)).abs().max().item()
                 for l in range(1, att.shape[0]))
    assert deeper > 1e-4


def test_anchor_reweighting_changes_the_first_layer_relative_attention(model):
    lm = SimpleNamespace(model=model)
    p = _toy_prompts()[1]
    L, H, *_ = _dims(model)
    beta = torch.full((L, H, 3), 1.0)
    base, _ = tu.attention_at_target(lm, p, "icl-1")
    att, content = tu.attention_at_target(lm, p, "anchor", {"beta": beta.numpy()})
    change = (_renormalised(att[0], content) - base[0] / base[0].sum(-1, keepdim=True)).abs().max()
    assert change > 1e-3


def test_attention_report_separates_prefix_from_reweighting(model):
    lm = SimpleNamespace(model=model)
    prompts = _toy_prompts()[:2]
    kv = _random_prefix(model)
    trained = {"keys": np.stack([k.numpy() for k, _ in kv]), "values": np.stack([v.numpy() for _, v in kv])}
    rep = tu.attention_report(lm, prompts, "prefix-3", trained, 3)
    L, H, *_ = _dims(model)
    assert rep["tv"].shape == (2, L, H)
    assert rep["maxdiff"][:, 0].max() < 2e-6 and rep["maxdiff"][:, 1:].max() > 1e-4
    assert rep["outside"].max() > 0.1  # (tiny Gemma: layer 0 has a 4-token window; its layer 1 sees the prefix)
    np.testing.assert_allclose(rep["anchor_share"][:, 0], rep["anchor_share_base"][:, 0], atol=2e-6)
    rw = tu.attention_report(lm, prompts, "anchor", {"beta": np.ones((L, H, 3), dtype=np.float32)}, 3)
    assert rw["maxdiff"][:, 0].max() > 1e-3
    # exp(1) > 1 on every label word: their share grows wherever the target sees them (tiny Gemma's window hides them)
    assert (rw["anchor_share"][:, 0] >= rw["anchor_share_base"][:, 0] - 1e-6).all()  # layer 0: same inputs
    assert (rw["anchor_share"][:, 0] > rw["anchor_share_base"][:, 0] + 1e-3).any()


# --------------------------------------------------------------------------------------------------------------------
# The fast evaluation (shared demonstrations cached) equals full forward passes
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bos", [False, True])
def test_cached_evaluation_equals_full_forward(model, monkeypatch, bos):
    monkeypatch.setattr(tu, "label_token_ids", lambda task, tok: LABELS)
    prompts = _toy_prompts(bos)
    lm = SimpleNamespace(model=model, tokenizer=None)
    task = SimpleNamespace(name="toy")
    kv = _random_prefix(model, m=2)
    soft = 2 * torch.randn(2, _dims(model)[4], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full_prefix = torch.stack([tu.prefix_logits(model, p, kv, LABELS) for p in prompts]).numpy()
        full_soft = torch.stack([tu.soft_logits(model, p, soft, LABELS) for p in prompts]).numpy()
    np.testing.assert_allclose(tu.evaluate_prefix(lm, task, prompts, kv, batch_size=2), full_prefix,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tu.evaluate_soft(lm, task, prompts, soft, batch_size=2), full_soft,
                               rtol=1e-5, atol=1e-5)


def test_soft_tokens_go_after_bos():
    assert tu.insert_slot(_toy_prompts(bos=True)[0]) == 1
    assert tu.insert_slot(_toy_prompts(bos=False)[0]) == 0


# --------------------------------------------------------------------------------------------------------------------
# PEZ: real tokens
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])  # Gemma scales its embeddings by sqrt(d)
def test_pez_projection_returns_real_tokens_whose_embedding_is_the_projection(tiny_models, family):
    model = tiny_models(family)
    soft = torch.randn(4, _dims(model)[4], generator=torch.Generator().manual_seed(8))
    ids, hard = tu.project_to_vocab(model, soft)
    table = model.get_input_embeddings()
    assert ids.dtype == torch.long and ((0 <= ids) & (ids < table.weight.shape[0])).all()
    torch.testing.assert_close(hard, table(ids[None])[0], rtol=0, atol=0)
    # the nearest by cosine, by brute force
    w = table.weight
    cos = torch.nn.functional.cosine_similarity(soft[:, None, :], w[None], dim=-1)
    assert ids.tolist() == cos.argmax(1).tolist()
    # a vocabulary row projects onto itself
    again, _ = tu.project_to_vocab(model, table(torch.tensor([[11, 42]]))[0])
    assert again.tolist() == [11, 42]


def test_pez_prompt_as_tokens_gives_the_same_logits(tiny_models):
    model = tiny_models("gemma3")
    attention.enable(model, "anchors")
    p = _toy_prompts(bos=True)[0]
    ids = [7, 8, 9]
    inserted = _toy_prompt(p.input_ids[:1] + tuple(ids) + p.input_ids[1:], (), (), p.target + 3)
    with torch.no_grad():
        as_soft = tu.soft_logits(model, p, tu._embed(model, ids), LABELS)
        as_tokens = _plain_logits(model, inserted)
    torch.testing.assert_close(as_soft, as_tokens, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Training on real prompts (tiny model, real tokenizer): parameter counts, the model frozen, the loss moves
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sst2_lm(data_dir, offline_tokenizers, tiny_models):
    tok = offline_tokenizers["gemma-3-270m"]
    model = tiny_models("gemma3", vocab_size=len(tok))
    attention.enable(model, "anchors")
    L, H, *_ = _dims(model)
    lm = SimpleNamespace(name="tiny-gemma3", model=model, tokenizer=tok, n_layers=L, n_heads=H, max_length=10_000,
                         device=torch.device("cpu"))
    return lm, load_task("sst2", data_dir)


def test_parameter_counts_match_what_is_trained(sst2_lm):
    from helpers.experiments.reweighting import seed_setup

    lm, data = sst2_lm
    s = seed_setup(lm, data, 42, 2)
    L, H, kv_heads, head_dim, d = _dims(lm.model)
    one = TrainConfig(epochs=1)
    prefix = tu.train_prefix(lm, data.task, s.train_prompts, 4, 42, one)
    soft = tu.train_soft(lm, data.task, s.train_prompts, 4, 42, one)
    pez = tu.train_pez(lm, data.task, s.train_prompts, 4, 42, one)
    assert prefix["keys"].size + prefix["values"].size == tu.n_trained(lm.model, "prefix-4", 2) == L * 2 * 4 * kv_heads * head_dim
    assert soft["soft"].size == tu.n_trained(lm.model, "prompt-4", 2) == 4 * d
    assert pez["ids"].shape == (4,) and tu.n_trained(lm.model, "pez-4", 2) == 4
    assert tu.n_trained(lm.model, "anchor", 2) == L * H * 2 and tu.n_trained(lm.model, "icl-1", 2) == 0
    assert not any(p.requires_grad for p in lm.model.parameters())
    for r in (prefix, soft, pez):
        assert r["n_steps"] == len(s.train_prompts)
    # training moved the parameters away from their initialisation
    init = tu.init_prefix(lm.model, prefix["init_ids"].tolist())
    assert max(np.abs(prefix["keys"][l] - init[l][0].numpy()).max() for l in range(L)) > 1e-4


def test_methods_parse():
    assert tu.method_kind("prefix-16") == ("prefix", 16)
    assert tu.method_kind("anchor") == ("anchor", 0)
    for bad in ["prefix-0", "prefix", "lora-4"]:
        with pytest.raises(ValueError):
            tu.method_kind(bad)
    assert tu.methods_of(tu.SIZES["book"])[:2] == ("icl-1", "anchor")


def test_peft_prefix_tuning_gives_the_same_logits(tiny_models):
    """PEFT's prefix-tuning runs on our attention function and agrees with ours (same keys and values)."""
    peft = pytest.importorskip("peft")
    model = tiny_models("qwen2")
    attention.enable(model, "anchors")
    L, _, kv_heads, head_dim, _ = _dims(model)
    kv = _random_prefix(model, m=2)
    p = _toy_prompts()[0]
    with torch.no_grad():
        ours = tu.prefix_logits(model, p, kv, LABELS)
    import copy

    pm = peft.get_peft_model(copy.deepcopy(model), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    # PEFT's table (m, L*2*H_kv*D): viewed (m, L*2, H_kv, D); layer l's keys are row 2l, its values row 2l+1
    table = torch.stack([t[0].permute(1, 0, 2) for pair in kv for t in pair], 1)  # (m, L*2, H_kv, D)
    pm.prompt_encoder.default.embedding.weight.data.copy_(table.reshape(2, -1))
    with torch.no_grad():
        out = pm(input_ids=torch.tensor([list(p.input_ids)]), output_hidden_states=True)
    theirs = out.logits[0, p.target, LABELS]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_soft_tokens_after_bos_move_the_first_layer_only_through_positions(tiny_models):
    """After BOS the content (but BOS) moves m positions away from BOS: rotary attention sees it. With the same
    soft tokens before everything (a uniform shift) the first layer is exact again (test above)."""
    model = tiny_models("llama")
    attention.enable(model, "anchors")
    lm = SimpleNamespace(model=model)
    p = _toy_prompt([1, 50, 23, 40], (), (), 3, bos=True)
    soft = 6 * torch.randn(3, _dims(model)[4], generator=torch.Generator().manual_seed(6))
    base, _ = tu.attention_at_target(lm, p, "icl-1")
    att, content = tu.attention_at_target(lm, p, "prompt-3", {"soft": soft.numpy()})
    assert content == [0, 4, 5, 6]
    change = (_renormalised(att[0], content) - base[0] / base[0].sum(-1, keepdim=True)).abs().max()
    assert change > 1e-4
    # the same prompt without the BOS role: soft tokens first, a uniform shift, exact
    q = _toy_prompt([1, 50, 23, 40], (), (), 3, bos=False)
    att, content = tu.attention_at_target(lm, q, "prompt-3", {"soft": soft.numpy()})
    torch.testing.assert_close(_renormalised(att[0], content), base[0] / base[0].sum(-1, keepdim=True), rtol=0,
                               atol=2e-6)


def test_accuracy_and_paired_gain_on_constructed_runs():
    idx = np.arange(4)
    runs = {"icl-1": {42: {"correct": np.array([0, 0, 1, 1]), "test_index": idx},
                      43: {"correct": np.array([1, 0, 0, 0]), "test_index": idx}},
            "prefix-4": {42: {"correct": np.array([1, 1, 1, 1]), "test_index": idx}}}
    e = tu.accuracy_of(runs, "icl-1")
    assert e.value == pytest.approx(37.5) and e.n == "4 × 2"
    g = tu.gain_over_icl(runs, "prefix-4")  # only seed 42 is shared: 100 - 50
    assert g.value == pytest.approx(50.0) and g.n == "4 × 1"
    runs["prefix-4"][42]["test_index"] = idx + 1
    with pytest.raises(ValueError, match="other test examples"):
        tu.gain_over_icl(runs, "prefix-4")


def test_task_average_weights_tasks_equally_and_refuses_mismatched_seeds():
    idx = np.arange(4)

    def run(c):
        return {"correct": np.array(c), "test_index": idx}

    by_task = {"a": {"icl-1": {42: run([0, 0, 0, 0])}, "anchor": {42: run([1, 1, 1, 1])}},
               "b": {"icl-1": {42: run([0, 0, 1, 1])}, "anchor": {42: run([0, 0, 1, 1])}}}
    assert tu.task_average(by_task, "anchor").value == pytest.approx(75.0)  # (100 + 50) / 2
    g = tu.task_average(by_task, "anchor", "icl-1")
    assert g.value == pytest.approx(50.0) and g.low <= 50.0 <= g.high  # (100 + 0) / 2, paired
    by_task["b"]["anchor"] = {43: run([1, 1, 1, 1])}
    with pytest.raises(ValueError, match="same seeds"):
        tu.task_average(by_task, "anchor")
    del by_task["b"]["anchor"]
    with pytest.raises(ValueError, match="was not run on b"):
        tu.task_average(by_task, "anchor")
    by_task["b"]["anchor"] = {42: run([1, 1, 1, 1]), 43: run([0, 0, 0, 0])}
    by_task["b"]["icl-1"][43] = run([0, 0, 0, 0])
    assert tu.task_average(by_task, "anchor", seeds=[42]).value == pytest.approx(100.0)  # seed 43 left out
    with pytest.raises(ValueError, match="lacks seeds"):
        tu.task_average(by_task, "anchor", seeds=[42, 43])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_position_shift_floor_is_float_error_for_rotary_models_only(tiny_models, family):
    """Shifting every position by m (what a prefix of length m does to the prompt) leaves a rotary model's relative
    attention unchanged up to float error, so the floor is tiny; GPT-2's learned absolute positions move it, which
    shows the measure detects a real change."""
    model = tiny_models(family)
    attention.enable(model, "anchors")
    lm = SimpleNamespace(model=model)
    floor = tu.shift_floor(lm, _toy_prompts()[:2], (1, 4))
    L, H = _dims(model)[:2]
    assert floor.shape == (2, 2, L, H)
    if family == "gpt2":
        assert floor[:, :, 0].max() > 1e-3
    else:
        assert floor.max() < 1e-5


def test_heldout_lr_picks_the_rate_with_the_lowest_held_out_loss_and_sees_only_training_prompts():
    from helpers.experiments.reweighting import heldout_lr

    prompts = [_toy_prompt([1, 2, 3], (1,), (0,), 2, label=y) for y in (0, 1) * 4]
    seen = []

    def fit_and_score(fit_on, held_out, lr):
        seen.append((len(fit_on), len(held_out)))
        assert not set(map(id, fit_on)) & set(map(id, held_out))
        gold = np.array([p.label for p in held_out])
        margin = {0.1: 3.0, 0.01: 1.0, 1.0: -2.0}[lr]  # 0.1 separates the held-out classes best
        return np.stack([np.where(gold == 0, margin, -margin), np.where(gold == 1, margin, -margin)], 1)

    out = heldout_lr(prompts, fit_and_score, 42, (0.01, 0.1, 1.0), folds=2)
    assert float(out["lr"]) == 0.1 and out["heldout_loss"].shape == (3, 2)
    assert out["heldout_acc"][1].min() == 1.0 and out["heldout_acc"][2].max() == 0.0
    assert seen == [(4, 4)] * 6  # every rate on both folds, each fold half of the training prompts
    with pytest.raises(ValueError, match="at least 2 training examples of every class"):  # never sklearn's words
        heldout_lr(prompts[:3], fit_and_score, 42, (0.01, 0.1), folds=2)


def test_fixed_rates_need_no_search_and_keep_the_earlier_keys():
    fixed = tu.SIZES["fixed"]
    assert [tu.method_lr(None, None, fixed, m) for m in ("anchor", "prompt-16", "prefix-1", "pez-8")] == \
        [0.01, 0.01, 0.01, 0.1]
    assert tu._settings(fixed, 42, "pez-8", 0.1)["lr"] == 0.1 and "lr" not in tu._settings(fixed, 42, "icl-1")
    with pytest.raises(ValueError, match="give none for prefix"):
        tu.method_lr(None, None, dataclasses.replace(fixed, fixed_rates=(("anchor", 0.01),)), "prefix-4")


def test_every_kind_of_method_has_a_grid_and_a_length_to_search_on():
    config = tu.SIZES["book"]
    assert set(tu.LR_GRIDS) == {"anchor", "prompt", "prefix", "pez"}
    assert [tu.search_method(config, k) for k in tu.LR_GRIDS] == ["anchor", "prompt-4", "prefix-4", "pez-8"]
    assert tu.search_method(tu.SIZES["quick"], "pez") == "pez-4"
    for kind, grid in tu.LR_GRIDS.items():
        assert len(grid) >= 3 and list(grid) == sorted(grid), kind
    with pytest.raises(ValueError, match="trains nothing"):
        tu.train_method(None, None, [], "icl-1", 42, config, 0.01)


@pytest.mark.slow
def test_tuning_trains_at_the_rate_its_held_out_search_chose(tmp_path, monkeypatch, data_dir):
    """On a real small model (quick sizes, SST-2): the search of prompt tuning's rate on training examples is cached,
    the run of every length of that kind trains at the rate chosen, and a lookup without the search finds nothing."""
    import json

    from helpers.core.models import load_model

    monkeypatch.setenv("ANCHORS_RESULTS", str(tmp_path))
    torch.set_num_threads(1)
    lm = load_model("smollm2-135m")
    data, config = load_task("sst2", data_dir), tu.SIZES["quick"]
    assert tu.tuning_run(lm, data, config, 42, "prompt-1", lookup_only=True) is None
    run = tu.tuning_run(lm, data, config, 42, "prompt-1")
    search = tu.lr_search_run(lm, data, config, "prompt", lookup_only=True)
    assert search is not None and float(search["lr"]) in tu.LR_GRIDS["prompt"]
    assert search["heldout_loss"].shape == (len(tu.LR_GRIDS["prompt"]), 2)
    assert np.isfinite(search["heldout_loss"]).all() and len(set(search["heldout_loss"].mean(1).round(6))) > 1
    sidecars = [json.loads(p.read_text()) for p in (tmp_path / tu.RESULTS_FOLDER).glob("*.json")]
    trained = [s for s in sidecars if s["settings"]["method"] == "prompt-1"]
    assert len(trained) == 1 and trained[0]["settings"]["lr"] == float(search["lr"])
    assert run["correct"].shape == (config.n_test,)
    assert set(tu.collect_lr_searches(lm, data, config)) == {"prompt"}
