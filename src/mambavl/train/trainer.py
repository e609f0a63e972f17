"""The training loop: one code path for 1…N processes (see `train.distributed`).

Per optimizer step, the global batch (the same for any process count, see `data.batching`) is split into
micro-batches; each process runs its own, and every micro-batch's summed loss is divided by the number
of learned tokens in the *whole global batch*. The gradient is then the token-weighted mean over the
global batch however it is split — Cobra's intent (it weights by tokens since 2024-08), exact across
processes too. A sample whose image fails to load at batch time stops the run, or with `skip_bad` learns
nothing and the step's gradient is divided by the tokens actually learned (`_renormalise`). bf16 runs
under autocast with fp32 master weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from safetensors import SafetensorError

from mambavl.data.batching import micro_batches, plan_epoch
from mambavl.data.collate import BadImage, TrainDataset, collate
from mambavl.data.mixture import DataError, DataSource, TrainingData, load_training_data, registry_sources
from mambavl.train import checkpoint
from mambavl.train.config import TrainConfig
from mambavl.train.distributed import World, setup, shard
from mambavl.train.metrics import MetricsLog, plot_loss, progress_bar, read_metrics
from mambavl.train.profile import profiled
from mambavl.train.recipe import (
    checkpointing_at_start,
    clip_and_step,
    configure_trainable,
    merge_lora,
    optimizer,
    scheduler,
)
from mambavl.train.trackers import STATE_FILE, TENSORBOARD_DIR, Trackers
from mambavl.train.trackers import check as check_trackers
from mambavl.vision.compiled import compile_frozen
from mambavl.vlm.sequence import IGNORE_INDEX

# Options a resumed run may change; any other difference from the saved config is refused. The run dir
# itself may differ: a run moved, copied or downloaded elsewhere resumes where it now is. skip_bad may be
# turned on to get past an image that stopped the run: the run so far skipped nothing (it would have
# stopped), so it is what a run with skip_bad from the start did up to there. (Turned off, the first
# unusable sample stops the run again: nothing diverges silently.)
RESUMABLE_CHANGES = {
    "resume",
    "run_dir",
    "skip_bad",
    "progress",
    "num_workers",
    "log_every",
    "save_every",
    "keep_checkpoints",
    "report_to",
    "save_final",
    "profile_step",
    "gradient_checkpointing",  # recomputation gives the same gradients: a run may switch it either way
    # how a step runs, not what it computes (the results agree to rounding): either way too
    "compile_vision",
    "adamw_kernels",
}


class RunDirError(ValueError):
    """The run directory cannot be used as asked (it holds another run, or its config differs)."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    model_dir: Path | None  # the trained model, in mambavl's layout
    skipped: int  # samples left out (listed in run_dir/skipped.jsonl)


def build_model(source: str, seed: int, resize: str | None = None, from_parts: bool = False):
    """A preset (random weights from `seed`, or with `from_parts` its pretrained tower and LM), or any
    model `mambavl.load` reads."""
    from mambavl.checkpoints.vlm import load
    from mambavl.presets import PRESETS
    from mambavl.vlm.model import create_from_parts
    from mambavl.vlm.tokenizer import load_tokenizer

    if source in PRESETS:
        config = PRESETS[source] if resize is None else replace(PRESETS[source], resize=resize)
        # the tokenizer first: the one part a preset may need from the hub, so that offline it fails at
        # once, before gigabytes of weights are built
        tokenizer = load_tokenizer(config.tokenizer, config.eos_token)
        if from_parts:
            vlm = create_from_parts(config)
            vlm.tokenizer = tokenizer
            return vlm
        from mambavl.vlm.model import VLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return VLM(config, tokenizer=tokenizer)
    vlm = load(source)
    if resize is not None:
        vlm.config = replace(vlm.config, resize=resize)
        vlm.image_transform = vlm.vision.transform(resize)
    return vlm


def data_sources(cfg: TrainConfig) -> list[DataSource]:
    sources = [DataSource.parse(s) for s in cfg.data]
    if cfg.dataset is not None:
        if cfg.data_root is None:
            raise ValueError(f"dataset {cfg.dataset!r} needs --data-root (where download/... lives)")
        sources = registry_sources(cfg.dataset, cfg.data_root, cfg.stage) + sources
    return sources


