"""Intervals of the aggregation chapter: flow curves, the S_pq - S_wp gap, where S_pq leads, loyalties."""

import numpy as np
import pytest

from helpers.experiments.aggregation import (flow_curves, flow_estimate, flow_gap_estimate, lead_layers, loyalty_difference,
                                 loyalty_estimates, loyalty_table)
from helpers.core.stats import Estimate


def _flows(rng, n=20, layers=6):
    f = rng.random((n, 3, layers)) * 0.1
    f[:, 0, :3] += 1.0  # S_wp leads in layers 1-3
    f[:, 1, 3:] += 1.0  # S_pq leads from layer 4
    f[:, 0, 4] += 3.0  # ... except layer 5
    return f


def test_flow_estimate_value_is_the_papers_aggregation():
    rng = np.random.default_rng(0)
    runs = [_flows(rng) for _ in range(3)]
    est = flow_estimate(runs, n_boot=100)
    np.testing.assert_allclose(est.value, flow_curves(runs))
    assert est.low.shape == (3, 6) and np.all(est.low <= est.value + 1e-12)


def test_lead_layers_finds_first_lead_for_good_and_flip_backs():
    rng = np.random.default_rng(1)
    gap = flow_gap_estimate([_flows(rng) for _ in range(3)], n_boot=100)
    lead = lead_layers(gap)
    assert lead["first"] == 4 and lead["for_good"] == 6
    assert lead["flip_backs"] == [5] and lead["clear_flip_backs"] == [5] and lead["per_seed_agree"]


def _iso_run(rng, n=16):
    ref = rng.integers(0, 2, n)
    top = np.tile(np.arange(10), (n, 1))
    flipped = ref.copy()
    flipped[: n // 2] = 1 - flipped[: n // 2]  # label words first: half the predictions change
    return {"gold": ref, "none/pred": ref, "none/top": top,
            "label-first-5/pred": flipped, "label-first-5/top": top + 100,
            "random-first-5/pred": ref, "random-first-5/top": top}


def test_loyalty_estimates_match_the_table_and_differences_are_paired():
    rng = np.random.default_rng(2)
    runs = [_iso_run(rng) for _ in range(3)]
    est = loyalty_estimates(runs, ks=(5,), n_boot=200)
    table = loyalty_table(runs, ks=(5,))
    for cond in table:
        for metric, value in table[cond].items():
            assert isinstance(est[cond][metric], Estimate)
            assert est[cond][metric].value == pytest.approx(value)
    assert est["label-first-5"]["label loyalty"].value == pytest.approx(50.0)
    assert est["label-first-5"]["word loyalty@5"].value == 0.0
    diff = loyalty_difference(runs, "random-first-5", "label-first-5", n_boot=200)
    assert diff.value == pytest.approx(50.0) and diff.above(0)


def test_gap_over_layers_and_ww_share():
    from helpers.experiments.aggregation import gap_over_layers, ww_smallest_share

    rng = np.random.default_rng(4)
    runs = [_flows(rng) for _ in range(3)]
    assert gap_over_layers(runs, 1, 3, n_boot=100).below(0)
    assert gap_over_layers(runs, 6, 6, n_boot=100).above(0)
    share = ww_smallest_share(runs, n_boot=100)
    assert 0 <= share.low <= share.value <= share.high <= 1
    with pytest.raises(ValueError):
        gap_over_layers(runs, 3, 2)


def test_saliency_position_control_shares_the_matrices_and_avoids_label_words(offline_tokenizers, data_dir):
    """The control's flows come from the same backward pass: the real half equals the plain flows, and the random
    positions are demonstration tokens that are not label words."""
    import numpy as np
    from conftest import tiny_loaded_model

    from helpers.core.runs import make_prompts
    from helpers.core.saliency import random_non_label_positions, saliency_flow
    from helpers.core.tasks import load_task

    lm = tiny_loaded_model("llama", offline_tokenizers["smollm2-135m"], "tiny-llama")
    data = load_task("sst2", data_dir)
    prompts = make_prompts(lm, data, seed=42, n_test=3, shots_per_class=1, per_example=True)
    plain = saliency_flow(lm, data.task, prompts, batch_size=2, progress=False)
    both = saliency_flow(lm, data.task, prompts, batch_size=2, progress=False, control_seed=7)
    assert both.shape == (3, 2, *plain.shape[1:])
    np.testing.assert_allclose(both[:, 0], plain, rtol=1e-6, atol=1e-12)
    assert not np.allclose(both[:, 1], both[:, 0])
    rng = np.random.default_rng(7)
    for p in prompts:
        pos = random_non_label_positions(p, rng)
        labels = {i for a, b in p.label_spans for i in range(a, b)}
        assert len(pos) == len(p.label_positions) and not labels & set(pos) and max(pos) < p.query_start


def test_crossover_estimate_is_the_papers_crossover_with_an_interval():
    """The point value is :func:`crossover_layer` of :func:`flow_curves` (1-based); a clear crossover gives a point
    interval; flows where S_pq never leads give "never"."""
    from helpers.core.stats import layer_text
    from helpers.experiments.aggregation import crossover_estimate, crossover_layer, flow_curves

    rng = np.random.default_rng(3)
    layers = 8
    per_seed = []
    for _ in range(3):
        f = rng.random((20, 3, layers)) * 0.1
        f[:, 0, :4] += 1.0  # S_wp leads in layers 1-4
        f[:, 1, 4:] += 1.0  # S_pq from layer 5
        per_seed.append(f)
    est = crossover_estimate(per_seed, n_boot=200)
    assert est.value == crossover_layer(flow_curves(per_seed)) + 1 == 5
    assert layer_text(est, layers) == "5 [5, 5]"
    never = [rng.random((20, 3, layers)) * 0.1 + np.array([1.0, 0.0, 0.0])[None, :, None] for _ in range(3)]
    assert layer_text(crossover_estimate(never, n_boot=50), layers) == "never"


def test_a_second_model_runs_the_first_three_book_seeds_and_the_default_all():
    from helpers.core.models import DEFAULT_MODEL
    from helpers.core.runs import PROFILES
    from helpers.experiments.aggregation import EXPERIMENT, aggregation_seeds, configure

    book, paper = PROFILES["book"], PROFILES["paper"]
    assert aggregation_seeds(book, DEFAULT_MODEL) == tuple(book.seeds)
    assert aggregation_seeds(book, "qwen2.5-coder-0.5b") == tuple(book.seeds[:3]) and len(book.seeds) > 3
    assert aggregation_seeds(paper, "qwen2.5-coder-0.5b") == tuple(paper.seeds)
    assert tuple(EXPERIMENT.seeds(configure("book"), "qwen2.5-coder-0.5b")) == tuple(book.seeds[:3])


def test_a_second_model_isolates_only_the_papers_k_and_the_default_every_k():
    from helpers.core.models import DEFAULT_MODEL
    from helpers.core.runs import PROFILES
    from helpers.experiments.aggregation import KS, SHALLOW_K, aggregation_ks

    assert aggregation_ks(PROFILES["book"], DEFAULT_MODEL) == KS
    assert aggregation_ks(PROFILES["book"], "qwen2.5-coder-0.5b") == (SHALLOW_K,)
    assert aggregation_ks(PROFILES["paper"], "qwen2.5-coder-0.5b") == KS
