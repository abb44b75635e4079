"""The committed compression results are what the code computes: recompute a slice with the real default model."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"


@pytest.fixture(scope="module")
def lm():
    from helpers import load_model

    return load_model(MODEL)


@pytest.fixture(scope="module")
def sst2(data_dir):
    from helpers import load_task

    return load_task("sst2", data_dir)


def test_table2_slice(lm, sst2):
    from helpers.experiments.compression import compression_run, table2_n_test, text_anchor_text, top_k_jaccard
    from helpers.core.runs import PROFILES, ModelKey, cached_run, make_prompts, settings_of
    from helpers.core.tasks import sample_fixed_demonstrations, subsample_test

    profile = PROFILES["book"]
    n, n_random = table2_n_test(profile, MODEL), profile.n_random_compression
    from helpers.experiments.compression import TABLE2_VARIANTS

    settings = settings_of(profile, seed=42, shots=1, n_test=n, n_random=n_random, variants=list(TABLE2_VARIANTS))
    committed = cached_run("compression", ModelKey.of(MODEL), sst2, settings, None)
    assert committed is not None, "committed compression results missing or stale (key changed?)"
    k = 4
    prompts = make_prompts(lm, sst2, 42, n, 1)[:k]
    demos = [sst2.train[j] for j in sample_fixed_demonstrations(sst2, 1, 42)[0]]
    texts = [text_anchor_text(sst2.task, demos, sst2.test[i]) for i in subsample_test(sst2, 42, n)[:k]]
    fresh = compression_run(lm, sst2.task, prompts, texts, seed=42, n_random=2, batch_size=4, progress=False,
                            variants=("full", "anchor", "anchor-nobos", "text", "random"))
    for v in ("full", "anchor", "anchor-nobos", "text"):
        np.testing.assert_array_equal(fresh[f"{v}/pred"], committed[f"{v}/pred"][:k], err_msg=v)
        assert top_k_jaccard(fresh[f"{v}/top"], committed[f"{v}/top"][:k]).mean() >= 0.95, v
    np.testing.assert_array_equal(fresh["random/pred"], committed["random/pred"][:2, :k])
    assert float(committed["check/full_prompt_max_diff"]) < 1e-3
    assert int(fresh["kept/anchor"]) == int(committed["kept/anchor"])


def test_extras_slice(lm, sst2):
    """The runs beside Table 2 (formatting-only cache and zero demonstrations; positions restarted at 0): a slice
    recomputed equals the committed one, and its full ICL (default positions) is Table 2's."""
    from helpers.experiments.compression import compression_run, compression_runs, table2_extras
    from helpers.core.runs import PROFILES, ModelKey, make_prompts

    profile = PROFILES["book"]
    committed = table2_extras(ModelKey.of(MODEL), sst2, profile, seeds=[42], lookup_only=True)
    assert all(r[0] is not None for r in committed.values()), "committed extras missing or stale (key changed?)"
    table2 = compression_runs(ModelKey.of(MODEL), sst2, profile, seeds=[42], lookup_only=True)[0]
    k = 4
    prompts = make_prompts(lm, sst2, 42, len(table2["gold"]), 1)[:k]
    fresh = compression_run(lm, sst2.task, prompts, seed=42, n_random=0, variants=("full", "formatting", "zero-shot"),
                            batch_size=4, progress=False)
    restarted = compression_run(lm, sst2.task, prompts, seed=42, n_random=0, variants=("full", "anchor"),
                                batch_size=4, progress=False, restart_positions=True)
    for part, run, variants in [("formatting and zero-shot", fresh, ("full", "formatting", "zero-shot")),
                                ("restarted positions", restarted, ("full", "anchor"))]:
        for v in variants:
            np.testing.assert_array_equal(run[f"{v}/pred"], committed[part][0][f"{v}/pred"][:k], err_msg=(part, v))
    np.testing.assert_array_equal(committed["formatting and zero-shot"][0]["full/pred"], table2["full/pred"])
    assert float(committed["restarted positions"][0]["check/full_prompt_max_diff"]) > 1  # restarted: not the prompt


def test_bench_file_is_consistent(lm, sst2):
    from helpers.cli.bench import bench_path
    from helpers.experiments.compression import anchor_positions, demonstration_split
    from helpers.core.runs import make_prompts

    path = bench_path(MODEL)
    assert path.exists(), path
    bench = json.loads(path.read_text())
    for b, r in bench["tasks"]["sst2"].items():
        prompts = make_prompts(lm, sst2, 42, r["n"], r["shots"])
        prefix, suffixes = demonstration_split(prompts)
        assert r["L_prefix"] == len(prefix)
        assert r["L_x"] == pytest.approx(np.mean([len(s) for s in suffixes]))
        assert r["ceiling"] == pytest.approx(sum(len(p) for p in prompts) / sum(len(s) for s in suffixes))
        assert r["kept"] == len(anchor_positions(prompts[0]))
        ratios = [f / a for f, a in zip(r["times_s"]["full"], r["times_s"]["anchor"])]
        assert r["ratios"]["full/anchor"]["median"] == pytest.approx(float(np.median(ratios)))
