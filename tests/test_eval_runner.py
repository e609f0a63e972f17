"""The eval runner on the demo's shapes benchmark: answers equal to `generate`, exact resumption after an
interruption, unreadable images counted and scored wrong, option probabilities, the CLI and the report."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import mambavl
from mambavl.cli import app
from mambavl.eval.runner import EvalConfig, evaluate_benchmark, prompt_for, read_done
from mambavl.eval.shapes import SHAPES


@pytest.fixture(scope="module")
def vlm(demo_model_dir):
    return mambavl.load(demo_model_dir)


@pytest.fixture(scope="module")
def data(demo_model_dir):
    return demo_model_dir.parent / "data"


def test_answers_equal_generate_and_an_interrupted_run_resumes_exactly(vlm, data, tmp_path):
    cfg = EvalConfig(benchmarks=("shapes",), data_root=data, out=tmp_path, limit=20, batch_size=8)
    first = evaluate_benchmark(vlm, SHAPES, cfg)
    assert first["samples"] == first["run_now"] == 20 and first["unreadable_images"] == 0
    samples = SHAPES.read(data)[:20]
    path = tmp_path / "shapes" / "predictions.jsonl"
    records = list(read_done(path).values())
    want = vlm.generate(
        [mambavl.vision.load_image(s.image) for s in samples],
        [prompt_for(vlm, SHAPES, s) for s in samples],
        max_new_tokens=10,
    )
    assert [r["prediction"] for r in records] == want
    assert first["metrics"]["accuracy"] == sum(r["correct"] for r in records) / 20
    # an interruption: 7 whole lines and half of the 8th on disk
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:7]) + lines[7][:10])
    again = evaluate_benchmark(vlm, SHAPES, cfg)
    assert again["run_now"] == 13  # the cut line's sample runs again, the 7 finished ones never
    ids = [json.loads(line)["id"] for line in path.read_bytes().splitlines()]
    assert sorted(ids) == sorted(s.id for s in samples) and len(ids) == 20  # no sample scored twice
    assert again["metrics"] == first["metrics"]
    assert evaluate_benchmark(vlm, SHAPES, cfg)["run_now"] == 0


def test_an_unreadable_image_is_counted_named_and_wrong(vlm, data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    first = SHAPES.read(copy)[0]
    first.image.write_bytes(b"not a png")
    cfg = EvalConfig(benchmarks=("shapes",), data_root=copy, out=tmp_path / "out", limit=8)
    result = evaluate_benchmark(vlm, SHAPES, cfg)
    broken = [s for s in SHAPES.read(copy)[:8] if s.image == first.image]  # a scene's questions share it
    assert 0 < len(broken) < 8
    assert result["unreadable_images"] == len(broken) and first.image.name in result["unreadable"][0]
    record = read_done(tmp_path / "out" / "shapes" / "predictions.jsonl")[first.id]
    assert record["correct"] == 0.0 and record["prediction"] == "" and "not an image" in record["error"]
    others = read_done(tmp_path / "out" / "shapes" / "predictions.jsonl")
    assert result["samples"] == 8 and sum("error" not in r for r in others.values()) == 8 - len(broken)


def test_option_probabilities_are_the_first_token_softmax(vlm, data):
    sample = next(s for s in SHAPES.read(data) if s.meta["type"] == "exists")
    image, prompt = mambavl.vision.load_image(sample.image), prompt_for(vlm, SHAPES, sample)
    (probs,) = vlm.option_probabilities([image], [prompt], [("yes", "no")])
    assert set(probs) == {"yes", "no"} and abs(sum(probs.values()) - 1) < 1e-6
    with torch.inference_mode():  # by hand: the whole prompt through the LM, the last position's logits
        batch, _ = vlm.prepare([image], [prompt])
        logits = vlm.lm(inputs_embeds=batch.embeds)[0, -1].float()
    ids = [vlm.tokenizer.encode(o)[0] for o in ("yes", "no")]
    want = torch.softmax(logits[ids], -1).tolist()
    assert probs["yes"] == pytest.approx(want[0], abs=1e-5) and probs["no"] == pytest.approx(
        want[1], abs=1e-5
    )
    with pytest.raises(ValueError, match="share a first token"):
        vlm.option_probabilities([image], [prompt], [("yes", "yellow")])


def test_the_eval_command_and_the_report(demo_model_dir, data, tmp_path):
    runner = CliRunner()
    base = [
        "eval",
        "--model",
        str(demo_model_dir),
        "--data-root",
        str(data),
        "--limit",
        "10",
        "--batch-size",
        "5",
    ]
    result = runner.invoke(app, [*base, "--benchmark", "shapes", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "a" / "results.json").read_text())
    metrics = summary["benchmarks"]["shapes"]["metrics"]
    assert metrics["questions"] == 10 and 0 <= metrics["accuracy"] <= 1
    assert set(summary["versions"]) >= {"mambavl", "torch", "python"}
    assert "| shapes | accuracy |" in (tmp_path / "a" / "results.md").read_text()
    rerun = runner.invoke(app, [*base, "--benchmark", "shapes", "--out", str(tmp_path / "a")])
    assert rerun.exit_code == 0
    assert json.loads((tmp_path / "a" / "results.json").read_text())["benchmarks"]["shapes"]["run_now"] == 0
    runner.invoke(app, [*base, "--benchmark", "shapes", "--out", str(tmp_path / "b"), "--limit", "5"])
    png = tmp_path / "report.png"
    report = runner.invoke(
        app, ["eval", "report", str(tmp_path / "a"), str(tmp_path / "b"), "--png", str(png)]
    )
    assert report.exit_code == 0, report.output
    assert png.stat().st_size > 1000 and "(a)" in report.output and "(b)" in report.output
    unknown = runner.invoke(app, [*base, "--benchmark", "nope", "--out", str(tmp_path / "c")])
    assert unknown.exit_code == 1 and "unknown benchmark 'nope'" in unknown.output
    elsewhere = [*base[:4], str(tmp_path), "--benchmark", "shapes", "--out", str(tmp_path / "d")]
    missing = runner.invoke(app, elsewhere)
    assert missing.exit_code == 1 and "heldout.json" in missing.output
    bad_report = runner.invoke(app, ["eval", "report", str(tmp_path / "nothing")])
    assert bad_report.exit_code == 1 and "results.json" in bad_report.output


def test_every_benchmark_runs_from_its_fixture(tmp_path):
    """`mambavl eval` over every registered benchmark's official-format fixture, each in its own folder
    under one --data-root; an unreadable POPE image is counted and scored wrong."""
    from eval_fixtures import WRITERS, write

    model = mambavl.create("tiny-cobra").save_pretrained(tmp_path / "model")
    for name in WRITERS:
        write(name, tmp_path / "data" / name)
    broken = next((tmp_path / "data" / "pope-random").rglob("*.jpg"))
    broken.write_bytes(b"broken")
    names = ",".join(WRITERS)
    args = ["eval", "--model", str(model), "--benchmark", names, "--data-root", str(tmp_path / "data")]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out"), "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(summary["benchmarks"]) == set(WRITERS)
    for name, result in summary["benchmarks"].items():
        assert result["samples"] > 0 and result["metrics"], name
    pope = summary["benchmarks"]["pope-random"]
    assert pope["unreadable_images"] >= 1 and broken.name in pope["unreadable"][0]
    records = read_done(tmp_path / "out" / "pope-random" / "predictions.jsonl").values()
    wrong = [r for r in records if r.get("error")]
    assert wrong and all(r["accuracy"] == 0.0 for r in wrong if "accuracy" in r)
    probability = CliRunner().invoke(
        app,
        [
            *args,
            "--out",
            str(tmp_path / "prob"),
            "--mode",
            "probability",
            "--benchmark",
            "pope-random,mme,vsr",
        ],
    )
    assert probability.exit_code == 0, probability.output


def test_a_missing_file_fails_before_any_progress_bar_or_model_load(tmp_path, monkeypatch):
    """What a terminal shows: the error naming the file, and no `0/?` bar drawn before it; the data is
    read before the model (a model that does not exist is not reached)."""
    import io

    from rich.console import Console

    import mambavl.cli as cli

    screen = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=screen, force_terminal=True, width=120))
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--benchmark", "shapes"]
    result = CliRunner().invoke(app, [*argv, "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    shown = screen.getvalue()
    assert result.exit_code == 1 and "heldout.json" in shown
    assert "0/?" not in shown and "shapes" not in shown.split("error")[0] and "no-model" not in shown
    assert not (tmp_path / "o").exists()


def test_the_report_chart_labels_every_bar_and_its_legend_covers_none():
    from mambavl.eval.report import figure

    def run(name, shapes, pope):
        return {
            "model": name,
            "benchmarks": {
                "shapes": {"metrics": {"accuracy": shapes, "questions": 10}},
                "pope-random": {"metrics": {"accuracy": pope, "f1": pope}},
            },
        }

    # bars at 100 % in the first and last groups: where a legend inside the axes would sit
    summaries = [run("a-long-model-name (run-a)", 1.0, 1.0), run("b (run-b)", 0.372, 0.5), run("c", 1.0, 0.9)]
    fig = figure(summaries)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    bars = ax.patches
    assert len(bars) == 3 * 3  # three runs, three fraction metrics
    legend = ax.get_legend().get_window_extent(renderer)
    for bar in bars:
        assert not legend.overlaps(bar.get_window_extent(renderer)), bar
    labels = [t.get_text() for t in ax.texts]
    want = [f"{100 * v:.1f}" for v in (1.0, 1.0, 1.0, 0.372, 0.5, 0.5, 1.0, 0.9, 0.9)]
    assert labels == want
    top = ax.get_window_extent(renderer).y1
    assert all(t.get_window_extent(renderer).y1 <= top for t in ax.texts)  # a 100 % bar's value fits
    import matplotlib.pyplot as plt

    plt.close(fig)
