"""The Mamba-1 selective scan (prefill and training), fused: Δ (bias, softplus), the discretisation, the scan,
the read-out through C, the skip D and the SiLU gate, in one pass over the inputs; and its backward.

Forward without a gradient (prefill), three kernels (`ScanTiles.prefill`):
- "tiles": one program per (sequence, block of BLOCK_D channels) walks the sequence in tiles
  of BLOCK_T steps; inside a tile the recurrence h_t = exp(Δ_t A)·h_{t-1} + Δ_t B_t u_t is a parallel
  associative scan over a [BLOCK_D, N, BLOCK_T] tile in registers, and the state at the tile's end carries
  to the next tile.
- "steps" (the default for anything smaller than a GPU-filling batch, see `prefill_kernel`): one program per
  (sequence, block of channels), each thread holding a few states
  n of one channel and running the recurrence one step after another (a multiply and a fused multiply-add per
  state and step), y_t = Σ_n C_t h_t a sum over the threads of a channel. Inputs come in blocks of eight
  steps, loaded one block ahead and split inside the threads into the eight steps (`_steps8`); Δ's
  softplus, Δ·u, the skip and the gate are computed on the block in its load layout, each value once.
  Compiled for sm_90 it issues 2.8–3.6 times fewer instructions a state and step than "tiles" (Triton 3.8
  and 3.6); on an H100 at Mamba-1 2.8B's sizes and 16,384 steps it takes 2.04 ms a layer, where the tiled
  kernel took 2.98 ms (BENCHMARKS.md, fourth and ninth passes). A single long sequence has too few
  programs to fill the GPU, so it may run in segments side by side (`steps_launch`): a first pass keeps each
  segment's end state from zeros and its Σ Δ, and the second runs every segment from the initial state carried
  through the segments before it (h ← exp(A·ΣΔ)·h + h_end), writing y.
- "lanes": one thread a channel (or two, `lanes_pair`), its N states N separate registers, so that the
  read-out y = Σ_n C h is a sum inside the thread and no values cross threads at all; B and C of a step are a
  row of N fp32 values that every thread of the program loads, four at a time (`lanes_inputs` lays them
  out), and each step's inputs are loaded one step ahead. Compiled for sm_90 its loop issues 153
  instructions a step for 16 states (9.6 a state and step; 21 MUFU), where "steps" issues 19 to 23 a
  state and step (Triton 3.8 and 3.6; BENCHMARKS.md, fifteenth pass). Segments as above (`lanes_launch`
  picks them to fill the multiprocessors). With a quarter of the threads, it gives a single sequence too
  few warps to hide its loads: the default ("auto") takes it only for a batch that fills the GPU by itself
  (BENCHMARKS.md, fourteenth pass). Compiled, its loop issues the next step's loads at the end of a turn,
  so that a load one step ahead is covered by a few dozen instructions: with `lanes_depth=2` the loads run
  two steps ahead (a turn of cover), with `lanes_unroll` steps a turn and `lanes_prefetch` a hint to L2
  further ahead (`benchmarks/scan_sass.py` counts the cover).
In "steps", "lanes" and both training kernels, Δ's softplus is log1p(e^x), as a short series where e^x is
small and with the approximate log2 on a GPU elsewhere (`_timestep_fast`): a dozen instructions a value where
the library's log takes about 35, and exact to fp32 rounding for very negative inputs, where ln(1 + e^x)
loses its digits.
Every kernel reads its inputs once and writes y once; the [B, L, D, N] states that the reference
materialises never leave the chip. In "tiles" and "steps", positions past the end are identity steps
(Δ = 0), so the carried state is exactly the state after the last real token; "lanes" stops at the end.

Forward for training: the backward's tile, [channels, CHUNK steps], with the state index n as the loop
inside a chunk (the scan runs over time alone and y = Σ_n C·h is a running sum); it stores the fp32 state
at the start of every chunk: that, and the inputs, is all the backward keeps (B·D·N·L/CHUNK floats;
nothing of size L·N per channel).

Backward: one program per (sequence, block of channels), which walks the chunks from last to first with
the adjoint carried between them. Its tiles are [channels, CHUNK steps], and inside a chunk it loops over
the state index n: for each n it recomputes the chunk's states h[n] from the saved start state with the
forward scan, and runs the adjoint
    G_t = C_t·dy_t + exp(Δ_{t+1} A)·G_{t+1}     (d loss / d h_t)
as a reverse scan over the chunk (by default, `ScanTiles.bwd_flip`, a forward associative scan over the
chunk's inputs taken in reverse order, whose result alone is turned back: Triton's reverse scan turns both
its inputs and both its outputs across the threads, four exchanges a state where this takes one, and they
were a third of the loop's instructions); the adjoint at the chunk's start, exp(Δ_s A)·G_s = d loss /
d h_{s-1}, carries to the previous chunk (and is d initial_state after the first). Scans run over time
alone, first along each thread's own run of steps and then across threads, and every sum over n is a
running sum in registers. Every gradient is then a local product: d(Δu) = Σ_n G·B, dB = Σ_d G·Δu,
dC = Σ_d h·dy, and through the decay, with exp(Δ_t A)·h_{t-1} = h_t − Δ_t B_t u_t (no shifted copy of the
states), s = G·(h_t − Δ_t B_t u_t) gives dΔ += Σ_n s·A and dA = Σ s·Δ. dB and dC are sums over the
channels of a group: each program reduces its channels in registers and adds one row per n and chunk into
one of a few fp32 copies with atomics (spread so that thousands of programs do not queue on the same
addresses); the host sums the copies. Per-channel sums (dA, dD, dΔ_bias) are stored per sequence (and
chunk); the host sums them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mambavl.ops.dispatch import needs_grad
from mambavl.ops.triton.layout import channels_last, empty_like_layout, empty_time_major, time_major

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# the prefill (no gradient) kernels `ScanTiles.prefill` chooses from
PREFILL_KERNELS = ("auto", "steps", "tiles", "lanes")


@dataclass(frozen=True)
class ScanTiles:
    """Launch parameters, from sweeps on an H100 at Mamba-1 2.8B shapes (`mambavl bench --kernels --train
    --sweep`, `benchmarks/scan_train.py`, `benchmarks/scan_prefill.py`; BENCHMARKS.md). The sixteenth pass
    set chunk 64 and `bwd_flip` (the training scan's forward + backward in 0.86× the time of chunk 128 with
    Triton's reverse scan) and `steps_depth=2` (one image and prompt, 1 × 1,529 steps, 0.69× the time).

    Inference (no gradient): with `prefill="auto"` (the default), "lanes" where a batch alone gives the GPU
    `lanes_auto_fill` warps a multiprocessor or more (one warp per 32 channels of a row), else "steps"
    (`prefill_kernel`; BENCHMARKS.md, fourteenth pass: on an H100 at cobra+3b's sizes "lanes" took 0.82× the
    step-by-step kernel's time at 16 rows, 0.68× at 32, about the same at 8, and twice it on one long
    sequence). With "lanes", one thread a channel (two with `lanes_pair`) on `lanes_warps` warps, in
    `lanes_segments` segments (0: `lanes_launch` picks them, with `lanes_fill` and `lanes_min_segment`).
    With `prefill="steps"`, the step-by-step kernel on
    `steps_block_d` channels a program (fewer where a group of B/C has fewer) and `steps_warps` warps; with
    "tiles", the tiled kernel on tiles of `block_t` steps × `block_d` channels, `num_warps` warps; the
    step-by-step kernel's segments are `steps_segments` (0: `steps_launch` picks them, with the `steps_long*`
    fields). `lanes_prefetch` and `steps_prefetch` (0: off) have each step ask the L2 cache for the inputs of
    the step that many steps later (on a GPU; a hint, which changes no value); `lanes_unroll` steps make one
    turn of the lanes kernel's loop, and its loads run `lanes_depth` (1 or 2) steps ahead; the step-by-step
    kernel's run `steps_depth` blocks of eight steps ahead in batches of up to `steps_depth_rows` rows
    (`steps_depth_for`; measured on one sequence, which leaves the GPU room for depth 2's registers, 167 a
    thread against 128; larger batches load one block ahead). Training:
    the forward keeps the state every `chunk` steps (B·D·N·L/chunk fp32 values a layer), and both it and the
    backward run one program per sequence and `train_block_d` channels (fewer where a group of B/C has
    fewer), on `train_warps` warps, with [train_block_d, chunk] tiles; the backward walks the chunks last to
    first, and its programs add their share of dB and dC into `bwd_slots` copies (summed afterwards), so
    that fewer of them add into the same addresses at once. Training reads u, Δ, z and dy time-contiguous
    (`time_major`: a copy where they come as the mixers' channel-contiguous views) with `train_time_major`,
    so that a thread's share of a tile is a run of consecutive steps, loaded as vectors and scanned serially
    before the exchange across threads; prefill does so with `prefill_time_major`. `train_maxnreg` caps the
    training kernels' registers a thread (None: the compiler's choice; a cap below it trades spills for more
    programs an SM).
    """

    block_t: int = 16
    block_d: int = 2
    num_warps: int = 1
    prefill: str = "auto"
    steps_block_d: int = 8
    steps_warps: int = 2
    steps_segments: int = 0
    steps_long: int = 8192
    steps_long_block_d: int = 16
    steps_long_segments: int = 8
    chunk: int = 64
    train_block_d: int = 4
    train_warps: int = 1
    bwd_slots: int = 1
    bwd_flip: bool = True
    train_time_major: bool = True
    prefill_time_major: bool = False
    train_maxnreg: int | None = None
    lanes_warps: int = 1
    lanes_pair: bool = False
    lanes_segments: int = 0
    lanes_fill: int = 8
    lanes_min_segment: int = 256
    lanes_auto_fill: int = 12
    lanes_prefetch: int = 0
    lanes_unroll: int = 1
    lanes_depth: int = 1
    steps_prefetch: int = 0
    steps_depth: int = 2
    steps_depth_rows: int = 1

    def __post_init__(self):
        if self.prefill not in PREFILL_KERNELS:
            choices = ", ".join(PREFILL_KERNELS)
            raise ValueError(f"ScanTiles.prefill must be one of {choices}, got {self.prefill!r}")
        lanes = (self.lanes_warps, self.lanes_fill, self.lanes_min_segment, self.lanes_auto_fill)
        if self.lanes_segments < 0 or min(lanes) < 1:
            raise ValueError(
                "ScanTiles: lanes_segments must be ≥ 0 (0: automatic), lanes_warps, lanes_fill, "
                "lanes_min_segment and lanes_auto_fill ≥ 1"
            )
        if self.lanes_prefetch < 0 or self.steps_prefetch < 0:
            raise ValueError("ScanTiles: lanes_prefetch and steps_prefetch are step counts ≥ 0 (0: off)")
        if self.lanes_depth not in (1, 2) or self.steps_depth not in (1, 2):
            raise ValueError(
                "ScanTiles: lanes_depth (steps a load runs ahead of its use) and steps_depth (blocks of "
                "eight steps) must be 1 or 2"
            )
        if self.steps_depth_rows < 1:
            raise ValueError("ScanTiles: steps_depth_rows is the most rows a batch has for steps_depth, ≥ 1")
        if self.lanes_unroll < 1:
            raise ValueError("ScanTiles: lanes_unroll is the steps a loop turn of the lanes kernel, ≥ 1")
        for name in ("block_t", "chunk", "block_d", "train_block_d", "steps_block_d", "steps_long_block_d"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"ScanTiles.{name} must be a power of two, got {value}")
        if min(self.bwd_slots, self.num_warps, self.train_warps, self.steps_warps) < 1:
            raise ValueError("ScanTiles: bwd_slots and every warp count must be at least 1")
        if self.steps_segments < 0 or self.steps_long_segments < 1 or self.steps_long < 8:
            raise ValueError(
                "ScanTiles: steps_segments must be ≥ 0 (0: automatic), steps_long_segments ≥ 1 and "
                "steps_long ≥ 8"
            )
        if self.train_maxnreg is not None and not 24 <= self.train_maxnreg <= 255:
            raise ValueError(f"ScanTiles.train_maxnreg must be None or 24..255, got {self.train_maxnreg}")

    def train_launch(self) -> dict:
        """The training kernels' launch options."""
        regs = {} if self.train_maxnreg is None else {"maxnreg": self.train_maxnreg}
        return dict(num_warps=self.train_warps, **regs)


