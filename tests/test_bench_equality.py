"""`mambavl bench --train --equality`: the harness that compares the triton backend's training with the
reference's. On the GPU it runs torch against triton; here the candidate is the reference itself (the
triton kernels are checked op by op in Triton's interpreter elsewhere; a whole training run there takes
too long), which pins the harness: the same weights, data and order on both sides give no difference at all,
and a difference is reported where it is."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mambavl.bench import equality
from mambavl.cli import app


def test_the_same_backend_on_both_sides_differs_nowhere(tmp_path):
    said = []
    result = equality.run_equality(
        "tiny-cobra", tmp_path, steps=3, batch=2, device="cpu", say=said.append, backends=("torch", "torch")
    )
    grads, curve = result["gradients_fp32"], result["loss_curve"]
    assert grads["parameters"] > 10 and grads["worst_relative_norm"] == 0.0
    assert grads["worst_max_abs_over_max"] == 0.0
    assert curve["steps"] == 3 and curve["worst_abs"] == 0.0 and curve["precision"] == "fp32"
    reference = curve["curves"]["reference"]
    assert reference == curve["curves"]["candidate"] and reference[-1] < reference[0]  # it trained
    assert json.loads((tmp_path / "equality.json").read_text())["loss_curve"]["worst_abs"] == 0.0
    assert any("fp32 gradients of one step" in line for line in said)


def test_differences_are_found_and_located():
    ref = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([4.0, 0.0])}
    fast = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([4.0, 0.4])}
    got = equality.compare_gradients(ref, fast)
    assert got["worst_parameter"] == "b"
    assert got["worst_relative_norm"] == pytest.approx(0.1)
    assert got["worst_max_abs_over_max"] == pytest.approx(0.1)
    assert got["per_parameter"]["a"]["relative_norm"] == 0.0
    with pytest.raises(AssertionError, match="different parameters"):
        equality.compare_gradients(ref, {"a": ref["a"]})
    curve = equality.compare_curves([4.0, 2.0, 1.0], [4.0, 2.1, 1.0])
    assert curve["worst_step"] == 2 and curve["worst_abs"] == pytest.approx(0.1)
    assert curve["worst_relative"] == pytest.approx(0.05)


def test_the_backend_is_set_only_inside_the_block(monkeypatch):
    monkeypatch.setenv("MAMBAVL_BACKEND", "auto")
    with equality.backend("triton"):
        import os

        assert os.environ["MAMBAVL_BACKEND"] == "triton"
    assert os.environ["MAMBAVL_BACKEND"] == "auto"


def test_cli_asks_for_train():
    result = CliRunner().invoke(app, ["bench", "--equality", "--model", "tiny-cobra", "--device", "cpu"])
    assert result.exit_code != 0 and "--equality measures training: add --train" in result.output
