"""`mambavl demo`: a complete, offline training run that visibly works, on a CPU, in minutes.

It writes the synthetic shapes dataset (`data.shapes`), trains a tiny preset through both stages (align,
then finetune) with the ordinary trainer, evaluates it on held-out scenes, and trains the same model
once more on the same data with every image blanked: that blind baseline shows how much of the accuracy
comes from reading the image rather than from answer priors.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mambavl.data.shapes import write_shapes
from mambavl.eval.shapes import SHAPES


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("mambavl-demo")
    preset: str = "tiny-cobra"
    train_scenes: int = 1000
    heldout_scenes: int = 200
    image_size: int = 112
    align_steps: int = 600
    finetune_steps: int = 800
    batch_size: int = 32
    align_lr: float = 3e-3
    finetune_lr: float = 3e-3
    seed: int = 0
    blind: bool = True  # also train the blind baseline
    overwrite: bool = False
    threads: int | None = None  # torch CPU threads (default: PyTorch's; 1 per training when in parallel)
    # The blind baseline trains in a second process beside the model (on machines with ≥ 2 cores).
    parallel: bool = True
    extra: dict = field(default_factory=dict)


def evaluate(model_dir: Path, data: Path, out: Path) -> tuple[dict, list[dict]]:
    """Greedy answers to every held-out question: an ordinary `mambavl eval --benchmark shapes` run of the
    saved model (predictions in `out/shapes/predictions.jsonl`, the model recorded in `out/run.json`).
    Returns the metrics and the per-question records."""
    from mambavl.checkpoints.vlm import load
    from mambavl.eval.runner import EvalConfig, evaluate, read_done

    cfg = EvalConfig(benchmarks=("shapes",), data_root=data, out=out, batch_size=64)
    result = evaluate(load(model_dir), cfg, str(model_dir))["benchmarks"]["shapes"]
    return result["metrics"], list(read_done(out / "shapes" / "predictions.jsonl").values())


def _stage(cfg: DemoConfig, model: str, stage: str, data: str, run_dir: Path, console, blank: bool) -> Path:
    from mambavl.train import TrainConfig, train

    align = stage == "align"
    result = train(
        TrainConfig(
            model=model,
            run_dir=run_dir,
            stage=stage,
            data=(data,),
            max_steps=cfg.align_steps if align else cfg.finetune_steps,
            global_batch_size=cfg.batch_size,
            per_device_batch_size=cfg.batch_size,
            learning_rate=cfg.align_lr if align else cfg.finetune_lr,
            weight_decay=0.0,
            warmup_ratio=0.03,
            # The tiny LM starts from random weights: its align stage trains it too, so that it learns
            # to describe the image right after seeing it (with a pretrained LM, align trains the
            # projector only).
            train_lm=True,
            cache_images=True,
            precision="fp32",
            gradient_checkpointing=False,
            blank_images=blank,
            seed=cfg.seed,
            save_every=0,
            keep_checkpoints=1,
            **cfg.extra,
        ),
        console=console,
    )
    return result.model_dir


def _train_both(cfg: DemoConfig, paths: dict, runs: Path, console, blank: bool) -> Path:
    images = paths["images"]
    aligned = _stage(cfg, cfg.preset, "align", f"{paths['align']}:{images}", runs / "align", console, blank)
    return _stage(
        cfg, str(aligned), "finetune", f"{paths['finetune']}:{images}", runs / "finetune", console, blank
    )


def _blind_baseline(cfg: DemoConfig, paths: dict, out: Path, console) -> dict:
    """Trains and scores the blind baseline; returns its metrics."""
    blind_dir = _train_both(cfg, paths, out / "runs" / "blind", console, blank=True)
    metrics, _ = evaluate(blind_dir, paths["heldout"].parent, out / "eval" / "blind")
    return metrics


def _blind_in_process(cfg: DemoConfig, paths: dict, out: Path) -> None:  # the second process's entry point
    torch.set_num_threads(cfg.threads or 1)
    with open(out / "runs" / "blind.log", "w", encoding="utf-8") as log:
        metrics = _blind_baseline(cfg, paths, out, Console(file=log, width=100))
    (out / "runs" / "blind.json").write_text(json.dumps(metrics))


class BlindBaseline:
    """The blind baseline trained in a second process, beside the model's training. The tiny model's steps
    are many small ops, where a second thread mostly waits on the first: two trainings with one thread
    each finish far sooner than the same two one after the other with two threads (BENCHMARKS.md)."""

    def __init__(self, cfg: DemoConfig, paths: dict, out: Path):
        import multiprocessing

        (out / "runs").mkdir(parents=True, exist_ok=True)
        self.out = out
        self.process = multiprocessing.get_context("spawn").Process(
            target=_blind_in_process, args=(cfg, paths, out), name="mambavl-demo-blind", daemon=True
        )
        self.process.start()

    def result(self) -> dict:
        self.process.join()
        if self.process.exitcode != 0:
            log = self.out / "runs" / "blind.log"
            tail = log.read_text(encoding="utf-8", errors="replace")[-2000:] if log.is_file() else ""
            raise RuntimeError(
                f"the blind baseline's training failed (exit code {self.process.exitcode}); its log "
                f"{log} ends with:\n{tail}"
            )
        return json.loads((self.out / "runs" / "blind.json").read_text())

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


def show_image(path: Path, console: Console, width: int = 28) -> None:
    """The image as coloured blocks in the terminal (two pixels per character cell); where the output
    has no colours (a pipe, a file, NO_COLOR) the blocks would be blank, so the image's path instead."""
    if console.color_system is None:
        console.print(f"(image: {path})")
        return
    from PIL import Image

    img = Image.open(path).convert("RGB").resize((width, width))
    px = img.load()
    for y in range(0, width, 2):
        line = Text()
        for x in range(width):
            top, bottom = px[x, y], px[x, y + 1]
            line.append(
                "▀", style=f"rgb({top[0]},{top[1]},{top[2]}) on rgb({bottom[0]},{bottom[1]},{bottom[2]})"
            )
        console.print(line)


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict:
    console = console or Console()
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise FileExistsError(
                f"{out} is not empty: pass --overwrite to replace it, or choose another --out"
            )
        shutil.rmtree(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    console.rule("[bold]1/4 data")
    paths = write_shapes(
        out / "data", cfg.train_scenes, cfg.heldout_scenes, cfg.image_size, cfg.seed, multi_turn=False
    )
    console.print(
        f"{cfg.train_scenes} training scenes, {cfg.heldout_scenes} held-out scenes (never seen in training), "
        f"in {out / 'data'}"
    )
    timings = {"data_s": time.perf_counter() - t_start}

    parallel = cfg.blind and cfg.parallel and (os.cpu_count() or 1) >= 2
    threads = torch.get_num_threads()
    background = None
    try:
        if parallel:
            background = BlindBaseline(cfg, paths, out)
            torch.set_num_threads(cfg.threads or 1)
        console.rule(
            f"[bold]2/4 training {cfg.preset}: align, then finetune"
            + (" (the blind baseline trains beside it)" if parallel else "")
        )
        t0 = time.perf_counter()
        trained = _train_both(cfg, paths, out / "runs" / "model", console, blank=False)
        timings["train_s"] = time.perf_counter() - t0
        shutil.copytree(trained, out / "model")
        scores, rows = evaluate(out / "model", paths["heldout"].parent, out / "eval" / "model")

        blind = None
        if cfg.blind:
            console.rule("[bold]3/4 the blind baseline: the same training with every image blanked")
            t0 = time.perf_counter()
            if background is not None:
                console.print(f"waiting for its process (log: {out / 'runs' / 'blind.log'})")
                blind = background.result()
            else:
                blind = _blind_baseline(cfg, paths, out, console)
            timings["blind_wait_s" if parallel else "blind_train_s"] = time.perf_counter() - t0
    finally:
        if background is not None:
            background.stop()
        torch.set_num_threads(threads)

    console.rule("[bold]4/4 held-out results")
    table = Table()
    for col in ("question type", "model", "blind baseline"):
        table.add_column(col, justify="left" if col == "question type" else "right")
    for t, acc in scores["per_type"].items():
        table.add_row(t, f"{acc:.1%}", f"{blind['per_type'].get(t, 0):.1%}" if blind else "-")
    table.add_row(
        "[bold]all", f"[bold]{scores['accuracy']:.1%}", f"{blind['accuracy']:.1%}" if blind else "-"
    )
    console.print(table)
    example = next((r for r in rows if r["meta"]["type"] == "spatial"), None)
    if example is not None:
        sample = next(s for s in SHAPES.read(paths["heldout"].parent) if s.id == example["id"])
        show_image(sample.image, console)
        console.print(
            f"[bold]Q:[/bold] {sample.question}\n"
            f"[bold]A:[/bold] {example['prediction']}  (truth: {sample.answer})"
        )
    timings["total_s"] = time.perf_counter() - t_start
    report = {
        "preset": cfg.preset,
        "heldout_accuracy": scores["accuracy"],
        "per_type_accuracy": scores["per_type"],
        "blind_accuracy": None if blind is None else blind["accuracy"],
        "blind_per_type_accuracy": None if blind is None else blind["per_type"],
        "heldout_questions": scores["questions"],
        "train_scenes": cfg.train_scenes,
        "heldout_scenes": cfg.heldout_scenes,
        "align_steps": cfg.align_steps,
        "finetune_steps": cfg.finetune_steps,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "timings": timings,
        "torch_threads": (cfg.threads or 1) if parallel else torch.get_num_threads(),
        "blind_in_parallel": parallel,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "model_dir": str(out / "model"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    console.print(
        f"model in {out / 'model'} (try: mambavl.load('{out / 'model'}')), report in {out / 'report.json'}; "
        f"{timings['total_s']:.0f} s in all"
    )
    return report
