"""The "Anchors without meaning" chapter's book layer (helpers.pages.meaning): its tables, figures and glued values.

Fast, no model: a tiny synthetic set of runs with the structure :func:`helpers.experiments.meaning.chapter_runs`
returns (two models, three tasks, the four regimes, one and four demonstrations per class on SST-2 for the first
model), built so that the accuracies, loyalties and crossover layers are known by hand; and one slice of the
committed results (the first book model on SST-2), whose numbers must be those of the published book.
"""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from helpers import TASKS
from helpers.core.tasks import Example, TaskData
from helpers.experiments.meaning import REGIMES, SEVERAL_SHOTS, MeaningConfig, Scope
from helpers.pages import meaning as page

N, L = 6, 6  # examples per seed, layers
K = 2  # isolation_k of the tiny config (not the book's 5: the pages must follow the config)
CONFIG = MeaningConfig("tiny", seeds=(1, 2), n_test=N, n_test_isolation=N, n_test_saliency=N, isolation_k=K)
TASK_NAMES = ("sst2", "trec", "emoc")
SCOPES = {"model-a": Scope(seeds=(1, 2), tasks=TASK_NAMES),
          "model-b": Scope(seeds=(1,), tasks=TASK_NAMES, several_tasks=())}
GOLD = {"sst2": np.array([0, 1, 0, 1, 0, 1]), "trec": np.arange(6), "emoc": np.array([0, 0, 0, 1, 2, 3])}
# SST-2 predictions (flipped: in the flipped words' class order): natural 4/6 right; flipped 4/6 mean the true class
# and 2/6 follow the flip; abstract always " A" (one class); random all right.
SST2_PRED = {"natural": [0, 1, 0, 1, 1, 0], "flipped": [0, 1, 1, 0, 1, 0], "abstract": [0] * 6,
             "random": [0, 1, 0, 1, 0, 1]}


def _attention(task: str, regime: str) -> dict[str, np.ndarray]:
    gold = GOLD[task]
    pred = np.array(SST2_PRED[regime]) if task == "sst2" else gold.copy()
    att = np.full((N, L, TASKS[task].n_classes), 0.1, dtype=np.float32)
    att[np.arange(N), :, pred] += np.arange(1, L + 1) / L  # deep layers attend to the predicted class's word
    return {"attention": att, "pred": pred, "gold": gold}


def _isolation(regime: str) -> dict[str, np.ndarray]:
    none = np.array(SST2_PRED[regime])
    first = none.copy()
    if regime != "abstract":  # isolating the first k layers changes 5 of 6 predictions, the last k none
        first[:5] = 1 - first[:5]
    top = np.tile(np.arange(10), (N, 1))
    return {"none/pred": none, "none/top": top, f"label-first-{K}/pred": first, f"label-first-{K}/top": top + 1,
            f"label-last-{K}/pred": none.copy(), f"label-last-{K}/top": top, "gold": GOLD["sst2"]}


def _flows(reading: bool = True) -> np.ndarray:
    """(N, 3, L): S_wp falls and S_pq rises with depth, S_pq first ahead at layer 4 (``reading=False``: never)."""
    wp, pq = np.arange(L, 0, -1.0), np.arange(1, L + 1.0)
    if not reading:
        pq = wp / 4
    return np.tile(np.stack([wp, pq, np.ones(L)]), (N, 1, 1))


def _runs(model: str) -> dict:
    scope = SCOPES[model]
    out = {"attention": {}, "isolation": {}, "saliency": {}}
    for t in scope.tasks:
        for r in REGIMES:
            shots_list = [1] + ([SEVERAL_SHOTS] if t in scope.several_tasks else [])
            for shots in shots_list:
                seeds = scope.seeds_for(shots)
                out["attention"][t, r, shots] = [_attention(t, r) for _ in seeds]
                if t in scope.analysis_tasks:
                    out["isolation"][t, r, shots] = [_isolation(r) for _ in seeds]
                    reading = not (model == "model-b" and r == "random")
                    out["saliency"][t, r, shots] = [_flows(reading) for _ in seeds]
    return out


def res_of() -> page.MeaningResults:
    return page.MeaningResults({m: _runs(m) for m in SCOPES}, SCOPES, CONFIG)


@pytest.fixture(scope="module")
def res() -> page.MeaningResults:
    return res_of()


