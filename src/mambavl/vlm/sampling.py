"""Choosing the next token: greedy or sampled (temperature, top-k, top-p), with a repetition penalty and
a minimum length, on the device, for a batch of rows at once.

It never fails on a setting `SamplingParams` admits or on any logits: the work is done in float64 with
the best logit shifted to 0 before the temperature divides (so no temperature overflows it), NaN logits
are never chosen, and a row left with nothing to sample from falls back to its argmax."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from mambavl.runtime import to_device

# The seeds torch.Generator.manual_seed takes: any 64-bit integer, signed or not. Torch reads a negative
# seed modulo 2**64, and so do we, so that `seed + i` of a request's choices always stays in range.
SEED_MIN, SEED_END = -(2**63), 2**64
_INF, _NEG_INF = float("inf"), float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """`do_sample=False` is greedy. Unlike the seeds (whose default top_k=1 silently makes
    `do_sample=True` greedy), `do_sample=True` here samples; top_k=0 and top_p=1.0 mean no cut-off."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_length: int = 0  # new tokens before the end-of-text token may be chosen
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time it was generated
    stop: tuple[str, ...] = ()
    seed: int | None = None  # a 64-bit integer, signed or not; stored modulo 2**64, as torch reads it
    cuda_graphs: bool = True  # decode through captured CUDA graphs where the model allows it

    def __post_init__(self):
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "an integer ≥ 1"),
            (
                "temperature",
                0 < self.temperature < math.inf,
                "> 0 and finite (use do_sample=False for greedy decoding)",
            ),
            ("top_k", self.top_k >= 0, "≥ 0 (0 disables it)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            (
                "repetition_penalty",
                0 < self.repetition_penalty < math.inf,
                "> 0 and finite (1.0 disables it)",
            ),
            ("min_length", self.min_length >= 0, "≥ 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be {want}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.seed is not None:
            if not _is_int(self.seed) or not SEED_MIN <= self.seed < SEED_END:
                raise ValueError(
                    f"seed={self.seed!r} is invalid: it must be an integer in [-2**63, 2**64) "
                    "(what torch's generators take)"
                )
            object.__setattr__(self, "seed", int(self.seed) % SEED_END)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def seeded_generator(seed: int, device, offset: int = 0) -> torch.Generator:
    """A generator on `device` seeded `seed + offset` (choice `offset` of a request), wrapped into the
    64 bits torch takes so that no offset overflows it."""
    return torch.Generator(device=device).manual_seed((seed + offset) % SEED_END)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row [B, V] -> [B], never at a NaN (torch's argmax would pick NaN first)."""
    return logits.masked_fill(logits.isnan(), _NEG_INF).argmax(-1)


def next_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    history: list[list[int]],
    step: int,
    eos_id: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
    generated: list[list[int]] | None = None,
) -> torch.Tensor:
    """logits [B, V'] (V' ≥ vocab_size: the LM's padded rows are never chosen) -> token ids [B].
    `history`: each row's prompt and generated ids (the repetition penalty's); `generated`: the generated
    ids alone (the presence and frequency penalties'; default: the whole history)."""
    # float64: penalties and temperatures of any size the checks admit stay exact or overflow to ±inf,
    # which the sampler below handles; NaN never survives.
    logits = logits[:, :vocab_size].double()
    logits = logits.masked_fill(logits.isnan(), _NEG_INF)
    # The penalised ids are counted and filtered on the host and copied over without waiting: a penalty
    # costs no read-back from the device.
    width = logits.shape[-1]
    if params.presence_penalty or params.frequency_penalty:
        for b, seen in enumerate(history if generated is None else generated):
            counts = Counter(i for i in seen if 0 <= i < width)
            if counts:
                ids = to_device(list(counts), logits.device)
                times = to_device(list(counts.values()), logits.device, torch.float64)
                logits[b, ids] -= params.presence_penalty + params.frequency_penalty * times
    if params.repetition_penalty != 1.0:
        for b, seen in enumerate(history):
            present = sorted({i for i in seen if 0 <= i < width})
            if present:
                idx = to_device(present, logits.device)
                row = logits[b, idx]
                logits[b, idx] = torch.where(
                    row < 0, row * params.repetition_penalty, row / params.repetition_penalty
                )
    if step < params.min_length and 0 <= eos_id < logits.shape[-1]:
        logits[:, eos_id] = _NEG_INF
    if not params.do_sample:
        return logits.argmax(-1)
    return _sample(logits, params, generator)


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Sampled ids [B] from float64 logits without NaN, in log space: the best logit is shifted to 0
    before the temperature divides, so a tiny temperature sends the others to -inf (the argmax, as its
    limit is) rather than every logit to ±inf, and a huge one flattens them without overflow."""
    best = logits.argmax(-1)
    top = logits.amax(-1, keepdim=True)
    scaled = (logits - top) / params.temperature
    # Logits at +inf (a huge logit over a tiny repetition penalty): the limit is uniform among them.
    only_inf = torch.zeros_like(scaled).masked_fill(logits != _INF, _NEG_INF)
    scaled = torch.where(top == _INF, only_inf, scaled)
    scaled = scaled.masked_fill(scaled.isnan(), _NEG_INF)  # a row that is -inf throughout
    # The cut-offs rank tokens by their logits, not by the scaled values: at a huge temperature those
    # underflow to ties (-1e-45 / 1e300 is -0.0), and the ranking is the same at every temperature.
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(logits < kth, _NEG_INF)
    if params.top_p < 1.0:
        order = torch.argsort(logits, dim=-1, descending=True, stable=True)
        ranked = scaled.gather(-1, order)
        probs = torch.softmax(ranked, dim=-1)
        # drop a token once the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        drop[:, 0] = False
        scaled = scaled.scatter(-1, order, ranked.masked_fill(drop, _NEG_INF))
    probs = torch.softmax(scaled, dim=-1)
    # Each row's best is at 0, so its probabilities sum to ≥ 1 and are finite; only a row with no
    # candidate at all (every logit -inf or NaN) is not, and it takes its argmax.
    usable = probs.isfinite().all(-1, keepdim=True)
    probs = torch.where(usable, probs, torch.nn.functional.one_hot(best, probs.shape[-1]).to(probs))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
