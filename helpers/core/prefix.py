"""A shared prefix (the demonstrations) run once into a key/value cache, then many queries answered over it.

Every experiment with fixed demonstrations (scheme A) runs the same demonstration tokens again for every test
example. This module runs them **once**::

    prefix = build_prefix(model, demo_ids)               # one forward pass, K/V of every layer kept
    small = prefix.keep(anchor_positions)                # optional: keep only some positions (compression, §3.2)
    logits = suffix_logits(model, small, query_suffixes) # batched queries over the shared cache

and answers each query (a suffix: the tokens after the demonstrations) from the cache.

**Positions.** A cache entry remembers the *original* position of its token. Query tokens get position ids that
continue from the uncompressed prefix length N (``N, N+1, ...``), whatever was removed from the cache: rotary models
(Llama, Qwen2, Gemma, GPT-J) then see the relative distances of the full prompt, and absolute-position models
(GPT-2) the same absolute positions. ``restart_positions=True`` reproduces the official GPT-2 compression run instead
(query positions 0, 1, ..., overlapping the cached ones).

**Masks.** We pass our own additive 4-D attention masks (one per layer type, e.g. Gemma 3's ``sliding_attention``
and ``full_attention``), computed from the original positions: a query token at position q sees a cached token at p
when p <= q and, in a sliding-window layer of window W, q - p < W; query tokens see earlier query tokens; right
padding of the queries is masked. The cache is built from plain ``DynamicLayer`` objects (transformers'
``DynamicCache`` with no config), so a sliding-window layer does not silently drop entries; entries that no query
could see through its window are removed by :meth:`PrefixCache.keep` (as the uncompressed model would never see
them either).

With nothing removed, :func:`suffix_logits` gives the full prompt's logits (tested to 1e-5 on tiny GPT-2, GPT-J,
Llama, Qwen2 and Gemma 3 models and on a real offline model).

**Shared-prefix execution** (every experiment with one fixed demonstration set per seed: isolation, extraction,
re-weighting, compression's full-ICL baseline). :func:`split_prompts` cuts a seed's prompts at the query (a position
known from prompt construction, :attr:`helpers.core.prompts.Prompt.query_start`) and checks that the demonstration tokens
are identical in every prompt *as tokenised*; a prompt whose tokens differ there (a token straddling the boundary)
is returned apart, to be run as a full prompt, and counted. Hooks then act where their positions are:

* an intervention on demonstration positions (isolating the label words) is active while the prefix is built
  (``build_prefix(model, ids, hooks=[Isolate(...)])``), so every query continues the intervened prefix;
* a hook on query rows (recording q's attention) is active during :func:`suffix_logits`, with rows counted within
  the suffix; :func:`key_positions` maps its key columns back to the original positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PrefixCache", "build_prefix", "suffix_logits", "suffix_hidden", "output_logits", "layer_windows",
           "split_prompts", "SharedPrefix", "key_positions", "to_original_positions", "shared_count"]


def layer_windows(model) -> tuple[tuple[str, ...], tuple[int | None, ...]]:
    """Each layer's attention type (``full_attention``, ``sliding_attention``) and sliding window (None = full)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = model.config.get_text_config(decoder=True)
    types, kwargs = get_layer_types_and_kwargs(config)
    unsupported = set(types) - {"full_attention", "sliding_attention"}
    if unsupported:
        raise NotImplementedError(f"prefix caching supports full and sliding-window attention, not {unsupported}")
    windows = tuple(kw.get("sliding_window") if t == "sliding_attention" else None for t, kw in zip(types, kwargs))
    return tuple(types), windows


