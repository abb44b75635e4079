"""Compute (and cache) an experiment's results ahead of the book build: resumable, with a progress bar and an ETA.

    python -m helpers.cli.compute aggregation --profile book --model gemma-3-270m                   # the user cache
    python -m helpers.cli.compute all --model gemma-3-270m                                           # every experiment
    python -m helpers.cli.compute aggregation --profile book --model gemma-3-270m --into-committed  # results/ (maintainers)
    python -m helpers.cli.compute all --model gemma-3-270m --device cuda                             # on a GPU

Every experiment has the same shape (:mod:`helpers.experiments.protocol`): for each seed, for each task, its cached
``run`` computes what is missing. A killed run loses at most the result it was computing; the next call resumes.
Results go to the user cache (``$ANCHORS_RESULTS`` or ``~/.cache/anchors/results``). ``--into-committed`` writes the
repository's committed ``results/`` instead (a source checkout only), to refresh the book's published numbers.
``--device`` (``cuda``, ``cuda:1``, ``mps``; default the CPU) is where the model runs; its type is part of every result's
key, so a GPU run computes its own results (the committed ones are CPU results) and finds them again on a GPU.
Options an experiment does not use (``--shots`` for diagnosis, ...) are refused, not ignored.
"""

from __future__ import annotations

import argparse
import os
import time

from .options import device_name, positive_int
from ..core.models import DEFAULT_MODEL
from ..core.runs import PROFILES, REPO_ROOT, RESULTS_ENV
from ..core.tasks import TASKS
from ..experiments import ORDER, get


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m helpers.cli.compute", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=[*ORDER, "all"])
    p.add_argument("--profile", default="book", choices=sorted(PROFILES))
    p.add_argument("--model", default=DEFAULT_MODEL, help="an offline model name, a hub id or a local folder")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="only these of the experiment's seeds (runs are per seed, so processes can split the work)")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--device", type=device_name, default=None,
                   help="where the model runs: cpu (the default), cuda, cuda:1, mps, ... (the device type is part of "
                        "every result's key: the committed results are CPU results)")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="start even when the machine has less memory available than the model's recorded peak")
    p.add_argument("--into-committed", action="store_true",
                   help="write into the repository's committed results/ (maintainers refreshing the book)")
    p.add_argument("--dry-run", action="store_true", help="list what is missing; compute nothing, load no model")
    g = p.add_argument_group("options of single experiments")
    g.add_argument("--shots", type=positive_int, nargs="+", default=None,
                   help="extraction: shots per class (default 1 2); compression --sweep: default 1 2 4 8 16")
    g.add_argument("--sweep", action="store_true", default=None, help="compression: the shots sweep (not Table 2)")
    g.add_argument("--analyses-tasks", nargs="+", default=None, choices=list(TASKS),
                   help="meaning: tasks besides SST-2 that also get isolation and saliency")
    g.add_argument("--methods", nargs="+", default=None,
                   help="tuning: only these methods (icl-1, anchor, prompt-m, prefix-m, pez-m, position-shift-floor); "
                        "reweighting: these tuned betas besides the paper's methods (default anchor random "
                        "beta-attended beta-newline beta-colon; also beta-bos beta-shallow beta-deep)")
    return p


def plan(args, model: str) -> list[tuple]:
    """``[(experiment, config, seed, task)]`` in the order they run: experiment by experiment, seed-major (whole
    seeds finish first)."""
    names = ORDER if args.experiment == "all" else (args.experiment,)
    options = dict(shots=args.shots, sweep=args.sweep, analyses_tasks=args.analyses_tasks, methods=args.methods)
    out = []
    for name in names:
        exp = get(name)
        mine = {k: v for k, v in options.items() if k in exp.options} if args.experiment == "all" else options
        config = exp.config(args.profile, **mine)
        seeds = tuple(exp.seeds(config, model))
        if args.seeds:
            unknown = sorted(set(args.seeds) - set(seeds))
            if unknown and args.experiment != "all":
                raise ValueError(f"seeds {unknown} are not seeds of {name} in the {args.profile} profile {seeds}")
            seeds = tuple(s for s in seeds if s in args.seeds)
        out += [(exp, config, seed, task) for seed in seeds for task in args.tasks if task in exp.tasks]
    return out


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.into_committed:
        committed = REPO_ROOT / "results"
        if not (REPO_ROOT / "pyproject.toml").is_file() or not committed.is_dir():
            p.error(f"--into-committed needs a source checkout with a results/ folder (not {committed})")
        os.environ[RESULTS_ENV] = str(committed)
    try:
        model_name = args.model
        work = plan(args, model_name)
    except (ValueError, KeyError) as err:
        p.error(str(err.args[0] if err.args else err))
    from tqdm.auto import tqdm

    from ..core.runs import ModelKey
    from ..core.tasks import load_task

    datas = {task: load_task(task) for task in args.tasks}  # checked before the model loads
    key = ModelKey.of(model_name, device=args.device or "cpu") if model_name in _offline() else None
    if key is not None:  # what is already cached (no model needed to know it)
        todo = [w for w in work if w[0].missing(key, datas[w[3]], w[1], w[2])]
    else:
        todo = work
    print(f"{len(work) - len(todo)} of {len(work)} (experiment, seed, task) runs cached; {len(todo)} to compute",
          flush=True)
    if args.dry_run or not todo:
        for exp, _, seed, task in todo:
            print(f"  missing: {exp.name} {task} seed {seed}")
        return
    import torch

    from ..core.models import load_model

    if not args.skip_memory_check and (args.device or "cpu") == "cpu":
        from ..core.models import check_memory

        try:
            check_memory(model_name)
        except MemoryError as err:
            p.exit(2, f"error: {err}\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(model_name, device=args.device)
    bar = tqdm(todo, desc="compute", unit="run")
    for exp, config, seed, task in bar:
        bar.set_postfix_str(f"{exp.name} {task} seed {seed}")
        t0 = time.perf_counter()
        exp.run(lm, datas[task], config, seed)
        tqdm.write(f"{exp.name} {model_name} {task} seed {seed}: {time.perf_counter() - t0:.0f} s")


def _offline() -> set[str]:
    from ..core.models import OFFLINE_MODELS

    return set(OFFLINE_MODELS)


if __name__ == "__main__":
    main()