@pytest.fixture
def drawn():
    """Draw a figure to PNG (it must render, not only build); every figure drawn is closed after the test."""
    figs = []

    def draw(fig):
        assert isinstance(fig, Figure)
        figs.append(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        assert buf.getvalue()[:4] == b"\x89PNG"
        return fig

    yield draw
    for fig in figs:
        plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------
# The regimes
# --------------------------------------------------------------------------------------------------------------------


def test_words_table_lists_each_regimes_words():
    styler = page.words_table()
    df = styler.data
    assert list(df.index) == ["SST-2", "TREC", "AG News", "EmoC"]
    assert list(df.columns) == ["natural", "abstract", "flipped", "random"]
    assert df.loc["SST-2", "natural"] == "Negative / Positive"
    assert df.loc["SST-2", "abstract"] == "A / B"
    assert df.loc["SST-2", "flipped"] == "Positive / Negative"
    assert df.loc["AG News", "flipped"] == "Sports / Business / Technology / World"
    assert styler.caption.startswith("The label words of each regime")


def test_example_prompts_show_each_regimes_words():
    train = tuple(Example(f"review {i} {'good' if i % 2 else 'bad'}", i % 2) for i in range(8))
    data = TaskData(TASKS["sst2"], train, (Example("a moving film", 1),), "synthetic")
    text = page.example_prompts(data, seed=3)
    blocks = text.split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == [f"--- {r} ---" for r in REGIMES]
    assert all(b.rstrip().endswith("Sentiment:   [gold: Positive]") for b in blocks)
    assert "Sentiment: A" in blocks[1] and "Sentiment: B" in blocks[1] and "Negative" not in blocks[1]
    natural = [line for line in blocks[0].splitlines() if line.startswith("Sentiment:") and "[gold" not in line]
    flipped = [line for line in blocks[2].splitlines() if line.startswith("Sentiment:") and "[gold" not in line]
    swap = {"Sentiment: Negative": "Sentiment: Positive", "Sentiment: Positive": "Sentiment: Negative"}
    assert flipped == [swap[w] for w in natural] and len(natural) == 2
    assert text.endswith("]\n") and "Review: a moving film..." in blocks[3]


def test_size_values(res):
    assert res.key("model-a") == "1" and res.key("model-b") == "2"
    assert page.size_values(res) == {
        "k_iso": K, "several": SEVERAL_SHOTS, "model_name": "model-a", "second_name": "model-b",
        "seeds1": "1, 2", "n_att1": "6 × 2", "n_iso1": "6 × 2", "n_sal1": "6 × 2",
        "n_several1": "6 × 2", "seeds_several1": "1, 2",
        "seeds2": "1", "n_att2": "6 × 1", "n_iso2": "6 × 1", "n_sal2": "6 × 1",
        "n_several2": "not run", "seeds_several2": "not run"}
    one = page.MeaningResults({"model-a": res.runs["model-a"]}, SCOPES, CONFIG)
    assert page.size_values(one)["second_name"] == "(none)"


# --------------------------------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------------------------------


def test_accuracy_values(res):
    v = page.accuracy_values(res)
    assert v["acc1_sst2_natural"].startswith("66.7 [")
    assert v["acc1_sst2_flipped"].startswith("66.7 [") and v["follow1_sst2"].startswith("33.3 [")
    assert v["acc1_sst2_abstract"].startswith("50.0 [") and v["acc1_sst2_random"].startswith("100.0 [")
    assert v["acc2_trec_natural"].startswith("100.0 [")
    assert v["acc1_sst2_abstract_several"].startswith("50.0 [") and "acc2_sst2_natural_several" not in v
    assert v["abstract_classes1"] == 1 and type(v["abstract_classes1"]) is int
    assert v["abstract_classes1_several"] == 1 and "abstract_classes2_several" not in v
    assert v["emoc_majority"] == "50"
    assert {f"acc{k}_{t}_{r}" for k in "12" for t in TASK_NAMES for r in REGIMES} <= set(v)


def test_accuracy_table(res):
    styler = page.accuracy_table(res)
    df = styler.data
    assert list(df.columns) == list(REGIMES) + ["flipped: follows the flip"]
    assert list(df.index.names) == ["model", "task", "per class"]
    assert len(df) == 3 + 1 + 3  # model-a: three tasks and SST-2 with 4 per class; model-b: three tasks
    row = df.loc[("model-a", "SST-2", 1)]
    assert row["natural"].startswith("66.7 [") and not row["natural"].endswith("(1 class)")
    assert row["abstract"].endswith(" (1 class)") and row["flipped: follows the flip"].startswith("33.3 [")
    assert df.loc[("model-a", "SST-2", SEVERAL_SHOTS), "abstract"].endswith(" (1 class)")
    assert styler.caption.endswith("n = 6 examples × 2 seeds for model-a, × 1 for model-b.")


def test_accuracy_figure(res, drawn):
    fig = drawn(page.accuracy_figure(res))
    assert len(fig.axes) == 2
    assert tuple(fig.get_size_inches()) == pytest.approx((7.0, 2.7 * 2 + 0.7))
    a, b = fig.axes
    assert [t.get_text() for t in a.get_xticklabels()] == ["SST-2\n1 per class", "TREC\n1 per class",
                                                           "EmoC\n1 per class", "SST-2\n4 per class"]
    assert len(a.containers) == 4 * 5 and len(b.containers) == 3 * 5  # 4 regimes + the flip's open point
    assert a.get_ylabel() == "model-a\n% of examples"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == list(REGIMES)[:3] + ["flipped: follows the flip", "random", "chance (100/C)"]


# --------------------------------------------------------------------------------------------------------------------
# The saliency flow and isolation
# --------------------------------------------------------------------------------------------------------------------


def test_crossover_values_and_table(res):
    v = page.crossover_values(res)
    assert v["cross1_natural_1"] == "4 [4, 4]" and v["cross1_abstract_4"] == "4 [4, 4]"
    assert v["cross2_random_1"] == "never" and "cross2_natural_4" not in v
    df = page.crossover_table(res).data
    assert list(df.index.names) == ["model", "per class", "regime"]
    assert df.loc[("model-a", 1, "natural"), "S_pq > S_wp from layer"] == "4 [4, 4] of 6"
    assert df.loc[("model-b", 1, "random"), "S_pq > S_wp from layer"] == "never"
    assert df.loc[("model-a", 1, "natural"), "n"] == "6 × 2"
    assert df.loc[("model-a", 1, "natural"), "gap, last third"].startswith("0.")  # S_pq ahead in deep layers
    assert df.loc[("model-a", 1, "natural"), "gap, first third of the layers"].startswith("-0.")


def test_flow_figure(res, drawn):
    fig = drawn(page.flow_figure(res))
    assert len(fig.axes) == 4
    assert tuple(fig.get_size_inches()) == pytest.approx((7.0, 2.6 * 2 + 0.8))
    a1, a4, b1, b4 = fig.axes
    assert a1.get_title() == "model-a\nSST-2, 1 per class (n = 6 × 2)"
    assert len(a1.get_lines()) == 4 + 1  # four regimes and the zero line
    assert not b4.axison and [t.get_text() for t in b4.texts] == ["not run on this model"] and not b4.lines  # no empty plot
    assert b1.axison and b1.get_title() == "model-b\nSST-2, 1 per class (n = 6 × 1)"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(REGIMES)


def test_isolation_values_and_table(res):
    v = page.isolation_values(res)
    assert v["first1_natural_1"].startswith("17 [") and v["last1_natural_1"].startswith("100 [")
    assert v["igap1_natural_1"].startswith("83 [")
    assert v["first1_abstract_4"].startswith("100 [") and v["igap1_abstract_4"].startswith("0 [")
    assert "first2_natural_4" not in v and "first2_random_1" in v
    styler = page.isolation_table(res)
    df = styler.data
    assert list(df.columns) == [f"first {K}", f"last {K}", "last minus first (points)", "n"]
    assert df.loc[("model-b", 1, "natural"), "n"] == "6 × 1"
    assert f"first / last {K} layers" in styler.caption


def test_isolation_figure(res, drawn):
    fig = drawn(page.isolation_figure(res))
    assert len(fig.axes) == 4
    assert tuple(fig.get_size_inches()) == pytest.approx((7.0, 2.6 * 2 + 0.8))
    a1, a4, b1, b4 = fig.axes
    assert len(a1.patches) == 2 * len(REGIMES)
    assert [round(p.get_height()) for p in a1.patches[:2]] == [17, 100]  # natural: first k, last k
    assert a4.get_title() == "model-a\nSST-2, 4 per class (n = 6 × 2)"
    assert not b4.axison and [t.get_text() for t in b4.texts] == ["not run on this model"] and not b4.patches
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [f"label words, first {K} layers", f"label words, last {K} layers"]
    assert f"first or last {K} layers" in fig.get_suptitle()


# --------------------------------------------------------------------------------------------------------------------
# AUCROC_l
# --------------------------------------------------------------------------------------------------------------------


def test_deep_auc_values_and_table(res):
    v = page.deep_auc_values(res)
    assert set(v) == {f"deep{k}_{r}" for k in "12" for r in REGIMES}
    assert v["deep1_natural"].startswith("1.00 [")  # deep attention follows the prediction exactly
    styler = page.auc_table(res)
    df = styler.data
    assert list(df.columns) == ["mean of 3 tasks", "SST-2", "TREC", "EmoC", "n per task"]
    assert df.loc[("model-a", "abstract"), "SST-2"] == "undefined"  # one class predicted
    assert df.loc[("model-a", "natural"), "SST-2"].startswith("1.00 [")
    assert df.loc[("model-b", "natural"), "n per task"] == "6 × 1"
    assert "undefined" in styler.caption


def test_auc_figure(res, drawn):
    fig = drawn(page.auc_figure(res))
    assert len(fig.axes) == 2 * 3
    assert tuple(fig.get_size_inches()) == pytest.approx((7.0, 2.3 * 2 + 0.9))
    sst2 = fig.axes[0]
    assert len(sst2.get_lines()) == 3 + 2  # abstract's curve missing (one class), and chance and 0.8
    assert len(fig.axes[1].get_lines()) == 4 + 2
    assert [a.get_title() for a in fig.axes[:3]] == ["SST-2", "TREC", "EmoC"] and fig.axes[3].get_title() == ""
    assert fig.axes[3].get_ylabel() == "model-b\nAUCROC$_l$"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(REGIMES)


# --------------------------------------------------------------------------------------------------------------------
# Appendix F.2 and the verdict
# --------------------------------------------------------------------------------------------------------------------


def test_f2_values_and_table(res):
    v = page.f2_values(res)
    assert v["f2_shots1"] == SEVERAL_SHOTS and v["f2_shots2"] == 1
    assert v["f2_acc1"].startswith("50.0 [") and v["f2_classes1"] == 1 and type(v["f2_classes1"]) is int
    assert v["f2_first1"].startswith("100 [") and v["f2_last2"].startswith("100 [")
    assert v["f2_igap1"].startswith("0 [") and v["f2_igap_seeds1"] == "0 / 0"  # abstract: isolation changes nothing
    assert v["f2_answers_a1"] == "6 / 6 of 6" and v["f2_answers_a2"] == "6 of 6"  # " A" for every example
    df = page.f2_table(res).data
    assert list(df.index) == ["paper, LLaMA-33B, 8 per class", "model-a, 4 per class (n = 6 × 2)",
                              "model-b, 1 per class (n = 6 × 1)"]
    assert df.loc["paper, LLaMA-33B, 8 per class", "accuracy %"] == "83.0"
    assert df.loc["model-a, 4 per class (n = 6 × 2)", "deep AUCROC"] == "undefined: predicts 1 class(es)"
    assert df.loc["model-a, 4 per class (n = 6 × 2)", f"label loyalty, first {K} layers isolated"].endswith("%")


def test_verdict_values(res):
    v = page.verdict_values(res)
    assert v["verdict1_natural"] == "(reference)"
    assert v["holding1_natural"] == "shallow isolation, deep flow, deep AUCROC"
    assert v["verdict1_random"] == "position" and v["verdict1_flipped"] == "position"
    # abstract labels at chance (50.0% on SST-2, one class): no mapping to anchor, the verdict page's word
    assert v["verdict1_abstract"] == "not testable on this model (SST-2 accuracy at chance; one class predicted)"
    assert v["verdict2_abstract"].startswith("not testable on this model (")
    assert v["holding1_abstract"] == "deep flow, deep AUCROC"  # nothing for isolation to change
    assert v["holding2_random"] == "shallow isolation, deep AUCROC"  # S_pq never ahead on model-b
    assert v["verdict2_random"] == "inconclusive"


def test_abstract_labels_above_chance_get_the_signature_verdict(monkeypatch):
    """Only where the letters work (SST-2 accuracy above chance) do the signatures decide the abstract verdict."""
    assert res_of().at_chance("model-a", "abstract") and not res_of().at_chance("model-a", "random")
    monkeypatch.setitem(SST2_PRED, "abstract", list(GOLD["sst2"]))  # every review right, both classes
    working = res_of()
    assert not working.at_chance("model-a", "abstract")
    # the deep flow and AUCROC hold, shallow isolation does not (nothing changes when the first layers are cut)
    assert working.holding("model-a", "abstract") == "deep flow, deep AUCROC"
    assert working.verdicts["model-a", "abstract"] == "inconclusive"
    assert working.verdicts["model-a", "flipped"] == "position"  # a regime with meaning is never "not testable"


def test_summary_table(res):
    styler = page.summary_table(res)
    df = styler.data
    assert list(df.index.names) == ["model", "regime"] and len(df) == 2 * len(REGIMES)
    a, b = df.loc[("model-a", "flipped")], df.loc[("model-b", "random")]
    assert a["SST-2 accuracy %, 1 per class"].startswith("66.7 [") and "; follows flip 33.3 [" in a[
        "SST-2 accuracy %, 1 per class"]
    assert a[f"{SEVERAL_SHOTS} per class"].startswith("66.7 [")
    assert a["crossover layer (1 / several per class)"] == "4 [4, 4] / 4 [4, 4] of 6"
    assert b["crossover layer (1 / several per class)"] == "never / not run of 6"
    assert b[f"{SEVERAL_SHOTS} per class"] == "not run"
    assert a[f"label loyalty, first {K} / last {K}"].startswith("17 [")
    assert a["verdict"] == "position" and b["verdict"] == "inconclusive"
    assert df.loc[("model-a", "abstract"), "verdict"].startswith("not testable on this model")
    assert "'not testable on this model': abstract labels whose SST-2 accuracy is not above chance" in styler.caption
    assert "deep AUCROC (3 tasks)" in df.columns
    assert styler.caption.endswith("examples × 2 seeds; model-b × 1 seed(s).")


# --------------------------------------------------------------------------------------------------------------------
# A slice of the committed results: the published numbers
# --------------------------------------------------------------------------------------------------------------------


# The published chapter's numbers for Gemma 3 270M on SST-2, one demonstration per class (seeds 42, 43, 44; intervals
# from the hierarchical bootstrap over seeds, then examples).
BOOK_SST2 = {
    "acc1_sst2_natural": "72.9 [55.2, 89.6]", "acc1_sst2_abstract": "42.7 [33.3, 53.1]",
    "acc1_sst2_flipped": "59.4 [47.9, 69.8]", "acc1_sst2_random": "84.4 [76.0, 91.7]",
    "follow1_sst2": "40.6 [30.2, 52.1]", "abstract_classes1": 1,
    "first1_natural_1": "62 [46, 79]", "first1_abstract_1": "100 [100, 100]", "first1_flipped_1": "81 [65, 94]",
    "first1_random_1": "75 [60, 88]", "last1_natural_1": "90 [79, 98]", "last1_abstract_1": "100 [100, 100]",
    "last1_flipped_1": "98 [92, 100]", "last1_random_1": "92 [83, 98]", "igap1_natural_1": "27 [12, 46]",
    "igap1_abstract_1": "0 [0, 0]", "igap1_flipped_1": "17 [4, 31]", "igap1_random_1": "17 [4, 31]",
    "cross1_natural_1": "6 [6, 6]", "cross1_abstract_1": "6 [6, 6]", "cross1_flipped_1": "6 [6, 6]",
    "cross1_random_1": "6 [6, 6]"}


def test_committed_sst2_slice_gives_the_books_numbers(data_dir):
    """The first book model on SST-2, one demonstration per class, read from the committed results: its accuracies,
    loyalties and crossover layers are the values the published chapter glues (pinned in :data:`BOOK_SST2`), and
    abstract labels are at chance there, so their verdict is "not testable on this model"."""
    from helpers import load_task
    from helpers.core.runs import ModelKey
    from helpers.experiments import meaning

    model, config = "gemma-3-270m", meaning.CONFIGS["book"]
    scope = Scope(seeds=meaning.BOOK_SCOPES[model].seeds, tasks=("sst2",), several_tasks=())
    key, sst2 = ModelKey.of(model), load_task("sst2", data_dir)
    runs = {"attention": {}, "isolation": {}, "saliency": {}}
    for r in REGIMES:
        d = meaning.regime_data(sst2, r)
        for kind, fn in (("attention", meaning.attention_runs), ("isolation", meaning.isolation_runs),
                         ("saliency", meaning.saliency_runs)):
            got = fn(key, d, config, shots=1, seeds=scope.seeds, lookup_only=True)
            assert all(x is not None for x in got), f"no committed {kind} run for {model}, {r}"
            runs[kind]["sst2", r, 1] = got
    res = page.MeaningResults({model: runs}, {model: scope}, config)
    ours = {**page.accuracy_values(res), **page.isolation_values(res), **page.crossover_values(res)}
    names = [f"{what}1_sst2_{r}" for what in ("acc",) for r in REGIMES] + ["follow1_sst2", "abstract_classes1"]
    names += [f"{what}1_{r}_1" for what in ("first", "last", "igap", "cross") for r in REGIMES]
    assert {n: ours[n] for n in names} == BOOK_SST2
    assert res.at_chance(model, "abstract") and not res.at_chance(model, "natural")
    assert res.verdicts[model, "abstract"].startswith("not testable on this model")