@dataclass(frozen=True)
class PrefixCache:
    """Keys and values of a prefix, per layer, with the original position of every entry.

    ``keys[l]`` and ``values[l]``: (1, H_kv, K_l, D); ``positions[l]``: (K_l,) original positions (ascending);
    ``length``: N, the number of tokens of the uncompressed prefix (query positions continue from it).
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    positions: tuple[torch.Tensor, ...]
    length: int
    layer_types: tuple[str, ...]
    windows: tuple[int | None, ...]

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    def entries(self) -> tuple[int, ...]:
        """Cached tokens per layer."""
        return tuple(int(p.numel()) for p in self.positions)

    def nbytes(self) -> int:
        """Memory of the cached keys and values (all layers)."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(self.keys, self.values))

    def kept_positions(self, layer: int = 0) -> list[int]:
        return self.positions[layer].tolist()

    def keep(self, positions: Sequence[int]) -> "PrefixCache":
        """A cache with only the given original positions, in every layer (the same set in all layers, as the paper).

        In a sliding-window layer, positions no query can reach (p <= N - W) are dropped as well.
        """
        wanted = sorted(set(int(p) for p in positions))
        if wanted and (wanted[0] < 0 or wanted[-1] >= self.length):
            raise ValueError(f"positions must lie in 0..{self.length - 1}")
        want = torch.tensor(wanted, dtype=torch.long)
        keys, values, pos = [], [], []
        for k, v, p, w in zip(self.keys, self.values, self.positions, self.windows):
            sel = torch.isin(p, want.to(p.device))  # each layer's tensors stay on its device (a split model)
            if w is not None:
                sel &= p > self.length - w
            idx = sel.nonzero().flatten()
            reachable = [x for x in wanted if w is None or x > self.length - w]
            missing = set(reachable) - set(p.tolist())
            if missing:
                raise ValueError(f"positions {sorted(missing)[:5]} are no longer in this cache")
            keys.append(k[:, :, idx.to(k.device)])
            values.append(v[:, :, idx.to(v.device)])
            pos.append(p[idx])
        return PrefixCache(tuple(keys), tuple(values), tuple(pos), self.length, self.layer_types, self.windows)

    def truncate(self, n: int) -> "PrefixCache":
        """The cache of the first ``n`` tokens of an uncompressed cache (every position kept): what a prefix of
        ``n`` tokens would have given, since no token attends to a later one. Entries a sliding-window layer can no
        longer see from ``n`` are dropped, as :func:`build_prefix` does."""
        if not 1 <= n <= self.length:
            raise ValueError(f"a truncated cache keeps 1..{self.length} tokens, not {n}")
        if any(p.numel() != self.length for p in self.positions):
            raise ValueError("only an uncompressed cache (build_prefix(..., drop_unreachable=False)) can be truncated")
        cut = PrefixCache(tuple(k[:, :, :n] for k in self.keys), tuple(v[:, :, :n] for v in self.values),
                          tuple(p[:n] for p in self.positions), n, self.layer_types, self.windows)
        return cut.keep(range(n))


def build_prefix(model, input_ids: Sequence[int], hooks: Sequence = (), start: PrefixCache | None = None,
                 drop_unreachable: bool = True) -> PrefixCache:
    """Run the prefix once and keep every layer's keys and values (the one-off cost of a shared prefix).

    ``hooks``: :mod:`helpers.core.attention` hooks active while the prefix runs (batch of one, positions as in the full
    prompt), e.g. ``Isolate([label_positions], layers)``: every query answered from this cache then sees the
    intervened demonstrations, exactly as in a full forward pass with the same hook.

    ``start``: continue an uncompressed cache (``input_ids`` are the tokens after it; e.g. re-weighting's training
    example after the shared demonstrations). ``drop_unreachable=False`` keeps entries a sliding-window layer can no
    longer see (the masks exclude them anyway): then a key's column is its original position in every layer, which
    hooks that index keys by position (:class:`helpers.core.attention.Reweight`) rely on.
    """
    import contextlib

    from transformers import DynamicCache

    from .attention import intervene

    if len(input_ids) == 0:
        raise ValueError("the prefix is empty")
    types, windows = layer_windows(model)
    device = next(model.parameters()).device
    past = 0
    if start is not None:
        past = start.length
        if any(p.numel() != past or not torch.equal(p.cpu(), torch.arange(past)) for p in start.positions):
            raise ValueError("only an uncompressed cache (every position kept) can be continued")
        cache = DynamicCache([(k, v) for k, v in zip(start.keys, start.values)])  # DynamicCache.update never
        # writes into these tensors: it concatenates into new ones, so ``start`` stays as it was
    else:
        cache = DynamicCache()  # no config: plain DynamicLayer everywhere, so sliding-window layers keep every entry
    _check_positions(model, past + len(input_ids), "the prefix")
    ids = torch.tensor([list(input_ids)], device=device)
    position_ids = torch.arange(past, past + ids.shape[1], device=device)[None]
    with torch.no_grad(), (intervene(*hooks) if hooks else contextlib.nullcontext()):
        model.base_model(input_ids=ids, past_key_values=cache, use_cache=True, position_ids=position_ids)
    if len(cache.layers) != len(types):
        raise RuntimeError(f"the cache has {len(cache.layers)} layers, the model {len(types)}")
    n = past + len(input_ids)
    full = PrefixCache(
        tuple(layer.keys for layer in cache.layers),
        tuple(layer.values for layer in cache.layers),
        tuple(torch.arange(n, device=layer.keys.device) for layer in cache.layers),  # on each layer's device
        n,
        types,
        windows,
    )
    return full.keep(range(n)) if drop_unreachable else full  # keep(): drops what sliding windows can no longer see


