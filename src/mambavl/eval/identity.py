"""Whose answers an eval run directory holds. The first run records in `OUT/run.json` the model (its
directory and a sha256 of every file it is loaded from), its dtype, and each benchmark's options (data root,
mode, answer length); a rerun compares before it resumes, so that one model's predictions are never resumed
into, or reported as, another model's or another setting's.

A file's sha256 is kept beside its size and mtime (ns) and reused while both are unchanged: a multi-GB model
is read once, not at every rerun. (Weights saved over the recorded ones are written after the eval that
recorded them, so they carry a new mtime even at the same size.) The default run directory is named after a
fingerprint of the model's files (their paths, sizes and mtimes: no reading), so two models, or one
retrained in place, never share it."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mambavl.eval.base import Benchmark

RECORD = "run.json"
FORMAT = "mambavl-eval-run"
# what a run writes besides OUT/<benchmark>/predictions.jsonl
OUTPUTS = ("results.json", "results.md", RECORD)
CHUNK = 8 << 20


class RunDirError(ValueError):
    """An eval run directory that holds another run: the message names what differs and the fixes."""


@dataclass(frozen=True)
class ModelFile:
    path: str  # absolute
    size: int
    mtime_ns: int
    sha256: str = ""


@dataclass(frozen=True)
class ModelIdentity:
    name: str  # the model as it was named (--model)
    path: str | None  # its directory, resolved; None for a preset's released weights or a model in memory
    dtype: str
    digest: str  # sha256 over the files' names and contents (a model in memory: over its weights)
    files: tuple[ModelFile, ...] = ()


def _files_of(model: str) -> list[Path]:
    """The files `model` is loaded from; none for a model built in memory (a name that is neither a
    directory nor a preset: `evaluate` was handed a VLM made in Python)."""
    from mambavl.checkpoints.vlm import model_files
    from mambavl.presets import PRESETS

    if Path(model).expanduser().is_dir() or model in PRESETS:
        return model_files(model)
    return []


def stat_files(model: str) -> list[ModelFile]:
    out = []
    for path in _files_of(model):
        st = path.stat()
        out.append(ModelFile(str(path.absolute()), st.st_size, st.st_mtime_ns))
    return out


def sha256_file(path: str | Path) -> str:
    """Streamed: a file of any size in constant memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def state_digest(vlm) -> str:
    """sha256 over a model's tensors (names, dtypes, shapes, bytes): the identity of a model with no files."""
    h = hashlib.sha256()
    for name, tensor in sorted(vlm.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}\t{t.dtype}\t{tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(model: str, vlm) -> str:
    """8 hex digits that change with the model's files (paths, sizes, mtimes) without reading them."""
    files = stat_files(model)
    if not files:
        return state_digest(vlm)[:8]
    text = json.dumps([(f.path, f.size, f.mtime_ns) for f in files])
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def identify(model: str, vlm, known: Iterable[ModelFile] = ()) -> ModelIdentity:
    """The model's identity; a file whose path, size and mtime match a `known` one keeps its hash."""
    cache = {(f.path, f.size, f.mtime_ns): f.sha256 for f in known if f.sha256}
    files = tuple(
        ModelFile(f.path, f.size, f.mtime_ns, cache.get((f.path, f.size, f.mtime_ns)) or sha256_file(f.path))
        for f in stat_files(model)
    )
    if files:  # names and contents, not paths: the same model copied elsewhere is the same model
        digest = hashlib.sha256("".join(f"{Path(f.path).name}\t{f.sha256}\n" for f in files).encode())
        digest = digest.hexdigest()
    else:
        digest = state_digest(vlm)
    path = Path(model).expanduser()
    return ModelIdentity(
        name=model,
        path=str(path.resolve()) if path.is_dir() else None,
        dtype=str(vlm.dtype).removeprefix("torch."),
        digest=digest,
        files=files,
    )


def benchmark_options(benchmark: Benchmark, data_root: Path, mode: str, max_new_tokens: int | None) -> dict:
    """What a benchmark's answers depend on besides the model. Neither --limit (answers are per sample: a
    larger limit extends a run) nor --batch-size (batching changes no answer) is among them."""
    return {
        "data_root": str(Path(data_root).resolve()),
        "mode": mode,
        "max_new_tokens": max_new_tokens or benchmark.max_new_tokens,
    }


def default_out(benchmarks: tuple[str, ...], model: str, vlm, mode: str, root: Path = Path("evals")) -> Path:
    """evals/<benchmarks>-<model folder>-<fingerprint>-<mode>: readable, and one per model and mode."""
    label = "+".join(benchmarks)
    if len(label) > 40:
        label = f"{benchmarks[0]}+{len(benchmarks) - 1}-more"
    name = re.sub(r"[^A-Za-z0-9+._-]+", "_", Path(model).expanduser().name or "model")
    return root / f"{label}-{name}-{fingerprint(model, vlm)}-{mode}"


# ---- the record in the run directory -----------------------------------------------------------------------
def read_record(out: Path) -> dict | None:
    path = out / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") != FORMAT:
            raise ValueError(f"format is {record.get('format')!r}, not {FORMAT!r}")
        record["model"]["files"] = [ModelFile(**f) for f in record["model"].get("files", [])]
        return record
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise RunDirError(
            f"{path}: not an eval run record ({type(e).__name__}: {e}); pass --overwrite to start the run "
            "over, or choose another --out"
        ) from e


def known_files(out: Path) -> list[ModelFile]:
    """The hashes recorded in `out`, to reuse (none when there is no readable record)."""
    try:
        record = read_record(out)
    except RunDirError:
        return []
    return record["model"]["files"] if record else []


def predictions_files(out: Path) -> list[Path]:
    return sorted(out.glob("*/predictions.jsonl")) if out.is_dir() else []


def conflicts(record: dict | None, out: Path, model: ModelIdentity, options: dict[str, dict]) -> list[str]:
    """What differs between the run in `out` and this one (empty: resume it)."""
    unrecorded = "holds predictions with no record of the model or the options that made them"
    if record is None:
        return [f"{found[0]} {unrecorded}"] if (found := predictions_files(out)) else []
    was, now = record["model"], asdict(model)
    problems = []
    if was["digest"] != now["digest"]:
        problems.append(f"the model differs: {_describe(was)} there, {_describe(now)} now")
    elif was["dtype"] != now["dtype"]:
        problems.append(f"the dtype differs: {was['dtype']} there, {now['dtype']} now (--dtype)")
    recorded = record.get("benchmarks", {})
    for name, opts in options.items():
        if name not in recorded:
            if (out / name / "predictions.jsonl").is_file():
                problems.append(f"{out / name / 'predictions.jsonl'} {unrecorded}")
            continue
        for key, value in opts.items():
            if (old := recorded[name].get(key)) != value:
                flag = "--" + key.replace("_", "-")
                problems.append(f"{name}'s {key} differs: {old!r} there, {value!r} now ({flag})")
    return problems


def _describe(model: dict) -> str:
    return f"{model['name']} (sha256 {model['digest'][:12]}, {model['dtype']})"


def claim(out: Path, model: ModelIdentity, options: dict[str, dict], overwrite: bool = False) -> dict:
    """Makes `out` this run's and returns the record to write there: a new directory, or one holding this
    same run, goes on (new benchmarks join it); one holding another model's or another setting's
    predictions is refused, or with `overwrite` emptied of that run first."""
    record = None if overwrite else read_record(out)
    if overwrite:
        clear(out)
    elif problems := conflicts(record, out, model, options):
        raise RunDirError(
            f"{out} holds another eval run: {'; '.join(problems)}. Resuming it would report its predictions "
            "as this run's. Pass --overwrite to start over there, or another --out (without --out, each "
            "model and mode gets its own directory under evals/)."
        )
    entry = asdict(model) | {"files": [asdict(f) for f in model.files]}
    benchmarks = (record or {}).get("benchmarks", {}) | options
    return {"format": FORMAT, "version": 1, "model": entry, "benchmarks": benchmarks}


def clear(out: Path) -> None:
    """Removes what an eval run wrote in `out` (and nothing else: --out may be a directory of other files)."""
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    for path in predictions_files(out):
        path.unlink()
        if not any(path.parent.iterdir()):
            path.parent.rmdir()
