"""What every benchmark is made of: samples read from the official files, the prompt the seeds ask with,
a per-sample score and the aggregate. Benchmarks are rows of a registry (`BENCHMARKS`), filled by
`register` in `mambavl.eval.benchmarks`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the suffix the seeds' harness (TRI vlm-evaluation) adds to short-answer VQA questions
SHORT_ANSWER = "Answer the question using a single word or phrase."


class BenchmarkError(ValueError):
    """A benchmark file that is missing or not in the expected format; the message names the file, what was
    expected and where to get it."""


@dataclass(frozen=True)
class Sample:
    id: str  # unique within the benchmark (resuming keys on it)
    image: Path | None  # the image file (None: text only)
    question: str  # the question as the benchmark words it
    answer: Any  # the gold: list[str] (VQA-style), str, bool, int or a box, as the benchmark's scorer takes
    options: tuple[str, ...] = ()  # multiple choice: the option texts, in the order shown as A, B, C...
    meta: dict = field(default_factory=dict)  # e.g. category, MME subtask, MMBench circular group


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    files: tuple[str, ...]  # what must be under the data root (for errors and docs)
    read: Callable[[Path], list[Sample]]  # data root -> samples (raises BenchmarkError)
    prompt: Callable[[Sample], str]  # the user message for a sample (before the model's prompt builder)
    score: Callable[[str, Sample], dict]  # (prediction, sample) -> per-sample record, e.g. {"accuracy": 1.0}
    aggregate: Callable[[list[dict]], dict]  # per-sample records (with "sample" metadata) -> metrics
    max_new_tokens: int = 16
    # multiple-choice / yes-no benchmarks: the option strings scored by first-token probability
    # (the seeds' harness "probability" mode); None: free-form generation only
    choices: Callable[[Sample], tuple[str, ...]] | None = None


BENCHMARKS: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    if benchmark.name in BENCHMARKS:
        raise ValueError(f"benchmark {benchmark.name!r} is registered twice")
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def get_benchmark(name: str) -> Benchmark:
    import mambavl.eval.benchmarks
    import mambavl.eval.shapes  # noqa: F401  (they fill the registry)

    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]


def mean(records: list[dict], key: str) -> float:
    """The mean of `key` over the records (0.0 for none)."""
    return sum(r[key] for r in records) / len(records) if records else 0.0
