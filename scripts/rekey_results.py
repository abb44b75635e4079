"""One-off migration: give results cached under the old key (before the cache key covered the model's identity,
dtype, device and data) the current key.

    python scripts/rekey_results.py results --data /work/shared/data          # rename and rewrite in place
    python scripts/rekey_results.py results --data /work/shared/data --dry-run

Old-format files are recognised by their ``.json`` (no ``"format": 2``). For each, the new key is recomputed from its
experiment, model, task and settings under these ASSUMPTIONS, which held for every result computed before the change
(``helpers.cli.compute`` and the chapters always loaded the models this way on this project's CPU machines):

* the model was loaded in float32 (``--dtype``) on the CPU (``--device``);
* the model's identity is the one installed now: for an offline name, the installed versions of its packages (so
  run this in the environment the results were computed in); for a local folder, its current content hash;
* the data are the task's files in ``--data`` (default: ``helpers.core.tasks.default_data_dir()``), now;
* transformers' major.minor is the installed one (the old key only recorded the major version).

The ``.npz`` is checked (readable, finite) and moved unchanged; its ``.json`` is rewritten with every field of the
new key. Files already in the new format are left alone, so the script can be re-run, e.g. after merging branches
that still wrote old-key results. A file whose old name does not match its own ``.json`` (a mismatched pair), whose
``RESULTS_VERSION`` differs, or that holds NaN/inf (except in fields named with ``--allow-nan experiment:field``,
as the experiment's ``cached_run(allow_nan=...)`` names them), is reported and left alone. Exit status 1 if anything
was left.

The folder may have been received from someone else: a ``.json`` that cannot be read, or whose experiment, task or
model would put the file outside the folder (``../..``, a separator), is reported and left alone; nothing is ever
written outside ``folder``.

``--model-identity MODEL`` re-keys current-format results of MODEL with the identity the installed model has now,
when that identity only adds fields to the recorded one (e.g. the sha256 of the converted weights); a record whose
identity differs in a field it already held (other package versions: other weights) is reported and left alone.

``--add-checksums`` gives current-format results written before the cache recorded them the sha256 of their ``.npz``
and their fields' dtypes and shapes (which :func:`helpers.core.runs.read_result` then checks), after checking that
the ``.json``'s key matches its fields and its file name and that the ``.npz`` is readable and finite. Nothing is
recomputed; the ``.npz`` is not touched.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from helpers.core.models import model_identity  # noqa: E402
from helpers.core.runs import (  # noqa: E402
    KEY_FIELDS,
    RESULTS_VERSION,
    _array_facts,
    _atomic_write,
    _hash_fields,
    _relative_path,
    _versions,
    check_finite,
    file_sha256,
    load_result,
)
from helpers.core.tasks import default_data_dir, load_task  # noqa: E402


def _read_info(meta: Path) -> tuple[dict | None, str | None]:
    """A ``.json``'s content, or ``(None, why)`` naming the file when it cannot be read."""
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, f"cannot read it ({type(err).__name__}: {err})"
    if not isinstance(info, dict):
        return None, "not a JSON object"
    return info, None


def _inside(root: Path, fields: dict) -> tuple[Path | None, str | None]:
    """Where ``fields`` put a result under ``root``, or ``(None, why)`` if that is not a path inside ``root``."""
    try:
        target = root / _relative_path(fields)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        return None, f"its fields do not give a file name inside {root} ({err})"
    if not target.resolve().is_relative_to(root.resolve()):
        return None, f"its target {target} is outside {root}"
    return target, None


