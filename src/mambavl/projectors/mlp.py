"""Token-wise projectors from vision features to the LM's width, with prismatic's parameter names
(`projector.{i}`), so Cobra / ML-Mamba checkpoints load as they are."""

from __future__ import annotations

import torch
from torch import nn


class LinearProjector(nn.Module):
    """`linear`: projector.{weight,bias}."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.projector = nn.Linear(vision_dim, llm_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)


class MLPProjector(nn.Module):
    """`gelu-mlp`: Linear(v→l) GELU Linear(l→l); projector.{0,2}."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)


class FusedMLPProjector(nn.Module):
    """`fused-gelu-mlp` (Cobra): Linear(v→4v) GELU Linear(4v→l) GELU Linear(l→l); projector.{0,2,4}."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        hidden = 4 * vision_dim
        self.projector = nn.Sequential(
            nn.Linear(vision_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, llm_dim),
            nn.GELU(),
            nn.Linear(llm_dim, llm_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)


class RMSReLU2Projector(nn.Module):
    """`rmsnorm-relu2-mlp` (Nemotron VLMs): RMSNorm(v) Linear(v→h) ReLU² Linear(h→l), no biases;
    layer_norm / linear_1 / linear_2. The norm runs in fp32 (its weight too) and casts back."""

    def __init__(self, vision_dim: int, llm_dim: int, hidden: int = 4096, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.layer_norm = nn.Module()
        self.layer_norm.weight = nn.Parameter(torch.ones(vision_dim))
        self.linear_1 = nn.Linear(vision_dim, hidden, bias=False)
        self.linear_2 = nn.Linear(hidden, llm_dim, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        x = (self.layer_norm.weight.float() * x).to(features.dtype)
        return self.linear_2(torch.relu(self.linear_1(x)).square())
