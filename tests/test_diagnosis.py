"""Diagnosis (paper §3.3): the Q/K record hook, the predicted and real confusion, the agreement statistics."""

import itertools
import math

import numpy as np
import pytest
import torch

from helpers.core.attention import RecordQK, intervene
from helpers.experiments.diagnosis import (anchor_projection, default_layer, flatten_heads, most_confused, normalised_distances,
                               pair_names, pair_spearman, pair_values, pairwise_auc, permutation_test,
                               predicted_confusion, real_confusion)

FAMILIES = ("gpt2", "gptj", "llama", "qwen2", "gemma3", "gemma3_softcap", "gemma2")


# ------------------------------------------------------------------------------------------------------------------
# Metrics on constructed inputs
# ------------------------------------------------------------------------------------------------------------------


def test_default_layer_is_the_papers_two_thirds():
    assert default_layer(48) == 32  # GPT2-XL, the paper's layer
    assert default_layer(18) == 12 and default_layer(24) == 16


def test_normalised_distances_on_a_line():
    x = np.array([[0.0], [1.0], [3.0]])
    d = normalised_distances(x)
    np.testing.assert_allclose(d, [[1, 1 / 3, 1], [1 / 3, 1, 2 / 3], [1, 2 / 3, 1]])
    np.testing.assert_allclose(predicted_confusion(x), d)
    with pytest.raises(ValueError):
        normalised_distances(np.ones((3, 2)))


def test_anchor_projection_recovers_known_directions_and_scales():
    # queries spread 3 along axis 0 and 1 along axis 1: variance 18/3 = 6 and 2/3 (ddof 1)
    q = np.zeros((4, 4))
    q[:, 0] = [3, -3, 0, 0]
    q[:, 1] = [0, 0, 1, -1]
    q += 10.0  # an offset: PCA centres the queries
    keys = np.array([[1.0, 2.0, 5.0, 7.0], [0.0, -1.0, 9.0, 9.0]])
    out = anchor_projection(q, keys, m=2)
    np.testing.assert_allclose(out["sigma"], [np.sqrt(6), np.sqrt(2 / 3)])
    # signs of principal directions are arbitrary; axes 2 and 3 (no query variance) must not count
    np.testing.assert_allclose(np.abs(out["khat"]), [[np.sqrt(6) * 1, np.sqrt(2 / 3) * 2],
                                                     [0, np.sqrt(2 / 3) * 1]], atol=1e-12)
    np.testing.assert_allclose(out["explained"], [6 / (6 + 2 / 3), (2 / 3) / (6 + 2 / 3)])
    with pytest.raises(ValueError):
        anchor_projection(q, keys, m=4)  # at most T - 1 directions
    with pytest.raises(ValueError):
        anchor_projection(q, keys[:, :3], m=1)


def test_first_m_directions_do_not_depend_on_how_many_are_fitted():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(60, 12)) * np.arange(12, 0, -1)
    k = rng.normal(size=(4, 12))
    a = anchor_projection(q, k, 10)["khat"]
    b = anchor_projection(q, k, 3)["khat"]
    np.testing.assert_allclose(np.abs(a[:, :3]), np.abs(b), atol=1e-10)  # what lets us store M = 50 and slice


def test_pairwise_auc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 40).astype(float)
    pos = rng.random(40) < 0.4
    assert pairwise_auc(scores, pos) == pytest.approx(roc_auc_score(pos, scores))
    assert pairwise_auc([0.4, 0.9, 0.5, 0.1], [True, True, False, False]) == pytest.approx(0.75)
    assert np.isnan(pairwise_auc([1.0, 2.0], [True, True]))


