"""Reading config files field by field, without trusting them: every value is checked for its type and
range as it is read, and a wrong one is an error that names the file and the field, never a KeyError or
TypeError from deep inside model construction."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mambavl.checkpoints.files import CheckpointError

REQUIRED = object()  # the default of a field that must be present


def show(value, limit: int = 60) -> str:
    """A value for an error message, cut short: a hostile file can hold megabytes in one field."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class ConfigFields:
    """Typed reads of one JSON object. A field that is absent or null takes its default (configs written
    by transformers use null for "not set"); `REQUIRED` fields must be present."""

    raw: dict
    source: str | Path  # the file, for messages
    prefix: str = ""  # where `raw` sits in the file, e.g. "ssm_cfg."

    def fail(self, key: str, expected: str, value) -> CheckpointError:
        return CheckpointError(f"{self.source}: {self.prefix}{key} must be {expected}, got {show(value)}")

    def _get(self, key: str, default):
        value = self.raw.get(key)
        if value is None and default is REQUIRED:
            raise CheckpointError(f"{self.source}: the field {self.prefix}{key} is missing")
        return value

    def integer(self, key: str, default=REQUIRED, minimum: int | None = 1) -> int:
        value = self._get(key, default)
        if value is None:
            return default
        if not is_int(value) or (minimum is not None and value < minimum):
            raise self.fail(key, "an integer" + (f" ≥ {minimum}" if minimum is not None else ""), value)
        return value

    def number(self, key: str, default=REQUIRED, positive: bool = True) -> float:
        value = self._get(key, default)
        if value is None:
            return default
        if not is_number(value) or not math.isfinite(value) or (positive and value <= 0):
            raise self.fail(key, "a finite number" + (" > 0" if positive else ""), value)
        return value

    def flag(self, key: str, default=REQUIRED) -> bool:
        value = self._get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def text(self, key: str, default=REQUIRED, choices: Sequence[str] | None = None) -> str:
        value = self._get(key, default)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise self.fail(key, "a non-empty string", value)
        if choices is not None and value not in choices:
            raise CheckpointError(
                f"{self.source}: {self.prefix}{key}={show(value)} is not supported; mambavl implements "
                f"{self.prefix}{key} in {list(choices)}"
            )
        return value

    def section(self, key: str) -> ConfigFields:
        """A nested object (absent or null: an empty one)."""
        value = self.raw.get(key)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.fail(key, "an object", value)
        return ConfigFields(value, self.source, f"{self.prefix}{key}.")


# ---- a dataclass config stored as JSON (mambavl's own layout) ---------------------------------------------
def conforms(value, hint) -> bool:
    """Whether a JSON value fits a dataclass field's type (tuples are JSON lists; floats may be ints)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_int(value)
    if hint is float:
        return is_number(value)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args, strict=True))
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    return isinstance(value, hint)


def type_problems(cls, values: dict, prefix: str = "") -> list[str]:
    """Every field of `values` that `cls` (a dataclass) has no place for, is missing, or has the wrong
    type; nested dataclass fields are checked the same way."""
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    problems = [f"{prefix}{k}: not a field mambavl knows" for k in values if k not in known]
    for name, f in known.items():
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{prefix}{name}: missing")
            continue
        value, hint = values[name], hints[name]
        if not conforms(value, hint):
            problems.append(f"{prefix}{name}: expected {_describe(hint)}, got {show(value)}")
        elif dataclasses.is_dataclass(hint):
            problems += type_problems(hint, value, f"{prefix}{name}.")
    return problems


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)  # evaluates every annotation: once per class


def _describe(hint) -> str:
    if dataclasses.is_dataclass(hint):
        return "an object"
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
