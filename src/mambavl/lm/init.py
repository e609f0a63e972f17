"""Initialisation for training from scratch, after mamba_ssm (`mixer_seq_simple._init_weights` and the
mixers' own init): Δ's bias so that softplus(bias) is log-uniform in [dt_min, dt_max] (a slow, long
memory at the start — PyTorch's default would forget half the state per token), A = -[1..N] (Mamba-1)
or uniform in [1, 16] per head (Mamba-2), embeddings N(0, 0.02), linear biases zero, and every
projection that writes into the residual stream scaled down by √(residuals per layer × layers)."""

from __future__ import annotations

import math

import torch
from torch import nn

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4
A_INIT_RANGE = (1.0, 16.0)
STD = 0.02


def _dt_bias(size: int) -> torch.Tensor:
    dt = torch.exp(torch.rand(size) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
    dt = dt.clamp(min=DT_FLOOR)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


@torch.no_grad()
def init_weights(lm: nn.Module) -> None:
    from mambavl.lm.ffn import MoE
    from mambavl.lm.mamba1 import Mamba1Mixer
    from mambavl.lm.mamba2 import Mamba2Mixer

    if lm.embedding.weight.is_meta:
        return
    lm.embedding.weight.normal_(0.0, STD)
    for module in lm.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.zero_()
    for module in lm.modules():
        if isinstance(module, Mamba1Mixer):
            module.dt_proj.weight.uniform_(-(module.dt_rank**-0.5), module.dt_rank**-0.5)
            module.dt_proj.bias.copy_(_dt_bias(module.d_inner))
        elif isinstance(module, Mamba2Mixer):
            module.dt_bias.copy_(_dt_bias(module.nheads))
            module.A_log.copy_(torch.empty(module.nheads).uniform_(*A_INIT_RANGE).log())
        elif isinstance(module, MoE):
            module.gate_up_proj.normal_(0.0, STD)
            module.down_proj.normal_(0.0, STD)
    for layer in lm.layers:
        residuals = (layer.mixer is not None) + (layer.ffn is not None)
        scale = math.sqrt(residuals * len(lm.layers))
        out = getattr(layer.mixer, "out_proj", None) or getattr(layer.mixer, "o_proj", None)
        if out is not None:  # a feed-forward block alone has no mixer
            out.weight.div_(scale)
        if isinstance(layer.ffn, MoE):
            layer.ffn.down_proj.div_(scale)
        elif layer.ffn is not None:
            layer.ffn.down_proj.weight.div_(scale)
