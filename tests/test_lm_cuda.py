"""The same equalities on a CUDA GPU: mambavl on the GPU against transformers on the CPU, decoding
against the full forward, and full-size random Mamba-1 / Mamba-2 LMs in bf16. Run where a GPU is."""

import copy

import pytest
import torch

import refmodels
from mambavl.lm import LanguageModel, load_lm
from mambavl.lm.layouts import lm_config_from_json

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("exact_fp32"),
]


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(refmodels.CASES))
def test_cuda_logits_and_decoding_equal_reference(tmp_path, name):
    ref = refmodels.make(name)
    lm = load_lm(refmodels.save(ref, tmp_path / name), device="cuda")
    ids = torch.randint(0, lm.config.vocab_size, (2, 37))
    want = ref(ids).logits
    got = lm(ids.cuda())
    diff = (got.cpu() - want).abs().max().item()
    print(f"{name}: cuda vs transformers(cpu) max |Δlogit| = {diff:.2e}")
    assert diff <= 1e-4
    state = lm.new_state(2)
    assert all(t.is_cuda for layer in state.layers for t in layer.values())
    parts = [lm(ids[:, :20].cuda(), state=state)] + [
        lm(ids[:, t : t + 1].cuda(), state=state) for t in range(20, 37)
    ]
    torch.testing.assert_close(torch.cat(parts, 1), got, atol=1e-4, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("name", ["mamba-tied-bias-rank5", "mamba2-groups2-untied", "jamba-attn-moe-gqa"])
def test_cuda_bf16_matches_cpu_bf16_closely(tmp_path, name):
    lm = load_lm(refmodels.save(refmodels.make(name), tmp_path / name), dtype=torch.bfloat16)
    gpu = copy.deepcopy(lm).cuda()
    ids = torch.randint(0, lm.config.vocab_size, (1, 2048))
    a, b = lm(ids).float(), gpu(ids.cuda()).float().cpu()
    assert torch.isfinite(b).all()
    assert (a - b).abs().mean() <= 0.01 * a.abs().max()


FULL_SIZE = {
    # the LMs of Cobra (xiuyul/mamba-2.8b-zephyr) and ML-Mamba (state-spaces/mamba2-2.7b), mamba_ssm configs
    "mamba-2.8b": {
        "d_model": 2560,
        "n_layer": 64,
        "vocab_size": 50277,
        "ssm_cfg": {},
        "pad_vocab_size_multiple": 8,
    },
    "mamba2-2.7b": {
        "d_model": 2560,
        "n_layer": 64,
        "vocab_size": 50277,
        "ssm_cfg": {"layer": "Mamba2"},
        "pad_vocab_size_multiple": 16,
    },
}


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_bf16_prefill_and_decode(name):
    cfg, _ = lm_config_from_json(FULL_SIZE[name], name)
    torch.manual_seed(0)
    with torch.device("cuda"):
        lm = LanguageModel(cfg).to(torch.bfloat16).eval()
    for p in lm.parameters():  # keep activations in a realistic range
        if p.dim() >= 2:
            p.normal_(0, 0.02)
    ids = torch.randint(0, 50277, (2, 2048), device="cuda")
    full = lm(ids)
    assert torch.isfinite(full).all()
    state = lm.new_state(2)
    parts = [lm(ids[:, :2000], state=state)] + [lm(ids[:, t : t + 1], state=state) for t in range(2000, 2048)]
    err = (torch.cat(parts, 1).float() - full.float()).abs()
    assert err.mean() <= 0.01 * full.float().abs().max()


@torch.no_grad()
@pytest.mark.parametrize("name", ["mamba-tied-bias-rank5", "mamba2-groups2-untied", "jamba-attn-moe-gqa"])
def test_cuda_ragged_batch_equals_rows_alone(tmp_path, name):
    lm = load_lm(refmodels.save(refmodels.make(name), tmp_path / name), device="cuda")
    lengths = torch.tensor([5, 12, 1], device="cuda")
    ids = torch.randint(0, 60, (3, 12), device="cuda")
    state = lm.new_state(3)
    out = lm(ids, state=state, lengths=lengths)
    nxt = torch.randint(0, 60, (3, 1), device="cuda")
    step = lm(nxt, state=state)
    for b, n in enumerate(lengths.tolist()):
        alone = lm.new_state(1)
        torch.testing.assert_close(out[b : b + 1, :n], lm(ids[b : b + 1, :n], state=alone), atol=1e-4, rtol=0)
        torch.testing.assert_close(step[b : b + 1], lm(nxt[b : b + 1], state=alone), atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", ["tiny-cobra", "tiny-mlmamba"])
def test_cuda_vlm_batched_generation_equals_one_by_one(preset):
    import numpy as np
    from PIL import Image

    import mambavl

    torch.manual_seed(0)
    vlm = mambavl.create(preset, device="cuda")
    with torch.no_grad():
        for p in vlm.lm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)), None]
    prompts = ["<|user|>\nWhat?<|endoftext|>\n<|assistant|>\n", "In: a longer text-only prompt\nOut: "]
    kw = dict(max_new_tokens=6, min_length=6)
    assert vlm.generate(images, prompts, **kw) == [
        vlm.generate(i, p, **kw) for i, p in zip(images, prompts, strict=True)
    ]
