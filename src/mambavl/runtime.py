"""Loading a model to run it (chat, serve, bench): device and dtype choice, and full-size presets with
random weights for trying the machinery out without downloading anything."""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not one: use auto, cpu, cuda or cuda:N") from e
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but no CUDA GPU is available; use --device cpu")
    return chosen


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list as a tensor on `device`, without waiting for the device: on a GPU the copy goes from
    pinned memory, queued behind the work already there (a plain copy would wait for all of it)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs, fp32 on CPUs (where bf16 matmuls are slow)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is unknown: choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    model: str, device: str = "auto", dtype: str = "auto", random_weights: bool = False, log=print
):
    """A VLM ready to generate: `model` is a model directory, a run directory or a preset (its released
    weights; with `random_weights`, built at full size with random weights instead)."""
    import mambavl
    from mambavl.checkpoints.vlm import load
    from mambavl.vlm.tokenizer import load_tokenizer, numbered_tokenizer

    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if not random_weights:  # weights from files only: random ones are asked for by name (--random-weights)
        return load(model, dtype=dt, device=dev)
    if model not in mambavl.PRESETS:
        raise ValueError(
            f"--random-weights builds a preset; {model!r} is not one ({', '.join(mambavl.PRESETS)})"
        )
    vlm = mambavl.create(model, device=dev, dtype=dt)
    cfg = vlm.config
    try:
        vlm.tokenizer = load_tokenizer(cfg.tokenizer, cfg.eos_token)
    except Exception as e:  # offline: the words of a numbered vocabulary instead of the real ones
        log(
            f"{model}: tokenizer {cfg.tokenizer!r} unavailable ({type(e).__name__}); "
            "using a numbered vocabulary"
        )
        vlm.tokenizer = numbered_tokenizer(cfg.lm.vocab_size)
    return vlm
