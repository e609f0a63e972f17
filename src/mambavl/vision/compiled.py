"""A frozen vision tower run through torch.compile, with the eager forward as the fallback.

A frozen tower is the same inference graph every step, and eager PyTorch spends it on separate kernels for
every LayerNorm, GELU, bias and attention reshape; compiled, they fuse into the products around them. The
module itself is kept (its parameters, their names and its state dict are untouched): only its `forward`
is replaced on the instance. Compiling happens at the first call (and again for a new input shape); if it
fails there (a compiler missing on the machine, an op the compiler does not take), the tower says why once
and runs eagerly from then on, so that a run never stops on it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def compile_frozen(tower: nn.Module, warn: Callable[[str], None] = print) -> nn.Module:
    """Compile `tower`'s forward in place; returns the tower. Refuses a tower with trainable parameters."""
    if any(p.requires_grad for p in tower.parameters()):
        raise ValueError("compiling the vision tower needs it frozen; this run trains it")
    eager = tower.forward
    compiled = torch.compile(eager)
    state = {"compiled": True}

    def forward(*args, **kwargs):
        if state["compiled"]:
            try:
                return compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as e:  # compiling failed, not the model
                state["compiled"] = False
                warn(f"the vision tower runs eagerly: torch.compile failed ({type(e).__name__}: {e})"[:500])
        return eager(*args, **kwargs)

    tower.forward = forward
    return tower
