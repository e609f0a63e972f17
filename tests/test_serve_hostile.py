"""The HTTP layer against hostile clients and hostile URLs, through a real server (uvicorn on a loopback
port): slow clients are cut off at their deadlines, the connection cap holds, remote images never reach
loopback or private addresses (after DNS, on the address that was checked), a dripping image server is
cut off at a total deadline, odd input is a 4xx and never a 500, and every response is counted."""

from __future__ import annotations

import base64
import http.server
import io
import socket
import struct
import threading
import time
import zlib

import httpx
import pytest
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from mambavl.cli import app as cli
from mambavl.serve import EngineConfig, ImagePolicy, ServeConfig
from mambavl.serve.connections import ConnectionLimits
from mambavl.serve.images import address_kind, pinned, remote_url
from serving import LiveServer, printable_tiny_cobra


@pytest.fixture(scope="module")
def vlm():
    return printable_tiny_cobra()


@pytest.fixture(scope="module")
def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def served(vlm, limits: ConnectionLimits | None = None, images: ImagePolicy | None = None) -> LiveServer:
    config = ServeConfig(
        model_name="m", connections=limits or ConnectionLimits(), images=images or ImagePolicy()
    )
    return LiveServer(vlm, EngineConfig(slots=2), config)


def chat(url: str, body: dict | bytes, timeout: float = 30) -> httpx.Response:
    if isinstance(body, dict):
        return httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)
    headers = {"content-type": "application/json"}
    return httpx.post(url + "/v1/chat/completions", content=body, headers=headers, timeout=timeout)


