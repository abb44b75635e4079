"""Tuning the context or tuning the anchors: prompt tuning, prefix-tuning, PEZ and anchor re-weighting side by side.

Every method is trained on anchor re-weighting's data (:func:`helpers.experiments.reweighting.seed_setup`: the same one
demonstration per class, the 4 extra examples per class wrapped with those demonstrations, the same seeds and test
examples), with its gold-label cross-entropy on the label-restricted logits, Adam and its epochs and per-epoch order
(:class:`helpers.experiments.reweighting.TrainConfig`), the model frozen. What differs is *what* is trained:

* **prompt tuning** (Lester et al., 2021): m input embeddings P (m x d) inserted after the BOS token (at the very
  start for a model without BOS), initialised with the embeddings of m random vocabulary tokens (seeded);
* **prefix-tuning** (Li & Liang, 2021): m learned keys and values in every layer (L x 2 x m x H_kv x D_head
  parameters), placed before the prompt in the key/value cache at positions 0..m-1 (the prompt's tokens then take
  positions m, m+1, ...; a rotary model's attention between prompt tokens depends only on their distance, so this
  shift alone changes nothing). Initialised with the keys and values of the same m random tokens run through the
  model. We use no re-parametrisation MLP (Li & Liang use one for stability);
* **PEZ** (Wen et al., 2023, "Hard prompts made easy"): m *real* tokens. A continuous P is kept; every step the
  forward pass uses its projection onto the nearest vocabulary embeddings (L2), and the gradient at the projection
  updates P. The result is the projected token ids; they are evaluated as ordinary tokens;
* **anchor re-weighting** (the paper's Eq. 9): :func:`helpers.experiments.reweighting.train_beta`, unchanged.

All of them run through the one attention function of :mod:`helpers.core.attention`, so the hooks (``Record`` below) see
the soft tokens and the prefix like any other key. PEFT's ``PrefixTuningConfig`` also runs on our models and our
attention function (a test compares its logits with ours), but its forward pass always rebuilds the prefix and runs
the whole prompt: our evaluation continues one key/value cache of the shared demonstrations over all test queries,
and the attention analysis needs to know where the prefix sits. So prefix-tuning is our small module, checked
against PEFT where PEFT is installed.

**The theorem** (Petrov, Torr & Bibi, 2024, Thm. 1): for a query token q with input x_q in a layer, and content keys
fixed, prepending a prefix of keys/values gives, in every head,
``A'(q, j) = (1 - alpha_q) A(q, j)`` for every content position j, where alpha_q is the attention on the prefix.
Renormalised over the content, the attention is *exactly* unchanged; the output becomes
``(1 - alpha_q) o_q + alpha_q v_prefix(q)``. It holds where the layer's input is unchanged: in the first layer (for
prompt tuning and PEZ too, which are prefixes at the input). In later layers the content's hidden states themselves
change. :func:`attention_report` measures both.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..core.attention import Record, Reweight, intervene
from ..core.prompts import Prompt, check_finite_logits, label_token_ids
from .reweighting import (KV, LR_FOLDS, LR_GRID, TrainConfig, _loss, adam_epochs, class_positions, evaluate,
                          heldout_lr, label_head, prefix_kv, seed_setup, shared_prefix_length, train_beta)
from ..core.runs import cached_run
from ..core.tasks import TaskData
from ..core.findings import NOT_REPRODUCED, PARTLY, REPRODUCED, Finding, Measured
from ..core.runs import ModelKey, Profile
from ..core.tasks import load_task
from .protocol import Experiment

__all__ = [
    "EXPERIMENT", "RESULTS_FOLDER", "TuningConfig", "SIZES", "methods_of", "method_kind", "n_trained", "insert_slot",
    "random_init_ids", "embed_scale", "project_to_vocab", "unit_vocab", "soft_logits", "prefix_logits", "init_prefix",
    "evaluate_soft", "evaluate_prefix", "train_soft", "train_prefix", "train_pez", "attention_at_target",
    "attention_report", "tuning_run", "tuning_runs", "METHOD_TITLES", "task_average", "FLOOR", "shift_floor",
    "shift_floor_run", "collect_floor", "SCORED_FIELDS", "ATTENTION_FIELDS", "FLOOR_FIELDS", "expected_fields",
    "LR_GRIDS", "search_method", "train_method", "method_logits", "lr_search_run", "method_lr", "collect_lr_searches",
    "SEARCH_FIELDS",
]

RESULTS_FOLDER = "tuning"  # the results sub-folder of its runs


@dataclass(frozen=True)
class TuningConfig:
    """The sizes of this chapter (its own, independent of the shared profiles)."""

    n_test: int = 64  # test examples per (task, seed); the same examples as re-weighting's book profile
    seeds: tuple[int, ...] = (42, 43, 44)
    prompt_lengths: tuple[int, ...] = (1, 4, 16)
    prefix_lengths: tuple[int, ...] = (1, 4, 16)
    pez_lengths: tuple[int, ...] = (8,)
    n_attention: int = 16  # test examples of the attention analysis per (task, seed)
    train: TrainConfig = field(default_factory=TrainConfig)  # epochs and Adam's betas (the rate: :func:`method_lr`)
    batch_size: int = 8
    # (kind, rate) pairs: train every method of a kind at this rate instead of the one its held-out search chose
    # (``SIZES["fixed"]``: the paper's 0.01 for all, Wen et al.'s 0.1 for PEZ: the usual rates, no search).
    # Empty: the searched rates (:func:`method_lr`).
    fixed_rates: tuple[tuple[str, float], ...] = ()


SIZES = {
    "quick": TuningConfig(n_test=8, seeds=(42,), prompt_lengths=(1, 4), prefix_lengths=(1, 4), pez_lengths=(4,),
                          n_attention=4),
    "book": TuningConfig(),
    "fixed": TuningConfig(fixed_rates=(("anchor", 0.01), ("prompt", 0.01), ("prefix", 0.01), ("pez", 0.1))),
}


def methods_of(config: TuningConfig) -> tuple[str, ...]:
    """``icl-1``, ``anchor``, ``prompt-m``, ``prefix-m``, ``pez-m`` for the configured lengths m."""
    return ("icl-1", "anchor", *(f"prompt-{m}" for m in config.prompt_lengths),
            *(f"prefix-{m}" for m in config.prefix_lengths), *(f"pez-{m}" for m in config.pez_lengths))


def method_kind(method: str) -> tuple[str, int]:
    """``"prefix-4"`` -> ``("prefix", 4)``; ``"anchor"`` -> ``("anchor", 0)``."""
    kind, _, m = method.partition("-")
    if kind in ("prompt", "prefix", "pez") and m.isdigit() and int(m) > 0:
        return kind, int(m)
    if method in ("icl-1", "anchor"):
        return method, 0
    raise ValueError(f"unknown method {method!r}: icl-1, anchor, prompt-m, prefix-m or pez-m (m >= 1)")


METHOD_TITLES = {"icl-1": "ICL 1-shot (nothing trained)", "anchor": "anchor re-weighting",
                 "prompt": "prompt tuning", "prefix": "prefix-tuning", "pez": "PEZ hard prompt"}


def _dims(model) -> dict[str, int]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    return {"layers": cfg.num_hidden_layers, "heads": heads, "kv_heads": getattr(cfg, "num_key_value_heads", heads),
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, "d": cfg.hidden_size}


def n_trained(model, method: str, n_classes: int) -> int:
    """Number of trained parameters: prompt m*d; prefix L*2*m*H_kv*D_head; PEZ m (token ids; m*d continuous while
    searching); anchor L*H*C; ICL 0."""
    kind, m = method_kind(method)
    d = _dims(model)
    return {"icl-1": 0, "anchor": d["layers"] * d["heads"] * n_classes, "prompt": m * d["d"],
            "prefix": d["layers"] * 2 * m * d["kv_heads"] * d["head_dim"], "pez": m}[kind]


# --------------------------------------------------------------------------------------------------------------------
# Soft prompts (prompt tuning, PEZ) and prefixes (prefix-tuning)
# --------------------------------------------------------------------------------------------------------------------


def insert_slot(prompt: Prompt) -> int:
    """Where prompt tokens go: after the BOS token the tokenizer added (Gemma), else at the start (Qwen, GPT-2)."""
    return 1 if 0 in prompt.special_positions else 0


def random_init_ids(tokenizer, m: int, seed: int) -> list[int]:
    """m random ordinary vocabulary tokens (seeded): no special token, decodes to non-empty text."""
    rng = np.random.default_rng([seed, 14])
    special = set(tokenizer.all_special_ids)
    out: list[int] = []
    while len(out) < m:
        i = int(rng.integers(1000, min(len(tokenizer), 30000)))
        if i not in special and tokenizer.decode([i]).strip():
            out.append(i)
    return out


def embed_scale(model) -> float:
    """The constant the input embedding layer multiplies its rows by (Gemma: sqrt(d); others: 1)."""
    scale = getattr(model.get_input_embeddings(), "embed_scale", None)
    return 1.0 if scale is None else float(scale)


def _embed(model, ids: Sequence[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model.get_input_embeddings()(torch.tensor([list(ids)], device=device))[0]


def unit_vocab(model) -> torch.Tensor:
    """The vocabulary embeddings normalised to unit length (V, d): what PEZ's projection compares with."""
    weight = model.get_input_embeddings().weight.detach().float()
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)


