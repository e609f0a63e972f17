"""The training loop: one code path for 1…N processes (see `train.distributed`).

Per optimizer step, the global batch (the same for any process count, see `data.batching`) is split into
micro-batches; each process runs its own, and every micro-batch's summed loss is divided by the number
of learned tokens in the *whole global batch*. The gradient is then the token-weighted mean over the
global batch however it is split — Cobra's intent (it weights by tokens since 2024-08), exact across
processes too. bf16 runs under autocast with fp32 master weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console

from mambavl.data.batching import micro_batches, plan_epoch
from mambavl.data.collate import TrainDataset, collate
from mambavl.data.mixture import DataSource, TrainingData, load_training_data, registry_sources
from mambavl.train import checkpoint
from mambavl.train.config import TrainConfig
from mambavl.train.distributed import World, setup, shard
from mambavl.train.metrics import MetricsLog, plot_loss, progress_bar, read_metrics
from mambavl.train.recipe import configure_trainable, merge_lora, optimizer, scheduler
from mambavl.vlm.sequence import IGNORE_INDEX

# Options a resumed run may change; any other difference from the saved config is refused.
RESUMABLE_CHANGES = {"resume", "progress", "num_workers", "log_every", "save_every", "keep_checkpoints"}


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
    from mambavl.presets import PRESETS, create_from_parts

    if source in PRESETS:
        config = PRESETS[source] if resize is None else replace(PRESETS[source], resize=resize)
        if from_parts:
            return create_from_parts(config)
        from mambavl.vlm.model import VLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return VLM(config)
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


def _prepare_run_dir(cfg: TrainConfig, world: World) -> Path | None:
    """Refuses a run dir that holds another run; on --resume, checks the config and finds the checkpoint."""
    run = cfg.run_dir
    saved = run / "config.json"
    # Every rank looks before rank 0 writes, so all of them reach the same verdict.
    holds_run = saved.is_file()
    not_empty = run.is_dir() and any(run.iterdir())
    world.barrier()
    if holds_run:
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
        return checkpoint.latest(run / "checkpoints")
    if not_empty:
        raise RunDirError(f"{run} is not empty but holds no run: choose an empty or new --run-dir")
    if world.main:
        run.mkdir(parents=True, exist_ok=True)
        tmp = run / "config.json.tmp"
        tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
        tmp.replace(saved)
    world.barrier()
    return None


def train(
    cfg: TrainConfig,
    world: World | None = None,
    console: Console | None = None,
    from_parts: bool = False,
) -> TrainResult:
    cfg = cfg.resolved()
    world = world or setup()
    console = console or Console()
    say = console.print if world.main else (lambda *a, **k: None)
    precision = (
        cfg.precision if cfg.precision != "auto" else ("bf16" if world.device.type == "cuda" else "fp32")
    )

    vlm = build_model(cfg.model, cfg.seed, cfg.resize, from_parts)
    data = load_training_data(data_sources(cfg), vlm, cfg.stage, cfg.seed, cfg.skip_bad, cfg.verify_images)
    resume_from = _prepare_run_dir(cfg, world)  # after the model and data are known to be usable
    _report_problems(data, cfg.run_dir, world, say)
    configure_trainable(vlm, cfg)
    if precision == "bf16" and not any(p.requires_grad for p in vlm.vision.parameters()):
        vlm.vision.to(torch.bfloat16)  # frozen: no master copy needed (as the seeds do)
    vlm.to(world.device)
    vlm.train()
    vlm.vision.train(any(p.requires_grad for p in vlm.vision.parameters()))
    model = shard(vlm, world)
    opt = optimizer(model, cfg)

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
        say(f"resumed from {resume_from.name} (step {position.step}, epoch {position.epoch})")
    log = MetricsLog(cfg.run_dir / "metrics.jsonl", position.step) if world.main else None

    dataset = TrainDataset(
        data.examples,
        vlm.image_transform,
        vlm.config.anyres is not None,
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
    step, epoch, loss_value = position.step, position.epoch, math.nan
    tokens_seen, elapsed = position.tokens, position.elapsed_s
    start_batch = position.batch_in_epoch
    with progress or contextlib.nullcontext():
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
                t0 = time.perf_counter()
                torch.manual_seed(cfg.seed * 1_000_003 + step * 101 + world.rank)  # dropout etc., resumable
                n_global = sum(tokens_of[i] for i in global_batch)
                positions = sum(data.lengths[i] for i in global_batch)
                local_loss = 0.0
                n_micro = len(mine[k])
                for j in range(n_micro):
                    batch = next(batches_iter).to(world.device)
                    if world.distributed:  # reduce-scatter gradients once, after the last micro-batch
                        model.set_requires_gradient_sync(j == n_micro - 1)
                    with autocast:
                        out = model(**batch.model_inputs())
                    # FSDP averages gradients over processes; × size makes it the global-batch sum
                    (out.loss * (world.size / max(n_global, 1))).backward()
                    local_loss += float(out.loss.detach())
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm
                )
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                loss_value = world.all_sum(local_loss) / max(n_global, 1)
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"step {step + 1}: the loss is {loss_value}; lower the learning rate or check "
                        "the data (the last checkpoint is intact)"
                    )
                step += 1
                dt = time.perf_counter() - t0
                elapsed += dt
                tokens_seen += positions
                record = {
                    "step": step,
                    "epoch": epoch + (start_batch + k + 1) / steps_per_epoch,
                    "loss": loss_value,
                    "lr": sched.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "learned_tokens": n_global,
                    "tokens": positions,
                    "tokens_per_s": positions / dt,
                    "step_s": dt,
                    "elapsed_s": elapsed,
                }
                if log is not None and (step % cfg.log_every == 0 or step == total):
                    log.write(record)
                if progress is not None:
                    progress.update(task, advance=1, loss=f"{loss_value:.4f}", tps=f"{positions / dt:,.0f}")
                done_batches = start_batch + k + 1
                epoch_end = done_batches == steps_per_epoch
                if (cfg.save_every and step % cfg.save_every == 0) or epoch_end or step == total:
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
            epoch += 1
            start_batch = 0
    model_dir = export(model, cfg, world, vlm.config, vlm.tokenizer)
    if world.main:
        records = read_metrics(cfg.run_dir / "metrics.jsonl")
        if math.isnan(loss_value) and records:  # resumed a finished run: nothing left to do
            loss_value = records[-1]["loss"]
        plot_loss(records, cfg.run_dir / "loss.png", f"{cfg.model} — {cfg.stage}")
        say(f"done: {step} steps, final loss {loss_value:.4f}; model in {model_dir}")
    return TrainResult(cfg.run_dir, step, loss_value, model_dir, len(data.problems))


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
    out = fresh.save_pretrained(cfg.run_dir / "model")
    world.barrier()
    return out


def _report_problems(data: TrainingData, run_dir: Path, world: World, say) -> None:
    if not data.problems or not world.main:
        return
    path = run_dir / "skipped.jsonl"
    path.write_text("".join(json.dumps({"id": p.id, "reason": p.reason}) + "\n" for p in data.problems))
    say(f"[yellow]skipping {len(data.problems)} unusable samples[/yellow] (listed in {path}):")
    for p in data.problems[:5]:
        say(f"  {p}")
