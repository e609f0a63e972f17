"""The `mambavl` command line."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

import mambavl


class _Commands(TyperGroup):
    """typer's group, with flags (`--overwrite`, `--help`) shown without a `<bool>` type in help pages:
    a flag takes no value, and a type there reads as if it took one."""

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:
            _untyped_flags(command)
        return command

    def get_params(self, ctx):  # the group's own: --help, --install-completion, --show-completion
        return [_untyped(param) for param in super().get_params(ctx)]


def _untyped(option):
    if getattr(option, "is_flag", False):  # typer's options are not click.Option subclasses
        option.metavar = ""
    return option


def _untyped_flags(command) -> None:
    for param in command.params:
        _untyped(param)
    help_option = command.get_help_option
    command.get_help_option = lambda ctx: _untyped(help_option(ctx))
    for sub in getattr(command, "commands", {}).values():
        _untyped_flags(sub)


app = typer.Typer(
    cls=_Commands, help="Multimodal LLMs on Mamba state-space language models.", no_args_is_help=True
)
console = Console()


@app.command()
def version() -> None:
    """Print the mambavl version."""
    console.print(mambavl.__version__)


def print_table(table: Table) -> None:
    """A table as a terminal shows it; into a pipe or a file, at its natural width, since nothing there
    limits the width and a row wrapped at 80 columns is hard to read or parse."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.measure import Measurement

    width = Measurement.get(console, console.options.update_width(100_000), table).maximum
    Console(file=console.file, width=max(width, console.width), no_color=True).print(table)


@app.command()
def models() -> None:
    """List the named presets with their parts and parameter counts."""
    from mambavl.presets import PRESETS
    from mambavl.vlm.model import create

    table = Table(title="mambavl presets")
    # names and counts are never cut; the parts fold onto more lines when the terminal is narrow
    table.add_column("preset", no_wrap=True)
    for col in ("vision", "projector", "LM"):
        table.add_column(col, overflow="fold")
    table.add_column("parameters", justify="right", no_wrap=True)
    for name, cfg in PRESETS.items():
        n = create(name, device="meta").num_parameters()
        lm = f"{cfg.lm.family} {cfg.lm.n_layer}×{cfg.lm.d_model}"
        table.add_row(name, cfg.tower, cfg.projector, lm, f"{n:,}")
    print_table(table)


@app.command()
def convert(
    source: str = typer.Argument(
        ...,
        help="An original checkpoint (Cobra / ML-Mamba run dir, Viper dir), a preset with released "
        "weights (cobra+3b, mlmamba+3b), or a tiny preset (tiny-cobra, ...: random weights).",
    ),
    destination: str = typer.Argument(..., help="Directory for mambavl's own layout."),
) -> None:
    """Convert an original checkpoint into mambavl's layout (config, safetensors weights, tokenizer)."""
    import warnings

    from mambavl.checkpoints.files import CheckpointError
    from mambavl.compat import convert as run

    try:
        with warnings.catch_warnings(record=True) as notes:  # shown as notes, not as Python warnings
            warnings.simplefilter("always")
            out = run(source, destination)
    except CheckpointError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from e
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note.message}", highlight=False)
    console.print(f"wrote {out}", highlight=False)


data_app = typer.Typer(help="Datasets: validation before training.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    dataset: str = typer.Option(None, help="A registered dataset id (with --data-root), e.g. llava-v15."),
    data_root: str = typer.Option(None, help="The directory the dataset's `download/...` paths live in."),
    annotations: str = typer.Option(None, help="A LLaVA JSON / JSONL file (instead of --dataset)."),
    images: str = typer.Option(
        None, help="The image root for --annotations (default: the annotations file's folder)."
    ),
    stage: str = typer.Option("finetune", help="align or finetune: how samples are tokenized."),
    model: str = typer.Option(
        "cobra+3b",
        help="Preset or model directory whose tokenizer, prompt format and limits apply. A preset needs its "
        "tokenizer from the Hugging Face hub unless it is cached; offline, pass a local model directory.",
    ),
    decode: bool = typer.Option(True, help="Decode every image (slower, catches corrupt files)."),
) -> None:
    """Report every sample that cannot train (broken JSON, malformed turns, text that is not UTF-8, images
    missing, corrupt or outside the image root, over-long), with its id, and go on to the next; only an
    annotations file that cannot be parsed stops the check.

    Exit status:
    0: every sample can train;
    1: the data has problems (samples listed, or an annotations file that cannot be parsed);
    2: a usage or set-up error (bad options, a missing file, a model or tokenizer that cannot be loaded)."""
    from pathlib import Path

    from rich.markup import escape

    from mambavl.checkpoints.files import CheckpointError, HubUnavailable
    from mambavl.data import check_file, dataset_paths
    from mambavl.data.check import model_for_checking
    from mambavl.data.llava import AnnotationsError

    if dataset:
        if not data_root:
            raise typer.BadParameter("--dataset needs --data-root")
        try:
            ann, img_root = dataset_paths(dataset, data_root, stage)
        except (KeyError, ValueError) as e:
            raise typer.BadParameter(str(e).strip("'\"")) from e
    elif annotations:
        ann, img_root = Path(annotations), Path(images) if images else None
    else:
        raise typer.BadParameter("pass --dataset with --data-root, or --annotations")
    try:
        vlm = model_for_checking(model, stage)
    except HubUnavailable as e:
        _fail(e.instead(HUB_AVOIDED, needed_by=f"--model {model}"), code=2)
    except CheckpointError as e:
        _fail(e, code=2)
    try:
        good, problems = check_file(ann, img_root, vlm, stage, decode)
    except FileNotFoundError as e:
        _fail(e, code=2)
    except AnnotationsError as e:
        _fail(e, code=1)
    for problem in problems:  # escaped: ids and paths come from the file and may look like markup
        console.print(f"[yellow]{escape(str(problem))}[/yellow]", highlight=False, soft_wrap=True)
    summary = f"{ann}: {len(good)} usable samples, {len(problems)} with problems"
    console.print(summary, markup=False, highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)


