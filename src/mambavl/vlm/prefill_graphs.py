"""Small prefills from a state, replayed from CUDA graphs.

A prompt of a thousand positions costs a Mamba LM a few milliseconds of GPU work, but an eager forward
launches a dozen kernels a layer from Python, so in a small call the GPU waits on the host for most of it:
that is most of a single request's time to first token, of a chat turn that resumes from a cached state and
prefills a few new tokens, and of the serving engine's prefill steps that feed the short text after a
batch of images. `PrefillGraphs` captures the forward of `rows` right-padded rows of `length` positions from
state slots, one graph per (rows, length) bucket whose padded positions stay within `positions` (or one row
of the longest length). Padding is an exact identity step of the recurrence (`LanguageModel.forward`), so
the state after the graph is each row's state after its real positions, and the output is the hidden state
at each row's last real one; padding rows (no real positions) change nothing that is read back. A replay
copies the inputs and the states in, and the states out. Larger calls are GPU-bound and run eagerly.

Models with attention layers (KV caches that grow with the prompt) or data-dependent expert routing are
not captured (`prefill_graph_support` says why); they prefill eagerly. `capture=False` runs the very calls
the graphs would hold, eagerly, on any device: what the CPU tests check against the plain forward.
"""

from __future__ import annotations

import torch

from mambavl.lm.model import LanguageModel
from mambavl.lm.state import LMState
from mambavl.vlm.graphs import GraphDecoder, capture

PREFILL_BUCKETS = (16, 64, 256, 512, 768, 1024, 1536, 2048)  # lengths (768: an image of 729 positions)
ROW_BUCKETS = (1, 2, 4, 8, 16)
PREFILL_POSITIONS = 4096  # padded positions (rows × length) of the largest graph of several rows
STATE_BYTES = 2**30  # the graphs' state slots hold at most this much (Mamba-2 states are large: fewer rows)


def prefill_graph_support(lm: LanguageModel) -> str | None:
    """None when small prefills can be captured, else the reason they cannot."""
    if not lm.config.fixed_state:
        return "attention layers keep KV caches that grow with the prompt"
    if not lm.config.static_shapes:
        return "mixture-of-experts layers route tokens with data-dependent shapes"
    if lm.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return None


def _first_at_least(buckets: tuple[int, ...], n: int) -> int | None:
    return next((b for b in buckets if b >= n), None)


