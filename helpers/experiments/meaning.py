"""Anchors without meaning: the paper's analyses under other label words (paper Appendix F.2, and beyond).

Do label words act as anchors because of *where they stand* (the slot after ``"Sentiment:"``) or because of *what
they mean*? A **regime** changes what stands in the label slot and nothing else. Each regime is a new, frozen task
value (:func:`with_label_words`) or a new data value (:func:`regime_data`), so every experiment of the book runs on it
unchanged, and the cache keys differ by construction (the task's name and the data's fingerprint carry the regime):

* ``natural`` - the paper's label words (Table 4);
* ``abstract`` - ``" A"``, ``" B"``, ``" C"``, ... in class order (the paper's Appendix F.2 uses "A"/"B" on SST-2);
  each is a single token after the colon in every offline tokenizer (``tests/test_meaning.py`` checks it);
* ``flipped`` - the natural words under a fixed derangement of the classes, class c shown (and read) as the word of
  class ``(c + 1) mod C`` (:func:`flip_permutation`; for two classes a swap). Demonstrations show the permuted word,
  and the prediction is read over the same permuted words, so "predicted class = gold class" means the model
  **followed the demonstrations' mapping** against the words' meaning (Wei et al., 2023);
* ``random`` - the natural words, but each demonstration's label is drawn uniformly at random (Min et al., 2022):
  the demonstration pool's labels are replaced by i.i.d. uniform draws (fixed generator, :data:`RANDOM_LABEL_SEED`)
  before demonstrations are sampled, so the word shown next to a text is independent of the text's true class; the
  test examples keep their gold labels.

The three analyses are re-run per regime with the book's functions: accuracy and AUCROC_l / R_l from one forward
pass with the target's attention recorded (:func:`helpers.experiments.extraction.label_attention`), the saliency flow
(:func:`helpers.core.saliency.saliency_flow`) and label-word isolation in the first / last k layers
(:func:`helpers.experiments.isolation.run_isolation`). Their sizes are this chapter's own (:class:`MeaningConfig`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from .extraction import label_attention
from .isolation import isolation_fields, run_isolation
from ..core.runs import cached_run, make_prompts
from ..core.saliency import saliency_flow
from ..core.stats import Estimate, mean_estimate
from ..core.tasks import Example, Task, TaskData, get_task
from ..core.findings import Finding, Measured, above_zero
from .protocol import Experiment

__all__ = ["REGIMES", "ABSTRACT_WORDS", "RANDOM_LABEL_SEED", "MeaningConfig", "CONFIGS", "with_label_words",
           "flip_permutation", "regime_task", "regime_data", "regime_of", "base_name", "attention_runs",
           "isolation_runs", "saliency_runs", "agreement_estimates", "shown_word_rate", "compute_chapter",
           "SEVERAL_SHOTS", "SIGNATURES", "isolation_gap", "loyalties", "deep_flow_gap", "crossover", "signatures",
           "holds", "verdict", "Scope", "BOOK_SCOPES", "scope_of", "chapter_runs", "abstract_anchor_finding",
           "ATTENTION_FIELDS", "FLOW_FIELDS"]

REGIMES = ("natural", "abstract", "flipped", "random")
ABSTRACT_WORDS = (" A", " B", " C", " D", " E", " F")
RANDOM_LABEL_SEED = 2022  # the generator of the random-label regime's demonstration labels (Min et al., 2022)
_SEP = "+"  # "sst2+flipped": a regime's task name
# What the chapter reads from each cached run, passed to cached_run as ``expect`` (a cached result without one of them
# is refused when read): the attention runs' prediction, gold label and attention (accuracy, AUCROC_l), the flows;
# the isolation runs' fields depend on k (helpers.experiments.isolation.isolation_fields).
ATTENTION_FIELDS = ("attention", "pred", "gold")
FLOW_FIELDS = ("flows",)


def with_label_words(task: Task | str, words: Sequence[str], name: str) -> Task:
    """``task`` with other label words (one per class, in class order, each with its leading space), renamed
    ``"<task>+<name>"``: a new frozen task value, so prompts, label logits and cache keys all follow it."""
    task = get_task(task)
    words = tuple(words)
    if len(words) != task.n_classes:
        raise ValueError(f"{task.name} has {task.n_classes} classes, got {len(words)} label words")
    if len(set(words)) != len(words):
        raise ValueError(f"label words must differ, got {words}")
    if not all(isinstance(w, str) and w.startswith(" ") and w.strip() for w in words):
        raise ValueError(f"each label word needs its leading space and a non-blank text, got {words}")
    if not name or _SEP in name:
        raise ValueError(f"a regime name must be non-empty and without {_SEP!r}, got {name!r}")
    return replace(task, name=f"{base_name(task.name)}{_SEP}{name}", title=f"{task.title} ({name})",
                   label_words=words)


def flip_permutation(n_classes: int) -> tuple[int, ...]:
    """The flipped regime's fixed derangement: class c is shown as the word of class (c + 1) mod C."""
    if n_classes < 2:
        raise ValueError("flipping needs at least two classes")
    return tuple((c + 1) % n_classes for c in range(n_classes))