def _output_device(model) -> torch.device:
    """Where the final hidden states are (:func:`helpers.core.prompts.output_device`)."""
    from .prompts import output_device

    return output_device(model)


def _masks(prefix: PrefixCache, valid: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Additive (B, 1, T, K + T) masks per layer type, from original positions (see the module docstring)."""
    b, t = valid.shape
    device = valid.device
    q_pos = prefix.length + torch.arange(t, device=device)
    out: dict[str, torch.Tensor] = {}
    for layer_type, window, positions in zip(prefix.layer_types, prefix.windows, prefix.positions):
        if layer_type in out:
            continue
        k_pos = torch.cat([positions.to(device), q_pos])
        allowed = k_pos[None, :] <= q_pos[:, None]  # (T, K+T): causal in original positions
        if window is not None:
            allowed &= (q_pos[:, None] - k_pos[None, :]) < window
        key_valid = torch.cat([torch.ones(b, positions.numel(), dtype=torch.bool, device=device), valid.bool()], 1)
        allowed = allowed[None, None] & key_valid[:, None, None, :]
        zero = torch.zeros((), dtype=dtype, device=device)
        out[layer_type] = torch.where(allowed, zero, torch.finfo(dtype).min)
    # every layer of one type must share its cached positions (one mask per type)
    for layer_type, positions in zip(prefix.layer_types, prefix.positions):
        if out[layer_type].shape[-1] != positions.numel() + t:
            raise ValueError("layers of the same attention type hold different positions; one mask per type needs one set")
    return out


def _check_positions(model, n: int, what: str) -> None:
    """``ValueError`` if ``n`` positions run past the model's context (GPT-2: a bare ``IndexError`` from torch; a
    RoPE model: garbage, extrapolated past its trained positions), as :func:`helpers.core.prompts.target_logits`."""
    from .prompts import model_context

    context = model_context(model)
    if context is not None and n > context:
        raise ValueError(f"{what}: {n} positions, more than the model's context of {context} tokens. Use fewer or "
                         "shorter demonstrations or queries")


def _suffix_inputs(model, prefix: PrefixCache, suffixes: Sequence[Sequence[int]], pad_id: int,
                   restart_positions: bool):
    """The right-padded ids, masks, position ids, expanded cache and last-token rows of a batch of suffixes."""
    from transformers import DynamicCache

    if not suffixes or any(len(s) == 0 for s in suffixes):
        raise ValueError("suffix_logits needs at least one suffix, and no empty suffix")
    device = next(model.parameters()).device
    b, t = len(suffixes), max(len(s) for s in suffixes)
    flat = [tok for s in suffixes for tok in list(s) + [pad_id] * (t - len(s))]
    ids = torch.tensor(flat, dtype=torch.long, device=device).view(b, t)
    lengths = torch.tensor([len(s) for s in suffixes], device=device)
    valid = torch.arange(t, device=device)[None, :] < lengths[:, None]
    start = 0 if restart_positions else prefix.length
    _check_positions(model, start + t, f"the prefix ({prefix.length} tokens) and the longest suffix ({t} tokens)")
    position_ids = (start + torch.arange(t, device=device))[None].expand(b, -1)
    dtype = next(model.parameters()).dtype
    masks = _masks(prefix, valid, dtype)
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "layer_types", None) is not None:
        attention_mask = masks
    else:
        if len(masks) != 1:
            raise NotImplementedError("a model with mixed layer types but no config.layer_types")
        attention_mask = next(iter(masks.values()))
    cache = DynamicCache(
        [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in zip(prefix.keys, prefix.values)]
    )
    return ids, attention_mask, position_ids, cache, lengths - 1


def _hidden_at(model, ids, attention_mask, position_ids, cache, last) -> torch.Tensor:
    """The final hidden states (after the final norm) at row ``last[b]`` of each example: (B, D), on the last
    layer's device (the first one's, or another where the model is split over devices)."""
    hidden = model.base_model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=cache, use_cache=cache is not None).last_hidden_state
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]


def suffix_hidden(model, prefix: PrefixCache, suffixes: Sequence[Sequence[int]], pad_id: int = 0,
                  restart_positions: bool = False) -> torch.Tensor:
    """The final hidden states at the last token of each suffix over the shared prefix cache: (B, D), as
    :func:`suffix_logits` computes them, before the output layer (:func:`output_logits`). Experiments that answer
    many batches collect these rows and send them through the output layer together: one large product instead of
    a memory-bound one per batch (Gemma's output layer has 262k rows).

    Used in: Shallow layers gather, deep layers extract: saliency and isolation; Anchor-only context compression.
    """
    ids, attention_mask, position_ids, cache, last = _suffix_inputs(model, prefix, suffixes, pad_id,
                                                                    restart_positions)
    return _hidden_at(model, ids, attention_mask, position_ids, cache, last)


def output_logits(model, hidden: torch.Tensor, rows_per_product: int = 512) -> torch.Tensor:
    """Full-vocabulary logits (N, V), float32, from final hidden states (N, D): the model's output layer (with its
    bias and final-logit soft-capping where it has them), on the output layer's device, in products of at most
    ``rows_per_product`` rows (memory: rows x V floats). Equal to the logits a forward pass returns (tested).

    Used in: Shallow layers gather, deep layers extract: saliency and isolation; Anchor-only context compression.
    """
    from .prompts import check_finite_logits

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"{cfg.model_type}: the output logits are scaled by {attr}")
    head = model.get_output_embeddings()
    cap = getattr(cfg, "final_logit_softcapping", None)
    out = []
    for start in range(0, hidden.shape[0], rows_per_product):
        logits = head(hidden[start : start + rows_per_product].to(head.weight.device))
        if cap:
            logits = torch.tanh(logits / cap) * cap
        out.append(check_finite_logits(logits.float(), model))
    if not out:
        return hidden.new_zeros((0, head.weight.shape[0]), dtype=torch.float32)
    return torch.cat(out)


def suffix_logits(
    model,
    prefix: PrefixCache,
    suffixes: Sequence[Sequence[int]],
    pad_id: int = 0,
    restart_positions: bool = False,
    label_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """Full-vocabulary next-token logits at the last token of each suffix, run as one right-padded batch over the
    shared prefix cache: (B, V); with ``label_ids``, only those words' logits, float32 (B, C)
    (:func:`helpers.core.prompts.label_head`: no full-vocabulary output layer).

    Position ids continue from ``prefix.length`` (or restart at 0 with ``restart_positions``, the official GPT-2
    quirk). The prefix cache is not modified. Hooks active around the call act on the suffix's rows (row r is the
    suffix's r-th token; its keys are the cached entries then the suffix, see :func:`key_positions`).
    """
    from .prompts import check_finite_logits, label_head

    ids, attention_mask, position_ids, cache, last = _suffix_inputs(model, prefix, suffixes, pad_id,
                                                                    restart_positions)
    device = ids.device
    b, t = ids.shape
    last = last[:, None]
    if label_ids is not None:
        rows = _hidden_at(model, ids, attention_mask, position_ids, cache, last[:, 0])
        return check_finite_logits(label_head(model, rows, label_ids), model)
    if _output_device(model) == device:
        out = model(
            input_ids=ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=last,
        )
        return check_finite_logits(out.logits[:, 0, :], model)
    # A model split over devices (device_map): its top-level hook moves every tensor argument to the first device,
    # but logits_to_keep indexes the final hidden states, on the last one. Keep the last k positions (an int, not
    # moved) and take each row's own.
    k = t - int(last.min())
    logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
                   use_cache=True, logits_to_keep=k).logits
    rows = (last[:, 0] - (t - k)).to(logits.device)
    return check_finite_logits(logits[torch.arange(b, device=logits.device), rows], model)


def key_positions(prefix: PrefixCache, layer: int, suffix_length: int) -> torch.Tensor:
    """The original position of every key column a suffix's attention has in ``layer``: the cached entries'
    positions, then N, N+1, ... for the suffix (T = ``suffix_length`` columns)."""
    p = prefix.positions[layer]
    return torch.cat([p.cpu(), prefix.length + torch.arange(suffix_length)])


def to_original_positions(prefix: PrefixCache, layer: int, rows: torch.Tensor, suffix_length: int) -> torch.Tensor:
    """Attention rows recorded over a suffix, (..., K_l + T), put at their original positions: (..., N + T).

    Entries the cache does not hold (dropped by compression or beyond a sliding window) get 0: the full prompt's
    attention there is 0 too (masked), or - for compression - there is nothing to attend to.
    """
    cols = key_positions(prefix, layer, suffix_length)
    if rows.shape[-1] != cols.numel():
        raise ValueError(f"rows have {rows.shape[-1]} key columns, layer {layer} of the cache + suffix has {cols.numel()}")
    out = rows.new_zeros(*rows.shape[:-1], prefix.length + suffix_length)
    out[..., cols.to(rows.device)] = rows
    return out


@dataclass(frozen=True)
class SharedPrefix:
    """A seed's prompts cut at the query: the demonstration tokens they share, and who shares them."""

    ids: tuple[int, ...]  # the shared demonstration tokens (prefix)
    shared: tuple[int, ...]  # indices of the prompts that start with exactly these tokens (run as suffixes)
    apart: tuple[int, ...]  # indices of the prompts that do not (run as full prompts): the fallback count

    def suffix(self, prompt) -> tuple[int, ...]:
        return tuple(prompt.input_ids[len(self.ids):])


