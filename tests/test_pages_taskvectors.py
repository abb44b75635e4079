"""The task-vector chapter's tables, figure and glued values (helpers.pages.taskvectors) on synthetic runs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np

from helpers.experiments import taskvectors as tv
from helpers.pages import taskvectors as page


def _run(seed: int, n: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 2, n)
    run = {"gold": gold, "layers": np.array([0, 2, 4]), "icl/pred": gold.copy(), "zero/pred": 1 - gold,
           "skeleton/pred": gold.copy(), "check/split_max_diff": np.array(2e-6)}
    for v in tv.PATCHED:
        pred = np.stack([1 - gold] * 3)
        pred[1] = gold  # layer 2 is right everywhere
        run[f"{v}/pred"] = pred
    run.update({"floats/tv": np.array(640), "floats/labels": np.array(1280), "floats/both": np.array(1920),
                "floats/anchor_cache": np.array(138240), "floats/full_cache": np.array(488448)})
    return run


RUNS = {"sst2": [_run(s) for s in range(3)], "trec": [_run(10 + s) for s in range(3)]}


def test_best_layer_frame():
    frame = page.best_layer_frame(RUNS)
    assert list(frame.index) == ["SST-2", "TREC"]
    assert frame.loc["SST-2", "task vector (layer 2)"].startswith("100.0")
    assert frame.loc["TREC", "zero-shot"].startswith("0.0")
    loyalty = page.best_layer_frame(RUNS, "loyalty")
    assert loyalty.loc["SST-2", "ICL (full prompt)"].startswith("100.0")


def test_layer_figure_draws_every_variant_and_the_baselines():
    fig = page.layer_figure(RUNS)
    ax = fig.axes[0]
    assert len(ax.lines) == len(tv.PATCHED) + 3
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0, 100, 0])
    fig_l = page.layer_figure(RUNS, "loyalty", variants=("tv",))
    assert len(fig_l.axes[0].lines) == 1


def test_floats_and_glued_values():
    frame = page.floats_frame(RUNS)
    assert frame.loc["SST-2", "Hidden_anchor cache"] == 138240
    values = page.glued(RUNS)
    assert values["layer_tv"] == "2" and values["tv_sst2"].startswith("100.0")
    assert values["n_test"] == "8" and values["n_seeds"] == "3" and values["ratio_anchor_tv"] == "216"
    assert values["maxdiff"] == "2.0e-06" and values["n_layers_run"] == "3"
