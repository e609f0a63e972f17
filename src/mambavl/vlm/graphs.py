"""Decoding in state slots: a decoder owns the recurrent state of `capacity` sequences (slots); a step
feeds one token to each of slots 0..B-1 and advances their states in place. Sequences join by having
their prefilled state copied into a slot and leave by having the last live slot moved into theirs, so
the live ones always sit in the first rows (what the serving engine's continuous batching does).

- `SlotDecoder` steps eagerly, on any device, for models without attention layers.
- `GraphDecoder` captures one step per batch-size bucket as a CUDA graph and replays it, so a token
  costs one graph launch instead of a dozen kernel launches per layer from Python. The graph of bucket k
  reads and writes the first k rows; rows past the live ones are padding that compute on their own rows
  only (every op is row-wise), so they never touch a live sequence. Mixture-of-experts layers run their
  static-shape path on up to `lm.ffn.STATIC_TOKENS` rows; past that they cannot be captured
  (`graph_support` says why).
- `KVSlotDecoder` steps every slot of a model with attention layers in one batched call, eagerly: each
  attention layer keeps its KV cache in per-slot buffers of one length (grown by doubling when a row needs
  more), each row's positions from 0 on with a mask of the real ones, and a row's new token goes to its
  own next position.
- `KVGraphDecoder` is `KVSlotDecoder` with its steps captured as CUDA graphs, one per batch bucket and
  cache-length bucket (a power of two ≥ 64): the graph of length L attends over the first L positions
  of the buffers, so a step costs what the rows' caches need, not what the buffers hold. The decoder
  counts each slot's cached positions on the host, so choosing a graph reads nothing back from the GPU.
"""

from __future__ import annotations

import warnings

import torch

from mambavl.lm.ffn import STATIC_TOKENS
from mambavl.lm.model import LanguageModel
from mambavl.lm.state import LMState
from mambavl.runtime import to_device

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


def graph_support(lm: LanguageModel, rows: int = 1) -> str | None:
    """None when the model's decode step over `rows` slots can be captured (attention layers with
    `KVGraphDecoder`), else the reason it cannot."""
    if lm.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if not lm.config.static_shapes and rows > STATIC_TOKENS:
        return (
            f"mixture-of-experts layers route more than {STATIC_TOKENS} tokens a step with data-dependent "
            "shapes"
        )
    return None


def graph_decoder(lm: LanguageModel, capacity: int) -> GraphDecoder | KVGraphDecoder:
    """The CUDA-graph decoder for the model: `GraphDecoder` for pure recurrent models, `KVGraphDecoder`
    with attention layers. ValueError where graphs do not apply (`graph_support`)."""
    return GraphDecoder(lm, capacity) if lm.config.fixed_state else KVGraphDecoder(lm, capacity)


class GraphCaptureError(RuntimeError):
    """A step could not be captured as a CUDA graph; the state handed to `capture` is as it was."""


