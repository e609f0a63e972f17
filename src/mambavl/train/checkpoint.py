"""Training checkpoints, written atomically: everything goes into a temporary directory, which is renamed
into place only once complete, and then the `latest` pointer is swapped (os.replace). A crash, a kill or
a full disk mid-write leaves the previous checkpoint and pointer as they were.

A checkpoint holds the trainable weights (the frozen ones are rebuilt from the run's model source), the
optimizer and scheduler state, and the trainer's position (step, epoch, batch in epoch). Random state
needs no saving: every step reseeds from (seed, step, rank), so a resumed step draws what it would have.
With several processes the weights and optimizer state are gathered into one full copy (rank 0 writes
it), so a checkpoint resumes on any number of processes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
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


@dataclass(frozen=True)
class Position:
    step: int  # optimizer steps done
    epoch: int
    batch_in_epoch: int  # global batches of `epoch` done
    tokens: int  # positions trained on so far
    elapsed_s: float


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
    """Writes `directory/step-XXXXXXX` and points `latest` at it; keeps the newest `keep`."""
    directory = Path(directory)
    weights = get_model_state_dict(model, options=_options(world, ignore_frozen_params=True))
    optim = get_optimizer_state_dict(model, optimizer, options=_options(world))
    if not world.main:
        world.barrier()
        return None
    name = f"step-{position.step:07d}"
    final = directory / name
    tmp = directory / f".tmp-{name}-{os.getpid()}"
    directory.mkdir(parents=True, exist_ok=True)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(_untied(weights), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "position.json").write_text(json.dumps(asdict(position)))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a step re-saved after a resume
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer = directory / f".{LATEST}.tmp"
        pointer.write_text(name)
        os.replace(pointer, directory / LATEST)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        world.barrier()
        raise
    for old in sorted(directory.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


def _untied(weights: dict) -> dict:
    """Tied parameters (an LM head sharing the embedding) once: loading one name restores both."""
    seen, out = set(), {}
    for name, tensor in weights.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor.contiguous()
    return out


def latest(directory: Path) -> Path | None:
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if (path / "position.json").is_file() else None


def load(path: Path, model, optimizer, scheduler, world: World) -> Position:
    """Restores a checkpoint written by `save` into a model and optimizer built the same way."""
    path = Path(path)
    position = Position(**json.loads((path / "position.json").read_text()))
    broadcast = world.distributed
    weights = load_file(str(path / "trainable.safetensors")) if (world.main or not broadcast) else {}
    state = torch.load(path / "optimizer.pt", weights_only=False, map_location="cpu")
    missing = set(weights) - {n for n, p in model.named_parameters() if p.requires_grad}
    if missing and world.main:
        raise ValueError(
            f"{path}: the checkpoint trains parameters this run does not ({sorted(missing)[:3]}...): "
            "resume with the same stage and options"
        )
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast, strict=False)
    set_model_state_dict(model, weights, options=opts)
    set_optimizer_state_dict(
        model, optimizer, state["optimizer"] if (world.main or not broadcast) else {}, options=opts
    )
    scheduler.load_state_dict(state["scheduler"])
    return position
