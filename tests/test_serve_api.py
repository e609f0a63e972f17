"""The HTTP API through real HTTP clients (uvicorn on a loopback port): OpenAI's request and response
formats, streaming, the limits and refusals (each a 4xx, after which the server keeps serving), the API
key, image sources, disconnects and `mambavl serve` itself."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

import mambavl
from mambavl.bench.serve import chat_body, engine_seconds, image_part, run_load
from mambavl.cli import app
from mambavl.serve import EngineConfig, ImagePolicy, ServeConfig
from mambavl.serve.schema import SYSTEM_MESSAGES, Message, conversation_prompt
from mambavl.serve.thread import free_port
from serving import LiveServer


@pytest.fixture(scope="module")
def vlm(demo_model_dir):
    return mambavl.load(demo_model_dir)


@pytest.fixture(scope="module")
def image(demo_model_dir):
    return Image.open(next((demo_model_dir.parent / "data" / "images").glob("heldout-*.png"))).convert("RGB")


@pytest.fixture(scope="module")
def server(vlm):
    with LiveServer(vlm, EngineConfig(slots=4)) as url:
        yield url


def ask(question: str, image=None, **options) -> dict:
    body = chat_body(question, image, **options)
    body.pop("stream_options")
    return body | {"stream": options.get("stream", False)}


def reference(vlm, question: str, image=None, **params) -> str:
    builder = vlm.get_prompt_builder()
    builder.add_turn("human", question + ("\n<image>" if image is not None else ""))
    return vlm.generate(image, builder.get_prompt(), **params)


def post(url: str, body, **kw) -> httpx.Response:
    kw.setdefault("timeout", 60)
    if isinstance(body, dict):
        return httpx.post(url + "/v1/chat/completions", json=body, **kw)
    return httpx.post(
        url + "/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        **kw,
    )


def test_completion_equals_generate_with_usage(server, vlm, image):
    r = post(server, ask("How many objects are there?", image, max_tokens=8))
    assert r.status_code == 200
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "test-model"
    want = reference(vlm, "How many objects are there?", image, max_new_tokens=8)
    assert out["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": want},
            "finish_reason": out["choices"][0]["finish_reason"],
        }
    ]
    usage = out["usage"]
    builder = vlm.get_prompt_builder()
    builder.add_turn("human", "How many objects are there?")
    positions = int(vlm.prepare([image], [builder.get_prompt()])[0].lengths[0])
    assert usage["prompt_tokens"] == positions  # the image's tokens count
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streaming_follows_openai_chunks(server, vlm, image):
    body = chat_body("What colour are the objects?", image, max_tokens=12, min_tokens=12)
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert len([p for p in pieces if p]) > 1  # it streamed
    assert "".join(pieces) == reference(
        vlm, "What colour are the objects?", image, max_new_tokens=12, min_length=12
    )
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12


def test_n_choices_and_seeded_sampling(server, image):
    body = ask("What shape are the objects?", image, max_tokens=6, min_tokens=6, temperature=1.5, seed=3, n=3)
    first, again = post(server, body).json(), post(server, body).json()
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert first["choices"] == again["choices"]  # seeded: reproducible
    alone = post(server, body | {"n": 1, "seed": 4}).json()
    assert alone["choices"][0]["message"] == first["choices"][1]["message"]  # choice i draws from seed + i
    assert first["usage"]["completion_tokens"] == 18


def test_multi_turn_history_and_stop(server, vlm, image):
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "How many objects are there?"}, image_part(image)],
        },
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "What shape are the objects?"},
    ]
    out = post(server, {"messages": messages, "max_tokens": 10, "min_tokens": 10}).json()
    builder = vlm.get_prompt_builder()
    for role, text in [
        ("human", "How many objects are there?\n<image>"),
        ("gpt", "2"),
        ("human", messages[2]["content"]),
    ]:
        builder.add_turn(role, text)
    want = vlm.generate(image, builder.get_prompt(), max_new_tokens=10, min_length=10)
    assert out["choices"][0]["message"]["content"] == want
    stop = want[2:4]
    out = post(server, {"messages": messages, "max_tokens": 10, "min_tokens": 10, "stop": [stop]}).json()
    assert out["choices"][0]["message"]["content"] == want[: want.find(stop)].strip()
    assert out["choices"][0]["finish_reason"] == "stop"


def test_models_health_metrics(server):
    models = httpx.get(server + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["test-model"]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["slots"] == 4
    post(server, ask("hi", max_tokens=2))
    metrics = httpx.get(server + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in (
        "mambavl_requests_total",
        "mambavl_generation_tokens_total",
        "mambavl_slots_used",
        "mambavl_time_to_first_token_seconds_bucket",
        "mambavl_decode_batch_size_bucket",
    ):
        assert name in text
    assert 'mambavl_http_responses_total{route="/v1/chat/completions",status="200"}' in text


def data_uri(payload: bytes, mime: str = "image/png") -> dict:
    url = f"data:{mime};base64," + base64.b64encode(payload).decode()
    return {
        "role": "user",
        "content": [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": url}}],
    }


BAD = {
    "malformed JSON": (b'{"messages": [', 400, "not valid JSON"),
    "not an object": (b"[1, 2]", 400, "invalid request"),
    "messages of the wrong type": ({"messages": "hello"}, 400, "messages"),
    "an unknown role": ({"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    "a wrong part type": (
        {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        400,
        "invalid request",
    ),
    "temperature of the wrong type": (
        {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
        400,
        "temperature",
    ),
    "max_tokens 0": ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens over the limit": (
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6},
        400,
        "limit",
    ),
    "n over the slots": ({"messages": [{"role": "user", "content": "x"}], "n": 5}, 400, "slots"),
    "no messages": ({"messages": []}, 400, "messages"),
    "assistant last": (
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
        400,
        "last message",
    ),
    "two users in a row": (
        {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]},
        400,
        "alternate",
    ),
    "a system message after the last user message": (
        {"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}]},
        400,
        "no user message to go with",
    ),
    "only a system message": ({"messages": [{"role": "system", "content": "s"}]}, 400, "last message"),
    "logprobs": ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "logprobs"),
    "another model": ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, 404, "not 'gpt-4'"),
    "text as an image": ({"messages": [data_uri(b"hello, world")]}, 400, "not an image"),
    "a non-image data URI": ({"messages": [data_uri(b"hello", "text/plain")]}, 400, "not an image"),
    "broken base64": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}],
                }
            ]
        },
        400,
        "base64",
    ),
    "a prompt over the model's length": (
        {"messages": [{"role": "user", "content": "x" * 3000}]},
        400,
        "shorten",
    ),
    "a remote URL": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}],
                }
            ]
        },
        403,
        "--allow-remote-images",
    ),
    "a local path": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}
            ]
        },
        403,
        "--image-dir",
    ),
    "an odd scheme": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}
            ]
        },
        400,
        "scheme",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_requests_get_a_clear_4xx(server, case):
    body, status, words = BAD[case]
    r = post(server, body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_two_images_and_huge_images_are_refused(vlm, image):
    buf = io.BytesIO()
    Image.new("RGB", (300, 300)).save(buf, format="PNG")
    big = data_uri(buf.getvalue())
    policy = ImagePolicy(max_pixels=200 * 200)
    with LiveServer(
        vlm, EngineConfig(slots=2), ServeConfig(model_name="m", images=policy, max_body_bytes=200_000)
    ) as url:
        r = post(url, {"messages": [big]})
        assert r.status_code == 400 and "exceeds the limit" in r.json()["error"]["message"]
        two = {"role": "user", "content": [image_part(image), image_part(image)]}
        r = post(url, {"messages": [two]})
        assert r.status_code == 400 and "one image per conversation" in r.json()["error"]["message"]
        r = post(url, {"messages": [{"role": "user", "content": "x" * 300_000}]})
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        r = httpx.post(
            url + "/v1/chat/completions", content=iter([b"{" * 150_000, b" " * 150_000]), timeout=30
        )
        assert r.status_code == 413  # a chunked body with no Content-Length is counted as it arrives
        assert post(url, ask("hi", max_tokens=2)).status_code == 200  # and the server goes on


def test_api_key(vlm):
    with LiveServer(vlm, EngineConfig(slots=2), ServeConfig(model_name="m", api_key="sesame")) as url:
        assert post(url, ask("hi", max_tokens=2)).status_code == 401
        assert (
            post(url, ask("hi", max_tokens=2), headers={"Authorization": "Bearer wrong"}).status_code == 401
        )
        assert (
            post(url, ask("hi", max_tokens=2), headers={"Authorization": "Bearer sesame"}).status_code == 200
        )
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # probes need no key
        assert "401" in httpx.get(url + "/metrics").text


def test_local_images_only_inside_the_allowed_directory(vlm, image, tmp_path):
    inside = tmp_path / "images"
    inside.mkdir()
    image.save(inside / "scene.png")
    image.save(tmp_path / "secret.png")
    config = ServeConfig(model_name="m", images=ImagePolicy(local_dir=inside))
    with LiveServer(vlm, EngineConfig(slots=2), config) as url:

        def with_url(u: str) -> dict:
            parts = [
                {"type": "text", "text": "How many objects are there?"},
                {"type": "image_url", "image_url": {"url": u}},
            ]
            return {"messages": [{"role": "user", "content": parts}], "max_tokens": 6}

        want = reference(vlm, "How many objects are there?", image, max_new_tokens=6)
        for u in ("scene.png", str(inside / "scene.png"), (inside / "scene.png").as_uri()):
            r = post(url, with_url(u))
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want, u
        for u in ("../secret.png", str(tmp_path / "secret.png"), "/etc/passwd"):
            r = post(url, with_url(u))
            assert r.status_code == 403 and "outside" in r.json()["error"]["message"], u
        assert post(url, with_url("missing.png")).status_code == 404


def test_remote_images_when_enabled_and_from_allowed_hosts(vlm, image, tmp_path):
    image.save(tmp_path / "scene.png")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"

    def with_url(u: str) -> dict:
        parts = [
            {"type": "text", "text": "How many objects are there?"},
            {"type": "image_url", "image_url": {"url": u}},
        ]
        return {"messages": [{"role": "user", "content": parts}], "max_tokens": 6}

    try:
        want = reference(vlm, "How many objects are there?", image, max_new_tokens=6)
        allowed = ServeConfig(
            model_name="m",
            images=ImagePolicy(allow_remote=True, remote_hosts=("127.0.0.1",), allow_private_hosts=True),
        )
        with LiveServer(vlm, EngineConfig(slots=2), allowed) as url:
            r = post(url, with_url(base + "/scene.png"))
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want
            r = post(url, with_url(base + "/missing.png"))
            assert r.status_code == 400 and "HTTP 404" in r.json()["error"]["message"]
        elsewhere = ServeConfig(
            model_name="m", images=ImagePolicy(allow_remote=True, remote_hosts=("example.org",))
        )
        with LiveServer(vlm, EngineConfig(slots=2), elsewhere) as url:
            r = post(url, with_url(base + "/scene.png"))
            assert r.status_code == 403 and "not allowed" in r.json()["error"]["message"]
    finally:
        httpd.shutdown()


def wait_for(condition, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_a_disconnect_frees_the_slot(vlm, image):
    with LiveServer(vlm, EngineConfig(slots=1)) as url:
        body = chat_body("What colour are the objects?", image, max_tokens=2000, ignore_eos=True)
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
            assert httpx.get(url + "/health").json()["active"] == 1
        # the client is gone: its sequence leaves the batch and the one slot serves the next request
        assert wait_for(lambda: httpx.get(url + "/health").json()["active"] == 0)
        assert 'outcome="cancelled"} 1.0' in httpx.get(url + "/metrics").text
        assert post(url, ask("hi", max_tokens=2)).status_code == 200
        # a non-streaming client that leaves while its request runs frees the slot too
        with pytest.raises(httpx.ReadTimeout):
            post(url, ask("hi", max_tokens=2000, ignore_eos=True) | {"stream": False}, timeout=0.5)
        assert wait_for(lambda: httpx.get(url + "/health").json()["active"] == 0)


def test_timeouts_are_504(vlm):
    with LiveServer(vlm, EngineConfig(slots=1, timeout=0.3)) as url:
        r = post(url, ask("hi", max_tokens=2000, ignore_eos=True))
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
        body = chat_body("hi", max_tokens=2000, ignore_eos=True)
        outcome = run_load(url, [body], 1)[0][0]
        assert outcome.status == 200 and "timed out" in outcome.error  # mid-stream: an error chunk
        assert post(url, ask("hi", max_tokens=2)).status_code == 200


def test_mambavl_serve_command(demo_model_dir, vlm):
    port = free_port()
    env = dict(os.environ, MAMBAVL_API_KEY="k")
    cmd = [
        sys.executable,
        "-m",
        "mambavl.cli",
        "serve",
        "--model",
        str(demo_model_dir),
        "--port",
        str(port),
        "--slots",
        "2",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _up(url), 120), proc.stdout.read() if proc.poll() is not None else "no answer"
        r = post(url, ask("How many objects are there?", max_tokens=4), headers={"Authorization": "Bearer k"})
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == reference(
            vlm, "How many objects are there?", max_new_tokens=4
        )
        assert r.json()["model"] == str(demo_model_dir)
        page = httpx.get(url + "/")
        assert "<html" in page.text.lower()
        assert "default-src 'self'" in page.headers["content-security-policy"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    said = [line for line in proc.stdout.read().splitlines() if line.startswith("serving")]
    assert len(said) == 1 and said[0].startswith(f"serving {demo_model_dir} on {url} (2 slots, ")
    bad = subprocess.run([*cmd[:5], "/no/such/model"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "error" in bad.stdout


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_stopped_engine_is_a_503_not_a_hang(vlm):
    server = LiveServer(vlm, EngineConfig(slots=1))
    with server as url:
        server.engine.stop()
        r = post(url, ask("hi", max_tokens=2))
        assert r.status_code == 503 and "not running" in r.json()["error"]["message"]
        assert httpx.get(url + "/health").status_code == 503


def test_extreme_sampling_settings_and_seeds_over_http(server, vlm):
    """A temperature of 1e-45, or a top_p under float32's range, once made the sampler raise in the
    engine thread: that request failed and every later one got a 503. They answer as greedy decoding does
    (one token is left); a seed beyond 64 bits is a 400, a negative one is taken as torch takes it."""
    want = reference(vlm, "hi", max_new_tokens=4, min_length=4)
    for options in (dict(temperature=1e-45), dict(temperature=1, top_p=1e-320)):
        r = post(server, ask("hi", max_tokens=4, min_tokens=4, seed=1, **options))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want
    r = post(server, ask("hi", max_tokens=4, seed=2**64))
    assert r.status_code == 400 and "seed" in r.json()["error"]["message"]
    assert post(server, ask("hi", max_tokens=4, seed=-1, temperature=1)).status_code == 200
    assert httpx.get(server + "/health").status_code == 200


def test_an_oversized_prompt_is_a_fast_400_and_delays_no_stream(server, vlm):
    """A 15 MiB text (under the body limit) took 41–67 s to be refused while every other stream waited.
    It is refused before it is tokenized, in well under a second, while a stream goes on decoding."""
    chunks: list[float] = []

    def long_stream():
        body = ask("Describe the picture.", max_tokens=400, ignore_eos=True, stream=True)
        with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(time.monotonic())

    thread = threading.Thread(target=long_stream, daemon=True)
    thread.start()
    assert wait_for(lambda: len(chunks) >= 3, 30)
    huge = json.dumps(ask("x" * (15 * 2**20), max_tokens=4)).encode()  # encoded before the clock starts
    started = time.monotonic()
    r = post(server, huge)
    took = time.monotonic() - started
    assert r.status_code == 400 and "refused unread" in r.json()["error"]["message"]
    assert took < 1.0, took
    over = "x" * (vlm.config.max_length + 1)
    r = post(server, ask(over, max_tokens=4))
    assert r.status_code == 400 and "shorten the prompt" in r.json()["error"]["message"]
    thread.join(timeout=120)
    assert any(t > started for t in chunks)  # the stream went on meanwhile
    assert post(server, ask("hi", max_tokens=4)).json()["choices"][0]["message"]["content"] == reference(
        vlm, "hi", max_new_tokens=4
    )


# ---- system messages: the format's slot where it has one, else folded into the user's message ----------
SYSTEM = "Answer with a number."


def answer_and_usage(url: str, messages: list, **options) -> tuple[str, int]:
    r = post(url, {"messages": messages, "max_tokens": 6, "min_tokens": 6, **options})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"], r.json()["usage"]["prompt_tokens"]


def user(text: str, image=None) -> dict:
    return {
        "role": "user",
        "content": [{"type": "text", "text": text}] + ([image_part(image)] if image else []),
    }


@pytest.mark.parametrize("role", ["system", "developer"])
def test_a_system_message_is_folded_as_if_the_user_had_typed_it(server, vlm, image, role):
    """OpenAI clients send a system message by default; Cobra's format has no system prompt, so the text
    goes before the first user message as "{system}\n\n{message}": the same answer as typing that."""
    folded = answer_and_usage(server, [{"role": role, "content": SYSTEM}, user("How many objects?", image)])
    typed = answer_and_usage(server, [user(f"{SYSTEM}\n\nHow many objects?", image)])
    assert folded == typed
    assert folded[1] > answer_and_usage(server, [user("How many objects?", image)])[1]  # it reached the model
    assert folded[0] == reference(
        vlm, f"{SYSTEM}\n\nHow many objects?", image, max_new_tokens=6, min_length=6
    )


def test_several_empty_and_later_system_messages(server, image):
    """Leading system messages are joined by blank lines; empty ones are ignored; one after the first user
    message folds into the next user message."""
    plain = [user("How many objects?", image), {"role": "assistant", "content": "2"}, user("What shape?")]
    messages = [
        {"role": "system", "content": "A."},
        {"role": "system", "content": ""},
        {"role": "developer", "content": [{"type": "text", "text": "B."}]},
        plain[0],
        {"role": "system", "content": "C."},
        plain[1],
        plain[2],
    ]
    typed = [user("A.\n\nB.\n\nHow many objects?", image), plain[1], user("C.\n\nWhat shape?")]
    assert answer_and_usage(server, messages) == answer_and_usage(server, typed)
    empty = [{"role": "system", "content": "  "}, *plain]
    assert answer_and_usage(server, empty) == answer_and_usage(server, plain)


def test_a_server_that_refuses_system_messages(vlm, image):
    """`--system-messages refuse`: system text the model has no slot for is a 400 that says what to do;
    an empty system message is still ignored."""
    config = ServeConfig(model_name="test-model", system_messages="refuse")
    with LiveServer(vlm, EngineConfig(slots=1), config) as url:
        r = post(url, {"messages": [{"role": "system", "content": SYSTEM}, user("hi")], "max_tokens": 2})
        message = r.json()["error"]["message"]
        assert (
            r.status_code == 400 and "has no system prompt" in message and "--system-messages fold" in message
        )
        later = [
            user("hi"),
            {"role": "assistant", "content": "2"},
            {"role": "system", "content": "s"},
            user("x"),
        ]
        r = post(url, {"messages": later, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(
            "messages[2]: a system message"
        )
        empty = [{"role": "system", "content": ""}, user("hi")]
        assert answer_and_usage(url, empty) == answer_and_usage(url, [user("hi")])
    with pytest.raises(ValueError, match="system_messages='drop'"):
        ServeConfig(system_messages="drop")


def test_viper_keeps_its_system_slot_and_its_default():
    """A chat-template model (Viper) puts the system message in its system slot in both modes (refuse
    refuses only what would be folded); without one it keeps its default system prompt."""
    vlm = mambavl.create("tiny-viper-mamba")
    system = [Message(role="system", content="Be brief.")]
    asked = [Message(role="user", content="Hi")]
    for mode in SYSTEM_MESSAGES:
        prompt, _ = conversation_prompt(vlm, system + asked, mode)
        builder = vlm.get_prompt_builder("Be brief.")
        builder.add_turn("human", "Hi")
        assert prompt == builder.get_prompt() and "Be brief." in prompt
    default = vlm.get_prompt_builder()
    default.add_turn("human", "Hi")
    assert conversation_prompt(vlm, asked)[0] == default.get_prompt()
    assert conversation_prompt(vlm, [Message(role="system", content=""), *asked])[0] == default.get_prompt()
    later = [*asked, Message(role="assistant", content="Yo"), *system, *asked]
    with pytest.raises(ValueError, match=r"messages\[2\]: a system message after the first user message"):
        conversation_prompt(vlm, later, "refuse")
    assert "<|im_start|>user\nBe brief.\n\nHi<|im_end|>" in conversation_prompt(vlm, later)[0]


def test_the_page_has_an_icon(server):
    """Browsers ask for an icon on every page of the server: it is there (no 404 in the log)."""
    page = httpx.get(server + "/").text
    assert '<link rel="icon" href="favicon.ico"' in page
    icon = httpx.get(server + "/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert icon.text.startswith("<svg") and icon.text.endswith("</svg>")


def test_serve_on_a_busy_port_fails_at_once_and_never_says_serving(demo_model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["serve", "--model", str(demo_model_dir), "--port", str(port)]
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    why = "is in use by another program: stop it, or pick another port with --port"
    assert lines == [f"error: port {port} on 127.0.0.1 {why}"]
    assert "serving" not in result.output


def test_serve_hands_its_prefill_options_to_the_engine(monkeypatch, demo_model_dir):
    """`--prefill-tokens` (0: no budget) and `--prefill-batch` reach the engine's config; left out, the
    engine's defaults stand; a batch of 0 is refused before anything loads."""
    import mambavl.serve

    seen = []

    def engine(vlm, config):
        seen.append(config)
        raise ValueError("the engine's config was read")

    monkeypatch.setattr(mambavl.serve, "Engine", engine)
    default = EngineConfig()
    cases = (
        ([], (default.prefill_tokens, default.prefill_batch)),
        (["--prefill-tokens", "0", "--prefill-batch", "4"], (None, 4)),
        (["--prefill-tokens", "512"], (512, default.prefill_batch)),
    )
    for args, want in cases:
        base = ["serve", "--model", str(demo_model_dir), "--port", str(free_port()), *args]
        result = CliRunner().invoke(app, base)
        assert result.exit_code == 1 and "the engine's config was read" in result.output
        assert (seen[-1].prefill_tokens, seen[-1].prefill_batch) == want
    refused = CliRunner().invoke(app, ["serve", "--model", str(demo_model_dir), "--prefill-batch", "0"])
    assert refused.exit_code == 2 and len(seen) == len(cases)


