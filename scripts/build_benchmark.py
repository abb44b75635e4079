"""How long the book takes to build from the committed results: ``make clean``, then ``make book``, timed.

    python scripts/build_benchmark.py                    # writes results/build-bench/book.json
    python scripts/build_benchmark.py --out OTHER.json   # somewhere else

Records the wall time of ``make book``, the CPU time of everything it ran (user + system, children included), the
machine's load average and core count before and after (a loaded machine builds slower: read the wall time beside
them), each page's execution time as the build log reports it, and how many stored page summaries the build read and how
many it had to compute (``make book`` reports them). A build that fails is reported, and nothing is written. This is a measurement, not a test: no
test reads the time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "build-bench" / "book.json"
TARGET_S = 60


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def page_times(log: str) -> dict[str, float]:
    """``{page: seconds}`` from myst-nb's "Executing notebook ..." / "Executed notebook in N seconds" log lines."""
    out, page = {}, None
    for line in log.splitlines():
        m = re.search(r"(book/[\w.-]+): Executing notebook", line)
        if m:
            page = m.group(1)
        m = re.search(r"(book/[\w.-]+)?:?\s*Executed notebook in ([0-9.]+) seconds", line)
        if m:
            out[m.group(1) or page or f"page {len(out) + 1}"] = float(m.group(2))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--make", default="make")
    args = p.parse_args(argv)

    subprocess.run([args.make, "clean"], cwd=ROOT, check=True)
    load_before = os.getloadavg()
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([args.make, "book"], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_after = os.getloadavg()
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        print(log[-4000:], file=sys.stderr)
        print(f"make book failed (exit {proc.returncode}) after {wall:.0f} s: nothing written", file=sys.stderr)
        return proc.returncode
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    result = {
        "what": "make clean; make book (from the committed results and summaries)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "target_s": TARGET_S,
        "cores": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "machine": platform.platform(),
        "python": platform.python_version(),
        "pages_s": page_times(log),
        "summaries": (re.findall(r"page summaries: .*", log) or ["not reported"])[-1],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