# How a command that needs a preset's files from the hub does without them.
HUB_AVOIDED = (
    "Pass --model DIR, a local model directory, which needs nothing from the hub (a model saved by "
    "mambavl: a training run's model/ folder or `mambavl convert`'s output), or run once with network "
    "access to cache it."
)


def _fail(error: Exception, code: int) -> None:
    """Prints the error on one line (never wrapped: it is read by people and by scripts), then raises
    typer.Exit(code) (data check: 1 the data has problems, 2 a usage or set-up error)."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code) from error


def _lm_rows(cfg) -> list[tuple[str, str]]:
    mixers = {m: cfg.mixers.count(m) for m in dict.fromkeys(cfg.mixers)}
    ffns = {f: cfg.ffns.count(f) for f in dict.fromkeys(cfg.ffns) if f != "none"}
    return [
        ("family", cfg.family),
        ("layers", f"{cfg.n_layer}  " + ", ".join(f"{n}× {m}" for m, n in mixers.items())),
        ("feed-forward", ", ".join(f"{n}× {f}" for f, n in ffns.items()) or "none"),
        ("d_model / d_inner / d_state", f"{cfg.d_model} / {cfg.d_inner} / {cfg.d_state}"),
        ("vocab (embedding rows)", str(cfg.vocab_size)),
        ("tied head", str(cfg.tie_embeddings)),
    ]


def _vlm_rows(cfg) -> list[tuple[str, str]]:
    views = f", AnyRes over {len(cfg.anyres)} grids" if cfg.anyres else ""
    return [
        ("model", cfg.name),
        ("vision tower", f"{cfg.tower} ({cfg.resize}{views})"),
        ("projector", cfg.projector),
        ("prompt format", cfg.prompt_format),
        *_lm_rows(cfg.lm),
    ]


@app.command()
def info(
    model: str = typer.Argument(
        ...,
        help="A model directory (ours, a Cobra / ML-Mamba run, Viper's, or a language model's), a preset "
        "or a hub id; configs are read, not the weights.",
    ),
):
    """Describe a checkpoint: a VLM's parts (tower, projector, prompt format), its language model's layout,
    layers and sizes, and the parameter count."""
    from pathlib import Path

    import torch

    from mambavl.checkpoints.files import CheckpointError, read_json, resolve_model_dir
    from mambavl.checkpoints.vlm import read_config
    from mambavl.lm import LanguageModel
    from mambavl.lm.layouts import lm_config_from_json
    from mambavl.presets import PRESETS
    from mambavl.vlm.model import VLM

    try:
        where = model if model in PRESETS and not Path(model).is_dir() else resolve_model_dir(model)
        found = read_config(where)
        if found is None:  # a language model alone
            config = Path(where) / "config.json"
            lm, layout = lm_config_from_json(read_json(config), config)
    except CheckpointError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from e
    with torch.device("meta"):  # shapes only: no memory, no weights read
        if found is None:
            rows, params = _lm_rows(lm), LanguageModel(lm).num_parameters()
        else:
            vlm_cfg, layout = found
            rows, params = _vlm_rows(vlm_cfg), VLM(vlm_cfg).num_parameters()
    table = Table(title=str(where), show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for k, v in [("layout", layout), *rows, ("parameters", f"{params:,}")]:
        table.add_row(k, v)
    print_table(table)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def train(
    model: str = typer.Option(
        None, help="Preset (random init, or --from-parts), model dir, run dir or hub id."
    ),
    stage: str = typer.Option(None, help="align (projector), finetune (projector + LM) or full (all)."),
    dataset: str = typer.Option(None, help="Registered dataset id, e.g. llava-v15, llava-lvis4v-lrv."),
    data_root: str = typer.Option(None, help="Directory holding the registered dataset's download/..."),
    data: list[str] = typer.Option(None, help="ANNOTATIONS[:IMAGE_ROOT[:WEIGHT]] (repeatable: a mixture)."),  # noqa: B008
    run_dir: str = typer.Option(None, help="Run directory (default: RUN_ROOT_DIR/RUN_ID)."),
    run_root_dir: str = typer.Option("runs", help="Where run directories go."),
    run_id: str = typer.Option(None, help="Run name (default as Cobra: [dataset+]model+stage-S+xSEED)."),
    config: str = typer.Option(None, help="JSON / TOML file of options; flags given here override it."),
    epochs: int = typer.Option(None, help="Epochs (stage default: align 1, finetune 2)."),
    max_steps: int = typer.Option(None, help="Stop after this many optimizer steps."),
    global_batch_size: int = typer.Option(None, help="Samples per optimizer step, over all processes."),
    per_device_batch_size: int = typer.Option(None, help="Samples per forward pass per process."),
    learning_rate: float = typer.Option(None, help="Peak learning rate (align 1e-3, finetune 2e-5)."),
    weight_decay: float = typer.Option(None, help="AdamW weight decay (align 0, finetune 0.1)."),
    max_grad_norm: float = typer.Option(None, help="Gradient clipping norm (1.0)."),
    warmup_ratio: float = typer.Option(None, help="Warmup steps as a fraction of all steps (0.03)."),
    resize_strategy: str = typer.Option(None, help="resize-naive, resize-crop or letterbox."),
    seed: int = typer.Option(None, help="Random seed (7)."),
    lora_rank: int = typer.Option(None, help="Train LoRA adapters of this rank instead of the whole LM."),
    train_vision: bool = typer.Option(None, "--train-vision", help="Unfreeze the vision tower."),
    train_lm: bool = typer.Option(None, "--train-lm", help="Align: train the LM too (random-init LMs)."),
    precision: str = typer.Option(None, help="auto (bf16 on GPUs), bf16 or fp32."),
    gradient_checkpointing: bool = typer.Option(
        None,
        help="Recompute LM blocks in backward (default: off on one GPU, turned on if a step runs out of "
        "memory; on otherwise).",
    ),
    skip_bad: bool = typer.Option(
        None,
        "--skip-bad",
        help="Train without unusable samples, images that fail to load mid-run included (listed in "
        "RUN_DIR/skipped.jsonl).",
    ),
    verify_images: bool = typer.Option(None, "--verify-images", help="Decode every image before training."),
    num_workers: int = typer.Option(None, help="Data loader worker processes."),
    save_every: int = typer.Option(None, help="Checkpoint every N steps (and at each epoch's end)."),
    resume: bool = typer.Option(None, "--resume", help="Continue the run in the run directory."),
    report_to: list[str] = typer.Option(  # noqa: B008
        None,
        "--report-to",
        help="Also log to wandb and/or tensorboard (repeatable or comma-separated; files in the run dir).",
    ),
    from_parts: bool = typer.Option(
        False, "--from-parts", help="Preset with pretrained tower(s) and LM (as the seeds start)."
    ),
    profile_step: int = typer.Option(
        None, help="Profile this step (from 1) by kernel into RUN_DIR/profile.txt (where its time goes)."
    ),
    compile_vision: bool = typer.Option(
        None,
        "--compile-vision/--no-compile-vision",
        help="Run the frozen vision tower through torch.compile (default: on GPUs).",
    ),
    adamw_kernels: str = typer.Option(
        None,
        "--adamw-kernels",
        help="AdamW kernels on GPUs: torch (its fused AdamW; default) or triton (one launch for all).",
    ),
) -> None:
    """Train a VLM stage (as Cobra's scripts/pretrain.py). Run under torchrun for several processes."""
    from pathlib import Path

    from mambavl.checkpoints.files import HubUnavailable
    from mambavl.data.mixture import DataError
    from mambavl.train import RunDirError, TrainConfig, read_config_file
    from mambavl.train import train as run
    from mambavl.train.checkpoint import CheckpointSaveError

    options = read_config_file(config) if config else {}
    given = dict(
        model=model,
        stage=stage,
        dataset=dataset,
        data_root=data_root,
        data=tuple(data) if data else None,
        epochs=epochs,
        max_steps=max_steps,
        global_batch_size=global_batch_size,
        per_device_batch_size=per_device_batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        warmup_ratio=warmup_ratio,
        resize=resize_strategy,
        seed=seed,
        train_vision=train_vision,
        train_lm=train_lm,
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
        skip_bad=skip_bad,
        verify_images=verify_images,
        num_workers=num_workers,
        save_every=save_every,
        resume=resume,
        report_to=tuple(report_to) if report_to else None,
        profile_step=profile_step,
        compile_vision=compile_vision,
        adamw_kernels=adamw_kernels,
    )
    options |= {k: v for k, v in given.items() if v is not None}
    if lora_rank is not None:
        options["lora"] = dict(options.get("lora") or {}) | {"rank": lora_rank, "alpha": 2 * lora_rank}
    if not options.get("model"):
        raise typer.BadParameter("--model is required (here or in --config)")
    options.setdefault("stage", "finetune")
    options.setdefault("seed", 7)
    if run_dir is None and "run_dir" not in options:
        name = run_id or "+".join(
            p
            for p in (
                options.get("dataset") if options.get("dataset") not in (None, "llava-v15") else None,
                Path(options["model"]).name,
                f"stage-{options['stage']}",
                f"x{options['seed']}",
            )
            if p
        )
        run_dir = str(Path(run_root_dir) / name)
    if run_dir is not None:
        options["run_dir"] = run_dir
    try:
        cfg = TrainConfig.from_dict(options)
        run(cfg, console=console, from_parts=from_parts)
    except HubUnavailable as e:
        _fail(e.instead(HUB_AVOIDED, needed_by=f"--model {options['model']}"), code=1)
    except (DataError, RunDirError, ValueError, FileNotFoundError, CheckpointSaveError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from e


@app.command()
def demo(
    out: str = typer.Option("mambavl-demo", help="Directory for the data, runs, model/ and report.json."),
    preset: str = typer.Option(None, help="The tiny preset to train (default: the demo's own choice)."),
    finetune_steps: int = typer.Option(None, help="Finetune steps (fewer: faster, less accurate)."),
    blind: bool = typer.Option(True, help="Also train the blind baseline (images blanked)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out directory."),
    seed: int = typer.Option(0, help="Seed of the data and the training."),
) -> None:
    """Offline end-to-end run: synthetic shapes VQA data, a tiny model trained on the CPU through both
    stages, held-out accuracy against a blind baseline, the model saved for every other command."""
    from pathlib import Path

    from mambavl.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=Path(out), blind=blind, overwrite=overwrite, seed=seed)
    if preset is not None:
        cfg = DemoConfig(**{**cfg.__dict__, "preset": preset})
    if finetune_steps is not None:
        cfg = DemoConfig(**{**cfg.__dict__, "finetune_steps": finetune_steps})
    try:
        run_demo(cfg, console)
    except FileExistsError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from e


SYSTEM_HELP = (
    "System prompt. Where the model's prompt format has a system slot (chat-template models such as Viper) "
    "it goes there; where it has none (Cobra, ML-Mamba) it is folded into the first message as "
    "'{system}\\n\\n{message}'."
)


@app.command()
def chat(
    model: str = typer.Option(
        ..., help="Model directory (ours, a Cobra / ML-Mamba run dir) or a preset with released weights."
    ),
    image: str = typer.Option(None, help="The image to talk about (/image PATH changes it)."),
    system: str = typer.Option(None, help=SYSTEM_HELP),
    max_new_tokens: int = typer.Option(None, help="Longest answer in tokens (256)."),
    temperature: float = typer.Option(None, help="Sampling temperature (1.0)."),
    top_p: float = typer.Option(None, help="Nucleus sampling mass (1.0: off)."),
    do_sample: bool = typer.Option(None, "--do-sample/--no-do-sample", help="Sample instead of greedy."),
    seed: int = typer.Option(None, help="Seed of the sampling: each answer is drawn from it."),
    device: str = typer.Option("auto", help="auto (cuda when there is one), cpu, cuda or cuda:N."),
    dtype: str = typer.Option(
        "auto", help="auto (bfloat16 on cuda, float32 on cpu), bfloat16, float16, float32."
    ),
) -> None:
    """Chat about an image in the terminal; answers stream as they are generated, /help lists the commands."""
    import contextlib

    from mambavl.chat import ChatSession, run_chat
    from mambavl.checkpoints.files import CheckpointError
    from mambavl.runtime import load_model

    given = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, do_sample=do_sample, seed=seed
    )
    try:
        vlm = load_model(model, device, dtype)
        session = ChatSession(vlm, system, {k: v for k, v in given.items() if v is not None})
        if image:
            session.set_image(image)
    except (CheckpointError, FileNotFoundError, ValueError) as e:  # ValueError: bad settings or image
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from e
    with contextlib.suppress(ImportError):  # line editing and history at the prompt, where Python has it
        import readline  # noqa: F401
    run_chat(session, console, lambda: console.input("[bold]you>[/bold] "))


