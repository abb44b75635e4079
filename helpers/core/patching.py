"""Activation patching: read a hidden state or one attention head's output from one run, write or add it in another.

Two kinds of site, at (layer, position), for every supported family (GPT-2, GPT-J, Llama, Qwen2, Gemma 3):

* ``"resid"`` - the residual stream **after** decoder layer ``layer`` (what the next layer receives; the
  ``hidden_states[layer + 1]`` of transformers, before any final norm);
* ``"head"`` - the output of attention head ``head`` of layer ``layer``: the per-head rows that the one attention
  function (:func:`helpers.core.attention.anchors_attention`) returns, as the attention's output projection receives
  them (before that projection mixes the heads). No new attention code: the value is the attention function's own
  output, and a head site also activates a no-op :class:`helpers.core.attention.Hook` on its layer, so a model that
  does not run the ``"anchors"`` attention is refused instead of patched silently.

Where these live is found once per family (:func:`decoder_layers`, :func:`attention_output_module`), beside what
:mod:`helpers.core.models` knows about the families. Operations::

    reads = [Read(layer, positions) for layer in range(lm.n_layers)]      # one position list per example
    with patch(lm.model, *reads):
        lm.model(input_ids=ids, attention_mask=mask)
    state = reads[5].value                                                 # (B, K, D), float32

    with patch(lm.model, Write(5, other_positions, state)):                # or Write(..., add=True)
        logits = lm.model(input_ids=other_ids, attention_mask=other_mask).logits

Positions are 0-based rows of the forward pass's input, one sequence per example (the same count K in every
example), taken from prompt construction (:class:`helpers.core.prompts.Prompt`: ``target``, ``label_spans``, ...),
never found by searching token ids. A block holds one forward pass: an operation that acts twice (a second pass, or
generation) raises, and so, when the block closes, does one that never acted (a layer the model does not have, a
model whose modules are not where its family keeps them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Iterator

import torch
from torch import nn

from .attention import Hook, intervene

__all__ = ["SITES", "Read", "Write", "patch", "decoder_layers", "attention_output_module", "head_size",
           "as_positions"]

SITES = ("resid", "head")

# Where each family keeps its decoder layers (under ``model.base_model``) and, in a layer, the attention's output
# projection (whose input is the attention function's output, heads side by side).
_LAYERS = {"gpt2": "h", "gptj": "h", "llama": "layers", "qwen2": "layers", "gemma3_text": "layers",
           "gemma3": "layers", "gemma2": "layers", "gemma": "layers", "mistral": "layers"}
_OUT_PROJ = {"gpt2": "attn.c_proj", "gptj": "attn.out_proj", "llama": "self_attn.o_proj",
             "qwen2": "self_attn.o_proj", "gemma3_text": "self_attn.o_proj", "gemma3": "self_attn.o_proj",
             "gemma2": "self_attn.o_proj", "gemma": "self_attn.o_proj", "mistral": "self_attn.o_proj"}


def _family(model) -> str:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return cfg.model_type


def decoder_layers(model) -> nn.ModuleList:
    """The model's decoder layers, in order (``transformer.h`` for GPT-2 and GPT-J, ``model.layers`` for Llama, Qwen2
    and Gemma). Used in: Where does the task live?"""
    family = _family(model)
    if family not in _LAYERS:
        raise NotImplementedError(f"activation patching does not know where {family!r} keeps its decoder layers "
                                  f"(supported: {', '.join(sorted(_LAYERS))})")
    layers = getattr(model.base_model, _LAYERS[family], None)
    if not isinstance(layers, nn.ModuleList):
        raise RuntimeError(f"{family}: expected the decoder layers at base_model.{_LAYERS[family]}")
    return layers


def attention_output_module(model, layer: int) -> nn.Module:
    """The output projection of layer ``layer``'s attention: its input is the attention function's output with the
    heads side by side, (B, T, H * head size). Used in: Where does the task live?"""
    module = decoder_layers(model)[layer]
    for name in _OUT_PROJ[_family(model)].split("."):
        module = getattr(module, name)
    return module


def head_size(model) -> int:
    """The size of one head's output (``head_dim``; hidden size / heads where the config has none)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    size = getattr(cfg, "head_dim", None)
    if size:
        return int(size)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    return int(hidden) // int(heads)


def as_positions(positions) -> torch.Tensor:
    """One sequence of positions per example -> a (B, K) LongTensor; one integer per example gives K = 1.

    Every example needs the same number of positions; positions are 0-based and never negative (a negative one
    would silently count from the end)."""
    if isinstance(positions, torch.Tensor):
        positions = positions.tolist()
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence) or len(positions) == 0:
        raise ValueError(f"positions must hold one position (or one sequence of positions) per example, got "
                         f"{positions!r}")
    rows = [[p] if not isinstance(p, (Sequence, torch.Tensor)) else list(p) for p in positions]
    if len({len(r) for r in rows}) != 1 or not rows[0]:
        raise ValueError(f"every example needs the same, non-zero number of positions; got {[len(r) for r in rows]}")
    for b, r in enumerate(rows):
        if any(isinstance(p, bool) or int(p) != p or p < 0 for p in r):
            raise ValueError(f"positions of example {b} must be integers >= 0, got {r!r}")
    return torch.tensor([[int(p) for p in r] for r in rows], dtype=torch.long)