def learned_tokens(ex) -> int:
    """Tokens the loss is taken on: every learned label, except a text-first row's first token (nothing
    precedes it to predict it from). Image-first rows learn their first token from the image."""
    n = sum(label != IGNORE_INDEX for label in ex.labels)
    if ex.labels and ex.labels[0] != IGNORE_INDEX and (ex.image is None or ex.image_at > 0):
        n -= 1
    return n


# What a run writes in its directory; a run that stopped before its first step leaves only these.
RUN_FILES = (
    "config.json",
    "skipped.jsonl",
    "metrics.jsonl",
    "checkpoints",
    TENSORBOARD_DIR,
    "wandb",
    STATE_FILE,
)


def _started(run: Path) -> bool:
    """Whether the run in a run dir got anywhere: a step logged or a checkpoint (even a broken one) saved.
    One that did not (it failed on its first batch, say) has nothing to resume and nothing to lose."""
    metrics = run / "metrics.jsonl"
    if metrics.is_file() and read_metrics(metrics):
        return True
    saves = run / "checkpoints"
    return saves.is_dir() and any(not checkpoint.STALE.fullmatch(p.name) for p in saves.iterdir())


def _clear_run_files(run: Path) -> None:
    for name in RUN_FILES:
        path = run / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _prepare_run_dir(cfg: TrainConfig, world: World, say) -> Path | None:
    """Refuses a run dir that holds another run; on --resume, checks the config and finds the checkpoint.
    A run that stopped before its first step is no run to keep: the new one takes its directory over."""
    run = cfg.run_dir
    saved = run / "config.json"
    # Every rank looks before rank 0 writes, so all of them reach the same verdict.
    holds_run = saved.is_file()
    stillborn = holds_run and not _started(run)
    not_empty = run.is_dir() and any(run.iterdir())
    world.barrier()
    if stillborn:
        say(
            f"{run} holds a run that stopped before its first step (no step logged, no checkpoint): "
            "starting over in it with the options given"
        )
        if world.main:
            _clear_run_files(run)
    elif holds_run:
        if not cfg.resume:
            raise RunDirError(
                f"{run} already holds a run: pass --resume to continue it, or choose another --run-dir"
            )
        old = json.loads(saved.read_text())
        new = json.loads(json.dumps(cfg.to_dict()))
        changed = sorted(
            k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)
        )
        if changed:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
            raise RunDirError(f"{run}: cannot resume with different options ({diff})")
        return _resume_point(run / "checkpoints", world, say)
    elif not_empty:
        raise RunDirError(f"{run} is not empty but holds no run: choose an empty or new --run-dir")
    if world.main:
        run.mkdir(parents=True, exist_ok=True)
        tmp = run / "config.json.tmp"
        tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
        tmp.replace(saved)
    world.barrier()
    return None


def _resume_point(directory: Path, world: World, say) -> Path | None:
    """Rank 0 removes what interrupted saves left and picks the newest complete checkpoint; every rank
    then acts on its verdict (or its refusal), so all of them resume from the same step."""
    verdict: tuple[str | None, tuple[str, ...], str | None] = (None, (), None)
    if world.main:
        removed = checkpoint.clean_stale(directory)
        names = ", ".join(p.name for p in removed)
        cleaned = (f"removed what interrupted checkpoint saves left: {names}",) if removed else ()
        try:
            point = checkpoint.resume_point(directory)
            verdict = (str(point.path) if point.path else None, cleaned + point.notes, None)
        except checkpoint.ResumeError as e:
            verdict = (None, cleaned, str(e))
    path, notes, error = world.broadcast_object(verdict)
    for note in notes:
        say(note)
    if error is not None:
        raise checkpoint.ResumeError(error)
    return None if path is None else Path(path)


