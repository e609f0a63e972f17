"""Training checkpoints: written atomically, read back without running code, resumed from the newest one
that is complete.

Everything goes into a temporary directory, which is renamed into place only once complete and synced,
and then the `latest` pointer is swapped (os.replace). A crash, a kill or a full disk mid-write leaves
the previous checkpoint and pointer as they were; a kill leaves the temporary directory, which the next
resume removes.

A checkpoint holds the trainable weights (the frozen ones are rebuilt from the run's model source), the
optimizer and scheduler state, and the trainer's position (step, epoch, batch in epoch). Run directories
are shared and downloaded like model directories, so nothing in one is unpickled: tensors are stored as
safetensors and the rest of the optimizer and scheduler state as JSON, each tensor named by its path in
the state. Checkpoints of older versions (`optimizer.pt`) are read with torch's weights-only unpickler,
which refuses anything but tensors and plain data. Random state needs no saving: every step reseeds from
(seed, step, rank), so a resumed step draws what it would have. With several processes the weights and
optimizer state are gathered into one full copy (rank 0 writes it), so a checkpoint resumes on any number
of processes.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mambavl.train.distributed import World

LATEST = "latest"
WEIGHTS = "trainable.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_STATE = "optimizer.json"
POSITION = "position.json"
LEGACY_OPTIMIZER = "optimizer.pt"  # what earlier versions wrote: a torch.save pickle of plain data
STATE_FORMAT = 1

STEP_DIR = re.compile(r"step-(\d{7,})")
# A save's working directory (`.tmp-step-0000004-<pid>`) and the pointer being swapped: what a kill leaves.
STALE = re.compile(r"\.tmp-step-\d{7,}-\d+|\." + LATEST + r"\.tmp")
# JSON objects that stand for what JSON lacks; a state dict using one of these keys itself is refused.
TENSOR, TUPLE, INT_KEYS = "__tensor__", "__tuple__", "__int_keys__"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class ResumeError(ValueError):
    """No checkpoint of the run can be resumed safely (incomplete, corrupt, or holding code)."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the previous one is untouched."""

    def __str__(self) -> str:
        return self.strerror  # the whole explanation, without OSError's "[Errno N]" prefix


@dataclass(frozen=True)
class Position:
    step: int  # optimizer steps done
    epoch: int
    batch_in_epoch: int  # global batches of `epoch` done
    tokens: int  # positions trained on so far
    elapsed_s: float


@dataclass(frozen=True)
class ResumePoint:
    path: Path | None  # None: no checkpoint yet, the run starts from step 0
    notes: tuple[str, ...]  # what was chosen and why, for the log


