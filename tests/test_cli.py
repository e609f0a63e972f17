"""The command line, run as a user runs it."""

from typer.testing import CliRunner

import refmodels
from mambavl.cli import app


def test_info_reports_the_parameter_count(tmp_path):
    ref = refmodels.make("jamba-attn-moe-gqa")
    path = refmodels.save(ref, tmp_path / "j")
    result = CliRunner().invoke(app, ["info", path], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"{sum(p.numel() for p in ref.parameters()):,}" in result.output
    assert "2× mamba1, 2× attention" in result.output and "2× mlp, 2× moe" in result.output


def test_info_on_a_bad_path_fails_cleanly(tmp_path):
    result = CliRunner().invoke(app, ["info", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "no such directory" in " ".join(result.output.split())


def test_models_lists_presets_with_counts():
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "cobra+3b" in result.output and "3,548,076,096" in result.output
    assert "tiny-mlmamba" in result.output


def _info_dirs(tmp_path, demo_model_dir):
    """A model directory of every layout `mambavl.load` reads, and the model loaded from it."""
    import mambavl
    from test_viper import write_llava
    from test_vlm_checkpoints import perturbed, write_cobra, write_mlmamba

    dirs = {
        "mambavl": demo_model_dir,
        "Cobra": write_cobra(perturbed("tiny-cobra"), tmp_path / "cobra"),
        "ML-Mamba": write_mlmamba(perturbed("tiny-mlmamba"), tmp_path / "mlmamba"),
        "LLaVA / Viper (llava_jamba)": write_llava(tmp_path, "llava_jamba")[0],
    }
    return {layout: (d, mambavl.load(d)) for layout, d in dirs.items()}


def test_info_describes_every_model_directory_the_other_commands_load(tmp_path, demo_model_dir):
    """The demo's model (our layout) among them: `info` used to read it as a bare LM config."""
    for layout, (directory, vlm) in _info_dirs(tmp_path, demo_model_dir).items():
        result = CliRunner().invoke(app, ["info", str(directory)])
        text = " ".join(result.output.split())
        assert result.exit_code == 0, (layout, result.output)
        assert f"layout │ {layout} │" in text, text
        assert (
            f"vision tower │ {vlm.config.tower} " in text and f"projector │ {vlm.config.projector} │" in text
        )
        assert f"parameters │ {vlm.num_parameters():,} │" in text


def test_info_on_a_preset_reads_no_weights():
    result = CliRunner().invoke(app, ["info", "cobra+3b"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "layout │ mambavl preset │" in text and "parameters │ 3,548,076,096 │" in text


def test_models_never_cuts_a_name_at_80_columns(monkeypatch):
    import io
    import re

    from rich.console import Console

    import mambavl.cli as cli
    from mambavl.presets import PRESETS

    piped = CliRunner().invoke(app, ["models"], env={"COLUMNS": "80"})
    assert piped.exit_code == 0 and "…" not in piped.output
    rows = {line.split("│")[1].strip(): line for line in piped.output.splitlines() if line.startswith("│")}
    assert set(rows) == set(PRESETS)  # into a pipe: one line per preset, at the table's own width
    assert "51,878,033,280" in rows["viper-jamba-52b"] and "dinosiglip-vit-so-384px" in rows["cobra+3b"]

    screen = io.StringIO()  # a terminal 80 columns wide: the parts fold, nothing is cut
    monkeypatch.setattr(cli, "console", Console(file=screen, force_terminal=True, width=80, no_color=True))
    assert CliRunner().invoke(app, ["models"]).exit_code == 0
    shown = re.sub(r"\x1b\[[0-9;]*m", "", screen.getvalue())  # the terminal's styles, not text
    lines = shown.splitlines()
    assert "…" not in shown and max(len(line) for line in lines) <= 80
    names = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    assert set(PRESETS) <= set(names)


def test_eval_run_directories_are_ignored_by_git():
    from pathlib import Path

    ignored = (Path(__file__).parents[1] / ".gitignore").read_text().split()
    assert "evals/" in ignored


def test_help_pages_show_no_type_on_flags():
    """A flag takes no value: `--overwrite <bool>` in a help page reads as if it took one."""
    runner = CliRunner()
    for args in (["--help"], ["demo", "--help"], ["eval", "--help"], ["eval", "list", "--help"]):
        result = runner.invoke(app, args, env={"COLUMNS": "120"})
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output, args
        assert "--help" in result.output
    demo = runner.invoke(app, ["demo", "--help"], env={"COLUMNS": "120"}).output
    assert "<int>" in demo and "--overwrite" in demo  # options that take values keep their type
