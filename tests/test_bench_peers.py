"""The peers of `mambavl bench` on the CPU with tiny configs: the right keys and positive finite numbers,
configs that map back to the LM's own, and errors (never exceptions) for peers that cannot run."""

import math
import sys
from pathlib import Path

import pytest
import torch

from mambavl.bench import peers
from mambavl.lm.layouts import lm_config_from_json
from mambavl.presets import (
    TINY_FALCON_H1,
    TINY_FALCON_MAMBA,
    TINY_JAMBA,
    TINY_MAMBA,
    TINY_MAMBA2,
    TINY_NEMOTRON_H,
    TINY_ZAMBA2,
)

TINY = dict(decode_batches=[2, 1], decode_tokens=3, prefill_lengths=[16, 8], dtype="float32", device="cpu")
TINY_NEOX = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=96
)


def check(result: peers.PeerResult, batches=(1, 2), lengths=(8, 16)):
    assert result.error is None, result.error
    assert sorted(result.decode_tok_s) == list(batches), result.notes
    assert sorted(result.prefill_s) == list(lengths), result.notes
    values = [*result.decode_tok_s.values(), *result.prefill_s.values()]
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values), values
    assert result.peak_mem_gib == {}  # CUDA only
    assert result.notes


@pytest.mark.parametrize("lm", [TINY_MAMBA, TINY_MAMBA2, TINY_FALCON_MAMBA], ids=lambda lm: lm.family)
def test_hf_mamba_on_cpu(lm):
    result = peers.hf_mamba(lm, repeat=1, **TINY)
    check(result)
    expected = {"mamba": "MambaForCausalLM", "falcon_mamba": "FalconMambaForCausalLM"}
    assert result.name == "transformers " + expected.get(lm.family, "Mamba2ForCausalLM")
    assert any("kernels:" in note for note in result.notes)


@pytest.mark.parametrize("lm", [TINY_NEMOTRON_H, TINY_FALCON_H1, TINY_ZAMBA2], ids=lambda lm: lm.family)
def test_hf_peer_of_a_hybrid_is_transformers_on_its_own_config(lm):
    """A hybrid read from a transformers config is measured against transformers' model of that config,
    with as many parameters as ours."""
    from transformers import AutoModelForCausalLM

    from mambavl.lm.model import LanguageModel

    config, notes = peers.hf_mamba_config(lm)
    assert config.model_type == lm.family and any("built from the config" in n for n in notes)
    with torch.device("meta"):
        theirs = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        ours = LanguageModel(lm).num_parameters()
    assert theirs == ours
    result = peers.hf_mamba(lm, repeat=1, **TINY)
    check(result)
    assert result.name == f"transformers {lm.family}"


def test_hf_mamba_limits_are_notes():
    result = peers.hf_mamba(TINY_MAMBA, repeat=1, max_prefill=8, max_decode_tokens=2, **TINY)
    check(result, lengths=(8,))
    assert any("prefill [16]: skipped" in note for note in result.notes), result.notes
    assert any("2 new tokens instead of 3" in note for note in result.notes), result.notes


def test_gpt_neox_on_cpu():
    result = peers.gpt_neox(repeat=1, config_overrides=TINY_NEOX, **TINY)
    check(result)
    assert result.name.startswith("transformers GPT-NeoX") and "SDPA" in result.name
    assert any("attention: sdpa" in note for note in result.notes), result.notes


def test_gpt_neox_default_is_pythia_2_8b():
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM, GPTNeoXConfig

        config = GPTNeoXConfig(**peers.PYTHIA_2_8B)
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert 2.7e9 < n < 2.8e9
    assert config.rope_parameters["partial_rotary_factor"] == 0.25


def test_mamba_ssm_not_importable_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # import mamba_ssm now raises ImportError
    result = peers.mamba_ssm(TINY_MAMBA, **TINY)
    assert isinstance(result, peers.PeerResult)
    assert result.error and "not importable" in result.error
    assert result.decode_tok_s == {} and result.prefill_s == {}
    assert "selective_scan_cuda" not in sys.modules  # the placeholder does not outlive the attempt


@pytest.mark.parametrize("lm", [TINY_MAMBA, TINY_MAMBA2, TINY_FALCON_MAMBA], ids=lambda lm: lm.family)
def test_configs_map_back_to_the_lm(lm):
    config, _ = peers.hf_mamba_config(lm)
    assert lm_config_from_json(config.to_dict(), Path("hf"))[0] == lm
    kwargs, _ = peers.mamba_ssm_config(lm)
    back = lm_config_from_json(kwargs, Path("mamba_ssm"))[0]
    ignored = {"family", "bcdt_norm", "extra"}  # mamba_ssm has no FalconMamba norm (a note says so)
    assert {k: v for k, v in vars(back).items() if k not in ignored} == {
        k: v for k, v in vars(lm).items() if k not in ignored
    }


def test_run_peers_never_raises_for_a_peer_that_cannot_run(monkeypatch):
    from dataclasses import replace

    monkeypatch.setitem(sys.modules, "mamba_ssm", None)
    hybrid = replace(TINY_JAMBA, extra={})  # a hybrid not read from a transformers config
    results = peers.run_peers(hybrid, ["hf-mamba", "mamba-ssm"], **TINY)
    assert [r.error is not None for r in results] == [True, True]
    assert "pure Mamba" in results[0].error
    with pytest.raises(ValueError, match="unknown peer"):
        peers.run_peers(TINY_MAMBA, ["hf-mamba", "llama"], **TINY)
    with pytest.raises(TypeError, match="no peer takes"):
        peers.run_peers(TINY_MAMBA, ["hf-mamba"], batch_sizes=[1], **TINY)


def test_sweep_skips_slow_calls_and_stops_after_out_of_memory():
    def measure(key):
        if key == 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return float(key), key * 1.0

    notes = []
    out = peers._sweep([1, 4, 64, 128, 2], measure, what="decode batch", budget_s=100.0, notes=notes)
    assert out == {1: 1.0, 2: 2.0, 4: 4.0}
    assert notes == [
        "decode batch 64: out of GPU memory",
        "decode batch [128]: skipped after running out of memory",
    ]
    notes = []
    out = peers._sweep([1, 10, 1000], measure, what="prefill length", budget_s=100.0, notes=notes)
    assert out == {1: 1.0, 10: 10.0}
    assert notes == ["prefill length 1000: skipped, one call would take about 1000 s (limit 100 s)"]
    notes = []
    out = peers._sweep(
        [1, 1000, 200, 2000], measure, what="decode batch", budget_s=100, notes=notes, linear=False
    )
    assert out == {1: 1.0, 200: 200.0}
    assert notes == [
        "decode batch 1000: skipped, one call would take about 200 s (limit 100 s)",
        "decode batch 2000: skipped, one call would take about 200 s (limit 100 s)",
    ]


def test_timed_is_the_median_after_a_warm_up():
    calls = []
    assert peers._timed(lambda: calls.append(1), 3) >= 0
    assert len(calls) == 4
