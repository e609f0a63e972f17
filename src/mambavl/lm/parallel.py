"""Falcon-H1's mixer: Mamba-2 and attention side by side on the layer's normalised input, their outputs
added. The layer's decode state holds both (the conv window and SSM state, and the KV cache)."""

from __future__ import annotations

import torch
from torch import nn

from mambavl.lm.attention import Attention
from mambavl.lm.config import LMConfig
from mambavl.lm.mamba2 import Mamba2Mixer


class ParallelMixer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.mamba = Mamba2Mixer(cfg)
        self.attn = Attention(cfg)

    def new_state(self, batch: int, device=None) -> dict[str, torch.Tensor]:
        return {**self.mamba.new_state(batch, device), **self.attn.new_state(batch, device)}

    def forward(
        self,
        hidden: torch.Tensor,
        state: dict[str, torch.Tensor] | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.mamba(hidden, state, valid) + self.attn(hidden, state, valid)
