"""`mambavl bench --train --equality`: do the fast kernels train the same model as the PyTorch reference?

Two measurements on a small preset, each backend in turn (`MAMBAVL_BACKEND=torch`, then `triton`), from the
same seed, data and order:

- **one step's gradients in fp32**: one micro-batch forward and backward, every trainable parameter's
  gradient compared (the relative error ‖g_triton − g_torch‖ / ‖g_torch‖ per parameter, its worst over the
  parameters, and the worst elementwise difference relative to the tensor's largest entry);
- **a loss curve**: `steps` finetune steps through `mambavl.train` (bf16 autocast on a GPU, fp32 on a CPU),
  the two curves step by step (worst absolute and relative difference).

Writes `equality.json`. On a CPU the triton backend needs `TRITON_INTERPRET=1` (slow: use few steps).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

BACKENDS = ("torch", "triton")


@contextlib.contextmanager
def backend(name: str):
    """MAMBAVL_BACKEND set to `name` inside the block, restored after."""
    before = os.environ.get("MAMBAVL_BACKEND")
    os.environ["MAMBAVL_BACKEND"] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MAMBAVL_BACKEND", None)
        else:
            os.environ["MAMBAVL_BACKEND"] = before


def _config(model: str, data: str, run_dir: Path, steps: int, batch: int, precision: str):
    from mambavl.train import TrainConfig

    return TrainConfig(
        model=model,
        run_dir=run_dir,
        stage="finetune",
        data=(data,),
        max_steps=steps,
        global_batch_size=batch,
        per_device_batch_size=batch,
        learning_rate=1e-3,
        precision=precision,
        gradient_checkpointing=False,
        save_final=False,
        progress=False,
    ).resolved()


def gradients(cfg, device: torch.device, backends=BACKENDS) -> list[dict[str, torch.Tensor]]:
    """For each backend: parameter name -> its fp32 gradient after one forward and backward of the first
    `per_device_batch_size` samples, from the same initial weights."""
    from mambavl.data.collate import TrainDataset, collate
    from mambavl.data.mixture import load_training_data
    from mambavl.train.recipe import configure_trainable
    from mambavl.train.trainer import build_model, data_sources

    vlm = build_model(cfg.model, cfg.seed)
    data = load_training_data(data_sources(cfg), vlm, cfg.stage, cfg.seed, False, False)
    configure_trainable(vlm, cfg, checkpointing=False)
    vlm.to(device).train()
    dataset = TrainDataset(data.examples, vlm.image_transform, vlm.images_vary, vlm.config.max_pixels)
    batch = collate([dataset[i] for i in range(min(cfg.per_device_batch_size, len(dataset)))]).to(device)
    out = []
    for name in backends:
        vlm.zero_grad(set_to_none=True)
        with backend(name):
            vlm(**batch.model_inputs()).loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in vlm.named_parameters() if p.grad is not None}
        out.append(grads)
    return out


def compare_gradients(ref: dict[str, torch.Tensor], fast: dict[str, torch.Tensor]) -> dict:
    """The candidate's gradients (`fast`) against the reference's."""
    if ref.keys() != fast.keys():
        missing = sorted(set(ref) ^ set(fast))
        raise AssertionError(f"the backends give gradients to different parameters: {missing[:5]}")
    per = {}
    for name, want in ref.items():
        got = fast[name]
        scale = max(want.abs().max().item(), 1e-12)
        per[name] = {
            "relative_norm": ((got - want).norm() / want.norm().clamp_min(1e-12)).item(),
            "max_abs_over_max": ((got - want).abs().max() / scale).item(),
        }
    worst = max(per, key=lambda n: per[n]["relative_norm"])
    return {
        "parameters": len(per),
        "worst_parameter": worst,
        "worst_relative_norm": per[worst]["relative_norm"],
        "worst_max_abs_over_max": max(v["max_abs_over_max"] for v in per.values()),
        "per_parameter": per,
    }


def loss_curves(cfg, backends=BACKENDS) -> list[list[float]]:
    from mambavl.train import train
    from mambavl.train.metrics import read_metrics

    curves = []
    for i, name in enumerate(backends):
        run = replace(cfg, run_dir=cfg.run_dir / f"{i}-{name}")
        with backend(name):
            train(run)
        curves.append([r["loss"] for r in read_metrics(run.run_dir / "metrics.jsonl")])
    return curves


def compare_curves(ref: list[float], fast: list[float]) -> dict:
    """The candidate's loss curve (`fast`) against the reference's, step by step."""
    diffs = [abs(a - b) for a, b in zip(fast, ref, strict=True)]
    rel = [d / max(abs(b), 1e-12) for d, b in zip(diffs, ref, strict=True)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    return {
        "steps": len(ref),
        "worst_abs": diffs[worst],
        "worst_step": worst + 1,
        "worst_relative": max(rel),
        "final": {"reference": ref[-1], "candidate": fast[-1]},
    }


def run_equality(
    preset: str,
    out: Path,
    steps: int = 100,
    batch: int = 8,
    device: str = "cuda",
    say=print,
    backends: tuple[str, str] = BACKENDS,
) -> dict:
    """Both measurements, `backends[1]` against the reference `backends[0]`; writes out/equality.json and
    returns it."""
    from mambavl.bench.train import offline_preset, training_device
    from mambavl.data.shapes import write_shapes
    from mambavl.vlm.model import create

    dev = training_device(device, steps, batch, "--device cpu with TRITON_INTERPRET=1 runs it, slowly")
    size = create(preset, device="meta").vision.image_size
    result: dict = {
        "preset": preset,
        "device": str(dev),
        "batch": batch,
        "torch": torch.__version__,
        "reference": backends[0],
        "candidate": backends[1],
    }
    if dev.type == "cuda":
        result["device"] = torch.cuda.get_device_name(dev)
    with tempfile.TemporaryDirectory() as tmp, offline_preset(preset) as model:
        root = Path(tmp)
        shapes = write_shapes(root / "data", train_scenes=batch * steps, heldout_scenes=1, image_size=size)
        data = f"{shapes['finetune']}:{shapes['images']}"
        precision = "bf16" if dev.type == "cuda" else "fp32"
        cfg = _config(model, data, root / "runs", steps, batch, "fp32")
        result["gradients_fp32"] = compare_gradients(*gradients(cfg, dev, backends))
        cfg = _config(model, data, root / "runs", steps, batch, precision)
        curves = loss_curves(cfg, backends)
    result["loss_curve"] = compare_curves(*curves) | {
        "precision": precision,
        "curves": dict(zip(("reference", "candidate"), curves, strict=True)),
    }
    g, c = result["gradients_fp32"], result["loss_curve"]
    say(
        f"fp32 gradients of one step: worst ‖Δ‖/‖g‖ {g['worst_relative_norm']:.2e} ({g['worst_parameter']}), "
        f"worst |Δ|/max|g| {g['worst_max_abs_over_max']:.2e} over {g['parameters']} parameters"
    )
    say(
        f"{c['steps']}-step loss curve ({precision}): worst |Δ| {c['worst_abs']:.2e} at step "
        f"{c['worst_step']}, worst relative {c['worst_relative']:.2e}; final {backends[0]} "
        f"{c['final']['reference']:.4f}, {backends[1]} {c['final']['candidate']:.4f}"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "equality.json").write_text(json.dumps(result, indent=2))
    return result
