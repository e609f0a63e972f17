"""`mambavl bench --train`: training-step throughput and memory of a preset at full size (random
weights), through the real entry point (`mambavl.train.train`: data pipeline, bf16 autocast, gradient
checkpointing, AdamW), and in the same run the peer: HF transformers' Mamba (`MambaForCausalLM`, same
LM config) doing the same forward + backward + AdamW step on token batches of the same shape.

    mambavl bench --train --model cobra+3b --steps 5 --batch 8 --out bench-train

Synthetic data: shapes scenes at the tower's resolution, multi-turn conversations (byte tokenizer, so
nothing is downloaded). Tokens/s counts every position (image + text) of a step, measured after the
first step (warm-up). MFU = model FLOPs (6 × LM parameters per position for forward + backward, plus
2 × vision parameters per patch for the frozen towers' forward; recomputation not counted) over the
GPU's dense bf16 peak.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def ours(preset: str, steps: int, batch: int, tmp: Path, checkpointing: bool) -> dict:
    from mambavl.data.shapes import write_shapes
    from mambavl.presets import PRESETS
    from mambavl.train import TrainConfig, train
    from mambavl.train.metrics import read_metrics

    config = replace(PRESETS[preset], name=f"{preset}-bytes", tokenizer="bytes")
    PRESETS[config.name] = config  # this process only: the preset with the offline tokenizer
    paths = write_shapes(tmp / "data", train_scenes=batch * steps, heldout_scenes=1, image_size=384)
    torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(
        model=config.name,
        run_dir=tmp / f"run-{checkpointing}",
        stage="finetune",
        data=(f"{paths['finetune']}:{paths['images']}",),
        max_steps=steps,
        global_batch_size=batch,
        per_device_batch_size=batch,
        precision="bf16",
        gradient_checkpointing=checkpointing,
        group_by_length=True,
        num_workers=4,
        save_every=10**9,
        keep_checkpoints=1,
        progress=False,
    )
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    records = read_metrics(cfg.run_dir / "metrics.jsonl")[1:]  # the first step warms up
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
        "step_s": statistics.median(r["step_s"] for r in records),
        "positions_per_step": statistics.median(r["tokens"] for r in records),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "losses": [r["loss"] for r in read_metrics(cfg.run_dir / "metrics.jsonl")],
        "wall_s_incl_setup": wall,
    }


def peer(preset: str, steps: int, batch: int, length: int, checkpointing: bool) -> dict:
    from transformers import MambaConfig, MambaForCausalLM

    from mambavl.presets import PRESETS

    lm = PRESETS[preset].lm
    if set(lm.mixers) != {"mamba1"}:
        return {"skipped": f"no transformers peer for {lm.family}"}
    hf = MambaConfig(
        vocab_size=lm.vocab_size,
        hidden_size=lm.d_model,
        state_size=lm.d_state,
        num_hidden_layers=lm.n_layer,
        expand=lm.d_inner // lm.d_model,
        conv_kernel=lm.d_conv,
        time_step_rank=lm.dt_rank,
        use_bias=False,
        use_conv_bias=True,
        tie_word_embeddings=True,
        residual_in_fp32=True,
    )
    model = MambaForCausalLM(hf).cuda()
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)
    ids = torch.randint(0, lm.vocab_size, (batch, length), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[1:] or times)
    out = {
        "tokens_per_s": batch * length / step,
        "step_s": step,
        "positions_per_step": batch * length,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "mamba_ssm_kernels": _importable("mamba_ssm") and _importable("causal_conv1d"),
    }
    del model, opt
    torch.cuda.empty_cache()
    return out


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def mfu(preset: str, result: dict, with_vision: bool) -> float | None:
    from mambavl.presets import create

    peak = peak_flops()
    if peak is None or "tokens_per_s" not in result:
        return None
    vlm = create(preset, device="meta")
    lm_params = vlm.lm.num_parameters()
    flops_per_step = 6 * lm_params * result["positions_per_step"]
    if with_vision:
        vision_params = sum(p.numel() for p in vlm.vision.parameters())
        images = result["batch"]
        flops_per_step += 2 * vision_params * vlm.vision.num_patches * images
    return flops_per_step / result["step_s"] / peak


def run_train(
    preset: str,
    out: Path,
    steps: int = 5,
    batch: int = 8,
    checkpointing: str = "both",
    with_peer: bool = True,
    length: int | None = None,
    say=print,
) -> dict:
    """Ours with gradient checkpointing on and/or off, then the peer; writes `out/train.json`."""
    if not torch.cuda.is_available():
        raise RuntimeError("the training benchmark needs a CUDA GPU")
    choices = {"on": (True,), "off": (False,), "both": (True, False), "none": ()}
    if checkpointing not in choices:
        raise ValueError(f"checkpointing must be one of {sorted(choices)}, got {checkpointing!r}")
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "preset": preset,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batch": batch,
        "steps": steps,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in choices[checkpointing]:
            key = f"mambavl_checkpointing_{'on' if ckpt else 'off'}"
            try:
                run = ours(preset, steps, batch, Path(tmp), ckpt)
                result[key] = run | {"batch": batch}
                result[key]["mfu"] = mfu(preset, result[key], with_vision=True)
            except torch.OutOfMemoryError as e:
                result[key] = {"error": f"out of memory: {e}"[:300]}
                torch.cuda.empty_cache()
            say(json.dumps({key: result[key]}, indent=1))
    if with_peer:
        done = next(
            (v for k, v in result.items() if k.startswith("mambavl_") and "positions_per_step" in v), {}
        )
        length = length or int(done.get("positions_per_step", 922 * batch) // batch)
        key = "transformers_mamba_checkpointing_on"
        try:
            result[key] = peer(preset, steps, batch, length, True) | {"batch": batch}
            result[key]["mfu"] = mfu(preset, result[key], with_vision=False)
        except torch.OutOfMemoryError as e:
            result[key] = {"error": f"out of memory: {e}"[:300]}
        say(json.dumps({key: result[key]}, indent=1))
    (out / "train.json").write_text(json.dumps(result, indent=2))
    return result