def train(
    cfg: TrainConfig,
    world: World | None = None,
    console: Console | None = None,
    from_parts: bool = False,
) -> TrainResult:
    cfg = cfg.resolved()
    check_trackers(cfg.report_to)  # a missing package is named now, not after the model is built
    world = world or setup()
    console = console or Console()
    say = console.print if world.main else (lambda *a, **k: None)
    precision = (
        cfg.precision if cfg.precision != "auto" else ("bf16" if world.device.type == "cuda" else "fp32")
    )

    vlm = build_model(cfg.model, cfg.seed, cfg.resize, from_parts)
    data = load_training_data(data_sources(cfg), vlm, cfg.stage, cfg.seed, cfg.skip_bad, cfg.verify_images)
    resume_from = _prepare_run_dir(cfg, world, say)  # after the model and data are known to be usable
    _report_problems(data, cfg.run_dir, world, say)
    bad_images = BadImages(cfg.run_dir / "skipped.jsonl", cfg.skip_bad, console.print)
    configure_trainable(vlm, cfg, checkpointing_at_start(cfg, world.device, world.size))
    # "auto" may still turn recomputation on, once, if a step runs out of GPU memory
    may_turn_on = cfg.gradient_checkpointing == "auto" and not vlm.lm.gradient_checkpointing
    frozen = not any(p.requires_grad for p in vlm.vision.parameters())
    if precision == "bf16" and frozen:
        vlm.vision.to(torch.bfloat16)  # frozen: no master copy needed (as the seeds do)
    vlm.to(world.device)
    vlm.train()
    vlm.vision.train(not frozen)
    if cfg.compiles_vision(world.device.type, frozen):
        compile_frozen(vlm.vision, warn=lambda text: say(f"[yellow]{text}[/yellow]"))
    model = shard(vlm, world)
    opt = optimizer(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]

    plan = plan_epoch(data.lengths, data.has_image, cfg.global_batch_size, cfg.seed, 0, cfg.group_by_length)
    steps_per_epoch = len(plan.batches)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    sched = scheduler(opt, cfg, total)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(
        f"[bold]{cfg.stage}[/bold] {cfg.model}: {len(data.examples):,} samples, "
        f"{steps_per_epoch} steps/epoch, "
        f"{total} steps, global batch {cfg.global_batch_size} ({cfg.per_device_batch_size}/device × "
        f"{world.size} processes × {cfg.global_batch_size // (cfg.per_device_batch_size * world.size)} "
        f"accumulation), {n_trainable:,} trainable parameters, {precision} on {world.device.type}"
    )
    if plan.repeated:
        say(f"{plan.repeated} samples repeat to fill the last global batch of the epoch")

    position = checkpoint.Position(0, 0, 0, 0, 0.0)
    if resume_from is not None:
        position = checkpoint.load(resume_from, model, opt, sched, world)
        say(f"resumed from {resume_from} (step {position.step}, epoch {position.epoch})")
    log = MetricsLog(cfg.run_dir / "metrics.jsonl", position.step) if world.main else None

    dataset = TrainDataset(
        data.examples,
        vlm.image_transform,
        vlm.images_vary,
        vlm.config.max_pixels,
        cfg.blank_images,
        cfg.cache_images,
    )
    tokens_of = [learned_tokens(ex) for ex in data.examples]
    autocast = (
        torch.autocast(world.device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    progress = progress_bar(console) if (world.main and cfg.progress) else None
    task = (
        progress.add_task(cfg.stage, total=total, completed=position.step, loss="-", tps="-")
        if progress
        else None
    )
    tracked = (  # rank 0 reports
        Trackers.open(cfg.report_to, cfg.run_dir, cfg.to_dict(), position.step)
        if world.main and cfg.report_to
        else Trackers()
    )
    step, epoch, loss_value = position.step, position.epoch, math.nan
    tokens_seen, elapsed = position.tokens, position.elapsed_s
    start_batch = position.batch_in_epoch
    last_done = 0.0  # when the host last saw a step finish (perf_counter)

    def finish(q: _Queued) -> float:
        """Reads a queued step back (waiting for the device where it is still at work), checks its loss,
        and logs it. A step's time runs from when the host began queueing it, or when the step before it
        finished if that was later (it was queued while that one ran): the interval between two steps'
        ends, which is the device's time per step once the host keeps ahead of it."""
        nonlocal last_done, elapsed, tokens_seen
        if q.done is not None:
            q.done.synchronize()
        grad_norm = float(q.grad_norm)
        loss = world.all_sum(float(q.loss)) / max(q.n_global, 1)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"step {q.step}: the loss is {loss}; lower the learning rate or check the data (the last "
                "checkpoint is intact)"
            )
        now = time.perf_counter()
        dt = now - max(q.started, last_done)
        last_done = now
        elapsed += dt
        tokens_seen += q.positions
        record = {
            "step": q.step,
            "epoch": q.epoch,
            "loss": loss,
            "lr": q.lr,
            "grad_norm": grad_norm,
            "learned_tokens": q.n_global,
            "tokens": q.positions,
            "tokens_per_s": q.positions / dt,
            "step_s": dt,
            "gradient_checkpointing": q.checkpointing,
            "elapsed_s": elapsed,
        }
        if log is not None and (q.step % cfg.log_every == 0 or q.step == total):
            log.write(record)
            tracked.log(record, q.step)
        if progress is not None:
            progress.update(task, advance=1, loss=f"{loss:.4f}", tps=f"{q.positions / dt:,.0f}")
        return loss

    pending: _Queued | None = None  # the step queued last and not read back yet
    with progress or contextlib.nullcontext(), tracked:  # the trackers are finished however the loop ends
        while step < total:
            plan = plan_epoch(
                data.lengths, data.has_image, cfg.global_batch_size, cfg.seed, epoch, cfg.group_by_length
            )
            batches = plan.batches[start_batch:]
            mine = [micro_batches(b, cfg.per_device_batch_size, world.rank, world.size) for b in batches]
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=[mb for step_mbs in mine for mb in step_mbs],
                collate_fn=collate,
                num_workers=cfg.num_workers,
                pin_memory=world.device.type == "cuda",
            )
            batches_iter = iter(loader)
            for k, global_batch in enumerate(batches):
                if step >= total:
                    break
                done_batches = start_batch + k + 1
                epoch_end = done_batches == steps_per_epoch
                final = step + 1 == total
                due = (cfg.save_every and (step + 1) % cfg.save_every == 0) or epoch_end or final
                profiling = step + 1 == cfg.profile_step  # every process decides alike; rank 0 profiles
                profiler = (
                    profiled(cfg.run_dir / "profile.txt", world.device)
                    if profiling and world.main
                    else contextlib.nullcontext()
                )
                with profiler:
                    if profiling and pending is not None:  # the profiled step alone
                        loss_value, pending = finish(pending), None
                    t0 = time.perf_counter()
                    try:
                        torch.manual_seed(_step_seed(cfg, step, world))
                        n_global = sum(tokens_of[i] for i in global_batch)
                        positions = sum(data.lengths[i] for i in global_batch)
                        step_batches = []
                        for _ in mine[k]:
                            batch = next(batches_iter).to(world.device)
                            bad_images.take(batch.bad, step + 1)  # refuses them, unless told to skip them
                            step_batches.append(batch)
                        local_left_out = sum(tokens_of[b.index] for batch in step_batches for b in batch.bad)
                        try:
                            local_loss = _forward_backward(model, step_batches, autocast, world, n_global)
                            out_of_memory = False
                        except torch.OutOfMemoryError:
                            if not may_turn_on:
                                raise
                            out_of_memory = True  # handled below, once the failed step's tensors are freed
                        if out_of_memory:
                            opt.zero_grad(set_to_none=True)
                            torch.cuda.empty_cache()
                            vlm.lm.gradient_checkpointing, may_turn_on = True, False
                            say(
                                f"step {step + 1} ran out of GPU memory without gradient checkpointing: "
                                "recomputing the LM's blocks from now on "
                                "(--gradient-checkpointing to start so)"
                            )
                            torch.manual_seed(_step_seed(cfg, step, world))
                            local_loss = _forward_backward(model, step_batches, autocast, world, n_global)
                        # the step before is read back and logged now, while this one's backward runs
                        if pending is not None:
                            loss_value, pending = finish(pending), None
                        if cfg.skip_bad:  # every process asks (none knows whether another one left any out)
                            kept = n_global - int(world.all_sum(local_left_out))
                            n_global = _renormalise(model, n_global, kept)
                        grad_norm = clip_and_step(opt, trainable, cfg.max_grad_norm)
                    except BaseException:
                        # the step before is logged all the same (alone: the others may not get here)
                        if pending is not None and not world.distributed:
                            with contextlib.suppress(Exception):
                                finish(pending)
                        raise
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    queued = _Queued(
                        step=step,
                        epoch=epoch + done_batches / steps_per_epoch,
                        loss=local_loss,
                        grad_norm=grad_norm,
                        n_global=n_global,
                        positions=positions,
                        lr=sched.get_last_lr()[0],
                        checkpointing=vlm.lm.gradient_checkpointing,
                        started=t0,
                        done=_done_event(world.device),
                    )
                    # Read back at once where the step's weights are needed now (a checkpoint follows, the
                    # run ends) or the step is profiled; otherwise while the next step is queued, so that
                    # the device never waits for the host between steps.
                    if due or profiling:
                        loss_value = finish(queued)
                    else:
                        pending = queued
                if due and (cfg.save_final or not final):
                    pos = checkpoint.Position(
                        step,
                        epoch + 1 if epoch_end else epoch,
                        0 if epoch_end else done_batches,
                        tokens_seen,
                        elapsed,
                    )
                    checkpoint.save(
                        cfg.run_dir / "checkpoints", model, opt, sched, pos, world, cfg.keep_checkpoints
                    )
            if pending is not None:  # (an epoch's last step is read back at once: never left here)
                loss_value, pending = finish(pending), None
            epoch += 1
            start_batch = 0
    # without save_final (a throughput measurement) the run ends without its multi-GB checkpoint and model
    model_dir = export(model, cfg, world, vlm.config, vlm.tokenizer) if cfg.save_final else None
    if world.main:
        records = read_metrics(cfg.run_dir / "metrics.jsonl")
        if math.isnan(loss_value) and records:  # resumed a finished run: nothing left to do
            loss_value = records[-1]["loss"]
        plot_loss(records, cfg.run_dir / "loss.png", f"{cfg.model} — {cfg.stage}")
        saved = f"model in {model_dir}" if model_dir is not None else "no model saved (save_final off)"
        say(f"done: {step} steps, final loss {loss_value:.4f}; {saved}")
    return TrainResult(cfg.run_dir, step, loss_value, model_dir, len(data.problems) + len(bad_images.listed))