def split_prompts(prompts: Sequence) -> SharedPrefix:
    """Cut prompts with one fixed demonstration set at the query (``Prompt.query_start``, from construction).

    The shared prefix is the most common demonstration-token sequence; prompts whose tokens before their query
    differ from it (as tokenised: a token can straddle the demonstration/query boundary) are listed in ``apart``.
    Each shared prompt's target lies in its suffix.
    """
    from collections import Counter

    if not prompts:
        raise ValueError("no prompts")
    heads = [tuple(p.input_ids[: p.query_start]) for p in prompts]
    ids, _ = Counter(heads).most_common(1)[0]
    shared = tuple(i for i, h in enumerate(heads) if h == ids and prompts[i].target >= len(ids))
    sharing = set(shared)
    apart = tuple(i for i in range(len(prompts)) if i not in sharing)
    if not ids:
        return SharedPrefix((), (), tuple(range(len(prompts))))
    return SharedPrefix(ids, shared, apart)


def shared_count(results) -> str:
    """``"1280 of 1280"``: how many examples of some runs' results (dicts with a ``shared_prefix`` flag per example)
    ran as suffixes over their seed's shared demonstrations; the others fell back to full prompts."""
    flags = [r["shared_prefix"] for r in results if r is not None and "shared_prefix" in r]
    if not flags:
        return "none recorded"
    total = sum(len(f) for f in flags)
    return f"{int(sum(int(f.sum()) for f in flags))} of {total}"
