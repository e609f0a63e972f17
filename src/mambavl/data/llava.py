"""LLaVA-format conversation data: `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}]}`
records in a JSON array or JSON lines, read without trusting them: every problem is reported with the
sample's id, nothing is dropped silently, and no record can stop the reading of the others (broken JSON,
nesting deeper than the parser goes, invalid UTF-8 and lone surrogates are each that record's problem)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path


class AnnotationsError(ValueError):
    """An annotations file that cannot be read at all (missing, unreadable): nothing in it can be checked."""


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
        # a lone surrogate (from invalid UTF-8 in the file) cannot be printed: show it escaped
        return f"{self.id}: {self.reason}".encode("utf-8", "backslashreplace").decode("utf-8")


def _show(value, limit: int = 60) -> str:
    """A value for a message, cut short: one field of a hostile file can hold megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_text(path: Path) -> str:
    """The annotations file as text. Invalid UTF-8 bytes become lone surrogates (`surrogateescape`), so
    they are reported in the record that holds them instead of failing the whole file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise AnnotationsError(f"{path}: cannot read the annotations file ({e.strerror or e})") from e
    return data.decode("utf-8-sig", "surrogateescape")


def _parse(text: str) -> tuple[object, str | None]:
    """One JSON document, or the reason it is not one."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"broken JSON ({e.msg}, character {e.pos})"
    except RecursionError:
        return None, "JSON nested deeper than the parser goes (a record is a flat object)"
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        return None, f"unreadable JSON ({e})"


def read_records(path: Path) -> tuple[list[tuple[str, object]], list[Problem]]:
    """(where, record) pairs of a JSON array file or a JSON-lines file, and the records that do not parse.
    Only a file that cannot be read at all raises (AnnotationsError)."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        records, error = _parse(text)
        if error is None:
            return [(f"record {i}", r) for i, r in enumerate(records)], []
        return _salvage_array(text, path)  # one bad record must not hide the good ones
    out, problems = [], []
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 is valid inside JSON
        if not line.strip():
            continue
        record, error = _parse(line)
        if error is None:
            out.append((f"line {n}", record))
        else:
            problems.append(Problem(f"line {n}", error))
    return out, problems


# a whole JSON string (escapes included), or one structural character
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]')


def _array_items(text: str) -> tuple[list[str], int | None]:
    """The source text of each element of a JSON array, found by matching brackets (strings skipped
    whole) without parsing the elements, and where the array ends (None: it is never closed)."""
    items, depth, start = [], 0, None
    for m in _TOKENS.finditer(text):
        token = m.group()
        if token[0] == '"':
            continue
        if token in "[{":
            depth += 1
            if depth == 1:
                start = m.end()
        elif token in "]}":
            depth -= 1
            if depth == 0:
                items.append(text[start : m.start()])
                return items, m.end()
        elif depth == 1:  # a comma between elements
            items.append(text[start : m.start()])
            start = m.end()
    items.append(text[start:] if start is not None else "")
    return items, None


def _salvage_array(text: str, path: Path) -> tuple[list[tuple[str, object]], list[Problem]]:
    """A JSON array that does not parse as a whole, read element by element."""
    items, end = _array_items(text)
    out, problems = [], []
    for i, item in enumerate(items):
        if not item.strip():
            if len(items) > 1 or end is None:
                problems.append(Problem(f"record {i}", "an empty record (a stray comma?)"))
            continue
        record, error = _parse(item)
        if error is None:
            out.append((f"record {i}", record))
        else:
            problems.append(Problem(f"record {i}", error))
    if end is None:
        problems.append(
            Problem(
                str(path),
                f"the array's brackets never balance after record {len(items) - 1}, so the records from "
                "there on cannot be told apart (a truncated or hand-edited file?)",
            )
        )
    elif text[end:].strip():
        problems.append(Problem(str(path), f"text after the array's closing ']' at character {end}"))
    return out, problems


def _bad_text(value: str) -> str | None:
    """Why a string cannot be tokenized, or None: a lone surrogate (invalid UTF-8 in the file, or an
    unpaired \\ud800-style escape) has no UTF-8 form."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"has U+{ord(value[e.start]):04X} at character {e.start}, a lone surrogate (invalid UTF-8 bytes "
            "in the file, or an unpaired \\ud800-style escape); re-encode the file as UTF-8"
        )
    return None


def parse_sample(where: str, record) -> Sample | Problem:
    """One record -> a Sample, or the Problem that makes it unusable."""
    if not isinstance(record, dict):
        return Problem(where, "a record must be a JSON object")
    raw_id = record.get("id", where)
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or raw_id == "":
        return Problem(where, f"'id' must be a non-empty string or a number, got {_show(raw_id)}")
    sid = str(raw_id)
    if reason := _bad_text(sid):
        return Problem(where, f"'id' {reason}")
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        return Problem(sid, "'image' must be a relative path string")
    if image is not None and (reason := _bad_text(image)):
        return Problem(sid, f"'image' {reason}")
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
                sid,
                f"turn {i} is from {_show(role)}; turns must alternate human, gpt, ... starting with human",
            )
        if reason := _bad_text(turn["value"]):
            return Problem(sid, f"turn {i}'s text {reason}")
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
