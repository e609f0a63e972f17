"""The recurrent state as serving will use it: rows of a batch are independent, a snapshot taken after a
shared prefix and reused equals recomputing, and selected rows carry on as if run alone."""

import pytest
import torch

import refmodels
from mambavl.lm import LanguageModel, LMConfig, load_lm


@pytest.fixture(
    scope="module", params=["mamba-tied-bias-rank5", "mamba2-groups2-untied", "jamba-attn-moe-gqa"]
)
def lm(request, tmp_path_factory):
    return load_lm(refmodels.save(refmodels.make(request.param), tmp_path_factory.mktemp("m")))


@torch.no_grad()
def test_rows_are_independent(lm):
    ids = torch.randint(0, 60, (3, 19))
    batched = lm(ids)
    for b in range(3):
        torch.testing.assert_close(batched[b : b + 1], lm(ids[b : b + 1]), atol=1e-5, rtol=0)


@torch.no_grad()
def test_snapshot_after_shared_prefix_equals_recomputing(lm):
    prefix, a, b = torch.randint(0, 60, (1, 13)), torch.randint(0, 60, (1, 6)), torch.randint(0, 60, (1, 9))
    state = lm.new_state(1)
    lm(prefix, state=state)
    snapshot = state.clone()
    out_a = lm(a, state=state)
    out_b = lm(b, state=snapshot.clone())  # the snapshot itself was not advanced by the first use
    torch.testing.assert_close(out_a, lm(torch.cat([prefix, a], 1))[:, 13:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out_b, lm(torch.cat([prefix, b], 1))[:, 13:], atol=1e-5, rtol=0)
    assert snapshot.seqlen == 13 and state.seqlen == 19


@torch.no_grad()
def test_selected_rows_continue_alone(lm):
    ids = torch.randint(0, 60, (4, 11))
    nxt = torch.randint(0, 60, (2, 5))
    state = lm.new_state(4)
    lm(ids, state=state)
    sub = state.select([3, 1])
    assert sub.batch_size == 2
    got = lm(nxt, state=sub)
    want = lm(torch.cat([ids[[3, 1]], nxt], 1))[:, 11:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_state_size_does_not_grow_for_mamba():
    cfg = LMConfig(family="mamba", d_model=16, n_layer=2, vocab_size=32, d_state=4)
    lm = LanguageModel(cfg).eval()
    state = lm.new_state(1)
    before = state.nbytes
    with torch.no_grad():
        lm(torch.randint(0, 32, (1, 300)), state=state)
    assert state.nbytes == before == 2 * (32 * 4 + 32 * 4) * 4  # conv [32, 4] + ssm [32, 4], fp32, 2 layers


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="not a multiple of headdim"):
        LMConfig(family="mamba2", d_model=20, n_layer=1, vocab_size=8, default_mixer="mamba2", headdim=16)
    with pytest.raises(ValueError, match="n_kv_heads"):
        LMConfig(
            family="jamba",
            d_model=16,
            n_layer=1,
            vocab_size=8,
            mixers=("attention",),
            n_heads=4,
            n_kv_heads=3,
        )


@pytest.mark.parametrize(
    "raw,published",
    [
        # Cobra's LM, xiuyul/mamba-2.8b-zephyr (mamba_ssm config): 2.768B
        (
            {
                "d_model": 2560,
                "n_layer": 64,
                "vocab_size": 50277,
                "ssm_cfg": {},
                "pad_vocab_size_multiple": 8,
            },
            2.768e9,
        ),
        # ML-Mamba's LM, state-spaces/mamba2-2.7b
        (
            {
                "d_model": 2560,
                "n_layer": 64,
                "vocab_size": 50277,
                "ssm_cfg": {"layer": "Mamba2"},
                "pad_vocab_size_multiple": 16,
            },
            2.70e9,
        ),
    ],
)
def test_full_size_parameter_counts(raw, published):
    from mambavl.lm.layouts import lm_config_from_json

    cfg, layout = lm_config_from_json(raw, "config.json")
    assert layout == "mamba_ssm"
    with torch.device("meta"):
        n = LanguageModel(cfg).num_parameters()
    assert abs(n - published) / published < 0.002, n


@torch.no_grad()
def test_ragged_batch_equals_rows_alone(lm):
    """Right-padded rows with `lengths`: logits at real positions and the states after the call equal
    each row run alone, whatever tokens the padding holds; then decoding carries on identically."""
    lengths = torch.tensor([5, 12, 1])
    ids = torch.randint(0, 60, (3, 12))  # the padding holds random tokens on purpose
    state = lm.new_state(3)
    out = lm(ids, state=state, lengths=lengths)
    nxt = torch.randint(0, 60, (3, 1))
    step = lm(nxt, state=state)
    for b, n in enumerate(lengths.tolist()):
        alone = lm.new_state(1)
        want = lm(ids[b : b + 1, :n], state=alone)
        torch.testing.assert_close(out[b : b + 1, :n], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(step[b : b + 1], lm(nxt[b : b + 1], state=alone), atol=1e-5, rtol=0)


@torch.no_grad()
def test_ragged_chunk_continues_a_nonzero_state(lm):
    """Continuous batching: rows with different histories take ragged chunks (one row takes none)."""
    first = torch.randint(0, 60, (3, 7))
    chunk = torch.randint(0, 60, (3, 6))
    lengths = torch.tensor([6, 0, 3])
    state = lm.new_state(3)
    lm(first, state=state)
    before = state.clone()
    out = lm(chunk, state=state, lengths=lengths)
    for key, t in before.layers[0].items():  # row 1 took no tokens: its Mamba state is untouched
        if key in ("conv", "ssm"):
            torch.testing.assert_close(state.layers[0][key][1], t[1], atol=0, rtol=0)
    probe = torch.randint(0, 60, (3, 2))
    after = lm(probe, state=state)
    for b, n in enumerate(lengths.tolist()):
        full = lm(torch.cat([first[b : b + 1], chunk[b : b + 1, :n], probe[b : b + 1]], 1))
        if n:
            torch.testing.assert_close(out[b : b + 1, :n], full[:, 7 : 7 + n], atol=1e-5, rtol=0)
        torch.testing.assert_close(after[b : b + 1], full[:, 7 + n :], atol=1e-5, rtol=0)


def test_bad_lengths_are_refused(lm):
    with pytest.raises(ValueError, match=r"lengths must be \[2\] integers in \[0, 4\]"):
        lm(torch.zeros(2, 4, dtype=torch.long), lengths=torch.tensor([5, 1]))


@torch.no_grad()
def test_clone_is_an_exact_independent_copy(lm):
    """Every tensor of the state (conv and SSM states, KV caches and their masks, views of a batch's rows)
    copied exactly into storage of its own."""
    state = lm.new_state(3)
    lm(torch.randint(0, 60, (3, 11)), state=state)
    row = state.map(lambda t: t[1:2])  # views, as a prefill job's rows hold them
    for source in (state, row, lm.new_state(2)):
        copy = source.clone()
        assert copy.seqlen == source.seqlen
        for mine, theirs in zip(copy.layers, source.layers, strict=True):
            assert mine.keys() == theirs.keys()
            for name in mine:
                assert mine[name].dtype == theirs[name].dtype and torch.equal(mine[name], theirs[name])
                if mine[name].numel():
                    storage = mine[name].untyped_storage().data_ptr()
                    assert storage != theirs[name].untyped_storage().data_ptr()
    snapshot = row.clone()
    kept = row.map(torch.clone)  # per-tensor copies, the plain way
    lm(torch.randint(0, 60, (3, 4)), state=state)  # advances the batch, and so the row's views, in place
    for mine, theirs in zip(snapshot.layers, kept.layers, strict=True):
        for name in mine:
            assert torch.equal(mine[name], theirs[name])
    ssm = next(i for i, layer in enumerate(row.layers) if "ssm" in layer)
    assert not torch.equal(row.layers[ssm]["ssm"], kept.layers[ssm]["ssm"])  # the views did move
