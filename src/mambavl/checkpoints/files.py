"""Finding a model directory (local path, or a hub id resolved through the Hugging Face cache) and
reading its weights: safetensors or pytorch_model.bin, sharded or not, with each tensor's file kept
so that errors can name it. Every file is read only where it resolves inside its model directory: a
shard index entry or a symlink cannot make the loader read a file from elsewhere."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, the key and the fix."""


class PathError(ValueError):
    """A path taken from a file (a shard index entry, a dataset's image) that may not be opened: it is not
    a relative path, or it leads out of the directory it belongs to."""


def confined(root: Path, entry: str, trusted: Path | None = None) -> Path:
    """`root / entry`, where `entry` comes from a file: it must be a relative path without NUL bytes that,
    symlinks followed, stays under `trusted` (default: `root`). Raises PathError saying why not."""
    if not isinstance(entry, str) or not entry:
        raise PathError(f"{entry!r} is not a path: expected a non-empty relative path")
    if "\x00" in entry:
        raise PathError(f"{entry!r} contains a NUL byte")
    if Path(entry).is_absolute():
        raise PathError(f"{entry!r} is an absolute path; it must be relative to {root}")
    path = root / entry
    base = Path(os.path.abspath(trusted or root))
    try:
        base, real = base.resolve(), path.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise PathError(f"{entry!r} cannot be resolved ({e})") from e
    if not real.is_relative_to(base):
        lexical = Path(os.path.normpath(os.path.abspath(path)))
        how = "through a symlink" if lexical.is_relative_to(os.path.abspath(root)) else "with '..'"
        raise PathError(f"{entry!r} leads out of {base} {how} (to {real})")
    return path


def trusted_root(directory: Path) -> Path:
    """The folder a model directory's files may resolve into: the directory itself, or, inside a Hugging
    Face cache snapshot (`models--org--name/snapshots/<rev>/`, whose files are symlinks into the repo's
    `blobs/`), that repo's whole cache folder."""
    real = Path(directory).resolve()
    for folder in (real, *real.parents):
        if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
            return folder.parent.parent
    return real


def model_file(directory: Path, name: str, named_in: Path | None = None) -> Path:
    """`directory / name`, refused (CheckpointError naming the entry) unless it resolves inside the
    directory (or its cache repo folder). `named_in`: the file the name comes from, for the message."""
    try:
        return confined(Path(directory), name, trusted_root(directory))
    except PathError as e:
        where = f"{named_in}: the entry" if named_in else f"{directory}: the file"
        raise CheckpointError(
            f"{where} {e}. A model's files must be inside its directory; copy them in, or download the "
            "model again."
        ) from e


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.yaml", "*.jinja"]


def resolve_model_dir(path_or_hub_id: str | Path) -> Path:
    """A local directory as is; otherwise a hub id ("org/name"), from the local cache first. A hub id that
    is not cached while the hub cannot be reached raises HubUnavailable at once (see `hub_unreachable`)."""
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
    if why := hub_unreachable():
        raise HubUnavailable("the model's config and weights", name, why)
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise CheckpointError(
            f"{name}: not a local directory, not in the Hugging Face cache, and the download from "
            f"{hub_endpoint()} failed ({_one_line(e)}). Check the id (and for a gated model the token), or "
            "pass a local directory."
        ) from e


# ---- the hub: cache first, and a quick look before any download ------------------------------------------
HUB_CONNECT_TIMEOUT_S = 3.0  # the hub library's own retries take a minute to give up; a connect says enough
LOCAL_INSTEAD = "Pass a local model directory instead (one that holds these files)."


