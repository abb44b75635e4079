"""The benchmarks' physical floors count the FLOPs a forward pass really makes, and a series timed while the load
average moved is discarded and run again."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model
from torch.utils.flop_counter import FlopCounterMode

from helpers.cli import floors


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_forward_flops_equal_what_torch_counts(family):
    model = build_tiny_model(family)
    t = 9
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.base_model(input_ids=torch.arange(3, 3 + t)[None], use_cache=False)
    # the eager attention computes every (query, key) score of the pass, masked or not
    assert floors.forward_flops(model, t, causal=False) == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert floors.forward_flops(model, t) < floors.forward_flops(model, t, causal=False)  # a floor counts the causal half
    linear, attention = floors.forward_flops(model, t, split=True)
    assert linear + attention == floors.forward_flops(model, t)


def test_a_gemm_round_does_the_flops_it_claims():
    model = build_tiny_model("llama")
    rate = floors.GemmRate(model, rows=8)
    with FlopCounterMode(display=False) as counter:
        rate()
    assert rate.flops == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert rate.floor_s(rate.flops, 2.0) == pytest.approx(2.0)


def test_a_series_is_run_again_while_the_load_moves(monkeypatch):
    loads = iter([1.0, 3.5, 2.0, 2.4])  # moved by 2.5: discarded; then by 0.4: kept
    monkeypatch.setattr(floors, "load_average", lambda: next(loads))
    runs = []
    result, record = floors.timed_series(lambda: runs.append(1) or len(runs))
    assert result == 2 and record["attempts"] == 2 and record["discarded_loads"] == [[1.0, 3.5]]
    assert not record["load_moved_more_than_max"]
    loads = iter([0.0, 5.0] * 3)
    monkeypatch.setattr(floors, "load_average", lambda: next(loads))
    _, record = floors.timed_series(lambda: None, retries=2)
    assert record["attempts"] == 3 and record["load_moved_more_than_max"]


def test_the_cost_table_sums_the_recorded_costs_per_chapter(tmp_path):
    import json

    from helpers.cli.bench import cost_table

    def put(folder, name, task, cost):
        (tmp_path / folder).mkdir(exist_ok=True)
        info = {"model": {"name": "m"}, "task": task, **({"cost": cost} if cost else {})}
        (tmp_path / folder / f"{name}.json").write_text(json.dumps(info))

    put("isolation", "a", "sst2", {"wall_s": 10, "cpu_s": 60, "threads": 1})
    put("saliency", "b", "sst2", {"wall_s": 5, "cpu_s": 30, "threads": 1})
    put("extraction", "c", "sst2", None)
    bench = tmp_path / "speed.json"
    bench.write_text(json.dumps({"tasks": {"sst2": {"isolation": {"previous/new": {"median": 1.5}}}}}))
    rows = {r["chapter"]: r for r in cost_table(tmp_path, bench)}
    assert rows["book/aggregation"]["results"] == 2 and rows["book/aggregation"]["cpu_s"] == 90
    assert rows["book/aggregation"]["cpu_s_after"] == 60 / 1.5 + 30
    assert rows["book/extraction"]["costed"] == 0 and rows["book/extraction"]["results"] == 1