def project_to_vocab(model, soft: torch.Tensor, unit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PEZ's projection (Wen et al.'s ``nn_project``): each row of ``soft`` (m, d) to the vocabulary token whose
    embedding has the highest cosine similarity with it. Returns the token ids (m,) and their embeddings exactly as
    the model's embedding layer returns them (so the projection *is* a real token's input). ``unit``: the
    precomputed :func:`unit_vocab`."""
    unit = unit_vocab(model) if unit is None else unit
    with torch.no_grad():
        x = soft.detach().float()
        ids = (x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) @ unit.T).argmax(1)
    return ids, _embed(model, ids.tolist()).detach()


def _with_soft(model, ids: Sequence[int], soft: torch.Tensor | None, slot: int) -> torch.Tensor:
    """Input embeddings (1, T + m, d) of ``ids`` with ``soft`` (m, d) inserted at ``slot``."""
    e = _embed(model, ids)
    if soft is None or soft.shape[0] == 0:
        return e[None]
    return torch.cat([e[:slot], soft.to(e.dtype), e[slot:]])[None]


def soft_logits(model, prompt: Prompt, soft: torch.Tensor | None, label_ids: Sequence[int],
                hooks: Sequence = ()) -> torch.Tensor:
    """Label logits (C,) at q of one prompt with the soft prompt inserted (full forward; differentiable in soft)."""
    slot = insert_slot(prompt)
    m = 0 if soft is None else soft.shape[0]
    embeds = _with_soft(model, prompt.input_ids, soft, slot)
    with intervene(*hooks) if hooks else contextlib.nullcontext():
        hidden = model.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    return check_finite_logits(label_head(model, hidden[0, prompt.target + m], label_ids), model)


def _cache(kv: KV | None, batch: int = 1):
    from transformers import DynamicCache

    if not kv:
        return DynamicCache()
    return DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv])


def prefix_logits(model, prompt: Prompt, kv: KV | None, label_ids: Sequence[int],
                  hooks: Sequence = ()) -> torch.Tensor:
    """Label logits (C,) at q with the learned keys/values ``kv`` (per layer (1, H_kv, m, D)) before the prompt.

    The prompt's tokens take positions m, m+1, ... (after the prefix). Differentiable in ``kv``. ``kv=None`` or
    m = 0: the plain model.
    """
    device = next(model.parameters()).device
    m = kv[0][0].shape[-2] if kv else 0
    ids = torch.tensor([list(prompt.input_ids)], device=device)
    with intervene(*hooks) if hooks else contextlib.nullcontext():
        hidden = model.base_model(input_ids=ids, past_key_values=_cache(kv), use_cache=True,
                                  position_ids=torch.arange(m, m + ids.shape[1], device=device)[None]
                                  ).last_hidden_state
    return check_finite_logits(label_head(model, hidden[0, prompt.target], label_ids), model)


def init_prefix(model, ids: Sequence[int]) -> KV:
    """Keys and values of every layer for the tokens ``ids`` at positions 0..m-1: prefix-tuning's initialisation."""
    return [(k.clone(), v.clone()) for k, v in prefix_kv(model, ids)]


