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
