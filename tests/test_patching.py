"""Activation patching (helpers.core.patching) on tiny models of every family: a run's own state changes nothing,
another run's state changes the output, a head's output is the attention function's, and an operation that never
acted raises."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_FAMILIES, build_tiny_model
from helpers.core import attention
from helpers.core.patching import Read, Write, attention_output_module, decoder_layers, head_size, patch

B, T = 3, 10


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0  # right padding in one example
    ids[1, 7:] = 0
    return ids, mask


IDS, MASK = _inputs(0)
OTHER, _ = _inputs(1)
LAST = [[9], [6], [9]]  # each example's last real token (known from how the batch was built)


@pytest.fixture(params=TINY_FAMILIES)
def model(request, tiny_models):
    m = tiny_models(request.param)
    attention.enable(m, "anchors")
    yield m
    attention.enable(m, "anchors")


def logits(model, ids=IDS, mask=MASK):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def test_layers_and_output_projection_found(model):
    layers = decoder_layers(model)
    assert len(layers) == model.config.get_text_config().num_hidden_layers
    proj = attention_output_module(model, 0)
    heads = model.config.get_text_config().num_attention_heads
    assert proj.weight.shape[0 if type(proj).__name__ == "Conv1D" else 1] == heads * head_size(model)


@pytest.mark.parametrize("head", [None, 1])
def test_own_state_changes_nothing(model, head):
    base = logits(model)
    positions = [[2, 5], [1, 6], [0, 9]]
    reads = [Read(layer, positions, head) for layer in range(3)]
    with patch(model, *reads):
        assert torch.equal(logits(model), base)  # reading changes nothing, bit for bit
    writes = [Write(r.layer, positions, r.value, head) for r in reads]
    with patch(model, *writes):
        patched = logits(model)
    assert (patched - base).abs().max().item() < 1e-6


def test_read_is_the_hidden_state(model):
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=MASK, use_cache=False, output_hidden_states=True)
    read = Read(0, LAST)
    with patch(model, read):
        logits(model)
    expected = out.hidden_states[1][torch.arange(B)[:, None], torch.tensor(LAST)]
    assert torch.allclose(read.value, expected, atol=1e-6)


def test_head_output_is_the_attention_functions(model):
    """The head read is that head's slice (head-major) of what the output projection receives, captured by a plain
    torch hook: the attention function's own output, heads side by side."""
    layer, head = 1, 2
    read = Read(layer, LAST, head=head)
    captured = {}
    proj = attention_output_module(model, layer)
    handle = proj.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].detach().clone()))
    try:
        with patch(model, read):
            logits(model)
    finally:
        handle.remove()
    size = head_size(model)
    x = captured["x"].reshape(B, T, -1, size)[:, :, head]
    assert torch.equal(read.value, x[torch.arange(B)[:, None], torch.tensor(LAST)].float())


@pytest.mark.parametrize("head", [None, 0])
def test_other_runs_state_changes_the_output(model, head):
    base = logits(model)
    read = Read(1, LAST, head)
    with patch(model, read):
        logits(model, OTHER, MASK)
    with patch(model, Write(1, LAST, read.value, head)):
        patched = logits(model)
    rows = torch.arange(B)[:, None], torch.tensor(LAST)
    assert (patched[rows] - base[rows]).abs().max().item() > 1e-3
    # causal: rows before the patched position are untouched
    assert (patched[:, :5] - base[:, :5]).abs().max().item() < 1e-6


def test_add_zero_changes_nothing_and_add_changes(model):
    base = logits(model)
    d = model.config.get_text_config().hidden_size
    with patch(model, Write(0, LAST, torch.zeros(B, 1, d), add=True)):
        assert (logits(model) - base).abs().max().item() < 1e-6
    push = 3 * torch.randn(B, 1, d, generator=torch.Generator().manual_seed(0))  # not constant: a norm removes that
    with patch(model, Write(0, LAST, push, add=True)):
        assert (logits(model) - base).abs().max().item() > 1e-3


def test_never_fired_raises(tiny_models):
    m = tiny_models("llama")
    attention.enable(m, "anchors")
    with pytest.raises(RuntimeError, match="never acted"):
        with patch(m, Read(7, LAST)):  # the tiny model has 3 layers
            logits(m)
    with pytest.raises(RuntimeError, match="never acted"):
        with patch(m, Read(0, LAST)):
            pass  # no forward pass


def test_head_site_needs_the_anchors_attention():
    m = build_tiny_model("qwen2")  # stock eager attention: the head's output would not be the anchors function's
    with pytest.raises(RuntimeError, match="never ran"):
        with patch(m, Read(0, LAST, head=0)):
            logits(m)


def test_bad_input_is_refused(tiny_models):
    m = tiny_models("gpt2")
    attention.enable(m, "anchors")
    with pytest.raises(ValueError, match="beyond"):
        with patch(m, Read(0, [[12], [1], [1]])):
            logits(m)
    with pytest.raises(ValueError, match="same, non-zero number"):
        Read(0, [[1, 2], [1], [1]])
    with pytest.raises(ValueError, match=">= 0"):
        Read(0, [[-1], [1], [1]])
    with pytest.raises(ValueError, match="values must be"):
        Write(0, LAST, torch.zeros(B, 2, 32))
    with pytest.raises(ValueError, match="examples"):
        with patch(m, Read(0, [[1], [1]])):
            logits(m)
    with pytest.raises(RuntimeError, match="twice"):
        with patch(m, Read(0, LAST)):
            logits(m)
            logits(m)