def _continue(model, rests: Sequence[Sequence[int]], start: KV, first_position: int, rows: Sequence[int],
              label_ids: Sequence[int]) -> torch.Tensor:
    """Label logits (B, C): right-padded token lists ``rests`` run over the cache ``start`` (no gradient).

    Token j of every row gets position ``first_position + j``; ``rows[b]`` is the target's index within ``rests[b]``.
    """
    device = next(model.parameters()).device
    n0 = start[0][0].shape[-2]
    b, t = len(rests), max(len(r) for r in rests)
    ids = torch.zeros(b, t, dtype=torch.long)
    mask = torch.ones(b, n0 + t, dtype=torch.long)
    for i, r in enumerate(rests):
        ids[i, : len(r)] = torch.tensor(list(r))
        mask[i, n0 + len(r):] = 0
    position_ids = torch.arange(first_position, first_position + t, device=device)[None].expand(b, -1)
    hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                              past_key_values=_cache(start, b), use_cache=True,
                              position_ids=position_ids).last_hidden_state
    return check_finite_logits(label_head(model, hidden[torch.arange(b, device=hidden.device),
                                                        torch.tensor(list(rows), device=hidden.device)], label_ids),
                               model)


def _check_trained(what: str, tensors) -> None:
    """``FloatingPointError`` if a trained soft prompt or prefix holds a NaN or an infinity (a diverged training):
    its logits would be NaN."""
    for i, t in enumerate(tensors):
        finite = torch.isfinite(t.detach())
        if not bool(finite.all()):
            raise FloatingPointError(
                f"the {what} has {int((~finite).sum())} non-finite values of {t.numel()}"
                f"{f' (tensor {i})' if len(tensors) > 1 else ''}: its logits would be NaN. Its training diverged "
                "(lower the learning rate) or it was damaged; nothing was evaluated")


def _batches(prompts, batch_size, desc, progress):
    from tqdm.auto import tqdm

    for first in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        yield list(prompts[first: first + batch_size])


def evaluate_soft(lm, task, prompts: Sequence[Prompt], soft: torch.Tensor, batch_size: int = 8,
                  progress: bool = False) -> np.ndarray:
    """Label logits (N, C) with the soft prompt inserted; the shared demonstrations (with the soft prompt) run once."""
    model = lm.model
    label_ids = list(label_token_ids(task, lm.tokenizer))
    n = shared_prefix_length(prompts)
    slot = insert_slot(prompts[0])
    if slot > n:
        raise ValueError("the prompts share no BOS token to insert after")
    _check_trained("soft prompt", [soft])
    m = soft.shape[0]
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        embeds = _with_soft(model, prompts[0].input_ids[:n], soft, slot)
        cache = _cache(None)
        model.base_model(inputs_embeds=embeds, past_key_values=cache, use_cache=True,
                         position_ids=torch.arange(n + m, device=device)[None])
        start = [(layer.keys, layer.values) for layer in cache.layers]
        for chunk in _batches(prompts, batch_size, f"evaluate soft {task.name}", progress):
            logits = _continue(model, [p.input_ids[n:] for p in chunk], start, n + m,
                               [p.target - n for p in chunk], label_ids)
            out.append(logits.float().cpu().numpy())
    return np.concatenate(out)


def evaluate_prefix(lm, task, prompts: Sequence[Prompt], kv: KV, batch_size: int = 8,
                    progress: bool = False) -> np.ndarray:
    """Label logits (N, C) with the learned prefix; the shared demonstrations run once over it."""
    model = lm.model
    label_ids = list(label_token_ids(task, lm.tokenizer))
    n = shared_prefix_length(prompts)
    _check_trained("prefix (keys and values)", [t for pair in kv for t in pair])
    m = kv[0][0].shape[-2]
    out = []
    with torch.no_grad():
        start = prefix_kv(model, prompts[0].input_ids[:n], start=[(k.detach(), v.detach()) for k, v in kv])
        for chunk in _batches(prompts, batch_size, f"evaluate prefix {task.name}", progress):
            logits = _continue(model, [p.input_ids[n:] for p in chunk], start, m + n,
                               [p.target - n for p in chunk], label_ids)
            out.append(logits.float().cpu().numpy())
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------------------------------
# Training (the re-weighting loop: gold-label cross-entropy, Adam, batch 1, seeded order per epoch)
# --------------------------------------------------------------------------------------------------------------------


def _train(params: list[torch.Tensor], step, n: int, seed: int, config: TrainConfig, lr: float,
           desc: str, progress: bool) -> dict[str, np.ndarray]:
    """Re-weighting's loop (:func:`helpers.experiments.reweighting.adam_epochs`) with its timings as arrays."""
    t0 = time.perf_counter()
    epoch_loss, times = adam_epochs(params, step, n, seed, config, lr, desc, progress)
    return {"epoch_loss": np.array(epoch_loss), "train_s": np.array(time.perf_counter() - t0),
            "step_s": np.array(np.mean(times)), "n_steps": np.array(len(times))}


def _frozen(model) -> None:
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model's parameters must be frozen (load_model(freeze=True))")


def train_soft(lm, task, train_prompts: Sequence[Prompt], m: int, seed: int, config: TrainConfig = TrainConfig(),
               progress: bool = False) -> dict[str, np.ndarray]:
    """Prompt tuning: m input embeddings after BOS, initialised from m random tokens' embeddings, trained."""
    model = lm.model
    _frozen(model)
    label_ids = list(label_token_ids(task, lm.tokenizer))
    init = random_init_ids(lm.tokenizer, m, seed)
    soft = _embed(model, init).detach().clone().float().requires_grad_(True)
    out = _train([soft], lambda i: _loss(soft_logits(model, train_prompts[i], soft, label_ids),
                                         train_prompts[i].label),
                 len(train_prompts), seed, config, config.lr, f"prompt-{m} {task.name}", progress)
    return {**out, "soft": soft.detach().cpu().numpy(), "init_ids": np.array(init)}