def _move(npz: Path, meta: Path, target: Path, new_info: dict) -> None:
    """Move a result's .npz to ``target`` and write its new .json beside it (removing the old one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    npz.replace(target)
    target.with_suffix(".json").write_text(json.dumps(new_info, indent=1, sort_keys=True, default=str) + "\n")
    if meta != target.with_suffix(".json"):
        meta.unlink()

def old_key(info: dict) -> str:
    """The key before the change: experiment, model name, task, settings, {results, transformers major}."""
    blob = json.dumps({k: info[k] for k in ("experiment", "model", "task", "settings", "versions")}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _Model:
    """What the key needs to know about a model, without loading it."""

    def __init__(self, name: str, dtype: str, device: str):
        self.name = name
        self.identity = model_identity(name)
        self.dtype = getattr(torch, dtype)
        self.device = torch.device(device)


def rekey(root: Path, data_dir: Path | None, dtype: str, device: str, dry_run: bool,
          allow_nan: dict[str, set[str]] | None = None) -> int:
    models: dict[str, _Model] = {}
    data: dict[str, object] = {}
    left = 0
    moved = 0
    for meta in sorted(root.glob("*/*.json")):
        info, why = _read_info(meta)
        if info is None:
            print(f"LEFT {meta}: {why}")
            left += 1
            continue
        if info.get("format") == 2 or "experiment" not in info:  # current format, or not a run-cache result
            continue
        npz = meta.with_suffix(".npz")
        problem = None
        if not npz.is_file():
            problem = "no .npz beside it"
        elif info.get("versions", {}).get("results") != RESULTS_VERSION:
            problem = f"RESULTS_VERSION {info.get('versions', {}).get('results')} != {RESULTS_VERSION}"
        elif not all(k in info for k in ("model", "task", "settings", "versions")):
            problem = "its .json lacks model, task, settings or versions"
        elif not meta.stem.endswith("__" + old_key(info)):
            problem = f"its name does not match its own .json (old key {old_key(info)})"
        else:
            try:
                check_finite(load_result(npz), (allow_nan or {}).get(info["experiment"], ()), what=f"result {npz}")
            except (OSError, ValueError) as err:
                problem = str(err)
        if problem:
            print(f"LEFT {meta}: {problem}")
            left += 1
            continue
        name = info["model"]
        try:
            if name not in models:
                models[name] = _Model(name, dtype, device)
            if info["task"] not in data:
                data[info["task"]] = load_task(info["task"], data_dir)
        except (OSError, ValueError, TypeError, KeyError, LookupError) as err:
            print(f"LEFT {meta}: its model {name!r} or task {info['task']!r} cannot be used ({err})")
            left += 1
            continue
        lm, task_data = models[name], data[info["task"]]
        fields = {
            "experiment": info["experiment"],
            "model": dict(lm.identity),
            "dtype": dtype,
            "device": device,
            "task": task_data.task.name,
            "data": task_data.fingerprint,
            "settings": info["settings"],
            "versions": _versions(),
        }
        target, why = _inside(root, fields)
        if target is None:
            print(f"LEFT {meta}: {why}")
            left += 1
            continue
        rel = target.relative_to(root)
        new_info = {"format": 2, "key": _hash_fields(fields),
                    "allow_nan": sorted((allow_nan or {}).get(info["experiment"], ())), **fields,
                    "migrated_from": {"file": meta.stem, "versions": info["versions"],
                                      "assumed": {"dtype": dtype, "device": device, "data": str(data_dir)}}}
        if target.exists() and target.read_bytes() != npz.read_bytes():
            print(f"LEFT {meta}: {target} exists with other content")
            left += 1
            continue
        print(f"{'would move' if dry_run else 'moved'} {npz.relative_to(root)} -> {rel}")
        moved += 1
        if not dry_run:
            _move(npz, meta, target, new_info)
    print(f"{moved} re-keyed, {left} left alone")
    return 1 if left else 0


def drop_setting(root: Path, name: str, dry_run: bool) -> int:
    """Current-format results: remove ``settings[name]`` and give the file the key without it.

    For a setting that stopped being part of the key (``seeds``: the profile's seed list, dropped from
    ``helpers.core.runs.settings_of`` when a run became one (task, seed) with its own ``n_test``). Nothing else in the
    key changes; the ``.npz`` moves unchanged. Re-runnable.
    """
    moved = left = 0
    for meta in sorted(root.glob("*/*.json")):
        info, why = _read_info(meta)
        if info is None:
            print(f"LEFT {meta}: {why}")
            left += 1
            continue
        if info.get("format") != 2 or name not in info.get("settings", {}):
            continue
        npz = meta.with_suffix(".npz")
        fields = {k: info.get(k) for k in KEY_FIELDS}
        if not npz.is_file() or _hash_fields(fields) != info.get("key"):
            print(f"LEFT {meta}: {'no .npz beside it' if not npz.is_file() else 'its key does not match its fields'}")
            left += 1
            continue
        fields["settings"] = {k: v for k, v in fields["settings"].items() if k != name}
        target, why = _inside(root, fields)
        if target is None:
            print(f"LEFT {meta}: {why}")
            left += 1
            continue
        new_info = {**info, **fields, "key": _hash_fields(fields)}
        new_info.setdefault("dropped_settings", {})[name] = info["settings"][name]
        if target.exists() and target != npz and target.read_bytes() != npz.read_bytes():
            print(f"LEFT {meta}: {target} exists with other content")
            left += 1
            continue
        print(f"{'would move' if dry_run else 'moved'} {npz.relative_to(root)} -> {target.relative_to(root)}")
        moved += 1
        if not dry_run:
            _move(npz, meta, target, new_info)
    print(f"{moved} re-keyed without {name!r}, {left} left alone")
    return 1 if left else 0


def set_identity(root: Path, name: str, dry_run: bool) -> int:
    """Current-format results of the model ``name``: give them the model's identity as computed now
    (:func:`helpers.core.models.model_identity`) and the key that goes with it.

    For an identity that gained a field while the weights stayed the same (e.g. the sha256 of the converted weights,
    added to what the packages' versions already said): a record is moved only if every field its identity holds is
    unchanged in the new one (the new identity adds, never alters); any other is reported and left alone, since it
    was computed with other weights. The ``.npz`` moves unchanged. Re-runnable.
    """
    new_identity = model_identity(name)
    moved = left = 0
    for meta in sorted(root.glob("*/*.json")):
        info, why = _read_info(meta)
        if info is None:
            print(f"LEFT {meta}: {why}")
            left += 1
            continue
        old = info.get("model")
        if info.get("format") != 2 or not isinstance(old, dict) or old.get("name") != name or old == new_identity:
            continue
        npz = meta.with_suffix(".npz")
        fields = {k: info.get(k) for k in KEY_FIELDS}
        problem = None
        if not npz.is_file():
            problem = "no .npz beside it"
        elif _hash_fields(fields) != info.get("key"):
            problem = "its key does not match its fields"
        elif any(new_identity.get(k) != v for k, v in old.items()):
            changed = sorted(k for k, v in old.items() if new_identity.get(k) != v)
            problem = f"its model identity differs in {changed} from the installed model's: other weights"
        if problem:
            print(f"LEFT {meta}: {problem}")
            left += 1
            continue
        fields["model"] = dict(new_identity)
        target, why = _inside(root, fields)
        if target is None:
            print(f"LEFT {meta}: {why}")
            left += 1
            continue
        new_info = {**info, **fields, "key": _hash_fields(fields), "identity_before": old}
        if target.exists() and target != npz and target.read_bytes() != npz.read_bytes():
            print(f"LEFT {meta}: {target} exists with other content")
            left += 1
            continue
        print(f"{'would move' if dry_run else 'moved'} {npz.relative_to(root)} -> {target.relative_to(root)}")
        moved += 1
        if not dry_run:
            _move(npz, meta, target, new_info)
    print(f"{moved} re-keyed with the identity of {name}, {left} left alone")
    return 1 if left else 0


def add_checksums(root: Path, dry_run: bool) -> int:
    """Current-format results without a recorded sha256: record it, and the fields' dtypes and shapes, in the
    ``.json`` (rewritten atomically; the ``.npz`` is not touched). Re-runnable: files that have them are skipped."""
    added = left = 0
    for meta in sorted(root.glob("*/*.json")):
        info, why = _read_info(meta)
        if info is None:
            print(f"LEFT {meta}: {why}")
            left += 1
            continue
        if info.get("format") != 2 or "sha256" in info:
            continue
        npz = meta.with_suffix(".npz")
        fields = {k: info.get(k) for k in KEY_FIELDS}
        target, why = _inside(root, fields)
        problem = why
        if problem is None and not npz.is_file():
            problem = "no .npz beside it"
        elif problem is None and (_hash_fields(fields) != info.get("key") or target != npz):
            problem = "its key does not match its fields or its file name"
        if problem is None:
            try:
                result = load_result(npz)
                check_finite(result, info.get("allow_nan", ()), what=f"result {npz}")
            except (OSError, ValueError) as err:
                problem = str(err)
        if problem:
            print(f"LEFT {meta}: {problem}")
            left += 1
            continue
        new_info = {**info, "sha256": file_sha256(npz), "arrays": _array_facts(result)}
        print(f"{'would add' if dry_run else 'added'} the checksum of {npz.relative_to(root)}")
        added += 1
        if not dry_run:
            text = json.dumps(new_info, indent=1, sort_keys=True, default=str) + "\n"
            _atomic_write(meta, lambda p: p.write_text(text))
    print(f"{added} checksums {'would be added' if dry_run else 'added'}, {left} left alone")
    return 1 if left else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a results folder (results/<experiment>/<files>)")
    parser.add_argument("--data", type=Path, default=None, help="the data folder the results were computed on")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--allow-nan", action="append", default=[], metavar="EXPERIMENT:FIELD",
                        help="a field where NaN is legitimate (as the experiment's cached_run(allow_nan=...)); repeatable")
    parser.add_argument("--drop-setting", default=None, metavar="NAME",
                        help="current-format results: remove this setting from their key (e.g. seeds)")
    parser.add_argument("--add-checksums", action="store_true",
                        help="current-format results: record their .npz's sha256 and shapes in the .json")
    parser.add_argument("--model-identity", default=None, metavar="MODEL",
                        help="current-format results of MODEL: re-key them with its identity as computed now, if "
                             "that only adds fields (e.g. the converted weights' sha256)")
    args = parser.parse_args(argv)
    if args.model_identity:
        return set_identity(args.folder, args.model_identity, args.dry_run)
    if args.add_checksums:
        return add_checksums(args.folder, args.dry_run)
    if args.drop_setting:
        return drop_setting(args.folder, args.drop_setting, args.dry_run)
    allow_nan: dict[str, set[str]] = {}
    for item in args.allow_nan:
        experiment, _, field = item.partition(":")
        if not field:
            parser.error(f"--allow-nan takes EXPERIMENT:FIELD, got {item!r}")
        allow_nan.setdefault(experiment, set()).add(field)
    data_dir = args.data or default_data_dir()
    if data_dir is None:
        parser.error("no data folder: pass --data")
    return rekey(args.folder, data_dir.resolve(), args.dtype, args.device, args.dry_run, allow_nan)


if __name__ == "__main__":
    sys.exit(main())
