"""The "anchors" attention on tiny random models of every family: parity with eager attention, every hook, saliency.

The models are built from configs (no download): GPT-2, GPT-J (patched ``_attn``), Llama (multi-head), Qwen2 (GQA),
Gemma 3 (GQA, sliding window 4 in layers 0 and 2, with and without ``attn_logit_softcapping``) and Gemma 2 (whose
attention really passes ``softcap``; a cap of 1.0 so that it changes the result). One batch of two sequences of 12
tokens, the second padded on the right from position 9.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_FAMILIES, build_tiny_model

from helpers.core import attention
from helpers.core.attention import Hook, Isolate, Record, Reweight, Saliency, intervene
from helpers.core.prompts import Prompt, collate, target_logits
from helpers.core.saliency import flow_measures, normalise_per_layer, saliency_flow, saliency_matrices

B, T, PAD_FROM = 2, 12, 9
LENGTHS = (T, PAD_FROM)  # non-padded length of each row
TARGETS = torch.tensor([T - 1, PAD_FROM - 1])  # last real token of each row
TOL = 1e-5


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, PAD_FROM:] = 0
    ids[1, PAD_FROM:] = 0  # the pad id
    return ids, mask


IDS, MASK = _inputs()
VALID = MASK.bool()  # (B, T): non-padded positions


def n_layers(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def n_heads(model) -> int:
    return model.config.get_text_config().num_attention_heads


def logits_of(model, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK, use_cache=False, **kw).logits


def record(model, *extra: Hook, **kw) -> tuple[torch.Tensor, Record]:
    """Logits and a Record hook placed after ``extra`` hooks."""
    rec = Record()
    with intervene(*extra, rec, **kw):
        out = logits_of(model)
    return out, rec


def max_diff_valid(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b)[VALID].abs().max().item()


@pytest.fixture(params=TINY_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family, tiny_models):
    """The family's cached tiny model with the anchors attention on (and on again after the test)."""
    m = tiny_models(family)
    attention.enable(m, "anchors")
    yield m
    attention.enable(m, "anchors")


_STOCK: dict[str, tuple[torch.Tensor, tuple]] = {}


def stock_outputs(family: str):
    """Logits and output_attentions of an untouched model (same seed = same weights as the cached one)."""
    if family not in _STOCK:
        m = build_tiny_model(family)
        with torch.no_grad():
            res = m(input_ids=IDS, attention_mask=MASK, use_cache=False, output_attentions=True)
        _STOCK[family] = (res.logits, res.attentions)
    return _STOCK[family]


# --------------------------------------------------------------------------------------------------------------------
# Parity and switching
# --------------------------------------------------------------------------------------------------------------------


def _gptj_modules(model):
    from transformers.models.gptj.modeling_gptj import GPTJAttention

    mods = [m for m in model.modules() if isinstance(m, GPTJAttention)]
    assert len(mods) == n_layers(model)
    return mods


def test_parity_with_eager_and_restore(family, parity_record):
    model = build_tiny_model(family)  # fresh: stock eager attention
    assert model.config._attn_implementation == "eager"
    ref = logits_of(model)

    assert attention.enable(model, "anchors") is model
    if family == "gptj":
        for mod in _gptj_modules(model):
            assert "_attn" in vars(mod), "GPT-J's _attn was not patched on the instance"
            assert mod._attn.__func__ is attention._gptj_attn
    else:
        assert model.config._attn_implementation == "anchors"

    # The anchors function must really run (an enable() that did nothing would give a perfect "parity").
    rec = Record()
    with intervene(rec):
        out = logits_of(model)
    assert rec.seen == set(range(n_layers(model)))

    diff = max_diff_valid(out, ref)
    parity_record[family] = diff
    print(f"\nparity {family}: max |anchors - eager| logit = {diff:.3e}")
    assert diff <= TOL

    attention.enable(model, "eager")
    if family == "gptj":
        assert all("_attn" not in vars(mod) for mod in _gptj_modules(model))
    else:
        assert model.config._attn_implementation == "eager"
    assert torch.equal(logits_of(model), ref)
    with pytest.raises(RuntimeError, match="never ran"):
        with intervene(Record()):
            logits_of(model)


