"""Choosing the next token: greedy or sampled (temperature, top-k, top-p), with a repetition penalty and
a minimum length, on the device, for a batch of rows at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    seed: int | None = None
    cuda_graphs: bool = True  # decode through captured CUDA graphs where the model allows it

    def __post_init__(self):
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "an integer ≥ 1"),
            ("temperature", self.temperature > 0, "> 0 (use do_sample=False for greedy decoding)"),
            ("top_k", self.top_k >= 0, "≥ 0 (0 disables it)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1.0 disables it)"),
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
    logits = logits.float().clone()
    logits[:, vocab_size:] = float("-inf")
    if params.presence_penalty or params.frequency_penalty:
        for b, seen in enumerate(history if generated is None else generated):
            if seen:
                ids, counts = torch.tensor(seen, device=logits.device).unique(return_counts=True)
                logits[b, ids] -= params.presence_penalty + params.frequency_penalty * counts.float()
    if params.repetition_penalty != 1.0:
        for b, seen in enumerate(history):
            if seen:
                idx = torch.tensor(sorted(set(seen)), device=logits.device)
                row = logits[b, idx]
                logits[b, idx] = torch.where(
                    row < 0, row * params.repetition_penalty, row / params.repetition_penalty
                )
    if step < params.min_length:
        logits[:, eos_id] = float("-inf")
    if not params.do_sample:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token once the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
