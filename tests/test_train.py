"""Training: batching, the recipe, the loop, checkpoints and resume, the CLI."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import mambavl
from mambavl.data.batching import micro_batches, plan_epoch
from mambavl.data.collate import TrainDataset, collate
from mambavl.data.mixture import DataError, DataSource, load_training_data
from mambavl.data.shapes import write_shapes
from mambavl.train import RunDirError, TrainConfig, train
from mambavl.train import checkpoint as ckpt
from mambavl.train.metrics import read_metrics
from mambavl.train.recipe import lr_factor
from mambavl.train.trainer import build_model, learned_tokens

SRC = str(Path(mambavl.__file__).parents[1])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes"), train_scenes=24, heldout_scenes=4, image_size=56)


def tiny_cfg(shapes, run_dir, **kw) -> TrainConfig:
    base = dict(
        model="tiny-cobra",
        run_dir=Path(run_dir),
        stage="finetune",
        data=(f"{shapes['finetune']}:{shapes['images']}",),
        max_steps=6,
        global_batch_size=8,
        per_device_batch_size=4,
        learning_rate=3e-3,
        precision="fp32",
        progress=False,
        seed=3,
    )
    return TrainConfig(**(base | kw))


# ---- data order ---------------------------------------------------------------------------------------
def test_plan_epoch_is_seeded_complete_and_modality_pure():
    lengths = [5, 9, 3, 7, 2, 8, 6, 4, 1, 10, 11]
    has_image = [True, True, False, True, False, True, True, False, True, True, False]
    a = plan_epoch(lengths, has_image, 4, seed=1, epoch=0)
    assert a == plan_epoch(lengths, has_image, 4, seed=1, epoch=0)
    assert a != plan_epoch(lengths, has_image, 4, seed=1, epoch=1)
    flat = [i for b in a.batches for i in b]
    assert set(flat) == set(range(len(lengths)))  # every sample, each epoch
    assert len(flat) == len(lengths) + a.repeated and all(len(b) == 4 for b in a.batches)
    for b in a.batches:
        assert len({has_image[i] for i in b}) == 1  # one modality per step
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert max(lengths) in [lengths[i] for i in a.batches[0]]  # the longest batch first


def test_micro_batches_split_the_same_micro_batches_over_ranks():
    batch = list(range(16))
    single = micro_batches(batch, 4, 0, 1)
    split = [micro_batches(batch, 4, r, 2) for r in range(2)]
    assert sorted(mb for rank in split for mb in rank) == sorted(single)
    with pytest.raises(ValueError, match="multiple"):
        micro_batches(list(range(10)), 4, 0, 1)


def test_learned_tokens_is_what_the_model_learns(shapes):
    vlm = mambavl.create("tiny-cobra")
    for stage, key in (("finetune", "finetune"), ("align", "align")):
        data = load_training_data([DataSource(shapes[key], shapes["images"])], vlm, stage)
        items = [TrainDataset(data.examples, vlm.image_transform)[i] for i in range(5)]
        out = vlm(**collate(items).model_inputs())
        assert out.tokens == sum(learned_tokens(ex) for ex, _ in items)


def test_collated_batch_loss_equals_row_by_row(shapes):
    """Right padding and the image splice leave each row's loss as if it were alone."""
    torch.manual_seed(0)
    vlm = mambavl.create("tiny-cobra")
    data = load_training_data([DataSource(shapes["finetune"], shapes["images"])], vlm, "finetune")
    items = [TrainDataset(data.examples, vlm.image_transform)[i] for i in range(4)]
    whole = vlm(**collate(items).model_inputs())
    rows = [vlm(**collate([it]).model_inputs()) for it in items]
    assert whole.tokens == sum(r.tokens for r in rows)
    torch.testing.assert_close(whole.loss, sum(r.loss for r in rows), rtol=1e-5, atol=1e-5)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    total, warmup = 100, 10
    f = [lr_factor(s, total, warmup) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[9:]))
    assert lr_factor(total, total, warmup) == pytest.approx(0.0)
    assert lr_factor(total, total, warmup, min_ratio=0.1) == pytest.approx(0.1)


