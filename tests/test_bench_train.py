"""`mambavl bench --train` on the CPU with tiny presets: ours and the training peers measured in one run
(mamba_ssm stood in for by a fake package: it needs CUDA), the FLOPs and MFU formula in train.json, no
checkpoint written; and what any run writes on a full disk: a clear error, never half a checkpoint."""

from __future__ import annotations

import errno
import importlib
import importlib.machinery
import json
import shutil
import sys
import types
from collections import namedtuple
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from typer.testing import CliRunner

import mambavl
from mambavl.bench import peers
from mambavl.bench import train as bench
from mambavl.cli import app
from mambavl.presets import PRESETS, TINY_MAMBA, TINY_MAMBA2
from mambavl.train import TrainConfig, train
from mambavl.train import checkpoint as ckpt
from mambavl.train.metrics import read_metrics
from test_train import shapes, tiny_cfg  # noqa: F401  (shapes: a fixture)

CPU = dict(device="cpu", num_workers=0, steps=2, batch=2)


# ---- a stand-in for mamba_ssm ----------------------------------------------------------------------------
class FakeMambaLM(torch.nn.Module):
    """Stands in for mamba_ssm's MambaLMHeadModel: the same constructor and output, a tiny model inside;
    remembers how it was built and run."""

    built: ClassVar[list] = []
    Output = namedtuple("CausalLMOutput", ["logits"])

    def __init__(self, config, initializer_cfg=None, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.embedding = torch.nn.Embedding(config.vocab_size, 16, device=device, dtype=dtype)
        self.mix = torch.nn.Linear(16, 16, device=device, dtype=dtype)
        self.calls = []
        FakeMambaLM.built.append(self)

    def forward(self, input_ids, position_ids=None, inference_params=None, num_last_tokens=0):
        self.calls.append({"autocast": torch.is_autocast_enabled("cpu"), "shape": tuple(input_ids.shape)})
        hidden = torch.tanh(self.mix(self.embedding(input_ids)))
        return self.Output(hidden @ self.embedding.weight.T)


class FakeMambaConfig:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
        self.kwargs = kwargs


@pytest.fixture
def fake_mamba_ssm(monkeypatch):
    # transformers looks for mamba_ssm when its Mamba modules are imported: they are, before the fake
    for name in peers._HF_MAMBA_MODULES:
        importlib.import_module(name)
    FakeMambaLM.built = []
    modules = {
        "mamba_ssm": dict(__version__="0.0-fake", __path__=[]),
        "mamba_ssm.ops": dict(__path__=[]),
        "mamba_ssm.ops.selective_scan_interface": dict(
            selective_scan_cuda=types.ModuleType("selective_scan_cuda")
        ),
        "mamba_ssm.models": dict(__path__=[]),
        "mamba_ssm.models.config_mamba": dict(MambaConfig=FakeMambaConfig),
        "mamba_ssm.models.mixer_seq_simple": dict(MambaLMHeadModel=FakeMambaLM),
        "mamba_ssm.utils": dict(__path__=[]),
        "mamba_ssm.utils.generation": dict(),
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package="__path__" in attrs)
        vars(module).update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    return FakeMambaLM


# ---- the benchmark ---------------------------------------------------------------------------------------
def test_ours_and_both_training_peers_in_one_run(tmp_path, fake_mamba_ssm):
    said = []
    result = bench.run_train(
        "tiny-mlmamba",
        tmp_path / "out",
        checkpointing="on",
        peers=("hf-mamba", "mamba-ssm", "gpt-neox"),
        say=lambda *a, **k: said.append(" ".join(map(str, a))),
        work=tmp_path / "work",
        peak=1e12,
        **CPU,
    )
    saved = json.loads((tmp_path / "out" / "train.json").read_text())
    assert saved == json.loads(json.dumps(result))
    ours = saved["mambavl_checkpointing_on"]
    hf = saved["transformers_mamba_checkpointing_on"]
    ssm = saved["mamba_ssm_checkpointing_off"]
    for entry in (ours, hf, ssm):
        assert entry["tokens_per_s"] > 0 and entry["step_s"] > 0 and entry["peak_memory_gib"] is None  # CPU
        assert entry["tokens_per_s"] == pytest.approx(entry["positions_per_step"] / entry["step_s"], rel=0.05)
        assert entry["mfu"] == pytest.approx(entry["flops_per_step"]["total"] / entry["step_s"] / 1e12)
    assert len(ours["losses"]) == 2 and len(ssm["losses"]) == 2
    assert ours["adamw_kernels"] == "torch"  # what ran (on a CPU torch's AdamW whatever is asked)

    # the work each counts: 6 × LM parameters per LM position; the towers' forward for ours only
    sizes = bench.model_sizes("tiny-mlmamba")
    assert saved["lm_params"] == sizes["lm_params"] == hf["params"]  # the same LM config
    assert ours["flops_per_step"] == {
        "lm": 6 * sizes["lm_params"] * ours["positions_per_step"],
        "vision": 2 * sizes["vision_params"] * sizes["patches_per_image"] * 2,  # one image per row
        "total": 6 * sizes["lm_params"] * ours["positions_per_step"]
        + 2 * sizes["vision_params"] * sizes["patches_per_image"] * 2,
    }
    assert ssm["flops_per_step"]["vision"] == 0 == hf["flops_per_step"]["vision"]
    assert "6 × LM parameters × LM positions" in saved["mfu_formula"]
    assert "2 × vision parameters × patches per image" in saved["mfu_formula"]

    # the peers' rows are as long as ours on average (image + text positions)
    length = saved["peer_positions_per_row"]
    assert length == round(ours["positions_per_step"] / 2) and length > sizes["patches_per_image"]
    assert ssm["positions_per_step"] == hf["positions_per_step"] == 2 * length

    # mamba_ssm's model: the preset's LM config, bf16 autocast, every step a forward on [batch, length]
    (model,) = fake_mamba_ssm.built
    lm = PRESETS["tiny-mlmamba"].lm
    kwargs = model.config.kwargs
    assert [kwargs[k] for k in ("d_model", "n_layer", "vocab_size")] == [
        lm.d_model,
        lm.n_layer,
        lm.vocab_size,
    ]
    assert kwargs["ssm_cfg"]["layer"] == "Mamba2"
    assert kwargs["rms_norm"] and kwargs["fused_add_norm"] and kwargs["residual_in_fp32"]
    assert model.calls == [{"autocast": True, "shape": (2, length)}] * 2
    assert ssm["gradient_checkpointing"] is False and hf["gradient_checkpointing"] is True
    assert ssm["name"] == "mamba_ssm 0.0-fake MambaLMHeadModel"

    assert saved["notes"] == ["gpt-neox: an inference peer only; no training step measured"]
    assert any(line.startswith("mamba_ssm_checkpointing_off: ") and "tok/s" in line for line in said)
    # no checkpoint and no model: at full size each is tens of GB
    run = tmp_path / "work" / "mambavl_checkpointing_on"
    assert (run / "metrics.jsonl").is_file()
    assert not (run / "checkpoints").exists() and not (run / "model").exists()


@pytest.mark.parametrize(
    "lm,layer,sizes",
    [
        (TINY_MAMBA, "Mamba1", ("d_state", "d_conv", "dt_rank")),  # cobra+3b's kind
        (TINY_MAMBA2, "Mamba2", ("headdim", "d_state", "ngroups", "chunk_size")),  # mlmamba+3b's
    ],
    ids=["mamba1", "mamba2"],
)
def test_the_mamba_ssm_peer_takes_the_lms_mixer(fake_mamba_ssm, lm, layer, sizes):
    out = bench.mamba_ssm_peer(lm, steps=2, batch=2, length=9, device=torch.device("cpu"))
    kwargs = fake_mamba_ssm.built[0].config.kwargs
    assert kwargs["ssm_cfg"]["layer"] == layer
    assert {k: kwargs["ssm_cfg"][k] for k in sizes} == {k: getattr(lm, k) for k in sizes}
    assert [kwargs[k] for k in ("d_model", "n_layer", "vocab_size")] == [
        lm.d_model,
        lm.n_layer,
        lm.vocab_size,
    ]
    assert kwargs["rms_norm"] and kwargs["fused_add_norm"] and kwargs["residual_in_fp32"]
    assert out["positions_per_step"] == 18 and out["step_s"] > 0 and len(out["losses"]) == 2
    assert any(f'"layer": "{layer}"' in note for note in out["notes"])


def test_without_mamba_ssm_ours_is_still_reported(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # import mamba_ssm now raises ImportError
    said = []
    result = bench.run_train(
        "tiny-mlmamba",
        tmp_path,
        checkpointing="off",
        peers=("mamba-ssm",),
        say=lambda *a, **k: said.append(" ".join(map(str, a))),
        **CPU,
    )
    assert result["mambavl_checkpointing_off"]["tokens_per_s"] > 0
    assert result["mambavl_checkpointing_off"]["mfu"] is None  # no peak known on a CPU
    error = result["mamba_ssm_checkpointing_off"]["error"]
    assert "mamba_ssm is not importable" in error and "pip install mamba-ssm" in error
    assert f"mamba-ssm: not measured: {error}" in said
    assert json.loads((tmp_path / "train.json").read_text())["mamba_ssm_checkpointing_off"] == {
        "error": error
    }


def test_bench_train_refuses_bad_options(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown peers \['llama'\]; the training peers are hf-mamba, mamba-ssm"
    ):
        bench.run_train("tiny-cobra", tmp_path, peers=("llama",), device="cpu")
    with pytest.raises(ValueError, match="checkpointing must be one of"):
        bench.run_train("tiny-cobra", tmp_path, checkpointing="sometimes", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            bench.run_train("tiny-cobra", tmp_path)
    args = ["bench", "--train", "--model", "tiny-cobra", "--device", "cpu", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--peers", "llama"])
    assert result.exit_code == 1 and "unknown peers ['llama']" in result.output
    assert not (tmp_path / "train.json").exists()


# ---- what a run writes -----------------------------------------------------------------------------------
def test_save_final_off_writes_no_final_checkpoint_and_no_model(shapes, tmp_path):  # noqa: F811
    result = train(tiny_cfg(shapes, tmp_path / "none", max_steps=2, save_final=False))
    assert result.model_dir is None and result.steps == 2
    assert not (tmp_path / "none" / "checkpoints").exists() and not (tmp_path / "none" / "model").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "none" / "metrics.jsonl")] == [1, 2]
    # the checkpoints asked for along the way are still written; only the last one is left out
    train(
        tiny_cfg(shapes, tmp_path / "some", max_steps=4, save_every=2, keep_checkpoints=9, save_final=False)
    )
    names = sorted(p.name for p in (tmp_path / "some" / "checkpoints").iterdir())
    assert names == ["latest", "step-0000002", "step-0000003"]  # every 2 steps, and the epoch's end (3)


def full_disk_at(step: int, monkeypatch) -> None:
    """The disk fills up part-way through the checkpoint of `step` (its optimizer file, half written)."""
    real = ckpt.save_file

    def save_file(tensors, filename):
        if f".tmp-step-{step:07d}-" in filename and filename.endswith(ckpt.OPTIMIZER_TENSORS):
            Path(filename).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, filename)

    monkeypatch.setattr(ckpt, "save_file", save_file)


def test_a_full_disk_mid_checkpoint_leaves_the_previous_one_and_resumes(shapes, tmp_path, monkeypatch):  # noqa: F811
    reference = tmp_path / "reference"
    train(tiny_cfg(shapes, reference, max_steps=4, save_every=2, keep_checkpoints=9))
    run = tmp_path / "run"
    cfg = tiny_cfg(shapes, run, max_steps=4, save_every=2, keep_checkpoints=9)
    full_disk_at(4, monkeypatch)
    with pytest.raises(ckpt.CheckpointSaveError) as full:
        train(cfg)
    checkpoints = run / "checkpoints"
    assert full.value.errno == errno.ENOSPC
    assert str(full.value).startswith(
        f"no space left on device while writing the checkpoint step-0000004 to {checkpoints}"
    )
    assert str(full.value).endswith(
        "MiB); the previous checkpoint step-0000003 is intact and `latest` is unchanged. Free some space, "
        "then continue the run with --resume"
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-0000002", "step-0000003"]
    assert not ckpt.problems(checkpoints / "step-0000003") and ckpt.latest(checkpoints).name == "step-0000003"
    monkeypatch.undo()  # space freed
    train(TrainConfig(**(vars(cfg) | {"resume": True})))
    assert read_metrics(run / "metrics.jsonl") != []
    losses = [[r["loss"] for r in read_metrics(d / "metrics.jsonl")] for d in (reference, run)]
    assert losses[0] == losses[1]  # resumed bit-exactly from step 3
    assert ckpt.latest(checkpoints).name == "step-0000004"


def test_a_checkpoint_that_cannot_fit_is_refused_before_a_byte_is_written(shapes, tmp_path, monkeypatch):  # noqa: F811
    run = tmp_path / "run"
    train(tiny_cfg(shapes, run, max_steps=2))
    checkpoints = run / "checkpoints"
    before = sorted(p.name for p in checkpoints.iterdir())
    usage = shutil.disk_usage(checkpoints)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage._replace(free=4096))
    vlm = mambavl.create("tiny-cobra")
    opt = torch.optim.AdamW(vlm.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(ckpt.CheckpointSaveError) as refused:
        ckpt.save(checkpoints, vlm, opt, sched, ckpt.Position(3, 0, 3, 0, 0.0), ckpt.World())
    assert refused.value.errno == errno.ENOSPC
    assert str(refused.value).startswith(
        f"not enough space to write the checkpoint step-0000003 to {checkpoints}: it needs about "
    )
    assert str(refused.value).endswith(
        "MiB and the disk has 0 MiB free; nothing was written, the previous checkpoint step-0000002 is "
        "intact and `latest` is unchanged. Free some space, then continue the run with --resume"
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == before
    # a file system that reports no size at all (some network mounts) is not refused
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage._replace(total=0, free=0))
    ckpt.save(checkpoints, vlm, opt, sched, ckpt.Position(3, 0, 3, 0, 0.0), ckpt.World())
    assert ckpt.latest(checkpoints).name == "step-0000003"


def test_a_full_disk_when_saving_the_model_is_clear_and_resume_writes_it(shapes, tmp_path, monkeypatch):  # noqa: F811
    import safetensors.torch

    run = tmp_path / "run"
    cfg = tiny_cfg(shapes, run, max_steps=2)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)  # the model's writer, not the checkpoints'
    with pytest.raises(ckpt.CheckpointSaveError) as full:
        train(cfg)
    assert str(full.value).startswith(
        f"could not write the trained model to {run / 'model'}: no space left on device (it needs about "
    )
    assert str(full.value).endswith(
        "MiB); the run's last checkpoint step-0000002 is intact. Free some space, then run the same command "
        "with --resume: it writes the model without training again"
    )
    assert not (run / "model" / "model.safetensors").exists()
    monkeypatch.undo()
    result = train(TrainConfig(**(vars(cfg) | {"resume": True})))
    assert result.model_dir == run / "model" and mambavl.load(result.model_dir) is not None
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]  # nothing trained again


