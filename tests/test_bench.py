"""`mambavl bench` end to end on the CPU with a tiny preset: every figure is measured and written (JSON,
PNG, table), and bad options are refused. Speeds here mean nothing; the GPU run is the benchmark."""

import json
import math

import pytest
from typer.testing import CliRunner

from mambavl.bench.ours import decode_bytes
from mambavl.bench.run import BenchConfig, rows, run
from mambavl.cli import app
from mambavl.vlm.model import create


def test_bench_measures_and_writes_everything(tmp_path):
    cfg = BenchConfig(
        preset="tiny-mlmamba",
        out=tmp_path,
        dtype="float32",
        device="cpu",
        ttft_tokens=12,
        prefill_lengths=(16, 40),
        decode_batches=(1, 3),
        decode_tokens=3,
        peers=(),
        profile=False,
    )
    result = run(cfg)
    saved = json.loads((tmp_path / "bench.json").read_text())
    ours = saved["mambavl"]
    assert set(ours["prefill"]) == {"16", "40"} and set(ours["decode"]) == {"1", "3"}
    figures = [ours["ttft"]["ttft_s"], ours["ttft"]["vision_s"], ours["decode_eager_b1"]["tok_s"]]
    figures += [v["s"] for v in ours["prefill"].values()] + [v["tok_s"] for v in ours["decode"].values()]
    assert all(math.isfinite(x) and x > 0 for x in figures)
    assert ours["ttft"]["positions"] > 12  # the image's positions come first
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert rows(result)[0][0] == "mambavl"


def test_roofline_bytes_count_weights_once_and_state_per_row():
    vlm = create("tiny-cobra", device="meta")
    lm = vlm.lm
    weights = sum(p.numel() * p.element_size() for p in lm.parameters())
    state = lm.new_state(1, device="meta").nbytes
    assert lm.config.tie_embeddings
    assert decode_bytes(vlm, 1) == weights + 2 * state
    assert decode_bytes(vlm, 5) - decode_bytes(vlm, 1) == 8 * state


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "no-such"], "unknown preset"),
        (["--model", "tiny-cobra", "--peers", "llama"], "unknown peers"),
        (["--model", "tiny-cobra", "--decode-batches", "1,x"], "comma-separated integers"),
        (["--model", "tiny-cobra", "--dtype", "int8", "--peers", "none"], "dtype"),
    ],
)
def test_bench_refuses_bad_options(tmp_path, args, message):
    result = CliRunner().invoke(app, ["bench", *args, "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert message in result.output


def test_kernel_bench_needs_a_gpu(tmp_path):
    import torch

    from mambavl.bench.kernels import projection_shapes, run_kernels

    shapes = projection_shapes(create("tiny-cobra", device="meta").lm.config)
    assert {"lm_head", "mamba1.in_proj", "mamba1.x_proj", "mamba1.out_proj"} == set(shapes)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="GPU"):
            run_kernels("tiny-cobra", tmp_path)
        return
    result = run_kernels("tiny-cobra", tmp_path, sweep=False)
    saved = json.loads((tmp_path / "kernels.json").read_text())
    assert saved["linear"] and saved["mamba1_step"] and result["copy_bandwidth_tb_s"] > 0
    assert all(r["ours_us"] > 0 and r["cublas_us"] > 0 for r in saved["linear"])
