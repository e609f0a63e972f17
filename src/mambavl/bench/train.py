"""`mambavl bench --train`: training-step throughput, memory and MFU of a preset at full size (random
weights), through the real entry point (`mambavl.train.train`: data pipeline, bf16 autocast, gradient
checkpointing on and/or off, AdamW), and in the same run its peers doing a training step of the same
LM config on token batches of the same shape:

- ``hf-mamba``: transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` (its own kernel choice),
  gradient checkpointing on, as it was first measured;
- ``mamba-ssm``: the reference implementation, ``mamba_ssm``'s ``MambaLMHeadModel`` (RMSNorm with the
  residual add fused, residual in fp32, its Triton / CUDA kernels), no gradient checkpointing, fused AdamW;
- ``gpt-neox`` is an inference peer only: named here, it is a note.

    mambavl bench --train --model cobra+3b --steps 5 --batch 8 --peers mamba-ssm --out bench-train

Synthetic data: shapes scenes at the tower's resolution, multi-turn conversations (byte tokenizer, so
nothing is downloaded), one image per row. Every side trains in bf16 autocast over fp32 master weights;
a peer's rows hold as many positions as ours do on average (image + text). A step's time is the median
over the steps after the first (warm-up: compilation, autotuning). No checkpoint and no model is written
(`save_final` off): at full size each would be tens of GB. A peer never stops the run: one that cannot
run (mamba_ssm not importable, out of memory) is an entry with its `error`, printed, and ours is still
reported, whether the peer was asked for by name or not. `train.json` holds every entry, the FLOPs each
step counts and the MFU formula (`MFU_FORMULA`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from mambavl.bench.timing import sync

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
TRAIN_PEERS = ("hf-mamba", "mamba-ssm")
INFERENCE_ONLY = ("gpt-neox",)
GIB = 2**30

MFU_FORMULA = (
    "MFU = (6 × LM parameters × LM positions per step + 2 × vision parameters × patches per image × "
    "images per step) / step seconds / the GPU's dense bf16 peak FLOP/s. LM positions are every position "
    "a step runs through the LM (image + text), forward + backward (6 per parameter, the LM head counted "
    "at every position); the frozen towers run forward only (2 per parameter per patch); the projector and "
    "recomputation under gradient checkpointing are not counted. The peers run the LM alone: their vision "
    "term is 0, and they count the same LM parameters as ours"
)


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def training_device(device: str, steps: int, batch: int, cpu_hint: str) -> torch.device:
    """The device a training benchmark runs on, refused with a clear error where it cannot run."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"the training benchmark needs a CUDA GPU ({cpu_hint})")
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be positive, got {steps} and {batch}")
    return dev


# ---- the work a step counts ------------------------------------------------------------------------------
def model_sizes(preset: str) -> dict:
    """The parameters the MFU counts: the LM's (a tied head once), the towers', and patches per image."""
    from mambavl.vlm.model import create

    vlm = create(preset, device="meta")
    return {
        "lm_params": vlm.lm.num_parameters(),
        "vision_params": sum(p.numel() for p in vlm.vision.parameters()),
        "patches_per_image": vlm.vision.num_patches,
        "image_size": vlm.vision.image_size,
        "lm": vlm.lm.config,
    }


def flops_per_step(sizes: dict, positions: float, images: float) -> dict:
    """`MFU_FORMULA`'s numerator, its two terms apart."""
    lm = 6 * sizes["lm_params"] * positions
    vision = 2 * sizes["vision_params"] * sizes["patches_per_image"] * images
    return {"lm": lm, "vision": vision, "total": lm + vision}


def with_mfu(entry: dict, sizes: dict, images: float, peak: float | None) -> dict:
    """The entry with its FLOPs per step and MFU (None without a known peak, e.g. on CPUs)."""
    if "step_s" not in entry:
        return entry
    flops = flops_per_step(sizes, entry["positions_per_step"], images)
    mfu = flops["total"] / entry["step_s"] / peak if peak else None
    return entry | {"flops_per_step": flops, "mfu": mfu}


