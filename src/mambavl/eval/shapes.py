"""The `mambavl demo` held-out set as a benchmark (`--benchmark shapes`): the synthetic shapes questions,
scored by exact match after lower-casing and dropping punctuation, per question type. The data root is the
demo's `data/` directory (`heldout.json` and `images/`)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from mambavl.data.shapes import QUESTION_TYPES
from mambavl.eval.base import Benchmark, BenchmarkError, Sample, mean, register
from mambavl.eval.benchmarks import File, _json


def normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


HELDOUT = File("heldout.json", "a `mambavl demo` held-out file", "`mambavl demo --out DIR` (DIR/data)")


def read(root: Path) -> list[Sample]:
    path, rows = _json(root, HELDOUT)
    try:
        return [
            Sample(
                id=r["id"],
                image=Path(root) / "images" / r["image"],
                question=r["conversations"][0]["value"].replace("<image>", "").strip(),
                answer=r["conversations"][1]["value"],
                meta={"type": r["types"][0]},
            )
            for r in rows
        ]
    except (KeyError, IndexError, TypeError) as e:
        raise BenchmarkError(f"{path}: not a shapes held-out file ({type(e).__name__}: {e})") from e


def score(prediction: str, sample: Sample) -> dict:
    return {"correct": float(normalise(prediction) == normalise(sample.answer)), "answer": sample.answer}


def aggregate(records: list[dict]) -> dict:
    by_type = defaultdict(list)
    for r in records:
        by_type[r["meta"]["type"]].append(r)
    return {
        "accuracy": mean(records, "correct"),
        "per_type": {t: mean(by_type[t], "correct") for t in QUESTION_TYPES if t in by_type},
        "questions": len(records),
    }


SHAPES = register(
    Benchmark(
        name="shapes",
        description="the mambavl demo's synthetic shapes VQA, held-out scenes",
        files=("heldout.json", "images/"),
        read=read,
        prompt=lambda s: s.question,
        score=score,
        aggregate=aggregate,
        max_new_tokens=10,
    )
)