def regime_task(task: Task | str, regime: str) -> Task:
    """The task's prompt format under ``regime`` (``random`` keeps the natural words: it changes the data)."""
    task = get_task(task)
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")
    if regime_of(task) != "natural":
        raise ValueError(f"{task.name} is already a regime's task; pass the natural task")
    if regime == "natural":
        return task
    if regime == "abstract":
        return with_label_words(task, ABSTRACT_WORDS[: task.n_classes], "abstract")
    if regime == "flipped":
        perm = flip_permutation(task.n_classes)
        return with_label_words(task, [task.label_words[perm[c]] for c in range(task.n_classes)], "flipped")
    return replace(task, name=f"{task.name}{_SEP}random", title=f"{task.title} (random)")


def regime_data(data: TaskData, regime: str) -> TaskData:
    """``data`` under ``regime``: the regime's task, and for ``random`` the demonstration pool relabelled uniformly
    at random (fixed generator; the test split keeps its gold labels). Its fingerprint differs from the natural
    data's, so results of different regimes never share a cache key."""
    task = regime_task(data.task, regime)
    if regime == "natural":
        return data
    train = data.train
    if regime == "random":
        rng = np.random.default_rng(RANDOM_LABEL_SEED)
        labels = rng.integers(0, task.n_classes, size=len(train))
        train = tuple(Example(e.text, int(y)) for e, y in zip(train, labels))
    return TaskData(task, train, data.test, f"{data.source} [{regime} labels]")


def regime_of(task: Task | str) -> str:
    """The regime of a task value or name (``natural`` for the paper's tasks)."""
    name = task.name if isinstance(task, Task) else str(task)
    return name.split(_SEP, 1)[1] if _SEP in name else "natural"


def base_name(name: str) -> str:
    """``"sst2+flipped"`` -> ``"sst2"``."""
    return name.split(_SEP, 1)[0]


# --------------------------------------------------------------------------------------------------------------------
# Sizes and runs
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeaningConfig:
    """This chapter's sizes (they key its cached runs)."""

    name: str
    seeds: tuple[int, ...]
    n_test: int  # accuracy and AUCROC (one forward pass per example) per (task, seed)
    n_test_isolation: int  # isolation (three forward passes per example) per (task, seed)
    n_test_saliency: int  # saliency (a forward and a backward pass per example) per (task, seed)
    isolation_k: int = 5  # isolate the label words in the first k and in the last k layers
    batch_size: int = 8

    def settings(self, kind: str, seed: int, shots: int) -> dict:
        n = {"attention": self.n_test, "isolation": self.n_test_isolation, "saliency": self.n_test_saliency}[kind]
        out = {"seed": seed, "shots": shots, "n_test": n}
        if kind == "isolation":
            out["k"] = self.isolation_k
        return out


