"""Anchor re-weighting (paper §3.1): the hook with several shots, the exact cheap training step, training, the
baselines' demonstrations, the random-position control and the calibration controls."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_FAMILIES

from helpers.core import attention
from helpers.core.attention import Record, Reweight, intervene
from helpers.core.prompts import Prompt, collate, label_token_ids, target_logits
from helpers.core.prefix import build_prefix
from helpers.experiments.reweighting import (
    METHODS, TrainConfig, bias_calibration, cached_step, class_positions, contextual_calibration,
    continued_label_logits, evaluate, full_step, label_head, many_shots, n_parameters, prefix_states,
    random_positions, seed_setup, demonstration_prefix, train_beta, train_bias,
)
from helpers.core.tasks import TASKS, load_task, sample_fixed_demonstrations, subsample_test

LABELS = [5, 9, 17]  # label "token ids" of a 3-class toy task in the tiny vocabulary


def _toy_prompt(ids, label_positions, label_classes, target, label=0) -> Prompt:
    """A Prompt over the tiny vocabulary: demonstrations share the first 12 tokens."""
    return Prompt(
        text="", input_ids=tuple(int(i) for i in ids), label_positions=tuple(label_positions),
        label_classes=tuple(label_classes), label_spans=tuple((p, p + 1) for p in label_positions),
        format_positions=(), text_positions=(), query_positions=(), query_start=12, target=target, label=label,
        special_positions=(),
    )


def _toy_prompts():
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(3, 100, (12,), generator=g).tolist()
    out = []
    for n, y in [(5, 0), (3, 2), (7, 1)]:
        ids = shared + torch.randint(3, 100, (n,), generator=g).tolist()
        # two demonstrations per class, class order 1, 0, 2, 0, 2, 1 (label words at 1, 3, 5, 7, 9, 11)
        out.append(_toy_prompt(ids, (1, 3, 5, 7, 9, 11), (1, 0, 2, 0, 2, 1), len(ids) - 1, y))
    return out


def _dims(model):
    cfg = model.config.get_text_config()
    return cfg.num_hidden_layers, cfg.num_attention_heads


@pytest.fixture(params=TINY_FAMILIES)
def model(request, tiny_models):
    m = tiny_models(request.param)
    attention.enable(m, "anchors")
    return m


def test_positions_by_class_with_two_shots():
    p = _toy_prompts()[0]
    assert class_positions(p, 3) == [[3, 7], [1, 11], [5, 9]]
    with pytest.raises(ValueError, match="same number"):
        class_positions(_toy_prompt(range(3, 20), (1, 3, 5), (0, 0, 1), 16), 2)


# --------------------------------------------------------------------------------------------------------------------
# The hook: beta = 0 is exact, exp(beta) on the chosen entries only, several shots share one beta
# --------------------------------------------------------------------------------------------------------------------


def test_beta_zero_leaves_logits_unchanged_exactly(model):
    prompts = _toy_prompts()
    batch = collate(prompts, 0)
    L, H = _dims(model)
    positions = torch.tensor([class_positions(p, 3) for p in prompts])  # (B, C, K=2)
    with torch.no_grad():
        plain = target_logits(model, batch)
        hook = Reweight(torch.zeros(L, H, 3), batch.target, positions)
        with intervene(hook):
            hooked = target_logits(model, batch)
    assert hook.seen == set(range(L))
    assert torch.equal(hooked, plain)


def test_hooked_entries_are_exp_beta_times_unhooked_and_nothing_else_changes(model):
    prompts = _toy_prompts()
    batch = collate(prompts, 0)
    L, H = _dims(model)
    beta = 0.8 * torch.randn(L, H, 3, generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([class_positions(p, 3) for p in prompts])  # (B, C, K)
    before, after = Record(), Record()
    with torch.no_grad(), intervene(before, Reweight(beta, batch.target, positions), after):
        target_logits(model, batch)
    n_scaled = 0
    for layer in range(L):
        a, b = after.attentions[layer], before.attentions[layer]
        expected = b.clone()
        for i, p in enumerate(prompts):
            for c in range(3):
                for pos in positions[i, c]:  # both shots of class c: the same multiplier
                    expected[i, :, p.target, pos] = b[i, :, p.target, pos] * torch.exp(beta[layer, :, c])
                    n_scaled += int((b[i, :, p.target, pos] > 0).sum())
        torch.testing.assert_close(a, expected, rtol=1e-6, atol=0)
        unchanged = torch.ones_like(a, dtype=torch.bool)
        for i, p in enumerate(prompts):
            unchanged[i, :, p.target, positions[i].flatten()] = False
        assert torch.equal(a[unchanged], b[unchanged]), f"layer {layer}: an entry outside (q, p_i) changed"
    assert n_scaled > 0


def test_reweight_rejects_bad_positions():
    beta = torch.zeros(2, 2, 2)
    with pytest.raises(ValueError, match="repeat"):
        Reweight(beta, torch.tensor([9]), torch.tensor([[3, 3]]))
    with pytest.raises(ValueError, match="before the target"):
        Reweight(beta, torch.tensor([9]), torch.tensor([[3, 9]]))
    with pytest.raises(ValueError, match="label_positions"):
        Reweight(beta, torch.tensor([9]), torch.tensor([[1, 2, 3]]))


# --------------------------------------------------------------------------------------------------------------------
# The cheap step and the shared-prefix evaluation equal the full forward pass
# --------------------------------------------------------------------------------------------------------------------


def test_label_head_equals_full_vocabulary_logits(model):
    prompts = _toy_prompts()
    batch = collate(prompts, 0)
    with torch.no_grad():
        full = target_logits(model, batch)[:, LABELS]
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  use_cache=False).last_hidden_state[torch.arange(3), batch.target]
        torch.testing.assert_close(label_head(model, hidden, LABELS), full, rtol=1e-5, atol=1e-5)


def test_cached_step_equals_full_step_loss_and_gradient(model):
    prompts = _toy_prompts()
    L, H = _dims(model)
    beta = (0.5 * torch.randn(L, H, 3, generator=torch.Generator().manual_seed(2))).requires_grad_()
    shared, sharing = demonstration_prefix(model, prompts)
    assert shared.length == 12 and sharing == [0, 1, 2]
    for p in prompts:
        pos = class_positions(p, 3)
        full = full_step(model, p, beta, pos, LABELS)
        g_full, = torch.autograd.grad(F.cross_entropy(full[None], torch.tensor([p.label])), beta)
        cheap = cached_step(model, p, prefix_states(model, p, shared), beta, pos, LABELS)
        g_cheap, = torch.autograd.grad(F.cross_entropy(cheap[None], torch.tensor([p.label])), beta)
        torch.testing.assert_close(cheap, full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_cheap, g_full, rtol=1e-4, atol=1e-6)
        assert g_full.abs().sum() > 0


def test_shared_prefix_evaluation_equals_full_forward(model, monkeypatch):
    import helpers.experiments.reweighting as rw

    monkeypatch.setattr(rw, "label_token_ids", lambda task, tok: LABELS)
    prompts = _toy_prompts()
    L, H = _dims(model)
    beta = 0.5 * torch.randn(L, H, 3, generator=torch.Generator().manual_seed(4))
    lm = SimpleNamespace(model=model, tokenizer=SimpleNamespace(pad_token_id=0))
    task = SimpleNamespace(name="toy")
    for b in (None, beta):
        pos = None if b is None else (lambda p: class_positions(p, 3))
        fast = evaluate(lm, task, prompts, b, pos, batch_size=2, progress=False)
        slow = evaluate(lm, task, prompts, b, pos, batch_size=3, progress=False, shared_prefix=False)
        np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)
    assert np.abs(evaluate(lm, task, prompts, beta, lambda p: class_positions(p, 3), progress=False)
                  - evaluate(lm, task, prompts, progress=False)).max() > 1e-4


def test_continued_logits_need_the_target_after_the_prefix(tiny_models):
    model = tiny_models("llama")
    attention.enable(model, "anchors")
    p = _toy_prompts()[0]
    start = build_prefix(model, p.input_ids[: p.target + 1])  # the target inside the cache: nothing left to run
    with pytest.raises(ValueError, match="inside the cached prefix"):
        continued_label_logits(model, [p], start, LABELS)


# --------------------------------------------------------------------------------------------------------------------
# Training on real prompts (a tiny model with a real tokenizer's vocabulary)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sst2_lm(data_dir, offline_tokenizers, tiny_models):
    tok = offline_tokenizers["smollm2-135m"]
    model = tiny_models("qwen2", vocab_size=len(tok))  # grouped-query attention: 4 query heads, 2 kv heads
    model.config.max_position_embeddings = 1024  # real prompts are longer than the tiny config's 64 positions
    attention.enable(model, "anchors")
    L, H = _dims(model)
    lm = SimpleNamespace(name="tiny-qwen2", model=model, tokenizer=tok, n_layers=L, n_heads=H,
                         max_length=10_000)
    return lm, load_task("sst2", data_dir)


def test_one_step_moves_beta_and_lowers_the_loss(sst2_lm):
    lm, data = sst2_lm
    setup = seed_setup(lm, data, 42, 4)
    task = data.task
    ids = label_token_ids(task, lm.tokenizer)
    p = setup.train_prompts[0]
    pos = class_positions(p, task.n_classes)
    prefix = prefix_states(lm.model, p)
    beta = torch.zeros(lm.n_layers, lm.n_heads, task.n_classes, requires_grad=True)
    opt = torch.optim.Adam([beta], lr=0.01)
    before = F.cross_entropy(cached_step(lm.model, p, prefix, beta, pos, ids)[None], torch.tensor([p.label]))
    before.backward()
    opt.step()
    assert beta.detach().abs().max() > 0
    with torch.no_grad():
        after = F.cross_entropy(cached_step(lm.model, p, prefix, beta, pos, ids)[None], torch.tensor([p.label]))
    assert after < before


def test_train_beta_shapes_parameters_and_loss(sst2_lm):
    lm, data = sst2_lm
    setup = seed_setup(lm, data, 42, 4)
    C = data.task.n_classes
    out = train_beta(lm, data.task, setup.train_prompts[:4], lambda p: class_positions(p, C), 42,
                     TrainConfig(epochs=3), progress=False)
    assert out["beta"].shape == (lm.n_layers, lm.n_heads, C)  # per *query* head (4), not per kv head (2)
    assert out["beta"].size == n_parameters(lm.n_layers, lm.n_heads, C) == lm.n_layers * 4 * C
    assert out["epoch_loss"].shape == (3,) and int(out["n_steps"]) == 12
    assert out["loss_end"] < out["loss_start"]
    again = train_beta(lm, data.task, setup.train_prompts[:4], lambda p: class_positions(p, C), 42,
                       TrainConfig(epochs=3), progress=False)
    np.testing.assert_array_equal(out["beta"], again["beta"])  # the seeded order makes training reproducible


def test_train_beta_refuses_unfrozen_parameters(sst2_lm):
    lm, data = sst2_lm
    setup = seed_setup(lm, data, 42, 2)
    lm.model.lm_head.weight.requires_grad_(True)
    try:
        with pytest.raises(ValueError, match="frozen"):
            train_beta(lm, data.task, setup.train_prompts[:1], lambda p: class_positions(p, 2), 42, progress=False)
    finally:
        lm.model.lm_head.weight.requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------------
# Demonstrations of the baselines, and the random-position control
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(TASKS))
def test_seed_setup_follows_the_paper(task, data_dir, offline_tokenizers):
    tok = offline_tokenizers["gemma-3-270m"]
    lm = SimpleNamespace(tokenizer=tok, max_length=32_768)
    data = load_task(task, data_dir)
    C = data.task.n_classes
    s = seed_setup(lm, data, 43, 5)
    demos, extra = sample_fixed_demonstrations(data, 1, 43, extra_per_class=4)
    assert s.demos == tuple(demos) and s.extra == tuple(extra) and len(extra) == 4 * C
    assert s.test == tuple(subsample_test(data, 43, 5))
    k = many_shots(data.task)
    assert k == (3 if task == "agnews" else 5) and len(s.many) == k * C
    for c in range(C):  # the demonstration plus the first k - 1 auxiliary examples of each class
        demo_c = [j for j in demos if data.train[j].label == c]
        extra_c = [j for j in extra if data.train[j].label == c][: k - 1]
        assert {j for j in s.many if data.train[j].label == c} == set(demo_c + extra_c)
    assert list(s.many) != sorted(s.many, key=lambda j: (s.demos + s.extra).index(j))  # shuffled (seeded)
    assert seed_setup(lm, data, 43, 5).many == s.many
    for p in s.train_prompts + s.test_prompts + (s.content_free,):
        assert p.input_ids[: p.query_start] == s.test_prompts[0].input_ids[: p.query_start]  # same demonstrations
    assert [p.label for p in s.train_prompts] == [data.train[j].label for j in extra]
    assert s.content_free.text.endswith(f"{data.task.input_prefix}: N/A\n{data.task.label_prefix}:")


@pytest.mark.parametrize("name", ["gemma-3-270m", "qwen2.5-coder-0.5b", "smollm2-135m"])
def test_random_control_never_picks_label_format_or_bos(name, data_dir, offline_tokenizers):
    tok = offline_tokenizers[name]
    lm = SimpleNamespace(tokenizer=tok, max_length=32_768)
    for task in TASKS:
        data = load_task(task, data_dir)
        C = data.task.n_classes
        for seed in (42, 43, 44, 45):
            s = seed_setup(lm, data, seed, 3)
            chosen = [random_positions(p, C, seed) for p in s.test_prompts + s.train_prompts]
            assert all(c == chosen[0] for c in chosen), "the same positions in every prompt of a seed"
            p = s.test_prompts[0]
            flat = [x for group in chosen[0] for x in group]
            assert len(flat) == C and len(set(flat)) == C  # as many positions as label words, one per demonstration
            forbidden = set(p.label_positions) | set(p.format_positions) | set(p.special_positions)
            for lo, hi in p.label_spans:
                forbidden |= set(range(lo, hi))
            assert not forbidden & set(flat)
            for c, group in enumerate(chosen[0]):  # column c sits in the demonstration of class c
                d = p.label_classes.index(c)
                assert group[0] in p.text_positions[d]
    if tok("a").input_ids[0] == tok.bos_token_id:
        assert 0 in p.special_positions and 0 not in flat


def test_random_control_depends_on_the_seed(data_dir, offline_tokenizers):
    lm = SimpleNamespace(tokenizer=offline_tokenizers["gemma-3-270m"], max_length=32_768)
    data = load_task("agnews", data_dir)
    p = seed_setup(lm, data, 42, 1).test_prompts[0]
    draws = {str(random_positions(p, 4, seed)) for seed in range(6)}
    assert len(draws) > 1


# --------------------------------------------------------------------------------------------------------------------
# Calibration controls on constructed logits
# --------------------------------------------------------------------------------------------------------------------


def test_contextual_calibration_divides_by_the_content_free_prior():
    # The model favours class 0 by log 4 on every input; the content-free input shows exactly that prior.
    prior = np.log(np.array([0.8, 0.2]))
    evidence = np.array([[0.5, 0.0], [0.0, 0.5], [1.0, 0.0], [0.0, 1.2]])
    logits = evidence + prior
    assert (logits.argmax(1) == 0).all()  # uncalibrated: always class 0
    cal = contextual_calibration(logits, prior + 3.0)  # a constant shift of the logits does not matter
    np.testing.assert_allclose(cal, evidence, atol=1e-12)  # the prior is gone
    assert cal.argmax(1).tolist() == [0, 1, 0, 1]
    # Zhao et al.: q = softmax(W p), W = diag(p_cf)^-1
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    q = p / np.array([0.8, 0.2])
    np.testing.assert_array_equal(q.argmax(1), cal.argmax(1))


def test_learned_bias_removes_a_constant_prior():
    rng = np.random.default_rng(0)
    gold = np.tile([0, 1, 2], 8)
    evidence = np.eye(3)[gold] * 1.0 + 0.1 * rng.standard_normal((24, 3))
    logits = evidence + np.array([2.0, 0.0, 0.0])  # class 0 always wins before correction
    assert (logits.argmax(1) == 0).all()
    out = train_bias(logits, gold, seed=42, config=TrainConfig(epochs=40))
    b = out["bias"]
    assert b[0] < b[1] and b[0] < b[2]
    assert out["loss_end"] < out["loss_start"]
    assert (bias_calibration(logits, b).argmax(1) == gold).mean() > (logits.argmax(1) == gold).mean()
    np.testing.assert_allclose(bias_calibration(logits, b), logits + b)
    # zero epochs: no change
    assert np.all(train_bias(logits, gold, 42, TrainConfig(epochs=0))["bias"] == 0)


def test_methods_are_named():
    assert METHODS == ("icl-1", "icl-5", "anchor", "random", "bias", "contextual")


# --------------------------------------------------------------------------------------------------------------------
# Committed book-profile results: a recomputed slice equals the committed one (slow: a real model)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_committed_reweighting_slice(data_dir):
    import helpers.experiments.reweighting as rw
    from helpers import load_model
    from helpers.core.runs import PROFILES

    lm = load_model("gemma-3-270m")
    data = load_task("sst2", data_dir)
    profile = PROFILES["book"]

    def committed(method):
        found = rw._cached(lm, data, rw._settings(profile, 42, method, rw.TrainConfig()), None)
        assert found is not None, f"committed {method} results missing or stale (settings/version changed?)"
        return found

    s = rw.seed_setup(lm, data, 42, rw.n_test_of(profile))
    icl, many, anchor = committed("icl-1"), committed("icl-5"), committed("anchor")
    np.testing.assert_array_equal(icl["test_index"], s.test)
    for res, prompts in [(icl, s.test_prompts), (many, s.many_prompts)]:
        fresh = rw.evaluate(lm, data.task, prompts[:8], progress=False)
        np.testing.assert_allclose(fresh, res["logits"][:8], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rw.evaluate(lm, data.task, [s.content_free], progress=False)[0], icl["cf_logits"],
                               rtol=1e-4, atol=1e-4)
    # Re-train beta from scratch (SST-2: 8 examples x 10 epochs) and compare.
    where = lambda p: rw.class_positions(p, 2)  # noqa: E731
    trained = rw.train_beta(lm, data.task, s.train_prompts, where, 42, progress=False)
    np.testing.assert_allclose(trained["beta"], anchor["beta"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(trained["epoch_loss"], anchor["epoch_loss"], rtol=1e-4, atol=1e-5)
    fresh = rw.evaluate(lm, data.task, s.test_prompts[:8], torch.from_numpy(anchor["beta"]), where, progress=False)
    np.testing.assert_allclose(fresh, anchor["logits"][:8], rtol=1e-4, atol=1e-4)
    # The calibration controls follow from the committed ICL logits.
    bias = rw.train_bias(icl["train_logits"], icl["train_gold"], 42)
    np.testing.assert_allclose(bias["bias"], committed("bias")["bias"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        rw.contextual_calibration(icl["logits"], icl["cf_logits"]).argmax(1), committed("contextual")["pred"])
    # The random control's positions are text tokens of the demonstrations.
    rnd = committed("random")
    assert rnd["positions"].tolist() == rw.random_positions(s.test_prompts[0], 2, 42)


def test_accuracy_and_paired_difference_on_constructed_runs():
    from helpers.experiments.reweighting import accuracy, best_control, correctness, difference

    def res(correct, index):
        return {"correct": np.array(correct, dtype=np.int8), "test_index": np.array(index)}

    runs = {
        "sst2": {"icl-1": [res([1, 0, 0, 1], [5, 6, 7, 8])], "anchor": [res([1, 1, 0, 1], [5, 6, 7, 8])],
                 "random": [res([1, 0, 0, 0], [5, 6, 7, 8])], "bias": [res([0, 0, 0, 1], [5, 6, 7, 8])],
                 "contextual": [res([1, 1, 1, 1], [5, 6, 7, 8])]},
        "trec": {"icl-1": [res([0, 0, 0, 0], [1, 2, 3, 4])], "anchor": [res([1, 0, 0, 0], [1, 2, 3, 4])],
                 "random": [res([0, 0, 0, 0], [1, 2, 3, 4])], "bias": [res([0, 0, 0, 0], [1, 2, 3, 4])],
                 "contextual": [res([0, 0, 0, 0], [1, 2, 3, 4])]},
    }
    assert accuracy(runs, "anchor", "sst2").value == pytest.approx(75.0)
    assert accuracy(runs, "anchor").value == pytest.approx((75.0 + 25.0) / 2)
    d = difference(runs, "anchor", "icl-1")
    assert d.value == pytest.approx(25.0) and d.low <= d.value <= d.high
    assert difference(runs, "anchor", "icl-1", "sst2").value == pytest.approx(25.0)
    assert best_control(runs) == "contextual"
    assert correctness(runs, "anchor")[0].shape == (4, 2)
    runs["trec"]["random"] = [res([0, 0, 0, 0], [1, 2, 3, 9])]
    with pytest.raises(ValueError, match="same test examples"):
        correctness(runs, "random", "trec")


def test_prefix_kv_continues_a_plain_key_value_list(model):
    """prefix_kv (plain (key, value) lists, as the tuning chapter's learned prefixes use) equals one pass over the
    whole sequence: the continued keys are those of the full sequence."""
    from helpers.experiments.reweighting import prefix_kv

    ids = _toy_prompts()[0].input_ids
    whole = prefix_kv(model, ids)
    start = prefix_kv(model, ids[:7])
    continued = prefix_kv(model, ids[7:], start=start)
    assert len(continued) == len(whole)
    for (k1, v1), (k2, v2) in zip(continued, whole):
        torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)


def test_fitted_bias_reaches_the_optimum_of_the_convex_problem():
    """Zero logits: the best bias is the log of the label frequencies, the loss their entropy."""
    from helpers.experiments.reweighting import batch_calibration, fit_bias

    gold = np.array([0] * 6 + [1] * 3 + [2] * 1)
    fit = fit_bias(np.zeros((10, 3)), gold)
    prior = np.array([0.6, 0.3, 0.1])
    np.testing.assert_allclose(fit["bias"], np.log(prior) - np.log(prior).mean(), atol=1e-5)
    assert float(fit["loss_end"]) == pytest.approx(-(prior * np.log(prior)).sum(), abs=1e-9)
    assert bool(fit["converged"]) and float(fit["grad_max"]) < 1e-8
    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 4)) * 3
    y = rng.integers(0, 4, 40)
    plain, scaled = fit_bias(z, y), fit_bias(z, y, temperature=True)
    assert float(scaled["loss_end"]) <= float(plain["loss_end"]) + 1e-12  # one more free parameter
    assert float(plain["loss_end"]) <= float(fit_bias(z, y)["loss_start"])
    # batch calibration: the mean predicted distribution over the batch becomes closer to uniform
    skewed = z + np.array([3.0, 0, 0, 0])
    p = lambda u: np.exp(u - np.logaddexp.reduce(u, axis=1, keepdims=True))  # noqa: E731
    assert p(batch_calibration(skewed)).mean(0).std() < p(skewed).mean(0).std()


# --------------------------------------------------------------------------------------------------------------------
# Equal-leverage controls, learning rates chosen on held-out training examples, the matched probe
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma-3-270m", "qwen2.5-coder-0.5b"])
def test_control_positions_are_the_tokens_around_each_label_word(name, data_dir, offline_tokenizers):
    from helpers.experiments.reweighting import colon_positions, demonstration_tokens, newline_positions

    tok = offline_tokenizers[name]
    lm = SimpleNamespace(tokenizer=tok, max_length=32_768)
    for task in TASKS:
        data = load_task(task, data_dir)
        C = data.task.n_classes
        p = seed_setup(lm, data, 43, 2).test_prompts[0]
        for c, (nl, co) in enumerate(zip(newline_positions(p, C), colon_positions(p, C))):
            d = p.label_classes.index(c)
            assert nl == [p.label_spans[d][1]] and co == [p.label_spans[d][0] - 1]
            assert tok.decode([p.input_ids[nl[0]]]).startswith("\n")
            assert tok.decode([p.input_ids[co[0]]]).endswith(":")
        seen = set()
        for d, (lo, hi) in enumerate(p.label_spans):
            own = set(demonstration_tokens(p, d))
            assert not own & set(range(lo, hi)) and not own & seen and not own & set(p.special_positions)
            assert set(p.text_positions[d]) <= own and hi in own and lo - 1 in own
            seen |= own
        assert max(seen) < p.query_start


def test_most_attended_token_is_chosen_per_demonstration_and_never_a_label():
    from helpers.experiments.reweighting import demonstration_tokens, most_attended

    p = Prompt(text="", input_ids=tuple(range(10)), label_positions=(2, 5), label_classes=(0, 1),
               label_spans=((2, 3), (5, 6)), format_positions=(), text_positions=((1,), (4,)), query_positions=(8,),
               query_start=7, target=9, label=0, special_positions=(0,))
    assert demonstration_tokens(p, 0) == (1, 3) and demonstration_tokens(p, 1) == (4, 6)  # BOS and labels out
    attention_row = np.zeros(len(p))
    attention_row[[0, 2, 5]] = 9.0  # BOS and the label words: never candidates
    attention_row[1], attention_row[3], attention_row[6] = 1.0, 0.5, 2.0
    assert most_attended(attention_row, p).tolist() == [1, 6]


def test_train_beta_in_half_of_the_layers_leaves_the_others_at_zero(sst2_lm):
    lm, data = sst2_lm
    setup = seed_setup(lm, data, 42, 4)
    C = data.task.n_classes
    out = train_beta(lm, data.task, setup.train_prompts[:4], lambda p: class_positions(p, C), 42,
                     TrainConfig(epochs=2), progress=False, layers=[0])
    assert np.abs(out["beta"][0]).max() > 0 and np.abs(out["beta"][1:]).max() == 0
    every = train_beta(lm, data.task, setup.train_prompts[:4], lambda p: class_positions(p, C), 42,
                       TrainConfig(epochs=2), progress=False)
    assert (np.abs(every["beta"]).reshape(lm.n_layers, -1).max(1) > 0).all()


def test_select_lr_uses_only_training_examples_and_picks_the_lowest_heldout_loss(sst2_lm, monkeypatch):
    from helpers.experiments import reweighting as rw

    lm, data = sst2_lm
    setup = seed_setup(lm, data, 42, 4)
    train = setup.train_prompts
    seen_fit, seen_eval = [], []

    def fake_train(lm_, task, prompts, positions, seed, config, progress=True, layers=None):
        seen_fit.append((config.lr, prompts))
        return {"beta": np.full((lm.n_layers, lm.n_heads, 2), config.lr, dtype=np.float32)}

    def fake_evaluate(lm_, task, prompts, beta=None, positions=None, **kw):
        seen_eval.append(prompts)
        lr = float(beta.flatten()[0])
        gold = np.array([p.label for p in prompts])
        good = 3.0 if abs(lr - 0.03) < 1e-9 else 0.3  # the middle rate separates the held-out fold best
        return np.stack([np.where(gold == 0, good, -good), np.where(gold == 1, good, -good)], 1)

    monkeypatch.setattr(rw, "train_beta", fake_train)
    monkeypatch.setattr(rw, "evaluate", fake_evaluate)
    out = rw.select_lr(lm, data.task, train, lambda p: class_positions(p, 2), 42, grid=(0.01, 0.03, 0.1), folds=2)
    assert float(out["lr"]) == 0.03 and out["heldout_loss"].shape == (3, 2)
    train_set = {p.input_ids for p in train}
    assert all({p.input_ids for p in ps} <= train_set for _, ps in seen_fit)
    assert all({p.input_ids for p in ps} <= train_set for ps in seen_eval)
    for (_, fit), held in zip(seen_fit, seen_eval):  # a fold is never trained on the examples it is scored on
        assert not {p.input_ids for p in fit} & {p.input_ids for p in held}


def test_probe_has_betas_parameter_count_and_learns_a_separable_task():
    from helpers.experiments.reweighting import PROBE_C_GRID, fit_probe

    rng = np.random.default_rng(0)
    d, C = 64, 3
    centres = rng.standard_normal((C, d)) * 3
    ytr, yte = np.repeat(np.arange(C), 8), np.repeat(np.arange(C), 20)
    xtr = centres[ytr] + rng.standard_normal((len(ytr), d))
    xte = centres[yte] + rng.standard_normal((len(yte), d))
    n_params = 4 * 3 * C  # beta of a 4-layer, 3-head model
    out = fit_probe(xtr, ytr, xte, n_params, C, seed=1)
    assert int(out["n_params"]) == n_params and int(out["k"]) == 11
    assert (out["logits"].argmax(1) == yte).mean() > 0.9
    assert float(out["C"]) in PROBE_C_GRID and out["fold_loss"].shape[0] == len(PROBE_C_GRID)
    noise = fit_probe(rng.standard_normal((24, d)), ytr, xte, n_params, C, seed=1)  # nothing to learn
    assert (noise["logits"].argmax(1) == yte).mean() < 0.6


def test_contextual_calibration_over_several_inputs_averages_their_priors():
    from helpers.experiments.reweighting import contextual_calibration_mean

    z = np.array([[2.0, 0.0], [0.0, 0.1]])
    one = np.array([[1.0, 0.0]])
    np.testing.assert_allclose(contextual_calibration_mean(z, one), contextual_calibration(z, one[0]))
    two = np.array([[1.0, 0.0], [0.0, 1.0]])  # opposite priors: their mean is uniform, nothing changes the argmax
    assert (contextual_calibration_mean(z, two).argmax(1) == z.argmax(1)).all()


@pytest.mark.slow
def test_states_lr_search_and_a_tuned_control_run_end_to_end(tmp_path, monkeypatch, data_dir):
    """On a real small model (quick profile, SST-2): the states run, the learning-rate search on training examples
    and a tuned position control, cached and found again."""
    from helpers.core.models import load_model
    from helpers.core.runs import PROFILES
    from helpers.experiments import reweighting as rw

    monkeypatch.setenv("ANCHORS_RESULTS", str(tmp_path))
    torch.set_num_threads(1)
    lm = load_model("smollm2-135m")
    profile, data = PROFILES["quick"], load_task("sst2", data_dir)
    seed = rw.reweighting_seeds(profile)[0]
    states = rw.states_run(lm, data, profile, seed, progress=False)
    p = rw.seed_setup(lm, data, seed, rw.n_test_of(profile)).test_prompts[0]
    assert states["cf3_logits"].shape == (3, 2) and states["test_states"].shape[0] == rw.n_test_of(profile)
    assert all(int(a) in rw.demonstration_tokens(p, d) for d, a in enumerate(states["attended"]))
    label_share = states["share_label_words"]
    assert label_share.shape == (lm.n_layers,) and (label_share > 0).all() and (label_share < 1).all()
    run = rw.tuned_run(lm, data, profile, seed, "beta-attended", progress=False)
    search = rw.lr_search_run(lm, data, profile, "beta-attended", progress=False, lookup_only=True)
    assert float(search["lr"]) in rw.LR_GRID and search["heldout_loss"].shape == (len(rw.LR_GRID), rw.LR_FOLDS)
    flat = sorted(int(x) for x in np.asarray(run["positions"]).ravel())
    assert flat == sorted(int(a) for a in states["attended"])
    deep = rw.tuned_run(lm, data, profile, seed, "beta-deep", progress=False)
    assert np.abs(deep["beta"][: lm.n_layers // 2]).max() == 0 and np.abs(deep["beta"][lm.n_layers // 2:]).max() > 0
    assert rw.tuned_run(lm, data, profile, seed, "beta-attended", progress=False, lookup_only=True) is not None


# --------------------------------------------------------------------------------------------------------------------
# The verdict "re-weighting beats the controls": every position control is needed (stub runs, no model)
# --------------------------------------------------------------------------------------------------------------------


def _verdict_runs(beaten_by: str | None = None, bos: bool = True):
    """Two tasks, one seed, eight test examples: tuned re-weighting 6 of 8 correct, every verdict control 4 of 8,
    except ``beaten_by``, which gets all 8 (it does better than re-weighting). ``bos``: the states runs show a BOS
    token and the BOS control was run; else neither."""
    from helpers.experiments import reweighting as rw

    def res(correct):
        return {"correct": np.array(correct, dtype=np.int8), "test_index": np.arange(8)}

    runs = {}
    for t in ("sst2", "trec"):
        by = {"anchor-tuned": [res([1, 1, 1, 1, 1, 1, 0, 0])], "icl-1": [res([1, 0] * 4)]}
        for c in rw.VERDICT_CONTROLS:
            if c != "beta-bos" or bos:
                by[c] = [res([1] * 8 if c == beaten_by else [1, 1, 0, 0, 1, 1, 0, 0])]
        by["states"] = [{"share_label_words": np.full(2, 0.05), **({"share_BOS": np.full(2, 0.3)} if bos else {})}]
        runs[t] = by
    return runs


def test_the_verdict_needs_every_equal_leverage_position_control():
    """Random text, newline, colon, most-attended token and BOS are all controls of the verdict: one that beats
    re-weighting is the one the row names, and a missing one is an error, never a comparison left out."""
    from helpers.experiments import reweighting as rw

    assert {"random-tuned", *rw.POSITION_CONTROLS} <= set(rw.VERDICT_CONTROLS)
    assert not set(rw.OPTIONAL_BETAS) & set(rw.VERDICT_CONTROLS)
    for position in ("random-tuned", *rw.POSITION_CONTROLS):
        m = rw.controls_measured(_verdict_runs(beaten_by=position))
        assert m.estimate.value == pytest.approx(-25.0), position
        assert f"closest control ({rw._TITLE_SHORT[position]})" in m.note
        assert set(m.support) == set(rw.VERDICT_CONTROLS)
        assert rw.beats_every_control(m) == rw.NOT_REPRODUCED
    for position in rw.POSITION_CONTROLS:
        runs = _verdict_runs()
        for by in runs.values():
            del by[position]
        with pytest.raises(ValueError, match=position):
            rw.verdict_controls(runs)


def test_the_bos_control_is_needed_exactly_where_the_tokenizer_adds_bos():
    from helpers.experiments import reweighting as rw

    without = _verdict_runs(bos=False)  # no BOS token: the control cannot exist, and the row says so
    assert "beta-bos" not in rw.verdict_controls(without)
    assert "no BOS control" in rw.controls_measured(without).note
    assert "beta-bos" in rw.verdict_controls(_verdict_runs(bos=True))
    missing = _verdict_runs(bos=True)  # a BOS token but no BOS control run: missing, not silently left out
    for by in missing.values():
        del by["beta-bos"]
    with pytest.raises(ValueError, match="beta-bos"):
        rw.verdict_controls(missing)


def test_cached_control_runs_keeps_only_seeds_with_every_position_control(monkeypatch):
    """A seed lacking any position control (the BOS one where the states show a BOS token) is left out of the
    verdict's runs; with no complete seed there are none (the row is "not yet run")."""
    from helpers.experiments import reweighting as rw

    seeds = (42, 43, 44)
    present = {}  # (seed, method) -> bool

    def fake_control_runs(lm, data, profile, seeds_, methods, **kw):
        out = {"states": [{"share_BOS": np.ones(2)} if present.get((s, "bos-token"), True) else {} for s in seeds_]}
        for m in methods:
            out[rw._tuned_key(m)] = [{"seed": s} if present.get((s, m), True) else None for s in seeds_]
        return out

    monkeypatch.setattr(rw, "_reweighting_runs", lambda model, profile: {t: {"icl-1": [{} for _ in seeds]}
                                                                        for t in rw.TASK_NAMES})
    monkeypatch.setattr(rw, "_cached_seeds", lambda model, profile: seeds)
    monkeypatch.setattr(rw, "load_task", lambda t: t)
    monkeypatch.setattr(rw, "control_runs", fake_control_runs)
    monkeypatch.setattr(rw, "with_fitted_controls", lambda runs: runs)
    monkeypatch.setattr(rw, "with_extra_controls", lambda runs: runs)
    methods = ("anchor",) + rw.CONTROL_BETAS

    def kept():
        runs = rw.cached_control_runs("m", None, methods, optional=())
        return None if runs is None else runs["sst2"]["seeds"]

    assert kept() == [42, 43, 44]
    present[(43, "beta-newline")] = False
    present[(44, "beta-bos")] = False
    assert kept() == [42]
    present[(44, "bos-token")] = False  # seed 44's tokenizer has no BOS token: its BOS control cannot be missing
    assert kept() == [42, 44]
    present[(42, "beta-colon")] = present[(44, "beta-colon")] = False
    assert kept() is None
