"""The `mambavl` command line."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

import mambavl

app = typer.Typer(help="Multimodal LLMs on Mamba state-space language models.", no_args_is_help=True)
console = Console()


@app.command()
def version() -> None:
    """Print the mambavl version."""
    console.print(mambavl.__version__)


@app.command()
def models() -> None:
    """List the named presets with their parts and parameter counts."""
    from mambavl.presets import PRESETS, create

    table = Table(title="mambavl presets")
    for col in ("preset", "vision", "projector", "LM", "parameters"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for name, cfg in PRESETS.items():
        n = create(name, device="meta").num_parameters()
        lm = f"{cfg.lm.family} {cfg.lm.n_layer}×{cfg.lm.d_model}"
        table.add_row(name, cfg.tower, cfg.projector, lm, f"{n:,}")
    console.print(table)


@app.command()
def convert(
    source: str = typer.Argument(
        ..., help="An original checkpoint (Cobra / ML-Mamba run dir) or a preset name."
    ),
    destination: str = typer.Argument(..., help="Directory for mambavl's own layout."),
) -> None:
    """Convert an original checkpoint into mambavl's layout (config, safetensors weights, tokenizer)."""
    from mambavl.checkpoints.files import CheckpointError
    from mambavl.checkpoints.vlm import convert as run

    try:
        out = run(source, destination)
    except CheckpointError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from e
    console.print(f"wrote {out}")


data_app = typer.Typer(help="Datasets: validation before training.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    dataset: str = typer.Option(None, help="A registered dataset id (with --data-root), e.g. llava-v15."),
    data_root: str = typer.Option(None, help="The directory the dataset's `download/...` paths live in."),
    annotations: str = typer.Option(None, help="A LLaVA JSON / JSONL file (instead of --dataset)."),
    images: str = typer.Option(None, help="The image root for --annotations."),
    stage: str = typer.Option("finetune", help="align or finetune: how samples are tokenized."),
    model: str = typer.Option(
        "cobra+3b", help="Preset or model directory: tokenizer, prompt format, limits."
    ),
    decode: bool = typer.Option(True, help="Decode every image (slower, catches corrupt files)."),
) -> None:
    """Report every sample that cannot train (broken JSON, malformed turns, missing or corrupt images,
    over-long), with its id. Exits with status 1 when any is found."""
    from pathlib import Path

    import mambavl
    from mambavl.data import check_file, dataset_paths

    if dataset:
        if not data_root:
            raise typer.BadParameter("--dataset needs --data-root")
        ann, img_root = dataset_paths(dataset, data_root, stage)
    elif annotations:
        ann, img_root = Path(annotations), Path(images) if images else None
    else:
        raise typer.BadParameter("pass --dataset with --data-root, or --annotations")
    vlm = mambavl.create(model, device="meta") if model in mambavl.PRESETS else mambavl.load(model)
    try:
        good, problems = check_file(ann, img_root, vlm, stage, decode)
    except FileNotFoundError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from e
    for problem in problems:
        console.print(f"[yellow]{problem}[/yellow]", markup=True, highlight=False)
    console.print(f"{ann}: {len(good)} usable samples, {len(problems)} with problems")
    if problems:
        raise typer.Exit(1)


@app.command()
def info(
    model: str = typer.Argument(
        ..., help="Model directory or hub id (config.json is read, not the weights)."
    ),
):
    """Describe a language-model checkpoint: layout, layers, sizes and parameter count."""
    import torch

    from mambavl.checkpoints.files import CheckpointError, read_json, resolve_model_dir
    from mambavl.lm import LanguageModel
    from mambavl.lm.layouts import lm_config_from_json

    try:
        directory = resolve_model_dir(model)
        cfg, layout = lm_config_from_json(read_json(directory / "config.json"), directory / "config.json")
    except CheckpointError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from e
    with torch.device("meta"):
        params = LanguageModel(cfg).num_parameters()
    table = Table(title=str(directory), show_header=False)
    mixers = {m: cfg.mixers.count(m) for m in dict.fromkeys(cfg.mixers)}
    ffns = {f: cfg.ffns.count(f) for f in dict.fromkeys(cfg.ffns) if f != "none"}
    rows = [
        ("layout", layout),
        ("family", cfg.family),
        ("layers", f"{cfg.n_layer}  " + ", ".join(f"{n}× {m}" for m, n in mixers.items())),
        ("feed-forward", ", ".join(f"{n}× {f}" for f, n in ffns.items()) or "none"),
        ("d_model / d_inner / d_state", f"{cfg.d_model} / {cfg.d_inner} / {cfg.d_state}"),
        ("vocab (embedding rows)", str(cfg.vocab_size)),
        ("tied head", str(cfg.tie_embeddings)),
        ("parameters", f"{params:,}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


if __name__ == "__main__":
    app()
