"""Argument types the command-line entry points share: they refuse what an experiment cannot honour (a size of 0 or
-3 would otherwise mean "none" or "all but 3"), with a message argparse prints."""

from __future__ import annotations

import argparse

__all__ = ["positive_int", "device_name"]


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def device_name(text: str) -> str:
    """A device torch understands ("cpu", "cuda", "cuda:1", "mps")."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} ({err})") from None
    return text
