"""Helpers for the Anchors book: reproducing "Label Words are Anchors" (Wang et al., EMNLP 2023)."""

from .core.models import DEFAULT_MODEL, OFFLINE_MODELS, LoadedModel, load_model
from .core.tasks import TASKS, get_task, load_task

__all__ = ["DEFAULT_MODEL", "OFFLINE_MODELS", "LoadedModel", "load_model", "TASKS", "get_task", "load_task"]
__version__ = "0.1.0"