@dataclass
class _Queued:
    """A step whose work is queued on the device: what its log record needs once it is read back."""

    step: int
    epoch: float
    loss: torch.Tensor  # this process's summed loss, on the device
    grad_norm: torch.Tensor
    n_global: int
    positions: int
    lr: float
    checkpointing: bool
    started: float  # perf_counter when the host began queueing it
    done: torch.cuda.Event | None  # recorded after its optimizer step (GPUs)


def _done_event(device: torch.device) -> torch.cuda.Event | None:
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _step_seed(cfg: TrainConfig, step: int, world: World) -> int:
    """The random seed of a step (dropout etc.): a function of the run's seed, the step and the rank, so
    that a resumed or a redone step draws the same numbers."""
    return cfg.seed * 1_000_003 + step * 101 + world.rank


def _forward_backward(model, batches: list, autocast, world: World, n_global: int) -> torch.Tensor:
    """One step's micro-batches, forward and backward, gradients accumulated; the summed loss (a tensor on
    the device: reading it waits for the GPU, which the caller does once the step is queued)."""
    total = None
    for j, batch in enumerate(batches):
        if world.distributed:  # reduce-scatter gradients once, after the last micro-batch
            model.set_requires_gradient_sync(j == len(batches) - 1)
        with autocast:
            out = model(**batch.model_inputs())
        # FSDP averages gradients over processes; × size makes it the global-batch sum
        (out.loss * (world.size / max(n_global, 1))).backward()
        loss = out.loss.detach().double()
        total = loss if total is None else total + loss
    return total