def test_enable_rejects_other_implementations(tiny_models):
    with pytest.raises(ValueError, match="anchors"):
        attention.enable(tiny_models("llama"), "sdpa")


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_sliding_window_is_honoured(family, tiny_models):
    model = tiny_models(family)
    attention.enable(model, "anchors")
    cfg = model.config
    window = cfg.sliding_window
    assert window < T
    out, rec = record(model)
    i, j = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    outside = (i - j) >= window  # causal keys the window hides
    for layer, kind in enumerate(cfg.layer_types):
        a = rec.attentions[layer][0]  # row 0: no padding
        if kind == "sliding_attention":
            assert torch.all(a[:, outside] == 0)
        else:
            assert a[:, outside].min() > 0
    # ... and it changes the result: same weights, no window.
    try:
        cfg.sliding_window = 64
        wide = logits_of(model)
    finally:
        cfg.sliding_window = window
    assert (wide - out)[0, window:].abs().max() > 1e-3


def test_softcap_is_honoured(tiny_models):
    """Gemma 2 passes softcap=1.0: anchors matches eager (parity test) and the cap changes the logits."""
    model = tiny_models("gemma2")
    attention.enable(model, "anchors")
    capped = logits_of(model)
    mods = [m for m in model.modules() if hasattr(m, "attn_logit_softcapping")]
    assert mods and all(m.attn_logit_softcapping == 1.0 for m in mods)
    try:
        for m in mods:
            m.attn_logit_softcapping = None
        uncapped = logits_of(model)
    finally:
        for m in mods:
            m.attn_logit_softcapping = 1.0
    assert max_diff_valid(capped, uncapped) > 1e-2


