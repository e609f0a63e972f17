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


def bar_chart(summaries: list[dict], path: Path) -> Path:
    """One group of bars per benchmark metric that is a fraction, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys: list[tuple[str, str]] = []
    for s in summaries:
        for bench, result in s["benchmarks"].items():
            for metric, value in headline(result["metrics"]):
                if isinstance(value, float) and 0 <= value <= 1 and (bench, metric) not in keys:
                    keys.append((bench, metric))
    width = 0.8 / max(len(summaries), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys) + 2), 4))
    for j, s in enumerate(summaries):
        values = [100 * s["benchmarks"].get(b, {}).get("metrics", {}).get(m, 0.0) for b, m in keys]
        ax.bar([i + j * width for i in range(len(keys))], values, width, label=s["model"])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], [f"{b}\n{m}" for b, m in keys], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(directories: list[Path], png: Path) -> str:
    summaries = load_runs(directories)
    bar_chart(summaries, png)
    return markdown(summaries)