def test_real_confusion_separated_and_confused_pairs():
    probs = np.array([[0.8, 0.1, 0.1]] * 3 + [[0.1, 0.45, 0.45]] * 3 + [[0.1, 0.45, 0.45]] * 2)
    gold = np.array([0] * 3 + [1] * 3 + [2] * 2)
    auc = real_confusion(probs, gold)
    assert auc[0, 1] == auc[1, 0] == pytest.approx(1.0)
    assert auc[0, 2] == pytest.approx(1.0)
    assert auc[1, 2] == auc[2, 1] == pytest.approx(0.5)  # the model cannot tell 1 from 2
    np.testing.assert_allclose(np.diag(auc), 1)
    # a class without test examples: NaN, not an error
    auc4 = real_confusion(np.full((8, 4), 0.25), gold)
    assert np.isnan(auc4[0, 3]) and auc4[0, 1] == pytest.approx(0.5)


def test_real_confusion_is_symmetric_and_uses_the_pair_ratio():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(4), size=50)
    gold = rng.integers(0, 4, 50)
    auc = real_confusion(probs, gold)
    np.testing.assert_allclose(auc, auc.T)
    keep = (gold == 1) | (gold == 3)
    ratio = probs[keep, 1] / probs[keep, 3]  # the official code's p_i / p_j gives the same AUC
    assert auc[1, 3] == pytest.approx(pairwise_auc(ratio, gold[keep] == 1))


def test_pair_values_and_names_align():
    m = np.arange(16.0).reshape(4, 4)
    np.testing.assert_array_equal(pair_values(m), [1, 2, 3, 6, 7, 11])
    assert pair_names(["a", "b", "c", "d"]) == ["a–b", "a–c", "a–d", "b–c", "b–d", "c–d"]


def _line(points):
    return normalised_distances(np.asarray(points, dtype=float)[:, None])


def test_permutation_test_exact_p_values_with_known_answers():
    pred = _line([0, 1, 3, 7])  # pair distances 1, 3, 7, 2, 6, 4: no relabelling but the identity keeps their order
    real = 0.5 + 0.5 * pred  # an AUC increasing with the distance: perfect agreement
    rho, p, n = permutation_test(pred, real)
    assert rho == pytest.approx(1.0) and n == 24
    assert p == pytest.approx(1 / 24)  # the smallest p-value 4 classes allow
    rho, p, _ = permutation_test(pred, 1.5 - 0.5 * pred)  # perfect disagreement: every relabelling does as well
    assert rho == pytest.approx(-1.0) and p == pytest.approx(1.0)
    # equally spaced points: the reversal 0<->3, 1<->2 keeps every distance, so 2 of 24 relabellings reach rho = 1
    sym = _line([0, 1, 2, 3])
    rho, p, _ = permutation_test(sym, 0.5 + 0.5 * sym)
    assert p == pytest.approx(2 / 24)


def test_permutation_test_brute_force_reference_and_monte_carlo():
    rng = np.random.default_rng(3)
    pred = normalised_distances(rng.normal(size=(5, 3)))
    real = 0.5 + 0.5 * normalised_distances(rng.normal(size=(5, 3)))
    rho, p, n = permutation_test(pred, real)
    ref = [pair_spearman(pred[np.ix_(s, s)], real) for s in map(list, itertools.permutations(range(5)))]
    assert n == math.factorial(5)
    assert p == pytest.approx(np.mean(np.array(ref) >= rho - 1e-12))
    # 9 classes: 9! > max_exact, random relabellings; perfect agreement is rare under the null
    pred9 = _line([0, 1, 3, 7, 12, 20, 33, 54, 88])
    rho, p, n = permutation_test(pred9, 0.5 + 0.5 * pred9, n_random=500)
    assert n == 500 and rho == pytest.approx(1.0) and p == pytest.approx(1 / 501)


def test_most_confused_rank():
    pred = _line([0, 1, 3, 7])  # predicted order of pairs: (0,1)=1, (1,2)=2, (0,2)=3, (2,3)=4, (1,3)=6, (0,3)=7
    real = np.ones((4, 4))
    real[1, 2] = real[2, 1] = 0.55  # the model confuses 1 and 2 most
    real[0, 1] = real[1, 0] = 0.7
    out = most_confused(pred, real)
    assert out["real"] == (1, 2) and out["predicted"] == (0, 1) and out["rank_of_real"] == 2 and out["n_pairs"] == 6


