"""The recurrent state of a language model: fixed size per sequence for Mamba layers (conv window and
SSM state), a growing KV cache for attention layers. Always fp32, whatever the weights' dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LMState:
    """Per-layer tensors, each with the batch as its first dimension.

    Mamba layers: {"conv": [B, C, d_conv], "ssm": [B, D, N] (Mamba-1) or [B, H, P, N] (Mamba-2)}.
    Attention layers: {"k": [B, KV, T, Dh], "v": [B, KV, T, Dh]}.
    `seqlen` counts the tokens consumed so far.
    """

    layers: list[dict[str, torch.Tensor]]
    seqlen: int = 0

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            for t in layer.values():
                return t.shape[0]
        return 0

    def map(self, fn) -> LMState:
        return LMState([{k: fn(t) for k, t in layer.items()} for layer in self.layers], self.seqlen)

    def clone(self) -> LMState:
        """An independent copy: a snapshot to resume from later (e.g. after a shared prefix). The copies go
        as one multi-tensor copy (a few kernel launches on a GPU, not one per tensor: a 64-layer state has
        128 tensors), contiguous whatever the source's strides."""
        sources = [t for layer in self.layers for t in layer.values()]
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return self.map(torch.clone)  # a state in an autograd graph: copies that keep their history
        copies = self.map(lambda t: torch.empty(t.shape, dtype=t.dtype, device=t.device))
        if sources:
            torch._foreach_copy_([t for layer in copies.layers for t in layer.values()], sources)
        return copies

    def select(self, index: torch.Tensor | list[int] | slice) -> LMState:
        """The state of some rows of the batch, as a new state."""
        if isinstance(index, slice):
            return self.map(lambda t: t[index].clone())
        idx = torch.as_tensor(index, dtype=torch.long)
        return self.map(lambda t: t.index_select(0, idx.to(t.device)))

    @classmethod
    def stack(cls, states: list[LMState]) -> LMState:
        """The rows of several states as one batch. Attention caches of different lengths are right-padded
        with positions marked not valid (zeros, never attended to), as a ragged prefill leaves them."""
        if not states:
            raise ValueError("LMState.stack needs at least one state")
        layers = []
        for i, first in enumerate(states[0].layers):
            layer = {}
            for name in first:
                parts = [s.layers[i][name] for s in states]
                width = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
                padded = []
                for p in parts:
                    pad = []
                    for d in reversed(range(1, p.dim())):
                        pad += [0, width[d - 1] - p.shape[d]]
                    padded.append(torch.nn.functional.pad(p, pad) if any(pad) else p)
                layer[name] = torch.cat(padded)
            layers.append(layer)
        return cls(layers, max(s.seqlen for s in states))

    def to(self, device) -> LMState:
        return self.map(lambda t: t.to(device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())