DEFAULT_TILES = ScanTiles()


@triton.jit
def _combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2 (a1 h + x1) + x2. With reverse=True the scan visits later steps
    # first, so the same composition gives G_t = a_t G_{t+1} + x_t.
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _timestep(raw, SOFTPLUS: tl.constexpr):
    """Δ from its (biased) input: softplus, the identity above 20 as in the reference, or as it is."""
    if SOFTPLUS:
        raw = tl.where(raw <= 20.0, tl.log(1.0 + tl.exp(raw)), raw)
    return raw


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2 of fp32 x: on a GPU (FAST) the multi-function unit's approximation, one instruction where the
    library's takes a few dozen; its error is absolute (at most 2^-22.6 by the PTX manual), so it is
    relative only away from x = 1."""
    if FAST:
        return tl.inline_asm_elementwise(
            "lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    return tl.log2(x)


@triton.jit
def _timestep_fast(raw, SOFTPLUS: tl.constexpr, FAST: tl.constexpr):
    """`_timestep` for the scan kernels in a dozen instructions a value, not ~35: softplus(x) = log1p(e),
    e = e^x, as a degree-7 series for e < 1/16 (relative error below 1e-9, and exact where log(1 + e) in
    fp32 loses its digits: below x ≈ -10) and as log2(1 + e)·ln 2 above, where the approximate log2's
    absolute error is at most 2e-6 of the result; the identity above 20."""
    if SOFTPLUS:
        e = tl.exp2(tl.minimum(raw, 20.0) * LOG2E)  # (above 20 the input itself: no overflow to compute)
        s = tl.minimum(e, 0.0625)  # (the series only where it is taken: no overflow elsewhere)
        series = s * (1.0 + s * (-0.5 + s * (1.0 / 3 + s * (-0.25 + s * (0.2 + s * (-1.0 / 6 + s / 7))))))
        soft = tl.where(e < 0.0625, series, _log2(1.0 + e, FAST) * LN2)
        raw = tl.where(raw <= 20.0, soft, raw)
    return raw


@triton.jit
def _steps8(x, R0: tl.constexpr, R1: tl.constexpr):
    """The eight steps of an [R0, R1, 8] block, in time order, [R0, R1] each: split inside the threads
    (`tl.split` keeps its last axis in a thread's registers)."""
    lo, hi = tl.split(tl.reshape(x, [R0, R1, 4, 2]))  # steps 2a | 2a + 1
    a0, a1 = tl.split(tl.reshape(lo, [R0, R1, 2, 2]))  # steps 0, 4 | 2, 6
    b0, b1 = tl.split(tl.reshape(hi, [R0, R1, 2, 2]))  # steps 1, 5 | 3, 7
    t0, t4 = tl.split(a0)
    t2, t6 = tl.split(a1)
    t1, t5 = tl.split(b0)
    t3, t7 = tl.split(b1)
    return t0, t1, t2, t3, t4, t5, t6, t7


@triton.jit
def _join8(t0, t1, t2, t3, t4, t5, t6, t7, R0: tl.constexpr):
    """The [R0, 8] block of eight [R0] steps (`_steps8` inverted)."""
    lo = tl.reshape(tl.join(tl.join(t0, t4), tl.join(t2, t6)), [R0, 4])  # steps 0, 2, 4, 6
    hi = tl.reshape(tl.join(tl.join(t1, t5), tl.join(t3, t7)), [R0, 4])  # steps 1, 3, 5, 7
    return tl.reshape(tl.join(lo, hi), [R0, 8])


@triton.jit
def _pair(x):
    """Δ and Δu of one step from their [channels, 2] pair, each [channels, 1]."""
    dt, du = tl.split(x)
    return dt[:, None], du[:, None]


@triton.jit
def _step(h, a2, dt, du, bv, cv):
    """One step of the recurrence for [channels, N] states h: the next states and y = Σ_n C h [channels]."""
    h = tl.exp2(dt * a2) * h + du * bv
    return h, tl.sum(h * cv, 1)


@triton.jit
def _advance(h, a2, dt, du, bv):
    """One step of the recurrence for [channels, N] states h, without the read-out."""
    return tl.exp2(dt * a2) * h + du * bv


@triton.jit
def _steps_inputs(delta, u, B, C, tt, md, mn, length, strides, pad: tl.constexpr, SUMMARY: tl.constexpr):
    """A block of eight steps' inputs in the step-by-step kernel: Δ's input and u [BLOCK_D, 8], the rows of B
    and C [1, BLOCK_N, 8] (C where the pass reads it; else a stand-in that is never read)."""
    dl_t, u_t, b_t, c_t = strides
    m2 = md[:, None] & (tt < length)[None, :]
    mbc = mn[None, :, None] & (tt < length)[None, None, :]
    raw = tl.load(delta + tt[None, :] * dl_t, mask=m2, other=pad)
    uv = tl.load(u + tt[None, :] * u_t, mask=m2, other=0.0)
    bv = tl.load(B + tt[None, None, :] * b_t, mask=mbc, other=0.0)
    cv = bv
    if not SUMMARY:
        cv = tl.load(C + tt[None, None, :] * c_t, mask=mbc, other=0.0)
    return raw, uv, bv, cv


@triton.jit
def _selective_scan_steps_kernel(
    u, delta, A, B, C, D, z, bias, h0, y, h_last, seg_h, seg_dt,
    dim, length, N, channels_per_group, segment,
    u_b, u_d, u_t,
    dl_b, dl_d, dl_t,
    a_d, a_n,
    b_b, b_g, b_n, b_t,
    c_b, c_g, c_n, c_t,
    z_b, z_d, z_t,
    h0_b, h0_d, h0_n,
    y_b, y_d, y_t,
    hl_b, hl_d, hl_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SEGMENTS: tl.constexpr,
    SUMMARY: tl.constexpr, PREFETCH: tl.constexpr, FAST: tl.constexpr, DEPTH: tl.constexpr,
):  # fmt: skip
    # Segments (SEGMENTS > 1): program k of a channel block walks steps [k·segment, (k+1)·segment). With
    # SUMMARY it starts from zeros and keeps only its end state and its Σ Δ (seg_h [B, K, D, N], seg_dt
    # [B, K, D]); then each program starts from the initial state carried through the segments before its
    # own (h ← exp(A·ΣΔ)·h + h_end: the product of their decays and their inputs), and writes y.
    # Blocks of eight steps: Δ, u, z and y as [BLOCK_D, 8], B and C (fp32) as [1, BLOCK_N, 8], shared by the
    # program's channels (BLOCK_D divides channels_per_group: one group a program); the states [BLOCK_D,
    # BLOCK_N] stay in registers from the first step to the last.
    b = tl.program_id(0).to(tl.int64)  # batch offsets can pass 2^31 elements on long sequences
    first = tl.program_id(1) * BLOCK_D
    d = first + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    t = tl.arange(0, 8)
    md, mn = d < dim, n < N
    mdn = md[:, None] & mn[None, :]
    a2 = tl.load(A + d[:, None] * a_d + n[None, :] * a_n, mask=mdn, other=0.0).to(tl.float32) * LOG2E
    if HAS_D:
        skip = tl.load(D + d, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt_bias = tl.load(bias + d, mask=md, other=0.0).to(tl.float32)
    k = tl.program_id(2)
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_H0 and not SUMMARY:
        h = tl.load(h0 + b * h0_b + d[:, None] * h0_d + n[None, :] * h0_n, mask=mdn, other=0.0).to(tl.float32)
    if SEGMENTS > 1:
        seg_h += (b * SEGMENTS * dim + d[:, None]) * N + n[None, :]
        seg_dt += b * SEGMENTS * dim + d
        if not SUMMARY:
            for j in range(0, k):
                sdt = tl.load(seg_dt + j * dim, mask=md, other=0.0)
                h_end = tl.load(seg_h + j * dim * N, mask=mdn, other=0.0)
                h = tl.exp2(sdt[:, None] * a2) * h + h_end
    first_t = k * segment
    length = tl.minimum(length, first_t + segment)
    if SUMMARY:
        dt_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    u += b * u_b + d[:, None] * u_d
    delta += b * dl_b + d[:, None] * dl_d
    z += b * z_b + d[:, None] * z_d
    y += b * y_b + d[:, None] * y_d
    g = first // channels_per_group
    B += b * b_b + g * b_g + n[None, :, None] * b_n
    C += b * c_b + g * c_g + n[None, :, None] * c_n

    # each block's inputs are loaded DEPTH blocks ahead, so that their latency overlaps the blocks before
    # past the end, Δ's input is -inf under softplus, so Δ = 0 there with no select: identity steps
    pad: tl.constexpr = float("-inf") if SOFTPLUS else 0.0
    strides = (dl_t, u_t, b_t, c_t)
    nxt = _steps_inputs(delta, u, B, C, first_t + t, md, mn, length, strides, pad, SUMMARY)
    if DEPTH == 2:
        far = _steps_inputs(delta, u, B, C, first_t + 8 + t, md, mn, length, strides, pad, SUMMARY)
    for start in range(first_t, length, 8):
        tt = start + t
        m2 = md[:, None] & (tt < length)[None, :]
        raw, uv, bv, cv = nxt
        raw, uv = raw.to(tl.float32), uv.to(tl.float32)
        if DEPTH == 2:
            nxt = far
            far = _steps_inputs(delta, u, B, C, tt + 16, md, mn, length, strides, pad, SUMMARY)
        else:
            nxt = _steps_inputs(delta, u, B, C, tt + 8, md, mn, length, strides, pad, SUMMARY)
        if PREFETCH > 0:  # the lines of the block PREFETCH steps ahead into L2
            tp = tl.minimum(tt + PREFETCH, length - 1)
            row, rows = tp[None, :], tp[None, None, :]
            _prefetch_inputs(
                delta + row * dl_t,
                u + row * u_t,
                B + rows * b_t,
                C + rows * c_t,
                z + row * z_t,
                SUMMARY,
                HAS_Z,
            )
        if HAS_Z and not SUMMARY:
            zv = tl.load(z + tt[None, :] * z_t, mask=m2, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw += dt_bias[:, None]
        dt = _timestep_fast(raw, SOFTPLUS, FAST)
        if not SOFTPLUS:
            dt = tl.where(m2, dt, 0.0)  # past the end: identity steps
        du = dt * uv
        if SUMMARY:
            dt_sum += tl.sum(dt, 1)
        # Δ and Δu split into steps together: one exchange between threads for both (apart, Triton 3.6
        # moves the exchange before the softplus, which every thread of a channel then computes again)
        p0, p1, p2, p3, p4, p5, p6, p7 = _steps8(tl.permute(tl.join(dt, du), (0, 2, 1)), BLOCK_D, 2)
        d0, e0 = _pair(p0)
        d1, e1 = _pair(p1)
        d2, e2 = _pair(p2)
        d3, e3 = _pair(p3)
        d4, e4 = _pair(p4)
        d5, e5 = _pair(p5)
        d6, e6 = _pair(p6)
        d7, e7 = _pair(p7)
        b0, b1, b2, b3, b4, b5, b6, b7 = _steps8(bv, 1, BLOCK_N)
        if SUMMARY:  # the states alone: no read-out
            h = _advance(h, a2, d0, e0, b0)
            h = _advance(h, a2, d1, e1, b1)
            h = _advance(h, a2, d2, e2, b2)
            h = _advance(h, a2, d3, e3, b3)
            h = _advance(h, a2, d4, e4, b4)
            h = _advance(h, a2, d5, e5, b5)
            h = _advance(h, a2, d6, e6, b6)
            h = _advance(h, a2, d7, e7, b7)
        else:
            c0, c1, c2, c3, c4, c5, c6, c7 = _steps8(cv, 1, BLOCK_N)
            h, y0 = _step(h, a2, d0, e0, b0, c0)
            h, y1 = _step(h, a2, d1, e1, b1, c1)
            h, y2 = _step(h, a2, d2, e2, b2, c2)
            h, y3 = _step(h, a2, d3, e3, b3, c3)
            h, y4 = _step(h, a2, d4, e4, b4, c4)
            h, y5 = _step(h, a2, d5, e5, b5, c5)
            h, y6 = _step(h, a2, d6, e6, b6, c6)
            h, y7 = _step(h, a2, d7, e7, b7, c7)
            out = _join8(y0, y1, y2, y3, y4, y5, y6, y7, BLOCK_D)
            if HAS_D:
                out += uv * skip[:, None]
            if HAS_Z:
                out *= zv * tl.sigmoid(zv)
            tl.store(y + tt[None, :] * y_t, out.to(y.dtype.element_ty), mask=m2)
    if SUMMARY:
        tl.store(seg_h + k * dim * N, h, mask=mdn)
        tl.store(seg_dt + k * dim, dt_sum, mask=md)
    elif k == SEGMENTS - 1:
        tl.store(h_last + b * hl_b + d[:, None] * hl_d + n[None, :] * hl_n, h, mask=mdn)


@triton.jit
def _lanes_row(p, N: tl.constexpr, PAIR: tl.constexpr, VEC: tl.constexpr):
    """The N values p[0..N) as a tuple of tensors shaped like p: every thread keeps all of them (with
    PAIR, each as [BLOCK_D, 1], for a thread's two channels). With VEC (a GPU, N a multiple of 4, p 16-byte
    aligned) four at a time in one 16-byte load a thread, which Triton would otherwise issue one by one."""
    r = ()
    if VEC:
        for q in tl.static_range(N // 4):
            v = tl.inline_asm_elementwise(
                "ld.global.nc.v4.f32 {$0, $1, $2, $3}, [$4];",
                "=r,=r,=r,=r,l",
                [p + 4 * q],
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
                is_pure=True,
                pack=1,
            )
            for i in tl.static_range(4):
                if PAIR:
                    r = r + (v[i][:, None],)
                else:
                    r = r + (v[i],)
    else:
        for i in tl.static_range(N):
            if PAIR:
                r = r + (tl.load(p + i)[:, None],)
            else:
                r = r + (tl.load(p + i),)
    return r


@triton.jit
def _lanes_inputs(delta, u, B, C, z, t, strides, N: tl.constexpr, PAIR: tl.constexpr, VEC: tl.constexpr,
                  SUMMARY: tl.constexpr, HAS_Z: tl.constexpr):  # fmt: skip
    """Step t's inputs in the lanes kernel: Δ's input, u, the rows of B and C, z (where the pass reads them;
    else stand-ins that are never read)."""
    dl_t, u_t, b_t, c_t, z_t = strides
    raw = tl.load(delta + t * dl_t)
    uv = tl.load(u + t * u_t)
    bv = _lanes_row(B + t * b_t, N, PAIR, VEC)
    cv, zv = bv, uv
    if not SUMMARY:
        cv = _lanes_row(C + t * c_t, N, PAIR, VEC)
        if HAS_Z:
            zv = tl.load(z + t * z_t)
    return raw, uv, bv, cv, zv


@triton.jit
def _prefetch(p):
    """Asks the L2 cache for the lines `p` points to, ahead of the loads that read them (no result; a GPU
    only): a sequence's steps lie far apart in memory, and a load one step ahead cannot hide a trip to
    memory when a multiprocessor has few warps."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [p], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_inputs(delta, u, B, C, z, SUMMARY: tl.constexpr, HAS_Z: tl.constexpr):
    """`_prefetch` of a step's (block's) inputs: Δ's input, u and B, and C and z where the pass reads them."""
    _prefetch(delta)
    _prefetch(u)
    _prefetch(B)
    if not SUMMARY:
        _prefetch(C)
        if HAS_Z:
            _prefetch(z)


@triton.jit
def _selective_scan_lanes_kernel(
    u, delta, A, B, C, D, z, bias, h0, y, h_last, seg_h, seg_dt,
    dim, length, channels_per_group, segment, segments,
    u_b, u_d, u_t,
    dl_b, dl_d, dl_t,
    a_d, a_n,
    b_b, b_g, b_t,
    c_b, c_g, c_t,
    z_b, z_d, z_t,
    h0_b, h0_d, h0_n,
    y_b, y_d, y_t,
    hl_b, hl_d, hl_n,
    N: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr, PAIR: tl.constexpr,
    VEC: tl.constexpr, WIDE: tl.constexpr, SPLIT: tl.constexpr, SUMMARY: tl.constexpr,
    PREFETCH: tl.constexpr, UNROLL: tl.constexpr, DEPTH: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    # One thread a channel (BLOCK_D = 32 · warps), or with PAIR two (channels c and c + BLOCK_D, as
    # [BLOCK_D, 2] tensors whose pair stays in the thread; the program's channels then lie in one group of
    # B/C, which the two share): a channel's N states are N registers (a tuple), so y = Σ_n C h is a sum
    # inside the thread. B and C of a step are N values every thread loads (an n-contiguous row of one or
    # two cache lines, shared by the program). Each step's inputs are loaded one step ahead. Segments
    # (SPLIT: `segments` > 1) as in the step-by-step kernel: with SUMMARY each keeps its end state from
    # zeros and its Σ Δ; then each runs from the initial state carried through the segments before it.
    b = tl.program_id(0).to(tl.int64)  # batch offsets can pass 2^31 elements on long sequences
    first = tl.program_id(1) * BLOCK_D * (2 if PAIR else 1)
    d = first + tl.arange(0, BLOCK_D)
    if PAIR:
        d = tl.join(d, d + BLOCK_D)
    md = d < dim
    dd = tl.minimum(d, dim - 1)  # loads stay in bounds unmasked; only the stores are masked
    k = tl.program_id(2)
    a2 = ()
    h = ()
    for i in tl.static_range(N):
        a2 = a2 + (tl.load(A + dd * a_d + i * a_n).to(tl.float32) * LOG2E,)
        if HAS_H0 and not SUMMARY:
            h = h + (tl.load(h0 + b * h0_b + dd * h0_d + i * h0_n).to(tl.float32),)
        else:
            h = h + (tl.zeros(d.shape, dtype=tl.float32),)
    if HAS_D:
        skip = tl.load(D + dd).to(tl.float32)
    if HAS_BIAS:
        dt_bias = tl.load(bias + dd).to(tl.float32)
    if SPLIT:
        seg_h += (b * segments * dim + dd) * N
        seg_dt += b * segments * dim + dd
        if not SUMMARY:  # the initial state carried through the segments before this one
            for j in range(0, k):
                sdt = tl.load(seg_dt + j * dim)
                hc = ()
                for i in tl.static_range(N):
                    hc = hc + (tl.exp2(sdt * a2[i]) * h[i] + tl.load(seg_h + j * dim * N + i),)
                h = hc
    first_t = k * segment
    end = tl.minimum(length, first_t + segment)
    if SUMMARY:
        dt_sum = tl.zeros(d.shape, dtype=tl.float32)
    if PAIR:  # one row of B and C for the program's group
        rows = first // channels_per_group + 0 * tl.arange(0, BLOCK_D)
    else:
        rows = dd // channels_per_group
    u += b * u_b + dd * u_d
    delta += b * dl_b + dd * dl_d
    z += b * z_b + dd * z_d
    y += b * y_b + dd * y_d + first_t.to(tl.int64) * y_t  # then a step at a time
    B += b * b_b + rows * b_g
    C += b * c_b + rows * c_g
    last = tl.maximum(end - 1, 0)
    t1 = tl.minimum(first_t, last)
    if WIDE:  # offsets past 2^31 elements (a long sequence of many channels)
        t1 = t1.to(tl.int64)
    strides = (dl_t, u_t, b_t, c_t, z_t)
    nxt = _lanes_inputs(delta, u, B, C, z, t1, strides, N, PAIR, VEC, SUMMARY, HAS_Z)
    if DEPTH == 2:  # and the step after it
        t2 = tl.minimum(first_t + 1, last)
        if WIDE:
            t2 = t2.to(tl.int64)
        far = _lanes_inputs(delta, u, B, C, z, t2, strides, N, PAIR, VEC, SUMMARY, HAS_Z)
    # UNROLL > 1: that many steps a loop turn, so that one step's read-out overlaps the next one's updates
    for t in tl.range(first_t, end, loop_unroll_factor=UNROLL):
        raw, uv, bv, cv, zv = nxt
        raw, uv, zv = raw.to(tl.float32), uv.to(tl.float32), zv.to(tl.float32)
        # the inputs of step t + DEPTH load now: the compiler issues them at the end of the turn, so with
        # DEPTH 1 they would arrive just as the next turn needs them, and with 2 a whole turn earlier
        t1 = tl.minimum(t + DEPTH, last)
        if WIDE:
            t1 = t1.to(tl.int64)
        if PREFETCH > 0:  # the lines of step t + PREFETCH into L2
            tp = tl.minimum(t + PREFETCH, last)
            if WIDE:
                tp = tp.to(tl.int64)
            _prefetch_inputs(
                delta + tp * dl_t, u + tp * u_t, B + tp * b_t, C + tp * c_t, z + tp * z_t, SUMMARY, HAS_Z
            )
        if DEPTH == 2:
            nxt = far
            far = _lanes_inputs(delta, u, B, C, z, t1, strides, N, PAIR, VEC, SUMMARY, HAS_Z)
        else:
            nxt = _lanes_inputs(delta, u, B, C, z, t1, strides, N, PAIR, VEC, SUMMARY, HAS_Z)
        if HAS_BIAS:
            raw += dt_bias
        dt = _timestep_fast(raw, SOFTPLUS, FAST)
        du = dt * uv
        if SUMMARY:
            dt_sum += dt
            hn = ()
            for i in tl.static_range(N):
                hn = hn + (tl.exp2(dt * a2[i]) * h[i] + du * bv[i],)
            h = hn
        else:
            # the read-out in four partial sums: four short chains of multiply-adds, not one of N
            o0 = tl.zeros(d.shape, dtype=tl.float32)
            if HAS_D:
                o0 = uv * skip
            o1 = tl.zeros(d.shape, dtype=tl.float32)
            o2 = tl.zeros(d.shape, dtype=tl.float32)
            o3 = tl.zeros(d.shape, dtype=tl.float32)
            hn = ()
            for i in tl.static_range(N):
                hi = tl.exp2(dt * a2[i]) * h[i] + du * bv[i]
                if i % 4 == 0:
                    o0 += hi * cv[i]
                elif i % 4 == 1:
                    o1 += hi * cv[i]
                elif i % 4 == 2:
                    o2 += hi * cv[i]
                else:
                    o3 += hi * cv[i]
                hn = hn + (hi,)
            h = hn
            out = (o0 + o1) + (o2 + o3)
            if HAS_Z:
                out *= zv * tl.sigmoid(zv)
            tl.store(y, out.to(y.dtype.element_ty), mask=md)
            y += y_t
    if SUMMARY:
        for i in tl.static_range(N):
            tl.store(seg_h + k * dim * N + i, h[i], mask=md)
        tl.store(seg_dt + k * dim, dt_sum, mask=md)
    elif k == segments - 1:
        for i in tl.static_range(N):
            tl.store(h_last + b * hl_b + dd * hl_d + i * hl_n, h[i], mask=md)


@triton.jit
def _selective_scan_kernel(
    u, delta, A, B, C, D, z, bias, h0, y, h_last,
    dim, length, N, channels_per_group,
    u_b, u_d, u_t,
    dl_b, dl_d, dl_t,
    a_d, a_n,
    b_b, b_g, b_n, b_t,
    c_b, c_g, c_n, c_t,
    z_b, z_d, z_t,
    h0_b, h0_d, h0_n,
    y_b, y_d, y_t,
    hl_b, hl_d, hl_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # batch offsets can pass 2^31 elements on long sequences
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    t = tl.arange(0, BLOCK_T)
    md, mn = d < dim, n < N
    g = d // channels_per_group

    a = tl.load(A + d[:, None] * a_d + n[None, :] * a_n, mask=md[:, None] & mn[None, :], other=0.0)
    a = a.to(tl.float32)
    if HAS_D:
        skip = tl.load(D + d, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt_bias = tl.load(bias + d, mask=md, other=0.0).to(tl.float32)
    if HAS_H0:
        h = tl.load(
            h0 + b * h0_b + d[:, None] * h0_d + n[None, :] * h0_n,
            mask=md[:, None] & mn[None, :],
            other=0.0,
        ).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)

    for start in range(0, length, BLOCK_T):
        # Tiles are [D, N, T] with time last: the scan then runs within threads and warps (time is the
        # layout's fastest axis), never through shared memory across warps.
        tt = start + t
        m2 = md[:, None] & (tt < length)[None, :]  # [D, T]
        m3 = md[:, None, None] & mn[None, :, None] & (tt < length)[None, None, :]  # [D, N, T]
        uv = tl.load(u + b * u_b + d[:, None] * u_d + tt[None, :] * u_t, mask=m2, other=0.0).to(tl.float32)
        dt = tl.load(delta + b * dl_b + d[:, None] * dl_d + tt[None, :] * dl_t, mask=m2, other=0.0)
        dt = dt.to(tl.float32)
        if HAS_BIAS:
            dt += dt_bias[:, None]
        dt = _timestep(dt, SOFTPLUS)
        dt = tl.where(m2, dt, 0.0)  # past the end: identity steps
        bv = tl.load(
            B + b * b_b + g[:, None, None] * b_g + n[None, :, None] * b_n + tt[None, None, :] * b_t,
            mask=m3,
            other=0.0,
        ).to(tl.float32)
        cv = tl.load(
            C + b * c_b + g[:, None, None] * c_g + n[None, :, None] * c_n + tt[None, None, :] * c_t,
            mask=m3,
            other=0.0,
        ).to(tl.float32)
        decay = tl.exp(dt[:, None, :] * a[:, :, None])  # [D, N, T]
        drive = (dt * uv)[:, None, :] * bv
        decay, drive = tl.associative_scan((decay, drive), 2, _combine)
        hs = decay * h[:, :, None] + drive  # the state after every step of the tile
        out = tl.sum(hs * cv, axis=1)  # [D, T]
        h = tl.sum(tl.where((t == BLOCK_T - 1)[None, None, :], hs, 0.0), axis=2)
        if HAS_D:
            out += uv * skip[:, None]
        if HAS_Z:
            zv = tl.load(z + b * z_b + d[:, None] * z_d + tt[None, :] * z_t, mask=m2, other=0.0)
            zv = zv.to(tl.float32)
            out *= zv * tl.sigmoid(zv)
        tl.store(y + b * y_b + d[:, None] * y_d + tt[None, :] * y_t, out.to(y.dtype.element_ty), mask=m2)

    tl.store(
        h_last + b * hl_b + d[:, None] * hl_d + n[None, :] * hl_n,
        h,
        mask=md[:, None] & mn[None, :],
    )


@triton.jit
def _selective_scan_loop_kernel(
    u, delta, A, B, C, D, z, bias, h0, y, h_last, states,
    dim, length, N, channels_per_group,
    u_b, u_d, u_t,
    dl_b, dl_d, dl_t,
    a_d, a_n,
    b_b, b_g, b_n, b_t,
    c_b, c_g, c_n, c_t,
    z_b, z_d, z_t,
    h0_b, h0_d, h0_n,
    y_b, y_d, y_t,
    hl_b, hl_d, hl_n,
    st_b, st_c, st_d, st_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    # [BLOCK_D, CHUNK] tiles, the state index n as the loop inside a chunk (as in the backward); the state at
    # every chunk's start goes to `states` [B, n_chunks, D, N], from which the next chunk starts. Each step
    # of the n loop loads the next one's operands before it computes, so that their latency overlaps.
    b = tl.program_id(0).to(tl.int64)
    u += b * u_b
    delta += b * dl_b
    z += b * z_b
    y += b * y_b
    states += b * st_b
    first = tl.program_id(1) * BLOCK_D
    g = first // channels_per_group  # BLOCK_D divides channels_per_group
    B += b * b_b + g * b_g
    C += b * c_b + g * c_g
    d = first + tl.arange(0, BLOCK_D)
    t = tl.arange(0, CHUNK)
    md = d < dim
    if HAS_BIAS:
        dt_bias = tl.load(bias + d, mask=md, other=0.0).to(tl.float32)
    if HAS_D:
        skip = tl.load(D + d, mask=md, other=0.0).to(tl.float32)
    for n in range(0, N):  # the first chunk's start state
        if HAS_H0:
            start = tl.load(h0 + b * h0_b + d * h0_d + n * h0_n, mask=md, other=0.0).to(tl.float32)
        else:
            start = tl.zeros([BLOCK_D], dtype=tl.float32)
        tl.store(states + d * st_d + n * st_n, start, mask=md)
    tl.debug_barrier()
    n_chunks = tl.cdiv(length, CHUNK)
    for c in range(0, n_chunks):
        tt = c * CHUNK + t
        mt = tt < length
        m_dt = md[:, None] & mt[None, :]
        a_next = tl.load(A + d * a_d, mask=md, other=0.0).to(tl.float32)
        b_next = tl.load(B + tt * b_t, mask=mt, other=0.0).to(tl.float32)
        c_next = tl.load(C + tt * c_t, mask=mt, other=0.0).to(tl.float32)
        h_next = tl.load(states + c * st_c + d * st_d, mask=md, other=0.0)
        uv = tl.load(u + d[:, None] * u_d + tt[None, :] * u_t, mask=m_dt, other=0.0).to(tl.float32)
        raw = tl.load(delta + d[:, None] * dl_d + tt[None, :] * dl_t, mask=m_dt, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw += dt_bias[:, None]
        dt = tl.where(m_dt, _timestep_fast(raw, SOFTPLUS, FAST), 0.0)  # past the end: identity steps
        dtu = dt * uv
        out = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)
        for n in range(0, N):
            a, bn, cn, h = a_next, b_next, c_next, h_next
            more = n + 1 < N
            a_next = tl.load(A + d * a_d + (n + 1) * a_n, mask=md & more, other=0.0).to(tl.float32)
            b_next = tl.load(B + (n + 1) * b_n + tt * b_t, mask=mt & more, other=0.0).to(tl.float32)
            c_next = tl.load(C + (n + 1) * c_n + tt * c_t, mask=mt & more, other=0.0).to(tl.float32)
            h_next = tl.load(states + c * st_c + d * st_d + (n + 1) * st_n, mask=md & more, other=0.0)
            decay, hs = tl.associative_scan(
                (tl.exp2(dt * (a * LOG2E)[:, None]), dtu * bn[None, :]), 1, _combine
            )
            hs += decay * h[:, None]
            out += hs * cn[None, :]
            end = tl.sum(tl.where((t == CHUNK - 1)[None, :], hs, 0.0), 1)
            if c + 1 < n_chunks:
                tl.store(states + (c + 1) * st_c + d * st_d + n * st_n, end, mask=md)
            else:
                tl.store(h_last + b * hl_b + d * hl_d + n * hl_n, end, mask=md)
        if HAS_D:
            out += uv * skip[:, None]
        if HAS_Z:
            zv = tl.load(z + d[:, None] * z_d + tt[None, :] * z_t, mask=m_dt, other=0.0).to(tl.float32)
            out *= zv * tl.sigmoid(zv)
        tl.store(y + d[:, None] * y_d + tt[None, :] * y_t, out.to(y.dtype.element_ty), mask=m_dt)
        tl.debug_barrier()  # this chunk's end states are written before the next chunk reads them


@triton.jit
def _selective_scan_bwd_kernel(
    u, delta, A, BC, D, z, bias, states, dout,
    du, ddelta, dz, dA, dBC, dD, dbias, carry,
    dim, length, N, groups, channels_per_group, slots,
    u_b, u_d, u_t,
    dl_b, dl_d, dl_t,
    a_d, a_n,
    bc_b, bc_g, bc_n, bc_t,
    z_b, z_d, z_t,
    st_b, st_c, st_d, st_n,
    do_b, do_d, do_t,
    du_b, du_d, du_t,
    dd_b, dd_d, dd_t,
    dz_b, dz_d, dz_t,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, FLIP: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    # Tiles are [BLOCK_D, CHUNK]: channels × the steps of one chunk, time spread over the program's threads.
    # The state index n is the loop inside a chunk, so the scans run over time alone (within each thread's
    # run of steps first, then across threads) and every sum over n is a running sum in registers.
    # BC [B, G, 2N, L] holds B's rows then C's (one pointer tile serves both); dBC [slots, B, G, 2N, L] fp32
    # likewise, accumulated with atomics. Outputs: du, ddelta, dz [B, D, L], laid out as the host allocates
    # them (time-contiguous, or as their inputs);
    # dA [B, n_chunks, D, N], dD and dbias [B, D] fp32 (per sequence and chunk: the host sums them); carry
    # [2, B, D, N] fp32, d loss / d (state after the chunk) in and out, alternating between its two halves
    # from chunk to chunk (slot 0 holds the gradient of the last state on entry). Only what the n loop needs
    # stays in registers through it (Δ, Δ one step later, Δu, the gated dy and three running sums); u, Δ's
    # input and z are read again after it. Every pointer moves to this program's sequence once, in 64 bits
    # (a batch's offset can pass 2^31 elements on long sequences); offsets inside a sequence stay 32-bit.
    b = tl.program_id(0).to(tl.int64)
    batch = tl.num_programs(0)
    u += b * u_b
    delta += b * dl_b
    z += b * z_b
    states += b * st_b
    dout += b * do_b
    du += b * du_b
    ddelta += b * dd_b
    dz += b * dz_b
    n_chunks = tl.cdiv(length, CHUNK)
    dA += b * n_chunks * dim * N
    slot = (tl.program_id(1) % slots).to(tl.int64)  # programs of one group spread their adds over copies
    first = tl.program_id(1) * BLOCK_D  # BLOCK_D divides channels_per_group: one group a program
    g = first // channels_per_group
    BC += b * bc_b + g * bc_g
    dBC += ((slot * batch + b) * groups + g) * 2 * N * length
    d = first + tl.arange(0, BLOCK_D)
    t = tl.arange(0, CHUNK)
    md = d < dim
    if HAS_BIAS:
        dt_bias = tl.load(bias + d, mask=md, other=0.0).to(tl.float32)
    if HAS_D:
        skip = tl.load(D + d, mask=md, other=0.0).to(tl.float32)
    acc_skip = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_bias = tl.zeros([BLOCK_D], dtype=tl.float32)

    for back in range(0, n_chunks):
        c = n_chunks - 1 - back
        lam_in = carry + ((back % 2) * batch + b) * dim * N  # d loss / d (state after this chunk)
        lam_out = carry + (((back + 1) % 2) * batch + b) * dim * N  # ... before it
        tt = c * CHUNK + t
        mt = tt < length
        m_dt = md[:, None] & mt[None, :]
        # Δ at each step and one step later (the chunk's last step takes the carried adjoint instead)
        raw = tl.load(delta + d[:, None] * dl_d + tt[None, :] * dl_t, mask=m_dt, other=0.0).to(tl.float32)
        m_next = md[:, None] & ((t < CHUNK - 1) & (tt + 1 < length))[None, :]
        raw_next = tl.load(delta + d[:, None] * dl_d + (tt + 1)[None, :] * dl_t, mask=m_next, other=0.0)
        raw_next = raw_next.to(tl.float32)
        raw0 = tl.load(delta + d * dl_d + c * CHUNK * dl_t, mask=md, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw += dt_bias[:, None]
            raw_next += dt_bias[:, None]
            raw0 += dt_bias
        dt = tl.where(m_dt, _timestep_fast(raw, SOFTPLUS, FAST), 0.0)
        dt_next = tl.where(m_next, _timestep_fast(raw_next, SOFTPLUS, FAST), 0.0)
        dt0 = _timestep_fast(raw0, SOFTPLUS, FAST)
        uv = tl.load(u + d[:, None] * u_d + tt[None, :] * u_t, mask=m_dt, other=0.0).to(tl.float32)
        dtu = dt * uv
        dy = tl.load(dout + d[:, None] * do_d + tt[None, :] * do_t, mask=m_dt, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z + d[:, None] * z_d + tt[None, :] * z_t, mask=m_dt, other=0.0).to(tl.float32)
            dy *= zv * tl.sigmoid(zv)  # d loss / d (the output before the gate)
            y = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)  # that output, Σ_n C h, for dz
        adj_b = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)  # Σ_n G·B = d loss / d (Δu)
        adj_a = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)  # Σ_n s·A, the decay's share of dΔ
        bc = BC + tt * bc_t  # B's row n at + n·bc_n, C's at + (N + n)·bc_n
        dbc = dBC + tt
        if FLIP:
            # the adjoint's scan runs forwards over the chunk's steps in reverse order, on inputs reversed
            # once a chunk (Δ one step later, dy) or read in reverse (C's rows), and only its result is
            # turned back, once a state: a reverse scan turns its two inputs and two outputs across the
            # threads at every state
            dt_next_r = tl.flip(dt_next, 1)
            dy_r = tl.flip(dy, 1)
            tt_r = c * CHUNK + CHUNK - 1 - t
            bc_r = BC + tt_r * bc_t
            mt_r = tt_r < length
            c_next_r = tl.load(bc_r + N * bc_n, mask=mt_r, other=0.0).to(tl.float32)

        # each step of the n loop loads the next one's operands before it computes (latency overlap)
        a_next = tl.load(A + d * a_d, mask=md, other=0.0).to(tl.float32)
        b_next = tl.load(bc, mask=mt, other=0.0).to(tl.float32)
        c_next = tl.load(bc + N * bc_n, mask=mt, other=0.0).to(tl.float32)
        h0_next = tl.load(states + c * st_c + d * st_d, mask=md, other=0.0)
        lam_next = tl.load(lam_in + d * N, mask=md, other=0.0)
        for n in range(0, N):
            a_d1, h0, lam = a_next, h0_next, lam_next
            al = (a_d1 * LOG2E)[:, None]
            bn, cn = b_next[None, :], c_next[None, :]
            more = n + 1 < N
            a_next = tl.load(A + d * a_d + (n + 1) * a_n, mask=md & more, other=0.0).to(tl.float32)
            b_next = tl.load(bc + (n + 1) * bc_n, mask=mt & more, other=0.0).to(tl.float32)
            c_next = tl.load(bc + (N + n + 1) * bc_n, mask=mt & more, other=0.0).to(tl.float32)
            h0_next = tl.load(states + c * st_c + d * st_d + (n + 1) * st_n, mask=md & more, other=0.0)
            lam_next = tl.load(lam_in + d * N + n + 1, mask=md & more, other=0.0)
            # the chunk's states, as in the forward
            decay, hs = tl.associative_scan((tl.exp2(dt * al), dtu * bn), 1, _combine)
            hs += decay * h0[:, None]
            # the adjoint G, backwards through the chunk from the carried one
            if FLIP:
                cn_r = c_next_r[None, :]
                c_next_r = tl.load(bc_r + (N + n + 1) * bc_n, mask=mt_r & more, other=0.0).to(tl.float32)
                adj_decay, adj = tl.associative_scan((tl.exp2(dt_next_r * al), cn_r * dy_r), 1, _combine)
                adj = tl.flip(adj + adj_decay * lam[:, None], 1)
            else:
                adj_decay, adj = tl.associative_scan(
                    (tl.exp2(dt_next * al), cn * dy), 1, _combine, reverse=True
                )
                adj += adj_decay * lam[:, None]
            adj_start = tl.sum(tl.where((t == 0)[None, :], adj, 0.0), 1)
            tl.store(lam_out + d * N + n, tl.exp2(dt0 * a_d1 * LOG2E) * adj_start, mask=md)
            tl.atomic_add(dbc + n * length, tl.sum(adj * dtu, 0), mask=mt, sem="relaxed")
            tl.atomic_add(dbc + (N + n) * length, tl.sum(hs * dy, 0), mask=mt, sem="relaxed")
            if HAS_Z:
                y += hs * cn
            adj_b += adj * bn
            s = adj * (hs - dtu * bn)  # the adjoint × exp(Δa)·h_{t-1}
            adj_a += s * a_d1[:, None]
            tl.store(dA + (c * dim + d) * N + n, tl.sum(s * dt, 1), mask=md)

        # per step: du, dΔ (through the softplus), dz; u, Δ's input and z read again (cached)
        uv = tl.load(u + d[:, None] * u_d + tt[None, :] * u_t, mask=m_dt, other=0.0).to(tl.float32)
        ddt = uv * adj_b + adj_a
        if SOFTPLUS:
            raw = tl.load(delta + d[:, None] * dl_d + tt[None, :] * dl_t, mask=m_dt, other=0.0).to(tl.float32)
            if HAS_BIAS:
                raw += dt_bias[:, None]
            ddt = tl.where(raw <= 20.0, ddt * tl.sigmoid(raw), ddt)
        ddt = tl.where(m_dt, ddt, 0.0)
        duv = dt * adj_b
        if HAS_D:
            duv += skip[:, None] * dy
            acc_skip += tl.sum(dy * uv, 1)
        if HAS_BIAS:
            acc_bias += tl.sum(ddt, 1)
        if HAS_Z:
            if HAS_D:
                y += skip[:, None] * uv
            zv = tl.load(z + d[:, None] * z_d + tt[None, :] * z_t, mask=m_dt, other=0.0).to(tl.float32)
            gate = tl.sigmoid(zv)
            dyo = tl.load(dout + d[:, None] * do_d + tt[None, :] * do_t, mask=m_dt, other=0.0).to(tl.float32)
            dzv = dyo * y * gate * (1.0 + zv * (1.0 - gate))
            tl.store(dz + d[:, None] * dz_d + tt[None, :] * dz_t, dzv.to(dz.dtype.element_ty), mask=m_dt)
        tl.store(du + d[:, None] * du_d + tt[None, :] * du_t, duv.to(du.dtype.element_ty), mask=m_dt)
        tl.store(ddelta + d[:, None] * dd_d + tt[None, :] * dd_t, ddt.to(ddelta.dtype.element_ty), mask=m_dt)
        tl.debug_barrier()  # this chunk's carry is written before the previous chunk reads it

    if HAS_D:
        tl.store(dD + b * dim + d, acc_skip, mask=md)
    if HAS_BIAS:
        tl.store(dbias + b * dim + d, acc_bias, mask=md)


def _grouped(M: torch.Tensor) -> torch.Tensor:
    """B or C as [B, G, N, L]."""
    return M[:, None] if M.dim() == 3 else M


def kernel_inputs(B, C, D, delta_bias, dtype=None, rows=False):
    """B and C with time-contiguous rows (a copy of L·N values where they come as slices of x_proj's
    output: every channel's program reads them, in a few wide loads), in `dtype` when given (the prefill
    kernel takes them in fp32: its threads then use them as loaded), or with `rows` as the lanes kernel
    takes them (`lanes_inputs`); D and the Δ bias with stride 1 (the kernels index them so)."""

    def time_rows(M: torch.Tensor) -> torch.Tensor:
        if M.stride(-1) == 1 and dtype in (None, M.dtype):
            return M
        return M.new_empty(M.shape, dtype=dtype).copy_(M)

    B, C = (lanes_inputs(B), lanes_inputs(C)) if rows else (time_rows(B), time_rows(C))
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    return B, C, D, delta_bias


def steps_launch(
    tiles: ScanTiles, batch: int, dim: int, per_group: int, length: int, device
) -> tuple[int, int]:
    """(channels a program, segments of each sequence) for the step-by-step prefill. `steps_segments` > 0
    sets the segments (with `steps_block_d` channels); 0 (the default) picks them: on a GPU, a sequence of
    at least `steps_long` steps with too few programs to fill the device (batch · channels under 64 per
    multiprocessor) runs in `steps_long_segments` segments of `steps_long_block_d` channels a program, else
    whole, `steps_block_d` channels a program (BENCHMARKS.md, the prefill scan's sweep)."""
    if tiles.steps_segments:
        return _block_in_group(tiles.steps_block_d, per_group), tiles.steps_segments
    if device.type == "cuda" and length >= tiles.steps_long:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        if batch * dim < 64 * sms:
            return _block_in_group(tiles.steps_long_block_d, per_group), tiles.steps_long_segments
    return _block_in_group(tiles.steps_block_d, per_group), 1


def steps_depth_for(tiles: ScanTiles, batch: int) -> int:
    """Blocks of eight steps the step-by-step kernel loads ahead for a batch of `batch` rows."""
    return tiles.steps_depth if batch <= tiles.steps_depth_rows else 1


def prefill_kernel(tiles: ScanTiles, batch: int, dim: int, device) -> str:
    """The prefill kernel `tiles.prefill` names, "auto" resolved: "lanes" on a GPU where the batch's rows
    alone give `lanes_auto_fill` warps a multiprocessor (a warp per 32 channels a row), else "steps"."""
    if tiles.prefill != "auto":
        return tiles.prefill
    if device.type != "cuda":
        return "steps"
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return "lanes" if batch * triton.cdiv(dim, 32) >= tiles.lanes_auto_fill * sms else "steps"


def lanes_launch(tiles: ScanTiles, batch: int, dim: int, length: int, device) -> int:
    """Segments of each sequence for the one-thread-a-channel prefill. `lanes_segments` > 0 sets them; 0
    (the default) picks them: on a GPU, as many as bring the launch to `lanes_fill` warps a multiprocessor
    (a sequence of few channels alone leaves most of the GPU idle), but none shorter than
    `lanes_min_segment` steps (each segment's summary pass runs its steps once more); else one."""
    if tiles.lanes_segments:
        return tiles.lanes_segments
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    warps = batch * triton.cdiv(dim, 32)
    wanted = triton.cdiv(tiles.lanes_fill * sms, warps)
    return max(1, min(wanted, length // tiles.lanes_min_segment))


def lanes_inputs(M: torch.Tensor) -> torch.Tensor:
    """B or C ([B, N, L] or [B, G, N, L]) for the one-thread-a-channel prefill: fp32 with each step's N values
    contiguous and 16-byte aligned (every thread of a program loads the same row, four values at a time)."""
    aligned = M.data_ptr() % 16 == 0 and all(stride % 4 == 0 for stride in M.stride()[:-2])
    if M.dtype == torch.float32 and M.stride(-2) == 1 and M.stride(-1) == M.shape[-2] and aligned:
        return M
    rows = M.new_empty((*M.shape[:-2], M.shape[-1], M.shape[-2]), dtype=torch.float32)
    return rows.copy_(M.transpose(-1, -2)).transpose(-1, -2)


def _block_in_group(block_d: int, per_group: int) -> int:
    """Channels a program takes: `block_d`, halved until it divides a group of B/C (a program's channels
    stay inside one group)."""
    while per_group % block_d:
        block_d //= 2
    return block_d


def _forward(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, tiles, save_states, kernel=None
):  # fmt: skip
    """y [B, D, L] (u's dtype), the last state [B, D, N] fp32, and with `save_states` the fp32 state at
    the start of every chunk, [B, D, N, n_chunks] (stored chunk-major, so each program's writes are
    contiguous); else None. `kernel`: the prefill kernel (`prefill_kernel`'s, when not given)."""
    batch, dim, length = u.shape
    N = A.shape[-1]
    Bg, Cg = _grouped(B), _grouped(C)
    groups = Bg.shape[1]
    if dim % groups or Cg.shape[1] != groups:
        raise ValueError(f"selective_scan: {groups} groups of B/C do not divide {dim} channels")
    if tiles.train_time_major if save_states else tiles.prefill_time_major:
        u, delta, z = time_major(u), time_major(delta), time_major(z)
    y = empty_like_layout(u) if channels_last(u) else empty_time_major(u)
    h_last = torch.empty(batch, dim, N, device=u.device, dtype=torch.float32)
    dummy = h_last
    h0 = initial_state if initial_state is not None else dummy
    zt = z if z is not None else u
    common = dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, HAS_H0=initial_state is not None,
    )  # fmt: skip
    if save_states:
        n_chunks = triton.cdiv(length, tiles.chunk)
        states = torch.empty(batch, n_chunks, dim, N, device=u.device, dtype=torch.float32)
        block_d = _block_in_group(tiles.train_block_d, dim // groups)
        _selective_scan_loop_kernel[(batch, dim // block_d)](
            u, delta, A, Bg, Cg,
            D if D is not None else dummy, zt, delta_bias if delta_bias is not None else dummy, h0, y, h_last,
            states, dim, length, N, dim // groups,
            *u.stride(), *delta.stride(), *A.stride(), *Bg.stride(), *Cg.stride(), *zt.stride(),
            *h0.stride(), *y.stride(), *h_last.stride(), *states.stride(),
            **common, CHUNK=tiles.chunk, BLOCK_D=block_d, FAST=u.is_cuda, **tiles.train_launch(),
        )  # fmt: skip
        return y, h_last, states.permute(0, 2, 3, 1)
    inputs = (
        u, delta, A, Bg, Cg,
        D if D is not None else dummy, zt, delta_bias if delta_bias is not None else dummy, h0, y, h_last,
    )  # fmt: skip
    strides = (
        *u.stride(), *delta.stride(), *A.stride(), *Bg.stride(), *Cg.stride(), *zt.stride(),
        *h0.stride(), *y.stride(), *h_last.stride(),
    )  # fmt: skip
    kernel = kernel or prefill_kernel(tiles, batch, dim, u.device)
    if kernel == "lanes":
        if Bg.stride(2) != 1 or Cg.stride(2) != 1:
            raise ValueError("the lanes prefill kernel takes B and C with n-contiguous rows (lanes_inputs)")
        segments = lanes_launch(tiles, batch, dim, length, u.device)
        segment = -(-triton.cdiv(length, segments) // 8) * 8  # whole blocks of eight steps
        seg_h = seg_dt = dummy
        if segments > 1:
            seg_h = torch.empty(batch, segments, dim, N, device=u.device, dtype=torch.float32)
            seg_dt = torch.empty(batch, segments, dim, device=u.device, dtype=torch.float32)
        block_d = 32 * tiles.lanes_warps
        # two channels a thread where the program's channels lie in one group of B/C (they share its rows)
        pair = tiles.lanes_pair and (dim // groups) % (2 * block_d) == 0
        grid = (batch, triton.cdiv(dim, block_d * (2 if pair else 1)), segments)
        args = (
            *inputs, seg_h, seg_dt, dim, length, dim // groups, segment, segments,
            *u.stride(), *delta.stride(), *A.stride(), Bg.stride(0), Bg.stride(1), Bg.stride(3),
            Cg.stride(0), Cg.stride(1), Cg.stride(3), *zt.stride(), *h0.stride(), *y.stride(),
            *h_last.stride(),
        )  # fmt: skip
        # 32-bit step offsets unless a step's stride times the length can pass 2^31 elements
        steps = (u.stride(-1), delta.stride(-1), zt.stride(-1), Bg.stride(-1), Cg.stride(-1))
        launch = dict(
            **common,
            N=N,
            BLOCK_D=block_d,
            PAIR=pair,
            VEC=u.is_cuda and N % 4 == 0,
            WIDE=length * max(steps) >= 2**31,
            SPLIT=segments > 1,
            PREFETCH=tiles.lanes_prefetch if u.is_cuda else 0,
            UNROLL=tiles.lanes_unroll,
            DEPTH=tiles.lanes_depth,
            FAST=u.is_cuda,
            num_warps=tiles.lanes_warps,
        )
        if segments > 1:  # the last segment's summary would serve no segment after it
            _selective_scan_lanes_kernel[(*grid[:2], segments - 1)](*args, **launch, SUMMARY=True)
        _selective_scan_lanes_kernel[grid](*args, **launch, SUMMARY=False)
        return y, h_last, None
    block_n = max(triton.next_power_of_2(N), 2)
    if kernel == "steps":
        block_d, segments = steps_launch(tiles, batch, dim, dim // groups, length, u.device)
        segment = -(-triton.cdiv(length, segments) // 8) * 8  # whole blocks of eight steps
        seg_h = seg_dt = dummy
        if segments > 1:
            seg_h = torch.empty(batch, segments, dim, N, device=u.device, dtype=torch.float32)
            seg_dt = torch.empty(batch, segments, dim, device=u.device, dtype=torch.float32)
        launch = dict(
            **common, BLOCK_D=block_d, BLOCK_N=block_n, SEGMENTS=segments, num_warps=tiles.steps_warps,
            PREFETCH=tiles.steps_prefetch if u.is_cuda else 0, FAST=u.is_cuda,
            DEPTH=steps_depth_for(tiles, batch),
        )  # fmt: skip
        grid = (batch, dim // block_d, segments)
        args = (*inputs, seg_h, seg_dt, dim, length, N, dim // groups, segment, *strides)
        if segments > 1:  # the last segment's summary would serve no segment after it
            _selective_scan_steps_kernel[(*grid[:2], segments - 1)](*args, **launch, SUMMARY=True)
        _selective_scan_steps_kernel[grid](*args, **launch, SUMMARY=False)
        return y, h_last, None
    args = (*inputs, dim, length, N, dim // groups, *strides)
    grid = (batch, triton.cdiv(dim, tiles.block_d))
    _selective_scan_kernel[grid](
        *args, **common, BLOCK_T=tiles.block_t, BLOCK_D=tiles.block_d, BLOCK_N=block_n,
        num_warps=tiles.num_warps,
    )  # fmt: skip
    return y, h_last, None


def _backward(u, delta, A, B, C, D, z, delta_bias, states, delta_softplus, tiles, dout, dh_last, dz_out=None):
    """Gradients of every input (fp32 where they are sums over the batch or over channels); z's written into
    `dz_out` when given (a [B, D, L] view of any layout, z's shape and dtype)."""
    batch, dim, length = u.shape
    N = A.shape[-1]
    Bg, Cg = _grouped(B), _grouped(C)
    groups = Bg.shape[1]
    per_group = dim // groups
    block_d = _block_in_group(tiles.train_block_d, per_group)
    programs = dim // block_d
    slots = max(1, min(tiles.bwd_slots, programs // groups))
    n_chunks = states.shape[-1]
    f32 = dict(device=u.device, dtype=torch.float32)
    if tiles.train_time_major:
        u, delta, z, dout = time_major(u), time_major(delta), time_major(z), time_major(dout)
        du, ddelta = empty_time_major(u), empty_time_major(delta)
        dz = empty_time_major(z) if z is not None else du
    else:
        du, ddelta = empty_like_layout(u), empty_like_layout(delta)
        dz = empty_like_layout(z) if z is not None else du
    if z is not None and dz_out is not None:  # the kernel writes through dz's strides: any layout
        if dz_out.shape != z.shape or dz_out.dtype != z.dtype:
            raise ValueError("selective_scan backward: dz_out must have z's shape and dtype")
        dz = dz_out
    dA = torch.empty(batch, n_chunks, dim, N, **f32)
    dBC = torch.zeros(slots, batch, groups, 2 * N, length, **f32)
    dD = torch.empty(batch, dim, **f32)
    dbias = torch.empty(batch, dim, **f32)
    # d loss / d (state after a chunk), alternating between two halves: the last state's gradient in the
    # first, d loss / d initial_state in the one the last chunk writes
    carry = torch.empty(2, batch, dim, N, **f32)
    if dh_last is None:
        carry[0].zero_()
    else:
        carry[0].copy_(dh_last)
    if dout is None:  # only the last state is used: zeros without memory
        dout = u.new_zeros(()).expand(u.shape)
    st = states.permute(0, 3, 1, 2)  # [B, n_chunks, D, N]
    zt = z if z is not None else u
    BC = torch.cat((Bg, Cg), 2)  # [B, G, 2N, L], time-contiguous: one pointer tile reads both
    _selective_scan_bwd_kernel[(batch, programs)](
        u, delta, A, BC,
        D if D is not None else dD, zt, delta_bias if delta_bias is not None else dD, st, dout,
        du, ddelta, dz, dA, dBC, dD, dbias, carry,
        dim, length, N, groups, per_group, slots,
        *u.stride(), *delta.stride(), *A.stride(), *BC.stride(), *zt.stride(),
        *st.stride(), *dout.stride(), *du.stride(), *ddelta.stride(), *dz.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        CHUNK=tiles.chunk, BLOCK_D=block_d, FLIP=tiles.bwd_flip, FAST=u.is_cuda, **tiles.train_launch(),
    )  # fmt: skip
    dBC = dBC.sum(0)
    dB, dC = dBC[:, :, :N], dBC[:, :, N:]
    return dict(
        u=du,
        delta=ddelta,
        A=dA.sum((0, 1)),
        B=dB if B.dim() == 4 else dB[:, 0],
        C=dC if C.dim() == 4 else dC[:, 0],
        D=dD.sum(0) if D is not None else None,
        z=dz if z is not None else None,
        delta_bias=dbias.sum(0) if delta_bias is not None else None,
        initial_state=carry[n_chunks % 2],
    )


class _SelectiveScanFn(torch.autograd.Function):
    """The fused forward, keeping the inputs and the chunk-start states; the fused backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, tiles):
        y, h_last, states = _forward(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, tiles, save_states=True
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.delta_softplus, ctx.tiles = delta_softplus, tiles
        ctx.set_materialize_grads(False)
        return y, h_last

    @staticmethod
    def backward(ctx, dy, dh_last):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        saved = (u, delta, A, B, C, D, z, delta_bias, states)
        grads = _backward(*saved, ctx.delta_softplus, ctx.tiles, dy, dh_last)
        names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
        like = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
        out = []
        for i, name in enumerate(names):
            grad = grads[name] if ctx.needs_input_grad[i] else None
            if grad is not None and name in like:
                grad = grad.to(like[name].dtype)
            out.append(grad)
        return (*out, None, None)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
    tiles: ScanTiles | None = None,
):
    """`ops.selective_scan` for B and C of shape [B, N, L] or [B, G, N, L], differentiable in every input
    (and through the returned last state). `tiles`: launch parameters (`ScanTiles`; `DEFAULT_TILES` when
    None, which is what `ops.selective_scan` runs)."""
    tiles = tiles or DEFAULT_TILES
    grad = needs_grad(u, delta, A, B, C, D, z, delta_bias, initial_state)
    kernel = None if grad else prefill_kernel(tiles, u.shape[0], u.shape[1], u.device)
    fp32 = torch.float32 if kernel == "steps" else None
    B, C, D, delta_bias = kernel_inputs(B, C, D, delta_bias, fp32, rows=kernel == "lanes")
    if grad:
        y, h_last = _SelectiveScanFn.apply(
            u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, tiles
        )
    else:
        y, h_last, _ = _forward(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, tiles, False, kernel
        )
    return (y, h_last) if return_last_state else y