def train_prefix(lm, task, train_prompts: Sequence[Prompt], m: int, seed: int, config: TrainConfig = TrainConfig(),
                 progress: bool = False) -> dict[str, np.ndarray]:
    """Prefix-tuning: m keys and values per layer, initialised from m random tokens' keys and values, trained."""
    model = lm.model
    _frozen(model)
    label_ids = list(label_token_ids(task, lm.tokenizer))
    init = random_init_ids(lm.tokenizer, m, seed)
    kv = [(k.float().requires_grad_(True), v.float().requires_grad_(True)) for k, v in init_prefix(model, init)]
    params = [t for pair in kv for t in pair]
    out = _train(params, lambda i: _loss(prefix_logits(model, train_prompts[i], kv, label_ids),
                                         train_prompts[i].label),
                 len(train_prompts), seed, config, config.lr, f"prefix-{m} {task.name}", progress)
    return {**out, "keys": np.stack([k.detach().cpu().numpy() for k, _ in kv]),
            "values": np.stack([v.detach().cpu().numpy() for _, v in kv]), "init_ids": np.array(init)}


def train_pez(lm, task, train_prompts: Sequence[Prompt], m: int, seed: int, config: TrainConfig = TrainConfig(),
              lr: float = 0.1, progress: bool = False) -> dict[str, np.ndarray]:
    """PEZ (Wen et al., 2023, Alg. 1): forward with the projection of P, its gradient updates P; returns the final
    projection's token ids (and the ids after every epoch)."""
    model = lm.model
    _frozen(model)
    label_ids = list(label_token_ids(task, lm.tokenizer))
    init = random_init_ids(lm.tokenizer, m, seed)
    scale = embed_scale(model)
    # P lives in the embedding *table's* space (as Wen et al.'s code): Gemma multiplies its rows by sqrt(d) later.
    soft = (_embed(model, init).detach().clone().float() / scale).requires_grad_(True)
    unit = unit_vocab(model)

    def step(i):
        _, hard = project_to_vocab(model, soft, unit)
        # straight-through: the forward pass sees the projection, the gradient at the projection moves P
        x = (soft + (hard.float() / scale - soft).detach()) * scale
        return _loss(soft_logits(model, train_prompts[i], x, label_ids), train_prompts[i].label)

    out = _train([soft], step, len(train_prompts), seed, config, lr, f"pez-{m} {task.name}", progress)
    ids = project_to_vocab(model, soft, unit)[0].tolist()
    return {**out, "ids": np.array(ids), "init_ids": np.array(init), "soft": soft.detach().cpu().numpy()}


# --------------------------------------------------------------------------------------------------------------------
# The attention at the target, per layer: the theorem check
# --------------------------------------------------------------------------------------------------------------------


def attention_at_target(lm, prompt: Prompt, method: str, trained: dict | None = None) -> tuple[torch.Tensor, list[int]]:
    """Post-softmax attention (L, H, S) of the target q over all keys, with the method applied, and the key indices
    of the prompt's own tokens (the *content*, in prompt order). Re-weighted attention is not renormalised (as the
    method itself)."""
    model = lm.model
    kind, m = method_kind(method)
    device = next(model.parameters()).device
    n = len(prompt)
    with torch.no_grad():
        if kind in ("icl-1", "anchor"):
            hooks = []
            if kind == "anchor":
                beta = torch.as_tensor(trained["beta"], device=device)
                positions = torch.tensor([class_positions(prompt, beta.shape[-1])])
                hooks.append(Reweight(beta, torch.tensor([prompt.target]), positions))
            rec = Record(rows=torch.tensor([prompt.target]))
            ids = torch.tensor([list(prompt.input_ids)], device=device)
            with intervene(*hooks, rec):
                model.base_model(input_ids=ids, use_cache=False)
            content = list(range(n))
        elif kind in ("prompt", "pez"):
            soft = torch.as_tensor(trained["soft"], device=device) if kind == "prompt" else \
                _embed(model, [int(i) for i in trained["ids"]])
            slot = insert_slot(prompt)
            rec = Record(rows=torch.tensor([prompt.target + m]))
            with intervene(rec):
                model.base_model(inputs_embeds=_with_soft(model, prompt.input_ids, soft, slot), use_cache=False)
            content = list(range(slot)) + list(range(slot + m, n + m))
        else:
            kv = [(torch.as_tensor(k, device=device), torch.as_tensor(v, device=device))
                  for k, v in zip(trained["keys"], trained["values"])]
            rec = Record(rows=torch.tensor([prompt.target]))
            ids = torch.tensor([list(prompt.input_ids)], device=device)
            with intervene(rec):
                model.base_model(input_ids=ids, past_key_values=_cache(kv), use_cache=True,
                                 position_ids=torch.arange(m, m + n, device=device)[None])
            content = list(range(m, m + n))
    return rec.stacked()[:, 0, :, 0, :].float().cpu(), content  # (L, H, S), on the CPU


def attention_report(lm, prompts: Sequence[Prompt], method: str, trained: dict | None,
                     n_classes: int) -> dict[str, np.ndarray]:
    """Per layer and head, on each prompt: how far the method moves q's attention *renormalised over the content*.

    ``tv`` (B, L, H): total variation distance between the renormalised content attention with and without the
    method; ``maxdiff`` (B, L, H): its largest absolute change at one position; ``outside`` (B, L, H): attention
    on the prefix/soft tokens (for re-weighting: the total attention minus 1, as it is not renormalised);
    ``anchor_share`` (B, L, H): the label words' share of the renormalised content attention with the method,
    ``anchor_share_base`` without.
    """
    tv, maxdiff, outside, share, share0 = [], [], [], [], []
    for p in prompts:
        base, _ = attention_at_target(lm, p, "icl-1")
        att, content = attention_at_target(lm, p, method, trained)
        c = att[..., content]
        mass = c.sum(-1, keepdim=True)
        renorm = c / mass
        base = base / base.sum(-1, keepdim=True)
        diff = (renorm.double() - base.double()).abs()
        tv.append((0.5 * diff.sum(-1)).numpy())
        maxdiff.append(diff.amax(-1).numpy())
        outside.append((att.sum(-1) - mass[..., 0]).numpy())
        labels = list(p.label_positions)
        share.append(renorm[..., labels].sum(-1).numpy())
        share0.append(base[..., labels].sum(-1).numpy())
    return {"tv": np.stack(tv), "maxdiff": np.stack(maxdiff), "outside": np.stack(outside),
            "anchor_share": np.stack(share), "anchor_share_base": np.stack(share0)}


