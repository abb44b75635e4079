"""In-context-learning prompts built from segments, with every position the experiments need.

A prompt is a list of segments (``format``, ``text``, ``label``), one demonstration after another and then the query,
joined by ``"\\n"`` exactly as the paper's templates (``../shared/docs/paper-spec.md`` §1.3)::

    Review: <text>\\nSentiment: Positive\\nReview: <text>\\nSentiment: Negative\\nReview: <query>\\nSentiment:

The whole string is tokenised at once (as the paper does), and each token is mapped back to the segment its
characters come from through the tokenizer's character offsets. So the positions of the label words (p_i), of the
formatting tokens and of the target q (the final colon) are known from construction; no token ids are searched.

Multi-token label words (TREC's `` Abbreviation``) use their **first** token as the label position and as the label's
logit, as the paper does (its footnote 4); :attr:`Prompt.label_spans` still records all their tokens.
A token whose characters straddle two segments (e.g. Qwen's single token for ``" \\n"``) takes the role with the
highest priority among them: label > format > text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from .tasks import Example, Task, get_task

__all__ = ["Segment", "Prompt", "Batch", "label_token_ids", "build_prompt", "collate", "target_logits",
           "target_label_logits", "label_head", "check_finite_logits", "length_batches", "tokenizer_fingerprint",
           "check_prompts", "check_context", "model_context"]

_ROLE_PRIORITY = {"text": 0, "format": 1, "label": 2}


@dataclass(frozen=True)
class Segment:
    text: str
    role: str  # "format", "text" or "label"
    demo: int  # index of the demonstration it belongs to; -1 for the query


@dataclass(frozen=True)
class Prompt:
    """A tokenised prompt and the positions of its parts (0-based token indices)."""

    text: str
    input_ids: tuple[int, ...]
    label_positions: tuple[int, ...]  # first token of each demonstration's label word, in demonstration order
    label_classes: tuple[int, ...]  # the class of each demonstration
    label_spans: tuple[tuple[int, int], ...]  # [start, end) tokens of each label word
    format_positions: tuple[int, ...]  # tokens of the template's own text ("Review", ":", "\n", "Sentiment", ...)
    text_positions: tuple[tuple[int, ...], ...]  # tokens of each demonstration's input text
    query_positions: tuple[int, ...]  # tokens of the query's input text
    query_start: int  # first token of the query (its input prefix)
    target: int  # q: the last token, the colon after the query's label prefix
    label: int | None  # gold label of the query, if known
    special_positions: tuple[int, ...]  # tokens the tokenizer added (BOS)
    tokenizer: str = ""  # tokenizer_fingerprint of the tokenizer that built it (checked against the model's)

    def __len__(self) -> int:
        return len(self.input_ids)

    def positions_of_class(self, c: int) -> tuple[int, ...]:
        """Label-word positions of class ``c`` (several with several shots per class)."""
        return tuple(p for p, k in zip(self.label_positions, self.label_classes) if k == c)


def _segments(task: Task, demos: Sequence[Example], query: Example | str) -> list[Segment]:
    segs: list[Segment] = []
    for d, ex in enumerate(demos):
        segs += [
            Segment(f"{task.input_prefix}:", "format", d),
            Segment(f" {ex.text}", "text", d),
            Segment(f"\n{task.label_prefix}:", "format", d),
            Segment(task.label_words[ex.label], "label", d),
            Segment("\n", "format", d),
        ]
    text = query.text if isinstance(query, Example) else query
    segs += [
        Segment(f"{task.input_prefix}:", "format", -1),
        Segment(f" {text}", "text", -1),
        Segment(f"\n{task.label_prefix}:", "format", -1),
    ]
    return segs


_PROBE = "Review: a fine film, 1999!\nSentiment: Positive\nQuestion: Who? Answer Type: Number Emotion: Happy"


@lru_cache(maxsize=32)
def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what a tokenizer does: its class, vocabulary size, special ids and the ids of a probe text.

    Prompts record it, and the experiments check it against the model's tokenizer, so prompts built with another
    model's tokenizer (whose ids mean other tokens) are refused instead of silently run.
    """
    ids = tokenizer(_PROBE)["input_ids"]
    blob = f"{type(tokenizer).__name__}|{len(tokenizer)}|{tokenizer.bos_token_id}|{tokenizer.eos_token_id}|{ids}"
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def check_prompts(lm, prompts: Sequence[Prompt], task: Task | None = None) -> None:
    """Raise ``ValueError`` for an empty prompt list, prompts built with another tokenizer than ``lm``'s, or (with
    ``task``) a query label outside the task's classes."""
    if len(prompts) == 0:
        raise ValueError("no prompts: pass at least one (e.g. from helpers.core.runs.make_prompts)")
    expected = tokenizer_fingerprint(lm.tokenizer)
    other = sorted({p.tokenizer for p in prompts} - {expected})
    if other:
        raise ValueError(
            f"prompts were built with another tokenizer than {getattr(lm, 'name', 'the model')!r}'s (fingerprints {other}, the model's is "
            f"{expected}): build them with build_prompt(..., lm.tokenizer) or make_prompts(lm, ...)"
        )
    if task is not None:
        bad = sorted({p.label for p in prompts if p.label is not None and not 0 <= p.label < task.n_classes})
        if bad:
            raise ValueError(f"query labels {bad} outside 0..{task.n_classes - 1} for {task.name}")
    check_context(prompts, getattr(lm, "max_length", None), getattr(lm, "name", None))


