"""Which implementation an op runs: the PyTorch reference or a Triton kernel.

`backend=` on a call wins, then the environment variable `MAMBAVL_BACKEND` (torch | triton | auto);
`auto` picks Triton for CUDA tensors when Triton is installed and the reference otherwise. Triton on CPU
tensors runs only under its interpreter (`TRITON_INTERPRET=1`): slow, for testing kernels anywhere.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("torch", "triton", "auto")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_for(tensor: torch.Tensor, backend: str | None = None) -> str:
    choice = backend or os.environ.get("MAMBAVL_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r} (argument or MAMBAVL_BACKEND)")
    if choice == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise ImportError("the triton backend needs Triton: pip install triton")
        if not tensor.is_cuda and not interpreting():
            raise ValueError(
                "the triton backend runs CPU tensors only under the interpreter: set TRITON_INTERPRET=1 "
                "before starting Python, or use backend='torch'"
            )
    return choice


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record a call on these tensors (None entries are absent inputs)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