def export(model, cfg: TrainConfig, world: World, config, tokenizer) -> Path | None:
    """The trained model in mambavl's layout (`run_dir/model`), LoRA merged: loadable by every command."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from mambavl.vlm.model import VLM

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.main:
        world.barrier()
        return None
    fresh = VLM(config, tokenizer=tokenizer)  # on the CPU: non-persistent buffers need real values
    if cfg.lora is not None:
        from mambavl.train.recipe import add_lora

        add_lora(fresh.lm, cfg.lora)
    fresh.load_state_dict({k: v.float() for k, v in full.items()}, strict=True)
    if cfg.lora is not None:
        merge_lora(fresh.lm)
    try:
        return fresh.save_pretrained(cfg.run_dir / "model")
    except (OSError, SafetensorError) as e:  # a full disk, most likely: the run itself is safe
        weights = fresh.state_dict()
        raise checkpoint.model_save_error(
            e, cfg.run_dir / "model", cfg.run_dir / "checkpoints", weights
        ) from e
    finally:
        world.barrier()


def _renormalise(model, planned: int, kept: int) -> int:
    """The gradient of a step some of whose learned tokens were left out (their images failed to load),
    divided by the tokens actually learned rather than those planned: the same token-weighted mean a
    global batch without those samples gives. Returns the tokens learned."""
    if kept != planned and kept > 0:
        factor = max(planned, 1) / kept
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)  # sharded (FSDP) or not: each process scales its own part
    return kept


class BadImages:
    """Samples whose image failed to load at batch time. Without skip_bad, the first one stops the run,
    named with its image and the two ways out; with it, each is listed once in `path` (skipped.jsonl,
    with the step it was first met at) however often its batch comes round, and training goes on."""

    def __init__(self, path: Path, skip_bad: bool, warn):
        self.path, self.skip_bad, self.warn = path, skip_bad, warn
        # a resumed run lists what its earlier part met already (so does every process of a run)
        self.listed = {(r["id"], r["image"]) for r in _batch_time_entries(path)}

    def take(self, bad: list[BadImage], step: int) -> None:
        if bad and not self.skip_bad:
            first = bad[0]
            raise DataError(
                f"sample {first.id!r}: its image {first.image} cannot be loaded ({first.reason}). Pass "
                "--skip-bad to train without such samples (each is listed in the run dir's skipped.jsonl), "
                "or --verify-images to find them all before training starts"
            )
        for b in bad:
            if (b.id, b.image) in self.listed:
                continue
            self.listed.add((b.id, b.image))
            entry = {"id": b.id, "image": b.image, "reason": b.reason, "step": step}
            with open(self.path, "a") as f:  # one short line per write: appends of processes do not mix
                f.write(json.dumps(entry) + "\n")
            self.warn(
                f"[yellow]skipping sample {escape(b.id)}[/yellow]: its image failed to load "
                f"({escape(b.reason)}); listed in {escape(str(self.path))}",
                highlight=False,
                soft_wrap=True,
            )


def _batch_time_entries(path: Path) -> list[dict]:
    """The entries of skipped.jsonl that `BadImages` wrote (they carry the step); a line cut short by a
    kill is passed over."""
    if not path.is_file():
        return []
    return [r for r in read_metrics(path) if isinstance(r, dict) and "step" in r and "image" in r]


def _report_problems(data: TrainingData, run_dir: Path, world: World, say) -> None:
    if not data.problems or not world.main:
        return
    path = run_dir / "skipped.jsonl"
    found = [{"id": p.id, "reason": p.reason} for p in data.problems]
    # a resumed run's list keeps what its earlier part met at batch time; replaced whole, never half-written
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in found + _batch_time_entries(path)))
    tmp.replace(path)
    say(f"[yellow]skipping {len(data.problems)} unusable samples[/yellow] (listed in {path}):")
    for p in data.problems[:5]:  # ids and reasons come from the data: never read as markup
        say(f"  {escape(str(p))}")
