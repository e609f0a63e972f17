"""Finding a model directory (local path, or a hub id resolved through the Hugging Face cache) and
reading its weights: safetensors or pytorch_model.bin, sharded or not, with each tensor's file kept
so that errors can name it."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, the key and the fix."""


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.yaml"]


def resolve_model_dir(path_or_hub_id: str | Path) -> Path:
    """A local directory as is; otherwise a hub id ("org/name"), from the local cache first."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the directory that holds config.json and the weights")
    name = str(path_or_hub_id)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(
            f"{name}: no such directory, and not a hub id of the form 'org/name'. "
            "Pass a local model directory or a hub id."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:  # not cached: fall through to a download
        pass
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise CheckpointError(
            f"{name}: not a local directory, not in the Hugging Face cache, and the download failed "
            f"({type(e).__name__}: {e}). Check the id and the network, or pass a local directory."
        ) from e


def hub_file(repo_id: str, filename: str) -> Path:
    """One file of a hub repo: from the local Hugging Face cache if it is there, else downloaded."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception:  # not cached: fall through to a download
        return Path(hf_hub_download(repo_id, filename))


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; a model directory needs a config.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a model directory, safetensors preferred, shards in index order."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        index = read_json(path).get("weight_map")
        if not isinstance(index, dict) or not index:
            raise CheckpointError(f"{path}: no 'weight_map' in the shard index")
        shards = [directory / s for s in dict.fromkeys(index.values())]
        if missing := [s.name for s in shards if not s.is_file()]:
            raise CheckpointError(f"{path} lists shard(s) that are missing: {missing}; download them again")
        return shards
    raise CheckpointError(f"{directory}: no weights found; expected one of {', '.join(WEIGHT_FILES)}")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors or torch file (`weights_only=True`: no code runs on load)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read the weights ({type(e).__name__}: {e}); the file is truncated or "
            "corrupt — download or save it again"
        ) from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors (a state_dict)")
    return sd


def read_state_dict(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a model directory and, for each key, the file it came from."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in weight_files(directory):
        for key, value in read_weights(path).items():
            if key in tensors:
                raise CheckpointError(f"{path}: key {key!r} is also in {origin[key].name}")
            tensors[key], origin[key] = value, path
    return tensors, origin
