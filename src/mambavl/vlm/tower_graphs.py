"""The vision towers and projector of a few images, replayed from CUDA graphs.

One image through Cobra's two ViTs and the projector is about a teraflop: a millisecond or two of GPU work,
but an eager forward launches hundreds of kernels from Python, so a single request's image waits on the
host. `TowerGraphs` captures `encode` (pixels -> projected embeddings) for batches of each size in
`TOWER_ROWS` and each input shape, with static pixel buffers: a batch pads to its bucket with the pixels of
earlier calls (a ViT treats every image on its own, so padding images change nothing that is read back).
Larger batches are GPU-bound and run eagerly, and so do towers that read each image at its own size.
`capture=False` runs the very calls the graphs would hold, eagerly, on any device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mambavl.vlm.graphs import capture

TOWER_ROWS = (1, 2, 4, 8, 16)

Pixels = torch.Tensor | dict[str, torch.Tensor]


def _tensors(pixels: Pixels) -> dict[str, torch.Tensor]:
    return pixels if isinstance(pixels, dict) else {"": pixels}


def batch_of(pixels: Pixels) -> int:
    """The number of images in a batch of pixels (one tensor, or one per tower)."""
    return next(iter(_tensors(pixels).values())).shape[0]


class TowerGraphs:
    """`encode` over batches of up to `max(rows)` images (see the module docstring)."""

    def __init__(
        self,
        encode: Callable[[Pixels], torch.Tensor],
        key: tuple,
        rows: tuple[int, ...] = TOWER_ROWS,
        capture: bool = True,
    ):
        if not rows or min(rows) < 1:
            raise ValueError(f"tower graph batch sizes must be positive, got {rows}")
        self.encode, self.key, self.rows, self.captures = encode, key, tuple(sorted(set(rows))), capture
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        # (bucket, input shapes and dtypes) -> (graph or None, its static inputs, its output)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph | None, Pixels, torch.Tensor | None]] = {}

    def bucket(self, batch: int) -> int | None:
        """The batch size of the graph that takes `batch` images, or None (larger batches run eagerly)."""
        return next((r for r in self.rows if r >= batch), None) if batch >= 1 else None

    def _signature(self, size: int, pixels: Pixels) -> tuple:
        return (
            size,
            *((k, tuple(t.shape[1:]), t.dtype, t.device) for k, t in sorted(_tensors(pixels).items())),
        )

    def _inputs(self, size: int, pixels: Pixels) -> Pixels:
        """Static pixel buffers of `size` images shaped like `pixels`' (plain tensors, not inference ones)."""
        with torch.inference_mode(False), torch.no_grad():
            made = {k: t.new_zeros(size, *t.shape[1:]) for k, t in _tensors(pixels).items()}
        return made if isinstance(pixels, dict) else made[""]

    def __call__(self, pixels: Pixels) -> torch.Tensor:
        """`encode(pixels)` for a batch the graphs take (ValueError otherwise)."""
        batch = batch_of(pixels)
        size = self.bucket(batch)
        if size is None:
            raise ValueError(f"no tower graph takes {batch} images (at most {self.rows[-1]})")
        signature = self._signature(size, pixels)
        graph, inputs, out = self.graphs.get(signature) or (None, self._inputs(size, pixels), None)
        for k, t in _tensors(pixels).items():
            _tensors(inputs)[k][:batch].copy_(t)
        if not self.captures:
            self.graphs[signature] = (None, inputs, None)
            return self.encode(inputs)[:batch]
        if graph is None:  # GraphCaptureError leaves nothing behind
            what = f"the towers for {size} images"
            graph, out = capture(self.pool, lambda: self.encode(inputs), None, what=what)
            self.graphs[signature] = (graph, inputs, out)
        graph.replay()
        return out[:batch].clone()
