"""What the benchmarks set each path beside (:mod:`helpers.cli.bench`, :mod:`helpers.cli.speed`): physical floors
(the FLOPs of a path's own work at this machine's matrix-product rate on the model's own weight shapes) and the
load-average check around every timed series.
"""

from __future__ import annotations

import os

import torch

__all__ = ["forward_flops", "head_flops", "GemmRate", "load_average", "timed_series"]




def _linears(module) -> list[tuple[int, int]]:
    """(in, out) of every matrix product of a module's linear layers (``nn.Linear`` and GPT-2's ``Conv1D``)."""
    out = []
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            out.append((m.in_features, m.out_features))
        elif type(m).__name__ == "Conv1D":
            out.append(tuple(m.weight.shape))  # Conv1D stores (in, out)
    return out


def forward_flops(model, new: int, past: int = 0, causal: bool = True, split: bool = False):
    """FLOPs of one sequence's forward pass through the decoder (no output layer): ``new`` tokens after ``past``
    cached ones. Linear layers 2 x tokens x weights; attention 2 x 2 x heads x head size per (query, visible key):
    with ``causal``, a token sees the keys up to itself (within a sliding window where a layer has one); without,
    every key of the pass, as an eager attention computes its masked scores. ``split``: (linear, attention)."""
    from ..core.prefix import layer_windows

    cfg = model.config.get_text_config(decoder=True)
    weights = sum(i * o for i, o in _linears(model.base_model))
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    try:
        windows = layer_windows(model)[1]
    except (NotImplementedError, AttributeError, TypeError):
        windows = (None,) * cfg.num_hidden_layers
    pairs = 0
    for w in windows:
        for j in range(new):
            seen = past + j + 1 if causal else past + new
            pairs += min(seen, w) if (w is not None and causal) else seen
    linear, attention = 2.0 * new * weights, 4.0 * heads * head_dim * pairs
    return (linear, attention) if split else linear + attention


def head_flops(model, rows: int) -> float:
    """FLOPs of the full-vocabulary output layer on ``rows`` hidden states."""
    head = model.get_output_embeddings()
    return 2.0 * rows * head.weight.numel()


class GemmRate:
    """This machine's matrix-product rate on the model's own shapes: every linear layer of the model (each as often
    as the model has it) and the output layer, each on ``rows`` rows, timed together as one round. A physical floor
    is a path's FLOPs divided by the rate of a round timed beside it (:meth:`floor_s`)."""

    def __init__(self, model, rows: int = 256):
        self.weights = []  # (out, in) views of the model's own weights: nothing copied
        for m in model.base_model.modules():
            if isinstance(m, torch.nn.Linear):
                self.weights.append(m.weight)
            elif type(m).__name__ == "Conv1D":
                self.weights.append(m.weight.T)
        self.weights.append(model.get_output_embeddings().weight)
        p = next(model.parameters())
        g = torch.Generator().manual_seed(0)
        widths = {w.shape[1] for w in self.weights}
        self.x = {i: torch.randn(rows, i, generator=g).to(p.device, p.dtype) for i in widths}
        self.flops = sum(2.0 * rows * w.numel() for w in self.weights)
        self.rows = rows

    def __call__(self) -> None:
        with torch.no_grad():
            for w in self.weights:
                torch.nn.functional.linear(self.x[w.shape[1]].to(w.device), w)

    def floor_s(self, flops: float, round_s: float) -> float:
        """Seconds ``flops`` take at the rate of a round that took ``round_s``."""
        return flops * round_s / self.flops


def load_average() -> float | None:
    """The 1-minute load average (None where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def timed_series(run_series, retries: int = 2, max_move: float = 1.0):
    """``run_series()`` with the load average read before and after; a series during which it moved by more than
    ``max_move`` is discarded and run again (at most ``retries`` times; the last one is kept and flagged). Returns
    the series' result and its record: loads before/after, attempts, discarded loads."""
    discarded = []
    for attempt in range(retries + 1):
        before = load_average()
        result = run_series()
        after = load_average()
        moved = None if before is None or after is None else abs(after - before)
        if moved is None or moved <= max_move:
            break
        discarded.append([before, after])
        print(f"  load moved {before:.2f} -> {after:.2f}: series discarded" +
              (", run again" if attempt < retries else ", kept (no retries left)"), flush=True)
    record = {"load_before": before, "load_after": after, "attempts": attempt + 1, "discarded_loads": discarded,
              "load_moved_more_than_max": moved is not None and moved > max_move}
    return result, record
