"""One sequence's prefill from a state, replayed from CUDA graphs.

A prompt of a thousand positions costs a Mamba LM a few milliseconds of GPU work, but an eager forward
launches a dozen kernels a layer from Python, so at batch 1 the GPU waits on the host for most of the
call: that is most of a single request's time to first token, and of a chat turn that resumes from a
cached state and prefills a few new tokens. `PrefillGraphs` captures the forward of one row of
`bucket` positions (for each bucket of `PREFILL_BUCKETS`) from a state slot, with the row right-padded to
the bucket: padding is an exact identity step of the recurrence (`LanguageModel.forward`), so the state
after the graph is the state after the row's real positions, and the output is the hidden state at its last
real one. A replay copies the inputs and the state in, and the state out.

Models with attention layers (KV caches that grow with the prompt) or data-dependent expert routing are
not captured (`prefill_graph_support` says why); they prefill eagerly. `capture=False` runs the very calls
the graphs would hold, eagerly, on any device: what the CPU tests check against the plain forward.
"""

from __future__ import annotations

import torch

from mambavl.lm.model import LanguageModel
from mambavl.lm.state import LMState
from mambavl.vlm.graphs import GraphDecoder, capture

PREFILL_BUCKETS = (16, 64, 256, 1024, 2048)


class GraphCaptureError(RuntimeError):
    """A prefill graph could not be captured; the state handed in is untouched."""


def prefill_graph_support(lm: LanguageModel) -> str | None:
    """None when one row's prefill can be captured, else the reason it cannot."""
    if not lm.config.fixed_state:
        return "attention layers keep KV caches that grow with the prompt"
    if not lm.config.static_shapes:
        return "mixture-of-experts layers route tokens with data-dependent shapes"
    if lm.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return None


class PrefillGraphs:
    """Prefill of one row of up to `longest` positions from a state (see the module docstring)."""

    def __init__(self, lm: LanguageModel, buckets: tuple[int, ...] = PREFILL_BUCKETS, capture: bool = True):
        if capture and (why := prefill_graph_support(lm)) is not None:
            raise ValueError(f"cannot prefill {lm.config.family} from CUDA graphs: {why}")
        if not buckets or min(buckets) < 1:
            raise ValueError(f"prefill buckets must be positive lengths, got {buckets}")
        self.lm, self.buckets, self.captures = lm, tuple(sorted(set(buckets))), capture
        # plain tensors (not inference tensors): usable under no_grad and inference_mode alike
        with torch.inference_mode(False), torch.no_grad():
            self.state = lm.new_state(1)
            self.embeds = torch.zeros(1, self.longest, lm.config.d_model, dtype=lm.dtype, device=lm.device)
            self.length = torch.zeros(1, dtype=torch.long, device=lm.device)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._weights = GraphDecoder.key(lm)

    @property
    def longest(self) -> int:
        return self.buckets[-1]

    def valid_for(self, lm: LanguageModel) -> bool:
        """Whether the graphs still run this model's weights (moving or casting it makes new ones)."""
        return lm is self.lm and GraphDecoder.key(lm) == self._weights

    def bucket(self, length: int) -> int:
        if not 1 <= length <= self.longest:
            raise ValueError(f"a prefill of {length} positions: these graphs take 1 to {self.longest}")
        return next(b for b in self.buckets if b >= length)

    def _run(self, size: int) -> torch.Tensor:
        """The captured call: `size` positions of the buffers from the slot's state; the hidden state [1, D]
        at the last real position."""
        positions = torch.arange(size, device=self.length.device)
        mask = positions[None, :] < self.length[:, None]
        hidden = self.lm(inputs_embeds=self.embeds[:, :size], state=self.state, mask=mask, return_hidden=True)
        last = (self.length - 1).clamp(0, size - 1)[:, None, None].expand(-1, 1, hidden.shape[-1])
        return hidden.gather(1, last)[:, 0]

    def prepare(self, length: int) -> int:
        """Captures the graph of `length`'s bucket if needed; returns the bucket."""
        size = self.bucket(length)
        if self.captures and size not in self.graphs:
            try:
                self.graphs[size] = capture(self.pool, lambda: self._run(size), self.state)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:
                raise GraphCaptureError(f"capturing the prefill of {size} positions failed: {e}") from e
        return size

    def warm(self) -> None:
        """Captures every bucket's graph (about a second each), e.g. before serving."""
        for size in self.buckets:
            self.prepare(size)

    def __call__(
        self, embeds: torch.Tensor, state: LMState, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Feeds one right-padded row embeds [1, L, D] (`lengths` [1]: its real positions, default L) into
        `state` (a batch of one, advanced in place, as `LanguageModel.forward` does); returns the hidden
        state [1, D] at the row's last real position."""
        if embeds.dim() != 3 or embeds.shape[0] != 1 or state.batch_size != 1:
            raise ValueError("prefill graphs take one row: embeds [1, L, D] and a state of one sequence")
        n = embeds.shape[1]
        size = self.bucket(n)
        self.embeds[:, :n].copy_(embeds)
        if lengths is None:
            self.length.fill_(n)
        else:
            self.length.copy_(lengths)
        self.prepare(n)  # a capture's warm-up runs read these inputs (and leave the buffers as they were)
        for mine, theirs in zip(self.state.layers, state.layers, strict=True):
            for name, t in mine.items():
                t.copy_(theirs[name])
        if self.captures:
            graph, out = self.graphs[size]
            graph.replay()
        else:
            out = self._run(size)
        for mine, theirs in zip(self.state.layers, state.layers, strict=True):
            for name, t in theirs.items():
                t.copy_(mine[name])
        state.seqlen += n
        return out.clone()
