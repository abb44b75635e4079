"""The task-vector chapter's tables, figure and glued values (helpers.pages.taskvectors) on synthetic runs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from helpers.experiments import taskvectors as tv
from helpers.pages import taskvectors as page


def _run(seed: int, n: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 2, n)
    run = {"gold": gold, "layers": np.array([0, 2, 4]), "icl/pred": gold.copy(), "zero/pred": 1 - gold,
           "skeleton/pred": gold.copy(), "check/split_max_diff": np.array(2e-6)}
    for v in tv.PATCHED:
        pred = np.stack([1 - gold] * 3)
        pred[1] = gold  # model layer index 2 is right everywhere (shown as layer 3: the book counts layers from 1)
        run[f"{v}/pred"] = pred
    run.update({"floats/tv": np.array(640), "floats/labels": np.array(1280), "floats/both": np.array(1920),
                "floats/anchor_cache": np.array(138240), "floats/full_cache": np.array(488448)})
    return run


RUNS = {"sst2": [_run(s) for s in range(3)], "trec": [_run(10 + s) for s in range(3)]}


def test_best_layer_frame():
    frame = page.best_layer_frame(RUNS)
    assert list(frame.index) == ["SST-2", "TREC"]
    assert frame.loc["SST-2", "task vector (layer 3)"].startswith("100.0")
    assert frame.loc["TREC", "zero-shot"].startswith("0.0")
    loyalty = page.best_layer_frame(RUNS, "loyalty")
    assert loyalty.loc["SST-2", "ICL (full prompt)"].startswith("100.0")


def test_layer_figure_draws_every_variant_and_the_baselines():
    fig = page.layer_figure(RUNS)
    ax = fig.axes[0]
    assert len(ax.lines) == len(tv.PATCHED) + 3
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0, 100, 0])
    from helpers.pages.plots import PAGE_WIDTH

    assert fig.get_size_inches()[0] <= PAGE_WIDTH  # at the page's width, so the labels keep their size
    assert fig.axes[0].get_ylabel() == "accuracy (%)" and fig.axes[-1].get_xlabel() == "layer patched"
    fig_l = page.layer_figure(RUNS, "loyalty", variants=("tv",))
    assert len(fig_l.axes[0].lines) == 1


def test_floats_and_glued_values():
    frame = page.floats_frame(RUNS)
    assert frame.loc["SST-2", "Hidden_anchor cache"] == 138240
    values = page.glued(RUNS)
    assert values["layer_tv"] == "3" and values["tv_sst2"].startswith("100.0")
    assert values["n_test"] == "8" and values["n_seeds"] == "3" and values["ratio_anchor_tv"] == "216"
    assert values["maxdiff"] == "2.0e-06" and values["n_layers_run"] == "3"


def _head_run(seed: int, layers: int = 4, heads: int = 3, n: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    induction = rng.uniform(0, 0.05, (layers, heads))
    induction[2, 1] = 0.9
    saliency = rng.normal(0, 0.01, (n, layers, heads, 2))
    saliency[:, 2, 1] = 0.5  # the same head carries the label words' information
    base = np.tile([2.0, 0.0], (n, 1))
    cut = np.tile(base[:, None, None], (1, layers, heads, 1)) + rng.normal(0, 0.01, (n, layers, heads, 2))
    cut[:, 2, 1] = [0.0, 0.0]  # and cutting it costs the prediction
    return {"induction": induction, "saliency": saliency, "isolation/base": base, "isolation/cut": cut,
            "gold": np.zeros(n, dtype=int)}


HEAD_RUNS = {"sst2": [_head_run(s) for s in range(3)], "trec": [_head_run(10 + s) for s in range(3)]}


def test_head_maps_overlap_and_glued_values():
    from helpers.experiments import heads as hd

    fig = page.head_maps_figure(HEAD_RUNS)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 3 and images[0].get_array().shape == (4, 3)
    assert images[0].get_extent()[2:] == [0.5, 4.5]  # rows are layers 1..4, counted from 1 as in the rest of the book
    assert all(len(ax.patches) == hd.default_k(12) for ax in fig.axes if ax.images)  # the top-k heads outlined
    frame = page.overlap_frame(HEAD_RUNS, k=1)
    assert list(frame["top-1 shared"]) == ["1", "1", "1"]
    assert float(frame.loc[frame.index[0], "shuffled: mean"]) == pytest.approx(1 / 12, abs=0.02)
    values = page.heads_glued(HEAD_RUNS, hd.configure("quick"))
    assert values["top_induction"] == values["top_saliency"] == values["top_isolation"] == "layer 3, head 1"  # index 2, counted from 1
    assert values["heads_total"] == "12" and values["heads_n_test"] == "5" and values["heads_n_seeds"] == "3"
    assert values["max_isolation"] == f"{np.log(2) - np.log1p(np.exp(-2)):.2f}"  # log p from 2:0 logits to 0:0
    assert values["heads_length"] == str(hd.configure("quick").length)


def test_finding_values_name_every_row(monkeypatch, tmp_path):
    from helpers.experiments import heads as hd

    monkeypatch.setenv("ANCHORS_RESULTS", str(tmp_path))
    monkeypatch.setattr(hd, "_all_runs", lambda model, profile: {t: HEAD_RUNS["sst2"] for t in
                                                                 ("sst2", "trec", "agnews", "emoc")})
    monkeypatch.setattr(tv, "_all_runs", lambda model, profile: None)
    values = page.finding_values("no-such-model")
    assert values["est_task_vector_recovers"] == "not yet run" and values["n_task_vector_recovers"] == ""
    assert values["est_heads_saliency_isolation"].count("[") == 1 and values["n_heads_saliency_isolation"]


def test_relations_follow_the_intervals():
    values = page.relations(RUNS)
    # every patched variant is right at layer 2 (chosen), zero-shot wrong everywhere, the skeleton right everywhere
    assert values["rel_tv_zero_sst2"] == "above" and values["count_tv_zero"] == "2 of 2"
    assert values["rel_labels_skeleton_trec"] == "level with" and values["count_labels_skeleton"] == "0 of 2"
    assert values["rel_icl_zero_sst2"] == "above" and values["rel_icl_chance_trec"] == "above"
    wrong = {t: [dict(r, **{"tv/pred": np.stack([1 - r["gold"]] * 3)}) for r in rs] for t, rs in RUNS.items()}
    assert page.relations(wrong)["rel_tv_labels_sst2"] == "below"  # a task vector wrong at every layer
