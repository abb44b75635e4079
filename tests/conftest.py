"""Shared fixtures: data folder, tiny random models of every family, the offline tokenizers.

Everything here runs offline. Tiny models are built from configs (no download) with a fixed seed; the offline
tokenizers come from the converted copies in ``$ANCHORS_CACHE`` / ``~/.cache/anchors/models``.

A test whose model package or data folder is missing is skipped on a developer's machine, but FAILS when ``CI`` is set
or ``ANCHORS_STRICT=1`` (``.ci/run`` sets it): CI must not go green while checking less (:func:`unavailable`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# One thread: the suite is sized for 2 CPU cores, and exact-equality checks stay deterministic.
torch.set_num_threads(int(os.environ.get("ANCHORS_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # test the working tree's helpers, also when run as plain `pytest`
    sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data"
STRICT = bool(os.environ.get("CI")) or os.environ.get("ANCHORS_STRICT") == "1"


def unavailable(reason: str):
    """Skip a test whose model package or data is missing, or fail it in strict mode (CI, ANCHORS_STRICT=1)."""
    if STRICT:
        pytest.fail(f"{reason} (strict mode: CI or ANCHORS_STRICT=1 turns this skip into a failure)", pytrace=False)
    pytest.skip(reason)

# Parity numbers (max |logit difference| anchors vs stock eager, per family), printed in the terminal summary.
PARITY_KEY = pytest.StashKey[dict]()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads a real model (deselect with -m 'not slow')")
    config.stash[PARITY_KEY] = {}


def pytest_collection_modifyitems(config, items):
    """Slow tests (real models) run only when asked for with a marker expression, e.g. ``-m slow``."""
    if config.option.markexpr:
        return
    skip = pytest.mark.skip(reason="slow: loads a real model; run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(f"strict mode (missing models/data fail): {'on' if STRICT else 'off'}")
    parity = config.stash.get(PARITY_KEY, {})
    if parity:
        terminalreporter.section("anchors vs eager parity (max |Δ logit| on non-padded positions)")
        for family, diff in sorted(parity.items()):
            terminalreporter.write_line(f"{family:>16}: {diff:.3e}")


@pytest.fixture(scope="session")
def parity_record(pytestconfig) -> dict:
    return pytestconfig.stash[PARITY_KEY]


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data_dir() -> Path:
    folder = Path(os.environ.get("ANCHORS_DATA") or DEFAULT_DATA).expanduser().resolve()
    missing = [t for t in ("sst2", "trec", "agnews", "emoc") if not (folder / t / "test.jsonl").is_file()]
    if missing:
        unavailable(f"no task data for {missing} in {folder} (set ANCHORS_DATA)")
    return folder


# --------------------------------------------------------------------------------------------------------------------
# Tiny random models, one per family (and per attention variant)
# --------------------------------------------------------------------------------------------------------------------

VOCAB = 100
# Larger than the default 0.02, so that attention is far from uniform and every intervention has a visible effect.
INIT = 0.3


def _tiny_config(family: str, vocab_size: int = VOCAB):
    import transformers as tf

    # Special-token ids inside the tiny vocabulary (the GPT defaults, 50256, would trigger a config warning).
    common = dict(vocab_size=vocab_size, initializer_range=INIT, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, **common)
    if family == "gptj":
        return tf.GPTJConfig(n_embd=32, n_layer=3, n_head=4, n_positions=64, rotary_dim=4, **common)
    if family == "llama":  # multi-head attention (as many kv heads as heads)
        return tf.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=64, **common,
        )
    if family == "qwen2":  # grouped-query attention
        return tf.Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, **common,
        )
    if family in ("gemma3", "gemma3_softcap"):  # GQA, sliding window 4 in layers 0 and 2
        return tf.Gemma3TextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=64,
            attn_logit_softcapping=50.0 if family == "gemma3_softcap" else None, **common,
        )
    if family == "gemma2":  # the family whose attention really passes `softcap`; a small cap so that it bites
        return tf.Gemma2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=64,
            attn_logit_softcapping=1.0, final_logit_softcapping=30.0, **common,
        )
    raise KeyError(family)


TINY_FAMILIES = ("gpt2", "gptj", "llama", "qwen2", "gemma3", "gemma3_softcap", "gemma2")


def build_tiny_model(family: str, seed: int = 0, vocab_size: int = VOCAB):
    """A tiny float32 model of ``family`` with stock eager attention, eval mode, frozen parameters."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        _tiny_config(family, vocab_size), attn_implementation="eager", dtype=torch.float32
    )
    model.eval()
    model.requires_grad_(False)
    return model


def tiny_loaded_model(family: str, tokenizer, name: str):
    """A tiny random model of ``family`` sized for a real ``tokenizer``, wrapped as ``load_model`` would return it
    (anchors attention, frozen)."""
    from transformers import AutoModelForCausalLM

    from helpers.core.attention import enable
    from helpers.core.models import LoadedModel, model_facts

    cfg = _tiny_config(family, vocab_size=len(tokenizer))
    cfg.max_position_embeddings = 1024
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    model.requires_grad_(False)
    model = enable(model, "anchors")
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, **model_facts(model, tokenizer))


@pytest.fixture(scope="session")
def tiny_models():
    """``tiny_models(family)``: one cached tiny model per family (stock eager attention when first built)."""
    cache: dict[tuple, torch.nn.Module] = {}

    def get(family: str, vocab_size: int = VOCAB):
        key = (family, vocab_size)
        if key not in cache:
            cache[key] = build_tiny_model(family, vocab_size=vocab_size)
        return cache[key]

    return get


# --------------------------------------------------------------------------------------------------------------------
# Offline tokenizers
# --------------------------------------------------------------------------------------------------------------------

OFFLINE_NAMES = ("gemma-3-270m", "qwen2.5-coder-0.5b", "smollm2-135m")


@pytest.fixture(scope="session")
def offline_tokenizers() -> dict:
    """The three offline models' tokenizers only (no weights), set up as ``load_model`` does."""
    from transformers import AutoTokenizer

    from helpers.core import models

    out = {}
    for name in OFFLINE_NAMES:
        try:
            folder = models._offline_folder(models.OFFLINE_MODELS[name], progress=False)
        except ModuleNotFoundError as err:
            unavailable(f"offline model {name} not available: {err}")
        tok = AutoTokenizer.from_pretrained(folder)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
        out[name] = tok
    return out


# --------------------------------------------------------------------------------------------------------------------
# Real offline models, loaded once per session (slow tests)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def offline_model():
    """``offline_model(name)``: the real offline model, loaded once for the whole session (or skipped / failed)."""
    from helpers import load_model

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            try:
                cache[name] = load_model(name)
            except ModuleNotFoundError as err:
                unavailable(f"{name} not available offline: {err}")
        return cache[name]

    return get
