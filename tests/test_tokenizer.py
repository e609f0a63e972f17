"""Incremental detokenization (`TextTokenizer.stream`), which the engine streams answers with: whatever the
ids, the text it gives is the whole decode's, less only a character still unfinished at the end."""

from functools import cache

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mambavl
from mambavl.engine.scheduler import Engine, EngineConfig, Request, _Sequence
from mambavl.vlm.sampling import SamplingParams
from mambavl.vlm.tokenizer import byte_tokenizer, numbered_tokenizer
from serving import texts

BYTES, WORDS = byte_tokenizer(), numbered_tokenizer(300)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([BYTES, WORDS]), st.lists(st.integers(0, 299), max_size=60))
def test_streamed_text_is_the_whole_decode(tok, ids):
    ids = [i % tok.vocab_size for i in ids]
    stream = tok.stream()
    pieces = [stream.step(i) for i in ids]
    full = tok.decode(ids)
    streamed = "".join(pieces)
    assert full.startswith(streamed)
    assert set(full[len(streamed) :]) <= {"\ufffd"}  # only an unfinished character is held back
    if tok is WORDS:  # whole words: nothing is ever held back
        assert streamed == full


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 261), min_size=1, max_size=40), st.sampled_from(["", "ab", "\n", "e "]))
def test_the_engine_streams_what_decoding_the_whole_answer_gives(ids, stop):
    """Tokens fed to a sequence one at a time, as decode steps choose them: the text streamed out, and where
    a stop string ends it, equal what decoding every id again each step gave."""
    engine = _engine()
    events: list = []
    params = SamplingParams(max_new_tokens=len(ids), stop=(stop,) if stop else ())
    seq = _Sequence(Request(None, "", params, events.append), 0, [], None, decoder=engine._tok.stream())
    ended = False
    for token in ids:
        ended = engine._advance_one(seq, token)
        if ended:
            break
    answer = engine._tok.decode(seq.ids).lstrip()
    end = answer.find(stop) if stop and stop in answer else len(answer)
    want = answer[:end].rstrip()
    assert ended and texts(events)[0] == want


@cache
def _engine() -> Engine:
    torch.manual_seed(0)
    return Engine(mambavl.create("tiny-cobra"), EngineConfig(slots=1))