@app.command()
def generate(
    prompt: str = typer.Argument(
        ..., help="The question or instruction (wrapped in the model's chat format)."
    ),
    model: str = typer.Option(
        ..., "--model", help="Model directory, run directory or preset (released weights)."
    ),
    image: str = typer.Option(None, help="The image (a path); none: text only."),
    system: str = typer.Option(None, help=SYSTEM_HELP),
    max_new_tokens: int = typer.Option(256, help="Longest answer in tokens."),
    temperature: float = typer.Option(0.0, help="0: greedy (the seeds' default); > 0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1.0: off)."),
    seed: int = typer.Option(None, help="Seed of the sampling."),
    raw: bool = typer.Option(False, "--raw", help="Send PROMPT as it is, without the chat format."),
    device: str = typer.Option("auto", help="auto (a GPU if there is one), cpu or cuda[:N]."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPUs, fp32 on CPUs), bfloat16, float16, float32."),
) -> None:
    """One answer, streamed to standard output: a script's one-liner (`mambavl chat` for a conversation)."""
    from mambavl.checkpoints.files import CheckpointError
    from mambavl.runtime import load_model
    from mambavl.vision import load_image

    try:
        vlm = load_model(model, device, dtype)
        picture = load_image(image, vlm.config.max_pixels) if image else None
        text = prompt
        if not raw:
            if picture is not None and vlm.config.image_placement == "placeholder" and "<image>" not in text:
                text = "<image>\n" + text
            builder = vlm.get_prompt_builder(system)
            builder.add_turn("human", text)
            text = builder.get_prompt()
        params = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, seed=seed, top_p=top_p)
        if temperature > 0:
            params["temperature"] = temperature
        pieces = vlm.stream(picture, text, **params)
        first = True
        for piece in pieces:
            if first:  # as `generate` strips its answer
                piece = piece.lstrip()
                first = not piece
            typer.echo(piece, nl=False)
        typer.echo()
    except (CheckpointError, FileNotFoundError, ValueError) as e:  # ValueError: bad image or settings
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from e


