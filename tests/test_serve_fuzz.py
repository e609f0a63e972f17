"""The API fuzzed: thousands of requests drawn over the request schema (numbers at their extremes, odd
unicode with lone surrogates, odd images as data URIs, odd conversations, wrong types, bodies that are not
JSON) against the real app with a tiny model. None may get a 5xx or a failed stream, `/health` stays 200
throughout, and afterwards the server gives the same greedy answer as before."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin
from starlette.testclient import TestClient

from mambavl.serve import Engine, EngineConfig, ImagePolicy, ServeConfig, create_app
from serving import printable_tiny_cobra

REQUESTS = 2000
SLOTS = 4
REFERENCE = {"messages": [{"role": "user", "content": "How many objects are there?"}], "max_tokens": 4}


def png(image: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **options)
    return buf.getvalue()


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def odd_images() -> list[bytes]:
    """Image files a client might send, valid and not: every mode and format PIL reads, extreme shapes,
    a header that claims a billion pixels, truncated and garbage data, a text-chunk bomb."""
    rgb = Image.new("RGB", (16, 12), (10, 200, 30))
    palette = Image.new("P", (8, 8))
    palette.info["transparency"] = 0
    grey16 = Image.frombytes("I;16", (4, 4), bytes(range(32)))
    small = png(rgb)
    header_only = b"\x89PNG\r\n\x1a\n" + chunk(
        b"IHDR", struct.pack(">IIBBBBB", 40_000, 40_000, 8, 2, 0, 0, 0)
    )
    bomb_text = b"k\x00\x00" + zlib.compress(b"a" * (PngImagePlugin.MAX_TEXT_CHUNK + 1000), 9)
    return [
        small,
        png(Image.new("RGB", (1, 1))),
        png(Image.new("RGBA", (3, 5), (0, 0, 0, 0))),
        png(Image.new("LA", (2, 2))),
        png(palette, transparency=0),
        png(grey16),
        png(Image.new("1", (9, 9))),
        png(Image.new("RGB", (1, 3000))),
        png(Image.new("RGB", (3000, 1))),
        encoded(rgb, "JPEG"),
        encoded(Image.new("CMYK", (6, 6)), "JPEG"),
        encoded(rgb, "GIF"),
        encoded(rgb, "BMP"),
        encoded(Image.new("F", (5, 5)), "TIFF"),
        encoded(rgb, "WEBP"),
        header_only + chunk(b"IEND", b""),  # 1.6 billion pixels, no data
        small[: len(small) // 2],  # truncated
        small[:33] + chunk(b"zTXt", bomb_text) + small[33:],
        b"",
        b"\x00" * 64,
        b"GIF89a" + b"\xff" * 20,
        bytes(range(256)),
    ]


ODD_STRINGS = [
    " ",
    "\ud83d\ude00",  # a pair: valid once decoded
    "😀",
    "\x00",
    "\u202eevil",
    "\ufeff",
    "e\u0301" * 20,
    "<image>",
    "<|endoftext|>",
    "<|user|>\n",
    "\r\n\t",
    "ﷺ" * 10,
    "x" * 3000,  # over the model's length
    "%s%n{0}",
]
BROKEN_STRINGS = ["", "\ud800", "a\udfffb"]  # empty; lone surrogates (JSON allows them, UTF-8 does not)
FLOATS = [0.0, -0.0, 5e-324, 1e-45, 1e-300, 1e-7, 0.5, 1.0, 1.9999999, 2.0, 2.0000001, 1e300, 1.7e308]
FLOATS += [-1e-300, -1.0, float("nan"), float("inf"), float("-inf")]
INTS = [0, 1, 4, 5, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1]
INTS += [10**30, -(10**30)]


def extremes(values: list, between: st.SearchStrategy) -> st.SearchStrategy:
    """The edges of a range (drawn often) and anything inside it."""
    return st.one_of(st.sampled_from(values), between)


# Within the schema: the values a careful client may send, at their extremes.
text = st.one_of(st.sampled_from(ODD_STRINGS), st.text(max_size=30))  # any code point but surrogates
IMAGES = odd_images()
GOOD_IMAGES = [f"data:image/png;base64,{base64.b64encode(b).decode()}" for b in IMAGES[:15]]
BAD_IMAGES = [f"data:image/png;base64,{base64.b64encode(b).decode()}" for b in IMAGES[15:]]
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": text})


def image_part(urls: st.SearchStrategy[str]) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": urls})},
        optional={"detail": st.sampled_from(["auto", "low", "high"])},
    )


good_content = st.one_of(
    text,
    text,
    st.lists(st.one_of(text_part, image_part(st.sampled_from(GOOD_IMAGES))), min_size=1, max_size=2),
)
good_options = {
    "temperature": extremes([0.0, 5e-324, 1e-45, 1e-300, 1e-7, 1.0, 2.0], st.floats(0, 2)),
    "top_p": extremes([5e-324, 1e-45, 1e-7, 0.5, 1.0], st.floats(0, 1, exclude_min=True)),
    "top_k": extremes([0, 1, 263, 264, 265, 2**31, 2**63 - 1], st.integers(0, 10**6)),
    "seed": extremes([0, -1, 2**63 - 1, 2**63, -(2**63), 2**64 - 1], st.integers(-(2**63), 2**64 - 1)),
    "presence_penalty": extremes([-2.0, -5e-324, 0.0, 5e-324, 2.0], st.floats(-2, 2)),
    "frequency_penalty": extremes([-2.0, -5e-324, 0.0, 5e-324, 2.0], st.floats(-2, 2)),
    "repetition_penalty": extremes(
        [5e-324, 1e-300, 1e-7, 1.0, 1e7, 1e300, 1.7e308], st.floats(0, exclude_min=True, allow_infinity=False)
    ),
    "n": st.integers(1, SLOTS),
    "max_tokens": st.integers(1, 4),
    "min_tokens": extremes([0, 4, 5, 2**31, 2**63], st.integers(0, 6)),
    "stop": st.one_of(text.filter(bool), st.lists(text.filter(bool), max_size=4)),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "model": st.just("m"),
    "user": text,
}


@st.composite
def good_request(draw) -> dict:
    """A request the schema admits, numbers at their extremes: it reaches the engine (unless the prompt is
    over the model's length, or it sends two images)."""
    turns = draw(st.integers(0, 2))
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": draw(good_content if i % 2 == 0 else text)}
        for i in range(2 * turns + 1)
    ]
    chosen = draw(st.lists(st.sampled_from(sorted(good_options)), max_size=6, unique=True))
    return {"messages": messages} | {name: draw(good_options[name]) for name in chosen}


