"""An eval run directory knows whose answers it holds: two models in folders of the same name get runs (and
scores) of their own, a rerun with another model, mode or answer length is refused with the fixes named,
`--overwrite` starts over, and the same model resumes without its weights being read again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mambavl
from mambavl.cli import app
from mambavl.eval import identity
from mambavl.eval.identity import RunDirError
from mambavl.eval.runner import EvalConfig, evaluate, prompt_for, read_benchmarks, read_done
from mambavl.eval.shapes import SHAPES, normalise
from serving import printable_tiny_cobra

LIMIT = 12


@pytest.fixture(scope="module")
def data(demo_model_dir):
    return demo_model_dir.parent / "data"


@pytest.fixture(scope="module")
def other_model(demo_model_dir, tmp_path_factory):
    """A second model whose folder is also named `model` (as the demo's blind baseline's is)."""
    return printable_tiny_cobra().save_pretrained(tmp_path_factory.mktemp("blind") / "model")


def run_eval(model, data, *args):
    argv = ["eval", "--model", str(model), "--benchmark", "shapes", "--data-root", str(data)]
    return CliRunner().invoke(app, [*argv, "--limit", str(LIMIT), "--batch-size", "6", *args])


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def own_answers(model: Path, data: Path) -> tuple[list[str], float]:
    """The model's greedy answers to the first LIMIT questions, and its accuracy on them."""
    vlm = mambavl.load(model)
    samples = SHAPES.read(data)[:LIMIT]
    answers = vlm.generate(
        [mambavl.vision.load_image(s.image) for s in samples],
        [prompt_for(vlm, SHAPES, s) for s in samples],
        max_new_tokens=SHAPES.max_new_tokens,
    )
    correct = [normalise(a) == normalise(s.answer) for a, s in zip(answers, samples, strict=True)]
    return answers, sum(correct) / LIMIT


def predictions(out: Path, benchmark: str = "shapes") -> list[str]:
    return [r["prediction"] for r in read_done(out / benchmark / "predictions.jsonl").values()]


def test_two_models_in_folders_named_model_get_their_own_runs_and_scores(
    demo_model_dir, other_model, data, tmp_path, monkeypatch
):
    """The issue's case: the demo's model, then another model saved as `.../model`, both without --out."""
    monkeypatch.chdir(tmp_path)
    for model in (demo_model_dir, other_model):
        result = run_eval(model, data)
        assert result.exit_code == 0, result.output
    runs = {results(d)["model"]: d for d in Path("evals").iterdir()}
    assert set(runs) == {str(demo_model_dir), str(other_model)}  # two directories, one per model
    for model, out in runs.items():
        assert out.name.startswith("shapes-model-") and out.name.endswith("-generate")
        answers, accuracy = own_answers(Path(model), data)
        summary = results(out)
        assert summary["benchmarks"]["shapes"]["run_now"] == LIMIT  # nothing resumed from the other
        assert predictions(out) == answers
        assert summary["benchmarks"]["shapes"]["metrics"]["accuracy"] == pytest.approx(accuracy)
        assert f"| {model} |" in (out / "results.md").read_text()
    assert predictions(runs[str(demo_model_dir)]) != predictions(runs[str(other_model)])
    again = run_eval(other_model, data)  # the default directory is stable: a rerun resumes
    assert again.exit_code == 0, again.output
    assert results(runs[str(other_model)])["benchmarks"]["shapes"]["run_now"] == 0


def test_another_model_in_the_same_out_is_refused_and_overwrite_starts_over(
    demo_model_dir, other_model, data, tmp_path
):
    out = tmp_path / "out"
    assert run_eval(demo_model_dir, data, "--out", str(out)).exit_code == 0
    before = {name: (out / name).read_bytes() for name in ("results.json", "results.md", "run.json")}
    refused = run_eval(other_model, data, "--out", str(out))
    message = " ".join(refused.output.split())
    assert refused.exit_code == 1
    assert f"{out} holds another eval run: the model differs:" in message
    assert str(demo_model_dir) in message and str(other_model) in message
    assert "--overwrite" in message and "another --out" in message
    assert {name: (out / name).read_bytes() for name in before} == before  # nothing relabelled
    fresh = run_eval(other_model, data, "--out", str(out), "--overwrite")
    assert fresh.exit_code == 0, fresh.output
    summary = results(out)
    assert summary["model"] == str(other_model) and summary["benchmarks"]["shapes"]["run_now"] == LIMIT
    answers, accuracy = own_answers(other_model, data)
    assert predictions(out) == answers
    assert summary["benchmarks"]["shapes"]["metrics"]["accuracy"] == pytest.approx(accuracy)
    record = json.loads((out / "run.json").read_text())
    assert record["model"]["path"] == str(other_model.resolve())
    assert (
        record["model"]["digest"]
        == summary["model_identity"]["digest"]
        != json.loads(before["run.json"])["model"]["digest"]
    )