def _int_list(text: str, what: str, minimum: int = 1) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise typer.BadParameter(f"{what} must be integers ≥ {minimum}, got {text!r}")
    return values


@app.command()
def bench(
    model: str = typer.Option(
        "cobra+3b", "--model", help="A preset, built at full size with random weights."
    ),
    out: str = typer.Option(
        "bench", help="Directory for bench.json and bench.png (train.json with --train)."
    ),
    peers: str = typer.Option(
        "hf-mamba,gpt-neox,mamba-ssm",
        help="Peers measured in the same run, comma-separated, or 'none' (--train: hf-mamba, mamba-ssm).",
    ),
    prefill_lengths: str = typer.Option("1024,4096,16384,65536,131072", help="Our prefill prompt lengths."),
    peer_prefill_lengths: str = typer.Option("800,1024,4096,16384,65536", help="The peers' prompt lengths."),
    decode_batches: str = typer.Option("1,8,64", help="Decode batch sizes."),
    decode_tokens: int = typer.Option(256, help="Tokens decoded per measurement."),
    ttft_tokens: int = typer.Option(
        800, help="Prompt tokens after the image in the time-to-first-token run."
    ),
    dtype: str = typer.Option("bfloat16", help="bfloat16, float16 or float32."),
    device: str = typer.Option("cuda", help="Device (the targets are for a CUDA GPU)."),
    profile: bool = typer.Option(
        True,
        help="Also profile one prefill and a few decode steps by kernel (--train: one more step; --serve: "
        "the last load once more, the engine thread's phases and the GPU's kernels).",
    ),
    train: bool = typer.Option(False, "--train", help="Measure a finetune step (tokens/s, MFU) instead."),
    steps: int = typer.Option(5, help="--train: steps (the first is warm-up)."),
    batch: int = typer.Option(8, help="--train: rows per step."),
    checkpointing: str = typer.Option("both", help="--train: gradient checkpointing on, off, both or none."),
    compile_vision: bool = typer.Option(
        None,
        "--compile-vision/--no-compile-vision",
        help="--train: ours runs its frozen vision tower through torch.compile (default: on GPUs).",
    ),
    adamw_kernels: str = typer.Option(
        "torch", "--adamw-kernels", help="--train: ours' AdamW kernels, torch (fused) or triton."
    ),
    kernels: bool = typer.Option(
        False,
        "--kernels",
        help="Time the decode-step kernels against what they replace instead (with --train: the training "
        "kernels, forward and backward).",
    ),
    sweep: bool = typer.Option(False, "--sweep", help="--kernels: also time every candidate tile."),
    sweep_seconds: float = typer.Option(
        180.0,
        help="--kernels --train --sweep: seconds for the training scan's tile sweep (prefill's: a third).",
    ),
    sweep_only: bool = typer.Option(
        False, "--sweep-only", help="--kernels --train --sweep: the Mamba-1 scan's tile sweeps alone."
    ),
    equality: bool = typer.Option(
        False,
        "--equality",
        help="--train: train the preset with the torch and then the triton backend from the same seed and "
        "compare one step's fp32 gradients and the loss curves (--steps 100 --model tiny-cobra, say).",
    ),
    serve: bool = typer.Option(
        False, "--serve", help="Load the HTTP server with concurrent streaming clients instead."
    ),
    clients: str = typer.Option("1,8,64", help="--serve: concurrent client counts."),
    requests_per_client: int = typer.Option(2, help="--serve: requests each client sends in turn."),
    max_tokens: int = typer.Option(128, help="--serve: tokens every request generates."),
    slots: int = typer.Option(64, help="--serve: the server's state slots."),
    turns: int = typer.Option(
        1,
        min=1,
        help="--serve: conversations of this many turns about one image per client (each turn sends the "
        "history), with the prefix-state cache on and then off.",
    ),
    prefill_tokens: str = typer.Option(
        "",
        help="--serve: the engine's prefill budgets (positions per engine step; 0: each admitted batch at "
        "once), comma-separated, measured one after another (default: the engine's).",
    ),
    prefill_batch: int = typer.Option(
        0, min=0, help="--serve: waiting requests the engine prefills together (0: the engine's default)."
    ),
    torch_threads: int = typer.Option(
        0,
        min=0,
        help="--serve: CPU threads torch's operators use (0: torch's default, one a core). The request "
        "workers' image transforms run on them beside the engine's thread.",
    ),
    serve_temperature: float = typer.Option(
        0.0,
        "--temperature",
        min=0.0,
        max=2.0,
        help="--serve: 0 answers greedily; > 0 samples every request at this temperature (the offline "
        "batch too).",
    ),
) -> None:
    """Speed and memory of a preset against its peers in one run: time to first token, prefill tok/s by
    prompt length, decode tok/s by batch size, peak memory by prompt length; JSON, PNG and a table."""
    from pathlib import Path

    from mambavl.bench.run import PEERS, BenchConfig
    from mambavl.bench.run import run as run_bench
    from mambavl.presets import PRESETS

    if serve:
        budgets = _int_list(prefill_tokens, "--prefill-tokens", minimum=0) if prefill_tokens else ()
        _bench_serve(
            model, Path(out), device, dtype, clients, requests_per_client, max_tokens, slots, turns, budgets,
            prefill_batch or None, profile, serve_temperature, torch_threads,
        )  # fmt: skip
        return
    if model not in PRESETS:
        console.print(f"[red]error:[/red] unknown preset {model!r}: choose one of {', '.join(PRESETS)}")
        raise typer.Exit(1)
    chosen = () if peers.strip() == "none" else tuple(p.strip() for p in peers.split(",") if p.strip())
    try:
        if equality:
            if not train:
                raise typer.BadParameter("--equality measures training: add --train")
            from mambavl.bench.equality import run_equality

            run_equality(model, Path(out), steps, batch, device, say=console.print)
            console.print(f"wrote {Path(out) / 'equality.json'}")
            return
        if kernels and train:
            from mambavl.bench.train_kernels import run_train_kernels

            run_train_kernels(
                model,
                Path(out),
                batch,
                say=console.print,
                sweep=sweep,
                sweep_s=sweep_seconds,
                ops=not sweep_only,
            )
            console.print(f"wrote {Path(out) / 'train_kernels.json'}")
            return
        if kernels:
            from mambavl.bench.kernels import run_kernels

            run_kernels(model, Path(out), dtype, sweep, say=console.print)
            console.print(f"wrote {Path(out) / 'kernels.json'}")
            return
        if train:
            from mambavl.bench.train import run_train

            run_train(
                model,
                Path(out),
                steps,
                batch,
                checkpointing,
                peers=chosen,
                say=console.print,
                device=device,
                profile=profile,
                compile_vision="auto" if compile_vision is None else compile_vision,
                adamw_kernels=adamw_kernels,
            )
            console.print(f"wrote {Path(out) / 'train.json'}")
            return
        cfg = BenchConfig(
            preset=model,
            out=Path(out),
            dtype=dtype,
            device=device,
            ttft_tokens=ttft_tokens,
            prefill_lengths=_int_list(prefill_lengths, "--prefill-lengths"),
            decode_batches=_int_list(decode_batches, "--decode-batches"),
            decode_tokens=decode_tokens,
            peers=chosen,
            peer_prefill_lengths=_int_list(peer_prefill_lengths, "--peer-prefill-lengths"),
            profile=profile,
        )
        run_bench(cfg, console)
    except (ValueError, RuntimeError) as e:
        console.print(f"[red]error:[/red] {e} (peers: {', '.join(PEERS)})", highlight=False)
        raise typer.Exit(1) from e
    console.print(f"wrote {Path(out) / 'bench.json'} and {Path(out) / 'bench.png'}")