# --------------------------------------------------------------------------------------------------------------------
# The runs: one cached file per (model, task, seed, method)
# --------------------------------------------------------------------------------------------------------------------


def _settings(config: TuningConfig, seed: int, method: str, lr: float | None = None) -> dict:
    kind, m = method_kind(method)
    s = {"seed": seed, "method": method, "n_test": config.n_test, "n_attention": config.n_attention, "shots": 1,
         "extra_per_class": config.train.extra_per_class}
    if kind != "icl-1":
        s.update(epochs=config.train.epochs, lr=float(lr), betas=list(config.train.betas))
    if kind in ("prompt", "prefix", "pez"):
        s["init"] = "random vocabulary tokens 1000-30000, seeded [seed, 14]"
    return s


# --------------------------------------------------------------------------------------------------------------------
# Training and evaluating one method, and its learning rate chosen on held-out training examples
# --------------------------------------------------------------------------------------------------------------------

# The learning rates tried per kind of method: anchor re-weighting's grid (the re-weighting chapter's), the paper's
# 0.01 with a ten times smaller and larger rate for the soft prompts and prefixes, Wen et al.'s 0.1 with about three
# times smaller and larger for PEZ.
LR_GRIDS = {"anchor": LR_GRID, "prompt": (0.001, 0.01, 0.1), "prefix": (0.001, 0.01, 0.1), "pez": (0.03, 0.1, 0.3)}