def model_context(model) -> int | None:
    """The longest input a model takes (its config's ``max_position_embeddings`` or ``n_positions``), or ``None``."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_context(prompts: Sequence[Prompt], max_length: int | None, model_name: str | None = None) -> None:
    """``ValueError`` naming the prompts longer than ``max_length`` tokens (the model's context), if any.

    A longer prompt fails on GPT-2 with a bare ``IndexError`` from torch and runs silently to garbage on a RoPE model
    (it extrapolates past its trained positions): it is refused where it enters instead."""
    if max_length is None:
        return
    long = [(i, len(p)) for i, p in enumerate(prompts) if len(p) > max_length]
    if long:
        shown = ", ".join(f"prompt {i}: {n} tokens" for i, n in long[:5]) + (" ..." if len(long) > 5 else "")
        raise ValueError(
            f"{len(long)} prompt(s) longer than the context of {model_name or 'the model'} ({max_length} tokens): "
            f"{shown}. Use fewer or shorter demonstrations (build_prompt(..., max_length=lm.max_length) refuses "
            "them when they are built)"
        )


def _encode(tokenizer, text: str):
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    return enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]


@lru_cache(maxsize=64)
def _label_token_ids(task: Task, tokenizer) -> tuple[int, ...]:
    ids = []
    for word in task.label_words:
        text = f"{task.label_prefix}:{word}"
        input_ids, offsets, special = _encode(tokenizer, text)
        start = len(text) - len(word)
        first = next((i for i, (s, e) in enumerate(offsets) if not special[i] and e > start), None)
        if first is None:
            raise ValueError(f"label word {word!r} of {task.name} gives no token in this tokenizer: every label word "
                             "must be a non-empty text (with its leading space, e.g. ' Positive')")
        if offsets[first][0] < start:
            raise ValueError(f"{word!r} merges with the preceding ':' in this tokenizer; no label position exists")
        ids.append(input_ids[first])
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words of {task.name} share a first token in this tokenizer: {ids}")
    return tuple(ids)


def label_token_ids(task: Task | str, tokenizer) -> tuple[int, ...]:
    """Id of each label word's first token, as tokenised after the label prefix (``"Sentiment: Positive"``)."""
    return _label_token_ids(get_task(task), tokenizer)


def build_prompt(
    task: Task | str,
    demos: Sequence[Example],
    query: Example | str,
    tokenizer,
    max_length: int | None = None,
) -> Prompt:
    """Build the ICL prompt of ``demos`` then ``query`` and record every position while building it.

    Raises ``ValueError`` for an empty demonstration list, a label out of range, or a prompt longer than
    ``max_length`` tokens (pass the model's :attr:`~helpers.core.models.LoadedModel.max_length`).
    """
    task = get_task(task)
    if len(demos) == 0:
        raise ValueError("no demonstrations: an ICL prompt needs at least one (label words are the anchors)")
    for ex in demos:
        if not 0 <= ex.label < task.n_classes:
            raise ValueError(f"demonstration label {ex.label} outside 0..{task.n_classes - 1} for {task.name}")
    if isinstance(query, Example) and not 0 <= query.label < task.n_classes:
        raise ValueError(f"query label {query.label} outside 0..{task.n_classes - 1} for {task.name}")
    segs = _segments(task, demos, query)
    text = "".join(s.text for s in segs)
    input_ids, offsets, special = _encode(tokenizer, text)
    if max_length is not None and len(input_ids) > max_length:
        raise ValueError(
            f"the prompt has {len(input_ids)} tokens, more than the model's context of {max_length}: "
            "use fewer or shorter demonstrations"
        )

    # character -> segment index
    seg_of_char = []
    for k, s in enumerate(segs):
        seg_of_char += [k] * len(s.text)

    roles: list[str | None] = []
    token_seg: list[int] = []
    for i, (start, end) in enumerate(offsets):
        if special[i] or end <= start:
            roles.append(None)
            token_seg.append(-1)
            continue
        covered = range(start, end)
        best = max((seg_of_char[c] for c in covered), key=lambda k: _ROLE_PRIORITY[segs[k].role])
        roles.append(segs[best].role)
        token_seg.append(best)

    label_ids = label_token_ids(task, tokenizer)
    label_positions, label_classes, label_spans = [], [], []
    for k, s in enumerate(segs):
        if s.role != "label":
            continue
        tokens = [i for i, seg in enumerate(token_seg) if seg == k]
        seg_start = sum(len(x.text) for x in segs[:k])
        if not tokens or offsets[tokens[0]][0] < seg_start:
            raise ValueError(f"label word {s.text!r} does not start a token in this prompt")
        cls = demos[s.demo].label
        if input_ids[tokens[0]] != label_ids[cls]:
            raise ValueError(f"label word {s.text!r} is tokenised differently in context than in label_token_ids")
        label_positions.append(tokens[0])
        label_classes.append(cls)
        label_spans.append((tokens[0], tokens[-1] + 1))

    text_positions = tuple(
        tuple(i for i, k in enumerate(token_seg) if k >= 0 and roles[i] == "text" and segs[k].demo == d)
        for d in range(len(demos))
    )
    query_positions = tuple(i for i, k in enumerate(token_seg) if k >= 0 and roles[i] == "text" and segs[k].demo == -1)
    query_start = next(i for i, k in enumerate(token_seg) if k >= 0 and segs[k].demo == -1)
    target = len(input_ids) - 1
    if roles[target] != "format" or not text.endswith(":"):
        raise ValueError("the prompt does not end with the label prefix's colon")
    return Prompt(
        text=text,
        input_ids=tuple(input_ids),
        label_positions=tuple(label_positions),
        label_classes=tuple(label_classes),
        label_spans=tuple(label_spans),
        format_positions=tuple(i for i, r in enumerate(roles) if r == "format"),
        text_positions=text_positions,
        query_positions=query_positions,
        query_start=query_start,
        target=target,
        label=query.label if isinstance(query, Example) else None,
        special_positions=tuple(i for i, r in enumerate(roles) if r is None),
        tokenizer=tokenizer_fingerprint(tokenizer),
    )


@dataclass(frozen=True)
class Batch:
    """Prompts padded on the right (as the paper), ready for the model."""

    prompts: tuple[Prompt, ...]
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    target: torch.Tensor  # (B,) position q of each prompt

    def to(self, device) -> "Batch":
        return Batch(self.prompts, self.input_ids.to(device), self.attention_mask.to(device), self.target.to(device))

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([p.label for p in self.prompts])

    def label_positions(self) -> torch.Tensor:
        """(B, C) label positions in class order, for one demonstration per class (re-weighting)."""
        rows = []
        for p in self.prompts:
            n_classes = len(set(p.label_classes))
            if len(p.label_classes) != n_classes:
                raise ValueError("label_positions() needs exactly one demonstration per class")
            rows.append([p.positions_of_class(c)[0] for c in range(n_classes)])
        return torch.tensor(rows)


def collate(prompts: Sequence[Prompt], pad_id: int, max_length: int | None = None) -> Batch:
    """Pad prompts on the right with ``pad_id`` into one batch; with ``max_length`` (the model's context), a longer
    prompt is a ``ValueError`` naming it (:func:`check_context`)."""
    if not prompts:
        raise ValueError("collate needs at least one prompt")
    if len({p.tokenizer for p in prompts}) > 1:
        raise ValueError("collate got prompts built with different tokenizers")
    check_context(prompts, max_length)
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p.input_ids)
        mask[b, : len(p)] = 1
    return Batch(tuple(prompts), ids, mask, torch.tensor([p.target for p in prompts]))


