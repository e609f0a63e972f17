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
