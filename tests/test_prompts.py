"""Prompts on real data with the three offline tokenizers, checked by decoding and by re-tokenising prefixes.

Positions are never searched for in the tests either: each expected position is the token count of the exact text
that precedes it (the paper's template written out by hand here), and each position is decoded back to text.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import OFFLINE_NAMES

from helpers.core.prompts import build_prompt, collate, label_token_ids
from helpers.core.tasks import TASKS, Example, get_task, load_task, sample_fixed_demonstrations, subsample_test

TASK_NAMES = tuple(TASKS)


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


# The paper's templates, as in the official code (icl/utils/data_wrapper.py, format_s_dict), joined by "\n".
FORMATS = {
    "sst2": "Review: {text}\nSentiment:{label}",
    "agnews": "Article: {text}\nAnswer:{label}",
    "trec": "Question: {text}\nAnswer Type:{label}",
    "emoc": "Dialogue: {text}\nEmotion:{label}",
}


def template(task, demos, query_text: str) -> str:
    """The paper's prompt, written out independently of helpers.core.prompts."""
    fmt = FORMATS[task.name]
    blocks = [fmt.format(text=d.text, label=task.label_words[d.label]) for d in demos]
    return "\n".join(blocks + [fmt.format(text=query_text, label="")])


def prefix_before_label(task, demos, k: int) -> str:
    """The exact text before the k-th demonstration's label word."""
    return template(task, demos[:k], demos[k].text)


def n_tokens(tok, text: str) -> int:
    return len(tok(text).input_ids)  # with the tokenizer's own special tokens (Gemma's BOS)


def letters(s: str) -> str:
    return re.sub(r"[^A-Za-z:]", "", s)


def squash(s: str) -> str:
    return re.sub(r"\s", "", s)


def assert_text_piece(decoded: str, text: str) -> None:
    """``decoded`` is ``text`` up to punctuation or spaces at its ends that merged into a neighbouring format token."""
    got, full = squash(decoded), squash(text)
    at = full.find(got)
    assert got and at >= 0, f"{decoded!r} is not a piece of {text!r}"
    missing = full[:at] + full[at + len(got) :]
    assert not re.search(r"[A-Za-z0-9]", missing), f"text tokens lost {missing!r}"


_CASES: dict = {}


def real_case(name, tokname, data_dir, offline_tokenizers):
    """(task, demos, query, tokenizer, prompt): scheme-A demonstrations (1 per class, seed 42), a real test example."""
    key = (name, tokname)
    if key not in _CASES:
        data = load_task(name, data_dir)
        demo_ids, _ = sample_fixed_demonstrations(data, 1, 42)
        demos = [data.train[i] for i in demo_ids]
        query = data.test[subsample_test(data, 42)[0]]
        tok = offline_tokenizers[tokname]
        _CASES[key] = (data.task, demos, query, tok, build_prompt(data.task, demos, query, tok))
    return _CASES[key]


