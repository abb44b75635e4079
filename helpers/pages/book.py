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