def check_finite_logits(logits: torch.Tensor, model) -> torch.Tensor:
    """Raise ``FloatingPointError`` if a logit is NaN or infinite (once per batch); return the logits."""
    finite = torch.isfinite(logits.detach())
    if not bool(finite.all()):
        rows = (~finite.all(dim=-1)).nonzero().flatten().tolist()
        dtype = next(model.parameters()).dtype
        raise FloatingPointError(
            f"non-finite logits for examples {rows} of this batch (model dtype {str(dtype).removeprefix('torch.')})"
            + (": float16 overflows in this model; load it with dtype=torch.bfloat16 or torch.float32"
               if dtype == torch.float16 else "")
        )
    return logits


def _check_batch_context(model, batch: Batch) -> None:
    context = model_context(model)
    if context is not None and batch.input_ids.shape[-1] > context:
        check_context(batch.prompts, context, getattr(getattr(model, "config", None), "model_type", None))
        raise ValueError(f"the batch is {batch.input_ids.shape[-1]} tokens long, more than the model's context of "
                         f"{context}")


def target_logits(model, batch: Batch) -> torch.Tensor:
    """Full-vocabulary next-token logits at each prompt's target position q: (B, V).

    Only the q rows go through the output layer (``logits_to_keep``), which matters for Gemma's 262k vocabulary.
    Gradients flow if the caller enables them. The label-restricted logits of the paper (§1.5) are
    ``target_logits(...)[:, label_token_ids(task, tokenizer)]``; their argmax is the prediction
    (:func:`target_label_logits` computes only those columns).

    Raises ``FloatingPointError`` if a logit is NaN or infinite (checked once per batch, so no experiment can carry
    a silent NaN; a float16 model is told to use bfloat16 or float32).
    """
    _check_batch_context(model, batch)
    device = next(model.parameters()).device
    if output_device(model) == device:
        out = model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            logits_to_keep=batch.target.to(device)[:, None],
            use_cache=False,
        )
        return check_finite_logits(out.logits[:, 0, :], model)
    # A model split over devices (device_map): a tensor logits_to_keep is moved to the first device but indexes the
    # final hidden states on the last one. Keep the last k positions (an int, not moved) and take each row's own.
    t = batch.input_ids.shape[1]
    k = t - int(batch.target.min())
    logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                   logits_to_keep=k, use_cache=False).logits
    rows = (batch.target - (t - k)).to(logits.device)
    return check_finite_logits(logits[torch.arange(logits.shape[0], device=logits.device), rows], model)