def test_a_conversation_prepares_its_image_once(vlm, image):
    """Every turn of a chat sends its image again: the server prepares it once, by its bytes, and later
    turns (and other requests with the same bytes) reuse it with the same answers; other bytes are another
    entry; with the cache off every request prepares its own."""

    def cache_counts(url):
        text = httpx.get(url + "/metrics").text
        return [
            float(line.rsplit(" ", 1)[1]) if line else 0.0
            for result in ("hit", "miss")
            for line in [
                next((x for x in text.splitlines() if f'image_cache_total{{result="{result}"}}' in x), "")
            ]
        ]

    other = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for cache_mb, want in ((256.0, [2.0, 2.0]), (0.0, [0.0, 4.0])):
        started = time.perf_counter()
        with LiveServer(vlm, EngineConfig(slots=2), ServeConfig(image_cache_mb=cache_mb)) as url:
            answers = [
                post(url, ask(q, im, max_tokens=8)).json()["choices"][0]["message"]["content"]
                for q, im in (
                    ("What is it?", image),
                    ("What is it?", image),
                    ("Count.", other),
                    ("Count.", other),
                )
            ]
            assert cache_counts(url) == want
            work = engine_seconds(url)["prefill_s"]  # the engine's own prefill time, never overlapping
            assert 0 < work < time.perf_counter() - started
        assert answers[0] == answers[1] == reference(vlm, "What is it?", image, max_new_tokens=8)
        assert answers[2] == answers[3] == reference(vlm, "Count.", other, max_new_tokens=8)


def test_prepared_images_stay_within_their_budget():
    import torch

    from mambavl.serve.images import PreparedImages
    from mambavl.vlm.model import PreparedImage

    def prepared(fill):
        return PreparedImage([{"a": torch.full((3, 8, 8), fill), "b": torch.zeros(3, 8, 8)}], (8, 8))

    size = 2 * 3 * 8 * 8 * 4  # bytes of one entry's views
    cache = PreparedImages(budget_bytes=2 * size)
    keys = [PreparedImages.key(bytes([i])) for i in range(3)]
    for i, key in enumerate(keys[:2]):
        cache.put(key, prepared(float(i)))
    assert cache.get(keys[0]) is not None  # now the most recently used
    cache.put(keys[2], prepared(2.0))  # over budget: the least recently used (keys[1]) goes
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and cache.get(keys[2]) is not None
    assert len(cache) == 2 and cache.held == 2 * size
    PreparedImages(budget_bytes=size - 1).put(keys[0], prepared(0.0))  # larger than the budget: not kept
    tiny = PreparedImages(budget_bytes=size - 1)
    tiny.put(keys[0], prepared(0.0))
    assert len(tiny) == 0 and tiny.get(keys[0]) is None
