"""Running a model over benchmarks: batched generation, per-sample results appended as JSON lines (a rerun
continues where the last one stopped and never scores a sample twice), then `results.json` and a markdown
table. Images that cannot be read are counted, named, and scored as wrong; the run goes on. A run directory
records whose answers it holds (`identity`): a rerun with another model or other options is refused."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from mambavl.eval import identity
from mambavl.eval.base import Benchmark, BenchmarkError, Sample, get_benchmark
from mambavl.vision.images import ImageError


@dataclass(frozen=True)
class EvalConfig:
    benchmarks: tuple[str, ...]
    data_root: Path
    out: Path | None = None  # None: evals/<benchmarks>-<model>-<fingerprint>-<mode>, one per model and mode
    limit: int | None = None  # the first N samples of each benchmark
    batch_size: int = 8
    mode: str = "generate"  # or "probability": first-token probabilities over the options (where defined)
    max_new_tokens: int | None = None  # None: the benchmark's own

    def __post_init__(self):
        if self.mode not in ("generate", "probability"):
            raise ValueError(f"mode {self.mode!r} is unknown: generate or probability")
        if self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("batch_size and limit must be ≥ 1")


def read_done(path: Path) -> dict[str, dict]:
    """The records already written (by id). A last line cut short by an interruption is dropped and the
    file truncated to the complete lines, so that sample is run again."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    raw = path.read_bytes()
    good = 0
    for line in raw.splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if not line.endswith(b"\n"):
            break
        done[record["id"]] = record
        good += len(line)
    if good != len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def read_samples(benchmark: Benchmark, root: Path) -> list[Sample]:
    """The benchmark's samples from `root`, or else from `root/<name>/` (several benchmarks under one
    --data-root, each in its own folder)."""
    try:
        return benchmark.read(Path(root))
    except BenchmarkError:
        own = Path(root) / benchmark.name
        if own.is_dir():
            return benchmark.read(own)
        raise


def read_benchmarks(cfg: EvalConfig) -> list[tuple[Benchmark, list[Sample]]]:
    """Every benchmark of `cfg` with its samples (the first --limit): an unknown name or a missing file
    fails here, before a model is loaded or a progress bar drawn."""
    benchmarks = [get_benchmark(name) for name in cfg.benchmarks]  # every name is checked before any file
    work = []
    for benchmark in benchmarks:
        samples = read_samples(benchmark, cfg.data_root)
        work.append((benchmark, samples[: cfg.limit] if cfg.limit is not None else samples))
    return work


def user_message(vlm, benchmark: Benchmark, sample: Sample) -> str:
    """The benchmark's prompt; models that take the image where the prompt says `<image>` get it first."""
    text = benchmark.prompt(sample)
    if sample.image is not None and vlm.config.image_placement == "placeholder" and "<image>" not in text:
        text = "<image>\n" + text
    return text


def prompt_for(vlm, benchmark: Benchmark, sample: Sample) -> str:
    builder = vlm.get_prompt_builder()
    builder.add_turn("human", user_message(vlm, benchmark, sample))
    return builder.get_prompt()


def _load(vlm, sample: Sample):
    """(prepared image or None, error message or None)."""
    if sample.image is None:
        return None, None
    try:
        return vlm.preprocess(sample.image), None
    except (ImageError, OSError) as e:
        return None, f"{sample.image}: {e}"


def answer_batch(
    vlm, benchmark: Benchmark, samples: list[Sample], cfg: EvalConfig
) -> list[tuple[str, str | None]]:
    """(prediction, error) per sample; samples whose image cannot be read are not run (prediction "")."""
    loaded = [_load(vlm, s) for s in samples]
    run = [i for i, (_, err) in enumerate(loaded) if err is None]
    out: list[tuple[str, str | None]] = [("", err) for _, err in loaded]
    if not run:
        return out
    images = [loaded[i][0] for i in run]
    prompts = [prompt_for(vlm, benchmark, samples[i]) for i in run]
    if cfg.mode == "probability" and benchmark.choices is not None:
        options = [benchmark.choices(samples[i]) for i in run]
        probs = vlm.option_probabilities(images, prompts, options)
        answers = [max(p, key=p.get) for p in probs]
    else:
        answers = vlm.generate(
            images, prompts, max_new_tokens=cfg.max_new_tokens or benchmark.max_new_tokens, do_sample=False
        )
    for i, answer in zip(run, answers, strict=True):
        out[i] = (answer, None)
    return out


def record_for(benchmark: Benchmark, sample: Sample, prediction: str, error: str | None) -> dict:
    record = benchmark.score(prediction, sample)
    if error is not None:  # scored as wrong: every per-sample score is 0
        record = {
            k: (0.0 if isinstance(v, int | float) and not isinstance(v, bool) else v)
            for k, v in record.items()
        }
        record["error"] = error
    return record | {"id": sample.id, "prediction": prediction, "meta": sample.meta}