def test_profile_adds_one_step_outside_the_figures(tmp_path):
    """--profile: one more training step runs under the profiler, its table written beside train.json;
    the timed figures and losses are those of the asked-for steps only."""
    said = []
    result = bench.run_train(
        "tiny-mlmamba",
        tmp_path / "out",
        checkpointing="off",
        peers=(),
        say=lambda *a, **k: said.append(" ".join(map(str, a))),
        work=tmp_path / "work",
        profile=True,
        **CPU,
    )
    ours = result["mambavl_checkpointing_off"]
    assert len(ours["losses"]) == CPU["steps"]
    assert (
        len(read_metrics(tmp_path / "work" / "mambavl_checkpointing_off" / "metrics.jsonl"))
        == CPU["steps"] + 1
    )
    table = (tmp_path / "out" / "profile_mambavl_checkpointing_off.txt").read_text()
    assert table.startswith("CPU self time") and table in said
    rows = [line.split() for line in table.splitlines()[3:] if line.strip()]
    assert rows and all(float(r[0]) >= 0 and r[1].endswith("%") and int(r[2]) >= 1 for r in rows)
    assert any("aten::" in line for line in table.splitlines())  # the step's ops are named


def test_profile_summary_orders_by_time_and_shares_add_up():
    from torch.autograd import DeviceType

    from mambavl.train.profile import summary

    Event = namedtuple(
        "Event", ["key", "count", "self_cpu_time_total", "self_device_time_total", "device_type"]
    )
    cpu = DeviceType.CPU
    events = [Event("a", 1, 100.0, 0.0, cpu), Event("b", 2, 300.0, 0.0, cpu), Event("c", 1, 0.0, 0.0, cpu)]
    lines = summary(events, rows=5).splitlines()
    assert lines[0] == "CPU self time 0.4 ms in all; the top 5:"
    body = [line.split() for line in lines[3:]]
    assert [r[-1] for r in body] == ["b", "a"]  # slowest first; nothing timed, nothing listed
    assert [r[1] for r in body] == ["75.0%", "25.0%"]
    # on a GPU: the kernels alone (the op that launched one carries its time too)
    on_gpu = [
        Event("kernel", 4, 0.0, 2000.0, DeviceType.CUDA),
        Event("op launching it", 4, 10.0, 2000.0, cpu),
        Event("cpu-only", 1, 50.0, 0.0, cpu),
    ]
    lines = summary(on_gpu).splitlines()
    assert lines[0] == "device (kernels) self time 2.0 ms in all; the top 40:"
    assert [line.split()[-1] for line in lines[3:]] == ["kernel"]


