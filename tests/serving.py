"""Serving helpers for tests: a real server (`with LiveServer(vlm) as url:`, uvicorn in a thread on a
loopback port) and an engine driven step by step in the test's own thread (`collect`, `drive`)."""

from __future__ import annotations

import torch

import mambavl
from mambavl.engine.scheduler import Delta, Request
from mambavl.serve import Engine, EngineConfig, ServeConfig
from mambavl.serve.thread import ServerThread
from mambavl.vlm.sampling import SamplingParams


class LiveServer(ServerThread):
    def __init__(self, vlm, engine: EngineConfig | None = None, config: ServeConfig | None = None):
        super().__init__(
            Engine(vlm, engine or EngineConfig(slots=8)),
            config or ServeConfig(model_name="test-model"),
            startup_timeout=60,
        )


def drive(engine: Engine, limit: int = 10_000) -> None:
    """Runs the engine's loop in this thread until nothing is left (deterministic, no thread)."""
    with torch.inference_mode():
        for _ in range(limit):
            engine._drop_ended()
            engine._admit()
            if not engine._rows and not engine._waiting and not engine._jobs:
                return
            if engine._rows:
                engine._step_or_fail()
    raise AssertionError("the engine did not finish")


def collect(engine: Engine, image, prompt, n: int = 1, **params) -> tuple[Request, list]:
    """Queues a request on an engine that `drive` runs; its events land in the returned list."""
    events: list = []
    request = Request(image, prompt, SamplingParams(**params), events.append, n=n)
    engine._waiting.append(request)
    return request, events


def texts(events: list, n: int = 1) -> list[str]:
    out = [""] * n
    for e in events:
        if isinstance(e, Delta):
            out[e.index] += e.text
    return out


def printable_tiny_cobra():
    """tiny-cobra whose greedy answers are printable ASCII that differ by image, prompt and history: the
    LM weights spread out, the rows of printable bytes in the (tied) embedding scaled up and those of the
    other bytes down (not to zero: a zero embedding would blank the position's output). Plain random
    weights answer in bytes that decode to U+FFFD for every prompt alike."""
    torch.manual_seed(0)
    vlm = mambavl.create("tiny-cobra")
    printable = sorted({vlm.tokenizer.encode(chr(b))[0] for b in range(0x20, 0x7F)})
    others = [i for i in range(1, 257) if i not in printable]  # 0 is <|endoftext|>, 257+ the chat markers
    with torch.no_grad():
        for p in vlm.lm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        vlm.lm.lm_head.weight[printable] *= 4
        vlm.lm.lm_head.weight[others] *= 0.05
    return vlm.eval()