def _bench_serve(
    model, out, device, dtype, clients, requests_per_client, max_tokens, slots, turns=1, budgets=(),
    prefill_batch=None, profile=False, temperature=0.0, torch_threads=0,
) -> None:  # fmt: skip
    """`mambavl bench --serve`: a preset (full size, random weights) or a model directory, served in this
    process and loaded over HTTP at each client count, beside `VLM.generate` on the same requests."""
    from mambavl.bench.serve import ServeBenchConfig, serve_bench
    from mambavl.checkpoints.files import CheckpointError
    from mambavl.presets import PRESETS
    from mambavl.runtime import load_model

    try:
        cfg = ServeBenchConfig(
            clients=_int_list(clients, "--clients"),
            requests_per_client=requests_per_client,
            max_tokens=max_tokens,
            slots=slots,
            turns=turns,
            prefill_tokens=tuple(budgets),
            prefill_batch=prefill_batch,
            profile=profile,
            temperature=temperature,
            torch_threads=torch_threads,
        )
        vlm = load_model(model, device, dtype, random_weights=model in PRESETS, log=console.print)
        serve_bench(vlm, cfg, out, say=console.print)
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from e
    console.print(f"wrote {out / 'serve.json'}")


eval_app = typer.Typer(help="Evaluate on the standard VLM benchmarks (local copies of the official files).")
app.add_typer(eval_app, name="eval")


