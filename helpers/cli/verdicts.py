"""A model's verdict table in the terminal (Markdown), from the results cache: the paper's battery on any model,
without building the book.

    python -m helpers.cli.compute all --model NAME     # fill the cache first (resumable)
    python -m helpers.cli.verdicts --model NAME         # then read the verdicts

A finding whose results are not cached for the model says "not yet run".
"""

from __future__ import annotations

import argparse

from ..core.models import DEFAULT_MODEL
from ..core.runs import PROFILES


def markdown(model: str, profile: str = "book") -> str:
    """The verdict rows for ``model`` as a Markdown table (finding, the paper, ours, n, verdict, rule)."""
    from ..pages.verdicts import verdict_rows

    lines = [f"Verdicts for {model} ({profile} profile)", "",
             "| finding | the paper | ours | n | verdict |", "| --- | --- | --- | --- | --- |"]
    for row in verdict_rows([model], profile):
        f = row["finding"]
        measured, verdict = row[model]
        ours = measured.text() if measured is not None else "—"
        n = measured.n if measured is not None else "—"
        cells = [f"{f.claim} ({f.where})", f.paper, ours, n, f"**{verdict}**"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m helpers.cli.verdicts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="an offline model name, a hub id or a local folder")
    p.add_argument("--profile", default="book", choices=sorted(PROFILES))
    args = p.parse_args(argv)
    print(markdown(args.model, args.profile))


if __name__ == "__main__":
    main()
