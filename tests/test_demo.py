"""The synthetic shapes dataset and `mambavl demo`."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from typer.testing import CliRunner

import mambavl
from mambavl.cli import app
from mambavl.data import read_llava
from mambavl.data.shapes import QUESTION_TYPES, write_shapes
from mambavl.demo import DemoConfig, run_demo
from mambavl.eval.runner import EvalConfig, evaluate_benchmark
from mambavl.eval.shapes import SHAPES


def test_shapes_data_is_valid_balanced_and_held_out(tmp_path):
    paths = write_shapes(tmp_path, train_scenes=300, heldout_scenes=100, image_size=56, multi_turn=False)
    for key in ("align", "finetune", "heldout"):
        samples, problems = read_llava(paths[key])
        assert samples and not problems
    held = json.loads(paths["heldout"].read_text())
    train_images = {r["image"] for r in json.loads(paths["finetune"].read_text())}
    assert not train_images & {r["image"] for r in held}
    kinds = Counter(r["types"][0] for r in held)
    assert set(kinds) == set(QUESTION_TYPES) and len(set(kinds.values())) == 1
    answers = Counter(r["conversations"][1]["value"] for r in held if r["types"][0] == "exists")
    assert abs(answers["yes"] - answers["no"]) <= 25  # POPE-style: balanced yes / no
    for kind in QUESTION_TYPES:  # no single answer dominates any type: priors cannot answer
        counts = Counter(r["conversations"][1]["value"] for r in held if r["types"][0] == kind)
        assert max(counts.values()) <= 0.6 * sum(counts.values()), (kind, counts)
    multi = write_shapes(tmp_path / "multi", train_scenes=10, heldout_scenes=2, image_size=56)
    conv = json.loads(multi["finetune"].read_text())[0]["conversations"]
    assert len(conv) == 2 * len(QUESTION_TYPES)


def test_demo_runs_end_to_end_and_writes_a_loadable_model(tmp_path):
    """A shortened demo (few steps): the report, the model, the refusal to overwrite."""
    cfg = DemoConfig(
        out=tmp_path / "demo",
        train_scenes=40,
        heldout_scenes=4,
        align_steps=4,
        finetune_steps=4,
        batch_size=8,
    )
    report = run_demo(cfg)
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["heldout_accuracy"] == report["heldout_accuracy"]
    assert set(saved["per_type_accuracy"]) == set(QUESTION_TYPES)
    assert saved["blind_accuracy"] is not None and saved["heldout_questions"] == 4 * len(QUESTION_TYPES)
    # with two cores the blind baseline trained in a second process; its eval is an ordinary run too
    assert saved["blind_in_parallel"] == ((os.cpu_count() or 1) >= 2)
    assert (tmp_path / "demo" / "eval" / "blind" / "run.json").is_file()
    vlm = mambavl.load(tmp_path / "demo" / "model")
    assert vlm.config.name == "tiny-cobra"
    # the held-out score is an ordinary eval run: evaluating again resumes it and changes nothing
    cfg = EvalConfig(
        ("shapes",), data_root=tmp_path / "demo" / "data", out=tmp_path / "demo" / "eval" / "model"
    )
    again = evaluate_benchmark(vlm, SHAPES, cfg)
    assert again["run_now"] == 0 and again["metrics"]["accuracy"] == report["heldout_accuracy"]
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 1 and "--overwrite" in result.output


@pytest.mark.slow
def test_the_demo_meets_its_targets(tmp_path):
    """The real demo, as the README runs it: ≥ 95 % on held-out scenes, every question type far above the
    blind baseline (the same training with the images blanked)."""
    report = run_demo(DemoConfig(out=tmp_path / "demo"))
    assert report["heldout_accuracy"] >= 0.95
    for kind, acc in report["per_type_accuracy"].items():
        assert acc >= 0.9 and acc >= report["blind_per_type_accuracy"][kind] + 0.3, kind


def test_the_demo_picture_needs_colours(tmp_path):
    """Into a pipe the coloured blocks would print as bare `▀` lines: the image's path is shown instead."""
    import io

    from PIL import Image
    from rich.console import Console

    from mambavl.demo import show_image

    path = tmp_path / "scene.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    piped = io.StringIO()
    show_image(path, Console(file=piped, width=80))
    assert "▀" not in piped.getvalue() and str(path) in piped.getvalue().replace("\n", "")
    terminal = io.StringIO()
    show_image(path, Console(file=terminal, width=80, force_terminal=True, color_system="truecolor"), width=8)
    assert terminal.getvalue().count("▀") == 8 * 4 and "200;30;30" in terminal.getvalue()
