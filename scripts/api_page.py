"""Write ``book/api.md``: one autodoc section per module of ``helpers``, layer by layer (run after adding a module;
``tests/test_architecture.py`` checks the page lists every module).

    python scripts/api_page.py
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": "The core", "experiments": "The experiments", "pages": "The book layer",
          "cli": "Command-line entry points"}
ORDER = {  # reading order inside a layer; modules not named here follow, alphabetically
    "core": ["attention", "models", "tasks", "prompts", "prefix", "saliency", "runs", "stats", "findings"],
    "experiments": ["protocol", "aggregation", "isolation", "extraction", "reweighting", "compression", "diagnosis",
                    "meaning", "tuning"],
    "pages": ["book", "plots", "verdicts", "scale", "aggregation", "extraction", "reweighting", "compression",
              "diagnosis", "meaning", "tuning", "api"],
    "cli": ["compute", "verdicts", "bench", "speed", "demo"],
}

INTRO = """# The `helpers` package

Every function a chapter calls, with the docstring that cites the paper's equation and a line naming the chapters
that use it. The package has four layers, each importing only from the ones below it: the core (attention hooks,
models, tasks, prompts, the shared prefix, the results cache, statistics), one module per experiment with one
shared protocol, the book layer (figures, tables, the verdict page) and the command-line entry points.
"""


def modules(layer: str) -> list[str]:
    found = sorted(p.stem for p in (ROOT / "helpers" / layer).glob("*.py") if p.stem != "__init__")
    return [m for m in ORDER[layer] if m in found] + [m for m in found if m not in ORDER[layer]]


def page() -> str:
    out = [INTRO]
    for layer, title in LAYERS.items():
        out += [f"## {title}", "```{eval-rst}", f".. automodule:: helpers.{layer}", "   :no-members:", "```", ""]
        for m in modules(layer):
            out += [f"### `helpers.{layer}.{m}`", "```{eval-rst}", f".. automodule:: helpers.{layer}.{m}",
                    "   :members:", "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    (ROOT / "book" / "api.md").write_text(page())
    print(f"wrote {ROOT / 'book' / 'api.md'}")