@contextlib.contextmanager
def offline_preset(preset: str):
    """For the block only: `preset` registered under a new name with the byte tokenizer (nothing to
    download); yields that name."""
    from mambavl.presets import PRESETS

    config = replace(PRESETS[preset], name=f"{preset}-bytes", tokenizer="bytes")
    PRESETS[config.name] = config
    try:
        yield config.name
    finally:
        PRESETS.pop(config.name, None)


# ---- ours ------------------------------------------------------------------------------------------------
def ours(
    preset: str,
    data: str,
    run_dir: Path,
    steps: int,
    batch: int,
    checkpointing: bool,
    device: torch.device,
    num_workers: int = 4,
    profile: bool = False,
    compile_vision: bool | str = "auto",
    adamw_kernels: str = "torch",
) -> dict:
    """A `mambavl.train` finetune of `steps` steps on `data`; no checkpoint, no model written. With
    `profile`, one more step runs under the profiler (`run_dir/profile.txt`), outside the figures."""
    from mambavl.train import TrainConfig, train
    from mambavl.train.distributed import World
    from mambavl.train.metrics import read_metrics
    from mambavl.train.recipe import adamw_kernels as kernels_run

    with offline_preset(preset) as model:
        cfg = TrainConfig(
            model=model,
            run_dir=run_dir,
            stage="finetune",
            data=(data,),
            max_steps=steps + profile,
            profile_step=steps + 1 if profile else 0,
            global_batch_size=batch,
            per_device_batch_size=batch,
            precision="bf16",
            gradient_checkpointing=checkpointing,
            group_by_length=True,
            num_workers=num_workers,
            save_every=0,
            save_final=False,
            progress=False,
            compile_vision=compile_vision,
            adamw_kernels=adamw_kernels,
        )
        _release()
        _reset_peak(device)
        t0 = time.perf_counter()
        # on a GPU: torchrun's process (or a world of one); on the CPU: a world of one there
        train(cfg, world=World() if device.type == "cpu" else None)
    wall = time.perf_counter() - t0
    everything = read_metrics(run_dir / "metrics.jsonl")[:steps]  # the profiled step is not counted
    warm = everything[1:] or everything  # the first step warms up
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in warm),
        "step_s": statistics.median(r["step_s"] for r in warm),
        "positions_per_step": statistics.median(r["tokens"] for r in warm),
        "peak_memory_gib": _peak_gib(device),
        "losses": [r["loss"] for r in everything],
        "gradient_checkpointing": checkpointing,
        "compile_vision": cfg.compiles_vision(device.type, frozen=True),  # finetune: the tower is frozen
        "adamw_kernels": kernels_run(cfg, torch.empty(0, device=device)),
        "wall_s_incl_setup": wall,
    }