def test_scan_tile_candidates_start_with_the_tiles_of_before_and_are_all_valid():
    """The training scan's sweep measures the channel-contiguous tiles first (the baseline of the same run),
    then time-contiguous candidates that each give a thread 2 to 16 steps of a tile."""
    from mambavl.bench.train_kernels import scan_candidates
    from mambavl.ops.triton.scan import ScanTiles

    candidates = scan_candidates()
    assert candidates[0] == (128, 4, 1, 1, False, None)
    assert all(major for *_, major, _ in candidates[1:]) and len(set(candidates)) == len(candidates)
    assert {regs for *_, regs in candidates} == {None, 168, 128}  # register caps on the first few
    for chunk, block_d, warps, slots, major, regs in candidates:
        tiles = ScanTiles(
            chunk=chunk,
            train_block_d=block_d,
            train_warps=warps,
            bwd_slots=slots,
            train_time_major=major,
            train_maxnreg=regs,
        )
        assert tiles.train_launch() == dict(num_warps=warps, **({"maxnreg": regs} if regs else {}))
        if major:
            assert 2 <= chunk * block_d // (32 * warps) <= 16


def test_conv_tile_candidates_start_with_the_defaults():
    """The conv sweep times the backward tiles of the layout whose Mamba kernel takes a tile (the Mamba-1
    node's time-contiguous x; channel-contiguous x of width up to 4 runs the step-by-step kernel), the tile
    in use first (the baseline of the same run)."""
    from mambavl.bench.train_kernels import CONV_BWD_CANDIDATES
    from mambavl.ops.triton import conv

    assert set(CONV_BWD_CANDIDATES) == {"time"}
    for layout, tiles in CONV_BWD_CANDIDATES.items():
        assert tiles[0] == conv.TILES[f"bwd_{layout}"] and len(set(tiles)) == len(tiles)
