"""The exercises' solutions (helpers.pages.solutions): every one runs on a tiny random model with a real tokenizer and
returns its answer in the documented shape, and every exercise of every chapter shows one in a dropdown."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest

from helpers.pages import solutions

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ("aggregation", "compression", "diagnosis", "extraction", "meaningless-labels", "reweighting",
            "task-vectors", "tuning")
FUNCTION_PREFIX = {"meaningless-labels": "meaning", "task-vectors": "taskvectors"}  # page -> the solutions' prefix


@pytest.fixture(scope="module")
def lm(offline_tokenizers):
    from conftest import tiny_loaded_model

    return tiny_loaded_model("llama", offline_tokenizers["smollm2-135m"], "tiny-llama")


@pytest.fixture(scope="module")
def data(data_dir):
    from helpers import load_task

    return {t: load_task(t, data_dir) for t in ("sst2", "trec")}


def _train(**kw):
    from helpers.experiments.reweighting import TrainConfig

    return TrainConfig(epochs=1, **kw)


def _loyalties(out, names):
    assert set(out) == set(names)
    for v in out.values():
        assert set(v) == {"label loyalty", "word loyalty@5"}
        assert all(0 <= x <= 100 for x in v.values())


def _curve(x, n_layers):
    assert np.shape(x) == (n_layers,)


def _patched(out, names):
    assert set(out) == {"layers", "icl", "zero", *names}, set(out)
    assert list(out["layers"]) == [0, 2]  # every second layer of three, and the last
    assert 0 <= out["icl"] <= 100 and 0 <= out["zero"] <= 100
    for name in names:
        assert np.shape(out[name]) == (2,) and ((0 <= out[name]) & (out[name] <= 100)).all()


def _cut_heads(out, lm, k):
    top, drawn = out["heads"]["top"], out["heads"]["random"]
    assert out["k"] == k and len(top) == len(drawn) == k and not set(top) & set(drawn)
    assert all(1 <= layer <= lm.n_layers and 0 <= head < lm.n_heads for layer, head in top + drawn)
    assert 0 <= out["uncut"]["accuracy"] <= 100
    for name in ("top", "random"):
        assert set(out[name]) == {"accuracy", "label loyalty", "fall"}
        assert 0 <= out[name]["label loyalty"] <= 100 and np.isfinite(out[name]["fall"])


# name -> (task, small sizes, check(result, lm))
CASES = {
    "aggregation_1": ("sst2", dict(n_test=4, local_layers=(2,), first_layers=(0,)),
                      lambda r, lm: _loyalties(r, {"local layers", "first layers"})),
    "aggregation_2": ("sst2", dict(n_test=4, k=2),
                      lambda r, lm: _loyalties(r, {"label words", "random non-label positions", "random text tokens"})),
    "aggregation_3": ("sst2", dict(n_test=4, n_boot=20),
                      lambda r, lm: (np.shape(r["curves"]) == (3, lm.n_layers)) and isinstance(r["flip_backs"], list)
                      or pytest.fail(str(r))),
    "compression_1": ("sst2", dict(n_test=4, ks=(0, 1, 2)),
                      lambda r, lm: (r["label loyalty"].shape == (3,) and (np.diff(r["kept tokens"]) >= 0).all())
                      or pytest.fail(str(r))),
    "compression_3": ("sst2", dict(n_test=4),
                      lambda r, lm: _loyalties(r, {"full, positions restarted", "anchor, positions continued",
                                                   "anchor, positions restarted"})),
    "diagnosis_1": ("trec", dict(n_test=12, m=3),
                    lambda r, lm: [_curve(v, lm.n_layers) for v in r["rho per layer"].values()]
                    and set(r["rho"]) == {"label words", "newlines"} or pytest.fail(str(r))),
    "diagnosis_2": ("trec", dict(seeds=(42, 43), n_test=12, m=3),
                    lambda r, lm: (set(r["rho"]) == {42, 43} and r["spread"] >= 0) or pytest.fail(str(r))),
    "diagnosis_3": ("trec", dict(n_test=12, m=3),
                    lambda r, lm: (r["confusion rates"].shape == (6, 6)
                                   and {"rho, pairwise AUC", "rho, confusion rates"} <= set(r)) or pytest.fail(str(r))),
    "extraction_1": ("sst2", dict(n_test=8, n_boot=20),
                     lambda r, lm: [_curve(r[k].value, lm.n_layers) for k in ("official", "renormalised")]),
    "extraction_2": ("sst2", dict(n_test=8),
                     lambda r, lm: [_curve(r[k], lm.n_layers) for k in ("prediction", "gold")]
                     and 0 <= r["accuracy"] <= 100 or pytest.fail(str(r))),
    "extraction_3": ("sst2", dict(n_test=8, top=3),
                     lambda r, lm: (r["auc"].shape == (lm.n_layers, lm.n_heads) and len(r["top"]) == 3
                                    and all(1 <= layer <= lm.n_layers for layer, _, _ in r["top"]))
                     or pytest.fail(str(r))),
    "meaning_1": ("sst2", dict(n_test=4, shots=(1, 2)),
                  lambda r, lm: (set(r) == {1, 2} and all(np.isclose(v["prediction shares"].sum(), 1)
                                                          for v in r.values())) or pytest.fail(str(r))),
    "meaning_2": ("sst2", dict(n_test=4),
                  lambda r, lm: (set(r["single token"]) == {" foo", " bar"} and len(r["token ids"]) == 2
                                 and r["neutral"]["prediction shares"].shape == (2,)) or pytest.fail(str(r))),
    "meaning_3": ("sst2", dict(n_test=8),
                  lambda r, lm: [_curve(r[k], lm.n_layers) for k in ("raw", "calibrated")]),
    "reweighting_1": ("sst2", dict(n_test=4, config=_train()),
                      lambda r, lm: ({"icl-1", "beta, every layer", "beta, last third"} <= set(r)
                                     and r["last-third layers (1-based)"] == [3]) or pytest.fail(str(r))),
    "reweighting_2": ("sst2", dict(n_test=4, config=_train()),
                      lambda r, lm: (len(r) == 6 and all(0 <= v <= 100 for v in r.values())) or pytest.fail(str(r))),
    "reweighting_3": ("trec", dict(n_test=4, extra=(4, 8), config=_train()),
                      lambda r, lm: (set(r) == {4, 8} and list(r[8]["training classes"]) == [8] * 6)
                      or pytest.fail(str(r))),
    "reweighting_4": ("sst2", dict(n_test=4, config=_train()),
                      lambda r, lm: (r["anchor"]["lr"] in r["grid"] and r["random"]["lr"] in r["grid"])
                      or pytest.fail(str(r))),
    "taskvectors_1": ("sst2", dict(n_test=4, layer_step=2),
                      lambda r, lm: _patched(r, {"tv", "mean tv"})),
    "taskvectors_2": ("sst2", dict(n_test=4, layer_step=2),
                      lambda r, lm: _patched(r, {"replace", "add", "add mean"})),
    "taskvectors_3": ("sst2", dict(n_test=4, k=3),
                      lambda r, lm: _cut_heads(r, lm, 3)),
    "tuning_1": ("sst2", dict(n_test=2, m=2, layer=1),
                 lambda r, lm: (r["maxdiff"].shape == (lm.n_layers,) and r["maxdiff"][:2].max() < 1e-4
                                and r["maxdiff"][2] > r["maxdiff"][:2].max()) or pytest.fail(str(r))),
    "tuning_2": ("sst2", dict(n_test=4, n_attention=2, config=_train()),
                 lambda r, lm: (set(r) == {"after BOS", "before BOS"}) or pytest.fail(str(r))),
    "tuning_3": ("sst2", dict(n_test=4, m=1, extra=(4, 5), config=_train()),
                 lambda r, lm: ({4, 5, "parameters"} == set(r)) or pytest.fail(str(r))),
}


def test_every_solution_has_a_case():
    assert set(solutions.__all__) - {"compression_2"} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_solution_runs_on_a_tiny_model(name, lm, data, monkeypatch, tmp_path):
    monkeypatch.setenv("ANCHORS_RESULTS", str(tmp_path))  # a solution never writes a cached result
    task, sizes, check = CASES[name]
    fn = getattr(solutions, name)
    params = inspect.signature(fn).parameters
    assert params["lm"].default is None and params["data"].default is None
    assert fn.__doc__ and f"exercise {name.rsplit('_', 1)[1]}" in fn.__doc__
    out = fn(lm=lm, data=data[task], **sizes)
    check(out, lm)
    assert not any(tmp_path.iterdir())


def test_taskvectors_1_and_2_patch_as_the_chapter_does(lm, data):
    from helpers.experiments import taskvectors as tv

    run = tv.task_vector_run(lm, data["sst2"], data["trec"], 42, 6, [0, 2], batch_size=4, progress=False)
    first = solutions.taskvectors_1(lm=lm, data=data["sst2"], n_test=6, layer_step=2, batch_size=4)
    second = solutions.taskvectors_2(lm=lm, data=data["sst2"], n_test=6, layer_step=2, batch_size=4)
    chapter = 100 * tv.metric(run, "tv").mean(1)
    np.testing.assert_allclose(first["tv"], chapter)
    np.testing.assert_allclose(second["replace"], chapter)
    for out in (first, second):
        assert out["icl"] == 100 * tv.metric(run, "icl").mean() and out["zero"] == 100 * tv.metric(run, "zero").mean()


def test_taskvectors_3_cuts_the_top_heads_of_a_given_map(lm, data):
    saliency_map = np.zeros((lm.n_layers, lm.n_heads))
    saliency_map[1, 2], saliency_map[2, 0], saliency_map[0, 3] = 3.0, 2.0, 1.0
    out = solutions.taskvectors_3(lm=lm, data=data["sst2"], n_test=4, k=2, saliency_map=saliency_map)
    assert out["heads"]["top"] == [(2, 2), (3, 0)]  # layers from 1, in flat (layer, head) order
    with pytest.raises(ValueError, match="layers, heads"):
        solutions.taskvectors_3(lm=lm, data=data["sst2"], n_test=4, saliency_map=np.zeros((2, 2)))


def test_compression_2_reads_a_benchmark():
    bench = {"tasks": {"sst2": {"1": {"fraction_of_ceiling": 0.4}, "8": {"fraction_of_ceiling": 0.7}},
                       "trec": {"1": {"fraction_of_ceiling": 0.5}, "32": {"fraction_of_ceiling": 0.3}}}}
    out = solutions.compression_2(bench)
    assert out["sst2"]["closest"] == 8 and out["trec"]["closest"] == 1
    assert out["sst2"]["fraction of ceiling"] == {1: 0.4, 8: 0.7}


def test_compression_2_reads_the_committed_benchmark():
    path = ROOT / "results" / "compression-bench" / "gemma-3-270m.json"
    if not path.is_file():
        pytest.skip("no committed compression benchmark")
    out = solutions.compression_2(str(path))
    assert set(out) == set(json.loads(path.read_text())["tasks"])


# --------------------------------------------------------------------------------------------------------------------
# The chapters show them
# --------------------------------------------------------------------------------------------------------------------


def _exercise_cell(chapter: str) -> str:
    cells = json.loads((ROOT / "book" / f"{chapter}.ipynb").read_text(encoding="utf-8"))["cells"]
    found = [c for c in cells if c["cell_type"] == "markdown" and "## Exercises" in "".join(c["source"])]
    assert len(found) == 1, chapter
    text = "".join(found[0]["source"])
    return text[text.index("## Exercises"):]


def _exercises(text: str) -> list[str]:
    """The numbered exercises of an exercise section, each with what follows it up to the next one."""
    body = re.split(r"\n(?=:::\{admonition\})|\n## (?!Exercises)", text)[0]
    starts = [m.start() for m in re.finditer(r"^\d+\. ", body, re.M)]
    return [body[a:b] for a, b in zip(starts, starts[1:] + [len(body)])]


def _functions(path: Path) -> set[str]:
    import ast

    return {n.name for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_exercise_has_a_solution_dropdown(chapter):
    exercises = _exercises(_exercise_cell(chapter))
    assert len(exercises) >= 3, chapter
    defined = _functions(ROOT / "helpers" / "pages" / "solutions.py")
    prefix = FUNCTION_PREFIX.get(chapter, chapter)
    for number, exercise in enumerate(exercises, 1):
        assert ":::{dropdown} Solution" in exercise, f"{chapter} exercise {number} has no solution"
        include = re.search(r"```\{literalinclude\} (\S+)\n\s*:pyobject: (\w+)\n\s*```", exercise)
        assert include, f"{chapter} exercise {number}: no literalinclude of its solution"
        path, name = include.groups()
        assert (ROOT / "book" / path).resolve() == ROOT / "helpers" / "pages" / "solutions.py", path
        assert name == f"{prefix}_{number}", f"{chapter} exercise {number} shows {name}"
        assert name in defined and callable(getattr(solutions, name)), name
        assert exercise.count(":::") >= 2, f"{chapter} exercise {number}: the dropdown is not closed"
