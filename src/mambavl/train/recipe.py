"""What each stage trains, and how the optimizer and schedule are built.

Stages as in Cobra (`cobra/models/vlms/cobra.py`, `freeze_backbones`): `align` trains the projector only,
`finetune` the projector and the LM, `full` everything; the vision tower stays frozen unless asked.
Optimizer and schedule as in Cobra's FSDP strategy (`cobra/training/strategies/fsdp.py`): AdamW with
PyTorch's default betas / eps, no weight decay on biases and 1-D parameters (norms, A, D, Δ biases),
linear warmup over `warmup_ratio` of the steps then cosine decay.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mambavl.train.config import LoraConfig, TrainConfig


def checkpointing_at_start(cfg: TrainConfig, device: torch.device, processes: int) -> bool:
    """Whether the LM recomputes its blocks in the backward from the first step: `cfg`'s choice, or for
    "auto" off on a single GPU (the trainer turns it on if a step runs out of memory) and on otherwise (on
    a CPU running out of memory is not an error it can catch; with several processes one cannot retry
    alone)."""
    if cfg.gradient_checkpointing != "auto":
        return bool(cfg.gradient_checkpointing)
    return not (device.type == "cuda" and processes == 1)


def configure_trainable(vlm: nn.Module, cfg: TrainConfig, checkpointing: bool) -> None:
    vlm.requires_grad_(False)
    vlm.projector.requires_grad_(True)
    if vlm.image_newline is not None:
        vlm.image_newline.requires_grad_(True)  # learned with the projector (LLaVA-NeXT)
    if cfg.stage in ("finetune", "full") or cfg.train_lm:
        if cfg.lora is not None:
            add_lora(vlm.lm, cfg.lora)
        else:
            vlm.lm.requires_grad_(True)
    if cfg.stage == "full" or cfg.train_vision:
        vlm.vision.requires_grad_(True)
    vlm.lm.gradient_checkpointing = checkpointing  # `checkpointing_at_start`


def add_lora(lm: nn.Module, lora: LoraConfig) -> None:
    """LoRA adapters (peft) on the LM's projections; only the adapters train."""
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs peft: pip install 'mambavl[train]'") from None
    names = {name.rsplit(".", 1)[-1] for name, m in lm.named_modules() if isinstance(m, nn.Linear)}
    targets = [t for t in lora.targets if t in names]
    if not targets:
        raise ValueError(f"none of the LoRA targets {list(lora.targets)} is a linear layer of this LM")
    config = peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets
    )
    peft.inject_adapter_in_model(config, lm)
    for name, p in lm.named_parameters():
        p.requires_grad_("lora_" in name)


def merge_lora(module: nn.Module) -> nn.Module:
    """Folds every LoRA adapter into its base layer and removes the adapter modules."""
    from peft.tuners.lora import LoraLayer

    for name, child in list(module.named_modules()):
        if isinstance(child, LoraLayer):
            child.merge()
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, child.get_base_layer())
    return module


def adamw_kernels(cfg: TrainConfig, param: torch.Tensor) -> str:
    """Which AdamW kernels a run with parameters like `param` takes: `cfg.adamw_kernels` on GPUs ("triton":
    TritonAdamW; "torch": torch's fused AdamW), torch's AdamW on CPUs."""
    return cfg.adamw_kernels if param.is_cuda else "torch"


def optimizer(vlm: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in vlm.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    first = next(vlm.parameters())
    if adamw_kernels(cfg, first) == "triton":  # every parameter in one launch (train.adamw)
        from mambavl.train.adamw import TritonAdamW

        return TritonAdamW(groups, lr=cfg.learning_rate)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=first.is_cuda or None)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warmup to the peak over `warmup` steps, then half a cosine down to `min_ratio` × peak
    (transformers' get_cosine_schedule_with_warmup when min_ratio = 0, as the seeds use)."""
    if step < warmup:
        return (step + 1) / warmup  # the first step already trains (HF's schedule would use lr 0)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LRScheduler:
    warmup = int(total * cfg.warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.min_lr_ratio))


def clip_and_step(opt: torch.optim.Optimizer, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clips the gradients of `params` to a total L2 norm of at most `max_norm` (as
    `torch.nn.utils.clip_grad_norm_`: × min(1, max_norm / (norm + 1e-6))) and takes the optimizer's step.
    Returns the norm before clipping, a tensor on the device (reading it waits for the device).

    With `TritonAdamW` or fused Adam/AdamW over plain tensors, the clip factor is handed to the step as its
    gradient divisor (`grad_scale`, the hook GradScaler unscales through) instead of a separate pass that
    multiplies every gradient: the step reads each gradient once instead of three times (and TritonAdamW
    takes the norm in one launch). Sharded (DTensor) gradients and other optimizers take clip_grad_norm_'s
    way. `params` must be the optimizer's parameters that have gradients."""
    from mambavl.train.adamw import TritonAdamW

    grads = [p.grad for p in params if p.grad is not None]
    fused = isinstance(opt, TritonAdamW) or (isinstance(opt, torch.optim.Adam) and opt.defaults.get("fused"))
    if not fused or not grads or any(hasattr(g, "full_tensor") for g in grads):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if isinstance(opt, TritonAdamW):
        norm = opt.grad_norm()
    else:
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    opt.grad_scale = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)
    try:
        opt.step()
    finally:
        if isinstance(opt, TritonAdamW):
            opt.grad_scale = None
        else:
            del opt.grad_scale  # a later step without clipping must not reuse it
    return norm
