"""Small conveniences for the chapters."""

from __future__ import annotations

import inspect


def glue(name: str, value, display: bool = False) -> None:
    """myst-nb's ``glue`` in the book build; a no-op where myst-nb is absent (e.g. Colab)."""
    try:
        from myst_nb import glue as _glue
    except ImportError:
        return
    _glue(name, value, display=display)


def show_source(obj) -> None:
    """Print the source of a helper, so a chapter shows the code it relies on."""
    from IPython.display import Markdown, display

    display(Markdown(f"```python\n{inspect.getsource(obj).rstrip()}\n```"))


# --------------------------------------------------------------------------------------------------------------------
# A model as a chapter uses it: cached facts, the weights only when something must be computed
# --------------------------------------------------------------------------------------------------------------------

FACTS = ("family", "n_layers", "n_heads", "n_kv_heads", "adds_bos", "max_length")


def _model_facts(lm) -> dict:
    """What the chapters read from a loaded model besides its weights: :func:`helpers.core.models.model_facts`, its
    global-attention layers and the attention settings the aggregation chapter prints."""
    from ..core.models import model_facts
    from .plots import global_layers

    return {**model_facts(lm.model, lm.tokenizer), "global_layers": global_layers(lm),
            **attention_settings(lm.model.config)}


def attention_settings(config) -> dict:
    """``{"sliding_window": int | None, "rope_theta": {attention kind: RoPE base}}`` read from a model's config.
    Used in: Aggregation."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = getattr(cfg, "rope_parameters", None) or {}
    thetas = {kind: float(p["rope_theta"]) for kind, p in rope.items()
              if isinstance(p, dict) and p.get("rope_theta") is not None}
    window = getattr(cfg, "sliding_window", None)
    return {"sliding_window": None if window is None else int(window), "rope_theta": thetas}


class PageModel:
    """A model as a chapter uses it: everything a cached result's key needs (name, identity, dtype, device) and the
    model's facts (layers, heads, global-attention layers, ...) without loading the weights; the weights load the
    first time something needs them (a result that is not cached, a tokenizer). The facts are a cached summary
    (:mod:`helpers.pages.summaries`), so a book built from committed results loads no model.

    A hub model is loaded at once: its identity is the commit the hub resolves. Used in: Aggregation, Extraction,
    Diagnosis, Compression."""

    def __init__(self, name: str, device=None):
        import torch

        from ..core.models import model_identity

        self.name = name
        self._device_arg = device
        self._lm = None
        self.identity = dict(model_identity(name))
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        if self.identity.get("kind") == "hub":
            self.identity = dict(self.loaded.identity)
        self._facts = None

    @property
    def loaded(self):
        """The :class:`~helpers.core.models.LoadedModel` (loaded on first use)."""
        if self._lm is None:
            from ..core.models import load_model

            self._lm = load_model(self.name, device=self._device_arg)
        return self._lm

    @property
    def device(self):
        return self._lm.device if self._lm is not None else self._device

    @property
    def dtype(self):
        import torch

        return self._lm.dtype if self._lm is not None else torch.float32

    @property
    def facts(self) -> dict:
        """:data:`FACTS`, ``global_layers``, ``sliding_window`` and ``rope_theta`` (per attention kind)."""
        if self._facts is None:
            from .summaries import summary

            self._facts = summary(f"models/{_safe(self.name)}", lambda: _model_facts(self.loaded),
                                  depends={"model": self.identity})
        return self._facts

    def __getattr__(self, attr):
        if attr.startswith("_"):
            raise AttributeError(attr)
        if attr in FACTS or attr in ("global_layers",):
            return self.facts[attr]
        return getattr(self.loaded, attr)  # model, tokenizer, ...: the weights are needed

    def __repr__(self) -> str:
        f = self.facts
        return (f"LoadedModel({self.name!r}, family={f['family']!r}, layers={f['n_layers']}, heads={f['n_heads']}, "
                f"kv_heads={f['n_kv_heads']}, adds_bos={f['adds_bos']}, max_length={f['max_length']})")


def page_model(name: str, device=None) -> PageModel:
    """The model ``name`` for a chapter (:class:`PageModel`). Used in: Aggregation, Extraction, Diagnosis,
    Compression."""
    return PageModel(name, device=device)


def _safe(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._+=-]+", "--", str(text)).strip("-") or "x"


def cached_prompts(lm, data, seed: int, n_test: int, shots_per_class: int = 1, per_example: bool = False) -> list:
    """:func:`helpers.core.runs.make_prompts`, stored as a summary keyed on the model and the data: a chapter that
    shows a prompt (its text, its tokens, its length) needs no tokenizer when the summary is stored. Used in:
    Extraction, Compression."""
    from ..core.runs import make_prompts
    from .summaries import summary

    if not _identity_of(lm):  # a bare tokenizer holder (a test): nothing to key a summary on
        return make_prompts(lm, data, seed, n_test, shots_per_class, per_example)
    name = (f"prompts/{_safe(lm.name)}/{data.task.name}/seed{seed}-n{n_test}-shots{shots_per_class}"
            f"{'-per-example' if per_example else ''}")
    return summary(name, lambda: make_prompts(lm, data, seed, n_test, shots_per_class, per_example),
                   depends={"model": dict(lm.identity), "data": data.fingerprint})


class TokenTable:
    """The tokens of a few ids, as a tokenizer gives them (``convert_ids_to_tokens``, ``decode`` of one id), read
    from a stored summary: what a figure's axis labels need, without the tokenizer. Used in: Aggregation,
    Compression."""

    def __init__(self, table: dict):
        self._tokens = dict(zip(table["ids"], table["tokens"]))
        self._decoded = dict(zip(table["ids"], table["decoded"]))

    def convert_ids_to_tokens(self, ids):
        return [self._tokens[int(i)] for i in ids]

    def decode(self, ids):
        return "".join(self._decoded[int(i)] for i in ids)


def token_table(lm, ids, label: str) -> TokenTable:
    """A :class:`TokenTable` for ``ids`` (any nested sequence of token ids) of ``lm``'s tokenizer, stored as the summary
    ``tokens/<model>/<label>``. Used in: Aggregation, Compression."""
    import numpy as np

    from .summaries import summary

    def flat(x):
        if isinstance(x, (list, tuple)) or (isinstance(x, np.ndarray) and x.dtype == object):
            for v in x:
                yield from flat(v)
        else:
            yield from np.asarray(x, dtype=np.int64).ravel().tolist()

    wanted = sorted(set(flat(ids)))

    def compute():
        tok = lm.tokenizer
        return {"ids": wanted, "tokens": [str(t) for t in tok.convert_ids_to_tokens(wanted)],
                "decoded": [tok.decode([i]) for i in wanted]}

    if not _identity_of(lm):
        return TokenTable(compute())
    return TokenTable(summary(f"tokens/{_safe(lm.name)}/{_safe(label)}", compute,
                              depends={"model": dict(lm.identity), "ids": wanted}))


def _identity_of(lm) -> dict:
    """A model's identity (what keys its stored summaries), or ``{}`` for an object without one."""
    return dict(getattr(lm, "identity", None) or {})
