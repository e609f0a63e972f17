"""LLaVA-format conversation data: `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}]}`
records in a JSON array or JSON lines, read without trusting them: every problem is reported with the
sample's id, nothing is dropped silently."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    id: str
    image: str | None  # relative to the dataset's image root
    conversations: tuple[tuple[str, str], ...]  # (role, text), human first, alternating


@dataclass(frozen=True)
class Problem:
    id: str  # the sample's id, or "line N" / "record N" where it has none
    reason: str

    def __str__(self) -> str:
        return f"{self.id}: {self.reason}"


def read_records(path: Path) -> tuple[list[tuple[str, object]], list[Problem]]:
    """(where, record) pairs of a JSON array file or a JSON-lines file, and the lines that do not parse."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            return [], [Problem(str(path), f"not valid JSON ({e})")]
        return [(f"record {i}", r) for i, r in enumerate(records)], []
    out, problems = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(Problem(f"line {n}", f"broken JSON ({e.msg})"))
    return out, problems


def parse_sample(where: str, record) -> Sample | Problem:
    """One record -> a Sample, or the Problem that makes it unusable."""
    if not isinstance(record, dict):
        return Problem(where, "a record must be a JSON object")
    sid = str(record.get("id", where))
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        return Problem(sid, "'image' must be a relative path string")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return Problem(sid, "empty or missing 'conversations'")
    parsed = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return Problem(sid, f"turn {i} is not {{'from': ..., 'value': <text>}}")
        role = turn.get("from")
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            return Problem(
                sid, f"turn {i} is from {role!r}; turns must alternate human, gpt, ... starting with human"
            )
        parsed.append((role, turn["value"]))
    if len(parsed) % 2:
        return Problem(sid, "the last turn is the human's: there is no answer to learn")
    has_placeholder = any("<image>" in text for _, text in parsed)
    if image is not None and not has_placeholder:
        return Problem(sid, "an image is given but no turn has the '<image>' placeholder")
    if image is None and has_placeholder:
        return Problem(sid, "a turn has '<image>' but the sample has no image")
    return Sample(sid, image, tuple(parsed))


def read_llava(path: str | Path) -> tuple[list[Sample], list[Problem]]:
    """All usable samples of a LLaVA JSON / JSONL file, and every problem found (by id)."""
    records, problems = read_records(Path(path))
    samples = []
    ids: set[str] = set()
    for where, record in records:
        parsed = parse_sample(where, record)
        if isinstance(parsed, Problem):
            problems.append(parsed)
        elif parsed.id in ids:
            problems.append(Problem(parsed.id, "duplicate id"))
        else:
            ids.add(parsed.id)
            samples.append(parsed)
    return samples, problems