# ---- state as safetensors + JSON ------------------------------------------------------------------------
def flatten_state(state) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able tree, tensors): each tensor replaced by {"__tensor__": its path}, e.g.
    `optimizer/state/lm.layers.0.mixer.in_proj.weight/exp_avg`."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def walk(obj, path: str):
        def at(key) -> str:
            return f"{path}/{key}" if path else str(key)

        if isinstance(obj, torch.Tensor):
            if path in tensors:
                raise ValueError(f"two entries of the state are both named {path!r}")
            tensor = obj.detach().cpu().contiguous()
            if tensor.numel() and tensor.untyped_storage().data_ptr() in storages:
                tensor = tensor.clone()  # safetensors refuses tensors that share memory
            storages.add(tensor.untyped_storage().data_ptr())
            tensors[path] = tensor
            return {TENSOR: path}
        if isinstance(obj, tuple):
            return {TUPLE: [walk(v, at(i)) for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [walk(v, at(i)) for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj):
                if {TENSOR, TUPLE, INT_KEYS} & set(obj):
                    raise ValueError(f"{path}: the state uses a reserved key ({sorted(obj)})")
                return {k: walk(v, at(k)) for k, v in obj.items()}
            if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
                return {INT_KEYS: {str(k): walk(v, at(k)) for k, v in obj.items()}}
            raise TypeError(f"{path}: cannot store a dict with keys {list(obj)[:3]} in a checkpoint")
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(
            f"{path}: cannot store a {type(obj).__name__} in a checkpoint (tensors, numbers, text)"
        )

    return walk(state, ""), tensors


def unflatten_state(tree, tensor, where: str):
    """The inverse of `flatten_state`; `tensor(name)` returns a stored tensor."""

    def walk(obj):
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        if TENSOR in obj:
            return tensor(obj[TENSOR])
        if TUPLE in obj:
            return tuple(walk(v) for v in obj[TUPLE])
        if INT_KEYS in obj:
            return {int(k): walk(v) for k, v in obj[INT_KEYS].items()}
        return {k: walk(v) for k, v in obj.items()}

    try:
        return walk(tree)
    except (KeyError, TypeError, ValueError) as e:
        raise ResumeError(f"{where}: malformed optimizer state ({e}); resume from another checkpoint") from e


def _tensor_names(tree) -> set[str]:
    if isinstance(tree, list):
        return set().union(*map(_tensor_names, tree)) if tree else set()
    if isinstance(tree, dict):
        if TENSOR in tree:
            return {tree[TENSOR]}
        return set().union(*map(_tensor_names, tree.values())) if tree else set()
    return set()


# ---- what is on disk ------------------------------------------------------------------------------------
def _step_dirs(directory: Path) -> list[tuple[int, Path]]:
    """The `step-N` directories, oldest first (by number: names stop sorting once N passes 7 digits)."""
    if not directory.is_dir():
        return []
    found = [(m, p) for p in directory.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted((int(m.group(1)), p) for m, p in found)


def _safetensors_problem(path: Path) -> tuple[str | None, set[str]]:
    """Why a safetensors file is unreadable, cut short or damaged (None if it is whole; safetensors checks
    the header and that it covers the file exactly), and its tensor names."""
    if not path.is_file():
        return f"{path.name} is missing", set()
    try:
        with safe_open(str(path), framework="pt") as f:
            return None, set(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        reason = str(e).removeprefix("Error while deserializing header: ")[:200]
        return f"{path.name} is cut short or damaged ({reason})", set()


def _read_position(path: Path) -> Position:
    raw = json.loads((path / POSITION).read_text())
    names = {f.name for f in fields(Position)}
    if not isinstance(raw, dict) or set(raw) != names:
        raise ValueError(f"expected the fields {sorted(names)}")
    ints = ("step", "epoch", "batch_in_epoch", "tokens")
    if any(not isinstance(raw[k], int) or isinstance(raw[k], bool) or raw[k] < 0 for k in ints):
        raise ValueError(f"{', '.join(ints)} must be whole numbers ≥ 0")
    if not isinstance(raw["elapsed_s"], (int, float)) or isinstance(raw["elapsed_s"], bool):
        raise ValueError("elapsed_s must be a number")
    return Position(**raw)


def _links_out(path: Path) -> list[str]:
    """The checkpoint's directory, or else its files, where they resolve outside the checkpoints
    directory (symlinks): nothing is read from outside the run."""
    root = path.parent.resolve()
    for group in (
        [path],
        [path / n for n in (POSITION, WEIGHTS, OPTIMIZER_TENSORS, OPTIMIZER_STATE, LEGACY_OPTIMIZER)],
    ):
        out = [p for p in group if (p.exists() or p.is_symlink()) and not p.resolve().is_relative_to(root)]
        if out:
            return [f"{p.name} links outside {path.parent}" for p in out]
    return []


def problems(path: Path) -> list[str]:
    """What keeps a checkpoint directory from being resumed (empty: it is complete)."""
    path = Path(path)
    found = _links_out(path)
    if found:
        return found
    try:
        position = _read_position(path)
        m = STEP_DIR.fullmatch(path.name)
        if m and int(m.group(1)) != position.step:
            found.append(f"{POSITION} says step {position.step}")
    except FileNotFoundError:
        found.append(f"{POSITION} is missing")
    except (OSError, ValueError, TypeError, RecursionError) as e:
        found.append(f"{POSITION} is unreadable ({type(e).__name__}: {e})")
    weights_problem, _ = _safetensors_problem(path / WEIGHTS)
    found += [weights_problem] if weights_problem else []
    if (path / OPTIMIZER_STATE).exists() or not (path / LEGACY_OPTIMIZER).exists():
        found += _optimizer_problems(path)
    elif not zipfile.is_zipfile(path / LEGACY_OPTIMIZER):
        found.append(f"{LEGACY_OPTIMIZER} is not a torch checkpoint archive")
    return found


def _optimizer_problems(path: Path) -> list[str]:
    tensors_problem, stored = _safetensors_problem(path / OPTIMIZER_TENSORS)
    if tensors_problem:
        return [tensors_problem]
    try:
        state = json.loads((path / OPTIMIZER_STATE).read_text())
    except FileNotFoundError:
        return [f"{OPTIMIZER_STATE} is missing"]
    except (OSError, ValueError, RecursionError) as e:
        return [f"{OPTIMIZER_STATE} is unreadable ({type(e).__name__}: {e})"]
    if (
        not isinstance(state, dict)
        or state.get("format") != STATE_FORMAT
        or not {"optimizer", "scheduler"} <= set(state)
    ):
        return [f"{OPTIMIZER_STATE} is not mambavl's optimizer state (format {STATE_FORMAT})"]
    absent = _tensor_names(state) - stored
    return [f"{OPTIMIZER_TENSORS} lacks {sorted(absent)[:3]}"] if absent else []


def _pointer(directory: Path) -> str | None:
    """What the `latest` pointer says (None: no pointer); only a step name counts as one."""
    pointer = Path(directory) / LATEST
    if not (pointer.exists() or pointer.is_symlink()):
        return None
    named = ""
    try:
        if pointer.is_file():
            with open(pointer, "rb") as f:
                named = f.read(100).decode().strip()
    except (OSError, ValueError):
        pass  # unreadable: reported below as not a checkpoint name
    return named if STEP_DIR.fullmatch(named) else f"{named[:40]!r}, which is not a checkpoint name"


def latest(directory: Path) -> Path | None:
    """The checkpoint the `latest` pointer names, if it is complete."""
    named = _pointer(directory)
    path = Path(directory) / named if named and STEP_DIR.fullmatch(named) else None
    return path if path is not None and path.is_dir() and not problems(path) else None


def resume_point(directory: Path) -> ResumePoint:
    """The newest complete checkpoint, with notes saying which and why. A run that has checkpoints but no
    complete one is refused rather than restarted from step 0 (which would rewrite its metrics)."""
    directory = Path(directory)
    named = _pointer(directory)
    broken = []
    for _, path in reversed(_step_dirs(directory)):
        found = problems(path)
        if found:
            broken.append(f"{path.name} ({'; '.join(found)})")
            continue
        notes = [f"skipping the incomplete checkpoint {b}" for b in broken]
        if named is not None and named != path.name:
            notes.append(f"`latest` names {named}; resuming from {path.name}, the newest complete checkpoint")
        return ResumePoint(path, tuple(notes))
    if broken or named is not None:
        found = "; ".join(broken) or f"`latest` names {named}, which does not exist"
        raise ResumeError(
            f"{directory}: no complete checkpoint to resume from: {found}. Nothing was changed; restore a "
            "checkpoint, or delete the checkpoints directory to restart the run from step 0"
        )
    return ResumePoint(None, (f"no checkpoint in {directory} yet: starting again from step 0",))


def clean_stale(directory: Path) -> list[Path]:
    """Removes what interrupted saves left (`.tmp-step-*` directories, a half-swapped pointer); only
    names of our own making are touched. Call it from one process, before any save starts."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.iterdir()):
        if not STALE.fullmatch(path.name):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


# ---- save ----------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _options(world: World, **kw) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def save(
    directory: Path, model, optimizer, scheduler, position: Position, world: World, keep: int = 2
) -> Path | None:
    """Writes `directory/step-XXXXXXX` and points `latest` at it; keeps the newest `keep` (0: all).
    Raises `CheckpointSaveError` if the disk refuses the write, leaving the previous checkpoint as it was."""
    directory = Path(directory)
    weights = get_model_state_dict(model, options=_options(world, ignore_frozen_params=True))
    optim = get_optimizer_state_dict(model, optimizer, options=_options(world))
    if not world.main:
        world.barrier()
        return None
    try:
        final = _write(directory, _untied(weights), optim, scheduler.state_dict(), position)
    finally:
        world.barrier()
    _prune(directory, position.step, keep)
    return final


def _write(directory: Path, weights: dict, optim: dict, sched: dict, position: Position) -> Path:
    tree, tensors = flatten_state({"optimizer": optim, "scheduler": sched})
    state = {"format": STATE_FORMAT, **tree}
    name = f"step-{position.step:07d}"
    final = directory / name
    tmp = directory / f".tmp-{name}-{os.getpid()}"
    pointer = directory / f".{LATEST}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _check_space(directory, name, _nbytes(weights, tensors))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(weights, str(tmp / WEIGHTS))
        save_file(tensors, str(tmp / OPTIMIZER_TENSORS))
        (tmp / OPTIMIZER_STATE).write_text(json.dumps(state))
        (tmp / POSITION).write_text(json.dumps(asdict(position)))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a step re-saved after a resume
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer.write_text(name)
        os.replace(pointer, directory / LATEST)
        _fsync_dir(directory)
    except CheckpointSaveError:
        raise  # refused before anything was written
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        pointer.unlink(missing_ok=True)
        raise _save_error(e, name, directory, weights, tensors) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        pointer.unlink(missing_ok=True)
        raise
    return final


def _nbytes(*parts: dict) -> int:
    return sum(t.numel() * t.element_size() for part in parts for t in part.values())


def _free_bytes(directory: Path) -> int | None:
    """Space the disk holding `directory` has left for us (None: unknown; some network and FUSE file
    systems report a zero-sized disk)."""
    try:
        usage = shutil.disk_usage(directory)
    except OSError:
        return None
    return usage.free if usage.total > 0 else None


def _check_space(directory: Path, name: str, need: int) -> None:
    """Refuses a save that cannot fit before a byte of it is written: a multi-GB write that fails near its
    end would take minutes and fill the disk for everyone else meanwhile."""
    free = _free_bytes(directory)
    if free is not None and free < need:
        raise CheckpointSaveError(
            errno.ENOSPC,
            f"not enough space to write the checkpoint {name} to {directory}: it needs about "
            f"{need / 2**20:,.0f} MiB and the disk has {free / 2**20:,.0f} MiB free; nothing was written, "
            f"{_intact(directory)}. Free some space, then continue the run with --resume",
        )


def _newest(directory: Path) -> Path | None:
    try:
        return resume_point(directory).path
    except (ResumeError, OSError):
        return None


def _intact(directory: Path) -> str:
    previous = _newest(directory)
    if previous is None:
        return "there is no earlier checkpoint"
    return f"the previous checkpoint {previous.name} is intact and `latest` is unchanged"


def _errno(error: Exception) -> int | None:
    code = getattr(error, "errno", None)
    if code is None:  # safetensors reports I/O errors as text: "... (os error 28)"
        m = re.search(r"os error (\d+)", str(error))
        code = int(m.group(1)) if m else None
    return code


def _save_error(error: Exception, name: str, directory: Path, *parts: dict) -> CheckpointSaveError:
    """The failure in words: what could not be written, what is still intact, what to do."""
    code = _errno(error)
    intact = _intact(directory)
    if code in NO_SPACE:
        return CheckpointSaveError(
            code,
            f"no space left on device while writing the checkpoint {name} to {directory} (it needs about "
            f"{_nbytes(*parts) / 2**20:,.0f} MiB); {intact}. Free some space, then continue the run with "
            "--resume",
        )
    return CheckpointSaveError(
        code or errno.EIO,
        f"could not write the checkpoint {name} to {directory} ({error}); {intact}. "
        "Fix the cause, then continue the run with --resume",
    )


def model_save_error(
    error: Exception, model_dir: Path, checkpoints: Path, weights: dict
) -> CheckpointSaveError:
    """The trained model (`run_dir/model`, written after the last checkpoint) could not be saved: the run
    is not lost, `--resume` on the finished run writes the model again without training."""
    code = _errno(error)
    last = _newest(checkpoints)
    kept = f"the run's last checkpoint {last.name} is intact" if last else "the run has no checkpoint"
    cause = (
        f"no space left on device (it needs about {_nbytes(weights) / 2**20:,.0f} MiB)"
        if code in NO_SPACE
        else str(error)
    )
    fix = "Free some space" if code in NO_SPACE else "Fix the cause"
    return CheckpointSaveError(
        code or errno.EIO,
        f"could not write the trained model to {model_dir}: {cause}; {kept}. {fix}, then run the same "
        "command with --resume: it writes the model without training again",
    )


def _prune(directory: Path, step: int, keep: int) -> None:
    """Keeps the newest `keep` checkpoints up to `step`. Later ones (left incomplete before a resume from
    an earlier step) are not counted: the run replaces them as it passes them."""
    if keep <= 0:
        return
    done = [path for s, path in _step_dirs(directory) if s <= step]
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _untied(weights: dict) -> dict:
    """Tied parameters (an LM head sharing the embedding) once: loading one name restores both."""
    seen, out = set(), {}
    for name, tensor in weights.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor.contiguous()
    return out


# ---- load ----------------------------------------------------------------------------------------------
def load(path: Path, model, optimizer, scheduler, world: World) -> Position:
    """Restores a checkpoint written by `save` into a model and optimizer built the same way."""
    path = Path(path)
    found = problems(path)
    if found:
        raise ResumeError(f"{path}: cannot resume from this checkpoint: {'; '.join(found)}")
    position = _read_position(path)
    full_copy = world.main or not world.distributed  # with several processes, rank 0 broadcasts
    weights = _read(path / WEIGHTS, load_file) if full_copy else {}
    state = _read_optimizer_state(path, full_copy)
    # every name of a tied parameter: gathered from several processes, each name comes as its own tensor
    trained = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    missing = set(weights) - trained
    if missing and world.main:
        raise ResumeError(
            f"{path}: the checkpoint trains parameters this run does not ({sorted(missing)[:3]}...): "
            "resume with the same stage and options"
        )
    if full_copy:
        _check_fits(path, state["optimizer"], model, optimizer)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world.distributed, strict=False)
    set_model_state_dict(model, weights, options=opts)
    try:
        set_optimizer_state_dict(model, optimizer, state["optimizer"] if full_copy else {}, options=opts)
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise ResumeError(
            f"{path}: its optimizer or scheduler state does not fit this run's ({type(e).__name__}: {e}); "
            "resume with the same stage and options"
        ) from e
    return position


def _check_fits(path: Path, saved, model, optimizer) -> None:
    """The saved optimizer state names this run's parameters, group by group, with their shapes (torch's
    loader would silently skip what it does not recognise)."""
    params = dict(model.named_parameters(remove_duplicate=False))

    def unfit(why: str) -> ResumeError:
        return ResumeError(
            f"{path}: its optimizer state does not fit this run's optimizer ({why}); resume with the same "
            "stage and options"
        )

    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise unfit(f"{len(optimizer.param_groups)} parameter groups expected")
    named = set()
    for i, (group, live) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        mine = {id(p) for p in live["params"]}
        names = group.get("params") if isinstance(group, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise unfit(f"group {i} has no list of parameter names")
        wrong = [n for n in names if id(params.get(n)) not in mine]
        if wrong:
            raise unfit(f"group {i} lists {wrong[:3]}, which are not this group's parameters")
        if {id(params[n]) for n in names} != mine:
            raise unfit(f"group {i} lists {len(names)} of this group's {len(mine)} parameters")
        named.update(names)
    for name, entry in (saved.get("state") or {}).items():
        if name not in named or not isinstance(entry, dict):
            raise unfit(f"state for {name!r}, which no group lists")
        shapes = {k: tuple(v.shape) for k, v in entry.items() if isinstance(v, torch.Tensor) and v.ndim}
        bad = {k: v for k, v in shapes.items() if v != tuple(params[name].shape)}
        if bad:
            raise unfit(f"{name}: shapes {bad}, the parameter is {tuple(params[name].shape)}")


def _read(file: Path, reader):
    """`reader(file)`, with a damaged file (one `problems` cannot see) named in a `ResumeError`."""
    try:
        return reader(str(file))
    except (SafetensorError, OSError, ValueError, RecursionError) as e:
        raise ResumeError(
            f"{file}: cannot be read ({type(e).__name__}: {e}); resume from another checkpoint"
        ) from e


def _read_optimizer_state(path: Path, full_copy: bool) -> dict:
    """{"optimizer", "scheduler"}; without `full_copy` the optimizer's tensors are left unread (None)."""
    if not (path / OPTIMIZER_STATE).exists() and (path / LEGACY_OPTIMIZER).exists():
        return _read_legacy(path / LEGACY_OPTIMIZER)
    where = path / OPTIMIZER_STATE
    tree = _read(where, lambda f: json.loads(Path(f).read_text()))
    if full_copy:
        tensors = _read(path / OPTIMIZER_TENSORS, load_file)
        return unflatten_state(tree, tensors.__getitem__, str(where))

    def scheduler_only(file: str) -> dict:  # the scheduler's tensors, if it has any
        with safe_open(file, framework="pt") as f:
            return unflatten_state(tree["scheduler"], f.get_tensor, str(where))

    return {"optimizer": None, "scheduler": _read(path / OPTIMIZER_TENSORS, scheduler_only)}


def _read_legacy(file: Path) -> dict:
    """An older version's `optimizer.pt`: tensors and plain data only (torch's weights-only unpickler, whose
    default allow-list covers optimizer and scheduler state); anything else is refused unrun."""
    try:
        state = torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:  # the weights-only unpickler's refusal
        raise ResumeError(
            f"{file}: refused to load: it holds more than tensors and plain data, so loading it could run "
            f"code ({_refusal(e)}). mambavl never unpickles objects from a run directory: if you did not "
            "write this checkpoint, delete its directory (resume then takes the previous one) or start a "
            "new run"
        ) from e
    except Exception as e:  # a damaged archive: torch raises RuntimeError and others
        raise ResumeError(f"{file}: cannot be read ({_refusal(e)}); resume from another checkpoint") from e
    if not isinstance(state, dict) or not {"optimizer", "scheduler"} <= set(state):
        raise ResumeError(f"{file}: not a mambavl optimizer checkpoint (no optimizer and scheduler state)")
    return state


def _refusal(error: Exception) -> str:
    """What torch's long weights-only message says was refused, in a few words."""
    text = str(error)
    if m := re.search(r"GLOBAL ([\w.]+)", text):
        return f"it refers to {m.group(1)}"
    if m := re.search(r"Unsupported operand \d+", text):
        return m.group(0)
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(error).__name__}: {first}"
