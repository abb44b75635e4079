"""Label-word regimes (natural, abstract, flipped, random) and the "Anchors without meaning" chapter's runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import TASKS, load_task
from helpers.experiments.meaning import (ABSTRACT_WORDS, REGIMES, agreement_estimates, attention_runs, base_name,
                             flip_permutation, isolation_runs, regime_data, regime_of, regime_task, saliency_runs,
                             with_label_words, MeaningConfig)
from helpers.core.prompts import build_prompt, label_token_ids
from helpers.core.runs import make_prompts, run_key
from helpers.core.tasks import sample_fixed_demonstrations

OFFLINE = ("gemma-3-270m", "qwen2.5-coder-0.5b", "smollm2-135m")
TINY = MeaningConfig("tiny", seeds=(42,), n_test=3, n_test_isolation=2, n_test_saliency=2, isolation_k=1, batch_size=2)


@pytest.fixture(scope="module")
def datas(data_dir):
    return {name: load_task(name, data_dir) for name in TASKS}


def _shown(prompt, tok):
    """The text of every demonstration's label word, as tokens at its span decode it."""
    return [tok.decode(list(prompt.input_ids[a:b])) for a, b in prompt.label_spans]


# ---------------------------------------------------------------------------------------------------------------
# The regimes as task and data values
# ---------------------------------------------------------------------------------------------------------------


def test_regime_tasks_are_new_frozen_values():
    sst2 = TASKS["sst2"]
    assert regime_task(sst2, "natural") is sst2
    abstract = regime_task(sst2, "abstract")
    assert abstract.label_words == (" A", " B") and abstract.name == "sst2+abstract"
    assert regime_task(sst2, "flipped").label_words == (" Positive", " Negative")
    assert regime_task(TASKS["agnews"], "flipped").label_words == (" Sports", " Business", " Technology", " World")
    assert regime_task(sst2, "random").label_words == sst2.label_words
    assert {regime_of(regime_task(sst2, r)) for r in REGIMES} == set(REGIMES)
    assert base_name("trec+flipped") == "trec" and regime_of("trec") == "natural"
    with pytest.raises(Exception):
        abstract.label_words = (" X", " Y")  # frozen


@pytest.mark.parametrize("n", [2, 4, 6])
def test_flip_is_a_derangement(n):
    perm = flip_permutation(n)
    assert sorted(perm) == list(range(n)) and all(perm[c] != c for c in range(n))


def test_bad_regimes_and_words_are_refused():
    with pytest.raises(ValueError, match="unknown regime"):
        regime_task("sst2", "shuffled")
    with pytest.raises(ValueError, match="2 classes"):
        with_label_words("sst2", [" A"], "x")
    with pytest.raises(ValueError, match="differ"):
        with_label_words("sst2", [" A", " A"], "x")
    with pytest.raises(ValueError, match="leading space"):
        with_label_words("sst2", ["A", "B"], "x")
    with pytest.raises(ValueError, match="already"):
        regime_task(regime_task("sst2", "abstract"), "flipped")
    with pytest.raises(ValueError, match="two classes"):
        flip_permutation(1)


def test_fingerprints_and_cache_keys_differ_per_regime(datas):
    class Key:  # what the cache key reads from a model
        name, identity, dtype, device = "m", {"name": "m"}, "float32", type("D", (), {"type": "cpu"})()

    for name, data in datas.items():
        regimes = {r: regime_data(data, r) for r in REGIMES}
        assert len({d.fingerprint for d in regimes.values()}) == len(REGIMES), name
        keys = {run_key("meaning-attention", Key, d, {"seed": 42}) for d in regimes.values()}
        assert len(keys) == len(REGIMES), name
        assert regimes["natural"] is data