@eval_app.callback(invoke_without_command=True)
def eval_run(
    ctx: typer.Context,
    model: str = typer.Option(
        None, "--model", help="Model directory, run directory or preset (released weights)."
    ),
    benchmark: str = typer.Option(None, help="Benchmark names, comma-separated (`mambavl eval list`)."),
    data_root: str = typer.Option(None, help="The directory holding the benchmarks' files."),
    out: str = typer.Option(
        None,
        help="Run directory; a rerun with the same model and options resumes there (default: one per "
        "model and mode, evals/<benchmarks>-<model>-<fingerprint>-<mode>).",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start --out over when it holds another model's or other options' run."
    ),
    limit: int = typer.Option(None, help="Only the first N samples of each benchmark."),
    batch_size: int = typer.Option(8, help="Samples generated together."),
    mode: str = typer.Option("generate", help="generate, or probability (first-token option probabilities)."),
    max_new_tokens: int = typer.Option(None, help="Override the benchmarks' answer lengths."),
    device: str = typer.Option("auto", help="auto (a GPU if there is one), cpu or cuda[:N]."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPUs, fp32 on CPUs), bfloat16, float16, float32."),
) -> None:
    """Evaluate a model: batched, resumable (per-sample JSON lines), results.json and results.md."""
    if ctx.invoked_subcommand is not None:
        return
    from pathlib import Path

    from mambavl.checkpoints.files import CheckpointError
    from mambavl.eval import BenchmarkError
    from mambavl.eval.runner import EvalConfig, evaluate, markdown, read_benchmarks
    from mambavl.runtime import load_model

    if not (model and benchmark and data_root):
        raise typer.BadParameter(
            "--model, --benchmark and --data-root are needed (or a subcommand: list, report)"
        )
    try:
        cfg = EvalConfig(
            benchmarks=tuple(b.strip() for b in benchmark.split(",") if b.strip()),
            data_root=Path(data_root),
            out=Path(out) if out else None,
            limit=limit,
            batch_size=batch_size,
            mode=mode,
            max_new_tokens=max_new_tokens,
        )
        work = read_benchmarks(cfg)  # the data is checked before the model loads and any bar is drawn
        vlm = load_model(model, device, dtype)
        summary = evaluate(vlm, cfg, model, console, work=work, overwrite=overwrite)
    except (BenchmarkError, CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from e
    console.print(markdown([summary]), markup=False, highlight=False)
    out_dir = Path(summary["out"])
    console.print(
        f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}", highlight=False, soft_wrap=True
    )


