"""`--report-to wandb|tensorboard`: the trackers hold what metrics.jsonl holds (read back with each
tool's own reader), a resumed run reads as one, a missing package is a one-line error before anything is
built, and only rank 0 reports. W&B runs offline only: no test ever reaches the network."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mambavl.train
from mambavl.cli import app
from mambavl.train import TrainConfig, trackers, train
from mambavl.train import checkpoint as ckpt
from mambavl.train.metrics import read_metrics
from test_train import SRC, _cli_args, shapes, tiny_cfg  # noqa: F401  (shapes: a fixture)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch, no_network):
    """W&B in offline mode, its settings and caches under tmp_path, quiet; the run's files go under the
    run directory (WANDB_DIR unset)."""
    pytest.importorskip("wandb")
    home = tmp_path / "wandb-home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    for var in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    return home


def tensorboard_scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / trackers.TENSORBOARD_DIR))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def wandb_records(path: Path) -> dict[str, list]:
    """A `.wandb` file (W&B's offline run log), read with W&B's own reader: the run record and each
    logged history row, by record type."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(path))
    out: dict[str, list] = {}
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            out.setdefault("history", []).append(row)
        elif kind == "run":
            out.setdefault("run", []).append(record.run)
        elif kind == "config":
            out.setdefault("config", []).append(record.config)
    return out


def wandb_runs(run: Path) -> list[Path]:
    return sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))


def config_of(run_record) -> dict:
    return {u.key: json.loads(u.value_json) for u in run_record.config.update}


def float32(x: float) -> float:
    import numpy as np

    return float(np.float32(x))


