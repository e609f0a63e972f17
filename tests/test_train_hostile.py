"""Training against damaged and hostile run directories: planted pickles, what interrupted saves leave,
incomplete checkpoints, and a disk that fills up mid-save. Each resumed run must reach the losses of an
uninterrupted one, and no file in a run directory may run code."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import mambavl
import test_train
from mambavl.train import TrainConfig, train
from mambavl.train import checkpoint as ckpt
from mambavl.train.metrics import read_metrics
from test_train import tiny_cfg

SRC = str(Path(mambavl.__file__).parents[1])
STEPS = 6  # 3 steps an epoch: checkpoints at steps 2, 3, 4 and 6; the newest two are kept (4 and 6)


shapes = test_train.shapes  # the same fixture: the tiny shapes data test_train trains on


def run_cfg(shapes, run_dir, **kw) -> TrainConfig:
    """test_train's tiny run, saving a checkpoint every 2 steps."""
    return tiny_cfg(shapes, run_dir, **({"max_steps": STEPS, "save_every": 2} | kw))


@pytest.fixture(scope="module")
def reference(shapes, tmp_path_factory) -> Path:
    """One uninterrupted run: every test damages a copy of it, then resumes."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(run_cfg(shapes, run))
    return run


@pytest.fixture
def run(reference, tmp_path) -> Path:
    return Path(shutil.copytree(reference, tmp_path / "run"))


def curve(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run / "metrics.jsonl")]


def resume(shapes, run: Path) -> str:
    """Resumes the run in `run`; returns what it logged."""
    out = io.StringIO()
    train(run_cfg(shapes, run, resume=True), console=Console(file=out, width=400))
    return out.getvalue()


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}"


def cli_args(shapes, run: Path) -> list[str]:
    """`mambavl train` arguments that resume `run` (the settings of `run_cfg`)."""
    return [
        "--model", "tiny-cobra", "--stage", "finetune", "--data", f"{shapes['finetune']}:{shapes['images']}",
        "--run-dir", str(run), "--max-steps", str(STEPS), "--save-every", "2", "--global-batch-size", "8",
        "--per-device-batch-size", "4", "--learning-rate", "3e-3", "--precision", "fp32", "--seed", "3",
        "--resume",
    ]  # fmt: skip


def listing(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---- nothing in a run directory runs code -----------------------------------------------------------------
class RunsCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class OpensFile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


PAYLOADS = {"os.system": RunsCommand, "open": OpensFile}


def plant(path: Path, payload, writer: str) -> None:
    state = {"optimizer": {"state": {}, "param_groups": [payload]}, "scheduler": {}}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_the_planted_payloads_run_code_when_unpickled(tmp_path, payload):
    """The control: what `train/checkpoint.py` once did with `optimizer.pt` (weights_only=False) runs them."""
    marker = tmp_path / "pwned"
    plant(tmp_path / "optimizer.pt", PAYLOADS[payload](marker), "torch.save")
    torch.load(tmp_path / "optimizer.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_planted_optimizer_pickle_is_refused_and_never_runs(shapes, run, tmp_path, payload, writer):
    """An `optimizer.pt` of the old format whose object runs code when unpickled, planted in place of the
    optimizer state of every checkpoint: --resume refuses, the code never runs, nothing is changed."""
    marker = tmp_path / "pwned"
    for step in (4, STEPS):
        for name in (ckpt.OPTIMIZER_STATE, ckpt.OPTIMIZER_TENSORS):
            (step_dir(run, step) / name).unlink()
        plant(step_dir(run, step) / ckpt.LEGACY_OPTIMIZER, PAYLOADS[payload](marker), writer)
    before = listing(run)
    with pytest.raises(ckpt.ResumeError) as refused:
        resume(shapes, run)
    assert not marker.exists()
    assert listing(run) == before  # metrics.jsonl and the checkpoints untouched
    message = str(refused.value)
    if writer == "torch.save":  # the newest checkpoint's file is named, and what it would have called
        assert f"{step_dir(run, STEPS) / ckpt.LEGACY_OPTIMIZER}: refused" in message
        assert {"os.system": "posix.system", "open": "io.open"}[payload] in message
    else:  # not even a torch archive: no checkpoint is complete
        assert "no complete checkpoint" in message and "optimizer.pt is not a torch checkpoint" in message


def test_a_pickle_planted_beside_the_optimizer_state_is_never_read(shapes, run, tmp_path):
    marker = tmp_path / "pwned"
    plant(step_dir(run, STEPS) / ckpt.LEGACY_OPTIMIZER, RunsCommand(marker), "torch.save")
    log = resume(shapes, run)
    assert not marker.exists()
    assert f"resumed from {step_dir(run, STEPS)}" in log


def test_the_cli_refuses_a_planted_pickle_with_a_clear_error(shapes, run, tmp_path):
    from typer.testing import CliRunner

    from mambavl.cli import app

    marker = tmp_path / "pwned"
    for step in (4, STEPS):
        for name in (ckpt.OPTIMIZER_STATE, ckpt.OPTIMIZER_TENSORS):
            (step_dir(run, step) / name).unlink()
        plant(step_dir(run, step) / ckpt.LEGACY_OPTIMIZER, RunsCommand(marker), "torch.save")
    result = CliRunner().invoke(app, ["train", *cli_args(shapes, run)])
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and "refused to load" in result.output
    assert "Traceback" not in result.output and not marker.exists()


def test_an_optimizer_pt_of_an_older_version_still_resumes_exactly(shapes, run, reference):
    """Checkpoints written before the safetensors format (torch.save of plain data) load weights-only."""
    for step in (4, STEPS):
        d = step_dir(run, step)
        tree = json.loads((d / ckpt.OPTIMIZER_STATE).read_text())
        tensors = load_file(str(d / ckpt.OPTIMIZER_TENSORS))
        state = ckpt.unflatten_state({k: tree[k] for k in ("optimizer", "scheduler")}, tensors.get, str(d))
        torch.save(state, d / ckpt.LEGACY_OPTIMIZER)  # as mambavl wrote it before
        (d / ckpt.OPTIMIZER_STATE).unlink()
        (d / ckpt.OPTIMIZER_TENSORS).unlink()
    shutil.rmtree(step_dir(run, STEPS))  # resume from step 4: steps 5 and 6 train again
    log = resume(shapes, run)
    assert f"resumed from {step_dir(run, 4)}" in log
    assert curve(run) == curve(reference)


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    sched.step()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}  # int keys, tuples
    tree, tensors = ckpt.flatten_state(state)
    assert "optimizer/state/0/exp_avg" in tensors
    back = ckpt.unflatten_state(json.loads(json.dumps(tree)), tensors.__getitem__, "here")
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert back["scheduler"] == state["scheduler"]
    for k, v in state["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(back["optimizer"]["state"][k][name], t)
    with pytest.raises(TypeError, match="optimizer/param_groups/0/hook: cannot store a function"):
        ckpt.flatten_state({"optimizer": {"param_groups": [{"hook": lambda: None}]}})


# ---- interrupted saves and incomplete checkpoints ---------------------------------------------------------
def test_what_interrupted_saves_left_is_removed_on_resume(shapes, run, reference):
    checkpoints = run / "checkpoints"
    shutil.copytree(step_dir(run, STEPS), checkpoints / ".tmp-step-0000008-4242")  # a kill mid-save
    (checkpoints / ".latest.tmp").write_text("step-0000008")
    theirs = [checkpoints / ".tmp-notes", checkpoints / "tmp-step-0000008-1", checkpoints / ".tmp-step-x"]
    for path in theirs:
        path.mkdir()
    log = resume(shapes, run)
    assert "removed what interrupted checkpoint saves left: .latest.tmp, .tmp-step-0000008-4242" in log
    assert (
        not (checkpoints / ".tmp-step-0000008-4242").exists() and not (checkpoints / ".latest.tmp").exists()
    )
    assert all(path.is_dir() for path in theirs)  # names not of our making are left alone
    assert curve(run) == curve(reference)


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def link_out(path: Path) -> None:
    """Moves the file out of the run (a whole, valid file) and leaves a symlink to it."""
    outside = path.parents[3] / f"outside-{path.name}"
    path.rename(outside)
    path.symlink_to(outside)


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "position.json missing": lambda d: remove(d / ckpt.POSITION),
    "position.json garbage": lambda d: (d / ckpt.POSITION).write_text('{"step": "six"}'),
    "position.json of another step": lambda d: (d / ckpt.POSITION).write_text(
        (d.parent / "step-0000004" / ckpt.POSITION).read_text()
    ),
    "weights cut short": lambda d: cut_short(d / ckpt.WEIGHTS),
    "optimizer tensors cut short": lambda d: cut_short(d / ckpt.OPTIMIZER_TENSORS),
    "optimizer state missing": lambda d: remove(d / ckpt.OPTIMIZER_STATE),
    "optimizer tensors of another model": lambda d: save_file(
        {"x": torch.zeros(1)}, d / ckpt.OPTIMIZER_TENSORS
    ),
    "optimizer tensors of an unknown dtype": lambda d: (d / ckpt.OPTIMIZER_TENSORS).write_bytes(
        (d / ckpt.OPTIMIZER_TENSORS).read_bytes().replace(b'"dtype":"F32"', b'"dtype":"Q32"', 1)
    ),
    "a file links out of the run": lambda d: link_out(d / ckpt.OPTIMIZER_TENSORS),
    "directory missing": remove,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_the_newest_complete_checkpoint_is_chosen_and_the_choice_explained(run, damage):
    DAMAGE[damage](step_dir(run, STEPS))
    point = ckpt.resume_point(run / "checkpoints")
    assert point.path == step_dir(run, 4)
    assert point.notes[-1] == (
        "`latest` names step-0000006; resuming from step-0000004, the newest complete checkpoint"
    )
    if damage != "directory missing":
        assert ckpt.problems(step_dir(run, STEPS))
        assert point.notes[0].startswith("skipping the incomplete checkpoint step-0000006 (")
    assert ckpt.latest(run / "checkpoints") is None  # `latest` names what cannot be resumed


def test_latest_must_name_a_checkpoint_of_this_run(run):
    checkpoints = run / "checkpoints"
    outside = shutil.copytree(step_dir(run, STEPS), run.parent / "elsewhere" / "step-0000006")
    (checkpoints / ckpt.LATEST).write_text(f"../../{outside.parent.name}/{outside.name}")
    assert ckpt.latest(checkpoints) is None
    point = ckpt.resume_point(checkpoints)
    assert point.path == step_dir(run, STEPS)
    assert point.notes == (
        "`latest` names '../../elsewhere/step-0000006', which is not a checkpoint name; resuming from "
        "step-0000006, the newest complete checkpoint",
    )
    shutil.rmtree(step_dir(run, STEPS))
    step_dir(run, STEPS).symlink_to(outside, target_is_directory=True)  # a checkpoint linked in
    assert ckpt.problems(step_dir(run, STEPS)) == [f"step-0000006 links outside {checkpoints}"]
    assert ckpt.resume_point(checkpoints).path == step_dir(run, 4)


def first_name(state: dict) -> None:
    state["optimizer"]["param_groups"][0]["params"][0] = "lm.nope.weight"


def swap_groups(state: dict) -> None:
    groups = state["optimizer"]["param_groups"]
    groups[0]["params"], groups[1]["params"] = groups[1]["params"], groups[0]["params"]


def drop_group(state: dict) -> None:
    del state["optimizer"]["param_groups"][1]


def foreign_state(state: dict) -> None:
    state["optimizer"]["state"]["lm.nope.weight"] = {}


def wrong_shape(state: dict) -> None:  # the projector's first moments stored under its second layer's name
    moments = state["optimizer"]["state"]
    moments["projector.projector.2.weight"] = moments["projector.projector.0.weight"]


def scheduler_of_another_kind(state: dict) -> None:
    state["scheduler"] = {"milestones": [3]}


@pytest.mark.parametrize(
    "mismatch", [first_name, swap_groups, drop_group, foreign_state, wrong_shape, scheduler_of_another_kind]
)
def test_optimizer_state_that_does_not_fit_the_run_is_a_clear_error(shapes, run, mismatch):
    """Plain data, well formed, but not this run's optimizer: torch's loader would skip what it does not
    recognise and train on with fresh moments."""
    state_file = step_dir(run, STEPS) / ckpt.OPTIMIZER_STATE
    state = json.loads(state_file.read_text())
    mismatch(state)
    state_file.write_text(json.dumps(state))
    with pytest.raises(ckpt.ResumeError, match="state does not fit this run's"):
        resume(shapes, run)


def test_resume_skips_a_latest_checkpoint_without_its_position(shapes, run, reference):
    """`latest` names step 6, whose position.json is missing: the run resumes from step 4 (the newest
    complete one), says so, trains steps 5 and 6 again and ends with the uninterrupted run's curve (it once
    restarted silently at step 0 and rewrote metrics.jsonl)."""
    (step_dir(run, STEPS) / ckpt.POSITION).unlink()
    log = resume(shapes, run)
    assert "skipping the incomplete checkpoint step-0000006 (position.json is missing)" in log
    assert "`latest` names step-0000006; resuming from step-0000004, the newest complete checkpoint" in log
    assert f"resumed from {step_dir(run, 4)} (step 4" in log
    assert curve(run) == curve(reference)
    assert ckpt.latest(run / "checkpoints") == step_dir(run, STEPS)  # written again, whole


def test_resume_takes_a_complete_checkpoint_newer_than_latest(shapes, run, reference):
    """A kill between renaming a checkpoint into place and moving `latest` to it."""
    (run / "checkpoints" / ckpt.LATEST).write_text("step-0000004")
    log = resume(shapes, run)
    assert "`latest` names step-0000004; resuming from step-0000006" in log
    assert f"resumed from {step_dir(run, STEPS)}" in log
    assert curve(run) == curve(reference)


def test_resume_without_a_complete_checkpoint_refuses_and_changes_nothing(shapes, run):
    (step_dir(run, STEPS) / ckpt.POSITION).unlink()
    cut_short(step_dir(run, 4) / ckpt.WEIGHTS)
    before = listing(run)
    with pytest.raises(ckpt.ResumeError) as refused:
        resume(shapes, run)
    message = str(refused.value)
    assert "no complete checkpoint to resume from" in message
    assert "step-0000006 (position.json is missing)" in message
    assert "step-0000004 (trainable.safetensors is cut short or damaged" in message
    assert "Nothing was changed" in message
    assert listing(run) == before  # never restarted at step 0: metrics.jsonl as it was


def test_resume_before_the_first_checkpoint_says_it_starts_over(shapes, run, reference):
    shutil.rmtree(run / "checkpoints")  # killed before its first save
    log = resume(shapes, run)
    assert "yet: starting again from step 0" in log
    assert curve(run) == curve(reference)


# ---- a full disk -----------------------------------------------------------------------------------------
def rewind_to_step_4(run: Path) -> None:
    """The run as it was before its last checkpoint: resuming it trains steps 5 and 6 and saves step 6."""
    shutil.rmtree(step_dir(run, STEPS))
    (run / "checkpoints" / ckpt.LATEST).write_text("step-0000004")


def fill_the_disk_at_step_6(monkeypatch, how: str) -> None:
    """Makes the disk refuse the checkpoint of step 6 part-way through."""
    real_save_file, real_fsync = ckpt.save_file, ckpt.os.fsync
    saving = []

    def save_file(tensors, filename):
        if ".tmp-step-0000006-" in filename:
            saving.append(filename)
            if filename.endswith(ckpt.OPTIMIZER_TENSORS) and how != "fsync":
                Path(filename).write_bytes(b"\0" * 1000)  # part of the file made it to disk
                if how == "safetensors":  # how safetensors reports a full disk: no errno, just text
                    raise SafetensorError(
                        "Error while serializing: I/O error: No space left on device (os error 28)"
                    )
                raise OSError(errno.ENOSPC, "No space left on device")
        real_save_file(tensors, filename)

    def fsync(fd):  # a network filesystem may report the full disk only when the data is flushed
        if how == "fsync" and saving:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    monkeypatch.setattr(ckpt.os, "fsync", fsync)


@pytest.mark.parametrize("how", ["safetensors", "oserror", "fsync"])
def test_a_full_disk_mid_save_is_a_clear_error_and_the_run_resumes(shapes, run, reference, monkeypatch, how):
    """It once failed with torch's zip writer's `unexpected pos ...`."""
    rewind_to_step_4(run)
    fill_the_disk_at_step_6(monkeypatch, how)
    with pytest.raises(ckpt.CheckpointSaveError) as full:
        resume(shapes, run)
    assert full.value.errno == errno.ENOSPC
    checkpoints = run / "checkpoints"
    assert str(full.value) == (
        f"no space left on device while writing the checkpoint step-0000006 to {checkpoints} (it needs about "
        "1 MiB); the previous checkpoint step-0000004 is intact and `latest` is unchanged. Free some space, "
        "then continue the run with --resume"
    )
    assert ckpt.latest(checkpoints) == step_dir(run, 4)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-0000004"]  # no leftovers
    monkeypatch.undo()  # space freed
    log = resume(shapes, run)
    assert f"resumed from {step_dir(run, 4)}" in log
    assert curve(run) == curve(reference)


def test_a_real_write_failure_stops_the_cli_with_a_clear_error(shapes, run, reference):
    """The real writers under a file-size limit (EFBIG part-way through the first file), in the CLI."""
    (step_dir(run, STEPS) / ckpt.POSITION).unlink()  # resume from step 4: the save at step 6 fails
    env = os.environ | {"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "MAMBAVL_DEVICE": "cpu"}
    # metrics and configs fit under the limit; a checkpoint's files do not
    limited = (
        "import resource, runpy, sys; "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY)); "
        "sys.argv = ['mambavl', *sys.argv[1:]]; runpy.run_module('mambavl.cli', run_name='__main__')"
    )
    failed = subprocess.run(
        [sys.executable, "-c", limited, "train", *cli_args(shapes, run)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = " ".join((failed.stdout + failed.stderr).split())  # rich wraps long lines
    assert failed.returncode == 1, output
    assert "error: could not write the checkpoint step-0000006" in output and "File too large" in output
    assert (
        "the previous checkpoint step-0000004 is intact and `latest` is unchanged" in output
        and "Traceback" not in output
    )
    assert (run / "checkpoints" / ckpt.LATEST).read_text() == "step-0000006"  # as it was
    assert ckpt.resume_point(run / "checkpoints").path == step_dir(run, 4)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    resume(shapes, run)
    assert curve(run) == curve(reference)
