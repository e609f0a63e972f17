"""What the scan benchmarks share: their command line (a preset, the candidates to time by name, an output
file) and the preset's LM, on a GPU."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch


def parse(doc: str, extra: Callable[[argparse.ArgumentParser], None]):
    """(arguments, the preset's LM config); `extra` adds the script's own options. Exits without a GPU."""
    from mambavl.presets import PRESETS

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--preset", default="cobra+3b")
    extra(parser)
    parser.add_argument("--out", default="")
    parser.add_argument("--kernels", default="", help="candidates to time, by name, comma-separated")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark times CUDA kernels: it needs a GPU")
    return args, PRESETS[args.preset].lm


def chosen(candidates: list[tuple[str, dict]], kernels: str) -> list[tuple[str, dict]]:
    """The candidates named in `kernels` (comma-separated; all where empty)."""
    names = kernels.split(",") if kernels else None
    return [c for c in candidates if names is None or c[0] in names]