def capture(
    pool, step, state: LMState | None, before=None, what: str = "a step"
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`step` captured as a CUDA graph (its output tensor beside it), after two runs on a side stream that
    compile its kernels and warm the allocator (`before`, if given, runs ahead of each of them, outside the
    graph). The runs advance the rows of `state` they use: those rows are put back as they were, so live
    sequences survive a capture (None: `step` keeps no state). A failure raises GraphCaptureError naming
    `what` (running out of GPU memory stays torch.OutOfMemoryError)."""
    saved = state.clone() if state is not None else None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                if before is not None:
                    before()
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = step()
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        raise GraphCaptureError(f"capturing {what} failed: {e}") from e
    finally:  # also when the capture fails: the live rows come back as they were
        if state is not None:
            for mine, kept in zip(state.layers, saved.layers, strict=True):
                for name, t in mine.items():
                    t.copy_(kept[name])
    return graph, out


def bucket_for(batch: int) -> int:
    """The smallest bucket holding `batch` rows (batches past the largest bucket get their own size)."""
    return next((b for b in BUCKETS if b >= batch), batch)


class SlotDecoder:
    """Eager decoding in `capacity` static state slots (models without attention layers)."""

    def __init__(self, lm: LanguageModel, capacity: int):
        if not lm.config.fixed_state:
            raise ValueError(
                f"{lm.config.family} has attention layers, whose KV caches grow: use KVSlotDecoder"
            )
        self.lm = lm
        self.capacity = capacity
        self.state = lm.new_state(capacity)

    def _views(self, size: int) -> LMState:
        return self.state.map(lambda t: t[:size])

    def _step(self, tokens: torch.Tensor, state: LMState) -> torch.Tensor:
        embeds = self.lm.embedding(tokens[:, None])
        hidden = self.lm(inputs_embeds=embeds, state=state, return_hidden=True)
        return self.lm.lm_head(hidden[:, -1])

    def load(self, state: LMState, slots: list[int] | None = None) -> None:
        """Copies the rows of `state` into the given slots (default: rows 0..B-1)."""
        slots = list(range(state.batch_size)) if slots is None else slots
        index = to_device(slots, self.lm.device)  # queued behind the prefill that made `state`
        for mine, theirs in zip(self.state.layers, state.layers, strict=True):
            for name, t in mine.items():
                t.index_copy_(0, index, theirs[name].to(t.dtype))

    def move(self, source: int, target: int) -> None:
        """Copies slot `source` into slot `target` (a sequence leaving frees its slot this way)."""
        for layer in self.state.layers:
            for t in layer.values():
                t[target].copy_(t[source])

    def read(self, slots: list[int]) -> LMState:
        """A copy of the state of some slots (e.g. to keep a finished conversation)."""
        return self.state.select(slots)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds tokens [B] to slots 0..B-1 and returns their next-token logits [B, vocab]."""
        if tokens.shape[0] > self.capacity:
            raise ValueError(f"this decoder holds {self.capacity} rows, {tokens.shape[0]} were asked for")
        return self._step(tokens, self._views(tokens.shape[0]))


KV_KEYS = ("k", "v", "valid", "fill")  # an attention layer's part of a layer state in KVSlotDecoder


class KVSlotDecoder(SlotDecoder):
    """Eager decoding in `capacity` slots for models with attention layers (see the module docstring).
    States go in and come out in the models' own form (KV caches as long as their longest row)."""

    def __init__(self, lm: LanguageModel, capacity: int, length: int = 64):
        self.lm = lm
        self.capacity = capacity
        self.state = lm.new_state(capacity)
        for layer in self.state.layers:
            if "k" in layer:
                self._resize(layer, length)
                layer["fill"] = torch.zeros(capacity, dtype=torch.long, device=lm.device)

    @staticmethod
    def _resize(layer: dict, length: int) -> None:
        """An attention layer's buffers with room for `length` positions a slot, what they held kept."""
        k = layer["k"]
        keep = min(k.shape[2], length)
        for name in ("k", "v"):
            grown = k.new_zeros(k.shape[0], k.shape[1], length, k.shape[3])
            grown[:, :, :keep] = layer[name][:, :, :keep]
            layer[name] = grown
        valid = layer["valid"].new_zeros(k.shape[0], length)
        valid[:, :keep] = layer["valid"][:, :keep]
        layer["valid"] = valid

    def _room(self, length: int) -> None:
        """Grows every attention layer's buffers (doubling) until a slot holds `length` positions."""
        for layer in self.state.layers:
            if "k" in layer and layer["k"].shape[2] < length:
                self._resize(layer, max(length, 2 * layer["k"].shape[2]))

    def load(self, state: LMState, slots: list[int] | None = None) -> None:
        slots = list(range(state.batch_size)) if slots is None else slots
        index = to_device(slots, self.lm.device)  # queued behind the prefill that made `state`
        for mine, theirs in zip(self.state.layers, state.layers, strict=True):
            for name, t in mine.items():  # Mamba states (Falcon-H1's layers hold both kinds)
                if name not in KV_KEYS:
                    t.index_copy_(0, index, theirs[name].to(t.dtype))
            if "k" not in mine:
                continue
            cached = theirs["k"].shape[2]
            self._room(cached)
            for name in ("k", "v"):
                rows = torch.zeros_like(mine[name][index])
                rows[:, :, :cached] = theirs[name].to(rows.dtype)
                mine[name][index] = rows
            valid = torch.zeros_like(mine["valid"][index])
            valid[:, :cached] = theirs["valid"]
            mine["valid"][index] = valid
            mine["fill"][index] = cached

    def read(self, slots: list[int]) -> LMState:
        """A copy of the state of some slots, in the models' own form."""
        state = self.state.select(slots)
        for layer in state.layers:
            if "fill" in layer:
                longest = int(layer.pop("fill").max()) if len(slots) else 0
                layer["k"], layer["v"] = layer["k"][:, :, :longest], layer["v"][:, :, :longest]
                layer["valid"] = layer["valid"][:, :longest]
        return state

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        if batch > self.capacity:
            raise ValueError(f"this decoder holds {self.capacity} rows, {batch} were asked for")
        fills = [layer["fill"][:batch] for layer in self.state.layers if "fill" in layer]
        if fills:
            self._room(int(fills[0].max()) + 1)  # every attention layer of a row has cached as many
        return self._step(tokens, self._views(batch))


def slot_decoder(lm: LanguageModel, capacity: int, cuda_graphs: bool = True):
    """The fastest decoder the model allows: CUDA graphs, else eager slots (per-slot KV buffers for
    models with attention layers)."""
    if cuda_graphs and graph_support(lm, bucket_for(capacity)) is None:
        return graph_decoder(lm, capacity)
    if not lm.config.fixed_state:
        return KVSlotDecoder(lm, capacity)
    return SlotDecoder(lm, capacity)


class GraphDecoder(SlotDecoder):
    """Slots whose steps replay CUDA graphs (see the module docstring)."""

    def __init__(self, lm: LanguageModel, capacity: int):
        why = graph_support(lm, bucket_for(capacity))
        if why is not None:
            raise ValueError(f"cannot decode {lm.config.family} with CUDA graphs: {why}")
        super().__init__(lm, bucket_for(capacity))
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

    def prepare(self, batch: int) -> int:
        """Captures the graph of `batch`'s bucket if needed (the rows it runs on are saved and put back,
        so live sequences survive a capture). Returns the bucket size."""
        if batch > self.capacity:
            raise ValueError(f"this decoder holds {self.capacity} rows, {batch} were asked for")
        size = min(bucket_for(batch), self.capacity)
        if size in self.graphs:
            return size
        tokens, state = self.tokens[:size], self._views(size)
        self.graphs[size] = capture(self.pool, lambda: self._step(tokens, state), state)
        return size

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds tokens [B] to slots 0..B-1 and returns their next-token logits [B, vocab] (a view into
        the graph's output: consume it before the next step)."""
        batch = tokens.shape[0]
        size = self.prepare(batch)
        graph, logits = self.graphs[size]
        self.tokens[:batch].copy_(tokens)
        graph.replay()
        return logits[:batch]


def length_bucket(need: int) -> int:
    """The cache length a graph attends over for rows needing `need` positions: a power of two ≥ 64."""
    return max(64, 1 << (need - 1).bit_length())


class KVGraphDecoder(KVSlotDecoder):
    """`KVSlotDecoder` whose steps replay CUDA graphs (see the module docstring). `capture=False` runs the
    very steps the graphs would hold, eagerly: the same views of the same buffers, on any device."""

    def __init__(self, lm: LanguageModel, capacity: int, length: int = 256, capture: bool = True):
        rows = bucket_for(capacity)
        if capture and (why := graph_support(lm, rows)) is not None:
            raise ValueError(f"cannot decode {lm.config.family} with CUDA graphs: {why}")
        if not lm.config.static_shapes and rows > STATIC_TOKENS:
            raise ValueError(f"{lm.config.family}'s experts route more than {STATIC_TOKENS} rows dynamically")
        if lm.config.fixed_state:
            raise ValueError(f"{lm.config.family} has no attention layers: use GraphDecoder")
        super().__init__(lm, rows, length)
        self.capture = capture
        self.fills = [0] * self.capacity  # each slot's cached positions, as the device's `fill` holds them
        self.tokens = torch.zeros(self.capacity, dtype=torch.long, device=lm.device)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self._weights = GraphDecoder.key(lm)

    def valid_for(self, lm: LanguageModel, batch: int) -> bool:
        return lm is self.lm and GraphDecoder.key(lm) == self._weights and batch <= self.capacity

    @property
    def buffer_length(self) -> int:
        return next(layer["k"].shape[2] for layer in self.state.layers if "k" in layer)

    def reserve(self, length: int) -> None:
        """Buffers with room for `length` positions a slot now (growing them later drops every graph)."""
        self._room(length)

    def _room(self, length: int) -> None:
        before = self.buffer_length
        super()._room(length)
        if self.buffer_length != before:  # new buffers: graphs captured on the old ones are stale
            self.graphs.clear()  # (their memory pool goes with them: new graphs take a new one)
            self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def warm(self, sizes: list[int], longest: int) -> None:
        """Captures the graphs of these batch sizes for every cache length up to `longest` positions, on
        buffers already that long (so that none of them is dropped by a growth)."""
        longest = length_bucket(longest)
        self.reserve(longest)
        for size in sizes:
            length = 64
            while length <= longest:
                self.prepare(size, length)
                length *= 2

    def load(self, state: LMState, slots: list[int] | None = None) -> None:
        slots = list(range(state.batch_size)) if slots is None else slots
        super().load(state, slots)
        cached = next(layer["k"].shape[2] for layer in state.layers if "k" in layer)
        for slot in slots:
            self.fills[slot] = cached

    def move(self, source: int, target: int) -> None:
        super().move(source, target)
        self.fills[target] = self.fills[source]

    def _kv_views(self, size: int, length: int) -> LMState:
        """Rows 0..size-1 of every buffer, the attention ones cut to their first `length` positions."""
        layers = []
        for layer in self.state.layers:
            view = {}
            for name, t in layer.items():
                if name in ("k", "v"):
                    view[name] = t[:size, :, :length]
                elif name == "valid":
                    view[name] = t[:size, :length]
                else:
                    view[name] = t[:size]
            layers.append(view)
        return LMState(layers)

    def prepare(self, batch: int, length: int) -> tuple[int, int]:
        """Captures the graph of `batch`'s bucket attending over `length` cached positions if need be (the
        rows it runs on are saved and put back). Returns its key (bucket size, length)."""
        if batch > self.capacity:
            raise ValueError(f"this decoder holds {self.capacity} rows, {batch} were asked for")
        self._room(length)
        key = (min(bucket_for(batch), self.capacity), length)
        if key in self.graphs:
            return key
        if not self.capture:
            self.graphs[key] = (None, None)
            return key
        tokens, state = self.tokens[: key[0]], self._kv_views(key[0], length)
        try:  # while warming up, the rows' positions are kept inside the length (not in the graph)
            self.graphs[key] = capture(
                self.pool, lambda: self._step(tokens, state), state, lambda: self._reset_padding(state, 0)
            )
        except RuntimeError as e:  # a step that cannot be captured decodes eagerly, the same steps
            warnings.warn(
                f"{self.lm.config.family}: a decode step could not be captured as a CUDA graph "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); decoding eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            self.capture = False
            self.graphs = {k: (None, None) for k in self.graphs} | {key: (None, None)}
        return key

    @staticmethod
    def _reset_padding(state: LMState, live: int) -> None:
        """Rows past the live ones hold no sequence: their cache count starts again at 0, so that steps
        run on them as padding never write past the graph's length."""
        for layer in state.layers:
            if "fill" in layer:
                layer["fill"][live:].zero_()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds tokens [B] to slots 0..B-1 and returns their next-token logits [B, vocab] (with capture, a
        view into the graph's output: consume it before the next step)."""
        batch = tokens.shape[0]
        length = length_bucket(max(self.fills[:batch], default=0) + 1)
        size, length = self.prepare(batch, length)
        state = self._kv_views(size, length)
        self._reset_padding(state, batch)
        self.tokens[:batch].copy_(tokens)
        graph, logits = self.graphs[(size, length)]
        if graph is None:
            logits = self._step(self.tokens[:size], state)
        else:
            graph.replay()
        for row in range(batch):
            self.fills[row] += 1
        return logits[:batch]
