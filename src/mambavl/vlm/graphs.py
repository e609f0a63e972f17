"""CUDA-graph decoding: one decode step (tokens -> logits, the recurrent state advanced in place) is
captured once per batch-size bucket and then replayed, so a token costs one graph launch instead of a
dozen kernel launches per layer from Python.

A `GraphDecoder` owns a static state of `capacity` rows; the graph of bucket k reads and writes its
first k rows. Sequences are loaded into rows (slots) by copying their prefilled state in; rows past the
live ones are padding: they compute on their own rows only (every op is row-wise), so they never touch a
live sequence. Models with attention layers (a KV cache that grows) or mixture-of-experts layers
(data-dependent routing) decode eagerly instead: `graph_support` says why.
"""

from __future__ import annotations

import torch

from mambavl.lm.model import LanguageModel
from mambavl.lm.state import LMState

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


def graph_support(lm: LanguageModel) -> str | None:
    """None when the model's decode step can be captured, else the reason it cannot."""
    if lm.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if "attention" in lm.config.mixers:
        return "attention layers grow their KV cache every step"
    if "moe" in lm.config.ffns:
        return "mixture-of-experts layers route tokens with data-dependent shapes"
    return None


def bucket_for(batch: int) -> int:
    """The smallest bucket holding `batch` rows (batches past the largest bucket get their own size)."""
    return next((b for b in BUCKETS if b >= batch), batch)


class GraphDecoder:
    def __init__(self, lm: LanguageModel, capacity: int):
        why = graph_support(lm)
        if why is not None:
            raise ValueError(f"cannot decode {lm.config.family} with CUDA graphs: {why}")
        self.lm = lm
        self.capacity = bucket_for(capacity)
        self.state = lm.new_state(self.capacity)
        self.tokens = torch.zeros(self.capacity, dtype=torch.long, device=lm.device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._weights = self.key(lm)

    @staticmethod
    def key(lm: LanguageModel) -> tuple:
        """Identifies the weights a graph was captured on (moving or casting the model makes new ones)."""
        return (lm.device, lm.dtype, lm.embedding.weight.data_ptr())

    def valid_for(self, lm: LanguageModel, batch: int) -> bool:
        return lm is self.lm and self.key(lm) == self._weights and batch <= self.capacity

    def _step(self, tokens: torch.Tensor, state: LMState) -> torch.Tensor:
        embeds = self.lm.embedding(tokens[:, None])
        hidden = self.lm(inputs_embeds=embeds, state=state, return_hidden=True)
        return self.lm.lm_head(hidden[:, -1])

    def _views(self, size: int) -> LMState:
        return self.state.map(lambda t: t[:size])

    def prepare(self, batch: int) -> int:
        """Captures the graph of `batch`'s bucket if needed (it runs on, and so scrambles, the static
        state: load sequences afterwards). Returns the bucket size."""
        if batch > self.capacity:
            raise ValueError(f"this decoder holds {self.capacity} rows, {batch} were asked for")
        size = min(bucket_for(batch), self.capacity)
        if size in self.graphs:
            return size
        tokens, state = self.tokens[:size], self._views(size)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles the kernels and warms the allocator outside the graph
            for _ in range(2):
                self._step(tokens, state)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(tokens, state)
        self.graphs[size] = (graph, logits)
        return size

    def load(self, state: LMState, slots: list[int] | None = None) -> None:
        """Copies the rows of `state` into the given slots (default: rows 0..B-1)."""
        slots = list(range(state.batch_size)) if slots is None else slots
        index = torch.as_tensor(slots, device=self.lm.device)
        for mine, theirs in zip(self.state.layers, state.layers, strict=True):
            for name, t in mine.items():
                t.index_copy_(0, index, theirs[name].to(t.dtype))

    def read(self, slots: list[int]) -> LMState:
        """A copy of the state of some slots (e.g. to keep a finished conversation)."""
        return self.state.select(slots)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds tokens [B] to slots 0..B-1 and returns their next-token logits [B, vocab] (a view into
        the graph's output: consume it before the next step)."""
        batch = tokens.shape[0]
        size = self.prepare(batch)
        graph, logits = self.graphs[size]
        self.tokens[:batch].copy_(tokens)
        graph.replay()
        return logits[:batch]