@pytest.mark.parametrize("tokname", OFFLINE_NAMES)
@pytest.mark.parametrize("name", TASK_NAMES)
def test_real_prompt_positions(name, tokname, data_dir, offline_tokenizers):
    task, demos, query, tok, p = real_case(name, tokname, data_dir, offline_tokenizers)
    ids = list(p.input_ids)

    # The text is the template, and the ids are its tokenisation (BOS included where the tokenizer adds one).
    assert p.text == template(task, demos, query.text)
    assert ids == tok(p.text).input_ids
    assert p.label == query.label and len(p) == len(ids)

    # Special tokens: Gemma prepends BOS at position 0, the others add nothing.
    if tokname == "gemma-3-270m":
        assert ids[0] == tok.bos_token_id and p.special_positions == (0,)
        assert ids[1:] == tok(p.text, add_special_tokens=False).input_ids
    else:
        assert p.special_positions == ()
        assert ids == tok(p.text, add_special_tokens=False).input_ids

    # Label words: one per demonstration, in demonstration order, at the token count of the text before them.
    assert p.label_classes == tuple(d.label for d in demos)
    assert len(p.label_positions) == len(p.label_spans) == len(demos)
    first_ids = label_token_ids(task, tok)
    for k, (pos, (start, end), cls) in enumerate(zip(p.label_positions, p.label_spans, p.label_classes)):
        prefix = prefix_before_label(task, demos, k)
        assert pos == n_tokens(tok, prefix), f"label {k}: position is not the token count of the text before it"
        if tokname == "gemma-3-270m":  # shifted by the BOS
            assert pos == len(tok(prefix, add_special_tokens=False).input_ids) + 1
        assert decode(tok, ids[:pos]) == prefix
        word = task.label_words[cls]
        first = decode(tok, [ids[pos]])
        assert first.strip() and word.strip().startswith(first.strip())
        assert first.strip() == decode(tok, tok(word, add_special_tokens=False).input_ids[:1]).strip()
        assert ids[pos] == first_ids[cls]
        assert start == pos and end > start
        assert decode(tok, ids[start:end]).strip() == word.strip()
        assert decode(tok, ids[:end]) == prefix + word

    # Target q: the last token, the colon after the query's label prefix.
    assert p.target == len(ids) - 1
    assert decode(tok, [ids[p.target]]) == ":"
    assert decode(tok, ids[: p.target]) + ":" == p.text

    # The query block starts at query_start.
    head = template(task, demos, "")[: -len(template(task, [], ""))]
    assert head.endswith("\n")
    assert p.query_start == n_tokens(tok, head)
    assert decode(tok, ids[p.query_start :]) == template(task, [], query.text)

    # Every token has exactly one role.
    label_tokens = [i for s, e in p.label_spans for i in range(s, e)]
    text_tokens = [i for t in p.text_positions for i in t] + list(p.query_positions)
    roles = list(p.special_positions) + list(p.format_positions) + label_tokens + text_tokens
    assert sorted(roles) == list(range(len(ids)))

    # Format tokens decode to the template's own words and colons (a token may also carry a text's final
    # punctuation, e.g. Qwen's "?\n"); text tokens decode to pieces of their own text, in order.
    fmt = "".join(decode(tok, [ids[i]]) for i in p.format_positions)
    block = f"{task.input_prefix}:{task.label_prefix}:"
    assert letters(fmt) == letters(block * (len(demos) + 1))
    assert fmt.count(task.input_prefix) == len(demos) + 1
    for d, positions in enumerate(p.text_positions):
        assert positions == tuple(range(positions[0], positions[-1] + 1))
        assert_text_piece(decode(tok, [ids[i] for i in positions]), demos[d].text)
        assert p.label_positions[d] > positions[-1]
        if d + 1 < len(demos):
            assert positions[-1] < p.label_positions[d] < p.text_positions[d + 1][0]
    assert_text_piece(decode(tok, [ids[i] for i in p.query_positions]), query.text)
    assert p.query_start < p.query_positions[0] and p.query_positions[-1] < p.target


def test_sst2_two_demo_template_exact(data_dir, offline_tokenizers):
    data = load_task("sst2", data_dir)
    neg = next(e for e in data.train if e.label == 0)
    pos = next(e for e in data.train if e.label == 1)
    q = data.test[0]
    for tok in offline_tokenizers.values():
        p = build_prompt("sst2", [neg, pos], q, tok)
        assert p.text == (
            f"Review: {neg.text}\nSentiment: Negative\nReview: {pos.text}\nSentiment: Positive\n"
            f"Review: {q.text}\nSentiment:"
        )
        assert neg.text.endswith(" ")  # GLUE's trailing space is kept, as in HF
        assert p.label_classes == (0, 1)


@pytest.mark.parametrize("tokname", OFFLINE_NAMES)
def test_trec_abbreviation_is_multi_token(tokname, data_dir, offline_tokenizers):
    task, demos, query, tok, p = real_case("trec", tokname, data_dir, offline_tokenizers)
    k = p.label_classes.index(0)  # " Abbreviation"
    start, end = p.label_spans[k]
    assert end - start > 1
    assert p.label_positions[k] == start
    assert decode(tok, p.input_ids[start:end]).strip() == "Abbreviation"
    assert label_token_ids(task, tok)[0] == p.input_ids[start]
    # the other label words' first tokens are all different (a prediction is well defined)
    assert len(set(label_token_ids(task, tok))) == task.n_classes


@pytest.mark.parametrize("tokname", OFFLINE_NAMES)
def test_texts_with_newlines_and_template_words(tokname, offline_tokenizers):
    """Positions come from construction: a text that contains newlines and even "Sentiment: Positive" is no label."""
    tok = offline_tokenizers[tokname]
    task = get_task("sst2")
    demos = [
        Example("first line\nSentiment: Positive\nsecond line", 0),
        Example("one\n\ntwo", 1),
        Example("Review: nested\n", 0),
    ]
    query = Example("a\nb", 1)
    p = build_prompt(task, demos, query, tok)
    assert p.text == template(task, demos, query.text)
    assert p.label_classes == (0, 1, 0)
    for k, pos in enumerate(p.label_positions):
        prefix = prefix_before_label(task, demos, k)
        assert pos == n_tokens(tok, prefix)
        assert decode(tok, p.input_ids[: p.label_spans[k][1]]) == prefix + task.label_words[demos[k].label]
    # the fake "Sentiment: Positive" inside the first text is text, not format and not a label
    fake = decode(tok, [p.input_ids[i] for i in p.text_positions[0]])
    assert "Sentiment" in fake and "Positive" in fake
    assert decode(tok, [p.input_ids[p.target]]) == ":" and p.target == len(p) - 1
    fmt = "".join(decode(tok, [p.input_ids[i]]) for i in p.format_positions)
    assert fmt.count("Sentiment") == 4 and fmt.count("Review") == 4