# Outside the schema: wrong types, out-of-range numbers, broken strings and images, odd conversations.
wrong = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.text(max_size=5),
    st.lists(st.integers(0, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
)
any_text = st.one_of(
    text,
    st.sampled_from(BROKEN_STRINGS),
    st.text(st.characters(exclude_categories=()), max_size=30),  # every code point, surrogates too
)
any_float = st.one_of(st.sampled_from(FLOATS), st.floats(), wrong)
any_int = st.one_of(st.sampled_from(INTS), st.integers(), wrong)
ODD_URLS = [
    "",
    "data:",
    "data:image/png;base64,",
    "data:image/png;base64,@@@@",
    "data:image/png,iVBORw0KGgo=",
    "data:text/plain;base64,aGk=",
    "http://127.0.0.1/a.png",  # remote images are off on this server
    "https://[::1/a.png",
    "http://a\tb/x.png",
    "file:///etc/passwd",
    "/etc/passwd",
    "../a.png",
    "a\x00b.png",
    "ftp://x/y.png",
    "javascript:alert(1)",
    "\ud800",
    "x" * 5000,
]
any_url = st.one_of(st.sampled_from(GOOD_IMAGES + BAD_IMAGES), st.sampled_from(ODD_URLS), any_text)
any_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(any_text, wrong)}),
    image_part(any_url),
    st.fixed_dictionaries({"type": st.one_of(st.sampled_from(["audio", "image", ""]), any_text)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": wrong}),
    wrong,
)
any_message = st.fixed_dictionaries(
    {
        "role": st.one_of(
            st.sampled_from(["user", "assistant", "system", "developer", "tool", "User"]), any_text
        ),
        "content": st.one_of(any_text, st.lists(any_part, max_size=3), wrong),
    },
    optional={"name": any_text},
)
any_options = {
    **{name: any_float for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty")},
    **{name: any_int for name in ("top_k", "seed", "n", "max_tokens", "max_completion_tokens", "min_tokens")},
    "repetition_penalty": any_float,
    "model": st.one_of(any_text, wrong),
    "stream": st.one_of(st.booleans(), wrong),
    "stream_options": wrong,
    "stop": st.one_of(any_text, st.lists(any_text, max_size=5), wrong),
    "ignore_eos": wrong,
    "logprobs": st.one_of(st.booleans(), wrong),
    "top_logprobs": any_int,
    "logit_bias": st.one_of(st.dictionaries(any_text, st.integers(-100, 100), max_size=2), wrong),
    "response_format": st.one_of(st.fixed_dictionaries({"type": any_text}), wrong),
    "tools": wrong,
}


@st.composite
def odd_request(draw) -> dict:
    """A good request with something wrong in it: a field out of range or of the wrong type, a broken
    string or image, a conversation of any shape."""
    body = draw(good_request())
    if draw(st.booleans()):
        body["messages"] = draw(st.one_of(st.lists(any_message, max_size=4), wrong))
    else:
        body["messages"][-1] = draw(any_message)
    chosen = draw(st.lists(st.sampled_from(sorted(any_options)), max_size=3, unique=True))
    return body | {name: draw(any_options[name]) for name in chosen}


raw_body = st.one_of(  # bodies that are not a request object: not JSON, not UTF-8, nested deep, a scalar
    st.sampled_from([b"", b"{", b"null", b"[]", b"1e999", b'"\\ud800"', b"\xff\xfe", b"[" * 50_000]),
    st.binary(max_size=50),
)
bodies = st.one_of(good_request(), good_request(), good_request(), odd_request(), odd_request(), raw_body)


@pytest.fixture(scope="module")
def client():
    vlm = printable_tiny_cobra()
    engine = Engine(vlm, EngineConfig(slots=SLOTS))
    config = ServeConfig(model_name="m", max_tokens=4, default_max_tokens=3, images=ImagePolicy())
    with TestClient(create_app(engine, config), raise_server_exceptions=False) as c:
        c.vlm = vlm
        yield c


def reference_answer(client) -> str:
    r = client.post("/v1/chat/completions", json=REFERENCE)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def check(response, sent) -> None:
    """No 5xx; errors in OpenAI's format with a 4xx type; answers and streams whole."""
    where = f"{sent!r:.2000}"
    assert response.status_code < 500, f"{response.status_code} {response.text} for {where}"
    if response.status_code >= 400:
        problem = response.json()["error"]
        assert problem["code"] == response.status_code and problem["message"], where
        assert problem["type"] != "server_error", where
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        lines = [line for line in response.text.split("\n\n") if line]
        assert lines[-1] == "data: [DONE]", where
        for line in lines[:-1]:
            assert "error" not in json.loads(line.removeprefix("data: ")), f"{line} for {where}"
        return
    choices = response.json()["choices"]
    assert all(c["finish_reason"] in ("stop", "length") for c in choices), where
    assert all(isinstance(c["message"]["content"], str) for c in choices), where


def fuzz(client, examples: int) -> None:
    before = reference_answer(client)
    builder = client.vlm.get_prompt_builder()
    builder.add_turn("human", REFERENCE["messages"][0]["content"])
    assert before == client.vlm.generate(None, builder.get_prompt(), max_new_tokens=4)
    statuses: list[int] = []

    @settings(
        max_examples=examples,
        derandomize=True,  # the same requests on every run
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(bodies)
    def request(body):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()  # NaN, surrogates as is
        response = client.post(
            "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
        )
        statuses.append(response.status_code)
        check(response, body)
        health = client.get("/health")
        assert health.status_code == 200, f"{health.text} after {body!r:.2000}"

    request()
    assert len(statuses) >= examples
    assert statuses.count(200) >= examples // 4  # a good share reached the engine and was answered
    assert reference_answer(client) == before
    metrics = client.get("/metrics").text
    assert 'status="500"' not in metrics and 'status="503"' not in metrics


def test_a_short_fuzz(client):
    fuzz(client, 150)


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_5xx_nor_stop_the_server(client):
    fuzz(client, REQUESTS)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_an_event_is_one_line_to_any_line_reader(text):
    """Whatever an answer holds, its event is one `data:` line and a blank one, also to readers that break
    lines where `str.splitlines` does (U+0085, U+2028, U+2029 among them); its JSON gives the text back."""
    from mambavl.serve.api import sse

    event = sse({"choices": [{"delta": {"content": text}}]})
    for lines in (event.splitlines(), event.split("\n")[:-1]):
        assert len(lines) == 2 and lines[0].startswith("data: ") and lines[1] == ""
        assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["delta"]["content"] == text
