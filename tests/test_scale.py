"""The verdict page's scale view: a panel per finding with a number, the paper's number where it gives one, and a
reading that says only what the intervals support."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers.core.stats import Estimate  # noqa: E402
from helpers.pages import scale, verdicts  # noqa: E402

SIZES = {"small": 3e8, "large": 6e8, "unrun": 1e9}
MODELS = ("small", "large", "unrun")


def _m(value, low, high, unit="", n_seeds=3):
    return verdicts.Measured(Estimate(value, low, high, 16, n_seeds, np.array([value] * n_seeds), 0.95),
                             unit=unit, n_seeds=n_seeds)


def _row(fid, small=None, large=None, verdict=verdicts.REPRODUCED):
    row = {"finding": verdicts.FINDINGS[fid], "unrun": (None, verdicts.NOT_YET_RUN)}
    for model, m in (("small", small), ("large", large)):
        row[model] = (m, verdict if m is not None else verdicts.NOT_YET_RUN)
    return row


def _gids(ax) -> dict[str, object]:
    return {a.get_gid(): a for a in ax.get_children() if a.get_gid()}


def test_one_panel_per_finding_with_a_number_and_the_papers_number_where_it_gives_one():
    import matplotlib.pyplot as plt

    from helpers.experiments.compression import PAPER_TABLE2

    rows = [_row("flow-shallow", small=_m(0.58, 0.57, 0.59)),
            _row("flow-deep"),  # no number on any model: no panel
            _row("deep-auc", small=_m(0.65, 0.61, 0.68), large=_m(0.76, 0.74, 0.78)),
            _row("compression-loyalty", large=_m(78.0, 68.0, 88.0, unit="%"), verdict=verdicts.PARTLY)]
    fig = scale.scale_figure(rows, SIZES, MODELS)
    try:
        axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_title(loc="left")]
        assert [ax.get_title(loc="left") for ax in axes] == [scale.SHORT_NAMES[i] for i in ("flow-shallow", "deep-auc", "compression-loyalty")]
        shallow, auc, loyalty = (_gids(ax) for ax in axes)
        assert axes[0].get_xscale() == "log"
        # a not-yet-run model is absent; a model without a number on a finding has no point there
        assert not any("unrun" in g for ax in axes for g in _gids(ax))
        assert "ours-small" in shallow and "ours-large" not in shallow
        assert "ours-large" in loyalty and "ours-small" not in loyalty
        # no paper number for a qualitative finding; "≈ 0.8" from deep-auc's paper text as a line
        assert not any(g.startswith("paper") for g in shallow)
        assert auc["paper-approx"].get_ydata()[0] == pytest.approx(0.8)
        # per-model numbers of Table 2 at the paper models' sizes
        for paper_model, (x, y) in {m: (scale.PAPER_SIZES[m], PAPER_TABLE2[m]["anchor"][0])
                                    for m in PAPER_TABLE2}.items():
            line = loyalty[f"paper-{paper_model}"]
            assert (line.get_xdata()[0], line.get_ydata()[0]) == (x, y)
        # real units on each panel's own y axis; the verdict's colour on the point
        assert axes[2].get_ylabel() == "%" and axes[2].get_ylim()[0] > 1
        assert axes[1].get_ylim()[1] < 1.5
        ours = [c for c in axes[2].get_children() if c.get_gid() == "ours-large"][0]
        assert matplotlib.colors.to_hex(ours.get_color()) == scale.VERDICT_COLORS[verdicts.PARTLY]
        assert fig.get_size_inches()[0] <= 7.0 + 1e-9
    finally:
        plt.close(fig)
    empty = scale.scale_figure([_row("flow-deep")], SIZES, MODELS)
    assert not [ax for ax in empty.axes if ax.get_title(loc="left")]  # no panels, a sentence instead
    plt.close(empty)


def test_the_papers_numbers_come_from_its_tables_and_its_text():
    f = verdicts.FINDINGS
    gain = scale.paper_numbers(f["reweighting-gain"])
    assert list(gain) == ["GPT2-XL"] and f"+{gain['GPT2-XL']:.1f}" in f["reweighting-gain"].paper
    loyalty = scale.paper_numbers(f["compression-loyalty"])
    assert all(f"{v:.2f}" in f["compression-loyalty"].paper for v in loyalty.values()) and len(loyalty) == 2
    assert set(scale.paper_numbers(f["compression-speedup"])) == set(scale.PAPER_SIZES)
    assert scale.paper_numbers(f["deep-auc"]) == {None: 0.8}
    assert scale.paper_numbers(f["isolation-last"]) == {None: 100.0}
    assert scale.paper_numbers(f["flow-shallow"]) == {} == scale.paper_numbers(f["anchors-without-meaning"])


def test_compare_has_three_outcomes():
    a = _m(0.5, 0.4, 0.6)
    assert scale.compare(a, _m(0.8, 0.7, 0.9)) == "grows"
    assert scale.compare(a, _m(0.2, 0.1, 0.3)) == "shrinks"
    assert scale.compare(a, _m(0.65, 0.55, 0.75)) == "cannot be told apart"


def test_the_reading_groups_the_findings_by_outcome_and_leaves_out_what_cannot_be_compared():
    rows = [_row("deep-auc", small=_m(0.65, 0.61, 0.68), large=_m(0.76, 0.74, 0.78)),
            _row("diagnosis", small=_m(0.5, 0.4, 0.6), large=_m(0.2, 0.1, 0.3)),
            _row("two-shot", small=_m(0.1, 0.0, 0.2), large=_m(0.12, 0.05, 0.2)),
            _row("flow-shallow", small=_m(0.58, 0.57, 0.59))]  # one model only: not compared
    rows.append({"finding": verdicts.FINDINGS["reweighting-gain"], "unrun": (None, verdicts.NOT_YET_RUN),
                 "small": (_m(14.0, 9.0, 20.0), verdicts.REPRODUCED),
                 "large": (_m(5.0, 0.4, 11.0, n_seeds=1), verdicts.TOO_FEW_SEEDS)})
    text = scale.scale_reading(rows, SIZES, MODELS)
    assert "From small (300M parameters) to large (600M)" in text
    assert "grows: deep-layer AUCROC (0.65 [0.61, 0.68] → 0.76 [0.74, 0.78])" in text
    assert "shrinks: confusion diagnosis ρ (0.50 [0.40, 0.60] → 0.20 [0.10, 0.30])" in text
    assert "cannot be told apart: R_l, two per class." in text
    assert "S_wp leads" not in text and "unrun" not in text
    assert "Not compared" in text and "re-weighting gain (large: too few seeds)" in text
    assert "not a law of scale" in text
    none = scale.scale_reading([_row("flow-shallow", small=_m(0.58, 0.57, 0.59))], SIZES, MODELS)
    assert none.startswith("No finding has a number on two of our models yet")
    facts = scale.scale_facts(rows, SIZES, MODELS)
    assert facts["scale_sizes"] == "small 300M and large 600M" and facts["scale_panels"] == "5"
    assert facts["scale_absent"] == "unrun has none" and facts["scale_n"].startswith("16 test examples")
    assert facts["scale_paper_sizes"] == "GPT2-XL 1.5B, GPT-J 6B"


def test_size_text():
    assert [scale.size_text(n) for n in (268_098_176, 630_167_424, 1.5e9, 6e9)] == ["268M", "630M", "1.5B", "6B"]


def test_parameter_count_is_computed_once_from_the_loaded_model(monkeypatch, tiny_models):
    from types import SimpleNamespace

    from helpers.core import models

    monkeypatch.delenv("ANCHORS_SUMMARIES", raising=False)  # kept in memory only
    model = tiny_models("gpt2")  # ties its input and output embeddings: counted once
    loads = []
    monkeypatch.setattr(models, "model_identity", lambda name, **kw: {"kind": "test", "name": name})
    monkeypatch.setattr(models, "load_model", lambda name: loads.append(name) or SimpleNamespace(model=model))
    expected = sum(p.numel() for p in model.parameters())
    assert expected < sum(p.numel() for p in model.state_dict().values())
    assert scale.parameter_count("tiny-scale-test") == expected
    assert scale.parameter_count("tiny-scale-test") == expected and loads == ["tiny-scale-test"]

    def missing(name):
        raise ModuleNotFoundError("not installed")

    monkeypatch.setattr(models, "load_model", missing)
    assert scale.parameter_count("tiny-scale-test-missing") is None


def test_every_finding_has_a_short_name_for_the_reader():
    assert set(scale.SHORT_NAMES) == set(verdicts.FINDINGS)