@pytest.mark.parametrize("softcap", [None, 0.7])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_function_matches_reference_eager(softcap, kv_heads):
    """anchors_attention alone against transformers' Gemma 2 eager function (GQA, scaling, softcap, mask)."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 7, 8, generator=g) * 3
    k = torch.randn(2, kv_heads, 7, 8, generator=g) * 3
    v = torch.randn(2, kv_heads, 7, 8, generator=g)
    mask = torch.zeros(2, 1, 7, 7)
    mask = mask.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    mask[1, :, :, 5:] = torch.finfo(torch.float32).min
    module = torch.nn.Module()
    module.training = False
    module.layer_idx = 0
    module.num_key_value_groups = 4 // kv_heads
    module.head_dim = 8
    ref_out, ref_probs = eager_attention_forward(module, q, k, v, mask, scaling=0.3, softcap=softcap)
    out, probs = attention.anchors_attention(module, q, k, v, mask, scaling=0.3, softcap=softcap)
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)


def test_target_logits_match_full_forward(model):
    prompts = [_prompt(IDS[0].tolist(), (2, 6), 0), _prompt(IDS[1, :PAD_FROM].tolist(), (1, 4), 1)]
    batch = collate(prompts, pad_id=0)
    assert torch.equal(batch.input_ids, IDS) and torch.equal(batch.attention_mask, MASK)
    with torch.no_grad():
        got = target_logits(model, batch)
    full = logits_of(model)
    want = full[torch.arange(B), TARGETS]
    assert got.shape == (B, full.shape[-1])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Record
# --------------------------------------------------------------------------------------------------------------------


def test_record_matches_output_attentions(model, family):
    _, rec = record(model)
    L, H = n_layers(model), n_heads(model)
    assert sorted(rec.attentions) == list(range(L))
    assert rec.stacked().shape == (L, B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(L):
        a = rec.attentions[layer]
        assert a.shape == (B, H, T, T) and not a.requires_grad
        torch.testing.assert_close(a.sum(-1), torch.ones(B, H, T), rtol=0, atol=1e-5)
        for b, n in enumerate(LENGTHS):
            allowed = causal.clone()
            allowed[:, n:] = False  # padded keys
            assert torch.all(a[b][:, :n][:, allowed[:n]] >= 0)
            assert torch.all(a[b][:, :n][:, ~allowed[:n]] == 0), "attention on a future or padded key"
    _, stock_attn = stock_outputs(family)
    assert stock_attn is not None and len(stock_attn) == L
    for layer in range(L):
        diff = (rec.attentions[layer] - stock_attn[layer]).abs()
        assert diff[VALID[:, None, :, None].expand_as(diff)].max() <= 1e-6


def test_record_rows_and_layers(model):
    _, full = record(model)
    rows = torch.tensor([[T - 1, 3], [PAD_FROM - 1, 0]])
    part = Record(rows=rows)
    single = Record(rows=TARGETS)
    only = Record(layers=[1])
    with intervene(part, single, only):
        logits_of(model)
    for layer in range(n_layers(model)):
        got = part.attentions[layer]
        assert got.shape == (B, n_heads(model), 2, T)
        for b in range(B):
            assert torch.equal(got[b], full.attentions[layer][b][:, rows[b]])
            assert torch.equal(single.attentions[layer][b, :, 0], full.attentions[layer][b, :, TARGETS[b]])
    assert list(only.attentions) == [1]
    assert torch.equal(only.attentions[1], full.attentions[1])


def test_hooks_only_act_inside_intervene(model):
    rec = Record()
    with intervene(rec):
        logits_of(model)
    rec.attentions.clear()
    logits_of(model)  # outside the block: plain attention, the hook is not called
    assert rec.attentions == {}
    # Nested blocks: the outer hooks still act and see what the inner ones do.
    outer = Record()
    with intervene(outer):
        with intervene(Isolate([[5], [5]], layers=[0])):
            logits_of(model)
        assert outer.attentions[0][:, :, 5, 5].min() > 0.999
        logits_of(model)  # the inner hook is gone, the outer one still records
    _, plain = record(model)
    assert torch.equal(outer.attentions[0], plain.attentions[0])


# --------------------------------------------------------------------------------------------------------------------
# Strictness: an intervention that never ran is an error
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_hook",
    [
        lambda L, H: Record(),
        lambda L, H: Isolate([[5], [5]], layers=[0]),
        lambda L, H: Reweight(torch.zeros(L, H, 2), TARGETS, torch.tensor([[2, 6], [1, 4]])),
        lambda L, H: Saliency(),
    ],
    ids=["record", "isolate", "reweight", "saliency"],
)
def test_strict_intervene_raises_on_stock_eager(family, make_hook):
    model = build_tiny_model(family)  # stock eager attention: hooks are never called
    hook = make_hook(n_layers(model), n_heads(model))
    ref = logits_of(model)
    with pytest.raises(RuntimeError, match="never ran"):
        with intervene(hook):
            out = logits_of(model)
    assert torch.equal(out, ref)  # the silent no-op the strict mode catches
    with intervene(hook, strict=False):  # opting out: no error, nothing happened
        logits_of(model)
    assert hook.seen == set()


def test_strict_intervene_raises_on_missing_layers(model):
    with pytest.raises(RuntimeError, match=r"did not reach layers \[99\]"):
        with intervene(Record(layers=[0, 99])):
            logits_of(model)


# --------------------------------------------------------------------------------------------------------------------
# Isolate
# --------------------------------------------------------------------------------------------------------------------

P = 5


def test_isolate_first_layer(model):
    plain_logits, plain = record(model)
    iso = Isolate([[P], [P]], layers=[0])
    logits, rec = record(model, iso)
    assert iso.seen == {0}
    a0, p0 = rec.attentions[0], plain.attentions[0]
    assert a0[:, :, P, P].min() > 0.999, "the isolated row does not attend to itself"
    others = torch.arange(T) != P
    assert torch.equal(a0[:, :, others], p0[:, :, others]), "rows other than p changed in the isolated layer"
    assert not torch.equal(a0[:, :, P], p0[:, :, P])
    # Causality: logits before p are untouched, from p on they change.
    assert torch.equal(logits[:, :P], plain_logits[:, :P])
    for b, n in enumerate(LENGTHS):
        change = (logits[b, P:n] - plain_logits[b, P:n]).abs().amax(-1)
        assert change.max() > 1e-4
        assert change[0] > 1e-4  # at p itself


def test_isolate_last_layer_leaves_earlier_layers(model):
    last = n_layers(model) - 1
    plain_logits, plain = record(model)
    logits, rec = record(model, Isolate([[P], [P]], layers=[last]))
    for layer in range(last):
        assert torch.equal(rec.attentions[layer], plain.attentions[layer])
    assert rec.attentions[last][:, :, P, P].min() > 0.999
    assert torch.equal(logits[:, :P], plain_logits[:, :P])
    assert (logits[0, P] - plain_logits[0, P]).abs().max() > 1e-4


def test_isolate_per_layer_positions(model):
    iso = Isolate({0: [[3], [4]], 2: [[6, 7], [2]]})
    assert iso.layers == frozenset({0, 2})
    _, plain = record(model)
    _, rec = record(model, iso)
    assert rec.attentions[0][0, :, 3, 3].min() > 0.999 and rec.attentions[0][1, :, 4, 4].min() > 0.999
    assert rec.attentions[0][0, :, 4, 4].max() < 0.999  # example 1's position is not isolated in example 0
    assert torch.equal(rec.attentions[0][0, :, 4], plain.attentions[0][0, :, 4])
    for b, rows in enumerate([[6, 7], [2]]):
        for p in rows:
            assert rec.attentions[2][b, :, p, p].min() > 0.999


def test_isolate_reused_on_another_batch_size_is_rejected(tiny_models):
    model = attention.enable(tiny_models("llama"), "anchors")
    iso = Isolate([[P]], layers=[0])
    with torch.no_grad(), intervene(iso):
        model(input_ids=IDS[:1], use_cache=False)
    with pytest.raises(ValueError, match="positions for 1 examples"):
        with intervene(iso, strict=False):
            logits_of(model)


def test_isolate_argument_errors(model):
    with pytest.raises(ValueError, match="layers"):
        Isolate([[P], [P]])
    with pytest.raises(ValueError, match="positions for 1 examples"):
        with intervene(Isolate([[P]], layers=[0]), strict=False):
            logits_of(model)


# --------------------------------------------------------------------------------------------------------------------
# Reweight
# --------------------------------------------------------------------------------------------------------------------

LABEL_POS = torch.tensor([[2, 6], [1, 4]])  # (B, C): two "label words" per example


def test_reweight_zero_is_identity(model):
    plain = logits_of(model)
    beta = torch.zeros(n_layers(model), n_heads(model), 2, requires_grad=True)
    hook = Reweight(beta, TARGETS, LABEL_POS)
    with intervene(hook):
        out = logits_of(model)
    assert hook.seen == set(range(n_layers(model)))
    assert torch.equal(out, plain)


def test_reweight_scales_and_has_gradient(model, family):
    L, H = n_layers(model), n_heads(model)
    plain_logits, plain = record(model)
    g = torch.Generator().manual_seed(5)
    beta = (0.7 * torch.randn(L, H, 2, generator=g)).requires_grad_()
    before, after = Record(), Record()
    rw = Reweight(beta, TARGETS, LABEL_POS)
    with intervene(before, rw, after):  # hooks run in the order given
        logits = model(input_ids=IDS, attention_mask=MASK, use_cache=False).logits
    assert torch.equal(before.attentions[0], plain.attentions[0])  # layer 0 sees the unmodified model
    n_changed = 0
    for layer in range(L):
        a, b_ = after.attentions[layer], before.attentions[layer]
        expected = b_.clone()
        for b in range(B):
            for i in range(2):
                q, p = TARGETS[b], LABEL_POS[b, i]
                expected[b, :, q, p] = b_[b, :, q, p] * torch.exp(beta[layer, :, i].detach())
        torch.testing.assert_close(a, expected, rtol=1e-6, atol=0)
        changed = (a != b_).any(dim=1)  # (B, T, T)
        for b in range(B):
            where = changed[b].nonzero().tolist()
            # (q, p_i) where the model attends at all (a sliding window can hide p_i from q: 0 * e^beta = 0)
            scaled = [[int(TARGETS[b]), int(p)] for p in LABEL_POS[b] if b_[b, :, TARGETS[b], p].max() > 0]
            assert sorted(where) == sorted(scaled)
            n_changed += len(where)
    assert n_changed > 0
    # Only the target rows change: every earlier logit is the same, the target's is not.
    for b, n in enumerate(LENGTHS):
        q = int(TARGETS[b])
        assert torch.equal(logits[b, :q].detach(), plain_logits[b, :q])
        assert (logits[b, q] - plain_logits[b, q]).abs().max() > 1e-4
    # Learnable: the gradient reaches beta in every layer.
    loss = logits[torch.arange(B), TARGETS, :5].logsumexp(-1).sum()
    loss.backward()
    assert beta.grad is not None and beta.grad.shape == beta.shape
    n_attended = 0
    for layer in range(L):
        # a sliding window can hide every p_i from q in a layer: then A[q, p_i] = 0 and beta has no effect there
        attended = any(before.attentions[layer][b, :, TARGETS[b], LABEL_POS[b]].max() > 0 for b in range(B))
        assert (beta.grad[layer].abs().sum() > 0) == attended, f"layer {layer}"
        n_attended += attended
    assert n_attended >= (1 if family.startswith("gemma") else L)


def test_reweight_argument_errors(model):
    L, H = n_layers(model), n_heads(model)
    with pytest.raises(ValueError, match="label_positions"):
        Reweight(torch.zeros(L, H, 3), TARGETS, LABEL_POS)
    with pytest.raises(ValueError, match="heads"):
        with intervene(Reweight(torch.zeros(L, H + 1, 2), TARGETS, LABEL_POS)):
            logits_of(model)


# --------------------------------------------------------------------------------------------------------------------
# Saliency
# --------------------------------------------------------------------------------------------------------------------

LABEL_IDS = (7, 13, 42)


def _prompt(ids, label_positions, label) -> Prompt:
    """A Prompt for a tiny model: only the fields the saliency code reads are meaningful."""
    n = len(ids)
    return Prompt(
        text="", input_ids=tuple(int(i) for i in ids), label_positions=tuple(label_positions),
        label_classes=tuple(range(len(label_positions))), label_spans=tuple((p, p + 1) for p in label_positions),
        format_positions=(), text_positions=(), query_positions=(), query_start=0, target=n - 1, label=label,
        special_positions=(),
    )


def _batch():
    return collate([_prompt(IDS[0].tolist(), (2, 6), 2), _prompt(IDS[1, :PAD_FROM].tolist(), (1, 4), 0)], pad_id=0)


class _RetainGrad(Hook):
    """Reference: keep the post-softmax attention with retain_grad, to read dL/dA after backward."""

    def __init__(self):
        super().__init__()
        self.probs = {}

    def post_softmax(self, layer, probs):
        probs.retain_grad()
        self.probs[layer] = probs
        return probs


def _reference_saliency(model, batch) -> torch.Tensor:
    """| sum_h A ⊙ dL/dA | from a separate forward with the embeddings requiring grad (no Saliency hook)."""
    embeds = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_()
    hook = _RetainGrad()
    with torch.enable_grad(), intervene(hook):
        logits = model(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False).logits
        chosen = logits[torch.arange(len(batch.prompts)), batch.target][:, list(LABEL_IDS)]
        loss = F.cross_entropy(chosen, batch.labels, reduction="sum")
    loss.backward()
    return torch.stack([(hook.probs[k] * hook.probs[k].grad).sum(dim=1).abs() for k in sorted(hook.probs)])


def test_saliency_matches_brute_force(model):
    batch = _batch()
    sal = saliency_matrices(model, batch, LABEL_IDS)
    L = n_layers(model)
    assert sal.shape == (L, B, T, T) and sal.dtype == torch.float32 and not sal.requires_grad
    ref = _reference_saliency(model, batch)
    assert ref.abs().max() > 0
    torch.testing.assert_close(sal, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert torch.all(sal >= 0)
    assert torch.all(sal.triu(1) == 0), "saliency on a future key"
    for b, q in enumerate(TARGETS.tolist()):
        assert torch.all(sal[:, b, q + 1 :] == 0), "rows after the target cannot affect the loss"
        assert sal[:, b, q].sum() > 0


def test_saliency_of_a_batch_equals_single_examples(model):
    batch = _batch()
    sal = saliency_matrices(model, batch, LABEL_IDS)
    for b, prompt in enumerate(batch.prompts):
        n = len(prompt)
        alone = saliency_matrices(model, collate([prompt], pad_id=0), LABEL_IDS)
        torch.testing.assert_close(sal[:, b, :n, :n], alone[:, 0], rtol=1e-4, atol=1e-5 * alone.abs().max().item())


class _ScaleEntry(Hook):
    def __init__(self, layer, index, factor):
        super().__init__([layer])
        self.index, self.factor = index, factor

    def post_softmax(self, layer, probs):
        probs = probs.clone()
        probs[self.index] = probs[self.index] * self.factor
        return probs


@pytest.mark.parametrize("family", ["llama", "gptj"])
def test_saliency_hook_matches_finite_differences(family, tiny_models):
    """Per head: the Saliency hook's dL/dP at P=1 is d/dε L(A[i,j]·(1+ε)) at ε=0 (central differences)."""
    model = tiny_models(family)
    attention.enable(model, "anchors")
    batch = collate([_prompt(IDS[0].tolist(), (2, 6), 1)], pad_id=0)

    def loss_with(*hooks):
        logits = target_logits(model, batch)[:, list(LABEL_IDS)]
        return F.cross_entropy(logits.double(), batch.labels, reduction="sum")

    hook = Saliency()
    with torch.enable_grad(), intervene(hook):
        loss = loss_with()
    with pytest.raises(RuntimeError, match="backward"):
        hook.per_layer()
    loss.backward()
    grads = hook.per_layer()  # (L, B, H, T, T)
    eps = 1e-2
    for layer in (0, n_layers(model) - 1):
        g = grads[layer, 0]
        flat = g.abs().flatten().topk(3).indices
        for idx in flat.tolist():
            h, rest = divmod(idx, T * T)
            i, j = divmod(rest, T)
            index = (0, h, i, j)
            with torch.no_grad():
                with intervene(_ScaleEntry(layer, index, 1 + eps)):
                    up = loss_with().item()
                with intervene(_ScaleEntry(layer, index, 1 - eps)):
                    down = loss_with().item()
            fd = (up - down) / (2 * eps)
            assert fd == pytest.approx(g[h, i, j].item(), rel=2e-2, abs=1e-4)