class HubUnavailable(CheckpointError):
    """Files that must come from the Hugging Face hub, are not in the local cache, and cannot be downloaded
    now: HF_HUB_OFFLINE is set, or the hub does not answer. One line: what is needed from where, why it
    cannot be fetched, and `fix`, how to do without it (callers with options of their own replace it,
    see `instead`)."""

    def __init__(self, needed: str, repo_id: str, why: str, fix: str = LOCAL_INSTEAD):
        self.needed, self.repo_id, self.why, self.fix = needed, repo_id, why, fix
        super().__init__(
            f"{needed} from {hub_endpoint()}/{repo_id}: not in the local Hugging Face cache, and {why}. {fix}"
        )

    def __reduce__(self):  # pickled by worker processes; the default would call __init__(message)
        return type(self), (self.needed, self.repo_id, self.why, self.fix)

    def instead(self, fix: str, needed_by: str | None = None) -> HubUnavailable:
        """The same error with another way out (a command names its own option), and what needs the
        files (`needed_by`, e.g. the option that named the model)."""
        needed = f"{needed_by} needs {self.needed}" if needed_by else self.needed
        return HubUnavailable(needed, self.repo_id, self.why, fix)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _offline_requested() -> bool:
    """HF_HUB_OFFLINE as the environment says now, read as the hub library reads it ("1", "on", ...)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES


def _address(url: str) -> tuple[str, int, str]:
    """Where a connection to `url` goes first, and what that is: its proxy if the environment names one
    (as the hub library's HTTP client does), else the host itself."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    parts = urlsplit(url)
    host = parts.hostname or ""
    proxy = getproxies().get(parts.scheme) or getproxies().get("all")
    if proxy and not proxy_bypass(host):
        proxied = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return proxied.hostname or "", proxied.port or (443 if proxied.scheme == "https" else 80), "the proxy"
    return host, parts.port or (443 if parts.scheme == "https" else 80), "the hub"


def hub_unreachable(timeout_s: float = HUB_CONNECT_TIMEOUT_S) -> str | None:
    """Why nothing can be downloaded from the hub now, or None when a TCP connection to it (or to the
    proxy in between) opens within `timeout_s`. Name lookup and connect both count against the timeout:
    a lookup can stall far longer than a connect when there is no network."""
    if _offline_requested():
        return "HF_HUB_OFFLINE=1 forbids downloading (unset it to download)"
    host, port, what = _address(hub_endpoint())
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    # a daemon thread: a lookup that hangs past the timeout is left behind instead of waited for
    worker = threading.Thread(target=connect, name="hub-reachability", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        return f"{what} ({host}:{port}) did not answer within {timeout_s:g} s (no network?)"
    if outcome[0] is not None:
        return f"{what} ({host}:{port}) cannot be reached ({_one_line(outcome[0])})"
    return None


def _one_line(error: BaseException) -> str:
    """An exception as `Type: first line`: the hub library's messages run over several lines."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def hub_files(repo_id: str, filenames: list[str], needed: str | None = None, **options) -> list[Path]:
    """Files of a hub repo, each from the local Hugging Face cache if it is there, else downloaded, once a
    quick look has found the hub reachable (HubUnavailable at once when it is not). `needed`: what the
    files are, for messages (default: the first one missing). `options`: `hf_hub_download`'s own (`token`,
    `cache_dir`)."""
    from huggingface_hub import hf_hub_download

    paths, looked = [], False
    for name in filenames:
        if (path := _cached(repo_id, name, options)) is not None:
            paths.append(path)
            continue
        if not looked:  # one look for all of them
            looked = True
            if why := hub_unreachable():
                raise HubUnavailable(needed or name, repo_id, why)
        try:
            paths.append(Path(hf_hub_download(repo_id, name, **options)))
        except Exception as e:
            raise CheckpointError(
                f"{repo_id}: downloading {name} from {hub_endpoint()}/{repo_id} failed ({_one_line(e)}). "
                "Check the id (and for a gated repo the token), or pass a local model directory."
            ) from e
    return paths


def _cached(repo_id: str, filename: str, options: dict) -> Path | None:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True, **options))
    except Exception:  # not cached (or a cache entry without its file)
        return None


def hub_file(repo_id: str, filename: str, needed: str | None = None, **options) -> Path:
    """One file of a hub repo, as `hub_files` fetches them."""
    return hub_files(repo_id, [filename], needed, **options)[0]


def read_json(path: Path) -> dict:
    """A JSON object from a file of a model directory (which it must resolve inside, see `model_file`)."""
    path = model_file(path.parent, path.name)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; a model directory needs a config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a 5,000-digit number
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object {{...}}, got {type(raw).__name__}")
    return raw


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a model directory, safetensors preferred, shards in index order."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        path = model_file(directory, name)
        if not name.endswith(".index.json"):
            return [path]
        index = read_json(path).get("weight_map")
        if not isinstance(index, dict) or not index:
            raise CheckpointError(f"{path}: no 'weight_map' in the shard index")
        if bad := [k for k, v in index.items() if not isinstance(v, str)]:
            raise CheckpointError(f"{path}: weight_map[{bad[0]!r}] is not a file name")
        shards = [model_file(directory, s, named_in=path) for s in dict.fromkeys(index.values())]
        if missing := [str(s.relative_to(directory)) for s in shards if not s.is_file()]:
            raise CheckpointError(f"{path} lists shard(s) that are missing: {missing}; download them again")
        return shards
    raise CheckpointError(f"{directory}: no weights found; expected one of {', '.join(WEIGHT_FILES)}")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors or torch file (`weights_only=True`: no code runs on load)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; the model directory is incomplete")
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