# ---- bad data -----------------------------------------------------------------------------------------
def test_bad_samples_are_refused_or_skipped_and_listed(shapes, tmp_path):
    records = json.loads(Path(shapes["finetune"]).read_text())[:6]
    records[1]["image"] = "missing.png"
    records[2]["conversations"] = []
    records[3]["conversations"][0]["value"] = records[3]["conversations"][0]["value"].replace("<image>", "")
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in records] + ["{broken"]
    path.write_text("\n".join(lines) + "\n")
    source = f"{path}:{shapes['images']}"
    with pytest.raises(DataError) as err:
        train(tiny_cfg(shapes, tmp_path / "run1", data=(source,)))
    for where in (records[1]["id"], records[2]["id"], records[3]["id"], "line 7"):
        assert where in str(err.value)
    assert "4 samples cannot be used" in str(err.value)
    result = train(tiny_cfg(shapes, tmp_path / "run2", data=(source,), skip_bad=True, max_steps=1))
    skipped = [json.loads(x) for x in (tmp_path / "run2" / "skipped.jsonl").read_text().splitlines()]
    assert result.skipped == 4 and len(skipped) == 4


# ---- the loop, the run dir, checkpoints ------------------------------------------------------------------
def test_training_learns_and_writes_a_loadable_model(shapes, tmp_path):
    cfg = tiny_cfg(shapes, tmp_path / "run", max_steps=12, save_every=5, learning_rate=1e-2)
    result = train(cfg)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert {"lr", "grad_norm", "tokens_per_s", "epoch"} <= set(records[0])
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert ckpt.latest(tmp_path / "run" / "checkpoints").name == "step-0000012"
    vlm = mambavl.load(result.model_dir)  # every command can use it
    pb = vlm.get_prompt_builder()
    pb.add_turn("human", "How many objects are there?")
    assert isinstance(vlm.generate(str(shapes["images"] / "train-00000.png"), pb.get_prompt()), str)


def test_align_trains_only_the_projector(shapes, tmp_path):
    before = mambavl.create("tiny-cobra")
    torch.manual_seed(3)
    cfg = tiny_cfg(shapes, tmp_path / "run", stage="align", data=(f"{shapes['align']}:{shapes['images']}",))
    after = mambavl.load(train(cfg).model_dir)
    reference = build_model("tiny-cobra", 3)
    for name, p in after.state_dict().items():
        same = torch.equal(p, reference.state_dict()[name])
        assert same != name.startswith("projector."), name
    del before


def test_run_dir_is_never_overwritten(shapes, tmp_path):
    cfg = tiny_cfg(shapes, tmp_path / "run", max_steps=1)
    train(cfg)
    with pytest.raises(RunDirError, match="--resume"):
        train(cfg)
    with pytest.raises(RunDirError, match="learning_rate"):
        train(tiny_cfg(shapes, tmp_path / "run", max_steps=1, learning_rate=1e-4, resume=True))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty"):
        train(tiny_cfg(shapes, tmp_path / "other", max_steps=1))