def test_saliency_needs_gold_labels(model):
    batch = collate([_prompt(IDS[0].tolist(), (2, 6), None)], pad_id=0)
    with pytest.raises(ValueError, match="gold label"):
        saliency_matrices(model, batch, LABEL_IDS)


# --------------------------------------------------------------------------------------------------------------------
# Flow measures (Eq. 2-4) by hand
# --------------------------------------------------------------------------------------------------------------------


def test_flow_measures_by_hand():
    # T = 6, label words at p = (1, 3), target q = 5. Lower triangle 1..15 row by row, diagonal 100 (must be ignored).
    s = torch.zeros(6, 6)
    value = 1.0
    for i in range(6):
        for j in range(i):
            s[i, j] = value
            value += 1
        s[i, i] = 100.0
    # rows: 1: [1]; 2: [2, 3]; 3: [4, 5, 6]; 4: [7..10]; 5: [11, 12, 13, 14, 15]
    prompt = _prompt([0] * 6, (1, 3), 0)
    assert prompt.target == 5
    wp = (1 + (4 + 5 + 6)) / (1 + 3)  # I(p_k, j) over k and j, divided by sum p_k
    pq = (12 + 14) / 2  # I(q, p_k): columns 1 and 3 of row 5
    total = sum(range(1, 16))
    ww = (total - 16 - 26) / (5 * 6 / 2 - 4 - 2)
    got = flow_measures(s, prompt)
    assert got.shape == (3,)
    np.testing.assert_allclose(got, [wp, pq, ww], rtol=1e-12)
    assert s[0, 0] == 100.0  # the input is not modified
    # (L, T, T) -> (3, L)
    stacked = torch.stack([s, 2 * s])
    got2 = flow_measures(stacked, prompt)
    assert got2.shape == (3, 2)
    np.testing.assert_allclose(got2[:, 0], [wp, pq, ww], rtol=1e-12)
    np.testing.assert_allclose(got2[:, 1], [2 * wp, 2 * pq, 2 * ww], rtol=1e-12)