# ---- the peers -------------------------------------------------------------------------------------------
def _timed_steps(
    model, loss_of, ids: torch.Tensor, steps: int, device: torch.device, profile_path: Path | None = None
) -> dict:
    """`steps` training steps (bf16 autocast over the fp32 weights, fused AdamW), timed each between
    synchronisations; the figures of the steps after the first. `profile_path`: one more step runs under
    the profiler (its table written there), outside the figures."""
    from mambavl.train.profile import profiled

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    _reset_peak(device)
    times, losses = [], []
    for k in range(steps + (profile_path is not None)):
        profiler = profiled(profile_path, device) if k == steps else contextlib.nullcontext()
        with profiler:
            sync(device)
            t0 = time.perf_counter()
            with autocast:
                loss = loss_of(model, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
        if k < steps:
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
    step = statistics.median(times[1:] or times)
    positions = ids.numel()
    return {
        "tokens_per_s": positions / step,
        "step_s": step,
        "positions_per_step": positions,
        "peak_memory_gib": _peak_gib(device),
        "losses": losses,
        "params": sum(p.numel() for p in model.parameters()),
    }


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's prediction of the next token (fp32, as ours)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def hf_peer(lm, steps: int, batch: int, length: int, device: torch.device, profile_path=None) -> dict:
    """transformers' causal LM of the same LM config, gradient checkpointing on."""
    import transformers
    from transformers import AutoModelForCausalLM

    from mambavl.bench.peers import _hf_class, _tokens, hf_mamba_config

    config, notes = hf_mamba_config(lm)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # transformers 5.x renamed it; older releases know only the first name
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    ids = _tokens(lm.vocab_size, batch, length, device)
    try:
        out = _timed_steps(
            model, lambda m, x: m(input_ids=x, labels=x).loss, ids, steps, device, profile_path
        )
    finally:
        del model
        _release()
    return out | {
        "name": f"transformers {_hf_class(config)} {transformers.__version__}",
        "gradient_checkpointing": True,
        "mamba_ssm_kernels": _importable("mamba_ssm") and _importable("causal_conv1d"),
        "notes": notes,
    }


def mamba_ssm_peer(lm, steps: int, batch: int, length: int, device: torch.device, profile_path=None) -> dict:
    """mamba_ssm's MambaLMHeadModel of the same LM config (`peers.mamba_ssm_config`: rms_norm,
    fused_add_norm, residual in fp32, the mixer's own sizes), no gradient checkpointing. ImportError when
    mamba_ssm cannot be imported."""
    from mambavl.bench.peers import _import_mamba_ssm, _tokens, mamba_ssm_config

    module, real_extension = _import_mamba_ssm()
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    kwargs, notes = mamba_ssm_config(lm)
    model = MambaLMHeadModel(MambaConfig(**kwargs), device=device, dtype=torch.float32)
    ids = _tokens(lm.vocab_size, batch, length, device)
    try:
        loss_of = lambda m, x: _next_token_loss(m(x).logits, x)  # noqa: E731
        out = _timed_steps(model, loss_of, ids, steps, device, profile_path)
    finally:
        del model
        _release()
    kind = kwargs["ssm_cfg"]["layer"]
    notes = [
        *notes,
        f"{kind}, ssm_cfg {json.dumps(kwargs['ssm_cfg'], sort_keys=True)}; loss: cross-entropy of the "
        "next token at every position (the head at every position)",
        "selective_scan_cuda (CUDA extension): "
        + ("installed" if real_extension else "not installed (a placeholder let mamba_ssm import)")
        + "; causal_conv1d: "
        + ("installed" if _importable("causal_conv1d") else "not installed"),
    ]
    return out | {
        "name": f"mamba_ssm {getattr(module, '__version__', '?')} MambaLMHeadModel",
        "gradient_checkpointing": False,
        "config": {k: v for k, v in kwargs.items() if k != "ssm_cfg"} | {"ssm_cfg": kwargs["ssm_cfg"]},
        "notes": notes,
    }


PEER_RUNNERS = {"hf-mamba": ("transformers_mamba_checkpointing_on", hf_peer)}
PEER_RUNNERS["mamba-ssm"] = ("mamba_ssm_checkpointing_off", mamba_ssm_peer)


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _peer_entry(
    name: str, lm, steps: int, batch: int, length: int, device: torch.device, profile_path=None
) -> dict:
    """A peer's figures, or its `error`: a peer never stops the run."""
    from mambavl.bench.peers import _short

    _, runner = PEER_RUNNERS[name]
    try:
        return runner(lm, steps, batch, length, device, profile_path) | {"batch": batch}
    except ImportError as e:
        hint = "; pip install mamba-ssm causal-conv1d to measure it" if name == "mamba-ssm" else ""
        return {"error": f"{e}{hint}"}
    except torch.OutOfMemoryError as e:
        return {"error": f"out of memory: {e}"[:300]}
    except Exception as e:
        return {"error": _short(e)}
    finally:
        _release()


# ---- the run ---------------------------------------------------------------------------------------------
def run_train(
    preset: str,
    out: Path,
    steps: int = 5,
    batch: int = 8,
    checkpointing: str = "both",
    peers=("hf-mamba",),
    length: int | None = None,
    say=print,
    device: str = "cuda",
    num_workers: int = 4,
    work: Path | None = None,
    peak: float | None = None,
    profile: bool = False,
    compile_vision: bool | str = "auto",
    adamw_kernels: str = "torch",
) -> dict:
    """Ours with gradient checkpointing on and/or off, then the named peers; writes `out/train.json`.

    `length`: positions per row of the peers' batches (default: ours' average). `work`: where our runs'
    directories go (default: a temporary directory, removed). `peak`: the FLOP/s the MFU divides by
    (default: the GPU's dense bf16 peak, when the GPU is known). `profile`: one more step of ours runs under
    the profiler, its table in `out/profile_<key>.txt`, and so does one more step of each peer.
    `compile_vision`: whether ours runs its frozen vision tower through torch.compile (`TrainConfig`'s);
    `adamw_kernels`: ours' AdamW kernels (`TrainConfig`'s)."""
    from mambavl.data.shapes import write_shapes

    choices = {"on": (True,), "off": (False,), "both": (True, False), "none": ()}
    if checkpointing not in choices:
        raise ValueError(f"checkpointing must be one of {sorted(choices)}, got {checkpointing!r}")
    peers = tuple(peers)
    known = TRAIN_PEERS + INFERENCE_ONLY
    if unknown := [p for p in peers if p not in known]:
        raise ValueError(f"unknown peers {unknown}; the training peers are {', '.join(TRAIN_PEERS)}")
    dev = training_device(device, steps, batch, "--device cpu runs it as a functional check")
    peak = peak if peak is not None else (peak_flops() if dev.type == "cuda" else None)
    sizes = model_sizes(preset)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "preset": preset,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
        "torch": torch.__version__,
        "batch": batch,
        "steps": steps,
        "peak_flops": peak,
        "mfu_formula": MFU_FORMULA,
        "lm_params": sizes["lm_params"],
        "vision_params": sizes["vision_params"],
        "patches_per_image": sizes["patches_per_image"],
        "notes": [],
    }
    with contextlib.ExitStack() as stack:
        root = Path(work) if work is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        shapes = write_shapes(
            root / "data",
            train_scenes=batch * (steps + profile),
            heldout_scenes=1,
            image_size=sizes["image_size"],
        )
        data = f"{shapes['finetune']}:{shapes['images']}"
        for ckpt in choices[checkpointing]:
            key = f"mambavl_checkpointing_{'on' if ckpt else 'off'}"
            try:
                run = ours(
                    preset, data, root / key, steps, batch, ckpt, dev, num_workers, profile, compile_vision,
                    adamw_kernels,
                )  # fmt: skip
                if profile:
                    table = (root / key / "profile.txt").read_text()
                    (out / f"profile_{key}.txt").write_text(table)
                    say(table)
                result[key] = with_mfu(run | {"batch": batch}, sizes, images=batch, peak=peak)
            except torch.OutOfMemoryError as e:
                result[key] = {"error": f"out of memory: {e}"[:300]}
                _release()
            say(json.dumps({key: result[key]}, indent=1))
    done = next((v for k, v in result.items() if k.startswith("mambavl_") and "positions_per_step" in v), {})
    length = length or max(2, round(done.get("positions_per_step", 922 * batch) / batch))
    result["peer_positions_per_row"] = length
    for name in peers:
        if name in INFERENCE_ONLY:
            note = f"{name}: an inference peer only; no training step measured"
            result["notes"].append(note)
            say(note)
            continue
        key, _ = PEER_RUNNERS[name]
        table = out / f"profile_{key}.txt" if profile else None
        entry = _peer_entry(name, sizes["lm"], steps, batch, length, dev, table)
        if table is not None and table.exists():
            say(table.read_text())
        result[key] = with_mfu(entry, sizes, images=0, peak=peak)
        if "error" in entry:
            say(f"{name}: not measured: {entry['error']}")
        say(json.dumps({key: result[key]}, indent=1))
    (out / "train.json").write_text(json.dumps(result, indent=2))
    for line in summary(result):
        say(line)
    return result


def summary(result: dict) -> list[str]:
    """One line per entry: tokens/s, step, peak memory, MFU."""
    lines = []
    for key, entry in result.items():
        if not isinstance(entry, dict) or not ("step_s" in entry or "error" in entry):
            continue
        if "error" in entry:
            lines.append(f"{key}: {entry['error']}")
            continue
        memory = (
            f"{entry['peak_memory_gib']:.1f} GiB" if entry.get("peak_memory_gib") is not None else "- GiB"
        )
        mfu = f"{100 * entry['mfu']:.2f} % MFU" if entry.get("mfu") is not None else "MFU -"
        lines.append(
            f"{key}: {entry['tokens_per_s']:,.0f} tok/s, {entry['step_s']:.3f} s/step, {memory}, {mfu}"
        )
    return lines
