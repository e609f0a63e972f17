"""What a run reports: one JSON line per logged step (`metrics.jsonl`), a rich progress bar with loss,
tokens/s and ETA, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class MetricsLog:
    """Appends records to a JSONL file; on resume, records past the checkpoint are dropped first (the
    resumed run writes them again), so the file always reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        if self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics file (a line cut short by a kill is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def progress_bar(console: Console | None = None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def plot_loss(records: list[dict], path: Path, title: str = "") -> Path | None:
    """Loss (and learning rate) against step, as a PNG."""
    points = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if not points:
        return None
    try:
        import matplotlib
    except ImportError:  # the run is done and metrics.jsonl holds everything; only the picture is missing
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([s for s, _ in points], [v for _, v in points], color="tab:blue", lw=1.2, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    lr = [(r["step"], r["lr"]) for r in records if "lr" in r]
    if lr:
        ax2 = ax.twinx()
        ax2.plot(
            [s for s, _ in lr],
            [v for _, v in lr],
            color="tab:orange",
            lw=0.8,
            alpha=0.7,
            label="learning rate",
        )
        ax2.set_ylabel("learning rate")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
