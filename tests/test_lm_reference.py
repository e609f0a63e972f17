"""mambavl's language models equal transformers' on the same weights: full forward, token-by-token
decoding from a fresh state, and prefill-then-continue."""

import copy

import pytest
import torch

import refmodels
from mambavl.lm import load_lm

TOL = 1e-4
LENGTH = 37  # not a multiple of any chunk size used by the cases


@pytest.fixture(scope="module", params=sorted(refmodels.CASES))
def pair(request, tmp_path_factory):
    ref = refmodels.make(request.param)
    path = refmodels.save(ref, tmp_path_factory.mktemp(request.param))
    return request.param, ref, load_lm(path)


def _ids(lm, batch=2, length=LENGTH):
    return torch.randint(0, lm.config.vocab_size, (batch, length))


@torch.no_grad()
def test_logits_equal_transformers(pair):
    name, ref, lm = pair
    ids = _ids(lm)
    want, got = ref(ids).logits, lm(ids)
    assert got.shape == want.shape == (2, LENGTH, lm.config.vocab_size)
    diff = (want - got).abs().max().item()
    print(f"{name}: max |logits - transformers| = {diff:.2e}")
    assert diff <= TOL


@torch.no_grad()
def test_token_by_token_decoding_equals_full_forward(pair):
    _, _, lm = pair
    ids = _ids(lm)
    full = lm(ids)
    state = lm.new_state(2)
    steps = torch.cat([lm(ids[:, t : t + 1], state=state) for t in range(LENGTH)], dim=1)
    assert state.seqlen == LENGTH
    torch.testing.assert_close(steps, full, atol=TOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("split", [1, 5, 16, 23])
def test_prefill_then_continue_equals_full_forward(pair, split):
    _, _, lm = pair
    ids = _ids(lm)
    full = lm(ids)
    state = lm.new_state(2)
    parts = [lm(ids[:, :split], state=state), lm(ids[:, split : split + 9], state=state)]
    parts += [lm(ids[:, t : t + 1], state=state) for t in range(split + 9, LENGTH)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=TOL, rtol=0)


@torch.no_grad()
def test_inputs_embeds_equal_input_ids(pair):
    _, _, lm = pair
    ids = _ids(lm)
    torch.testing.assert_close(lm(inputs_embeds=lm.embed(ids)), lm(ids), atol=0, rtol=0)


@torch.no_grad()
def test_state_is_fp32_and_fixed_size_for_mamba_layers(pair):
    lm = copy.deepcopy(pair[2]).to(torch.bfloat16)
    state = lm.new_state(3)
    sizes = {}
    for i, layer in enumerate(state.layers):
        for key, t in layer.items():  # every tensor is fp32 but the attention cache's padding mask
            assert t.dtype == (torch.bool if key == "valid" else torch.float32) and t.shape[0] == 3
            sizes[(i, key)] = t.shape
    lm(_ids(lm, batch=3, length=20), state=state)
    for i, layer in enumerate(state.layers):
        for key, t in layer.items():
            assert t.dtype == (torch.bool if key == "valid" else torch.float32)
            if key in ("conv", "ssm"):  # Mamba layers never grow; attention caches do
                assert t.shape == sizes[(i, key)]
            else:
                assert t.shape[-1 if key == "valid" else 2] == 20


def test_num_parameters_equals_transformers(pair):
    _, ref, lm = pair
    assert lm.num_parameters() == sum(p.numel() for p in ref.parameters())


@torch.no_grad()
def test_ragged_rows_and_stacked_states_continue_as_alone(pair):
    """Right-padded rows of different lengths, and rows resumed from states of different lengths stacked
    into one batch (`LMState.stack`: attention caches padded), give each row's own logits: padding is
    never attended to and never counts as a position (rotary embeddings included)."""
    from mambavl.lm.state import LMState

    _, _, lm = pair
    ids = _ids(lm, batch=2, length=20)
    lengths = torch.tensor([20, 13])
    state = lm.new_state(2)
    ragged = lm(ids, state=state, lengths=lengths)
    alone = [lm.new_state(1), lm.new_state(1)]
    for b in range(2):
        want = lm(ids[b : b + 1, : lengths[b]], state=alone[b])
        torch.testing.assert_close(ragged[b, : lengths[b]], want[0], atol=TOL, rtol=0)
    nxt = _ids(lm, batch=2, length=3)
    stacked = LMState.stack([alone[0].clone(), alone[1].clone()])
    for batch_state in (state, stacked):
        got = lm(nxt, state=batch_state)
        for b in range(2):
            want = lm(nxt[b : b + 1], state=alone[b].clone())
            torch.testing.assert_close(got[b], want[0], atol=TOL, rtol=0)
