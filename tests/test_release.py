"""What a release carries: one version everywhere, a citation, and a workflow that builds and checks the book."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_one_version_in_the_package_the_citation_and_the_changelog():
    import helpers

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert helpers.__version__ == version
    assert yaml.safe_load((ROOT / "CITATION.cff").read_text())["version"] == version
    assert re.search(rf"^## {re.escape(version)}\b", (ROOT / "CHANGELOG.md").read_text(), re.M)


def test_the_workflow_builds_from_committed_results_checks_and_deploys_main_only():
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    build = wf["jobs"]["build"]
    assert build["env"]["ANCHORS_REQUIRE_CACHED"] == "1"
    runs = [s.get("run") for s in build["steps"] if "run" in s]
    assert runs[-2:] == ["make book", "make book-check"] and "make setup" in runs
    deploy = wf["jobs"]["deploy"]
    assert "refs/heads/main" in deploy["if"] and deploy["needs"] == "build"
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["repository-code"] == yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]


def test_every_folder_of_data_files_is_a_listed_package():
    """Each results sub-folder (and helpers/core/data) is in pyproject's ``packages``, so an install ships it and
    setuptools warns about no unlisted package; a new results folder must be added there."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    assert setup["package-dir"]["helpers._results"] == "results"
    folders = {f"helpers._results.{p.name}" for p in (ROOT / "results").iterdir()
               if p.is_dir() and any(p.glob("*.json"))}
    assert folders - listed == set(), "add these results folders to [tool.setuptools] packages in pyproject.toml"
    assert "helpers.core.data" in listed and "helpers.core.data" in setup["package-data"]
    stale = {p for p in listed if p.startswith("helpers._results.")
             and not (ROOT / "results" / p.removeprefix("helpers._results.")).is_dir()}
    assert not stale, f"listed packages with no folder: {sorted(stale)}"


def test_every_chapter_installs_the_release_it_was_written_for():
    """A chapter opened in Colab installs this package's tagged version, never a moving main."""
    import json

    import helpers

    for path in sorted((ROOT / "book").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        install = next(("".join(c["source"]) for c in cells if "google.colab" in "".join(c["source"])), None)
        assert install is not None, f"{path.name}: no Colab install cell"
        assert f'"{helpers.__version__}"' in install, f"{path.name}: not this release's version"
        assert "@v{VERSION}" in install, f"{path.name}: the install is not pinned to the release"