class _Site:
    """A (layer, positions[, head]) site; subclasses read or write it."""

    def __init__(self, layer: int, positions, head: int | None = None):
        if isinstance(layer, bool) or int(layer) != layer or layer < 0:
            raise ValueError(f"layer must be an integer >= 0, got {layer!r}")
        self.layer = int(layer)
        self.positions = as_positions(positions)
        self.head = None if head is None else int(head)
        self.site = "resid" if head is None else "head"
        self.fired = 0

    def _index(self, x: torch.Tensor):
        """(batch rows, position rows) indexing x (B, T, ...), checked against the pass's shape."""
        b, t = x.shape[0], x.shape[1]
        if self.positions.shape[0] != b:
            raise ValueError(f"{self!r} has positions for {self.positions.shape[0]} examples, the batch has {b}")
        if int(self.positions.max()) >= t:
            raise ValueError(f"{self!r}: position {int(self.positions.max())} is beyond this forward pass's {t} "
                             "rows (positions are rows of the pass's input)")
        batch = torch.arange(b, device=x.device)[:, None]
        return batch, self.positions.to(x.device)

    def _mark(self) -> None:
        self.fired += 1
        if self.fired > 1:
            raise RuntimeError(f"{self!r} acted twice: run one forward pass per patch() block")

    def __repr__(self) -> str:
        where = f"layer {self.layer}" + ("" if self.head is None else f", head {self.head}")
        return f"{type(self).__name__}({self.site}, {where})"


class Read(_Site):
    """Keep the state at a site: after the pass, :attr:`value` is (B, K, D) float32, detached (D: the hidden size
    for ``"resid"``, the head size for a head)."""

    def __init__(self, layer: int, positions, head: int | None = None):
        super().__init__(layer, positions, head)
        self._value: torch.Tensor | None = None

    @property
    def value(self) -> torch.Tensor:
        if self._value is None:
            raise RuntimeError(f"{self!r} has not run: read .value after a forward pass inside patch()")
        return self._value

    def act(self, x: torch.Tensor) -> torch.Tensor:
        self._mark()
        batch, pos = self._index(x)
        self._value = x.detach()[batch, pos].float()
        return x


class Write(_Site):
    """Replace (or, with ``add``, add to) the state at a site with ``values`` (B, K, D) (or (B, D) for one position
    per example)."""

    def __init__(self, layer: int, positions, values: torch.Tensor, head: int | None = None, add: bool = False):
        super().__init__(layer, positions, head)
        values = torch.as_tensor(values)
        if values.ndim == 2:
            values = values[:, None]
        if values.ndim != 3 or tuple(values.shape[:2]) != tuple(self.positions.shape):
            raise ValueError(f"values must be (batch, positions, size) = ({self.positions.shape[0]}, "
                             f"{self.positions.shape[1]}, size), got {tuple(values.shape)}")
        if not torch.isfinite(values).all():
            raise ValueError("values to write hold NaN or infinite entries")
        self.values = values
        self.add = bool(add)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        self._mark()
        batch, pos = self._index(x)
        if self.values.shape[-1] != x.shape[-1]:
            raise ValueError(f"{self!r}: values of size {self.values.shape[-1]}, the site holds {x.shape[-1]}")
        v = self.values.to(x.device, x.dtype)
        x = x.clone()
        x[batch, pos] = x[batch, pos] + v if self.add else v
        return x


class _Through(Hook):
    """A no-op attention hook: the layer's attention must run the ``"anchors"`` function (checked by ``intervene``)."""


def _resid_hook(ops):
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        for op in ops:
            hidden = op.act(hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    return hook


def _head_hook(ops, size: int):
    def hook(module, args):
        x = args[0]
        b, t, width = x.shape
        heads = x.reshape(b, t, width // size, size)
        for op in ops:
            if op.head >= heads.shape[2]:
                raise ValueError(f"{op!r}: the layer has {heads.shape[2]} heads")
            view = heads[:, :, op.head]
            one = op.act(view)
            if one is not view:  # a write: put the head back among the others
                heads = heads.clone()
                heads[:, :, op.head] = one
        return (heads.reshape(b, t, width), *args[1:])
    return hook


@contextlib.contextmanager
def patch(model, *ops: _Site, strict: bool = True) -> Iterator[tuple[_Site, ...]]:
    """Activate reads and writes for the one forward pass run inside the block.

    Operations at one site act in the order given (a read listed before a write sees the unpatched state). With
    ``strict`` (the default), leaving the block raises ``RuntimeError`` naming every operation that never acted.
    Used in: Where does the task live?"""
    layers = decoder_layers(model)
    for op in ops:
        if not isinstance(op, _Site):
            raise TypeError(f"patch() takes Read and Write operations, got {type(op).__name__}")
        op.fired = 0
    handles = []
    size = head_size(model)
    try:
        by_layer: dict[tuple[str, int], list] = {}
        for op in ops:
            by_layer.setdefault((op.site, op.layer), []).append(op)
        for (site, layer), group in by_layer.items():
            if layer >= len(layers):
                continue  # never acts: reported below
            if site == "resid":
                handles.append(layers[layer].register_forward_hook(_resid_hook(group)))
            else:
                handles.append(attention_output_module(model, layer).register_forward_pre_hook(_head_hook(group, size)))
        head_layers = sorted({op.layer for op in ops if op.site == "head" and op.layer < len(layers)})
        through = [_Through(head_layers)] if head_layers else []
        with intervene(*through, strict=strict):
            yield ops
    finally:
        for h in handles:
            h.remove()
    if strict:
        idle = [op for op in ops if op.fired == 0]
        if idle:
            raise RuntimeError(f"{', '.join(map(repr, idle))} never acted: the model has {len(layers)} layers and no "
                               "forward pass ran through these sites inside the patch() block")
