"""One attention function for every intervention the paper needs.

The function :func:`anchors_attention` is registered with transformers' ``AttentionInterface`` under the name
``"anchors"`` (and the eager causal-mask builder under the same name in ``AttentionMaskInterface``: without that
entry transformers silently builds no causal mask for an unknown implementation). It computes exactly what the
models' own eager attention computes::

    S = softcap(scaling * Q K^T) + mask          # pre-softmax scores, per head
    A = softmax(S)                               # post-softmax attention
    O = A V

and lets *hooks* act on S (before the softmax) and on A (after it). Hooks are switched on for the forward passes run
inside :func:`intervene`; outside it the function is plain eager attention. The hooks provided here are

* :class:`Record` - keep A (all rows, or chosen rows) per layer (paper §2.3);
* :class:`Isolate` - overwrite S[p, j<p] for chosen rows p with -1e4, as the official code does (§2.2);
* :class:`Reweight` - multiply A[q, p_i] by exp(beta[l, h, i]), learnable, no renormalisation (§3.1, Eq. 9);
* :class:`Saliency` - multiply A by a ones tensor P that requires grad: after ``backward``,
  dP = A ⊙ dL/dA, the saliency of Eq. 1 (§2.1);
* :class:`RecordQK` - keep the query vectors at chosen rows and the key vectors at chosen positions, as the
  attention receives them (after any rotary embedding and query/key norm, before scaling; keys *not* repeated for
  grouped-query attention) (§3.3). Hooks see Q and K through :meth:`Hook.qk`, called once per layer before the scores.

Grouped-query attention (fewer kv heads), the model's scaling, logit soft-capping and sliding windows (which live in
the mask) are honoured. GPT-J still calls its own ``_attn`` method instead of the interface; :func:`enable` replaces
that method on each GPT-J attention module with a two-line adapter to the same function.

Every hook records which layers it acted on, and :func:`intervene` raises if a hook never ran: an intervention that
silently does nothing (the official code's fate on newer transformers) cannot go unnoticed here.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NAME",
    "register",
    "enable",
    "anchors_attention",
    "intervene",
    "Hook",
    "Record",
    "Isolate",
    "Reweight",
    "Saliency",
    "RecordQK",
]

NAME = "anchors"

_ACTIVE: contextvars.ContextVar[tuple["Hook", ...]] = contextvars.ContextVar("anchors_hooks", default=())


# --------------------------------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------------------------------


def anchors_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with hook points before and after the softmax.

    Shapes follow transformers' attention interface: ``query`` (B, H, T, D), ``key``/``value`` (B, H_kv, S, D),
    ``attention_mask`` additive (B, 1, T, S). Returns the output (B, T, H, D) and the attention (B, H, T, S).
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not supported by the 'anchors' attention")
    layer = getattr(module, "layer_idx", None)
    hooks = _ACTIVE.get()
    for hook in hooks:
        hook.begin(layer, attention_mask)  # which layers ran, and each prompt's real length (padding excluded)
    for hook in hooks:
        if hook.acts_on(layer):
            hook.qk(layer, query, key)  # before the kv heads are repeated: key has H_kv heads
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: repeat each kv head for its query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5

    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]

    for hook in hooks:
        if hook.acts_on(layer):
            scores = hook.pre_softmax(layer, scores)

    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)

    for hook in hooks:
        if hook.acts_on(layer):
            probs = hook.post_softmax(layer, probs)
            hook.seen.add(layer)

    for hook in hooks:
        hook.end()
    probs_used = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs_used, value).transpose(1, 2).contiguous()
    return out, probs


def _gptj_attn(self, query, key, value, attention_mask=None):
    """Adapter for GPT-J, whose attention calls ``self._attn`` (B, H, T, D) instead of the interface."""
    out, probs = anchors_attention(
        self,
        query.to(torch.float32),  # as GPT-J's own _attn: scores in float32
        key.to(torch.float32),
        value,
        attention_mask,
        scaling=1.0 / float(self.scale_attn),
        dropout=self.attn_dropout.p,
    )
    return out.transpose(1, 2), probs


def register() -> None:
    """Register ``"anchors"`` with transformers' attention and attention-mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, anchors_attention)
    AttentionMaskInterface.register(NAME, eager_mask)