CONFIGS = {
    "quick": MeaningConfig("quick", seeds=(42,), n_test=8, n_test_isolation=4, n_test_saliency=2),
    "book": MeaningConfig("book", seeds=(42, 43, 44), n_test=32, n_test_isolation=16, n_test_saliency=8),
    "paper": MeaningConfig("paper", seeds=(42, 43, 44, 45, 46), n_test=1000, n_test_isolation=1000,
                           n_test_saliency=1000),
}


def _config(config: MeaningConfig | str) -> MeaningConfig:
    if isinstance(config, MeaningConfig):
        return config
    if config not in CONFIGS:
        raise KeyError(f"unknown size {config!r}; choose one of {', '.join(CONFIGS)}")
    return CONFIGS[config]


def attention_runs(lm, data: TaskData, config: MeaningConfig | str, shots: int = 1, seeds=None,
                   **kw) -> list[dict[str, np.ndarray]]:
    """Per seed: :func:`helpers.experiments.extraction.label_attention` on ``data`` (already a regime's data), scheme A
    demonstrations (one set per seed), cached as ``meaning-attention``."""
    config = _config(config)
    out = []
    for seed in seeds or config.seeds:
        def compute(seed=seed):
            prompts = make_prompts(lm, data, seed, config.n_test, shots, per_example=False)
            return label_attention(lm, data.task, prompts, batch_size=config.batch_size)

        out.append(cached_run("meaning-attention", lm, data, config.settings("attention", seed, shots), compute,
                              expect=ATTENTION_FIELDS, **kw))
    return out


def isolation_runs(lm, data: TaskData, config: MeaningConfig | str, shots: int = 1, seeds=None,
                   **kw) -> list[dict[str, np.ndarray]]:
    """Per seed: label words isolated in the first k and in the last k layers (no random control; see the
    aggregation chapter for it), scheme A demonstrations, cached as ``meaning-isolation``."""
    config = _config(config)
    out = []
    for seed in seeds or config.seeds:
        def compute(seed=seed):
            prompts = make_prompts(lm, data, seed, config.n_test_isolation, shots, per_example=False)
            return run_isolation(lm, data.task, prompts, ks=(config.isolation_k,), seed=seed,
                                 batch_size=config.batch_size, random_ks=())

        out.append(cached_run("meaning-isolation", lm, data, config.settings("isolation", seed, shots), compute,
                              expect=isolation_fields((config.isolation_k,), ()), **kw))
    return out