def search_method(config: TuningConfig, kind: str) -> str:
    """The method whose learning rate stands for its kind: ``anchor``; for soft prompts and prefixes the length 4 when
    configured (else the middle length); PEZ its first length. The rate found is used for every length of the kind."""
    if kind == "anchor":
        return "anchor"
    lengths = {"prompt": config.prompt_lengths, "prefix": config.prefix_lengths, "pez": config.pez_lengths}[kind]
    if not lengths:
        raise ValueError(f"no {kind} length is configured")
    m = 4 if kind != "pez" and 4 in lengths else lengths[len(lengths) // 2] if kind != "pez" else lengths[0]
    return f"{kind}-{m}"


def train_method(lm, task, train_prompts: Sequence[Prompt], method: str, seed: int, config: TuningConfig, lr: float,
                 progress: bool = False) -> dict[str, np.ndarray]:
    """Train one method (anchor re-weighting, prompt tuning, prefix-tuning or PEZ) at learning rate ``lr`` with the
    chapter's epochs and Adam settings; returns what was trained and its training curve."""
    kind, m = method_kind(method)
    train = TrainConfig(epochs=config.train.epochs, lr=float(lr), betas=config.train.betas,
                        extra_per_class=config.train.extra_per_class)
    if kind == "anchor":
        return train_beta(lm, task, train_prompts, lambda p: class_positions(p, task.n_classes), seed, train,
                          progress=progress)
    if kind == "prompt":
        return train_soft(lm, task, train_prompts, m, seed, train, progress)
    if kind == "pez":
        return train_pez(lm, task, train_prompts, m, seed, train, float(lr), progress)
    if kind == "prefix":
        return train_prefix(lm, task, train_prompts, m, seed, train, progress)
    raise ValueError(f"{method!r} trains nothing")


def method_logits(lm, task, prompts: Sequence[Prompt], method: str, trained: dict, batch_size: int = 8) -> np.ndarray:
    """Label logits (N, C) of ``prompts`` with what ``method`` trained (nothing for ``icl-1``)."""
    kind, _ = method_kind(method)
    if kind == "icl-1":
        return evaluate(lm, task, prompts, batch_size=batch_size, progress=False)
    if kind == "anchor":
        beta = torch.from_numpy(np.asarray(trained["beta"])).to(lm.device)
        return evaluate(lm, task, prompts, beta, lambda p: class_positions(p, task.n_classes),
                        batch_size=batch_size, progress=False)
    if kind == "prompt":
        return evaluate_soft(lm, task, prompts, torch.from_numpy(np.asarray(trained["soft"])).to(lm.device),
                             batch_size)
    if kind == "pez":
        return evaluate_soft(lm, task, prompts, _embed(lm.model, [int(i) for i in trained["ids"]]), batch_size)
    kv = [(torch.from_numpy(k).to(lm.device), torch.from_numpy(v).to(lm.device))
          for k, v in zip(trained["keys"], trained["values"])]
    return evaluate_prefix(lm, task, prompts, kv, batch_size)


SEARCH_FIELDS = ("grid", "heldout_loss", "heldout_acc", "lr")


def lr_search_run(lm, data: TaskData, config: TuningConfig, kind: str, setup=None, progress: bool = False,
                  **kw) -> dict[str, np.ndarray] | None:
    """The learning rate of one kind of method for a task, cached: :func:`helpers.experiments.reweighting.heldout_lr`
    over :data:`LR_GRIDS` on the first seed's auxiliary (training) examples, with the kind's
    :func:`search_method`, then held fixed for every seed and length. Used in: Tuning the context or tuning the
    anchors."""
    task = data.task
    method = search_method(config, kind)
    seed = config.seeds[0]

    def compute() -> dict[str, np.ndarray]:
        s = setup() if callable(setup) else (setup or seed_setup(lm, data, seed, config.n_test, config.train))

        def fit_and_score(fit_on, held_out, lr):
            return method_logits(lm, task, held_out, method,
                                 train_method(lm, task, fit_on, method, seed, config, lr, progress),
                                 config.batch_size)

        return heldout_lr(s.train_prompts, fit_and_score, seed, LR_GRIDS[kind], LR_FOLDS)

    settings = {"seed": seed, "method": "lr-search", "target": method, "grid": list(LR_GRIDS[kind]),
                "folds": LR_FOLDS, "shots": 1, "extra_per_class": config.train.extra_per_class,
                "epochs": config.train.epochs, "betas": list(config.train.betas)}
    if kind in ("prompt", "prefix", "pez"):
        settings["init"] = "random vocabulary tokens 1000-30000, seeded [seed, 14]"
    return cached_run(RESULTS_FOLDER, lm, data, settings, compute, expect=SEARCH_FIELDS, **kw)


def method_lr(lm, data: TaskData, config: TuningConfig, method: str, setup=None, progress: bool = False,
              **kw) -> float | None:
    """The learning rate ``method`` is trained at: its kind's :func:`lr_search_run` (None when a lookup finds none),
    or the config's ``fixed_rates``.
    ``setup``: the first seed's set-up (or a factory of it), if at hand."""
    kind, _ = method_kind(method)
    if config.fixed_rates:
        rates = dict(config.fixed_rates)
        if kind not in rates:
            raise ValueError(f"the fixed rates {rates} give none for {kind}")
        return float(rates[kind])
    search = lr_search_run(lm, data, config, kind, setup, progress, **kw)
    return None if search is None else float(search["lr"])


def collect_lr_searches(lm, data: TaskData, config: TuningConfig) -> dict[str, dict]:
    """``{kind: lr_search_run result}`` for the kinds whose search is cached (never computes)."""
    out = {}
    for kind in LR_GRIDS:
        r = lr_search_run(lm, data, config, kind, lookup_only=True)
        if r is not None:
            out[kind] = r
    return out


# What the chapter, its pages and the verdict read from each cached run, passed to cached_run as ``expect`` (a cached
# result without one of them is recomputed in the user cache and an error in the committed results; not part of the
# key): by method (:func:`expected_fields`), and the float floor's (:func:`shift_floor_run`).
SCORED_FIELDS = ("correct", "test_index", "n_params")  # accuracies, paired gains and parameter counts
ATTENTION_FIELDS = tuple(f"att_{k}" for k in ("tv", "maxdiff", "outside", "anchor_share", "anchor_share_base"))
FLOOR_FIELDS = ("maxdiff",)


def expected_fields(method: str) -> tuple[str, ...]:
    """The fields read from a cached run of ``method``: :data:`SCORED_FIELDS`; for a trained method also its
    training time and the attention report (:data:`ATTENTION_FIELDS`, the theorem check); for PEZ the tokens found
    and their initialisation; for :data:`FLOOR` its ``maxdiff``; for a learning-rate search :data:`SEARCH_FIELDS`."""
    if method == FLOOR:
        return FLOOR_FIELDS
    if method == "lr-search":  # a learning-rate search (lr_search_run), stored beside the runs
        return SEARCH_FIELDS
    kind, _ = method_kind(method)
    if kind == "icl-1":
        return SCORED_FIELDS
    return SCORED_FIELDS + ("train_s", *ATTENTION_FIELDS) + (("ids", "init_ids") if kind == "pez" else ())


def tuning_run(lm, data: TaskData, config: TuningConfig, seed: int, method: str, setup=None, progress: bool = False,
               **kw) -> dict[str, np.ndarray]:
    """One method on one seed, cached: test logits/pred/gold/correct/test_index, what was trained, the training
    curve and time, the parameter count ``n_params`` and the attention report (:func:`attention_report`)."""
    task = data.task
    kind, m = method_kind(method)

    def get_setup():
        if setup is None:
            return seed_setup(lm, data, seed, config.n_test, config.train)
        return setup() if callable(setup) else setup

    first = setup if seed == config.seeds[0] else None  # the search runs on the first seed's set-up
    lr = None if kind == "icl-1" else method_lr(lm, data, config, method, first, progress, **kw)
    if kind != "icl-1" and lr is None:  # a lookup that finds no learning-rate search: the run is missing too
        return None

    def compute() -> dict[str, np.ndarray]:
        s = get_setup()
        tr, te = s.train_prompts, s.test_prompts
        bs = config.batch_size
        trained = {} if kind == "icl-1" else train_method(lm, task, tr, method, seed, config, lr, progress)
        logits = method_logits(lm, task, te, method, trained, bs)
        train_logits = method_logits(lm, task, tr, method, trained, bs)
        gold = np.array([p.label for p in te])
        pred = logits.argmax(-1)
        out = {"logits": logits.astype(np.float32), "pred": pred, "gold": gold,
               "correct": (pred == gold).astype(np.int8), "test_index": np.array(s.test),
               "train_logits": np.asarray(train_logits, dtype=np.float32),
               "train_gold": np.array([p.label for p in tr]), "n_params": np.array(n_trained(lm.model, method,
                                                                                             task.n_classes))}
        out.update({k: np.asarray(v) for k, v in trained.items()})
        if kind != "icl-1":
            report = attention_report(lm, te[: config.n_attention], method, trained, task.n_classes)
            out.update({f"att_{k}": v for k, v in report.items()})
        return out

    return cached_run(RESULTS_FOLDER, lm, data, _settings(config, seed, method, lr), compute,
                      expect=expected_fields(method), **kw)


FLOOR = "position-shift-floor"


def shift_floor(lm, prompts: Sequence[Prompt], shifts: Sequence[int]) -> np.ndarray:
    """(B, len(shifts), L, H): the largest change of q's renormalised content attention when every position of the
    prompt is shifted by m and *nothing* is added, relative to the unshifted prompt.

    A rotary model's attention depends only on distances, so in exact arithmetic this is 0; in float32 the rotations
    at other absolute positions round differently. A prefix of length m shifts the prompt by exactly m, so this is
    the float-error floor the theorem check (:func:`attention_report`) can reach: large query/key norms (Qwen2's
    biases) raise it well above 1e-6. It is the same statistic as ``att_maxdiff``.
    """
    device = next(lm.model.parameters()).device
    out = []
    for p in prompts:
        base, _ = attention_at_target(lm, p, "icl-1")
        base = base.double() / base.double().sum(-1, keepdim=True)
        per = []
        for m in shifts:
            rec = Record(rows=torch.tensor([p.target]))
            ids = torch.tensor([list(p.input_ids)], device=device)
            with torch.no_grad(), intervene(rec):
                lm.model.base_model(input_ids=ids, use_cache=False,
                                    position_ids=torch.arange(m, m + len(p), device=device)[None])
            att = rec.stacked()[:, 0, :, 0, :].double().cpu()
            per.append((att / att.sum(-1, keepdim=True) - base).abs().amax(-1).numpy())
        out.append(np.stack(per))
    return np.stack(out)


def shift_floor_run(lm, data: TaskData, config: TuningConfig, seed: int, **kw) -> dict[str, np.ndarray] | None:
    """:func:`shift_floor` on the attention analysis's prompts of one seed (the first ``n_attention`` test
    prompts), for every prefix length, cached: ``maxdiff`` (B, len(prefix_lengths), L, H) and ``shifts``."""
    shifts = tuple(config.prefix_lengths)

    def compute() -> dict[str, np.ndarray]:
        s = seed_setup(lm, data, seed, config.n_test, config.train)
        return {"maxdiff": shift_floor(lm, s.test_prompts[: config.n_attention], shifts), "shifts": np.array(shifts)}

    settings = {"seed": seed, "method": FLOOR, "n_test": config.n_test, "n_attention": config.n_attention,
                "shots": 1, "shifts": list(shifts)}
    return cached_run(RESULTS_FOLDER, lm, data, settings, compute, expect=expected_fields(FLOOR), **kw)


def tuning_runs(lm, data: TaskData, config: TuningConfig, methods: Sequence[str] | None = None,
                seeds: Sequence[int] | None = None, progress: bool = False, **kw) -> dict[str, list[dict]]:
    """``{method: [result per seed]}`` for the configured methods and seeds."""
    import functools

    methods = methods_of(config) if methods is None else tuple(methods)
    seeds = config.seeds if seeds is None else tuple(seeds)
    out: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in seeds:
        setup = functools.cache(lambda seed=seed: seed_setup(lm, data, seed, config.n_test, config.train))
        for method in methods:
            out[method].append(tuning_run(lm, data, config, seed, method, setup, progress, **kw))
    return out


def config_dict(config: TuningConfig) -> dict:
    return asdict(config)


# --------------------------------------------------------------------------------------------------------------------
# What the chapter reports (read from the cache; nothing is recomputed with ``compute=False``)
# --------------------------------------------------------------------------------------------------------------------

Runs = dict  # {method: {seed: result}}


def collect(lm, data: TaskData, config: TuningConfig, methods: Sequence[str] | None = None,
            compute: bool = False, progress: bool = False) -> Runs:
    """``{method: {seed: result}}``: every (method, seed) in the cache (``compute=False``: never computes; what is
    missing is absent), or all of them computed."""
    methods = methods_of(config) if methods is None else tuple(methods)
    out: Runs = {}
    for seed in config.seeds:
        for method in methods:
            r = tuning_run(lm, data, config, seed, method, progress=progress, lookup_only=not compute)
            if r is not None:
                out.setdefault(method, {})[seed] = r
    return out


def collect_floor(lm, data: TaskData, config: TuningConfig, compute: bool = False) -> dict[int, dict]:
    """``{seed: shift_floor_run result}`` for the seeds cached (``compute=False``) or all of them computed."""
    out = {}
    for seed in config.seeds:
        r = shift_floor_run(lm, data, config, seed, lookup_only=not compute)
        if r is not None:
            out[seed] = r
    return out


def accuracy_of(runs: Runs, method: str):
    """Accuracy in % with its bootstrap interval over the seeds present (an :class:`~helpers.core.stats.Estimate`)."""
    from ..core.stats import mean_estimate

    return mean_estimate([np.asarray(r["correct"], float) for _, r in sorted(runs[method].items())]).scaled(100)


def gain_over_icl(runs: Runs, method: str, other: str = "icl-1"):
    """Paired accuracy difference method - other (default ICL 1-shot) in points, on the seeds both have (the same
    test examples)."""
    from ..core.stats import paired_difference

    seeds = sorted(set(runs[method]) & set(runs[other]))
    if not seeds:
        raise ValueError(f"{method} and {other} share no seed")
    for s in seeds:
        if not np.array_equal(runs[method][s]["test_index"], runs[other][s]["test_index"]):
            raise ValueError(f"{method} seed {s} was evaluated on other test examples than {other}")
    return paired_difference([runs[method][s]["correct"] for s in seeds],
                             [runs[other][s]["correct"] for s in seeds]).scaled(100)


def first_layer_deviation(runs: Runs, method: str) -> float:
    """The largest change, over seeds, examples, heads and content positions, of q's first-layer attention
    renormalised over the content (the theorem's quantity: 0 up to float error for a prefix)."""
    return float(max(r["att_maxdiff"][:, 0].max() for r in runs[method].values()))


def per_layer(runs: Runs, method: str, field: str) -> np.ndarray:
    """(seeds x examples, L) of an attention-report field averaged over heads."""
    return np.concatenate([r[f"att_{field}"].mean(-1) for _, r in sorted(runs[method].items())])


def task_average(by_task: dict[str, Runs], method: str, other: str | None = None,
                 seeds: Sequence[int] | None = None):
    """Accuracy of ``method`` in % averaged over tasks, or (``other`` given) its paired difference from ``other`` in
    points: the estimators of :func:`helpers.experiments.reweighting.accuracy` / :func:`~helpers.experiments.reweighting.difference`, which
    resample the i-th test example of every task together and average the task accuracies (equal weight per task).

    Every task must have ``method`` (and ``other``) on the same seeds (or on every seed of ``seeds``, which then
    restricts the average to them), evaluated on the same test examples as its 1-shot ICL run; a missing task or seed
    raises instead of averaging over a different set.
    """
    from .reweighting import accuracy, difference

    if not by_task:
        raise ValueError("no task to average over")
    wanted = ["icl-1", method] + ([other] if other else [])
    chosen = None if seeds is None else sorted(set(seeds))
    for task, runs in by_task.items():
        for m in wanted:
            if m not in runs:
                raise ValueError(f"{m} was not run on {task}: no average over tasks")
            if chosen is None:
                chosen = sorted(runs[m])
            if seeds is None and sorted(runs[m]) != chosen:
                raise ValueError(f"{m} on {task} has seeds {sorted(runs[m])}, not {chosen}: the average needs the "
                                 "same seeds")
            if missing := sorted(set(chosen) - set(runs[m])):
                raise ValueError(f"{m} on {task} lacks seeds {missing}")
    adapted = {t: {m: [runs[m][s] for s in chosen] for m in wanted} for t, runs in by_task.items()}
    return accuracy(adapted, method) if other is None else difference(adapted, method, other)


# ------------------------------------------------------------------------------------------------------------------
# The verdict rows (helpers.core.findings)
# ------------------------------------------------------------------------------------------------------------------


def prefix_theorem(model: str, profile: Profile) -> Measured | None:
    """Mean over SST-2 test prompts of the largest first-layer change (over heads and positions) of q's renormalised
    content attention under every trained prefix (all lengths), in units of 1e-6, from the tuning chapter's cached
    runs; anchor re-weighting's in the support. The chapter has its own sizes (``helpers.experiments.tuning.SIZES``)."""
    from ..core.stats import mean_estimate

    methods = [m for m in methods_of(SIZES["book"]) if m.startswith("prefix-")] + ["anchor"]
    for rates, config in (("searched", SIZES["book"]), ("fixed", SIZES["fixed"])):  # any trained prefix will do
        runs = collect(ModelKey.of(model), load_task("sst2"), config, methods=methods)
        prefixes = [m for m in runs if m.startswith("prefix-")]
        seeds = sorted(set.intersection(*(set(runs[m]) for m in prefixes))) if prefixes else []
        if seeds and "anchor" in runs:
            break
    else:
        return None
    per_seed = [np.concatenate([runs[m][s]["att_maxdiff"][:, 0].max(-1) for m in prefixes]) for s in seeds]
    est = mean_estimate(per_seed).scaled(1e6)
    anchor = mean_estimate([r["att_maxdiff"][:, 0].max(-1) for _, r in sorted(runs["anchor"].items())]).scaled(1e6)
    support = {"anchor": anchor}
    floor_note = ""
    floors = collect_floor(ModelKey.of(model), load_task("sst2"), config)
    if floors:  # the same statistic with positions shifted by m and nothing added: float error in exact arithmetic
        floor = mean_estimate([r["maxdiff"][:, :, 0].max(-1).max(-1) for _, r in sorted(floors.items())]).scaled(1e6)
        support["floor"] = floor
        floor_note = f"; positions shifted, nothing added (float floor): {floor.fmt(2)} × 1e-6"
    return Measured(est, unit=" × 1e-6", digits=2, support=support,
                    n_text=f"{config.n_attention} prompts × {len(prefixes)} prefix lengths × {est.n_seeds} seeds, SST-2",
                    note=f"largest first-layer change per prompt, prefix lengths {', '.join(p[7:] for p in prefixes)}"
                         f"{' (trained at fixed learning rates)' if rates == 'fixed' else ''}; "
                         f"anchor re-weighting: {anchor.fmt(0)} × 1e-6{floor_note}")


def float_error(m: Measured) -> str:
    """Reproduced: the prefix's change is float error and re-weighting's is not. Partly: only the first. Not
    reproduced otherwise. Float error: below 1e-5, or at most twice the float floor (the same statistic with the
    positions shifted as by the prefix and nothing added, which is 0 in exact arithmetic; a model with large
    query/key norms such as Qwen2 has a floor near 1e-4). "Not float error": above 1e-4 and ten times the floor."""
    floor = m.support.get("floor")
    tolerance = max(10.0, 2 * float(floor.high)) if floor is not None else 10.0
    exact = m.estimate.high < tolerance
    anchor = m.support.get("anchor")
    moves = anchor is not None and anchor.low > max(100.0, 10 * tolerance)
    return REPRODUCED if exact and moves else PARTLY if exact else NOT_REPRODUCED


# --------------------------------------------------------------------------------------------------------------------
# The experiment (helpers.experiments.protocol)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TuningPlan:
    """The tuning chapter's sizes (:data:`SIZES`) and the methods to run, in order (default: every method, then the
    float floor of the theorem check, :data:`FLOOR`)."""

    config: TuningConfig
    methods: tuple[str, ...]


def configure(profile: str = "book", methods=None) -> TuningPlan:
    config = SIZES[profile] if profile in SIZES else SIZES["book"]
    methods = tuple(methods) if methods else methods_of(config) + (FLOOR,)
    unknown = set(methods) - set(methods_of(config)) - {FLOOR}
    if unknown:
        raise ValueError(f"unknown tuning methods {sorted(unknown)}; choose from {methods_of(config) + (FLOOR,)}")
    return TuningPlan(config, methods)


def run(lm, data: TaskData, plan: TuningPlan, seed: int, lookup_only: bool = False) -> dict:
    """One (task, seed): every method of the plan (and the float floor), trained and evaluated."""
    out = {}
    for method in plan.methods:
        if method == FLOOR:  # the float-error floor of the theorem check (positions shifted, nothing added)
            out[method] = shift_floor_run(lm, data, plan.config, seed, lookup_only=lookup_only)
        else:
            out[method] = tuning_run(lm, data, plan.config, seed, method, lookup_only=lookup_only)
    return out


EXPERIMENT = Experiment(
    name="tuning", title="Tuning the context or tuning the anchors", chapter="book/tuning",
    configure=configure, seeds=lambda plan, model: plan.config.seeds, run=run, options=frozenset({"methods"}),
    findings=(
        Finding("prefix-theorem", "(beyond the paper) A trained prefix leaves q's first-layer attention over the "
                "prompt, renormalised over the prompt, unchanged (Petrov, Torr & Bibi 2024); anchor re-weighting "
                "changes it.", "a theorem (exact), not in the paper", "§3.1 vs prefix-tuning", "book/tuning",
                "fig-tuning-theorem", prefix_theorem, float_error),
    ),
)
