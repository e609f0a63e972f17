"""nn.Linear whose product goes through `ops.linear`: the same parameters and state-dict keys, and a
kernel that streams the weight at memory speed when a decode step multiplies only a few rows."""

from __future__ import annotations

import torch
from torch import nn

from mambavl import ops


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


def plain(*layers: nn.Module) -> bool:
    """Whether these projections are our Linear as built, with no adapter around them (LoRA replaces the
    module) and no hook on them: then an op that reads their weights directly computes what calling them
    would."""
    return all(type(m) is Linear and not (m._forward_hooks or m._forward_pre_hooks) for m in layers)


class Head(Linear):
    """The output projection to the vocabulary, its logits divided by `scaling` (Granite's
    logits_scaling; 1: as they are). The same weight key as a Linear."""

    def __init__(self, in_features: int, out_features: int, scaling: float = 1.0):
        super().__init__(in_features, out_features, bias=False)
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits if self.scaling == 1.0 else logits / self.scaling