def hi(url: str) -> httpx.Response:
    return chat(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


def with_image(url: str) -> dict:
    parts = [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": url}}]
    return {"messages": [{"role": "user", "content": parts}], "max_tokens": 2}


def counted(url: str, route: str, status: int) -> float:
    line = f'mambavl_http_responses_total{{route="{route}",status="{status}"}} '
    for row in httpx.get(url + "/metrics").text.splitlines():
        if row.startswith(line):
            return float(row[len(line) :])
    return 0.0


def metric(url: str, name: str) -> float:
    for row in httpx.get(url + "/metrics").text.splitlines():
        if row.startswith(name + " "):
            return float(row.split()[-1])
    raise AssertionError(f"{name} is not in /metrics")


def eventually(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def open_socket(url: str, sent: bytes = b"") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=15)
    if sent:
        sock.sendall(sent)
    return sock


def read_response(sock: socket.socket) -> bytes:
    """One whole response (its head and a Content-Length body) from a connection that stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout if it never does)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return data


def drip_until_closed(sock: socket.socket, piece: bytes, seconds: float) -> bytes:
    """Sends `piece` every 50 ms until the server closes the connection (or `seconds` pass); what it
    answered meanwhile."""
    answer, deadline = b"", time.monotonic() + seconds
    sock.settimeout(0.05)
    try:
        while time.monotonic() < deadline:
            sock.sendall(piece)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            answer += chunk
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()
    return answer


HALF_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl"
HALF_BODY = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b'{"messages"'


def test_slow_clients_are_cut_off_at_their_deadlines_while_others_are_served(vlm):
    limits = ConnectionLimits(header_timeout=1.5, body_timeout=1.5)
    with served(vlm, limits) as url:
        start = time.monotonic()
        silent, half_head, half_body = (
            open_socket(url),
            open_socket(url, HALF_HEAD),
            open_socket(url, HALF_BODY),
        )
        # a keep-alive connection that starts a second request and stops halfway through its head
        kept = open_socket(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(kept).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /health HTTP/1.1\r\nHo")

        asked = time.monotonic()
        assert hi(url).status_code == 200
        assert time.monotonic() - asked < 1.5  # answered while the slow ones hang on

        for sock in (silent, half_head, kept):
            assert read_until_closed(sock) == b""  # closed, no answer: no request was ever read
        head, _, body = read_until_closed(half_body).partition(b"\r\n\r\n")
        # Not cut before its deadline. That it was cut at all is what read_until_closed shows: it returns
        # only when the server closes, and the socket's own 15 s timeout would fail the test otherwise. No
        # upper bound on the time: on a loaded machine it says nothing about the server.
        waited = time.monotonic() - start
        assert waited >= 1.4, waited
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
        assert b"did not arrive within 1.5 s" in body and b'"invalid_request_error"' in body

        assert metric(url, 'mambavl_client_timeouts_total{phase="headers"}') == 3
        assert counted(url, "/v1/chat/completions", 408) == 1
        assert hi(url).status_code == 200


def test_a_request_http_cannot_parse_is_a_counted_400(vlm):
    with served(vlm) as url:
        answer = read_until_closed(open_socket(url, b"NOT HTTP AT ALL\r\n\r\n"))
        assert answer.startswith(b"HTTP/1.1 400")
        assert counted(url, "other", 400) == 1


def test_the_connection_cap_answers_503_and_lets_go_when_connections_close(vlm):
    limits = ConnectionLimits(max_connections=3, header_timeout=30)
    with served(vlm, limits) as url:
        idle = [open_socket(url, b"GET /hea") for _ in range(3)]
        time.sleep(0.2)  # accepted by the server
        refused = hi(url)
        assert refused.status_code == 503 and refused.headers["connection"] == "close"
        assert refused.json()["error"]["type"] == "server_error"
        assert "too many open connections" in refused.json()["error"]["message"]
        for sock in idle:
            sock.close()
        assert eventually(lambda: hi(url).status_code == 200), "the cap held after the connections closed"
        assert counted(url, "/v1/chat/completions", 503) >= 1
        assert eventually(lambda: metric(url, "mambavl_connections") == 1)  # the /metrics request's own


class ImageHost:
    """A loopback HTTP server with one PNG that records every request it gets (path and Host header)."""

    def __init__(self, png: bytes, drip: float | None = None):
        self.requests: list[tuple[str, str]] = []
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                host.requests.append((self.path, self.headers.get("Host", "")))
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                if not drip:
                    self.wfile.write(png)
                    return
                for i in range(len(png)):  # one byte at a time: every read is fast, the whole is not
                    self.wfile.write(png[i : i + 1])
                    self.wfile.flush()
                    time.sleep(drip)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


REMOTE = ImagePolicy(allow_remote=True)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://127.0.0.1:{port}/scene.png", "loopback"),
        ("http://localhost:{port}/scene.png", "loopback"),  # a name that resolves to loopback
        ("http://[::1]:{port}/scene.png", "loopback"),
        ("http://[::ffff:127.0.0.1]:{port}/scene.png", "loopback"),  # IPv4 mapped into IPv6
        ("http://2130706433:{port}/scene.png", "loopback"),  # 127.0.0.1 as one number
        ("http://10.1.2.3/scene.png", "private"),
        ("http://192.168.0.1/scene.png", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),  # the cloud metadata service
        ("http://0.0.0.0:{port}/scene.png", "unspecified"),
        ("http://224.0.0.1/scene.png", "multicast"),
    ],
)
def test_remote_images_refuse_loopback_and_private_addresses(vlm, png, url, kind):
    with ImageHost(png) as host, served(vlm, images=REMOTE) as server:
        r = chat(server, with_image(url.format(port=host.port)))
        assert r.status_code == 403, r.text
        message = r.json()["error"]["message"]
        assert f"a {kind} address" in message and "--allow-private-image-hosts" in message
        assert r.json()["error"]["type"] == "permission_error"
        assert host.requests == []  # refused before connecting


@pytest.fixture
def fake_dns(monkeypatch):
    """Names under .test resolve to the addresses a test gives, one list per lookup in turn (the last one
    repeats); every other name as usual. Returns the lookups made."""
    answers: dict[str, list[list[str]]] = {}
    lookups: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if not str(host).endswith(".test"):
            return real(host, port, family, type, proto, flags)
        lookups.append(host)
        queue = answers[host]
        addresses = queue.pop(0) if len(queue) > 1 else queue[0]
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers, lookups


def test_one_private_answer_among_public_ones_is_enough_to_refuse(vlm, png, fake_dns):
    answers, lookups = fake_dns
    answers["mixed.test"] = [["93.184.216.34", "10.0.0.5"]]
    with served(vlm, images=REMOTE) as server:
        r = chat(server, with_image("http://mixed.test/scene.png"))
        assert r.status_code == 403 and "10.0.0.5, a private address" in r.json()["error"]["message"]
        assert lookups == ["mixed.test"]


def test_the_fetch_goes_to_the_address_that_was_checked(vlm, png, fake_dns):
    """DNS rebinding: a second lookup would give another address; the connection uses the first one's."""
    answers, lookups = fake_dns
    answers["images.test"] = [["127.0.0.1"], ["127.0.0.2"]]  # nothing listens on 127.0.0.2
    allowed = ImagePolicy(allow_remote=True, allow_private_hosts=True)
    with ImageHost(png) as host, served(vlm, images=allowed) as server:
        r = chat(server, with_image(f"http://images.test:{host.port}/scene.png"))
        assert r.status_code == 200, r.text
        assert lookups == ["images.test"]
        assert host.requests == [("/scene.png", f"images.test:{host.port}")]  # the name, not the IP


def test_pinned_requests_keep_the_name_for_http_and_tls():
    url, headers, extensions = pinned(remote_url("https://Images.Example.com:8443/a.png?x=1"), "2001:db8::7")
    assert str(url) == "https://[2001:db8::7]:8443/a.png?x=1"
    assert headers == {"Host": "images.example.com:8443"}
    assert extensions == {"sni_hostname": "images.example.com"}  # the certificate is checked for the name
    url, headers, extensions = pinned(remote_url("http://images.example.com/a.png"), "93.184.216.34")
    assert str(url) == "http://93.184.216.34/a.png" and headers == {"Host": "images.example.com"}
    assert extensions == {}


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
        ("127.0.0.5", "loopback"),
        ("::1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::", "loopback"),  # 6to4 around 127.0.0.1
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("100.64.0.1", "non-public"),  # carrier-grade NAT
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("::", "unspecified"),
    ],
)
def test_address_kinds(address, kind):
    import ipaddress

    assert address_kind(ipaddress.ip_address(address)) == kind


