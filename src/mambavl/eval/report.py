"""`mambavl eval report`: several eval runs side by side, as a markdown table and a PNG bar chart."""

from __future__ import annotations

import json
from pathlib import Path

from mambavl.eval.base import BenchmarkError
from mambavl.eval.runner import headline, markdown


def load_runs(directories: list[Path]) -> list[dict]:
    summaries = []
    for d in directories:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise BenchmarkError(
                f"{path}: no such file; pass run directories written by `mambavl eval --out`"
            )
        try:
            summary = json.loads(path.read_text())
            if not isinstance(summary["benchmarks"], dict):
                raise TypeError("'benchmarks' is not a mapping")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise BenchmarkError(f"{path}: not an eval results file ({type(e).__name__}: {e})") from e
        summary["model"] = f"{summary.get('model', d)} ({Path(d).name})"
        summaries.append(summary)
    return summaries


def chart_keys(summaries: list[dict]) -> list[tuple[str, str]]:
    """The (benchmark, metric) pairs worth a bar: the headline metrics that are fractions."""
    keys: list[tuple[str, str]] = []
    for s in summaries:
        for bench, result in s["benchmarks"].items():
            for metric, value in headline(result["metrics"]):
                if isinstance(value, float) and 0 <= value <= 1 and (bench, metric) not in keys:
                    keys.append((bench, metric))
    return keys


def figure(summaries: list[dict]):
    """One group of bars per benchmark metric that is a fraction, one bar per run, each bar labelled with
    its value. The legend sits below the axes: inside them it would hide a bar whatever corner it took."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = chart_keys(summaries)
    width = 0.8 / max(len(summaries), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys) * max(1, len(summaries) / 2) + 2), 4.5))
    for j, s in enumerate(summaries):
        values = [100 * s["benchmarks"].get(b, {}).get("metrics", {}).get(m, 0.0) for b, m in keys]
        bars = ax.bar([i + j * width for i in range(len(keys))], values, width, label=s["model"])
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], [f"{b}\n{m}" for b, m in keys], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 110)  # room above a bar at 100 % for its value
    ax.set_yticks(range(0, 101, 20))
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.18), frameon=False)
    fig.tight_layout()
    return fig


def bar_chart(summaries: list[dict], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = figure(summaries)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight": the legend below the axes is kept
    plt.close(fig)
    return path


def report(directories: list[Path], png: Path) -> str:
    summaries = load_runs(directories)
    bar_chart(summaries, png)
    return markdown(summaries)