def test_normalise_per_layer():
    rng = np.random.default_rng(0)
    flows = rng.random((5, 3, 4))
    norm = normalise_per_layer(flows)
    assert norm.shape == (3, 4)
    np.testing.assert_allclose(norm.sum(axis=0), np.ones(4))
    mean = flows.mean(axis=0)
    np.testing.assert_allclose(norm, mean / mean.sum(axis=0))


def test_saliency_flow_with_a_real_tokenizer(data_dir, offline_tokenizers, tiny_models):
    """End to end on real SST-2 prompts (smollm2 tokenizer, a tiny Llama with its vocabulary): batching is exact."""
    from types import SimpleNamespace

    from helpers.core.prompts import build_prompt, label_token_ids
    from helpers.core.tasks import load_task, sample_demonstrations_per_example, subsample_test

    tok = offline_tokenizers["smollm2-135m"]
    model = tiny_models("llama", vocab_size=len(tok))
    # Real SST-2 prompts are longer than the tiny config's nominal 64 positions, which the forward helpers enforce;
    # its rotary embeddings do not depend on that number, so a larger context changes no value.
    model.config.max_position_embeddings = 1024
    attention.enable(model, "anchors")
    data = load_task("sst2", data_dir)
    test = subsample_test(data, 42)[:3]
    demos = sample_demonstrations_per_example(data, len(test), 1, 42)
    prompts = [build_prompt(data.task, [data.train[j] for j in d], data.test[i], tok) for i, d in zip(test, demos)]
    assert len({len(p) for p in prompts}) > 1, "want prompts of different lengths (padding)"
    lm = SimpleNamespace(model=model, tokenizer=tok)
    flows = saliency_flow(lm, data.task, prompts, batch_size=3, progress=False)
    assert flows.shape == (3, 3, n_layers(model))
    ids = label_token_ids(data.task, tok)
    for n, prompt in enumerate(prompts):
        alone = saliency_matrices(model, collate([prompt], tok.pad_token_id), ids)[:, 0]
        np.testing.assert_allclose(flows[n], flow_measures(alone, prompt), rtol=1e-4)
    # In the last layer only the target's row reaches the loss: no flow into the label words there.
    assert np.all(flows[:, 0, -1] == 0)
    assert np.all(flows[:, 0, :-1] > 0) and np.all(flows[:, 1:] > 0)