def test_allowed_private_hosts_are_fetched(vlm, png):
    allowed = ImagePolicy(allow_remote=True, allow_private_hosts=True)
    with ImageHost(png) as host, served(vlm, images=allowed) as server:
        assert chat(server, with_image(f"http://localhost:{host.port}/scene.png")).status_code == 200


def test_a_dripping_image_server_is_cut_off_at_the_total_deadline(vlm, png):
    policy = ImagePolicy(allow_remote=True, allow_private_hosts=True, fetch_timeout=1.0)
    with ImageHost(png, drip=0.05) as host, served(vlm, images=policy) as server:
        start = time.monotonic()
        r = chat(server, with_image(f"http://127.0.0.1:{host.port}/scene.png"))
        assert r.status_code == 400 and "took over 1 s" in r.json()["error"]["message"]
        assert time.monotonic() - start < 3  # not 10 s per read
        assert hi(server).status_code == 200


def ztxt_bomb(png: bytes) -> bytes:
    """A valid PNG with a zTXt chunk that decompresses past Pillow's limit for text chunks."""
    data = b"k\x00\x00" + zlib.compress(b"a" * (PngImagePlugin.MAX_TEXT_CHUNK + 1000), 9)
    chunk = struct.pack(">I", len(data)) + b"zTXt" + data + struct.pack(">I", zlib.crc32(b"zTXt" + data))
    return png[:33] + chunk + png[33:]  # after the 8-byte signature and the IHDR chunk