def enable(model: nn.Module, implementation: str = NAME) -> nn.Module:
    """Switch a loaded model to the ``"anchors"`` attention (or back to ``"eager"``). Returns the model."""
    if implementation not in (NAME, "eager"):
        raise ValueError(f"implementation must be {NAME!r} or 'eager', not {implementation!r}")
    register()
    if getattr(model.config, "model_type", None) == "gptj":
        from transformers.models.gptj.modeling_gptj import GPTJAttention

        for sub in model.modules():
            if isinstance(sub, GPTJAttention):
                if implementation == NAME:
                    sub._attn = types.MethodType(_gptj_attn, sub)
                elif "_attn" in vars(sub):
                    del sub._attn
        return model
    model.set_attn_implementation(implementation)
    return model


# --------------------------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------------------------


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` of per-layer tensors, each moved to the first one's device (a no-op on one device)."""
    if not tensors:
        return torch.stack(tensors)  # torch's own error
    device = tensors[0].device
    return torch.stack([t.to(device) for t in tensors])


def _check_layers(layers) -> frozenset[int] | None:
    if layers is None:
        return None
    out = []
    for x in layers:
        if isinstance(x, bool) or int(x) != x:
            raise ValueError(f"layers must be integer layer indices, got {x!r}")
        if x < 0:
            raise ValueError(
                f"layer {x}: layers are 0-based indices (the first is 0, the last is n_layers - 1, e.g. "
                "lm.n_layers - 1); a negative index does not count from the end here")
        out.append(int(x))
    return frozenset(out)


def key_lengths(attention_mask: torch.Tensor | None, batch: int, keys: int) -> list[int]:
    """Each example's real number of key columns in a forward pass: one past its last key that some query row may
    attend to (right padding, which no row attends to, is excluded; a KV cache's entries count). ``keys`` for every
    example when there is no mask."""
    if attention_mask is None:
        return [keys] * batch
    m = attention_mask[:, 0, :, :keys]
    allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    seen = allowed.any(dim=1)  # (B or 1, S)
    last = keys - seen.flip(-1).to(torch.int8).argmax(-1)
    lengths = torch.where(seen.any(-1), last, torch.zeros_like(last)).tolist()
    return lengths * batch if len(lengths) == 1 else lengths


class Hook:
    """Base class: acts on the layers in ``layers`` (``None`` = every layer; 0-based, never negative). Subclasses
    override one method.

    Positions and rows a hook is given are checked against each prompt's **real** length (the padded batch's
    right padding excluded, read from the attention mask): a position in a shorter prompt's padding is an error,
    not an intervention that changes nothing."""

    def __init__(self, layers: Iterable[int] | None = None):
        self.layers = _check_layers(layers)
        self.seen: set[int] = set()
        self.ran: set = set()  # every layer the attention ran on while the hook was active
        self._attention_mask = None
        self._lengths: list[int] | None = None

    def acts_on(self, layer: int | None) -> bool:
        return self.layers is None or layer in self.layers

    def begin(self, layer: int | None, attention_mask: torch.Tensor | None) -> None:
        """Called by the attention function for every layer while the hook is active, before anything else."""
        self.ran.add(layer)
        self._attention_mask = attention_mask if self.acts_on(layer) else None
        self._lengths = None

    def end(self) -> None:
        self._attention_mask = None
        self._lengths = None

    def real_rows(self, batch: int, rows: int, keys: int) -> list[int]:
        """Each example's number of real query rows in the layer running now (rows of right padding excluded):
        its real key count less the keys before the first query row (a KV cache)."""
        if self._lengths is None:
            self._lengths = key_lengths(self._attention_mask, batch, keys)
        offset = keys - rows
        return [max(0, min(rows, n - offset)) for n in self._lengths]

    def qk(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        """See the query (B, H, T, D) and the un-repeated key (B, H_kv, S, D) of a layer, before the scores."""

    def pre_softmax(self, layer: int, scores: torch.Tensor) -> torch.Tensor:
        return scores

    def post_softmax(self, layer: int, probs: torch.Tensor) -> torch.Tensor:
        return probs


def _resolve_rows(name: str, rows: list[list[int]], real: list[int], padded: int) -> list[list[int]]:
    """Rows per example with negative ones counted from each prompt's own last real token (-1 is its last token,
    not the batch's last padded row); ``ValueError`` for a row outside the prompt."""
    out = []
    for b, (wanted, n) in enumerate(zip(rows, real)):
        resolved = []
        for r in wanted:
            q = r + n if r < 0 else r
            if not 0 <= q < n:
                where = "in its right padding" if n <= q < padded else "beyond the sequence"
                raise ValueError(
                    f"{name}: row {r} of example {b} is {where}: that prompt has {n} real tokens (rows 0-{n - 1}, or "
                    f"-1 for its last), the batch is padded to {padded}")
            resolved.append(q)
        out.append(resolved)
    return out


def _rows_per_example(rows, batch: int, name: str) -> list[list[int]]:
    """``rows`` (an int, a sequence, a (B,) or (B, K) tensor) as K rows for each of the ``batch`` examples."""
    if isinstance(rows, int):
        return [[rows]] * batch
    t = torch.as_tensor(rows)
    if t.ndim == 1 and t.numel() == batch:
        t = t[:, None]
    elif t.ndim == 1:
        t = t[None].expand(batch, -1)
    if t.ndim != 2 or t.shape[0] != batch:
        raise ValueError(f"{name}: rows of shape {tuple(torch.as_tensor(rows).shape)} for a batch of {batch}")
    return t.tolist()


class Record(Hook):
    """Keep the post-softmax attention of each layer, detached.

    ``rows``: optional query rows to keep, giving (B, H, K, S) per layer instead of (B, H, T, S) (much less memory
    for long prompts and big models): a LongTensor (B,) or (B, K) (one row, or K rows, per example), or an int or a
    list of ints for the same rows in every example. A negative row counts from each prompt's **own** last real
    token (``rows=-1`` is every prompt's last token, never a shorter prompt's padding); a row beyond a prompt's real
    tokens is an error.
    """

    def __init__(self, layers: Iterable[int] | None = None, rows=None):
        super().__init__(layers)
        if isinstance(rows, torch.Tensor) and rows.ndim not in (1, 2):
            raise ValueError(f"Record rows must be (B,) or (B, K), got shape {tuple(rows.shape)}")
        if rows is not None and not isinstance(rows, (int, torch.Tensor, Sequence)) or isinstance(rows, bool):
            raise ValueError(f"Record rows must be an int, a list of ints or a LongTensor, got {rows!r}")
        self.rows = rows
        self.attentions: dict[int, torch.Tensor] = {}

    def post_softmax(self, layer, probs):
        kept = probs.detach()
        if self.rows is not None:
            b, _, t, s = probs.shape
            wanted = _rows_per_example(self.rows, b, "Record")
            rows = torch.tensor(_resolve_rows("Record", wanted, self.real_rows(b, t, s), t), device=probs.device)
            batch = torch.arange(b, device=probs.device)[:, None]
            kept = kept[batch, :, rows].permute(0, 2, 1, 3)  # (B, K, H, S) -> (B, H, K, S)
        self.attentions[layer] = kept
        return probs

    def stacked(self) -> torch.Tensor:
        """All recorded layers in order, stacked: (L, B, H, T or K, S), on the first layer's device (layers on other
        devices, a model split over several, are moved there)."""
        return _stack([self.attentions[k] for k in sorted(self.attentions)])


PositionsPerExample = Sequence[Sequence[int]]


def _per_example(positions) -> tuple[tuple[int, ...], ...]:
    """Check and normalise "one sequence of positions per example"; positions are 0-based and never negative."""
    if isinstance(positions, torch.Tensor):
        positions = positions.tolist()
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence) or any(
        not isinstance(rows, (Sequence, torch.Tensor)) or isinstance(rows, (str, bytes)) for rows in positions
    ):
        raise ValueError(
            f"positions must hold one sequence of positions per example, e.g. [[3, 5]] for one example, "
            f"got {positions!r}"
        )
    out = []
    for b, rows in enumerate(positions):
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else rows
        if any(isinstance(p, bool) or int(p) != p for p in rows):
            raise ValueError(f"positions of example {b} must be integers, got {list(rows)!r}")
        if any(p < 0 for p in rows):
            raise ValueError(
                f"negative position in example {b}: {list(rows)!r}; positions are 0-based token indices "
                "(a negative one would silently count from the end)"
            )
        out.append(tuple(int(p) for p in rows))
    return tuple(out)


class Isolate(Hook):
    """Cut the information flow into chosen positions (paper §2.2, ``attentioner.py`` of the official code).

    For every chosen position p of example b, the pre-softmax scores S[b, :, p, j] for all earlier keys j < p are
    overwritten with ``fill`` (-1e4 as the official code), in every head of the chosen layers. After the softmax the
    token attends (almost) only to itself, so nothing from the context reaches it in those layers.

    ``positions``: one list of positions per example (the same in every layer), or a mapping ``{layer: that}`` to
    isolate different positions in different layers (the random control redraws per layer).
    """

    def __init__(
        self,
        positions: PositionsPerExample | Mapping[int, PositionsPerExample],
        layers: Iterable[int] | None = None,
        fill: float = -1e4,
    ):
        if isinstance(positions, Mapping):
            self.by_layer = {int(k): _per_example(v) for k, v in positions.items()}
            layers = self.by_layer.keys() if layers is None else layers
        else:
            if layers is None:
                raise ValueError("Isolate needs the layers to act on")
            checked = _per_example(positions)
            self.by_layer = {int(k): checked for k in layers}
        super().__init__(layers)
        self.fill = fill
        self._masks: dict[tuple, torch.Tensor] = {}

    def _mask(self, layer: int, shape: torch.Size, device) -> torch.Tensor:
        batch, _, t, s = shape
        key = (layer, batch, t, s, str(device))
        if key not in self._masks:
            positions = self.by_layer[layer]
            if len(positions) != batch:
                raise ValueError(f"Isolate got positions for {len(positions)} examples, the batch has {batch}")
            mask = torch.zeros(batch, 1, t, s, dtype=torch.bool)
            offset = s - t  # keys before the first query row (a KV cache); 0 for a plain forward pass
            for b, rows in enumerate(positions):
                for p in rows:
                    if p >= t:
                        raise ValueError(f"Isolate: position {p} of example {b} is beyond the sequence ({t} tokens)")
                    mask[b, 0, p, : p + offset] = True
            self._masks[key] = mask.to(device)
        return self._masks[key]

    def _check_real(self, layer: int, shape: torch.Size) -> None:
        batch, _, t, s = shape
        real = self.real_rows(batch, t, s)
        for b, (rows, n) in enumerate(zip(self.by_layer[layer], real)):
            bad = sorted(p for p in rows if n <= p < t)
            if bad:
                raise ValueError(
                    f"Isolate: positions {bad} of example {b} are in its right padding: that prompt has {n} real "
                    f"tokens (positions 0-{n - 1}), the batch is padded to {t}; isolating padding changes nothing")

    def pre_softmax(self, layer, scores):
        mask = self._mask(layer, scores.shape, scores.device)
        self._check_real(layer, scores.shape)
        return scores.masked_fill(mask, self.fill)


class Reweight(Hook):
    """Anchor re-weighting (paper §3.1, Eq. 9/12): A[q, p_i] <- exp(beta[l, h, i]) * A[q, p_i], post-softmax.

    ``beta``: a parameter (L, H, C), initialised to 0 so that the model starts unchanged; H counts *query* heads
    (with grouped-query attention each query head has its own beta). ``target``: LongTensor (B,) of target
    positions q. ``label_positions``: LongTensor (B, C), the position of class i's label word in each example (one
    demonstration per class), or (B, C, K) for K demonstrations per class: then all K label words of class i share
    the one multiplier exp(beta[l, h, i]) (so the number of parameters does not grow with the shots). Positions are
    absolute token positions; the hook also works for a forward pass that continues a KV cache (the query rows are
    then the last T of the S keys, as in :class:`Isolate`). No renormalisation, as in the paper and the official code.
    """

    def __init__(self, beta: torch.Tensor, target: torch.Tensor, label_positions: torch.Tensor):
        super().__init__(range(beta.shape[0]))
        if beta.ndim != 3:
            raise ValueError(f"beta must be (layers, heads, classes), got shape {tuple(beta.shape)}")
        if label_positions.ndim == 2:
            label_positions = label_positions[:, :, None]
        if label_positions.ndim != 3 or label_positions.shape[1] != beta.shape[2]:
            raise ValueError(
                f"label_positions must be (batch, {beta.shape[2]}) or (batch, {beta.shape[2]}, shots) for beta of "
                f"shape {tuple(beta.shape)}, got {tuple(label_positions.shape)}"
            )
        if target.shape != (label_positions.shape[0],):
            raise ValueError(
                f"target must be (batch,) = ({label_positions.shape[0]},) like label_positions, "
                f"got {tuple(target.shape)}"
            )
        flat = label_positions.reshape(label_positions.shape[0], -1)
        if any(len(set(row.tolist())) != len(row) for row in flat):
            raise ValueError("label_positions repeat a position within an example")
        if (flat >= target[:, None]).any() or (flat < 0).any():
            raise ValueError("every re-weighted position must lie before the target q")
        self.beta = beta
        self.target = target
        self.label_positions = label_positions

    def acts_on(self, layer):
        return True  # every layer: a layer beyond beta's must raise, not pass through unchanged

    def post_softmax(self, layer, probs):
        b, h, t, s = probs.shape
        if layer is None or layer >= self.beta.shape[0]:
            raise ValueError(
                f"beta has {self.beta.shape[0]} layers, the model has more (layer {layer}): "
                "one row of beta per layer of the model"
            )
        if h != self.beta.shape[1]:
            raise ValueError(f"beta has {self.beta.shape[1]} heads, layer {layer} has {h}")
        if b != self.target.shape[0]:
            raise ValueError(f"Reweight was built for a batch of {self.target.shape[0]} examples, the batch has {b}")
        shots = self.label_positions.shape[2]
        batch = torch.arange(b, device=probs.device)[:, None]  # (B, 1)
        rows = self.target.to(probs.device)[:, None] - (s - t)  # (B, 1): the target's row among the query rows
        if (rows < 0).any() or (rows >= t).any():
            raise ValueError("the target q is not among this forward pass's query rows")
        cols = self.label_positions.to(probs.device).reshape(b, -1)  # (B, C*K), class-major
        scale = torch.exp(self.beta[layer]).to(probs.device, probs.dtype).T.repeat_interleave(shots, dim=0)  # (C*K, H)
        probs = probs.clone()
        probs[batch, :, rows, cols] = probs[batch, :, rows, cols] * scale  # indexed as (B, C*K, H)
        return probs


class Saliency(Hook):
    """Expose A ⊙ dL/dA (paper Eq. 1) by multiplying A with ones that require grad (the official trick).

    Run the forward pass inside :func:`intervene`, compute a loss, call ``loss.backward()``, then
    :meth:`per_layer` gives, for each layer, the (B, H, T, S) gradient of the loss with respect to the ones, which
    equals A ⊙ dL/dA evaluated at the unmodified attention.
    """

    def __init__(self, layers: Iterable[int] | None = None):
        super().__init__(layers)
        self.ones: dict[int, torch.Tensor] = {}

    def post_softmax(self, layer, probs):
        ones = torch.ones_like(probs, requires_grad=True)
        self.ones[layer] = ones
        return probs * ones

    def per_layer(self) -> torch.Tensor:
        """(L, B, H, T, S): A ⊙ dL/dA for every hooked layer, in layer order."""
        missing = [k for k, v in self.ones.items() if v.grad is None]
        if missing or not self.ones:
            raise RuntimeError("no gradient reached the attention: call loss.backward() after the forward pass")
        return _stack([self.ones[k].grad for k in sorted(self.ones)])  # on the first hooked layer's device


class RecordQK(Hook):
    """Keep, per layer, the query vectors at rows ``rows`` and the key vectors at positions ``key_positions``.

    What is kept is exactly what the attention function receives: after the model's query/key norms and rotary
    embedding (where the model has them), before the scaling; keys with the model's H_kv key heads, not repeated
    for grouped-query attention. ``rows``: LongTensor (B,) (e.g. the target q of each prompt); ``key_positions``:
    LongTensor (B, K) (e.g. the label-word positions). After the forward pass, :attr:`queries` maps each layer to a
    float32 (B, H, D) tensor and :attr:`keys` to a float32 (B, K, H_kv, D) tensor.
    """

    def __init__(self, rows: torch.Tensor, key_positions: torch.Tensor, layers: Iterable[int] | None = None):
        super().__init__(layers)
        if rows.ndim != 1 or key_positions.ndim != 2 or key_positions.shape[0] != rows.shape[0]:
            raise ValueError(
                f"RecordQK needs rows (B,) and key_positions (B, K); got {tuple(rows.shape)} and "
                f"{tuple(key_positions.shape)}"
            )
        self.rows = rows
        self.key_positions = key_positions
        self.queries: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}

    def qk(self, layer, query, key):
        b, t, s = query.shape[0], query.shape[2], key.shape[2]
        if self.rows.shape[0] != b:
            raise ValueError(f"RecordQK was built for a batch of {self.rows.shape[0]} examples, the batch has {b}")
        real = self.real_rows(b, t, s)
        resolved = _resolve_rows("RecordQK", [[r] for r in self.rows.tolist()], real, t)
        offset = s - t
        for i, (cols, n) in enumerate(zip(self.key_positions.tolist(), real)):
            bad = [c for c in cols if not 0 <= c < n + offset]
            if bad:
                where = "beyond the sequence" if any(c >= s or c < 0 for c in bad) else "in its right padding"
                raise ValueError(f"RecordQK: key positions {bad} of example {i} are {where}: that prompt has "
                                 f"{n + offset} real keys (positions 0-{n + offset - 1}), the batch has {s}")
        batch = torch.arange(b, device=query.device)
        rows = torch.tensor([r[0] for r in resolved], device=query.device)
        self.queries[layer] = query.detach()[batch, :, rows, :].float().cpu()  # (B, H, D)
        cols = self.key_positions.to(key.device)
        self.keys[layer] = key.detach()[batch.to(key.device)[:, None], :, cols, :].float().cpu()  # (B, K, H_kv, D)

    def post_softmax(self, layer, probs):  # marks the layer as seen; nothing to change
        return probs


@contextlib.contextmanager
def intervene(*hooks: Hook, strict: bool = True) -> Iterator[tuple[Hook, ...]]:
    """Activate hooks for the forward passes run inside the block.

    With ``strict`` (the default), leaving the block raises ``RuntimeError`` if a hook never acted on a layer it was
    meant for: the model does not run the ``"anchors"`` attention (load it with :func:`helpers.core.models.load_model`,
    or call :func:`enable`).
    """
    for hook in hooks:
        hook.seen = set()
        hook.ran = set()
    token = _ACTIVE.set(_ACTIVE.get() + tuple(hooks))
    try:
        yield hooks
    finally:
        _ACTIVE.reset(token)
    if strict:
        for hook in hooks:
            ran = sorted(x for x in hook.ran if x is not None)
            if hook.layers is not None and ran and not hook.layers <= hook.seen:
                missing = sorted(hook.layers - hook.seen)
                beyond = [x for x in missing if x > ran[-1]]
                why = (f"the model has {ran[-1] + 1} layers (0-{ran[-1]})" if beyond else
                       f"the forward passes ran layers {ran[0]}-{ran[-1]} only")
                raise RuntimeError(f"{type(hook).__name__} did not reach layers {missing}: {why}. Pass layers "
                                   "between 0 and lm.n_layers - 1 (the attention ran, so the hooks are installed).")
            if not hook.seen:
                raise RuntimeError(
                    f"{type(hook).__name__} never ran: the model does not use the '{NAME}' attention. "
                    "Load it with helpers.load_model or call helpers.core.attention.enable(model)."
                )
            if hook.layers is not None and not hook.layers <= hook.seen:
                raise RuntimeError(
                    f"{type(hook).__name__} did not reach layers {sorted(hook.layers - hook.seen)} "
                    "(the model has fewer layers?)"
                )