def test_random_labels_relabel_the_pool_only(datas):
    for name, data in datas.items():
        rnd = regime_data(data, "random")
        assert rnd.test == data.test
        assert [e.text for e in rnd.train] == [e.text for e in data.train]
        true, shown = data.labels("train"), rnd.labels("train")
        c = data.task.n_classes
        # uniform draws, independent of the true class: agreement near 1/C, every class about 1/C of the pool
        assert abs((true == shown).mean() - 1 / c) < 0.03, name
        assert np.allclose(np.bincount(shown, minlength=c) / len(shown), 1 / c, atol=0.03), name
        # the demonstrations the experiments draw: balanced in shown labels, independent of true ones
        demos, _ = sample_fixed_demonstrations(rnd, 1, 42)
        assert sorted(rnd.train[i].label for i in demos) == list(range(c))
        assert regime_data(data, "random").fingerprint == rnd.fingerprint  # a fixed generator


# ---------------------------------------------------------------------------------------------------------------
# Prompts in every offline tokenizer
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokname", OFFLINE)
@pytest.mark.parametrize("name", list(TASKS))
def test_abstract_words_are_single_tokens(name, tokname, offline_tokenizers):
    tok = offline_tokenizers[tokname]
    task = regime_task(name, "abstract")
    ids = label_token_ids(task, tok)
    for word, i in zip(task.label_words, ids):
        text = f"{task.label_prefix}:{word}"
        enc = tok(text, add_special_tokens=False)["input_ids"]
        assert enc[-1] == i and tok.decode([i]) == word, (word, tok.convert_ids_to_tokens(enc))
        assert tok(f"{task.label_prefix}:", add_special_tokens=False)["input_ids"] == enc[:-1], word


@pytest.mark.parametrize("tokname", OFFLINE)
@pytest.mark.parametrize("name", list(TASKS))
def test_every_label_position_shows_the_regimes_word(name, tokname, datas, offline_tokenizers):
    tok = offline_tokenizers[tokname]
    data = datas[name]
    natural = data.task.label_words
    perm = flip_permutation(data.task.n_classes)
    for regime in REGIMES:
        rd = regime_data(data, regime)
        demos_idx, _ = sample_fixed_demonstrations(rd, 2, 43)
        demos = [rd.train[i] for i in demos_idx]
        p = build_prompt(rd.task, demos, rd.test[0], tok)
        shown = _shown(p, tok)
        assert len(p.label_positions) == len(demos) == 2 * data.task.n_classes
        for d, ex, word, pos in zip(range(len(demos)), demos, shown, p.label_positions):
            expected = {"natural": natural[ex.label], "abstract": ABSTRACT_WORDS[ex.label],
                        "flipped": natural[perm[ex.label]], "random": natural[ex.label]}[regime]
            if name == "trec" and expected == " Abbreviation":
                assert expected.startswith(word)  # multi-token: the span starts the word (first token read)
            else:
                assert word == expected, (regime, d, word, expected)
            assert p.input_ids[pos] == label_token_ids(rd.task, tok)[ex.label]
        if regime == "abstract":
            assert all(b - a == 1 for a, b in p.label_spans)  # single tokens in context too
        if regime == "random":  # the texts are the natural data's, their shown words random
            true = {e.text: e.label for e in data.train}
            assert [true[e.text] for e in demos] != [e.label for e in demos] or data.task.n_classes == 2


def test_flipped_demonstrations_and_target_agree(datas, offline_tokenizers):
    """A flipped demonstration of class c shows the word of class perm[c], and the logit read for class c at the
    target is that same word's: so pred == gold means "followed the demonstrations"."""
    tok = offline_tokenizers["gemma-3-270m"]
    for name, data in datas.items():
        rd = regime_data(data, "flipped")
        ids_flipped, ids_natural = label_token_ids(rd.task, tok), label_token_ids(data.task, tok)
        perm = flip_permutation(data.task.n_classes)
        assert ids_flipped == tuple(ids_natural[perm[c]] for c in range(data.task.n_classes))
        p = make_prompts(type("LM", (), {"tokenizer": tok, "max_length": None})(), rd, 42, 1)[0]
        for pos, c in zip(p.label_positions, p.label_classes):
            assert p.input_ids[pos] == ids_flipped[c]