def data_uri(payload: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(payload).decode()


def user(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 2}


ODD = {
    "a lone surrogate in the text": (
        b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}',
        "messages[0].content holds a lone surrogate (U+D800)",
    ),
    "a lone surrogate in a text part": (
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
        "messages[0].content[0].text holds a lone surrogate (U+DFFF)",
    ),
    "a lone surrogate in a stop string": (
        b'{"messages": [{"role": "user", "content": "x"}], "stop": ["\\ud83d"]}',
        "stop[0] holds a lone surrogate",
    ),
    "a lone surrogate in an unknown part type": (
        b'{"messages": [{"role": "user", "content": [{"type": "\\ud800"}]}]}',
        "invalid request",
    ),
    "a NUL byte in a local image path": (with_image("scene\x00.png"), "holds a NUL byte"),
    "a tab in an image URL": (with_image("http://images.test\t/a.png"), "is not a valid URL"),
    "an unclosed IPv6 bracket": (with_image("http://[::1/a.png"), "is not a valid URL"),
    "a port out of range": (with_image("http://images.test:99999/a.png"), "port 99999 is out of range"),
    "invalid UTF-8": (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "UnicodeDecodeError"),
    "JSON nested too deeply": (b"[" * 100_000, "not valid JSON: RecursionError"),
}


def test_odd_input_is_a_clear_400_never_a_500(vlm, png, tmp_path, fake_dns):
    (tmp_path / "scene.png").write_bytes(png)
    policy = ImagePolicy(allow_remote=True, remote_hosts=("images.test",), local_dir=tmp_path)
    cases = {**ODD, "a PNG text-chunk bomb": (with_image(data_uri(ztxt_bomb(png))), "MAX_TEXT_CHUNK")}
    with served(vlm, images=policy) as url:
        for case, (body, words) in cases.items():
            r = chat(url, body)
            assert r.status_code == 400, (case, r.text)
            assert words in r.json()["error"]["message"], (case, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error", case
        assert counted(url, "/v1/chat/completions", 400) == len(cases)
        assert fake_dns[1] == []  # each was refused before a lookup
        assert httpx.get(url + "/health").status_code == 200


def test_an_unhandled_error_is_a_500_in_openai_format_and_counted(vlm, monkeypatch):
    server = served(vlm, images=ImagePolicy())
    with server as url:
        monkeypatch.setattr(server.engine, "submit", lambda job: {}["no such key"])
        r = hi(url)
        assert r.status_code == 500
        assert r.json()["error"] == {
            "message": "internal error (KeyError) while handling the request; the server goes on",
            "type": "server_error",
            "code": 500,
        }
        monkeypatch.undo()
        assert hi(url).status_code == 200
        assert counted(url, "/v1/chat/completions", 500) == 1


def test_a_refused_body_is_answered_and_its_rest_cut_off_at_the_body_deadline(vlm):
    config = ServeConfig(model_name="m", max_body_bytes=1000, connections=ConnectionLimits(body_timeout=1.0))
    with LiveServer(vlm, EngineConfig(slots=1), config) as url:
        r = chat(url, user("x" * 2000))
        assert r.status_code == 413 and "the limit is 1,000" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/chat/completions", content=iter([b"{" * 600, b" " * 600]), timeout=30)
        assert r.status_code == 413  # a chunked body with no Content-Length, counted as it arrives

        # a client that never stops sending: answered at once, then closed at the body deadline
        sock = open_socket(
            url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999\r\n\r\n"
        )
        start = time.monotonic()
        answer = drip_until_closed(sock, b"x" * 100, seconds=10)
        assert answer.startswith(b"HTTP/1.1 413")
        assert 0.9 < time.monotonic() - start < 5

        assert counted(url, "/v1/chat/completions", 413) == 3
        assert metric(url, 'mambavl_client_timeouts_total{phase="body"}') == 1
        assert hi(url).status_code == 200


def test_serve_documents_its_limits_and_refuses_bad_ones():
    runner = CliRunner()
    text = " ".join(runner.invoke(cli, ["serve", "--help"], env={"COLUMNS": "200"}).output.split())
    for flag in (
        "--header-timeout",
        "--body-timeout",
        "--keep-alive-timeout",
        "--max-connections",
        "--image-fetch-timeout",
        "--allow-private-image-hosts",
    ):
        assert flag in text, flag
    result = runner.invoke(cli, ["serve", "--model", "tiny-cobra", "--header-timeout", "0"])
    assert result.exit_code == 1 and "header_timeout must be a positive" in " ".join(result.output.split())
