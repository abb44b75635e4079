"""The command-line entry points: compute plans over the experiment protocol, refuses what it cannot honour, and the
verdict table of any model comes from the cache."""

import subprocess
import sys

import pytest

from helpers.cli import compute, verdicts


def _args(*argv):
    return compute.parser().parse_args(list(argv))


def test_plan_is_seed_major_over_the_experiments_own_seeds():
    work = compute.plan(_args("extraction", "--profile", "quick", "--tasks", "sst2", "trec"), "gemma-3-270m")
    assert [(w[0].name, w[2], w[3]) for w in work] == [("extraction", 42, "sst2"), ("extraction", 42, "trec")]
    everything = compute.plan(_args("all", "--profile", "quick", "--tasks", "sst2"), "gemma-3-270m")
    assert [w[0].name for w in everything] == ["aggregation", "extraction", "reweighting", "compression",
                                               "diagnosis", "tuning", "meaning", "taskvectors", "heads"]


def test_options_and_seeds_an_experiment_does_not_take_are_refused():
    with pytest.raises(ValueError, match="does not take shots"):
        compute.plan(_args("diagnosis", "--shots", "2"), "gemma-3-270m")
    with pytest.raises(ValueError, match="not seeds of reweighting"):
        compute.plan(_args("reweighting", "--seeds", "45"), "gemma-3-270m")  # re-weighting trains 3 of 5 seeds
    with pytest.raises(SystemExit):
        _args("extraction", "--shots", "0")
    with pytest.raises(SystemExit):
        _args("extraction", "--tasks")  # no value: an error, not "compute nothing"


def test_dry_run_lists_what_is_missing_without_loading_a_model(tmp_path, monkeypatch, capsys):
    from helpers.core import runs

    monkeypatch.setenv("ANCHORS_RESULTS", str(tmp_path))
    monkeypatch.setattr(runs, "committed_results_dir", lambda: None)
    monkeypatch.setattr("helpers.core.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    compute.main(["diagnosis", "--profile", "quick", "--tasks", "trec", "--dry-run"])
    out = capsys.readouterr().out
    assert "0 of 1" in out and "missing: diagnosis trec seed 42" in out


def test_committed_results_are_found_by_the_dry_run(capsys):
    compute.main(["reweighting", "--tasks", "sst2", "--dry-run"])
    assert "3 of 3 (experiment, seed, task) runs cached" in capsys.readouterr().out


def test_verdict_table_of_a_model_with_nothing_cached_says_not_yet_run(tmp_path, monkeypatch):
    from helpers.core import runs
    from helpers.pages.verdicts import FINDINGS

    monkeypatch.setenv("ANCHORS_RESULTS", str(tmp_path))
    monkeypatch.setattr(runs, "committed_results_dir", lambda: None)
    table = verdicts.markdown("smollm2-135m")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(FINDINGS)
    assert all(row.endswith("| **not yet run** |") for row in rows)


@pytest.mark.slow
def test_compute_then_verdicts_end_to_end_on_the_tiny_model(tmp_path):
    """The paper's battery on another model, without the book: compute one experiment, read its verdict row."""
    env = {**__import__("os").environ, "ANCHORS_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", *a], env=env, capture_output=True, text=True,  # noqa: E731
                                    timeout=900)
    done = run("helpers.cli.compute", "diagnosis", "--model", "smollm2-135m", "--profile", "quick", "--tasks", "trec")
    assert done.returncode == 0, done.stderr[-2000:]
    again = run("helpers.cli.compute", "diagnosis", "--model", "smollm2-135m", "--profile", "quick", "--tasks",
                "trec", "--dry-run")
    assert "1 of 1" in again.stdout  # resumable: nothing left to compute
    table = run("helpers.cli.verdicts", "--model", "smollm2-135m", "--profile", "quick")
    assert table.returncode == 0, table.stderr[-2000:]
    row = next(line for line in table.stdout.splitlines() if "confuses" in line)
    assert "not yet run" not in row and "500" not in row


def test_a_large_model_is_refused_when_its_peak_does_not_fit(monkeypatch):
    from helpers.core import models

    need = models.OFFLINE_MODELS["qwen2.5-coder-1.5b"].peak_gb[0]
    with pytest.raises(MemoryError, match=r"needs about 20 GB.*3\.0 GB available"):
        models.check_memory("qwen2.5-coder-1.5b", available=3.0)
    models.check_memory("qwen2.5-coder-1.5b", available=need + 1)  # fits: no error
    models.check_memory("a/hub-model", available=0.1)  # no recorded peak: nothing to check
    monkeypatch.setattr(models, "available_memory_gb", lambda: 1.0)
    monkeypatch.setattr(compute, "_offline", lambda: set())  # skip the cache lookup: something is to compute
    monkeypatch.setattr("helpers.core.models.load_model", lambda *a, **k: pytest.fail("loaded despite the check"))
    with pytest.raises(SystemExit) as exit_:
        compute.main(["diagnosis", "--model", "qwen2.5-coder-1.5b", "--tasks", "trec", "--seeds", "42"])
    assert exit_.value.code == 2