def test_a_mode_or_answer_length_switch_is_refused(tmp_path):
    """The issue's second case: --mode probability in a directory of generate-mode answers."""
    from eval_fixtures import write

    model = mambavl.create("tiny-cobra").save_pretrained(tmp_path / "model")
    root = write("pope-random", tmp_path / "data")
    out = tmp_path / "out"
    argv = ["eval", "--model", str(model), "--benchmark", "pope-random", "--data-root", str(root)]
    argv += ["--out", str(out)]
    first = CliRunner().invoke(app, [*argv, "--max-new-tokens", "3"])
    assert first.exit_code == 0, first.output
    generated = predictions(out, "pope-random")
    switched = CliRunner().invoke(app, [*argv, "--max-new-tokens", "3", "--mode", "probability"])
    message = " ".join(switched.output.split())
    assert switched.exit_code == 1
    assert "pope-random's mode differs: 'generate' there, 'probability' now (--mode)" in message
    longer = CliRunner().invoke(app, [*argv, "--max-new-tokens", "5"])
    assert longer.exit_code == 1 and "max_new_tokens differs: 3 there, 5 now (--max-new-tokens)" in " ".join(
        longer.output.split()
    )
    assert results(out)["config"]["mode"] == "generate" and predictions(out, "pope-random") == generated
    fresh = CliRunner().invoke(app, [*argv, "--mode", "probability", "--overwrite"])
    assert fresh.exit_code == 0, fresh.output
    summary = results(out)
    assert summary["config"]["mode"] == "probability"
    assert summary["benchmarks"]["pope-random"]["run_now"] == 4
    assert summary["benchmarks"]["pope-random"]["options"]["mode"] == "probability"
    assert {p.lower() for p in predictions(out, "pope-random")} <= {
        "yes",
        "no",
    }  # an option, not a generation


def test_the_same_model_resumes_without_rehashing_and_a_changed_one_does_not(
    demo_model_dir, data, tmp_path, monkeypatch
):
    model = shutil.copytree(demo_model_dir, tmp_path / "a" / "model")
    out = tmp_path / "out"
    assert run_eval(model, data, "--out", str(out)).exit_code == 0
    record = json.loads((out / "run.json").read_text())["model"]
    assert {Path(f["path"]).name for f in record["files"]} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    weights = model / "model.safetensors"
    assert next(f for f in record["files"] if f["path"] == str(weights))["sha256"] == identity.sha256_file(
        weights
    )

    def no_reading(path):
        raise AssertionError(f"{path} was hashed again")

    with monkeypatch.context() as m:  # size and mtime unchanged: the recorded hashes are reused
        m.setattr(identity, "sha256_file", no_reading)
        again = run_eval(model, data, "--out", str(out))
    assert again.exit_code == 0, again.output
    assert results(out)["benchmarks"]["shapes"]["run_now"] == 0

    copy = shutil.copytree(model, tmp_path / "b" / "model")  # the same files elsewhere: the same model
    moved = run_eval(copy, data, "--out", str(out))
    assert moved.exit_code == 0, moved.output
    assert results(out)["benchmarks"]["shapes"]["run_now"] == 0 and results(out)["model"] == str(copy)

    monkeypatch.chdir(tmp_path)
    assert run_eval(model, data).exit_code == 0
    mambavl.create("tiny-cobra").save_pretrained(model)  # retrained in place: other weights, same path
    changed = run_eval(model, data, "--out", str(out))
    assert changed.exit_code == 1 and "the model differs" in changed.output
    assert run_eval(model, data).exit_code == 0  # without --out: a directory of its own
    assert len(list(Path("evals").iterdir())) == 2


def test_predictions_without_a_record_are_refused_and_overwrite_keeps_other_files(
    demo_model_dir, data, tmp_path
):
    out = tmp_path / "out"
    (out / "shapes").mkdir(parents=True)
    (out / "shapes" / "predictions.jsonl").write_text('{"id": "x", "prediction": "red"}\n')
    (out / "notes.txt").write_text("mine")
    refused = run_eval(demo_model_dir, data, "--out", str(out))
    assert refused.exit_code == 1
    assert "holds predictions with no record" in " ".join(refused.output.split())
    assert run_eval(demo_model_dir, data, "--out", str(out), "--overwrite").exit_code == 0
    assert (out / "notes.txt").read_text() == "mine" and results(out)["benchmarks"]["shapes"][
        "run_now"
    ] == LIMIT


def test_a_model_built_in_memory_is_known_by_its_weights(data, tmp_path):
    vlm = printable_tiny_cobra()
    cfg = EvalConfig(benchmarks=("shapes",), data_root=data, out=tmp_path / "out", limit=4)
    work = read_benchmarks(cfg)
    assert evaluate(vlm, cfg, "experiment", work=work)["benchmarks"]["shapes"]["run_now"] == 4
    assert evaluate(vlm, cfg, "experiment", work=work)["benchmarks"]["shapes"]["run_now"] == 0
    with torch.no_grad():
        vlm.projector.projector[0].bias.add_(1.0)
    with pytest.raises(RunDirError, match="the model differs: experiment"):
        evaluate(vlm, cfg, "experiment", work=work)
    default = identity.default_out(("shapes",), "experiment", vlm, "generate")
    assert default.parent == Path("evals") and default.name.startswith("shapes-experiment-")


def test_each_layout_is_known_by_the_files_it_loads_from(tmp_path):
    """A Cobra run directory by its run config and checkpoint, Viper's by config, weights and tokenizer;
    a changed config is another model."""
    from types import SimpleNamespace

    from test_viper import write_llava
    from test_vlm_checkpoints import perturbed, write_cobra

    loaded = SimpleNamespace(dtype=torch.float32)
    cobra = write_cobra(perturbed("tiny-cobra"), tmp_path / "cobra")
    llava = write_llava(tmp_path, "llava_falcon_mamba")[0]
    files = {
        d: {Path(f.path).relative_to(d).as_posix() for f in identity.stat_files(str(d))}
        for d in (cobra, llava)
    }
    assert files[cobra] == {"config.json", "checkpoints/latest-checkpoint.pt"}
    assert files[llava] == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    before = identity.identify(str(cobra), loaded)
    assert before.path == str(cobra.resolve()) and before.dtype == "float32"
    config = json.loads((cobra / "config.json").read_text())
    config["model"]["llm_max_length"] = 512  # a new size: a rewrite within one mtime tick still shows
    (cobra / "config.json").write_text(json.dumps(config))
    assert identity.identify(str(cobra), loaded, before.files).digest != before.digest
