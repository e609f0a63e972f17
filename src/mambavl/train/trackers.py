"""Experiment trackers a run reports to besides its own `metrics.jsonl` (`--report-to wandb,tensorboard`).

A tracker takes the run's options once and the logged steps' scalars; only the main process opens one.
Each backend is an optional package, checked when the run starts (before any model is built), so a
missing one costs a one-line error rather than a finished run without its curves. Files stay in the run
directory: TensorBoard's events in `RUN_DIR/tensorboard`, W&B's run in `RUN_DIR/wandb` (or under
`WANDB_DIR` when that is set). W&B follows its own environment (`WANDB_MODE=offline` writes a run that
`wandb sync` uploads later; `WANDB_PROJECT`, `WANDB_ENTITY`); a resumed run continues the same W&B run
(its id is kept in `RUN_DIR/trackers.json`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Protocol

TRACKERS = ("wandb", "tensorboard")
# the package each tracker imports, and the one pip installs
PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}
STATE_FILE = "trackers.json"  # what a resumed run needs to continue the same tracker run
TENSORBOARD_DIR = "tensorboard"
DEFAULT_PROJECT = "mambavl"


class TrackerError(ValueError):
    """A tracker cannot be used as asked."""


class TrackerUnavailable(TrackerError):
    """A tracker was asked for whose package is not installed."""


class Tracker(Protocol):
    def log_config(self, config: dict) -> None: ...

    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def finish(self, failed: bool = False) -> None: ...


def parse(values) -> tuple[str, ...]:
    """Tracker names from repeated and/or comma-separated values, in order, each once ("none": none)."""
    if isinstance(values, str):
        values = [values]
    names: list[str] = []
    for value in values or ():
        for name in str(value).split(","):
            name = name.strip().lower()
            if name and name != "none" and name not in names:
                names.append(name)
    return tuple(names)


def check(names) -> None:
    """Refuses unknown trackers and those whose package is missing, naming the install command."""
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"report_to: unknown tracker(s) {unknown}; choose from {', '.join(TRACKERS)}")
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise TrackerUnavailable(
                f"--report-to {name} needs the {PACKAGES[name]} package: pip install {PACKAGES[name]}"
            )


def scalars(record: dict) -> dict[str, float]:
    """A metrics record's numbers under `train/<name>` (the step is the axis, not a value)."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"train/{key}"] = value
    return out


class TensorBoard:
    """`torch.utils.tensorboard.SummaryWriter` on `RUN_DIR/tensorboard`. A resumed run purges the events
    past its checkpoint, as metrics.jsonl drops them: the curves read as one uninterrupted run."""

    def __init__(self, run_dir: Path, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / TENSORBOARD_DIR
        self.writer = SummaryWriter(str(self.path), purge_step=resume_step + 1 if resume_step else None)

    def log_config(self, config: dict) -> None:
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, failed: bool = False) -> None:
        self.writer.close()


class WandB:
    """A W&B run named after the run directory, its files under it (or WANDB_DIR). Whether it is online
    or offline is W&B's own setting (`WANDB_MODE`, `wandb login`)."""

    def __init__(self, run_dir: Path, run_id: str | None, resume: bool):
        import wandb

        run_dir = Path(run_dir)
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
                name=run_dir.name,
                id=run_id,
                resume="allow" if resume else None,
            )
        except Exception as e:  # not logged in, no network, a bad WANDB_* setting: W&B's words, and ours
            raise TrackerError(
                f"--report-to wandb: W&B could not start a run ({type(e).__name__}: {e}). Log in with "
                "`wandb login`, or set WANDB_MODE=offline to write the run for a later `wandb sync`"
            ) from e
        self.id = self.run.id

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackers:
    """The run's trackers as one: each call goes to every tracker. `open` the main process's; the other
    processes get an empty set."""

    def __init__(self, trackers: list[Tracker] | None = None):
        self.trackers = trackers or []

    @classmethod
    def open(cls, names, run_dir: Path, config: dict, resume_step: int = 0) -> Trackers:
        run_dir = Path(run_dir)
        check(names)
        state_file = run_dir / STATE_FILE
        state = _read_state(state_file)
        opened: list[Tracker] = []
        try:
            for name in names:
                if name == "tensorboard":
                    opened.append(TensorBoard(run_dir, resume_step))
                elif name == "wandb":
                    previous = state.get("wandb", {}).get("id")
                    tracker = WandB(run_dir, previous, resume=previous is not None)
                    if tracker.id != previous:
                        state["wandb"] = {"id": tracker.id}
                        _write_state(state_file, state)
                    opened.append(tracker)
            trackers = cls(opened)
            trackers.log_config(config)
        except BaseException:
            cls(opened).finish(failed=True)
            raise
        return trackers

    def log_config(self, config: dict) -> None:
        for tracker in self.trackers:
            tracker.log_config(config)

    def log(self, record: dict, step: int) -> None:
        values = scalars(record)
        for tracker in self.trackers:
            tracker.log(values, step)

    def finish(self, failed: bool = False) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.finish(failed)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.finish(failed=kind is not None)


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)
