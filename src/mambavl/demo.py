"""`mambavl demo`: a complete, offline training run that visibly works, on a CPU, in minutes.

It writes the synthetic shapes dataset (`data.shapes`), trains a tiny preset through both stages (align,
then finetune) with the ordinary trainer, evaluates it on held-out scenes, and trains the same model
once more on the same data with every image blanked: that blind baseline shows how much of the accuracy
comes from reading the image rather than from answer priors.
"""

from __future__ import annotations

import json
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
    threads: int | None = None  # torch CPU threads (default: PyTorch's)
    extra: dict = field(default_factory=dict)


def evaluate(vlm, data: Path, out: Path) -> tuple[dict, list[dict]]:
    """Greedy answers to every held-out question: an ordinary `mambavl eval --benchmark shapes` run
    (predictions in `out/shapes/predictions.jsonl`). Returns the metrics and the per-question records."""
    from mambavl.eval.runner import EvalConfig, evaluate_benchmark, read_done

    cfg = EvalConfig(benchmarks=("shapes",), data_root=data, out=out, batch_size=64)
    result = evaluate_benchmark(vlm, SHAPES, cfg)
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


def show_image(path: Path, console: Console, width: int = 28) -> None:
    """The image as coloured blocks in the terminal (two pixels per character cell)."""
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
    from mambavl.checkpoints.vlm import load

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

    console.rule(f"[bold]2/4 training {cfg.preset}: align, then finetune")
    t0 = time.perf_counter()
    trained = _train_both(cfg, paths, out / "runs" / "model", console, blank=False)
    timings["train_s"] = time.perf_counter() - t0
    shutil.copytree(trained, out / "model")
    vlm = load(out / "model")
    scores, rows = evaluate(vlm, paths["heldout"].parent, out / "eval" / "model")

    blind = None
    if cfg.blind:
        console.rule("[bold]3/4 the blind baseline: the same training with every image blanked")
        t0 = time.perf_counter()
        blind_dir = _train_both(cfg, paths, out / "runs" / "blind", console, blank=True)
        timings["blind_train_s"] = time.perf_counter() - t0
        blind, _ = evaluate(load(blind_dir), paths["heldout"].parent, out / "eval" / "blind")

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
        "torch_threads": torch.get_num_threads(),
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