def saliency_runs(lm, data: TaskData, config: MeaningConfig | str, shots: int = 1, seeds=None,
                  **kw) -> list[np.ndarray | None]:
    """Per seed: the (N, 3, L) flows S_wp, S_pq, S_ww with the loss against the gold label **in the regime's
    words** (for flipped labels: the permuted word), scheme B demonstrations as §2.1, cached as
    ``meaning-saliency``."""
    config = _config(config)
    out = []
    for seed in seeds or config.seeds:
        def compute(seed=seed):
            prompts = make_prompts(lm, data, seed, config.n_test_saliency, shots, per_example=True)
            return {"flows": saliency_flow(lm, data.task, prompts, batch_size=max(1, config.batch_size // 2))}

        result = cached_run("meaning-saliency", lm, data, config.settings("saliency", seed, shots), compute,
                            expect=FLOW_FIELDS, **kw)
        out.append(None if result is None else result["flows"])
    return out


# --------------------------------------------------------------------------------------------------------------------
# What the model follows
# --------------------------------------------------------------------------------------------------------------------


def shown_word_rate(per_seed: Sequence[dict[str, np.ndarray]], **kw) -> Estimate:
    """% of examples where the model outputs the gold class's word **as the demonstrations show it** (pred == gold
    in the regime's class order): accuracy for natural, abstract and random labels; for flipped labels, agreement
    with the flipped mapping."""
    return mean_estimate([(r["pred"] == r["gold"]).astype(float) for r in per_seed], **kw).scaled(100)


def agreement_estimates(per_seed: Sequence[dict[str, np.ndarray]], task: Task, **kw) -> dict[str, Estimate]:
    """For one regime's runs: ``accuracy`` (the output word means the gold class: the natural reading) and, for the
    flipped regime, ``follows flip`` (the output is the permuted word the demonstrations pair with the gold class).

    In the flipped regime the predicted class c stands for the word of class ``perm[c]``, so the natural accuracy
    is ``perm[pred] == gold``, and ``pred == gold`` is agreement with the flipped mapping.
    """
    if regime_of(task) != "flipped":
        return {"accuracy": shown_word_rate(per_seed, **kw)}
    perm = np.asarray(flip_permutation(task.n_classes))
    return {
        "accuracy": mean_estimate([(perm[r["pred"]] == r["gold"]).astype(float) for r in per_seed],
                                  **kw).scaled(100),
        "follows flip": shown_word_rate(per_seed, **kw),
    }


def config_fields(config: MeaningConfig | str) -> dict:
    """The config as a dict (for the chapter's text)."""
    return asdict(_config(config))


# --------------------------------------------------------------------------------------------------------------------
# Filling the cache (python -m helpers.cli.compute meaning)
# --------------------------------------------------------------------------------------------------------------------

SEVERAL_SHOTS = 4  # "several demonstrations per class" on SST-2 (the paper's F.2 used 8 per class on LLaMA-33B)
MAIN_TASK = "sst2"


def compute_chapter(lm, datas: dict[str, TaskData], config: MeaningConfig | str, regimes: Sequence[str] = REGIMES,
                    analyses_tasks: Sequence[str] | None = None, log=print) -> None:
    """Fill the cache in order of importance, so that a run cut short leaves the most useful results:

    1. accuracy and attention (one forward pass per example) on every task and regime, one demonstration per class;
    2. on SST-2: isolation and saliency, one demonstration per class;
    3. on SST-2 with :data:`SEVERAL_SHOTS` demonstrations per class: attention, isolation and saliency;
    4. isolation and saliency on the other tasks in ``analyses_tasks`` (default: none).
    """
    import time

    def step(what, fn, data, shots):
        t0 = time.perf_counter()
        fn(lm, data, config, shots=shots)
        log(f"meaning {lm.name} {data.task.name} {what} shots={shots}: {time.perf_counter() - t0:.0f} s")

    by = {(name, r): regime_data(d, r) for name, d in datas.items() for r in regimes}
    for name in datas:
        for r in regimes:
            step("attention", attention_runs, by[name, r], 1)
    if MAIN_TASK in datas:
        for r in regimes:
            step("isolation", isolation_runs, by[MAIN_TASK, r], 1)
            step("saliency", saliency_runs, by[MAIN_TASK, r], 1)
        for r in regimes:
            for what, fn in (("attention", attention_runs), ("isolation", isolation_runs),
                             ("saliency", saliency_runs)):
                step(what, fn, by[MAIN_TASK, r], SEVERAL_SHOTS)
    for name in analyses_tasks or ():
        if name == MAIN_TASK or name not in datas:
            continue
        for r in regimes:
            step("isolation", isolation_runs, by[name, r], 1)
            step("saliency", saliency_runs, by[name, r], 1)


# --------------------------------------------------------------------------------------------------------------------
# The anchor signatures of a regime, and a verdict: position or meaning
# --------------------------------------------------------------------------------------------------------------------

SIGNATURES = ("shallow isolation", "deep flow", "deep AUCROC")


def isolation_gap(per_seed: Sequence[dict[str, np.ndarray]], k: int = 5) -> Estimate:
    """Label loyalty after isolating the label words in the last k layers minus in the first k (points, paired over
    the same examples). > 0: cutting the label words off from their text matters more in shallow layers (§2.2)."""
    from .aggregation import loyalty_difference

    return loyalty_difference(per_seed, f"label-last-{k}", f"label-first-{k}")


def loyalties(per_seed: Sequence[dict[str, np.ndarray]], k: int = 5) -> dict[str, Estimate]:
    """Label loyalty (%) with the label words isolated in the first k and in the last k layers."""
    from .aggregation import loyalty_per_example

    return {where: mean_estimate([loyalty_per_example(r, f"label-{where}-{k}")["label loyalty"] for r in per_seed])
            for where in ("first", "last")}


def deep_flow_gap(flows: Sequence[np.ndarray], share: float = 1 / 3) -> Estimate:
    """S_pq - S_wp (normalised per layer, §2.1) averaged over the last ``share`` of the layers: > 0 where the target
    reads from the label words more than the label words read from the text."""
    from .aggregation import gap_over_layers

    n_layers = flows[0].shape[-1]
    first = n_layers - max(1, int(round(n_layers * share))) + 1
    return gap_over_layers(flows, first, n_layers)


def crossover(flows: Sequence[np.ndarray]) -> int | None:
    """The first layer (1-based) where S_pq exceeds S_wp in the paper's aggregated curves; ``None``: never."""
    from .aggregation import crossover_layer, flow_curves

    layer = crossover_layer(flow_curves(flows))
    return None if layer is None else layer + 1


def signatures(attention: Sequence[dict[str, np.ndarray]] | None, isolation: Sequence[dict[str, np.ndarray]] | None,
               flows: Sequence[np.ndarray] | None, k: int = 5) -> dict[str, Estimate]:
    """The three anchor signatures the paper reports, each an Estimate whose null is 0 (or 0.5 for the AUC):
    ``shallow isolation`` (:func:`isolation_gap`), ``deep flow`` (:func:`deep_flow_gap`), ``deep AUCROC`` (mean
    AUCROC_l over the last third of the layers, :func:`helpers.experiments.extraction.deep_auc_estimate`). Missing inputs are
    left out."""
    from .extraction import deep_auc_estimate

    out = {}
    if isolation is not None:
        out["shallow isolation"] = isolation_gap(isolation, k)
    if flows is not None:
        out["deep flow"] = deep_flow_gap(flows)
    if attention is not None:
        out["deep AUCROC"] = deep_auc_estimate(attention)
    return out


NULLS = {"shallow isolation": 0.0, "deep flow": 0.0, "deep AUCROC": 0.5}


def holds(name: str, estimate: Estimate) -> bool:
    """A signature holds when its whole 95% interval lies on the anchor side of its null."""
    return bool(estimate.low > NULLS[name])


def verdict(regime: dict[str, Estimate], natural: dict[str, Estimate], one_class: bool = False) -> str:
    """Position or meaning, from the signatures that hold with the natural words (the reference):

    * ``position`` - every signature that holds with the natural words also holds in the regime;
    * ``meaning`` - none of them holds in the regime;
    * ``inconclusive`` - some do, some do not, or none holds with the natural words either; and always when the
      model predicts a single class in the regime (``one_class``): then there is no in-context mapping for the
      label words to anchor, and an absent isolation effect says nothing about anchors.
    """
    if one_class:
        return "inconclusive"
    reference = [name for name, e in natural.items() if name in regime and holds(name, e)]
    if not reference:
        return "inconclusive"
    kept = [name for name in reference if holds(name, regime[name])]
    if len(kept) == len(reference):
        return "position"
    return "meaning" if not kept else "inconclusive"


# --------------------------------------------------------------------------------------------------------------------
# What the chapter shows, per model (the committed book results), and reading it back
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """Which runs the chapter reads for one model: seeds; tasks with accuracy and attention (one demonstration per
    class); tasks that also get isolation and saliency; and tasks run with :data:`SEVERAL_SHOTS` per class too."""

    seeds: tuple[int, ...]
    tasks: tuple[str, ...] = ("sst2", "trec", "agnews", "emoc")
    analysis_tasks: tuple[str, ...] = ("sst2",)
    several_tasks: tuple[str, ...] = ("sst2",)
    several_seeds: tuple[int, ...] | None = None  # seeds of the several-per-class runs (None: ``seeds``)

    def seeds_for(self, shots: int) -> tuple[int, ...]:
        return self.seeds if shots == 1 or self.several_seeds is None else self.several_seeds

    @property
    def all_seeds(self) -> tuple[int, ...]:
        """Every seed some run of this scope uses (the protocol's seeds)."""
        return tuple(sorted(set(self.seeds) | set(self.several_seeds or ())))


# The committed book results (sized to the shared 2-core CPU; see the chapter's "Differences from the paper").
BOOK_SCOPES = {
    "gemma-3-270m": Scope(seeds=(42, 43, 44)),
    # one demonstration per class on one seed (CPU time); SST-2 with several per class on three, for its verdict row
    "qwen2.5-coder-0.5b": Scope(seeds=(42,), several_seeds=(42, 43, 44)),
}


def scope_of(model: str, config: MeaningConfig | str) -> Scope:
    """The model's book scope, or every task with the config's seeds for another model."""
    config = _config(config)
    if config.name == "book" and model in BOOK_SCOPES:
        return BOOK_SCOPES[model]
    return Scope(seeds=config.seeds)


def chapter_runs(model: str, datas: dict[str, TaskData], config: MeaningConfig | str = "book",
                 regimes: Sequence[str] = REGIMES, device=None, scope: Scope | None = None) -> dict:
    """Every run the chapter shows for ``model``: ``{"attention" | "isolation" | "saliency": {(task, regime, shots):
    per-seed list}}``. Reads the cache first without loading the model (a :class:`~helpers.core.runs.ModelKey` keys it);
    loads the model and computes only what is missing (then it takes time: see the chapter's run-time note)."""
    from ..core.runs import ModelKey

    config = _config(config)
    scope = scope or scope_of(model, config)
    plan = []
    for task in scope.tasks:
        for r in regimes:
            plan.append(("attention", task, r, 1))
            if task in scope.analysis_tasks:
                plan += [("isolation", task, r, 1), ("saliency", task, r, 1)]
            if task in scope.several_tasks:
                plan += [(kind, task, r, SEVERAL_SHOTS) for kind in ("attention", "isolation", "saliency")]
    functions = {"attention": attention_runs, "isolation": isolation_runs, "saliency": saliency_runs}
    regime_datas = {(t, r): regime_data(datas[t], r) for t in scope.tasks for r in regimes}
    key = ModelKey.of(model, device="cuda" if device == "cuda" else "cpu")
    out: dict = {kind: {} for kind in functions}
    missing = []
    for kind, task, r, shots in plan:
        got = functions[kind](key, regime_datas[task, r], config, shots=shots, seeds=scope.seeds_for(shots),
                              lookup_only=True)
        if any(x is None for x in got):
            missing.append((kind, task, r, shots))
        else:
            out[kind][task, r, shots] = got
    if missing:
        from ..core.models import load_model

        lm = load_model(model, device=device)
        for kind, task, r, shots in missing:
            out[kind][task, r, shots] = functions[kind](lm, regime_datas[task, r], config, shots=shots,
                                                       seeds=scope.seeds_for(shots))
    return out


def abstract_anchor_finding(model: str, profile) -> "object | None":
    """The verdict page's row for Appendix F.2 ("label words without meaning still act as anchors"): with abstract
    labels on SST-2 and :data:`SEVERAL_SHOTS` demonstrations per class (the paper: "A"/"B", 8 per class), label
    loyalty after isolating the label words in the last k layers minus in the first k (points; > 0: the meaningless
    label words still gather the demonstrations in shallow layers). ``None`` until the runs are cached."""
    from ..core.runs import ModelKey
    from ..core.tasks import load_task

    name = getattr(profile, "name", profile)
    if name not in CONFIGS:
        return None
    config = CONFIGS[name]
    scope = scope_of(model, config)
    key = ModelKey.of(model)
    data = regime_data(load_task(MAIN_TASK), "abstract")
    if MAIN_TASK not in scope.several_tasks:
        return None
    seeds = scope.seeds_for(SEVERAL_SHOTS)
    iso = isolation_runs(key, data, config, shots=SEVERAL_SHOTS, seeds=seeds, lookup_only=True)
    att = attention_runs(key, data, config, shots=SEVERAL_SHOTS, seeds=seeds, lookup_only=True)
    if any(r is None for r in iso + att):
        return None
    gap = isolation_gap(iso, config.isolation_k)
    lo = loyalties(iso, config.isolation_k)
    acc = shown_word_rate(att)
    note = (f"SST-2, \" A\"/\" B\", {SEVERAL_SHOTS} per class; label loyalty last {config.isolation_k} minus first "
            f"{config.isolation_k} layers (first {lo['first'].fmt(0)}%, last {lo['last'].fmt(0)}%); accuracy "
            f"{acc.fmt(1)}% (paper 83.0% on LLaMA-33B)")
    return Measured(gap, unit=" points", digits=0, note=note, support={"accuracy": acc, **lo}, accuracy=acc,
                    chance=100 / data.task.n_classes)


# --------------------------------------------------------------------------------------------------------------------
# The experiment (helpers.experiments.protocol)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeaningPlan:
    """This chapter's sizes (:class:`MeaningConfig`) and the tasks besides SST-2 that also get isolation and
    saliency."""

    config: MeaningConfig
    analyses_tasks: tuple[str, ...] = ()


def configure(profile: str = "book", analyses_tasks=None) -> MeaningPlan:
    return MeaningPlan(_config(profile), tuple(analyses_tasks or ()))


def run(lm, data: TaskData, plan: MeaningPlan, seed: int, lookup_only: bool = False) -> dict:
    """One (task, seed), every regime: accuracy and attention; on the analysis tasks (SST-2 and
    ``analyses_tasks``) isolation and saliency; on SST-2 the same with :data:`SEVERAL_SHOTS` per class."""
    config, name = plan.config, data.task.name
    scope = scope_of(lm.name, config)
    analysis = name in scope.analysis_tasks or name in plan.analyses_tasks
    functions = {"attention": attention_runs, "isolation": isolation_runs, "saliency": saliency_runs}
    out = {}
    for r in REGIMES:
        d = regime_data(data, r)
        for shots in (1, SEVERAL_SHOTS):
            if seed not in scope.seeds_for(shots) or (shots != 1 and name not in scope.several_tasks):
                continue
            for kind, fn in functions.items():
                if kind != "attention" and not (analysis or shots != 1):
                    continue
                out[f"{kind} {r} {shots}-shot"] = fn(lm, d, config, shots=shots, seeds=[seed],
                                                    lookup_only=lookup_only)[0]
    return out


EXPERIMENT = Experiment(
    name="meaning", title="Anchors without meaning", chapter="book/meaningless-labels", configure=configure,
    seeds=lambda plan, model: scope_of(model, plan.config).all_seeds, run=run, options=frozenset({"analyses_tasks"}),
    findings=(
        Finding("anchors-without-meaning", "Label words without meaning ('A'/'B') still act as anchors.",
                "LLaMA-33B, SST-2, 8 per class: 83.0% accuracy (Figures 12, 13)", "Appendix F.2",
                "book/meaningless-labels", "fig-meaning-iso", abstract_anchor_finding, above_zero,
                needs_mapping=True),
    ),
)