def test_flatten_heads_repeats_key_heads_like_the_attention():
    rng = np.random.default_rng(4)
    q = rng.normal(size=(4, 3))  # 4 query heads, D = 3
    k = rng.normal(size=(2, 3))  # 2 key heads: query heads 0,1 use key head 0; 2,3 use key head 1
    flat_q, flat_k = flatten_heads(q, 4), flatten_heads(k, 4)
    assert flat_q.shape == flat_k.shape == (12,)
    expected = sum(q[h] @ k[h // 2] for h in range(4))
    assert flat_q @ flat_k == pytest.approx(expected, rel=1e-6)
    rep = torch.tensor(k)[None, :, None].repeat_interleave(2, dim=1)[0, :, 0].reshape(-1).numpy()
    np.testing.assert_allclose(flat_k, rep, rtol=1e-6)
    with pytest.raises(ValueError):
        flatten_heads(rng.normal(size=(3, 2)), 4)


# ------------------------------------------------------------------------------------------------------------------
# The record hook sees what the attention computes with
# ------------------------------------------------------------------------------------------------------------------


def _run_record(model, ids, rows, key_positions):
    from helpers.core.attention import enable

    enable(model, "anchors")
    try:
        hook = RecordQK(rows, key_positions)
        with torch.no_grad(), intervene(hook):
            model(input_ids=ids, use_cache=False)
    finally:
        enable(model, "eager")
    return hook


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_qk_reproduce_the_stock_attention_row(family, tiny_models):
    """Softmax of the recorded q·k (scaled; soft-capped where the model caps) equals stock eager attention at q."""
    model = tiny_models(family)
    cfg = model.config
    torch.manual_seed(5)
    ids = torch.randint(3, 100, (2, 7))
    rows = torch.tensor([6, 4])
    all_keys = torch.arange(7).repeat(2, 1)
    hook = _run_record(model, ids, rows, all_keys)
    with torch.no_grad():
        ref = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    n_layers = len(ref)
    assert sorted(hook.queries) == list(range(n_layers))
    cap = getattr(cfg, "attn_logit_softcapping", None) if family == "gemma2" else None
    for layer in range(n_layers):
        q, k = hook.queries[layer], hook.keys[layer]  # (B, H, D), (B, S, H_kv, D)
        h, h_kv = q.shape[1], k.shape[2]
        k = k.repeat_interleave(h // h_kv, dim=2)
        scores = torch.einsum("bhd,bshd->bhs", q, k) * q.shape[-1] ** -0.5  # head_dim 8 = query_pre_attn_scalar
        if cap:
            scores = torch.tanh(scores / cap) * cap
        for b in range(2):
            row = ref[layer][b, :, rows[b], :]
            visible = row > 0  # causal (and sliding-window) mask, read off the stock attention
            s = scores[b].masked_fill(~visible, float("-inf"))
            torch.testing.assert_close(torch.softmax(s, -1), row, atol=1e-5, rtol=1e-4)


def _projection_reference(model, family, ids):
    """Q and K of every layer from forward hooks on the projections, then the model's own norm and rotary."""
    got: dict[tuple, torch.Tensor] = {}
    handles = []
    layers = model.transformer.h if family == "gpt2" else model.model.layers
    for i, layer in enumerate(layers):
        attn = layer.attn if family == "gpt2" else layer.self_attn
        if family == "gpt2":
            handles.append(attn.c_attn.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(("qkv", i), o)))
        elif family == "gemma3":  # q/k norm act on (B, H, T, D) after the projection
            handles.append(attn.q_norm.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(("q", i), o)))
            handles.append(attn.k_norm.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(("k", i), o)))
        else:
            handles.append(attn.q_proj.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(("q", i), o)))
            handles.append(attn.k_proj.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(("k", i), o)))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for hd in handles:
            hd.remove()
    cfg = model.config
    out = []
    b, t = ids.shape
    positions = torch.arange(t)[None].expand(b, t)
    for i in range(len(layers)):
        if family == "gpt2":
            d = cfg.n_embd // cfg.n_head
            q, k, _ = got[("qkv", i)].split(cfg.n_embd, dim=2)
            q = q.view(b, t, -1, d).transpose(1, 2)
            k = k.view(b, t, -1, d).transpose(1, 2)
        else:
            d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            q, k = got[("q", i)], got[("k", i)]
            if family != "gemma3":
                q = q.view(b, t, -1, d).transpose(1, 2)
                k = k.view(b, t, -1, d).transpose(1, 2)
            if family == "gemma3":
                from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

                cos, sin = model.model.rotary_emb(q, positions, cfg.layer_types[i])
            else:
                from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

                cos, sin = model.model.rotary_emb(q, positions)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out.append((q, k))
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gemma3"])
def test_recorded_qk_equal_the_projections_after_rotary(family, tiny_models):
    """Reference: forward hooks on the q/k projections (Gemma: on its q/k norms), then the model's rotary."""
    model = tiny_models(family)
    torch.manual_seed(6)
    ids = torch.randint(3, 100, (2, 9))
    rows = torch.tensor([8, 5])
    key_positions = torch.tensor([[1, 3, 4], [0, 2, 5]])
    hook = _run_record(model, ids, rows, key_positions)
    ref = _projection_reference(model, family, ids)
    for layer, (q, k) in enumerate(ref):
        h_kv = k.shape[1]
        assert hook.keys[layer].shape == (2, 3, h_kv, q.shape[-1])  # un-repeated key heads
        for b in range(2):
            torch.testing.assert_close(hook.queries[layer][b], q[b, :, rows[b]], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(hook.keys[layer][b], k[b, :, key_positions[b]].transpose(0, 1), atol=1e-6,
                                       rtol=1e-5)
    if family in ("qwen2", "gemma3"):
        assert ref[0][1].shape[1] < ref[0][0].shape[1]  # the GQA case is really exercised


def test_record_qk_rejects_bad_shapes():
    with pytest.raises(ValueError):
        RecordQK(torch.tensor([1, 2]), torch.tensor([1, 2]))
    with pytest.raises(ValueError):
        RecordQK(torch.tensor([1, 2]), torch.tensor([[1, 2]]))


def test_record_qk_changes_nothing(tiny_models):
    model = tiny_models("qwen2")
    ids = torch.randint(3, 100, (1, 6))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    from helpers.core.attention import enable

    enable(model, "anchors")
    try:
        with torch.no_grad(), intervene(RecordQK(torch.tensor([5]), torch.tensor([[0, 1]]))):
            hooked = model(input_ids=ids).logits
    finally:
        enable(model, "eager")
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Recording on real prompts (tiny GQA model with a real tokenizer)
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gqa_lm(offline_tokenizers):
    """A tiny random Qwen2 (4 heads, 2 kv heads) with SmolLM2's real tokenizer, wrapped as load_model would."""
    from conftest import tiny_loaded_model

    return tiny_loaded_model("qwen2", offline_tokenizers["smollm2-135m"], "tiny-qwen2")


@pytest.fixture(scope="module")
def agnews_prompts(tiny_gqa_lm, data_dir):
    from helpers.core.runs import make_prompts
    from helpers.core.tasks import load_task

    data = load_task("agnews", data_dir)
    return data.task, make_prompts(tiny_gqa_lm, data, seed=42, n_test=12, shots_per_class=1)


def test_record_qk_shapes_and_keys_on_real_prompts(tiny_gqa_lm, agnews_prompts):
    from helpers.experiments.diagnosis import record_qk
    from helpers.core.prompts import collate

    lm, (task, prompts) = tiny_gqa_lm, agnews_prompts
    out = record_qk(lm, task, prompts, batch_size=5, progress=False)
    n, L, C, H, H_kv, D = len(prompts), lm.n_layers, 4, 4, 2, 8
    assert (lm.n_heads, lm.n_kv_heads) == (H, H_kv)
    assert out["queries"].shape == (n, L, H * D)
    assert out["keys"].shape == (L, C, H_kv, D)
    assert out["probs"].shape == (n, C) and out["key_spread"].shape == (L,)
    assert out["key_spread"].max() < 1e-5  # same demonstrations, causal attention: same label keys in every prompt
    # prompt 3 alone, recorded directly: its query at q and its label keys, in class order
    p = prompts[3]
    batch = collate([p], lm.tokenizer.pad_token_id)
    hook = RecordQK(batch.target, batch.label_positions())
    with torch.no_grad(), intervene(hook):
        lm.model(input_ids=batch.input_ids, use_cache=False)
    for layer in range(L):
        np.testing.assert_allclose(out["queries"][3, layer], hook.queries[layer][0].reshape(-1), atol=1e-5)
        np.testing.assert_allclose(out["keys"][layer], hook.keys[layer][0], atol=1e-5)
    assert [p.positions_of_class(c)[0] for c in range(C)] == batch.label_positions()[0].tolist()
    np.testing.assert_array_equal(out["gold"], [p.label for p in prompts])


def test_diagnose_outputs(tiny_gqa_lm, agnews_prompts):
    from helpers.experiments.diagnosis import diagnose, record_qk

    lm, (task, prompts) = tiny_gqa_lm, agnews_prompts
    out = diagnose(lm, task, prompts, batch_size=6, progress=False)
    n, L, C = len(prompts), lm.n_layers, 4
    m = n - 1  # fewer queries than M_MAX: as many directions as the data allow
    assert out["khat"].shape == (L, C, m) and out["sigma"].shape == (L, m)
    assert out["query_pc"].shape == (n, L, 3)
    assert out["class_query_dist"].shape == (L, C, C) and out["embedding_dist"].shape == (C, C)
    assert out["keys"].shape == (L, C, 2 * 8)
    # khat of one layer recomputed from the recorded vectors
    rec = record_qk(lm, task, prompts, batch_size=6, progress=False)
    layer = 1
    ref = anchor_projection(rec["queries"][:, layer], flatten_heads(rec["keys"][layer], lm.n_heads), m)
    np.testing.assert_allclose(predicted_confusion(out["khat"][layer]), predicted_confusion(ref["khat"]), atol=1e-4)
    from helpers.core.prompts import label_token_ids

    emb = lm.model.get_input_embeddings().weight[list(label_token_ids(task, lm.tokenizer))]
    assert out["embedding_dist"][0, 1] == pytest.approx(float((emb[0] - emb[1]).norm()), rel=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# Reading stored results
# ------------------------------------------------------------------------------------------------------------------


def _fake_result(rng, n=80, c=4, layers=3, m=6, d=10):
    gold = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 2.0 * np.eye(c)[gold] * rng.random((n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    sym = np.abs(rng.normal(size=(layers, c, c))) + 0.1
    emb = rng.random((c, c)) + 0.1
    return {
        "probs": probs, "gold": gold, "khat": rng.normal(size=(layers, c, m)), "keys": rng.normal(size=(layers, c, d)),
        "class_query_dist": sym + sym.transpose(0, 2, 1), "embedding_dist": emb + emb.T,
    }


def test_spearman_estimate_value_is_the_mean_over_seeds_of_pair_spearman():
    from helpers.experiments.diagnosis import predictors, spearman_estimate

    rng = np.random.default_rng(7)
    runs = [_fake_result(rng) for _ in range(3)]
    mats = [predictors(r, 1, 4)["anchor keys, query PCA"] for r in runs]
    est = spearman_estimate(runs, mats, n_boot=50)
    expected = np.mean([pair_spearman(m, real_confusion(r["probs"], r["gold"])) for m, r in zip(mats, runs)])
    assert est.value == pytest.approx(expected)
    assert est.low <= est.value <= est.high and est.n == "80 × 3"
    # a stack of matrices gives a curve whose entries are the per-matrix values
    stacks = [np.stack([predictors(r, k, 4)["anchor keys, query PCA"] for k in range(3)]) for r in runs]
    curve = spearman_estimate(runs, stacks, n_boot=20)
    assert curve.value.shape == (3,)
    assert curve.value[1] == pytest.approx(expected)


def test_predictors_are_normalised_distances():
    from helpers.experiments.diagnosis import BASELINES, predictors

    r = _fake_result(np.random.default_rng(8))
    out = predictors(r, 2, 5)
    assert set(out) == set(BASELINES)
    for mat in out.values():
        assert mat.shape == (4, 4) and pair_values(mat).max() == pytest.approx(1.0)
        np.testing.assert_allclose(np.diag(mat), 1)
    np.testing.assert_allclose(out["anchor keys, query PCA"], normalised_distances(r["khat"][2, :, :5]))
    with pytest.raises(ValueError):
        predictors(r, 0, 7)


def test_diagnose_takes_keys_from_separate_prompts(tiny_gqa_lm, agnews_prompts, data_dir):
    """The official construction: keys from one fixed prompt, queries from prompts whose demonstrations differ."""
    from helpers.core.runs import make_prompts
    from helpers.core.tasks import load_task
    from helpers.experiments.diagnosis import diagnose

    lm, (task, prompts) = tiny_gqa_lm, agnews_prompts
    default = diagnose(lm, task, prompts, batch_size=6, progress=False)
    same = diagnose(lm, task, prompts, batch_size=6, progress=False, key_prompts=prompts[:1])
    np.testing.assert_allclose(same["keys"], default["keys"], atol=1e-5)  # one demonstration set: the same keys
    np.testing.assert_allclose(same["query_pc"], default["query_pc"], atol=1e-5)
    other = make_prompts(lm, load_task("agnews", data_dir), seed=7, n_test=2, shots_per_class=1)
    assert other[0].input_ids[: other[0].label_positions[-1]] != prompts[0].input_ids[: prompts[0].label_positions[-1]]
    moved = diagnose(lm, task, prompts, batch_size=6, progress=False, key_prompts=other[:1])
    assert np.abs(moved["keys"] - default["keys"]).max() > 1e-3  # other demonstrations: other keys
    np.testing.assert_array_equal(moved["pred"], default["pred"])  # the queries' run is unchanged
    np.testing.assert_allclose(moved["probs"], default["probs"], atol=1e-6)
    assert not np.allclose(moved["khat"], default["khat"], atol=1e-4)  # the keys enter the projection


def test_pooled_permutation_test_tests_the_seeds_together():
    from helpers.experiments.diagnosis import permutation_test, pooled_permutation_test

    rng = np.random.default_rng(3)

    def sym(c):
        a = rng.random((c, c))
        a = a + a.T
        np.fill_diagonal(a, 1.0)
        return a

    real = [sym(6) for _ in range(3)]
    noise = [sym(6) for _ in range(3)]
    one = permutation_test(noise[0], real[0])
    assert pooled_permutation_test([noise[0]], [real[0]]) == pytest.approx(one)  # one seed: the plain test
    rho, p, n = pooled_permutation_test(real, real)  # every seed a perfect match: only the identity reaches it
    assert rho == pytest.approx(1.0) and n == math.factorial(6) and p == pytest.approx(1 / n)
    # brute force: the share of relabellings, applied to every seed at once, whose mean ρ reaches the observed one
    from helpers.experiments.diagnosis import pair_spearman

    def mean_rho(perm):
        return np.mean([pair_spearman(a[np.ix_(perm, perm)], b) for a, b in zip(noise, real)])

    observed = mean_rho(np.arange(6))
    ref = np.mean([mean_rho(np.asarray(q)) >= observed - 1e-12 for q in itertools.permutations(range(6))])
    assert pooled_permutation_test(noise, real)[1] == pytest.approx(ref)