# ---- what the trackers hold ------------------------------------------------------------------------------
def test_both_trackers_hold_the_jsonl_history(shapes, tmp_path, offline_wandb):  # noqa: F811
    run = tmp_path / "run"
    train(tiny_cfg(shapes, run, max_steps=4, report_to=("tensorboard", "wandb")))
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]

    # TensorBoard stores scalars as float32: the JSONL's values, rounded so
    for name in ("loss", "lr", "grad_norm", "tokens_per_s"):
        got = tensorboard_scalars(run, f"train/{name}")
        assert got == [(r["step"], float32(r[name])) for r in records], name
    assert len(list((run / trackers.TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1

    # W&B's offline run, under the run dir, holds every logged row exactly (JSON) and the run's options
    (path,) = wandb_runs(run)
    saved = wandb_records(path)
    history = saved["history"]
    assert [row["_step"] for row in history] == [1, 2, 3, 4]
    for row, record in zip(history, records, strict=True):
        assert {k: row[f"train/{k}"] for k in ("loss", "lr", "grad_norm", "epoch")} == {
            k: record[k] for k in ("loss", "lr", "grad_norm", "epoch")
        }
    (run_record,) = saved["run"]
    assert run_record.display_name == "run"
    run_id = json.loads((run / trackers.STATE_FILE).read_text())["wandb"]["id"]
    assert run_record.run_id == run_id and path.name == f"run-{run_id}.wandb"
    options = {}
    for record in saved.get("config", []):
        options |= {u.key: json.loads(u.value_json) for u in record.update}
    assert options["stage"] == "finetune" and options["report_to"] == ["tensorboard", "wandb"]


def test_a_resumed_run_reads_as_one(shapes, tmp_path, offline_wandb):  # noqa: F811
    """Resumed from step 2 after steps 3 and 4 were logged: TensorBoard purges the steps past the
    checkpoint (as metrics.jsonl drops them), and W&B continues the same run id."""
    run = tmp_path / "run"
    cfg = tiny_cfg(
        shapes, run, max_steps=4, save_every=2, keep_checkpoints=9, report_to=("tensorboard", "wandb")
    )
    train(cfg)
    whole = tensorboard_scalars(run, "train/loss")
    for step in (3, 4):
        shutil.rmtree(run / "checkpoints" / f"step-{step:07d}")
    (run / "checkpoints" / ckpt.LATEST).write_text("step-0000002")
    train(TrainConfig(**(vars(cfg) | {"resume": True})))
    assert tensorboard_scalars(run, "train/loss") == whole  # each step once, bit-exact resume
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]
    first, second = wandb_runs(run)
    assert first.name == second.name  # the same W&B run, continued (`wandb sync` joins them)
    assert [row["_step"] for row in wandb_records(second)["history"]] == [3, 4]


def test_log_every_is_respected(shapes, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    train(tiny_cfg(shapes, run, max_steps=5, log_every=2, report_to=("tensorboard",)))
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps == [2, 4, 5]  # and the last step
    assert [s for s, _ in tensorboard_scalars(run, "train/loss")] == steps


# ---- options and errors ----------------------------------------------------------------------------------
def test_report_to_is_parsed_and_checked(shapes, tmp_path):  # noqa: F811
    base = {"model": "tiny-cobra", "run_dir": str(tmp_path / "r"), "max_steps": 1}
    assert TrainConfig.from_dict(base | {"report_to": "wandb, tensorboard"}).report_to == (
        "wandb",
        "tensorboard",
    )
    assert TrainConfig.from_dict(base | {"report_to": ["tensorboard", "tensorboard"]}).report_to == (
        "tensorboard",
    )
    assert TrainConfig.from_dict(base | {"report_to": None}).report_to == ()
    assert TrainConfig.from_dict(base | {"report_to": "none"}).resolved().report_to == ()
    with pytest.raises(
        ValueError, match=r"unknown tracker\(s\) \['mlflow'\]; choose from wandb, tensorboard"
    ):
        TrainConfig.from_dict(base | {"report_to": "mlflow"}).resolved()
    with pytest.raises(ValueError, match="unknown tracker"):
        train(tiny_cfg(shapes, tmp_path / "run", report_to=("tensorbored",)))
    assert not (tmp_path / "run").exists()


def test_cli_takes_repeated_and_comma_separated_trackers(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(mambavl.train, "train", lambda cfg, **kw: seen.append(cfg))
    args = ["train", "--model", "tiny-cobra", "--run-dir", str(tmp_path / "r"), "--max-steps", "1"]
    result = CliRunner().invoke(app, [*args, "--report-to", "wandb,tensorboard", "--report-to", "wandb"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [cfg.report_to for cfg in seen] == [("wandb", "tensorboard"), ()]


@pytest.mark.parametrize("name", trackers.TRACKERS)
def test_a_missing_package_is_one_line_before_anything_runs(shapes, tmp_path, monkeypatch, name):  # noqa: F811
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == name else real(mod, *a))
    with pytest.raises(trackers.TrackerUnavailable) as missing:
        train(tiny_cfg(shapes, tmp_path / "run", report_to=(name,)))
    assert str(missing.value) == f"--report-to {name} needs the {name} package: pip install {name}"
    assert not (tmp_path / "run").exists()  # nothing built, nothing written

    data = f"{shapes['finetune']}:{shapes['images']}"
    args = ["train", "--model", "tiny-cobra", "--data", data, "--run-dir", str(tmp_path / "cli")]
    result = CliRunner().invoke(app, [*args, "--report-to", name])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: --report-to {name} needs the {name} package: pip install {name}"
    assert not (tmp_path / "cli").exists()


def test_trackers_that_fail_to_start_are_closed_and_named(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    import wandb

    def refuse(**kwargs):
        raise RuntimeError("api_key not configured")

    monkeypatch.setattr(wandb, "init", refuse)
    closed = []
    monkeypatch.setattr(trackers.TensorBoard, "finish", lambda self, failed=False: closed.append(failed))
    with pytest.raises(
        trackers.TrackerError, match=r"W&B could not start a run .*api_key.* WANDB_MODE=offline"
    ):
        trackers.Trackers.open(("tensorboard", "wandb"), tmp_path, {})
    assert closed == [True]  # the tracker opened first was finished, not left open


@pytest.mark.slow
def test_only_rank_0_reports(shapes, tmp_path):  # noqa: F811
    """torchrun with 2 CPU processes: one TensorBoard event file, holding what metrics.jsonl holds."""
    pytest.importorskip("tensorboard")
    env = os.environ | {
        "PYTHONPATH": SRC,
        "OMP_NUM_THREADS": "1",
        "MAMBAVL_DEVICE": "cpu",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    run = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", port, "-m", "mambavl.cli", "train", *_cli_args(shapes, run, steps=3),
        "--report-to", "tensorboard",
    ]  # fmt: skip
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(list((run / trackers.TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1
    records = read_metrics(run / "metrics.jsonl")
    assert tensorboard_scalars(run, "train/loss") == [(r["step"], float32(r["loss"])) for r in records]


def test_profile_step_writes_where_that_steps_time_went(shapes, tmp_path, monkeypatch):  # noqa: F811
    """Step N runs under the profiler: its table lands in the run dir, and the run trains as without it
    (the same losses); `mambavl train --profile-step N` asks for it."""
    plain = train(tiny_cfg(shapes, tmp_path / "plain", max_steps=2))
    profiled = train(tiny_cfg(shapes, tmp_path / "profiled", max_steps=2, profile_step=2))
    table = (profiled.run_dir / "profile.txt").read_text()
    assert table.startswith("CPU self time") and "aten::" in table
    assert not (plain.run_dir / "profile.txt").exists()
    losses = [r["loss"] for r in read_metrics(profiled.run_dir / "metrics.jsonl")]
    assert losses == [r["loss"] for r in read_metrics(plain.run_dir / "metrics.jsonl")]
    with pytest.raises(ValueError, match="profile_step must be a step number"):
        train(tiny_cfg(shapes, tmp_path / "bad", profile_step=-1))
    seen = []
    monkeypatch.setattr(mambavl.train, "train", lambda cfg, **kw: seen.append(cfg))
    args = ["train", "--model", "tiny-cobra", "--run-dir", str(tmp_path / "r"), "--max-steps", "3"]
    result = CliRunner().invoke(app, [*args, "--profile-step", "3"])
    assert result.exit_code == 0, result.output
    assert seen[0].profile_step == 3