def test_interrupted_checkpoint_write_keeps_the_previous_one(shapes, tmp_path, monkeypatch):
    train(tiny_cfg(shapes, tmp_path / "run", max_steps=2))
    directory = tmp_path / "run" / "checkpoints"
    before = ckpt.latest(directory)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    vlm = mambavl.create("tiny-cobra")
    opt = torch.optim.AdamW(vlm.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(ckpt.CheckpointSaveError, match=r"no space left on device .* step-0000002 is intact"):
        ckpt.save(directory, vlm, opt, sched, ckpt.Position(3, 0, 3, 0, 0.0), ckpt.World())
    assert ckpt.latest(directory) == before
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp")]


def _cli(args, **kw):
    env = os.environ | {"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "MAMBAVL_DEVICE": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "mambavl.cli", "train", *args], env=env, **kw)


def _cli_args(shapes, run_dir, steps=10):
    return [
        "--model", "tiny-cobra", "--stage", "finetune", "--data", f"{shapes['finetune']}:{shapes['images']}",
        "--run-dir", str(run_dir), "--max-steps", str(steps), "--global-batch-size", "8",
        "--per-device-batch-size", "4", "--learning-rate", "3e-3", "--precision", "fp32",
        "--save-every", "2", "--seed", "5",
    ]  # fmt: skip


def test_resume_after_sigkill_is_bit_exact(shapes, tmp_path):
    """A run killed with SIGKILL mid-run and resumed logs exactly the losses of an uninterrupted run."""
    whole = _cli(_cli_args(shapes, tmp_path / "whole"), stdout=subprocess.DEVNULL)
    assert whole.wait(timeout=300) == 0
    victim = _cli(_cli_args(shapes, tmp_path / "killed"), stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        latest = ckpt.latest(tmp_path / "killed" / "checkpoints")
        if latest is not None and latest.name >= "step-0000004":
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = [r["step"] for r in read_metrics(tmp_path / "killed" / "metrics.jsonl")][-1]
    assert killed_at < 10, "the run finished before it could be killed"
    resumed = _cli([*_cli_args(shapes, tmp_path / "killed"), "--resume"], stdout=subprocess.DEVNULL)
    assert resumed.wait(timeout=300) == 0
    a = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    b = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]


def test_two_processes_train_like_one(shapes, tmp_path):
    """torchrun with 2 CPU processes (gloo, FSDP2) follows the single-process loss curve, same global batch;
    its checkpoint resumes in a single process."""
    # Loopback only: gloo would otherwise pick the interface the host name resolves to.
    env = os.environ | {
        "PYTHONPATH": SRC,
        "OMP_NUM_THREADS": "1",
        "MAMBAVL_DEVICE": "cpu",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    one = _cli(_cli_args(shapes, tmp_path / "one", steps=6), stdout=subprocess.DEVNULL)
    assert one.wait(timeout=300) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", port,
        "-m", "mambavl.cli", "train", *_cli_args(shapes, tmp_path / "two", steps=6),
    ]  # fmt: skip
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if two.returncode != 0:  # show the workers' own tracebacks, not only the launcher's summary
        worker = [ln for ln in two.stderr.splitlines() if not ln.startswith(("W1", "E1", "I1"))]
        pytest.fail("torchrun failed:\n" + "\n".join(worker[:150]))
    a = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    assert len(a) == len(b) == 6
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    m1, m2 = mambavl.load(tmp_path / "one" / "model"), mambavl.load(tmp_path / "two" / "model")
    for (name, p), q in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=name)
    # Its step-4 checkpoint resumes in one process (it once refused: the tied LM head, gathered from two
    # processes, is saved under its own name too).
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-0000006")
    (tmp_path / "two" / "checkpoints" / "latest").write_text("step-0000004")
    resumed = _cli([*_cli_args(shapes, tmp_path / "two", steps=6), "--resume"], stdout=subprocess.DEVNULL)
    assert resumed.wait(timeout=300) == 0
    c = [r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    torch.testing.assert_close(torch.tensor(c), torch.tensor(b), rtol=1e-4, atol=1e-5)


def test_lora_trains_adapters_and_exports_merged(shapes, tmp_path):
    pytest.importorskip("peft")
    from mambavl.train.config import LoraConfig

    cfg = tiny_cfg(shapes, tmp_path / "run", lora=LoraConfig(rank=4, alpha=8, dropout=0.0), max_steps=3)
    result = train(cfg)
    merged = mambavl.load(result.model_dir)
    base = build_model("tiny-cobra", 3)
    assert not any("lora" in k for k in merged.state_dict())
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(k.startswith(("projector.", "lm.layers.")) for k in changed)
    assert any(k.endswith("in_proj.weight") for k in changed)


def test_cli_config_file_with_flag_overrides(shapes, tmp_path):
    from typer.testing import CliRunner

    from mambavl.cli import app

    config = tmp_path / "run.json"
    options = {
        "model": "tiny-cobra",
        "stage": "finetune",
        "data": [f"{shapes['finetune']}:{shapes['images']}"],
        "max_steps": 5,
        "global_batch_size": 4,
        "per_device_batch_size": 2,
        "precision": "fp32",
        "learning_rate": 1e-3,
    }
    config.write_text(json.dumps(options))
    args = ["train", "--config", str(config), "--max-steps", "2", "--run-root-dir", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny-cobra+stage-finetune+x7"  # Cobra's run id: model+stage+seed
    saved = json.loads((run / "config.json").read_text())
    assert saved["max_steps"] == 2 and saved["learning_rate"] == 1e-3 and saved["global_batch_size"] == 4
    assert len(read_metrics(run / "metrics.jsonl")) == 2
    bad = CliRunner().invoke(app, ["train", "--config", str(config), "--run-dir", str(run)])
    assert bad.exit_code == 1 and "--resume" in bad.output


# ---- an image that fails to load at batch time -----------------------------------------------------------
def with_a_truncated_image(shapes, tmp_path) -> tuple[Path, Path, dict]:
    """Eight finetune samples (one global batch of 8: all in the first step) with their images copied to
    tmp_path, the first one's PNG cut in half: it exists, so only decoding it finds it out."""
    records = json.loads(Path(shapes["finetune"]).read_text())[:8]
    images = tmp_path / "images"
    images.mkdir()
    for r in records:
        shutil.copy(shapes["images"] / r["image"], images / r["image"])
    data = (images / records[0]["image"]).read_bytes()
    (images / records[0]["image"]).write_bytes(data[: len(data) // 2])
    path = tmp_path / "eight.json"
    path.write_text(json.dumps(records))
    return path, images, records[0]


def test_a_corrupt_image_stops_the_run_naming_it_and_the_rerun_takes_the_dir_over(shapes, tmp_path):
    from typer.testing import CliRunner

    from mambavl.cli import app

    path, images, bad = with_a_truncated_image(shapes, tmp_path)
    run = tmp_path / "run"
    args = [
        "train", "--model", "tiny-cobra", "--data", f"{path}:{images}", "--run-dir", str(run),
        "--max-steps", "2", "--global-batch-size", "8", "--per-device-batch-size", "4",
        "--precision", "fp32", "--learning-rate", "3e-3",
    ]  # fmt: skip
    runner = CliRunner()
    failed = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert failed.exit_code == 1, failed.output
    message = " ".join(failed.output.split())
    assert f"sample '{bad['id']}': its image {images / bad['image']} cannot be loaded" in message
    assert "truncated" in message and "--skip-bad" in message and "--verify-images" in message
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]  # it stopped before its first step

    rerun = runner.invoke(app, [*args, "--skip-bad"], env={"COLUMNS": "300"})
    assert rerun.exit_code == 0, rerun.output
    assert "stopped before its first step" in " ".join(rerun.output.split())
    skipped = [json.loads(line) for line in (run / "skipped.jsonl").read_text().splitlines()]
    assert [(s["id"], s["image"], s["step"]) for s in skipped] == [(bad["id"], str(images / bad["image"]), 1)]
    assert "truncated" in skipped[0]["reason"]
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # a run that did take a step is still never overwritten
    again = runner.invoke(app, [*args, "--skip-bad"], env={"COLUMNS": "300"})
    assert again.exit_code == 1 and "already holds a run" in again.output


def test_a_skipped_image_is_left_out_of_the_loss_and_resumes_exactly(shapes, tmp_path):
    """The failed sample's row learns nothing and the loss is divided by the tokens actually learned, the
    same at every step, so a resumed run logs exactly what an uninterrupted one does."""
    from mambavl.data.collate import StandIn

    path, images, _ = with_a_truncated_image(shapes, tmp_path)
    cfg = dict(
        data=(f"{path}:{images}",), skip_bad=True, max_steps=3, save_every=1, keep_checkpoints=9, seed=3
    )
    whole = train(tiny_cfg(shapes, tmp_path / "whole", **cfg))
    records = read_metrics(tmp_path / "whole" / "metrics.jsonl")

    # step 1's loss is the initial model's mean loss over the seven good samples' learned tokens
    vlm = build_model("tiny-cobra", 3)
    data = load_training_data([DataSource(path, images)], vlm, "finetune", 3, skip_bad=True)
    dataset = TrainDataset(data.examples, vlm.image_transform)
    good = [dataset[i] for i in range(len(dataset)) if not isinstance(dataset[i][1], StandIn)]
    assert len(good) == 7
    out = vlm(**collate(good).model_inputs())
    assert records[0]["learned_tokens"] == out.tokens == sum(learned_tokens(ex) for ex, _ in good)
    assert records[0]["loss"] == pytest.approx(float(out.loss.detach()) / out.tokens, rel=1e-5)
    assert whole.skipped == 1

    cut = tmp_path / "cut"  # the same run, as if killed after step 1
    shutil.copytree(tmp_path / "whole", cut)
    for step in ("step-0000002", "step-0000003"):
        shutil.rmtree(cut / "checkpoints" / step)
    (cut / "checkpoints" / "latest").write_text("step-0000001")
    train(tiny_cfg(shapes, cut, resume=True, **cfg))
    resumed = read_metrics(cut / "metrics.jsonl")
    for key in ("loss", "grad_norm", "learned_tokens"):
        assert [r[key] for r in resumed] == [r[key] for r in records], key
    assert len((cut / "skipped.jsonl").read_text().splitlines()) == 1  # listed once, not at every meeting


def test_renormalising_a_step_equals_training_without_the_failed_sample(shapes, tmp_path):
    """The gradient of a batch holding a failed sample, renormalised, is the gradient of the batch
    without it (the token-weighted mean over what was learned)."""
    from mambavl.train.trainer import _renormalise

    path, images, _ = with_a_truncated_image(shapes, tmp_path)
    vlm = build_model("tiny-cobra", 3)
    data = load_training_data([DataSource(path, images)], vlm, "finetune", skip_bad=True)
    dataset = TrainDataset(data.examples, vlm.image_transform)
    items = [dataset[i] for i in range(4)]
    planned = sum(learned_tokens(ex) for ex, _ in items)
    kept = sum(learned_tokens(ex) for ex, _ in items[1:])

    batch = collate(items)
    assert [b.id for b in batch.bad] == [items[0][0].id] and batch.bad[0].index == 0
    (vlm(**batch.model_inputs()).loss / planned).backward()
    assert _renormalise(vlm, planned, kept) == kept
    mixed = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
    vlm.zero_grad()
    (vlm(**collate(items[1:]).model_inputs()).loss / kept).backward()
    for name, p in vlm.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(mixed[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


# ---- gradient checkpointing "auto" ----------------------------------------------------------------------
def test_auto_checkpointing_turns_on_and_redoes_the_step_that_ran_out_of_memory(
    shapes, tmp_path, monkeypatch
):
    """On one GPU "auto" starts without recomputation; a step that runs out of memory is redone with it,
    and it stays on. Here a CPU plays the GPU: the start is forced off and the first forward without
    recomputation raises torch.OutOfMemoryError. The run equals one with checkpointing on from the start."""
    from mambavl.train import trainer
    from mambavl.vlm.model import VLM

    reference = train(tiny_cfg(shapes, tmp_path / "on", max_steps=3, gradient_checkpointing=True))
    monkeypatch.setattr(trainer, "checkpointing_at_start", lambda cfg, device, processes: False)
    real, failed = VLM.forward, []

    def forward(self, *args, **kwargs):
        if not self.lm.gradient_checkpointing and not failed:
            failed.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(VLM, "forward", forward)
    said = []
    console = type("Console", (), {"print": lambda self, *a, **k: said.append(" ".join(map(str, a)))})()
    auto = train(tiny_cfg(shapes, tmp_path / "auto", max_steps=3), console=console)
    assert failed and any("ran out of GPU memory without gradient checkpointing" in s for s in said)
    got, want = (read_metrics(r.run_dir / "metrics.jsonl") for r in (auto, reference))
    assert [r["gradient_checkpointing"] for r in got] == [True, True, True]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-6)
    # chosen explicitly off, running out of memory is the user's error to see
    failed.clear()
    with pytest.raises(torch.OutOfMemoryError):
        train(tiny_cfg(shapes, tmp_path / "off", max_steps=1, gradient_checkpointing=False))


def test_checkpointing_at_start():
    from mambavl.train.recipe import checkpointing_at_start

    auto = TrainConfig(model="tiny-cobra", run_dir=Path("r"))
    assert auto.gradient_checkpointing == "auto"
    assert checkpointing_at_start(auto, torch.device("cuda"), 1) is False
    assert checkpointing_at_start(auto, torch.device("cuda"), 2) is True  # a process cannot retry alone
    assert checkpointing_at_start(auto, torch.device("cpu"), 1) is True
    for choice in (True, False):
        cfg = TrainConfig(model="tiny-cobra", run_dir=Path("r"), gradient_checkpointing=choice)
        assert checkpointing_at_start(cfg, torch.device("cuda"), 1) is choice
    with pytest.raises(ValueError, match="gradient_checkpointing must be true, false or 'auto'"):
        replace(auto, gradient_checkpointing="sometimes", stage="finetune").resolved()


@pytest.mark.parametrize(
    ("preset", "family", "kind"),
    [
        ("tiny-cobra-nemotron-h", "nemotron_h", "none"),  # Mamba-2, attention and MLP blocks
        ("tiny-cobra-falcon-h1", "falcon_h1", "mamba2+attention"),  # both side by side in every layer
        ("tiny-cobra-zamba2", "zamba2", "shared+mamba2"),  # a shared attention block feeding Mamba-2
        ("tiny-nemotron-omni", "nemotron_h", "none"),  # Nemotron's own recipe: C-RADIO at each image's size
    ],
)
def test_the_cobra_recipe_trains_on_a_hybrid_lm(shapes, tmp_path, preset, family, kind):
    """Cobra's towers and projector on a tiny hybrid LM: finetuning learns, the model reloads, and it
    answers through the engine and the server."""
    from mambavl.bench.serve import chat_body, run_load
    from serving import LiveServer

    cfg = tiny_cfg(shapes, tmp_path / "run", model=preset, max_steps=12, learning_rate=1e-2)
    result = train(cfg)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    vlm = mambavl.load(result.model_dir)
    assert vlm.lm.config.family == family and kind in vlm.lm.config.mixers
    pb = vlm.get_prompt_builder()
    marker = "<image>\n" if vlm.config.image_placement == "placeholder" else ""
    pb.add_turn("human", marker + "How many objects are there?")
    image = str(shapes["images"] / "train-00000.png")
    answers = vlm.generate([image, image], [pb.get_prompt()] * 2, max_new_tokens=6)
    assert answers[0] == answers[1] == vlm.generate(image, pb.get_prompt(), max_new_tokens=6)
    with LiveServer(vlm) as url:
        outcome = run_load(url, [chat_body("How many objects are there?", max_tokens=6, temperature=0)], 1)[
            0
        ][0]
    assert outcome.ok and outcome.tokens >= 1


# ---- the step: clipping folded into the fused optimizer, steps read back one behind ---------------------
@pytest.mark.parametrize("kind", ["torch-fused", "triton"])
def test_clip_folded_into_fused_adamw_equals_clip_grad_norm_then_step(kind):
    """The clip factor handed to the step as its divisor (torch's fused AdamW, or TritonAdamW, which also
    takes the norm in one launch) equals clip_grad_norm_ followed by a plain step."""
    import copy

    from mambavl.train.recipe import clip_and_step

    if kind == "triton":
        pytest.importorskip("triton")
        from mambavl.train.adamw import TritonAdamW

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.GELU(), torch.nn.Linear(13, 5))
    ref, folded = copy.deepcopy(model), copy.deepcopy(model)

    def adamw(m):  # two groups, as the trainer makes (decay on matrices only)
        groups = [
            {"params": [p for p in m.parameters() if p.ndim > 1], "weight_decay": 0.1},
            {"params": [p for p in m.parameters() if p.ndim <= 1], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=1e-2, fused=True)

    opt_ref, opt_folded = adamw(ref), adamw(folded)
    if kind == "triton":
        opt_folded = TritonAdamW(opt_folded.param_groups, lr=1e-2)
    for step in range(6):
        x, scale = torch.randn(4, 7), (30.0 if step % 2 else 0.01)  # not clipped, then clipped
        (ref(x).pow(2).sum() * scale).backward()
        (folded(x).pow(2).sum() * scale).backward()
        want = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1.0)
        opt_ref.step()
        got = clip_and_step(opt_folded, list(folded.parameters()), 1.0)
        # (TritonAdamW's update rounds a few products differently: the weights drift apart by ~1e-7)
        assert float(got) == pytest.approx(float(want), rel=1e-6 if kind == "torch-fused" else 1e-5)
        assert (float(want) > 1.0) == (step % 2 == 1)  # both cases are met
        assert getattr(opt_folded, "grad_scale", None) is None  # never left for a later step
        opt_ref.zero_grad()
        opt_folded.zero_grad()
    for a, b in zip(ref.parameters(), folded.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_a_step_that_fails_still_leaves_the_step_before_it_logged(shapes, tmp_path, monkeypatch):
    from mambavl.train import trainer

    real, calls = trainer._forward_backward, []

    def third_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the third step fails")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "_forward_backward", third_fails)
    with pytest.raises(RuntimeError, match="third step"):
        train(tiny_cfg(shapes, tmp_path / "run", max_steps=4, save_every=0))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]  # step 2 was still queued when step 3 failed
    assert all(r["step_s"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in records)


@pytest.mark.slow
def test_compiled_vision_tower_trains_as_the_eager_one(shapes, tmp_path):
    """--compile-vision runs the frozen tower through torch.compile: the same losses as eager, and the
    saved model keeps the tower's parameter names. A tower being trained is refused."""
    eager = tiny_cfg(shapes, tmp_path / "eager", max_steps=2)
    compiled = tiny_cfg(shapes, tmp_path / "compiled", max_steps=2, compile_vision=True)
    train(eager)
    train(compiled)
    losses = [[r["loss"] for r in read_metrics(c.run_dir / "metrics.jsonl")] for c in (eager, compiled)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    names = [
        sorted(safe_open(f, "pt").keys())
        for f in (
            eager.run_dir / "model" / "model.safetensors",
            compiled.run_dir / "model" / "model.safetensors",
        )
    ]
    assert names[0] == names[1] and not any("_orig_mod" in n for n in names[1])
    with pytest.raises(ValueError, match="frozen vision tower"):
        tiny_cfg(shapes, tmp_path / "refused", max_steps=1, compile_vision=True, train_vision=True).check()
    with pytest.raises(ValueError, match="compile_vision must be"):
        tiny_cfg(shapes, tmp_path / "refused", compile_vision="yes").check()


def test_a_tower_that_fails_to_compile_runs_eagerly_and_says_so(monkeypatch):
    """A compiler failure at the first call (no compiler on the machine, an op it does not take) must not
    stop a run: the tower warns once and runs its eager forward from then on, with the same output."""
    import torch._dynamo

    from mambavl.vision.compiled import compile_frozen

    vlm = mambavl.create("tiny-cobra")
    tower = vlm.vision.requires_grad_(False).eval()
    pixels = vlm.pixel_values([Image.new("RGB", (40, 30), (200, 90, 10)), Image.new("RGB", (20, 50))])
    with torch.no_grad():
        expected = tower(pixels)

    def failing(fn, *args, **kwargs):
        def run(*a, **k):
            raise torch._dynamo.exc.BackendCompilerFailed(
                lambda *_: None, RuntimeError("no C compiler"), None
            )

        return run

    monkeypatch.setattr(torch, "compile", failing)
    warnings = []
    compile_frozen(tower, warn=warnings.append)
    with torch.no_grad():
        first, second = tower(pixels), tower(pixels)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert len(warnings) == 1 and "runs eagerly" in warnings[0] and "no C compiler" in warnings[0]
    trainable = mambavl.create("tiny-cobra").vision
    with pytest.raises(ValueError, match="frozen"):
        compile_frozen(trainable)
