"""The tables, figures and glued values of the chapter *Compression: answering from the anchors alone*.

The functions read what :mod:`helpers.experiments.compression` returns (``runs``: ``{model: {task: [run per
seed]}}``; ``tables``: ``{model: table2(...)}``, from :func:`loyalty_tables`; ``sweep``: ``{task: {shots: [run]}}``)
and the benchmark's JSON (``python -m helpers.cli.bench compression``, read by :func:`read_bench`). None of them runs a
model; the prompts are rebuilt with the model's tokenizer where a table needs their lengths.

The speed numbers lead with **equal work**: the queries answered over the *uncompressed* demonstration cache against
the anchor-only cache ("prefix/anchor" in the benchmark), at batch 1 as the verdict page does
(:func:`helpers.experiments.compression.compression_speedup`); full recomputation of every prompt ("full/anchor",
the paper's framing) beside it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd

from ..core.prompts import Prompt
from ..core.runs import Profile, bench_file, make_prompts
from ..core.stats import mean_estimate, paired_difference, pooled_over
from ..core.tasks import TASKS, TaskData
from ..experiments.compression import (PAPER_LENGTHS, PAPER_SPEEDUP, PAPER_TABLE2, anchor_positions, table2,
                                       variant_metrics)
from . import plots
from .summaries import content_hash, summarised, summary

__all__ = ["VARIANTS", "NAMES", "SWEEP_TASKS", "EQUAL", "FULL", "read_bench", "example_prompt", "kept_tokens_html",
           "kept_values", "loyalty_tables", "loyalty_table", "table2_values", "FLOOR_ROWS", "floor_estimates", "floor_table",
           "floor_values", "padded_ceiling", "mean_ratio",
           "speed_table", "speed_values", "sweep_quality", "sweep_speed", "sweep_figure", "sweep_values",
           "glued_values"]

VARIANTS = ["full", "text", "random", "random-top", "anchor", "anchor-nobos", "labels-only"]
NAMES = {"full": "ICL", "text": "Text_anchor", "random": "Hidden_random", "random-top": "Hidden_random-top",
         "anchor": "Hidden_anchor", "anchor-nobos": "Hidden_anchor without BOS", "labels-only": "label words only"}
SWEEP_TASKS = ["sst2", "trec"]  # the tasks of the shots sweep's loyalty and accuracy runs
QUALITY = {"Hidden_anchor: label loyalty": ("anchor", "label"), "Text_anchor: label loyalty": ("text", "label"),
           "full ICL: accuracy": ("full", "acc"), "Hidden_anchor: accuracy": ("anchor", "acc")}
BENCH_FOLDER = "compression-bench"
EQUAL = "prefix/anchor"  # equal work: the same demonstration cache, uncompressed, over the anchor-only cache
FULL = "full/anchor"  # the paper's framing: every prompt recomputed in full, over the anchor-only cache


def read_bench(model: str) -> tuple[dict, dict | None]:
    """The benchmark of ``model`` and its forward-cost measurement (``python -m helpers.cli.bench compression`` and
    ``... forward-cost``), read from the results folders: ``(bench, cost)``, ``cost`` None where it was not measured.

    Used in: Compression."""
    bench = json.loads(bench_file(BENCH_FOLDER, model).read_text())
    cost_path = bench_file(BENCH_FOLDER, f"{model}-forward-cost")
    return bench, (json.loads(cost_path.read_text()) if cost_path.is_file() else None)


# --------------------------------------------------------------------------------------------------------------------
# What is kept
# --------------------------------------------------------------------------------------------------------------------


def example_prompt(lm, data: TaskData, seed: int) -> Prompt:
    """The prompt of the first test example of ``seed`` (one demonstration per class): the chapter's example.

    A stored summary (:func:`helpers.pages.book.cached_prompts`): no tokenizer is loaded when it is stored.

    Used in: Compression."""
    from .book import cached_prompts

    return cached_prompts(lm, data, seed, 1)[0]


def kept_tokens_html(lm, prompt: Prompt) -> str:
    """``prompt`` as HTML, token by token: the anchors Hidden_anchor keeps highlighted (label words darker, tokens
    the tokenizer added boxed), the demonstrations' dropped text struck through, the query plain.

    Used in: Compression."""
    from .book import token_table

    table = token_table(lm, list(prompt.input_ids), f"compression-example-{content_hash(list(prompt.input_ids))}")
    tokens = [table.decode([t]) for t in prompt.input_ids]
    label_tokens = [i for s, e in prompt.label_spans for i in range(s, e)]
    return plots.kept_tokens_html(tokens, anchor_positions(prompt), prompt.query_start, label_tokens,
                                  prompt.special_positions)


def kept_values(prompt: Prompt) -> dict[str, int]:
    """``{"kept_sst2": tokens kept, "demo_sst2": demonstration tokens}`` of the example prompt.

    Used in: Compression."""
    return {"kept_sst2": len(anchor_positions(prompt)), "demo_sst2": prompt.query_start}


# --------------------------------------------------------------------------------------------------------------------
# Table 2: loyalty and accuracy
# --------------------------------------------------------------------------------------------------------------------


@summarised("compression/table2")
def loyalty_tables(runs: Mapping[str, Mapping[str, Sequence[dict]]]) -> dict[str, dict[str, dict]]:
    """Table 2 of every model, ``{model: table2(...)}``, with the tasks held fixed: the bootstrap draws the seeds
    (demonstration sets) within each task, then the test examples within each drawn seed, as the verdict page does
    (:func:`helpers.experiments.compression.compression_loyalty`), so the chapter and the page show one interval.

    Used in: Compression."""
    out = {}
    for m, per_task in runs.items():
        with pooled_over(len(per_task)):
            out[m] = table2(per_task, VARIANTS)
    return out


def _n_text(est, n_tasks: int) -> str:
    seeds = est.n_seeds // n_tasks
    return f"{est.n_examples} × {seeds} seed{'s' if seeds != 1 else ''} × {n_tasks} tasks"


def loyalty_table(tables: Mapping[str, Mapping[str, Mapping]], n_tasks: int = 4) -> pd.DataFrame:
    """Table 2: label loyalty, word loyalty and accuracy (% with 95% intervals) and n of every variant of every model,
    then the paper's GPT2-XL and GPT-J rows; indexed by (model, method). ``tables``: ``{model: table2(...)}``;
    ``n_tasks``: the tasks pooled in each.

    Used in: Compression."""
    rows = []
    for m, tab in tables.items():
        for v in VARIANTS:
            if v not in tab:
                continue
            est = tab[v]
            rows.append({"model": m, "method": NAMES[v],
                         "label loyalty": est["label"].fmt(1), "word loyalty": est["word"].fmt(1),
                         "accuracy": est["acc"].fmt(1), "n": _n_text(est["acc"], n_tasks)})
    for pm, tab in PAPER_TABLE2.items():
        for v in ["full", "text", "random", "random-top", "anchor"]:
            lab, word, acc = tab[v]
            rows.append({"model": f"paper: {pm}", "method": NAMES[v], "label loyalty": f"{lab:.1f}",
                         "word loyalty": f"{word:.1f}", "accuracy": f"{acc:.1f}", "n": "≤1000 × 5 seeds"})
    return pd.DataFrame(rows).set_index(["model", "method"])


def table2_values(runs: Mapping[str, Mapping[str, Sequence[dict]]], tables: Mapping[str, Mapping[str, Mapping]],
                  model: str, second_model: str | None = None) -> dict[str, object]:
    """Table 2's glued values: ``<variant>_<metric>`` of ``model`` (metric ``label``, ``word`` or ``acc``),
    ``second_<variant>_<metric>`` of ``second_model`` (full, anchor, text, random), ``n_table2``(``_second``),
    ``n_random`` (random draws per task and seed), Hidden_anchor's label loyalty minus Hidden_random's on the same
    examples (``anchor_vs_random``, ``second_anchor_vs_random``; the verdict's second clause), the largest
    full-prompt check difference over all runs (``full_prompt_diff``) and the paper's values
    (``paper_<model>_<variant>_<metric>``).

    Used in: Compression."""
    diff = max(float(r["check/full_prompt_max_diff"]) for per_task in runs.values() for rs in per_task.values()
               for r in rs)
    out: dict[str, object] = {"full_prompt_diff": f"{diff:.1e}"}
    for pm, tab in PAPER_TABLE2.items():
        for v, vals in tab.items():
            for k, x in zip(("label", "word", "acc"), vals):
                out[f"paper_{pm}_{v}_{k}"] = f"{x:.1f}"
    t = tables[model]
    for v in VARIANTS:
        if v in t:
            for k in ("label", "word", "acc"):
                out[f"{v}_{k}"] = t[v][k].fmt(1)
    out["n_table2"] = _n_text(t["anchor"]["acc"], len(runs[model]))
    out["n_random"] = len(next(iter(runs[model].values()))[0]["random/pred"])
    out["anchor_vs_random"] = _vs_random(runs[model])
    if second_model:
        t2 = tables[second_model]
        for v in ("full", "anchor", "text", "random"):
            for k in ("label", "word", "acc"):
                out[f"second_{v}_{k}"] = t2[v][k].fmt(1)
        out["n_table2_second"] = _n_text(t2["anchor"]["acc"], len(runs[second_model]))
        out["second_anchor_vs_random"] = _vs_random(runs[second_model])
    return out


def _vs_random(per_task: Mapping[str, Sequence[dict]]) -> str:
    """Hidden_anchor's label loyalty minus Hidden_random's (points, paired, tasks fixed), as the verdict page."""
    per = [(variant_metrics(r, "anchor")["label"], variant_metrics(r, "random")["label"])
           for rs in per_task.values() for r in rs]
    with pooled_over(len(per_task)):
        return paired_difference([a for a, _ in per], [b for _, b in per]).scaled(100).fmt(1)


# --------------------------------------------------------------------------------------------------------------------
# Beside Table 2: what the template alone, no demonstrations and the official GPT-2 positions keep
# --------------------------------------------------------------------------------------------------------------------

# row -> (where it is read: "table 2" or a part of helpers.experiments.compression.TABLE2_EXTRAS, the variant there)
FLOOR_ROWS = {
    "Hidden_anchor": ("table 2", "anchor"),
    "formatting only": ("formatting and zero-shot", "formatting"),
    "label words only": ("table 2", "labels-only"),
    "no demonstrations": ("formatting and zero-shot", "zero-shot"),
    "Hidden_anchor, positions restarted at 0": ("restarted positions", "anchor"),
    "full ICL, positions restarted at 0": ("restarted positions", "full"),
}
_FLOOR_KEYS = {"Hidden_anchor": "anchor", "formatting only": "formatting", "label words only": "labels_only",
               "no demonstrations": "zero_shot", "Hidden_anchor, positions restarted at 0": "restart_anchor",
               "full ICL, positions restarted at 0": "restart_full"}


def _floor_metrics(runs: Mapping[str, Sequence[dict]], extras: Mapping[str, Mapping[str, Sequence[dict]]],
                   ) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per row of :data:`FLOOR_ROWS`, per (task, seed): label agreement with **full ICL of Table 2's run** (the full
    prompt, positions as in it) and correctness. ``runs``: Table 2's ``{task: [run per seed]}``; ``extras``: ``{task:
    {part: [run per seed]}}`` (:func:`helpers.experiments.compression.table2_extras`), on the same test examples."""
    out: dict[str, list[dict[str, np.ndarray]]] = {}
    for row, (part, variant) in FLOOR_ROWS.items():
        per = []
        for task, rs in runs.items():
            others = rs if part == "table 2" else extras[task][part]
            if len(others) != len(rs):
                raise ValueError(f"{part}: {len(others)} seeds of {task}, Table 2 has {len(rs)}")
            for r, o in zip(rs, others):
                if not np.array_equal(r["gold"], o["gold"]):
                    raise ValueError(f"{part} of {task} was run on other test examples than Table 2")
                pred = o[f"{variant}/pred"]
                per.append({"label": (pred == r["full/pred"]).astype(float), "acc": (pred == r["gold"]).astype(float)})
        out[row] = per
    return out


@summarised("compression/floors")
def floor_estimates(runs: Mapping[str, Sequence[dict]], extras: Mapping[str, Mapping[str, Sequence[dict]]],
                    ) -> dict[str, object]:
    """Label loyalty and accuracy (%, 95% intervals) of every row of :data:`FLOOR_ROWS`, with the tasks held fixed
    and the seeds drawn within each (as Table 2, :func:`loyalty_tables`); ``"vs"``: Hidden_anchor's label loyalty
    minus each other row's on the same examples (points, paired); ``"full agree"``: how often each extra run's own
    full ICL agrees with Table 2's (%; 100 where the default positions were run again), ``"check"``: each extra run's
    largest full-prompt logit difference; ``"n_tasks"``. ``runs``: Table 2's ``{task: [run per seed]}``; ``extras``:
    ``{task: {part: [run per seed]}}`` (:func:`helpers.experiments.compression.table2_extras`) on the same test
    examples.

    Used in: Compression."""
    per = _floor_metrics(runs, extras)
    n_tasks = len(runs)
    out: dict[str, object] = {"rows": {}, "vs": {}, "full agree": {}, "check": {}, "n_tasks": n_tasks}
    with pooled_over(n_tasks):
        for row, values in per.items():
            out["rows"][row] = {m: mean_estimate([v[m] for v in values]).scaled(100) for m in ("label", "acc")}
        anchor = [v["label"] for v in per["Hidden_anchor"]]
        for row, values in per.items():
            if row != "Hidden_anchor":
                out["vs"][row] = paired_difference(anchor, [v["label"] for v in values]).scaled(100)
    for part in next(iter(extras.values())):
        pairs = [(r, o) for task, rs in runs.items() for r, o in zip(rs, extras[task][part])]
        out["full agree"][part] = 100 * float(np.mean([np.mean(o["full/pred"] == r["full/pred"]) for r, o in pairs]))
        out["check"][part] = max(float(o["check/full_prompt_max_diff"]) for _, o in pairs)
    return out


def floor_table(estimates: Mapping[str, Mapping]) -> pd.DataFrame:
    """The rows of :data:`FLOOR_ROWS`: label loyalty (agreement with full ICL's prediction on the full prompt) and
    accuracy (% with 95% intervals), Hidden_anchor's label loyalty minus the row's (points, paired) and n, indexed by
    method. ``estimates``: :func:`floor_estimates`.

    Used in: Compression."""
    rows = []
    for row, est in estimates["rows"].items():
        vs = estimates["vs"].get(row)
        rows.append({"method": row, "label loyalty": est["label"].fmt(1), "accuracy": est["acc"].fmt(1),
                     "Hidden_anchor's label loyalty minus this": "" if vs is None else vs.fmt(1),
                     "n": _n_text(est["acc"], estimates["n_tasks"])})
    return pd.DataFrame(rows).set_index("method")


def floor_values(estimates: Mapping[str, Mapping]) -> dict[str, str]:
    """The glued values of the table beside Table 2: ``floor_<row>_label`` and ``floor_<row>_acc`` (rows
    ``anchor``, ``formatting``, ``labels_only``, ``zero_shot``, ``restart_anchor``, ``restart_full``),
    ``floor_vs_<row>`` (Hidden_anchor's label loyalty minus the row's, points), ``n_floor``, the largest full-prompt
    logit difference with positions restarted (``restart_full_prompt_diff``) and the agreement of the default-position
    extra run's full ICL with Table 2's (``floor_full_agree``, %).

    Used in: Compression."""
    out: dict[str, str] = {}
    for row, est in estimates["rows"].items():
        key = _FLOOR_KEYS[row]
        out[f"floor_{key}_label"] = est["label"].fmt(1)
        out[f"floor_{key}_acc"] = est["acc"].fmt(1)
        if row in estimates["vs"]:
            out[f"floor_vs_{key}"] = estimates["vs"][row].fmt(1)
    first = estimates["rows"]["Hidden_anchor"]["acc"]
    out["n_floor"] = _n_text(first, estimates["n_tasks"])
    out["restart_full_prompt_diff"] = f"{estimates['check']['restarted positions']:.1f}"
    out["floor_full_agree"] = f"{estimates['full agree']['formatting and zero-shot']:.0f}"
    return out


# --------------------------------------------------------------------------------------------------------------------
# Speed (Tables 3 and 6)
# --------------------------------------------------------------------------------------------------------------------


def padded_ceiling(prompts: Sequence[Prompt], batch_size: int = 8) -> float:
    """The token-count ceiling with right padding: tokens of the full prompts over tokens of the queries alone, each
    batch of ``batch_size`` padded to its longest member.

    Used in: Compression."""
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    full = sum(batch_size * max(len(p) for p in b) for b in batches)
    query = sum(batch_size * max(len(p) - p.query_start for p in b) for b in batches)
    return full / query


def _ratio(r: Mapping) -> str:
    return f"{r['median']:.2f}× [{r['min']:.2f}, {r['max']:.2f}]"


def mean_ratio(bench: Mapping, pair: str = EQUAL, batch: str = "1") -> dict[str, object]:
    """The verdict's speed-up (:func:`helpers.experiments.compression.compression_speedup`) of one ratio ``pair`` at
    one batch size: the mean over the benchmark's tasks of the per-task median, the mean of their slowest and fastest
    repetitions (a timing spread, not a bootstrap), as ``{"median", "min", "max", "per task": {task: median}}``.

    Used in: Compression."""
    rows = {t: by_batch[batch]["ratios"][pair] for t, by_batch in bench["tasks"].items() if batch in by_batch}
    out = {k: sum(r[k] for r in rows.values()) / len(rows) for k in ("median", "min", "max")}
    out["per task"] = {t: r["median"] for t, r in rows.items()}
    return out


def speed_table(bench: Mapping, cost: Mapping | None, lm, data: Mapping[str, TaskData]) -> pd.DataFrame:
    """The speed table, one column per task: Hidden_anchor's speed-up (median [range over repetitions]) against
    **equal work** (the same queries over the uncompressed demonstration cache) and against **full recomputation**
    of every prompt (the paper's framing), at batch 1 then 8; Table 6's lengths and token-count ceiling, the share of
    it reached at batch 8, the cache's build time and break-even, and the paper's numbers. ``lm`` (its tokenizer)
    rebuilds the benchmark's prompts for the padded ceiling at batch 8; ``cost``, where measured, adds the batch-1
    bound of full recomputation with a fixed cost per forward pass.

    Used in: Compression."""
    rows = []
    for name, by_batch in bench["tasks"].items():
        b1, b8 = by_batch["1"], by_batch.get("8")
        ld, lx = PAPER_LENGTHS[name]
        row = {"task": TASKS[name].title, "equal work, batch 1": _ratio(b1["ratios"][EQUAL]),
               "full recomputation, batch 1": _ratio(b1["ratios"][FULL])}
        if b8:
            row.update({"equal work, batch 8": _ratio(b8["ratios"][EQUAL]),
                        "full recomputation, batch 8": _ratio(b8["ratios"][FULL])})
        row.update({"L_demo": b1["L_demo"], "L_x": round(b1["L_x"], 1), "ceiling": f"{b1['ceiling']:.1f}×"})
        if cost:
            a, b = cost["fixed_s"], cost["per_token_s"]
            row["batch-1 bound with fixed cost"] = f"{(a + b * b1['L_full']) / (a + b * b1['L_x']):.1f}×"
        if b8:
            ceiling8 = _padded_ceiling8(lm, data[name], b8["n"])
            row["ceiling with padding, batch 8"] = f"{ceiling8:.1f}×"
            row["full recomputation, batch 8, % of ceiling"] = \
                f"{100 * b8['ratios'][FULL]['median'] / b8['ceiling']:.0f}%"
        row.update({"cache build (s)": round(b1["cache_build_s"], 2),
                    "pays off after (queries, batch 1)": None if b1["break_even_queries"] is None
                    else round(b1["break_even_queries"], 1),
                    "paper L_demo / L_x": f"{ld} / {lx}", "paper ceiling": f"{(ld + lx) / lx:.1f}×",
                    "paper GPT2-XL": f"{PAPER_SPEEDUP['GPT2-XL'][name]}×",
                    "paper GPT-J": f"{PAPER_SPEEDUP['GPT-J'][name]}×"})
        rows.append(row)
    return pd.DataFrame(rows).set_index("task").T


def _padded_ceiling8(lm, data: TaskData, n: int) -> float:
    """:func:`padded_ceiling` at batch 8 of the benchmark's prompts (seed 42, ``n`` examples), a stored summary keyed
    on the model and the data (no tokenizer is loaded when it is stored)."""
    from .book import _identity_of, _safe

    if not _identity_of(lm):
        return padded_ceiling(make_prompts(lm, data, 42, n), 8)
    return summary(f"compression/padded-ceiling/{_safe(lm.name)}/{data.task.name}-n{n}",
                   lambda: padded_ceiling(make_prompts(lm, data, 42, n), 8),
                   depends={"model": dict(lm.identity), "data": data.fingerprint})


def _median(by_batch: Mapping, batch: str, ratio: str = FULL) -> float:
    return by_batch[batch]["ratios"][ratio]["median"]


def _per_task(r: Mapping) -> str:
    return ", ".join(f"{TASKS[t].title} {v:.2f}×" for t, v in r["per task"].items())


def speed_values(bench: Mapping, cost: Mapping | None) -> dict[str, str]:
    """The speed section's glued values. Equal work (the verdict's number): at batch 1 and 8 the mean over tasks
    with its mean range (``equal_b1``, ``equal_b8``; :func:`mean_ratio`), per task (``equal_b1_tasks``,
    ``equal_b8_tasks``) and how many tasks have a median above 1 (``equal_b1_faster``, ``equal_b8_faster``). Full
    recomputation (the paper's framing): the mean (``full_b1``, ``full_b8``) and range over tasks
    (``speed_b1_range``, ``speed_b8_range``), its share of the ceiling at batch 8 (``frac_b8_range``), the tasks that
    reach the paper's GPT-J ratio (``meet_b1``, ``meet_b8``) or 60% of the ceiling (``meet60_b8``). The benchmark's
    size (``bench_n``) and, where measured, the fixed cost of a forward pass in tokens (``fixed_tokens``).

    Used in: Compression."""
    tasks = bench["tasks"]
    out = {}
    batches = ["1"] + (["8"] if all("8" in b for b in tasks.values()) else [])
    for b in batches:
        eq, full = mean_ratio(bench, EQUAL, b), mean_ratio(bench, FULL, b)
        med = list(full["per task"].values())
        out.update({f"equal_b{b}": f"{eq['median']:.2f}× [{eq['min']:.2f}, {eq['max']:.2f}]",
                    f"equal_b{b}_tasks": _per_task(eq),
                    f"equal_b{b}_faster": f"{sum(v > 1 for v in eq['per task'].values())} of {len(med)}",
                    f"full_b{b}": f"{full['median']:.2f}×",
                    f"speed_b{b}_range": f"{min(med):.2f}× to {max(med):.2f}×"})
    if "8" in batches:
        frac8 = [_median(b, "8") / b["8"]["ceiling"] for b in tasks.values()]
        out["frac_b8_range"] = f"{100 * min(frac8):.0f}% to {100 * max(frac8):.0f}%"
    last = list(tasks.values())[-1]["1"]
    out["bench_n"] = f"{last['n']} test examples × {last['reps']} repetitions"

    def tasks_where(test):
        hits = [TASKS[name].title for name, by_batch in tasks.items() if test(name, by_batch)]
        return ", ".join(hits) if hits else "no task"

    out["meet_b1"] = tasks_where(lambda n, b: _median(b, "1") >= PAPER_SPEEDUP["GPT-J"][n])
    out["meet_b8"] = tasks_where(lambda n, b: "8" in b and _median(b, "8") >= PAPER_SPEEDUP["GPT-J"][n])
    out["meet60_b8"] = tasks_where(lambda n, b: "8" in b and _median(b, "8") >= 0.6 * b["8"]["ceiling"])
    if cost:
        out["fixed_tokens"] = f"{cost['fixed_in_tokens']:.0f}"
    return out


# --------------------------------------------------------------------------------------------------------------------
# The shots sweep
# --------------------------------------------------------------------------------------------------------------------


def _shots(sweep: Mapping[str, Mapping[int, Sequence[dict]]]) -> list[int]:
    return sorted(set.intersection(*[set(s) for s in sweep.values()]))


def sweep_quality(sweep: Mapping[str, Mapping[int, Sequence[dict]]]) -> dict[str, tuple[list, list, list, list]]:
    """Label loyalty of Hidden_anchor and Text_anchor and accuracy of full ICL and Hidden_anchor (%), per number of
    demonstrations per class run on every task of ``sweep``, pooled over its tasks and runs: ``{label: (shots,
    values, lows, highs)}``. The sweep has one demonstration set per task, so the 95% intervals are over the test
    examples only (the tasks are held fixed, not resampled as if they were seeds).

    Used in: Compression."""
    shots = _shots(sweep)
    out = {}
    for label, (v, metric) in QUALITY.items():
        est = [mean_estimate([variant_metrics(r, v)[metric] for s in sweep.values() for r in s[k]],
                             seeds=False).scaled(100) for k in shots]
        out[label] = (shots, [e.value for e in est], [e.low for e in est], [e.high for e in est])
    return out


def _sweep_bench(bench: Mapping) -> tuple[dict, list[int]]:
    sw = bench["sweep"].get("sst2", {})
    return sw, sorted(int(k) for k in sw)


SWEEP_SERIES = {EQUAL: "equal work", FULL: "full recomputation"}


def sweep_speed(bench: Mapping) -> tuple[dict, tuple, tuple]:
    """The benchmark's sweep on SST-2 as the sweep figure draws it: ``(speed, ceiling, memory)`` with ``speed``
    ``{"equal work, batch B" (over the uncompressed cache) and "full recomputation, batch B": (shots, median, min,
    max)}``
    (equal work first), ``ceiling`` ``(shots, token-count ceilings of full recomputation)`` and ``memory``
    ``(shots, full cache bytes, anchor cache bytes)``.

    Used in: Compression."""
    sw, xs = _sweep_bench(bench)
    speed = {}
    for pair, name in SWEEP_SERIES.items():
        for b in ("1", "8"):
            pts = [(k, sw[str(k)][b]["ratios"][pair]) for k in xs if b in sw[str(k)]]
            if pts:
                speed[f"{name}, batch {b}"] = ([k for k, _ in pts], [r["median"] for _, r in pts],
                                               [r["min"] for _, r in pts], [r["max"] for _, r in pts])
    ceiling = (xs, [sw[str(k)]["1"]["ceiling"] for k in xs])
    memory = (xs, [sw[str(k)]["1"]["cache_bytes"]["full"] for k in xs],
              [sw[str(k)]["1"]["cache_bytes"]["anchor"] for k in xs])
    return speed, ceiling, memory


def sweep_figure(bench: Mapping, sweep: Mapping[str, Mapping[int, Sequence[dict]]], model: str,
                 profile: Profile) -> plt.Figure:
    """The shots sweep: Hidden_anchor's speed-up against equal work and against full recomputation (with the
    latter's token-count ceiling), cache memory (SST-2, from the benchmark) and loyalty/accuracy (the sweep's runs)
    over demonstrations per class, titled with the sizes; returns the Figure.

    Used in: Compression."""
    speed, ceiling, memory = sweep_speed(bench)
    sw, xs = _sweep_bench(bench)
    first = sw[str(xs[0])]["1"]
    n_sweep = len(next(iter(sweep.values()))[_shots(sweep)[0]][0]["gold"])
    title = (f"{model}; speed and memory: SST-2, {first['n']} queries × {first['reps']} repetitions;\n"
             f"loyalty/accuracy: {len(sweep)} tasks × {n_sweep} examples, seed {profile.seeds[0]}")
    fig = plots.compression_sweep(speed, ceiling, memory, sweep_quality(sweep), title=title)
    ax = fig.axes[0]
    ax.lines[0].set_label("ceiling of full recomputation")
    ax.set_yscale("log", base=2)  # equal work stays near 1 while full recomputation climbs towards the ceiling
    top = 2.0 ** np.ceil(np.log2(1.2 * max(max(ceiling[1]), *(max(hi) for _, _, _, hi in speed.values()))))
    ax.set_ylim(0.5, top)  # the ceiling and every bar inside the axes; the legends sit below the panels
    ax.set_yticks([t for t in 2.0 ** np.arange(-1, 10) if t <= top])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_ylabel("Hidden_anchor's speed-up (×)")
    for panel in fig.axes[:2]:
        panel.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    return fig


def _range(r: Mapping) -> str:
    return f"{r['median']:.2f}× (range {r['min']:.2f}–{r['max']:.2f})"


def sweep_values(bench: Mapping, sweep: Mapping[str, Mapping[int, Sequence[dict]]]) -> dict[str, object]:
    """The sweep's glued values: the largest number of demonstrations per class timed (``sweep_kmax``); there and at
    one demonstration per class, Hidden_anchor against equal work with its range over repetitions
    (``sweep_equal_b1``/``_b8``, ``sweep_equal_1_b1``/``_b8``); against full recomputation at the most
    (``sweep_speed_b1``/``_b8``), its ceiling and the cache sizes (``sweep_mem``); the sweep's repeat of the SST-2
    timing beside the speed table's (``sst2_again_b*``, ``sst2_first_b*`` for full recomputation,
    ``sst2_again_equal_b1``, ``sst2_first_equal_b1`` for equal work); label loyalty of Hidden_anchor and Text_anchor at
    one and at the most demonstrations (``sweep_*_label_1``/``_max``, ``sweep_shots_max_quality``).

    Used in: Compression."""
    sw, xs = _sweep_bench(bench)
    k_max = xs[-1]
    last, one = sw[str(k_max)], sw[str(xs[0])]
    out: dict[str, object] = {"sweep_kmax": k_max}
    for b in ("1", "8"):
        if b in last:
            out[f"sweep_speed_b{b}"] = f"{_median(last, b):.1f}×"
            out[f"sweep_equal_b{b}"] = _range(last[b]["ratios"][EQUAL])
        if b in one:
            out[f"sweep_equal_1_b{b}"] = _range(one[b]["ratios"][EQUAL])
    out["sweep_ceiling"] = f"{last['1']['ceiling']:.1f}×"
    if "1" in sw:
        for b in ("1", "8"):
            if b in sw["1"]:
                out[f"sst2_again_b{b}"] = f"{_median(sw['1'], b):.2f}×"
                out[f"sst2_first_b{b}"] = f"{_median(bench['tasks']['sst2'], b):.2f}×"
        out["sst2_again_equal_b1"] = f"{_median(sw['1'], '1', EQUAL):.2f}×"
        out["sst2_first_equal_b1"] = f"{_median(bench['tasks']['sst2'], '1', EQUAL):.2f}×"
    out["sweep_mem"] = (f"{last['1']['cache_bytes']['full'] / 2**20:.1f} MiB → "
                        f"{last['1']['cache_bytes']['anchor'] / 2**20:.1f} MiB")
    quality = sweep_quality(sweep)
    for label, key in [("Hidden_anchor: label loyalty", "sweep_anchor_label"),
                       ("Text_anchor: label loyalty", "sweep_text_label")]:
        out[key + "_1"] = f"{quality[label][1][0]:.0f}%"
        out[key + "_max"] = f"{quality[label][1][-1]:.0f}%"
    out["sweep_shots_max_quality"] = _shots(sweep)[-1]
    return out


@summarised("compression/glued-values")
def glued_values(prompt: Prompt, runs, tables, bench: Mapping, cost: Mapping | None, sweep, model: str,
                 second_model: str | None = None) -> dict[str, object]:
    """Every value the chapter glues, ``{name: value}``: :func:`kept_values` of the example prompt,
    :func:`table2_values`, :func:`speed_values` and :func:`sweep_values`.

    Used in: Compression."""
    return (kept_values(prompt) | table2_values(runs, tables, model, second_model) | speed_values(bench, cost)
            | sweep_values(bench, sweep))