def output_device(model) -> torch.device:
    """Where the final hidden states are: the device of the base model's last parameter (its final norm); the
    model's device unless the model is split over several (``device_map``)."""
    last = None
    for last in model.base_model.parameters():
        pass
    return last.device


def label_head(model, hidden: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """The model's output layer restricted to the label words' rows: (..., D) final hidden states -> (..., C) logits.

    Equal to the full-vocabulary logits at ``label_ids`` (tied embeddings read through ``get_output_embeddings``, an
    output bias, and final-logit soft-capping where a model has them; tested), without the cost of the full
    vocabulary (a 262k-row product for Gemma) where only the label words' logits are needed.
    """
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"{cfg.model_type}: the output logits are scaled by {attr}")
    head = model.get_output_embeddings()
    ids = torch.as_tensor(list(label_ids), device=head.weight.device)  # a tied head sits with the embeddings
    logits = hidden @ head.weight[ids].T.to(hidden.device)
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[ids].to(hidden.device)
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def target_label_logits(model, batch: Batch, label_ids: Sequence[int]) -> torch.Tensor:
    """The label words' logits at each prompt's target q: (B, C), float32; equal to
    ``target_logits(model, batch)[:, label_ids]`` (tested) without the full-vocabulary output layer."""
    _check_batch_context(model, batch)
    device = next(model.parameters()).device
    hidden = model.base_model(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        use_cache=False,
    ).last_hidden_state
    rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.target.to(hidden.device)]
    return check_finite_logits(label_head(model, rows, label_ids), model)


def length_batches(lengths: Sequence[int], token_budget: int, max_batch: int | None = None) -> list[list[int]]:
    """Length-aware batches: indices sorted by length (stable), cut so that each batch's padded size
    (examples × longest) stays within ``token_budget`` (a longer example still gets a batch of its own) and at most
    ``max_batch`` examples. Run the batches, then put the results back with the indices (input order)."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[i]  # sorted: the newcomer is the longest
        if current and ((len(current) + 1) * longest > token_budget or (max_batch and len(current) >= max_batch)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
