"""The compression chapter's tables, figures and glued values (helpers.pages.compression), without a model: tiny
constructed benchmark timings and sweep runs, and a slice of the committed results and benchmark (the prompts are
rebuilt with the offline tokenizer only)."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers.core.runs import PROFILES  # noqa: E402
from helpers.pages import compression as page  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gemma-3-270m"
SLICE = ("sst2", "trec")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# --------------------------------------------------------------------------------------------------------------------
# Fixtures: constructed and committed
# --------------------------------------------------------------------------------------------------------------------


def _timing(median, ceiling, prefix=1.0, lo=None, hi=None, full_mb=1.0, anchor_mb=0.5):
    """One benchmark entry (a task or a sweep point at one batch size), as ``helpers.cli.bench`` writes it."""
    ratio = {"median": median, "min": median - 0.1 if lo is None else lo, "max": median + 0.1 if hi is None else hi}
    return {"n": 8, "reps": 3, "L_demo": 52, "L_x": 30.25, "L_full": 82.25, "ceiling": ceiling,
            "ratios": {"full/anchor": ratio, "prefix/anchor": {"median": prefix, "min": prefix - 0.1,
                                                               "max": prefix + 0.2},
                       "full/prefix": {"median": median / prefix, "min": 0.0, "max": 0.0}},
            "cache_build_s": 5.0, "break_even_queries": None,
            "cache_bytes": {"full": int(full_mb * 2**20), "anchor": int(anchor_mb * 2**20)}}


def _bench():
    """Full recomputation: SST-2 reaches the paper's GPT-J ratio (1.5×) at batch 8 only, TREC (2.2×) at both; 60% of
    the ceiling at batch 8: TREC only (SST-2 55%). Equal work: TREC faster at batch 1 (1.1×), SST-2 slower (0.95×)."""
    return {"tasks": {"sst2": {"1": _timing(1.2, 2.0, prefix=0.95), "8": _timing(2.2, 4.0, prefix=0.9)},
                      "trec": {"1": _timing(2.5, 10.0, prefix=1.1), "8": _timing(6.5, 10.0, prefix=1.3)}},
            "sweep": {"sst2": {"1": {"1": _timing(1.3, 2.0), "8": _timing(2.0, 2.0, prefix=0.95)},
                               "16": {"1": _timing(14.4, 21.1, full_mb=18.5, anchor_mb=7.2),
                                      "8": _timing(11.9, 21.1, prefix=1.33)}}}}


def _sweep_run(agree_anchor, agree_text, n=4):
    """One sweep run: full ICL right on every example; Hidden_anchor / Text_anchor agree with it on the first
    ``agree_*`` examples (and are wrong on the others)."""
    gold = np.arange(n) % 2
    top = np.tile(np.arange(10), (n, 1))

    def pred(k):
        return np.where(np.arange(n) < k, gold, 1 - gold)

    return {"gold": gold, "full/pred": gold, "full/top": top, "anchor/pred": pred(agree_anchor), "anchor/top": top,
            "text/pred": pred(agree_text), "text/top": top}


def _sweep():
    """Two tasks; 1 and 2 demonstrations per class on both, 4 on SST-2 only (so not shown)."""
    return {"sst2": {1: [_sweep_run(4, 1)], 2: [_sweep_run(2, 3)], 4: [_sweep_run(0, 0)]},
            "trec": {1: [_sweep_run(4, 1)], 2: [_sweep_run(2, 3)]}}


@pytest.fixture(scope="module")
def data(data_dir):
    from helpers.core.tasks import load_task

    return {t: load_task(t, data_dir) for t in SLICE}


@pytest.fixture(scope="module")
def committed(data):
    """The committed Table 2 runs of the default model on SST-2 and TREC, seeds 42 and 43, and their tables."""
    from helpers.core.runs import ModelKey
    from helpers.experiments.compression import compression_runs

    runs = {t: compression_runs(ModelKey.of(MODEL), d, PROFILES["book"], seeds=(42, 43), lookup_only=True)
            for t, d in data.items()}
    assert all(r is not None for rs in runs.values() for r in rs), "committed compression results missing"
    return {MODEL: runs}, page.loyalty_tables({MODEL: runs})


@pytest.fixture(scope="module")
def tokenizer_lm(offline_tokenizers):
    """What the pages need of a loaded model: its tokenizer and context length (no weights)."""
    return SimpleNamespace(name=MODEL, tokenizer=offline_tokenizers[MODEL], max_length=32768)


# --------------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------------


def test_read_bench_finds_the_committed_benchmark_and_its_forward_cost():
    bench, cost = page.read_bench(MODEL)
    assert bench["model"] == MODEL and set(bench["tasks"]) == {"sst2", "trec", "agnews", "emoc"}
    assert cost is not None and cost["fixed_in_tokens"] > 0


def test_read_bench_without_a_forward_cost(tmp_path, monkeypatch):
    folder = tmp_path / "compression-bench"
    folder.mkdir()
    (folder / "some-model.json").write_text(json.dumps(_bench()))
    monkeypatch.setenv("ANCHORS_RESULTS", str(tmp_path))
    bench, cost = page.read_bench("some-model")
    assert bench == _bench() and cost is None


def test_example_prompt_and_what_is_kept(data, tokenizer_lm):
    prompt = page.example_prompt(tokenizer_lm, data["sst2"], 42)
    bench, _ = page.read_bench(MODEL)  # the benchmark recorded the same prompt's lengths
    assert page.kept_values(prompt) == {"kept_sst2": bench["tasks"]["sst2"]["1"]["kept"],
                                        "demo_sst2": bench["tasks"]["sst2"]["1"]["L_prefix"]}
    html = page.kept_tokens_html(tokenizer_lm, prompt)
    assert html.count("<span style=") == len(prompt) + 4  # one per token, four in the legend
    assert "line-through" in html and "font-weight:bold" in html


def _table2_run(agree):
    """A Table 2 run of 4 examples: Hidden_anchor (and Hidden_random, one draw) agree with full ICL on the first
    ``agree``."""
    run = _sweep_run(agree, agree)
    return {**run, "random/pred": run["anchor/pred"][None], "random/top": run["anchor/top"][None],
            "check/full_prompt_max_diff": np.array(0.0)}


def test_loyalty_tables_hold_the_tasks_fixed():
    # task a: Hidden_anchor always loyal, task b: never; two seeds each. With the tasks held fixed every bootstrap
    # replicate averages one task of each kind, so the interval is the point; drawing tasks as if they were seeds
    # (the plain table2) widens it.
    from helpers.experiments.compression import table2

    runs = {"a": [_table2_run(4), _table2_run(4)], "b": [_table2_run(0), _table2_run(0)]}
    label = page.loyalty_tables({"m": runs})["m"]["anchor"]["label"]
    assert (label.value, label.low, label.high) == pytest.approx((50.0, 50.0, 50.0))
    loose = table2(runs, page.VARIANTS)["anchor"]["label"]
    assert loose.value == pytest.approx(50.0) and loose.high - loose.low > 20


def test_loyalty_table(committed):
    _, tables = committed
    table = page.loyalty_table(tables, 2)
    assert list(table.columns) == ["label loyalty", "word loyalty", "accuracy", "n"]
    ours = table.loc[MODEL]
    assert list(ours.index) == [page.NAMES[v] for v in page.VARIANTS]
    assert ours.loc["ICL", "label loyalty"] == "100.0 [100.0, 100.0]"
    assert ours.loc["ICL", "n"] == "32 × 2 seeds × 2 tasks"
    assert table.loc[("paper: GPT-J", "Hidden_anchor"), "label loyalty"] == "89.1"
    assert len(table) == len(page.VARIANTS) + 2 * 5
    one_draw = {MODEL: {v: e for v, e in tables[MODEL].items() if v != "random-top"}}  # e.g. the second model
    assert "Hidden_random-top" not in page.loyalty_table(one_draw).loc[MODEL].index


def test_table2_values(committed):
    runs, tables = committed
    v = page.table2_values(runs, tables, MODEL)
    assert v["n_random"] == 10 and v["n_table2"] == "32 × 2 seeds × 2 tasks"
    assert v["full_label"] == "100.0 [100.0, 100.0]" and v["anchor_label"] == tables[MODEL]["anchor"]["label"].fmt(1)
    assert v["full_prompt_diff"] == "0.0e+00"  # this slice's full-prompt check, run by run
    worse_run = {**runs[MODEL]["sst2"][0], "check/full_prompt_max_diff": np.array(2.7e-5)}
    worse = {MODEL: {**runs[MODEL], "emoc": [worse_run, runs[MODEL]["sst2"][1]]}}
    assert page.table2_values(worse, tables, MODEL)["full_prompt_diff"] == "2.7e-05"  # the largest over all runs
    assert v["paper_GPT-J_anchor_label"] == "89.1" and v["paper_GPT2-XL_random-top_word"] == "4.5"
    assert not any(k.startswith("second_") for k in v)
    both = page.table2_values({**runs, "other": runs[MODEL]}, {**tables, "other": tables[MODEL]}, MODEL, "other")
    assert both["second_text_word"] == v["text_word"] and both["n_table2_second"] == "32 × 2 seeds × 2 tasks"
    assert both["second_anchor_vs_random"] == v["anchor_vs_random"]


def test_anchor_vs_random_is_the_paired_difference_with_tasks_fixed():
    runs = {"a": [_table2_run(4), _table2_run(4)], "b": [_table2_run(2), _table2_run(2)]}
    for r in runs["b"]:  # on task b Hidden_random is never loyal, Hidden_anchor on 2 of 4 examples
        r["random/pred"] = (1 - r["gold"])[None]
    tables = page.loyalty_tables({"m": runs})
    v = page.table2_values({"m": runs}, tables, "m")
    assert v["anchor_vs_random"].startswith("25.0 [") and v["n_table2"] == "4 × 2 seeds × 2 tasks"


def _floor_runs(k: dict, n: int = 4):
    """Table 2's run and the extra runs of one (task, seed): full ICL right on every example; each row's variant
    agrees with it (and is right) on the first ``k[row key]`` examples, wrong on the others."""
    gold = np.arange(n) % 2

    def pred(j):
        return np.where(np.arange(n) < j, gold, 1 - gold)

    table2 = {"gold": gold, "full/pred": gold, "anchor/pred": pred(k["anchor"]),
              "labels-only/pred": pred(k["labels_only"]), "check/full_prompt_max_diff": np.array(0.0)}
    extras = {"formatting and zero-shot": {"gold": gold, "full/pred": gold, "formatting/pred": pred(k["formatting"]),
                                           "zero-shot/pred": pred(k["zero_shot"]),
                                           "check/full_prompt_max_diff": np.array(1e-6)},
              "restarted positions": {"gold": gold, "full/pred": pred(k["restart_full"]),
                                      "anchor/pred": pred(k["restart_anchor"]),
                                      "check/full_prompt_max_diff": np.array(3.25)}}
    return table2, extras


def _floor_case(per_task: dict):
    """``{task: [k per seed]}`` -> (Table 2's runs, the extras), as the chapter passes them."""
    runs, extras = {}, {}
    for task, ks in per_task.items():
        pairs = [_floor_runs(k) for k in ks]
        runs[task] = [t for t, _ in pairs]
        extras[task] = {part: [e[part] for _, e in pairs] for part in pairs[0][1]}
    return runs, extras


KEYS = ("anchor", "formatting", "labels_only", "zero_shot", "restart_anchor", "restart_full")


def test_floor_table_and_values_recompute_the_stub_results():
    # task a: every row loyal on k of 4 examples, the same on both seeds; task b: all loyal. The value is the mean of
    # the two tasks (tasks held fixed, equal seeds per task).
    a = dict(zip(KEYS, (3, 2, 1, 1, 2, 3)))
    b = dict.fromkeys(KEYS, 4)
    runs, extras = _floor_case({"a": [a, a], "b": [b, b]})
    est = page.floor_estimates(runs, extras)
    for row, key in zip(page.FLOOR_ROWS, KEYS):
        expected = 100 * (a[key] / 4 + 1) / 2
        for m in ("label", "acc"):  # full ICL is right everywhere: loyal is right
            e = est["rows"][row][m]
            assert e.value == pytest.approx(expected) and e.low <= e.value <= e.high, (row, m)
            assert (e.low == e.high) == (a[key] == 4), (row, m)  # a point only where no example differs
        if row != "Hidden_anchor":
            assert est["vs"][row].value == pytest.approx(100 * (a["anchor"] - a[key]) / 4 / 2)
    assert est["full agree"] == {"formatting and zero-shot": 100.0, "restarted positions": pytest.approx(87.5)}
    assert est["check"] == {"formatting and zero-shot": 1e-6, "restarted positions": 3.25}
    table = page.floor_table(est)
    assert list(table.index) == list(page.FLOOR_ROWS)
    assert list(table.columns) == ["label loyalty", "accuracy", "Hidden_anchor's label loyalty minus this", "n"]
    assert table.loc["formatting only", "label loyalty"] == est["rows"]["formatting only"]["label"].fmt(1)
    assert table.loc["formatting only", "label loyalty"].startswith("75.0 [")
    assert table.loc["no demonstrations", "accuracy"].startswith("62.5 [")
    assert table.loc["Hidden_anchor", "Hidden_anchor's label loyalty minus this"] == ""
    assert table.loc["no demonstrations", "Hidden_anchor's label loyalty minus this"].startswith("25.0 [")
    assert set(table["n"]) == {"4 × 2 seeds × 2 tasks"}
    v = page.floor_values(est)
    assert v["floor_anchor_label"].startswith("87.5 [") and v["floor_restart_full_acc"].startswith("87.5 [")
    assert v["floor_zero_shot_label"] == est["rows"]["no demonstrations"]["label"].fmt(1)
    assert v["floor_vs_formatting"].startswith("12.5 [") and "floor_vs_anchor" not in v
    assert v["n_floor"] == "4 × 2 seeds × 2 tasks" and v["restart_full_prompt_diff"] == "3.2"
    assert v["floor_full_agree"] == "100"


def test_floor_estimates_draw_the_seeds_and_refuse_other_examples():
    # two seeds that differ: the interval is no longer a point
    a1, a2 = dict.fromkeys(KEYS, 4), dict.fromkeys(KEYS, 0)
    runs, extras = _floor_case({"a": [a1, a2], "b": [a1, a2]})
    e = page.floor_estimates(runs, extras)["rows"]["formatting only"]["label"]
    assert e.value == pytest.approx(50.0) and e.high - e.low > 20
    extras["b"]["formatting and zero-shot"][1] = {**extras["b"]["formatting and zero-shot"][1],
                                                  "gold": np.array([1, 1, 0, 0])}
    with pytest.raises(ValueError, match="other test examples"):
        page.floor_estimates(runs, extras)
    with pytest.raises(ValueError, match="seeds"):
        page.floor_estimates(runs, {t: {p: rs[:1] for p, rs in parts.items()} for t, parts in extras.items()})


def test_padded_ceiling():
    class P:
        def __init__(self, length, query_start):
            self.length, self.query_start = length, query_start

        def __len__(self):
            return self.length

    # batches [10+2, 12+4] and [8+2]: full 2 × 16 + 2 × 10, queries 2 × 4 + 2 × 2
    assert page.padded_ceiling([P(12, 10), P(16, 12), P(10, 8)], batch_size=2) == pytest.approx(52 / 12)
    assert page.padded_ceiling([P(12, 10)], batch_size=8) == pytest.approx(6.0)


def test_speed_table_without_batch_8_needs_no_prompts():
    bench = {"tasks": {name: {"1": b["1"]} for name, b in _bench()["tasks"].items()}}
    table = page.speed_table(bench, {"fixed_s": 1.0, "per_token_s": 0.1}, None, {})
    assert list(table.columns) == ["SST-2", "TREC"]
    sst2 = table["SST-2"]
    assert list(table.index[:2]) == ["equal work, batch 1", "full recomputation, batch 1"]  # equal work leads
    assert sst2["equal work, batch 1"] == "0.95× [0.85, 1.15]"
    assert sst2["full recomputation, batch 1"] == "1.20× [1.10, 1.30]" and sst2["ceiling"] == "2.0×"
    assert sst2["batch-1 bound with fixed cost"] == f"{(1 + 8.225) / (1 + 3.025):.1f}×"
    assert sst2["paper GPT-J"] == "1.5×" and sst2["paper L_demo / L_x"] == "18 / 19"
    assert sst2["pays off after (queries, batch 1)"] is None and "full recomputation, batch 8" not in table.index
    assert "batch-1 bound with fixed cost" not in page.speed_table(bench, None, None, {}).index


def test_speed_table_of_the_committed_benchmark(data, tokenizer_lm):
    bench, cost = page.read_bench(MODEL)
    bench = {"tasks": {t: bench["tasks"][t] for t in SLICE}}
    table = page.speed_table(bench, cost, tokenizer_lm, data)
    assert list(table.columns) == ["SST-2", "TREC"]
    for t, title in [("sst2", "SST-2"), ("trec", "TREC")]:
        b8 = bench["tasks"][t]["8"]
        full8 = b8["ratios"]["full/anchor"]["median"]
        assert table.loc["full recomputation, batch 8", title].startswith(f"{full8:.2f}× [")
        assert table.loc["equal work, batch 8", title].startswith(f"{b8['ratios']['prefix/anchor']['median']:.2f}× [")
        padded = float(table.loc["ceiling with padding, batch 8", title].rstrip("×"))
        assert 1 < padded <= b8["L_full"] / b8["L_x"] * 1.5


def test_mean_ratio():
    eq = page.mean_ratio(_bench(), page.EQUAL, "1")
    assert (eq["median"], eq["min"], eq["max"]) == pytest.approx((1.025, 0.925, 1.225))
    assert eq["per task"] == {"sst2": 0.95, "trec": 1.1}
    assert page.mean_ratio(_bench(), page.FULL, "8")["median"] == pytest.approx(4.35)


def test_mean_ratio_is_the_verdicts_number():
    from helpers.experiments.compression import compression_speedup

    bench, _ = page.read_bench(MODEL)
    measured = compression_speedup(MODEL, PROFILES["book"])
    eq = page.mean_ratio(bench)
    assert (eq["median"], eq["min"], eq["max"]) == pytest.approx(
        (measured.estimate.value, measured.estimate.low, measured.estimate.high))
    assert page.speed_values(bench, None)["equal_b1"].startswith(f"{measured.estimate.value:.2f}× [")


def test_speed_values():
    v = page.speed_values(_bench(), {"fixed_in_tokens": 63.4})
    assert v == {"equal_b1": "1.02× [0.93, 1.23]", "equal_b1_tasks": "SST-2 0.95×, TREC 1.10×",
                 "equal_b1_faster": "1 of 2", "full_b1": "1.85×", "speed_b1_range": "1.20× to 2.50×",
                 "equal_b8": "1.10× [1.00, 1.30]", "equal_b8_tasks": "SST-2 0.90×, TREC 1.30×",
                 "equal_b8_faster": "1 of 2", "full_b8": "4.35×", "speed_b8_range": "2.20× to 6.50×",
                 "frac_b8_range": "55% to 65%", "bench_n": "8 test examples × 3 repetitions", "meet_b1": "TREC",
                 "meet_b8": "SST-2, TREC", "meet60_b8": "TREC", "fixed_tokens": "63"}
    bench = {"tasks": {name: {"1": b["1"]} for name, b in _bench()["tasks"].items()}}
    v = page.speed_values(bench, None)
    assert v["meet_b8"] == "no task" and "speed_b8_range" not in v and "equal_b8" not in v
    assert "fixed_tokens" not in v and v["equal_b1"] == "1.02× [0.93, 1.23]"


def test_sweep_quality_pools_tasks_on_the_shots_run_everywhere():
    q = page.sweep_quality(_sweep())
    assert list(q) == ["Hidden_anchor: label loyalty", "Text_anchor: label loyalty", "full ICL: accuracy",
                       "Hidden_anchor: accuracy"]
    shots, values, lows, highs = q["Hidden_anchor: label loyalty"]
    assert shots == [1, 2] and values == pytest.approx([100.0, 50.0])
    assert q["Text_anchor: label loyalty"][1] == pytest.approx([25.0, 75.0])
    assert q["full ICL: accuracy"][1] == pytest.approx([100.0, 100.0])
    assert all(lo <= v <= hi for lo, v, hi in zip(lows, values, highs))


def test_sweep_quality_keeps_the_tasks_fixed():
    # one demonstration set per task: SST-2 always loyal, TREC never; resampling the examples within each task
    # leaves the mean at 50%, where drawing the tasks as if they were seeds would not
    q = page.sweep_quality({"sst2": {1: [_sweep_run(4, 4)]}, "trec": {1: [_sweep_run(0, 0)]}})
    _, values, lows, highs = q["Hidden_anchor: label loyalty"]
    assert values == pytest.approx([50.0]) and lows == pytest.approx([50.0]) and highs == pytest.approx([50.0])


def test_sweep_speed():
    speed, ceiling, memory = page.sweep_speed(_bench())
    assert list(speed) == ["equal work, batch 1", "equal work, batch 8", "full recomputation, batch 1",
                           "full recomputation, batch 8"]
    assert speed["full recomputation, batch 1"] == ([1, 16], [1.3, 14.4], [pytest.approx(1.2), pytest.approx(14.3)],
                                                    [pytest.approx(1.4), pytest.approx(14.5)])
    assert speed["equal work, batch 8"] == ([1, 16], [0.95, 1.33], [pytest.approx(0.85), pytest.approx(1.23)],
                                            [pytest.approx(1.15), pytest.approx(1.53)])
    assert ceiling == ([1, 16], [2.0, 21.1])
    assert memory == ([1, 16], [2**20, int(18.5 * 2**20)], [2**19, int(7.2 * 2**20)])


def test_sweep_figure_draws_three_panels():
    fig = page.sweep_figure(_bench(), _sweep(), "m", PROFILES["book"])
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 3
    assert tuple(fig.get_size_inches())[1] == 7.2
    assert fig.get_suptitle() == ("m; speed and memory: SST-2, 8 queries × 3 repetitions;\nloyalty/accuracy: 2 tasks "
                                  "× 4 examples, seed 42")
    speed, memory, quality = fig.axes
    assert [ln.get_label() for ln in quality.lines] == list(page.QUALITY)
    assert speed.get_yscale() == "log" and speed.get_ylim()[0] < 0.67  # the lowest point's bar is shown
    legend = [t.get_text() for t in speed.get_legend().get_texts()]
    assert legend == ["ceiling of full recomputation", "equal work, batch 1", "equal work, batch 8",
                      "full recomputation, batch 1", "full recomputation, batch 8"]
    np.testing.assert_allclose(memory.lines[0].get_ydata(), [1.0, 18.5], atol=1e-6)
    assert max(speed.lines[0].get_ydata()) < speed.get_ylim()[1]  # the ceiling stays inside the axes
    for panel in (speed, memory):  # the legends sit below the panels, not over the data
        assert panel.get_legend()._loc == 9 and panel.get_legend().get_bbox_to_anchor()._bbox.y1 < 0.5


def test_sweep_values():
    v = page.sweep_values(_bench(), _sweep())
    assert v == {"sweep_kmax": 16, "sweep_speed_b1": "14.4×", "sweep_speed_b8": "11.9×", "sweep_ceiling": "21.1×",
                 "sweep_equal_b1": "1.00× (range 0.90–1.20)", "sweep_equal_b8": "1.33× (range 1.23–1.53)",
                 "sweep_equal_1_b1": "1.00× (range 0.90–1.20)", "sweep_equal_1_b8": "0.95× (range 0.85–1.15)",
                 "sst2_again_b1": "1.30×", "sst2_first_b1": "1.20×", "sst2_again_b8": "2.00×",
                 "sst2_first_b8": "2.20×", "sst2_again_equal_b1": "1.00×", "sst2_first_equal_b1": "0.95×",
                 "sweep_mem": "18.5 MiB → 7.2 MiB",
                 "sweep_anchor_label_1": "100%", "sweep_anchor_label_max": "50%", "sweep_text_label_1": "25%",
                 "sweep_text_label_max": "75%", "sweep_shots_max_quality": 2}


def test_glued_values_cover_every_name_the_chapter_uses(committed, data, tokenizer_lm, monkeypatch):
    from helpers.core.runs import ModelKey
    from helpers.experiments.compression import shots_sweep

    runs, tables = committed
    runs, tables = {**runs, "second": runs[MODEL]}, {**tables, "second": tables[MODEL]}
    bench, cost = page.read_bench(MODEL)
    sweep = {t: shots_sweep(ModelKey.of(MODEL), d, PROFILES["book"], progress=False) for t, d in data.items()}
    prompt = page.example_prompt(tokenizer_lm, data["sst2"], 42)
    values = page.glued_values(prompt, runs, tables, bench, cost, sweep, MODEL, "second")
    from helpers.experiments.compression import table2_extras

    extras = {t: table2_extras(ModelKey.of(MODEL), d, PROFILES["book"], seeds=(42, 43), lookup_only=True)
              for t, d in data.items()}
    floors = page.floor_estimates(runs[MODEL], extras)
    values |= page.floor_values(floors)
    assert values["floor_anchor_label"] == values["anchor_label"]  # one bootstrap: Table 2's row is the table's
    from helpers.pages import verdicts

    monkeypatch.setattr(verdicts, "evaluate", lambda finding, model, profile: (None, "reproduced"))  # the names only
    values |= verdicts.chapter_verdicts("book/compression")
    cells = json.loads((ROOT / "book" / "compression.ipynb").read_text())["cells"]
    prose = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    used = set(re.findall(r"\{glue:text\}`([^`]+)`", prose))
    assert used and used <= set(values), used - set(values)
    assert values["sweep_kmax"] == 16 and values["sweep_mem"] == "18.5 MiB → 7.2 MiB"
    assert {"verdict_compression_speedup", "verdict_compression_loyalty"} <= used  # the conclusion states both
    source = "".join("".join(c["source"]) for c in cells)
    assert "(sec-compression-speed)=" in source and "(sec-compression-loyalty)=" in source
