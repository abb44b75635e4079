"""The committed output of ``python -m helpers.cli.bench speed`` (issue 12): complete and self-consistent.

Not a timed test: the timings were taken once, by the command, and are only read here. What is checked is that the
file holds every experiment and task the README and the closing note quote, that its ratios follow from its own
times, and that the new paths gave the old paths' results in that run.
"""

from __future__ import annotations

import json
import statistics

import pytest

from helpers.cli.speed import speed_path

EXPERIMENTS = ("isolation", "extraction", "saliency")


@pytest.fixture(scope="module")
def bench():
    path = speed_path("gemma-3-270m")
    if not path.is_file():
        pytest.fail(f"the committed speed benchmark {path} is missing (python -m helpers.cli.bench speed)")
    return json.loads(path.read_text())


def test_every_experiment_and_task_is_there(bench):
    assert {"sst2", "agnews"} <= set(bench["tasks"]), "the README and the closing note quote both tasks"
    assert bench["threads"] == 1
    for task in bench["tasks"].values():
        for e in EXPERIMENTS:
            assert {"new", "old", "floor", "old/new", "new/floor"} <= set(task[e])


def test_ratios_follow_from_the_times(bench):
    for task in bench["tasks"].values():
        for e in EXPERIMENTS:
            r = [o / n for o, n in zip(task[e]["old"]["times_s"], task[e]["new"]["times_s"])]
            assert task[e]["old/new"]["median"] == pytest.approx(statistics.median(r))
            assert len(task[e]["new"]["times_s"]) >= 3  # repetitions, the warm-up excluded


def test_the_new_paths_gave_the_old_results(bench):
    for task in bench["tasks"].values():
        assert task["isolation"]["equal_predictions_and_top10"]
        assert task["extraction"]["equal_predictions"]
        assert task["extraction"]["attention_max_rel_diff"] <= 1e-5
        assert task["saliency"]["flows_max_rel_diff"] <= 1e-5
        assert task["isolation"]["fallback_prompts"] == 0 and task["extraction"]["fallback_prompts"] == 0