def test_agreement_estimates_read_the_flipped_mapping():
    task = regime_task("agnews", "flipped")
    gold = np.array([0, 1, 2, 3, 0, 1])
    follows = {"pred": gold.copy(), "gold": gold}  # always the flipped word of the gold class
    natural = {"pred": (gold - 1) % 4, "gold": gold}  # always the natural word: perm[pred] == gold
    e = agreement_estimates([follows], task, n_boot=50)
    assert e["follows flip"].value == 100 and e["accuracy"].value == 0
    e = agreement_estimates([natural], task, n_boot=50)
    assert e["follows flip"].value == 0 and e["accuracy"].value == 100
    assert set(agreement_estimates([natural], regime_task("agnews", "abstract"), n_boot=50)) == {"accuracy"}


# ---------------------------------------------------------------------------------------------------------------
# The runs, on a tiny model: cached per regime, and the regime changes the computation
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm(offline_tokenizers):
    from conftest import tiny_loaded_model

    from dataclasses import replace

    lm = tiny_loaded_model("llama", offline_tokenizers["smollm2-135m"], "tiny-llama")
    return replace(lm, identity={"name": "tiny-llama", "seed": 0})  # keys the cache (a real model's versions)


def test_runs_per_regime_are_cached_apart_and_differ(tiny_lm, datas, tmp_path):
    data = datas["sst2"]
    att = {r: attention_runs(tiny_lm, regime_data(data, r), TINY, directory=tmp_path)[0] for r in REGIMES}
    files = sorted(p.name for p in (tmp_path / "meaning-attention").glob("*.npz"))
    assert len(files) == len(REGIMES) and {f.split("__")[1] for f in files} == {f"sst2+{r}" for r in REGIMES[1:]} | {"sst2"}
    # other label words: other tokens, so other attention and other label probabilities
    assert not np.allclose(att["natural"]["attention"], att["abstract"]["attention"])
    assert not np.allclose(att["natural"]["probs"], att["flipped"]["probs"])
    # flipping the words permutes which logit is read per class: a permuted-words prompt is a different prompt
    assert att["flipped"]["gold"].tolist() == att["natural"]["gold"].tolist()
    iso = isolation_runs(tiny_lm, regime_data(data, "abstract"), TINY, directory=tmp_path)[0]
    assert {"none/pred", "label-first-1/pred", "label-last-1/pred"} <= set(iso)
    assert not any(k.startswith("random") for k in iso)
    sal = saliency_runs(tiny_lm, regime_data(data, "flipped"), TINY, directory=tmp_path)[0]
    assert sal.shape == (TINY.n_test_saliency, 3, tiny_lm.n_layers) and np.isfinite(sal).all()
    info = json.loads(next((tmp_path / "meaning-isolation").glob("*.json")).read_text())
    assert info["task"] == "sst2+abstract" and info["settings"]["k"] == 1
    # lookup-only reads the same results back
    again = attention_runs(tiny_lm, regime_data(data, "abstract"), TINY, directory=tmp_path, lookup_only=True)[0]
    np.testing.assert_array_equal(again["attention"], att["abstract"]["attention"])


# ---------------------------------------------------------------------------------------------------------------
# Committed results (slow): recompute a slice of every committed meaning-* result
# ---------------------------------------------------------------------------------------------------------------

COMMITTED = Path(__file__).resolve().parents[1] / "results"
SLICE = 3


def _committed_cases():
    out = []
    for exp in ("meaning-attention", "meaning-isolation", "meaning-saliency"):
        seen = set()
        for meta in sorted((COMMITTED / exp).glob("*.json")):
            info = json.loads(meta.read_text())
            case = (exp, info["model"]["name"], info["task"])
            if case not in seen and info["settings"]["seed"] == 42:
                seen.add(case)
                out.append((*case, meta))
    return out