def evaluate_benchmark(
    vlm,
    benchmark: Benchmark,
    cfg: EvalConfig,
    progress: Callable[[int, int], None] | None = None,
    samples: list[Sample] | None = None,
) -> dict:
    """Runs (or resumes) one benchmark in `cfg.out`; returns its metrics and bookkeeping. `samples`: the
    benchmark's (the first --limit), when they were read already."""
    if samples is None:
        samples = read_samples(benchmark, cfg.data_root)
        if cfg.limit is not None:
            samples = samples[: cfg.limit]
    if cfg.out is None:
        raise ValueError("EvalConfig.out is needed to run one benchmark (evaluate() picks a default)")
    directory = cfg.out / benchmark.name
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "predictions.jsonl"
    done = read_done(path)
    todo = [s for s in samples if s.id not in done]
    started = time.perf_counter()
    if progress is not None:
        progress(len(samples) - len(todo), len(samples))
    with open(path, "a", encoding="utf-8") as f, torch.inference_mode():
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start : start + cfg.batch_size]
            for sample, (prediction, error) in zip(
                chunk, answer_batch(vlm, benchmark, chunk, cfg), strict=True
            ):
                record = record_for(benchmark, sample, prediction, error)
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                done[sample.id] = record
            f.flush()
            os.fsync(f.fileno())
            if progress is not None:
                progress(len(samples) - len(todo) + start + len(chunk), len(samples))
    records = [done[s.id] for s in samples]
    errors = [r for r in records if r.get("error")]
    return {
        "metrics": benchmark.aggregate(records),
        "samples": len(samples),
        "run_now": len(todo),
        "seconds": time.perf_counter() - started,
        "unreadable_images": len(errors),
        "unreadable": [r["error"] for r in errors[:20]],
    }


def evaluate(
    vlm,
    cfg: EvalConfig,
    model_name: str,
    console=None,
    work: list[tuple[Benchmark, list[Sample]]] | None = None,
    overwrite: bool = False,
) -> dict:
    """Every benchmark of `cfg` in turn, with a progress bar; writes results.json and results.md.

    `model_name` is what `vlm` was loaded from (a directory or a preset; any other name stands for a model
    built in memory, known by its weights). The run directory records it with the options, and a rerun
    with a different model or options is refused (`identity.RunDirError`) unless `overwrite` starts over.
    `work`: the output of `read_benchmarks(cfg)`, when it was read already. The summary's "out" is the run
    directory (the default when `cfg.out` is None)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    work = read_benchmarks(cfg) if work is None else work
    out = cfg.out or identity.default_out(cfg.benchmarks, model_name, vlm, cfg.mode)
    cfg = replace(cfg, out=out)
    model = identity.identify(model_name, vlm, identity.known_files(out))
    options = {
        b.name: identity.benchmark_options(b, cfg.data_root, cfg.mode, cfg.max_new_tokens) for b, _ in work
    }
    record = identity.claim(out, model, options, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / identity.RECORD, json.dumps(record, indent=2))

    results: dict[str, dict] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False, disable=console is None) as bar:
        for benchmark, samples in work:
            task = bar.add_task(benchmark.name, total=len(samples), rate="")
            clock = {"t": time.perf_counter(), "n": None}

            def progress(n: int, total: int, task=task, clock=clock) -> None:
                if clock["n"] is None:
                    clock["n"], clock["t"] = n, time.perf_counter()
                rate = (n - clock["n"]) / max(time.perf_counter() - clock["t"], 1e-9)
                bar.update(
                    task, completed=n, total=total, rate=f"{rate:.1f} samples/s" if n > clock["n"] else ""
                )

            results[benchmark.name] = evaluate_benchmark(vlm, benchmark, cfg, progress, samples) | {
                "options": options[benchmark.name]
            }
    summary = {
        "model": model_name,
        "model_identity": {k: v for k, v in record["model"].items() if k != "files"},
        "out": str(out),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "benchmarks": results,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "versions": versions(),
        "device": str(vlm.device),
        "dtype": str(vlm.dtype),
    }
    write_atomic(out / "results.json", json.dumps(summary, indent=2, default=str))
    write_atomic(out / "results.md", markdown([summary]))
    return summary


def versions() -> dict:
    import mambavl

    return {"mambavl": mambavl.__version__, "torch": torch.__version__, "python": platform.python_version()}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def headline(metrics: dict) -> list[tuple[str, float]]:
    """The numbers worth a column: top-level numeric metrics (nested ones, e.g. per type, are left out)."""
    return [(k, v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)]


def markdown(summaries: list[dict]) -> str:
    """A table: one row per benchmark metric, one column per run (fractions as percentages)."""
    names = [s["model"] for s in summaries]
    rows: dict[tuple[str, str], list[str]] = {}
    for j, s in enumerate(summaries):
        for bench, result in s["benchmarks"].items():
            for metric, value in headline(result["metrics"]):
                cells = rows.setdefault((bench, metric), [""] * len(summaries))
                cells[j] = (
                    f"{100 * value:.2f}" if isinstance(value, float) and 0 <= value <= 1 else f"{value:g}"
                )
    lines = ["| benchmark | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    lines += [f"| {b} | {m} | " + " | ".join(cells) + " |" for (b, m), cells in rows.items()]
    return "\n".join(lines) + "\n"
