"""The values a built book glues into its pages, to compare two builds ("the rebuilt book is identical in its
numbers").

    python scripts/glued_values.py                       # write tests/data/glued_values.json from _build
    python scripts/glued_values.py --compare OTHER.json  # list the values that differ from OTHER.json
    python scripts/glued_values.py --notebook book/tuning.ipynb --compare OTHER.json  # run one chapter, compare it

Reads ``_build/jupyter_execute/**/*.glue.json`` (myst-nb's record of every ``glue``): each value's text form
(``text/plain``, or ``text/html`` for tables). Figures are recorded by their text form only (their size and number of
axes), not their pixels. The verdict page's table (an HTML output, not a glue) is recorded as ``verdicts:table``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "glued_values.json"
VOLATILE = {"intro:build_date", "intro:build_commit"}  # what changes with every build, not with the results


def glued_values(build: Path = ROOT / "_build") -> dict[str, str]:
    """``{"page:name": text}`` for every glued value of a built book."""
    out = {}
    execute = Path(build) / "jupyter_execute"
    for f in sorted(execute.rglob("*.glue.json")):
        page = f.name.removesuffix(".glue.json")
        for name, output in json.loads(f.read_text()).items():
            if f"{page}:{name}" not in VOLATILE:
                out[f"{page}:{name}"] = _text(output)
    verdicts = execute / "book" / "verdicts.ipynb"
    if verdicts.is_file():
        for cell in json.loads(verdicts.read_text())["cells"]:
            for o in cell.get("outputs", []):
                html = o.get("data", {}).get("text/html")
                if html and 'class="verdicts"' in "".join(html):
                    out["verdicts:table"] = "".join(html)
    return out


def _text(output: dict) -> str:
    prefix = output.get("metadata", {}).get("scrapbook", {}).get("mime_prefix", "")
    data = {k.removeprefix(prefix): v for k, v in output.get("data", {}).items()}
    html = "".join(data.get("text/html", "")) if isinstance(data.get("text/html"), list) else data.get("text/html", "")
    text = html if ("text/plain" not in data or "<table" in str(html)) else data["text/plain"]
    text = "".join(text) if isinstance(text, list) else str(text)
    return re.sub(r"\bT_[0-9a-f]{5}(?=[_\"])", "T_", text)  # a pandas Styler's random table id


def notebook_values(notebook: Path, timeout: int = 1800) -> dict[str, str]:
    """Execute one chapter (in its folder, as the book build does) and return its glued values, keyed as
    :func:`glued_values` keys them."""
    import nbformat
    from nbclient import NotebookClient

    notebook = Path(notebook).resolve()
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(notebook.parent)}}).execute()
    out = {}
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            name = o.get("metadata", {}).get("scrapbook", {}).get("name")
            if name and f"{notebook.stem}:{name}" not in VOLATILE:
                out[f"{notebook.stem}:{name}"] = _text(o)
    return out


# Values at the floor of double precision, which differ between CPUs for the same results: how many L-BFGS fits got
# their largest gradient component below 1e-9, and the largest one left (e.g. "18 of 24" and 1.2e-08 on one CPU, "21
# of 24" and 3.5e-08 on another). Only their form is compared.
VARIES_BY_CPU = {"reweighting:fit_rule_met": r"'\d+ of \d+'", "reweighting:fit_grad_worst": r"'\d\.\de-\d\d'"}


def differences(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """One line per glued value that is missing from one side or differs (a value of :data:`VARIES_BY_CPU` only
    when its form differs)."""
    lines = []
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            lines.append(f"{key}: only in {'the first' if key in a else 'the second'}")
        elif key in VARIES_BY_CPU:
            if not all(re.fullmatch(VARIES_BY_CPU[key], v) for v in (a[key], b[key])):
                lines.append(f"{key}: {a[key]!r} or {b[key]!r} is not of the form {VARIES_BY_CPU[key]}")
        elif a[key] != b[key]:
            lines.append(f"{key}: {a[key][:120]!r} != {b[key][:120]!r}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", type=Path, default=ROOT / "_build")
    p.add_argument("--compare", type=Path, default=None, help="a JSON written by this script")
    p.add_argument("--out", type=Path, default=REFERENCE)
    p.add_argument("--notebook", type=Path, default=None, help="execute this chapter and compare only its values")
    args = p.parse_args(argv)
    values = notebook_values(args.notebook) if args.notebook else glued_values(args.build)
    if not values:
        print(f"no glued values under {args.build}/jupyter_execute: build the book first (make book)", file=sys.stderr)
        return 2
    if args.compare:
        other = json.loads(args.compare.read_text())
        if args.notebook:  # only this chapter's values
            other = {k: v for k, v in other.items() if k.split(":", 1)[0] == args.notebook.stem}
        diff = differences(other, values)
        print("\n".join(diff) or f"all {len(values)} glued values are identical")
        return 1 if diff else 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(values, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    print(f"{len(values)} glued values written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