def test_query_as_string_has_no_label(offline_tokenizers):
    tok = offline_tokenizers["smollm2-135m"]
    p = build_prompt("sst2", [Example("fine", 1)], "so so", tok)
    assert p.label is None
    assert p.text == "Review: fine\nSentiment: Positive\nReview: so so\nSentiment:"


def test_label_token_ids_per_tokenizer(offline_tokenizers):
    for tok in offline_tokenizers.values():
        for task in TASKS.values():
            ids = label_token_ids(task, tok)
            assert len(ids) == task.n_classes and len(set(ids)) == task.n_classes
            for i, word in zip(ids, task.label_words):
                piece = decode(tok, [i])
                assert piece.startswith(" ")  # the label word's leading space belongs to its first token
                assert piece.strip() and word.strip().startswith(piece.strip())


# --------------------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokname", OFFLINE_NAMES)
def test_collate_pads_right(tokname, data_dir, offline_tokenizers):
    tok = offline_tokenizers[tokname]
    data = load_task("sst2", data_dir)
    neg = next(e for e in data.train if e.label == 0)
    pos = next(e for e in data.train if e.label == 1)
    # demonstration order differs from class order in the second prompt
    prompts = [
        build_prompt("sst2", [neg, pos], data.test[0], tok),
        build_prompt("sst2", [pos, neg], Example("short", 1), tok),
    ]
    batch = collate(prompts, tok.pad_token_id)
    t = max(len(p) for p in prompts)
    assert batch.input_ids.shape == batch.attention_mask.shape == (2, t)
    assert batch.input_ids.dtype == torch.long
    for b, p in enumerate(prompts):
        n = len(p)
        assert batch.input_ids[b, :n].tolist() == list(p.input_ids)
        assert torch.all(batch.input_ids[b, n:] == tok.pad_token_id)
        assert batch.attention_mask[b].tolist() == [1] * n + [0] * (t - n)
    assert batch.target.tolist() == [p.target for p in prompts]
    assert batch.labels.tolist() == [data.test[0].label, 1]
    lp = batch.label_positions()
    assert lp.shape == (2, 2)
    assert lp[0].tolist() == list(prompts[0].label_positions)  # demos already in class order
    assert lp[1].tolist() == [prompts[1].label_positions[1], prompts[1].label_positions[0]]  # reordered to classes
    for b in range(2):
        for c in range(2):
            assert decode(tok, [batch.input_ids[b, lp[b, c]]]).strip() == ("Negative", "Positive")[c]
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.prompts == batch.prompts


def test_label_positions_needs_one_demo_per_class(offline_tokenizers):
    tok = offline_tokenizers["smollm2-135m"]
    p = build_prompt("sst2", [Example("a", 0), Example("b", 0), Example("c", 1)], "q", tok)
    assert p.positions_of_class(0) == p.label_positions[:2]
    with pytest.raises(ValueError, match="one demonstration per class"):
        collate([p], tok.pad_token_id).label_positions()


def test_token_straddling_text_and_format_is_format(offline_tokenizers):
    """Qwen has single tokens for "?\\n" and " \\n": they straddle a text and the template; the template wins."""
    tok = offline_tokenizers["qwen2.5-coder-0.5b"]
    demos = [Example("What is it?", 0), Example("trailing space ", 1)]
    p = build_prompt("trec", demos, "Why?", tok)
    pieces = {decode(tok, [t]): i for i, t in enumerate(p.input_ids)}
    assert "?\n" in pieces and " \n" in pieces, "the tokenizer no longer merges these; pick other examples"
    for piece in ("?\n", " \n"):
        for i, t in enumerate(p.input_ids):
            if decode(tok, [t]) == piece:
                assert i in p.format_positions
                assert all(i not in positions for positions in p.text_positions)
    assert all(decode(tok, [p.input_ids[i]]) != "?" for i in p.text_positions[0])
    assert decode(tok, [p.input_ids[i] for i in p.text_positions[0]]) == " What is it"