def test_committed_meaning_results_are_current(datas):
    """Every committed meaning-* file is keyed by the current code, data and regime (no stale key)."""
    from helpers.core.runs import ModelKey, _hash_fields, key_fields

    for exp in ("meaning-attention", "meaning-isolation", "meaning-saliency"):
        for meta in sorted((COMMITTED / exp).glob("*.json")):
            info = json.loads(meta.read_text())
            fields = {k: info[k] for k in ("experiment", "model", "dtype", "device", "task", "data", "settings",
                                           "versions")}
            data = regime_data(datas[base_name(info["task"])], regime_of(info["task"]))
            assert fields == key_fields(exp, ModelKey.of(info["model"]["name"]), data, info["settings"]), meta
            assert meta.stem.endswith("__" + _hash_fields(fields))


@pytest.mark.slow
def test_committed_meaning_slice(offline_model, datas):
    from helpers.experiments.extraction import label_attention
    from helpers.experiments.isolation import run_isolation
    from helpers.core.runs import load_result
    from helpers.core.saliency import saliency_flow

    cases = _committed_cases()
    if not cases:
        pytest.skip("no committed meaning-* results")
    # one case per (experiment, model): the slow suite stays minutes, and every regime is covered across them
    picked = {}
    for i, (exp, model, task, meta) in enumerate(cases):
        picked.setdefault((exp, model, regime_of(task)), (exp, model, task, meta))
    for exp, model, task, meta in picked.values():
        info = json.loads(meta.read_text())
        s = info["settings"]
        lm = offline_model(model)
        data = regime_data(datas[base_name(task)], regime_of(task))
        committed = load_result(meta.with_suffix(".npz"))
        if exp == "meaning-attention":
            prompts = make_prompts(lm, data, s["seed"], s["n_test"], s["shots"])[:SLICE]
            fresh = label_attention(lm, data.task, prompts, batch_size=SLICE, progress=False)
            np.testing.assert_allclose(fresh["attention"], committed["attention"][:SLICE], rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(fresh["pred"], committed["pred"][:SLICE])
            np.testing.assert_array_equal(fresh["gold"], committed["gold"][:SLICE])
        elif exp == "meaning-isolation":
            prompts = make_prompts(lm, data, s["seed"], s["n_test"], s["shots"])[:SLICE]
            fresh = run_isolation(lm, data.task, prompts, ks=(s["k"],), seed=s["seed"], batch_size=SLICE,
                                  progress=False, random_ks=())
            for key in set(fresh) - {"shared_prefix"}:  # how a prompt ran (bookkeeping), not a result
                np.testing.assert_array_equal(fresh[key], committed[key][:SLICE], err_msg=f"{meta.name} {key}")
        else:
            prompts = make_prompts(lm, data, s["seed"], s["n_test"], s["shots"], per_example=True)[:2]
            fresh = saliency_flow(lm, data.task, prompts, batch_size=2, progress=False)
            np.testing.assert_allclose(fresh, committed["flows"][:2], rtol=1e-3, atol=1e-9)


def _est(value, low, high):
    from helpers.core.stats import Estimate

    return Estimate(value, low, high, 10, 1, np.array([value]))


def test_verdict_rules():
    from helpers.experiments.meaning import holds, verdict

    yes = {"shallow isolation": _est(30, 10, 50), "deep AUCROC": _est(0.7, 0.6, 0.8)}
    assert holds("deep AUCROC", yes["deep AUCROC"]) and not holds("deep AUCROC", _est(0.6, 0.45, 0.7))
    no = {"shallow isolation": _est(2, -5, 9), "deep AUCROC": _est(0.5, 0.4, 0.6)}
    mixed = {"shallow isolation": _est(30, 10, 50), "deep AUCROC": _est(0.5, 0.4, 0.6)}
    assert verdict(yes, yes) == "position"
    assert verdict(no, yes) == "meaning"
    assert verdict(mixed, yes) == "inconclusive"
    assert verdict(yes, no) == "inconclusive"  # the natural words show no signature: nothing to compare with
    assert verdict(no, yes, one_class=True) == "inconclusive"  # no in-context mapping to anchor
    # only the signatures measured in both count
    assert verdict({"deep AUCROC": _est(0.7, 0.6, 0.8)}, yes) == "position"


def test_signatures_on_constructed_runs():
    from helpers.experiments.meaning import crossover, deep_flow_gap, isolation_gap, loyalties

    n = 40
    base = np.zeros(n, dtype=int)
    run = {"none/pred": base, "label-first-5/pred": np.r_[np.ones(n // 2, int), np.zeros(n // 2, int)],
           "label-last-5/pred": base, "none/top": np.zeros((n, 10), int),
           "label-first-5/top": np.zeros((n, 10), int), "label-last-5/top": np.zeros((n, 10), int)}
    lo = loyalties([run])
    assert lo["first"].value == 50 and lo["last"].value == 100
    assert isolation_gap([run]).value == pytest.approx(50)
    flows = np.ones((n, 3, 6))
    flows[:, 0, :3] = 5  # S_wp leads in layers 1-3
    flows[:, 1, 3:] = 5  # S_pq from layer 4
    assert crossover([flows]) == 4
    assert deep_flow_gap([flows]).value > 0


def test_verdict_page_row_reads_the_committed_results():
    """The Appendix F.2 row of the verdict page is computed from committed meaning-* results, not typed."""
    from helpers.pages import verdicts

    f = verdicts.FINDINGS["anchors-without-meaning"]
    assert f.chapter == "book/meaningless-labels" and not f.planned
    measured, verdict = verdicts.evaluate(f, "gemma-3-270m")
    assert measured is not None and verdict != verdicts.NOT_YET_RUN
    from helpers.experiments.meaning import BOOK_SCOPES, SEVERAL_SHOTS

    seeds = BOOK_SCOPES["gemma-3-270m"].seeds_for(SEVERAL_SHOTS)
    assert "83.0%" in measured.note and measured.support["accuracy"].n_seeds == len(seeds)


def test_the_protocol_runs_every_seed_of_a_scope_and_only_its_runs(monkeypatch):
    """A model whose several-per-class runs have more seeds than its one-per-class runs: the protocol visits every
    seed, and a seed of the several-per-class runs only computes those (on SST-2), nothing with one per class."""
    from types import SimpleNamespace

    from helpers.experiments import meaning as me

    scope = me.Scope(seeds=(42,), several_seeds=(42, 43, 44))
    assert scope.all_seeds == (42, 43, 44) and me.Scope(seeds=(1, 2)).all_seeds == (1, 2)
    monkeypatch.setitem(me.BOOK_SCOPES, "toy", scope)
    plan = me.configure("book")
    assert tuple(me.EXPERIMENT.seeds(plan, "toy")) == (42, 43, 44)
    calls = []

    def fake(kind):
        def run(lm, d, config, shots, seeds, lookup_only):
            calls.append((kind, shots, tuple(seeds)))
            return [{}]
        return run

    for kind in ("attention", "isolation", "saliency"):
        monkeypatch.setattr(me, f"{kind}_runs", fake(kind))
    monkeypatch.setattr(me, "regime_data", lambda data, r: data)
    lm = SimpleNamespace(name="toy")
    sst2 = SimpleNamespace(task=SimpleNamespace(name="sst2"))
    me.run(lm, sst2, plan, 43)
    assert calls and all(shots == me.SEVERAL_SHOTS and seeds == (43,) for _, shots, seeds in calls)
    assert len(calls) == 3 * len(me.REGIMES)  # attention, isolation and saliency per regime
    calls.clear()
    me.run(lm, SimpleNamespace(task=SimpleNamespace(name="trec")), plan, 43)
    assert calls == []  # TREC has no several-per-class runs, and seed 43 no one-per-class ones
    me.run(lm, sst2, plan, 42)
    assert {shots for _, shots, _ in calls} == {1, me.SEVERAL_SHOTS}