class PrefillGraphs:
    """Prefills of up to `max(rows)` rows from their states (see the module docstring)."""

    def __init__(
        self,
        lm: LanguageModel,
        buckets: tuple[int, ...] = PREFILL_BUCKETS,
        rows: tuple[int, ...] = ROW_BUCKETS,
        positions: int = PREFILL_POSITIONS,
        capture: bool = True,
    ):
        if capture and (why := prefill_graph_support(lm)) is not None:
            raise ValueError(f"cannot prefill {lm.config.family} from CUDA graphs: {why}")
        if not buckets or min(buckets) < 1 or not rows or min(rows) < 1:
            raise ValueError(
                f"prefill buckets must be positive lengths and row counts, got {buckets}, {rows}"
            )
        self.lm, self.captures = lm, capture
        row_bytes = lm.new_state(1).nbytes
        self.buckets = tuple(sorted(set(buckets)))
        self.rows = tuple(r for r in sorted(set(rows)) if r == 1 or r * row_bytes <= STATE_BYTES)
        self.positions = max(positions, self.longest)
        # plain tensors (not inference tensors): usable under no_grad and inference_mode alike
        with torch.inference_mode(False), torch.no_grad():
            self.state = lm.new_state(self.rows[-1])
            flat = self.positions * lm.config.d_model
            self.embeds = torch.zeros(flat, dtype=lm.dtype, device=lm.device)  # viewed [rows, length, D]
            self.length = torch.zeros(self.rows[-1], dtype=torch.long, device=lm.device)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._weights = GraphDecoder.key(lm)

    @property
    def longest(self) -> int:
        return self.buckets[-1]

    def valid_for(self, lm: LanguageModel) -> bool:
        """Whether the graphs still run this model's weights (moving or casting it makes new ones)."""
        return lm is self.lm and GraphDecoder.key(lm) == self._weights

    def bucket(self, rows: int, length: int) -> tuple[int, int] | None:
        """The (rows, length) graph that takes a call of `rows` rows of `length` positions, or None where
        none does (a call that large runs eagerly)."""
        r, t = _first_at_least(self.rows, rows), _first_at_least(self.buckets, length)
        if rows < 1 or length < 1 or r is None or t is None or (r > 1 and r * t > self.positions):
            return None
        return r, t

    def shapes(self) -> list[tuple[int, int]]:
        """Every (rows, length) bucket there is a graph for."""
        return [(r, t) for r in self.rows for t in self.buckets if self.bucket(r, t) == (r, t)]

    def _embeds(self, rows: int, length: int) -> torch.Tensor:
        return self.embeds[: rows * length * self.lm.config.d_model].view(rows, length, -1)

    def _run(self, rows: int, length: int) -> torch.Tensor:
        """The captured call: the first `rows` slots fed `length` positions of the buffers; the hidden state
        [rows, D] at each row's last real position."""
        lengths = self.length[:rows]
        mask = torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]
        state = self.state.map(lambda t: t[:rows])
        hidden = self.lm(inputs_embeds=self._embeds(rows, length), state=state, mask=mask, return_hidden=True)
        last = (lengths - 1).clamp(0, length - 1)[:, None, None].expand(-1, 1, hidden.shape[-1])
        return hidden.gather(1, last)[:, 0]

    def prepare(self, rows: int, length: int) -> tuple[int, int]:
        """Captures the graph of the call's bucket if needed; returns the bucket."""
        shape = self.bucket(rows, length)
        if shape is None:
            raise ValueError(f"no prefill graph takes {rows} rows of {length} positions")
        if self.captures and shape not in self.graphs:
            what = f"the prefill of {shape[0]} × {shape[1]} positions"
            self.graphs[shape] = capture(self.pool, lambda: self._run(*shape), self.state, what=what)
        return shape

    def warm(self) -> None:
        """Captures every bucket's graph (up to a second each), e.g. before serving."""
        for rows, length in self.shapes():
            self.prepare(rows, length)

    def __call__(
        self, embeds: torch.Tensor, state: LMState, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Feeds right-padded rows embeds [B, L, D] (`lengths` [B]: their real positions, default L each)
        into `state` (B sequences, advanced in place, as `LanguageModel.forward` does); returns the hidden
        state [B, D] at each row's last real position. ValueError if no graph takes B rows of L."""
        if embeds.dim() != 3 or state.batch_size != embeds.shape[0]:
            raise ValueError("prefill graphs take embeds [B, L, D] and a state of B sequences")
        batch, n = embeds.shape[:2]
        shape = self.bucket(batch, n)
        if shape is None:
            raise ValueError(f"no prefill graph takes {batch} rows of {n} positions")
        rows, size = shape
        self._embeds(rows, size)[:batch, :n].copy_(embeds)
        self.length[:rows].zero_()  # padding rows: no real position, an identity call
        if lengths is None:
            self.length[:batch].fill_(n)
        else:
            self.length[:batch].copy_(lengths)
        self.prepare(
            batch, n
        )  # a capture's warm-up runs read these inputs (and leave the buffers as they were)
        for mine, theirs in zip(self.state.layers, state.layers, strict=True):
            for name, t in mine.items():
                t[:batch].copy_(theirs[name])
        if self.captures:
            graph, out = self.graphs[shape]
            graph.replay()
        else:
            out = self._run(rows, size)
        for mine, theirs in zip(self.state.layers, state.layers, strict=True):
            for name, t in theirs.items():
                t.copy_(mine[name][:batch])
        state.seqlen += n
        return out[:batch].clone()
