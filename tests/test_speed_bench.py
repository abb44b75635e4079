"""The committed output of ``python -m helpers.cli.bench speed``: complete and self-consistent.

Not a timed test: the timings were taken once, by the command, and are only read here. What is checked is that the
file holds every experiment and task the README quotes, that its ratios follow from its own times, that every
like-for-like floor is at most the path it bounds, that the load average was recorded around every series, and that
the new paths gave the earlier paths' results in that run.
"""

from __future__ import annotations

import json
import statistics

import pytest

from helpers.cli.speed import speed_path

EXPERIMENTS = {"isolation": "previous", "extraction": "old", "saliency": "old"}


@pytest.fixture(scope="module")
def bench():
    path = speed_path("gemma-3-270m")
    if not path.is_file():
        pytest.fail(f"the committed speed benchmark {path} is missing (python -m helpers.cli.bench speed)")
    return json.loads(path.read_text())


def test_every_experiment_and_task_is_there(bench):
    assert "sst2" in bench["tasks"], "the README quotes SST-2"
    assert bench["threads"] == 1
    for task in bench["tasks"].values():
        for e, before in EXPERIMENTS.items():
            assert {"new", before, "floor", "physical:new", f"{before}/new", "new/floor", "new/physical"} <= set(task[e])


def test_ratios_follow_from_the_times(bench):
    for task in bench["tasks"].values():
        for e, before in EXPERIMENTS.items():
            r = [o / n for o, n in zip(task[e][before]["times_s"], task[e]["new"]["times_s"])]
            assert task[e][f"{before}/new"]["median"] == pytest.approx(statistics.median(r))
            p = [n / f for n, f in zip(task[e]["new"]["times_s"], task[e]["physical:new"]["times_s"])]
            assert task[e]["new/physical"]["median"] == pytest.approx(statistics.median(p))
            assert len(task[e]["new"]["times_s"]) >= 3  # repetitions, the warm-up excluded


def test_floors_are_floors_and_the_load_was_recorded(bench):
    for task in bench["tasks"].values():
        for e in EXPERIMENTS:
            assert task[e]["floor/physical"]["median"] >= 1, f"{e}: the like-for-like floor beat the physical one"
            assert task[e]["new/floor"]["median"] >= 0.95, f"{e}: the path beat its like-for-like floor"
            load = task[e]["load"]
            assert load["load_before"] is not None and load["load_after"] is not None


def test_the_new_paths_gave_the_earlier_results(bench):
    for task in bench["tasks"].values():
        assert task["isolation"]["equal_predictions_and_top10"]
        assert task["extraction"]["equal_predictions"]
        assert task["extraction"]["attention_max_rel_diff"] <= 1e-5
        assert task["saliency"]["flows_max_rel_diff"] <= 1e-5
        assert task["isolation"]["fallback_prompts"] == 0 and task["extraction"]["fallback_prompts"] == 0