@eval_app.command("list")
def eval_list() -> None:
    """The benchmarks and the files each reads under --data-root."""
    from mambavl.eval.base import BENCHMARKS, get_benchmark

    get_benchmark("shapes")  # fills the registry
    table = Table(title="benchmarks")
    for col in ("name", "what", "files under --data-root"):
        table.add_column(col)
    for name, b in sorted(BENCHMARKS.items()):
        table.add_row(name, b.description, ", ".join(b.files))
    print_table(table)


@eval_app.command("report")
def eval_report(
    runs: list[str] = typer.Argument(..., help="Run directories written by `mambavl eval`."),  # noqa: B008
    png: str = typer.Option("eval-report.png", help="Where the bar chart goes."),
) -> None:
    """Several runs side by side: a markdown table, and a PNG bar chart."""
    from pathlib import Path

    from mambavl.eval import BenchmarkError
    from mambavl.eval.report import report

    try:
        table = report([Path(r) for r in runs], Path(png))
    except BenchmarkError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from e
    console.print(table, markup=False, highlight=False)
    console.print(f"wrote {png}")


@app.command()
def serve(
    model: str = typer.Option(..., "--model", help="Model dir, run dir or preset (released weights)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on."),
    slots: int = typer.Option(64, help="Sequences decoded together (one fixed-size state each)."),
    max_queue: int = typer.Option(1024, help="Requests waiting for a slot before new ones get a 503."),
    timeout: float = typer.Option(600.0, help="Seconds a request may take, queue included (0: no limit)."),
    max_tokens: int = typer.Option(2048, help="The most tokens a request may ask for."),
    default_max_tokens: int = typer.Option(256, help="Tokens generated when a request sets no max_tokens."),
    max_body_mb: float = typer.Option(16.0, help="Largest request body, in MiB."),
    max_image_pixels: int = typer.Option(16_000_000, help="Largest image, in pixels."),
    api_key: str = typer.Option(
        None, envvar="MAMBAVL_API_KEY", help="Require `Authorization: Bearer KEY` on /v1."
    ),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images", help="Fetch http(s) images."),
    image_host: list[str] = typer.Option(  # noqa: B008
        None, help="Remote images only from these hosts (repeatable); still public addresses only."
    ),
    allow_private_image_hosts: bool = typer.Option(
        False,
        "--allow-private-image-hosts",
        help="With --allow-remote-images: also fetch from loopback, private, link-local and other "
        "non-public addresses (by default a URL cannot make the server reach into its own network).",
    ),
    image_fetch_timeout: float = typer.Option(
        10.0, help="Seconds a remote image may take in all (DNS, connecting, every byte)."
    ),
    header_timeout: float = typer.Option(
        10.0, help="Seconds a client has to send a request's headers; slower connections are closed."
    ),
    body_timeout: float = typer.Option(
        30.0, help="Seconds a client has to send a request's body once its headers are in (else 408)."
    ),
    keep_alive_timeout: float = typer.Option(5.0, help="Seconds an idle keep-alive connection stays open."),
    max_connections: int = typer.Option(
        1000, help="Open connections at most; more are answered 503. Keep it under `ulimit -n`."
    ),
    image_dir: str = typer.Option(None, help="Accept local image paths and file:// URLs inside this dir."),
    image_cache_mb: float = typer.Option(
        256.0,
        min=0.0,
        help="MiB of prepared images kept by their bytes: a conversation's later turns, which send the "
        "same image again, skip decoding and transforming it (0: none).",
    ),
    name: str = typer.Option(None, help="The model id the API reports (default: the --model argument)."),
    system_messages: str = typer.Option(
        "fold",
        metavar="fold|refuse",
        help="System and developer messages where the model's prompt format has no system slot (Cobra, "
        "ML-Mamba), and any after the first user message: 'fold' puts their text before the next user "
        "message as '{system}\\n\\n{message}'; 'refuse' answers such requests with a 400.",
    ),
    device: str = typer.Option("auto", help="auto (a GPU if there is one), cpu or cuda[:N]."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPUs, fp32 on CPUs), bfloat16, float16, float32."),
    cuda_graphs: bool = typer.Option(True, help="Decode through CUDA graphs where the model allows it."),
    prefix_cache_gb: float = typer.Option(
        4.0,
        min=0.0,
        help="GiB of exact prefix-state snapshots kept on the model's device (after each image, prompt and "
        "answer): a request that starts with a cached prefix prefills only the rest.",
    ),
    prefix_cache_host_gb: float = typer.Option(
        0.0, min=0.0, help="GiB of host memory for snapshots evicted from the device's share (0: none)."
    ),
    no_prefix_cache: bool = typer.Option(False, "--no-prefix-cache", help="Turn the prefix-state cache off."),
    prefill_tokens: int | None = typer.Option(
        None,
        min=0,
        help="Prompt positions prefilled per engine step beside one decode step of the live streams: "
        "shorter pauses in the streams, fewer tokens/s under a burst (0, the default: each admitted batch at "
        "once, the streams waiting meanwhile).",
    ),
    prefill_batch: int | None = typer.Option(
        None,
        min=1,
        help="Waiting requests prefilled together, their images in one tower batch (default: the engine's).",
    ),
    random_weights: bool = typer.Option(
        False, "--random-weights", help="A preset at full size with random weights (nothing downloaded)."
    ),
    torch_threads: int = typer.Option(
        0,
        min=0,
        help="CPU threads torch's operators use in this process (0: torch's default, one a core). A model on "
        "a GPU does little CPU math (the image transforms of the request workers); fewer threads keep them "
        "from crowding the engine's thread.",
    ),
) -> None:
    """Serve a model over HTTP: OpenAI-compatible /v1/chat/completions (streaming too), /v1/models,
    /health, /metrics and a web chat page at /, with continuous batching over state slots."""
    from pathlib import Path

    from mambavl.checkpoints.files import CheckpointError
    from mambavl.runtime import load_model
    from mambavl.serve import Engine, EngineConfig, ImagePolicy, ServeConfig, create_app
    from mambavl.serve.connections import ConnectionLimits, uvicorn_config

    listener = None
    try:
        # The port first: a busy one is reported before minutes of loading, and nothing says "serving" yet.
        listener = _bind(host, port)
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        if image_dir is not None and not Path(image_dir).is_dir():
            raise ValueError(f"--image-dir {image_dir}: no such directory")
        images = ImagePolicy(
            max_bytes=int(max_body_mb * 2**20),
            max_pixels=max_image_pixels,
            allow_remote=allow_remote_images,
            remote_hosts=tuple(image_host or ()),
            allow_private_hosts=allow_private_image_hosts,
            local_dir=Path(image_dir) if image_dir else None,
            fetch_timeout=image_fetch_timeout,
        )
        config = ServeConfig(
            model_name=name or model,
            api_key=api_key or None,
            max_body_bytes=int(max_body_mb * 2**20),
            default_max_tokens=default_max_tokens,
            max_tokens=max_tokens,
            images=images,
            image_cache_mb=image_cache_mb,
            system_messages=system_messages,
            connections=ConnectionLimits(
                header_timeout=header_timeout,
                body_timeout=body_timeout,
                keep_alive_timeout=keep_alive_timeout,
                max_connections=max_connections,
            ),
        )
        prefill = {} if prefill_tokens is None else {"prefill_tokens": prefill_tokens or None}
        if prefill_batch is not None:
            prefill["prefill_batch"] = prefill_batch
        engine_config = EngineConfig(
            **prefill,
            slots=slots,
            max_queue=max_queue,
            timeout=timeout or None,
            cuda_graphs=cuda_graphs,
            prefix_cache_gb=0.0 if no_prefix_cache else prefix_cache_gb,
            prefix_cache_host_gb=0.0 if no_prefix_cache else prefix_cache_host_gb,
        )
        console.print(f"loading {model} ...")
        vlm = load_model(model, device, dtype, random_weights, log=console.print)
        engine = Engine(vlm, engine_config)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        if listener is not None:
            listener.close()
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from e
    where = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    ready = f"serving {config.model_name} on {where} ({slots} slots, {vlm.device}, {vlm.dtype})"
    api = create_app(engine, config)
    options = uvicorn_config(api, config.connections, engine.metrics, host=host, port=port, log_level="info")
    _announcing_server(options, ready).run(sockets=[listener])


def _bind(host: str, port: int):
    """A socket bound to (host, port) for the server to listen on, or a ValueError saying what to change."""
    import errno
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a restart can reuse it
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = {
            errno.EADDRINUSE: f"port {port} on {host} is in use by another program: stop it, or pick another "
            "port with --port",
            errno.EACCES: f"port {port} needs privileges to listen on: pick a port above 1023 with --port",
            errno.EADDRNOTAVAIL: f"--host {host} is not an address of this machine: use 127.0.0.1 (this "
            "machine only) or 0.0.0.0 (every interface)",
        }.get(e.errno, f"cannot listen on {host}:{port} ({e.strerror or e}): check --host and --port")
        raise ValueError(why) from e
    return sock


def _announcing_server(config, ready: str):
    """uvicorn's server, printing `ready` once it accepts connections (the engine started, the port open)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            console.print(ready, markup=False, highlight=False, soft_wrap=True)

    return Server(config)


if __name__ == "__main__":
    app()
