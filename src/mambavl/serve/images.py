"""Images of API requests: `data:` URIs always; remote http(s) URLs and local files only when the server
was started to allow them (remote hosts from an allow-list if one is given, public addresses only unless
private ones are allowed too, local files inside one directory). Every refusal is a `RequestError` with
the HTTP status and a message that says the fix. `PreparedImages` keeps images the model has prepared, by
their bytes, for the turns of a conversation that send the same image again."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
from PIL import Image
from starlette.concurrency import run_in_threadpool

from mambavl.vision.images import ImageError, load_image


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int = 10 * 2**20  # encoded image size
    max_pixels: int = 16_000_000
    allow_remote: bool = False
    remote_hosts: tuple[str, ...] = ()  # with allow_remote: only these hosts (empty: any)
    # with allow_remote: also hosts on loopback, private, link-local, multicast or reserved addresses
    # (by default a URL can never make the server reach into the network it runs in)
    allow_private_hosts: bool = False
    local_dir: Path | None = None  # local paths and file:// URLs inside this directory
    fetch_timeout: float = 10.0  # seconds for a whole remote fetch: DNS, connecting and every byte

    def __post_init__(self):
        if not self.fetch_timeout > 0:
            raise ValueError(
                f"the image fetch timeout must be a positive number of seconds, not {self.fetch_timeout}"
            )


def shown(text: str, limit: int = 200) -> str:
    """`text` as it goes into an error message: quoted, escaped and cut short."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def decode(data: bytes, policy: ImagePolicy, name: str) -> Image.Image:
    if len(data) > policy.max_bytes:
        raise RequestError(f"{name} is {len(data):,} bytes; the limit is {policy.max_bytes:,}", 413)
    try:
        return load_image(data, policy.max_pixels)
    except ImageError as e:
        raise RequestError(f"{name}: {e}") from e
    except Exception as e:  # PIL's decoders fail in many ways on crafted files; all mean a bad image
        raise RequestError(f"{name}: not a readable image ({type(e).__name__}: {e})") from e


def data_uri_bytes(url: str, policy: ImagePolicy) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise RequestError("a data URI must look like data:image/png;base64,<data>")
    mime = header[5:].split(";")[0]
    if mime and not mime.startswith("image/"):
        raise RequestError(f"the data URI holds {shown(mime)}, not an image (image/png, image/jpeg, ...)")
    if ";base64" not in header:
        raise RequestError("only base64 data URIs are accepted (data:image/...;base64,...)")
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise RequestError(f"the image is over the limit of {policy.max_bytes:,} bytes", 413)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"the data URI's payload is not valid base64 ({e})") from e
    return data


def local_bytes(url: str, policy: ImagePolicy) -> tuple[bytes, str]:
    if policy.local_dir is None:
        raise RequestError(
            "local image paths are disabled: send the image as a data URI, or start the server with "
            "--image-dir DIR to serve files from DIR",
            403,
        )
    raw = unquote(urlparse(url).path) if url.startswith("file://") else url
    if "\x00" in raw:
        raise RequestError(f"the image path {shown(raw)} holds a NUL byte; send the file's real path")
    root = policy.local_dir.resolve()
    try:
        path = (root / raw).resolve()  # an absolute `raw` replaces root; `..` and symlinks are resolved
        if not path.is_relative_to(root):
            raise RequestError(f"{raw}: outside the directory the server may read images from", 403)
        if not path.is_file():
            raise RequestError(f"{raw}: no such image file", 404)
        data = path.read_bytes()
    except OSError as e:  # a name too long, a file without read permission, ...
        raise RequestError(f"{shown(raw)}: cannot be read ({e.strerror or e})") from e
    return data, raw


def address_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What makes `ip` an address a URL may not send the server to, or None for a public one."""
    if isinstance(ip, ipaddress.IPv6Address):  # IPv4 inside IPv6 (mapped, 6to4, Teredo) counts as IPv4
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            return address_kind(embedded)
    for kind in ("loopback", "unspecified", "link_local", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-public"


async def resolve(host: str, port: int, url: str) -> list[str]:
    """The addresses `host` resolves to (each once, in the resolver's order)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise RequestError(
            f"fetching {shown(url)} failed: the host {host!r} could not be resolved ({e})"
        ) from e
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_addresses(addresses: list[str], host: str, url: str) -> None:
    """Refuses the fetch if any address `host` resolved to is not public: one private answer is enough to
    reach inside (and a second lookup could return it), so every answer must pass."""
    for address in addresses:
        kind = address_kind(ipaddress.ip_address(address.split("%")[0]))  # without an IPv6 zone
        if kind is not None:
            raise RequestError(
                f"images from {shown(url)} are refused: {host} is at {address}, a {kind} address, and "
                "the server only fetches from public addresses (start it with --allow-private-image-hosts "
                "to allow them)",
                403,
            )


def remote_url(url: str) -> httpx.URL:
    try:
        target = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as e:
        raise RequestError(f"the image URL {shown(url)} is not a valid URL ({e})") from e
    if not target.host:
        raise RequestError(f"the image URL {shown(url)} names no host")
    if target.port is not None and not 0 < target.port < 65536:
        raise RequestError(
            f"the image URL {shown(url)} is not a valid URL: port {target.port} is out of range"
        )
    return target


def pinned(target: httpx.URL, address: str) -> tuple[httpx.URL, dict, dict]:
    """The request for `target` sent to the address that was checked, not to whatever a second DNS lookup
    returns (DNS rebinding): the IP in the URL, the name in the Host header and in TLS (SNI and the
    certificate check)."""
    host = target.raw_host.decode("ascii")
    headers = {"Host": target.netloc.decode("ascii")}
    extensions = {"sni_hostname": host} if target.scheme == "https" else {}
    return target.copy_with(host=address.split("%")[0]), headers, extensions


async def download(target: httpx.URL, url: str, policy: ImagePolicy) -> bytes:
    host = target.raw_host.decode("ascii")
    addresses = await resolve(host, target.port or (443 if target.scheme == "https" else 80), url)
    if not policy.allow_private_hosts:
        check_addresses(addresses, host, url)
    failure: Exception | None = None
    # trust_env=False: no proxy from the environment, the connection goes to the checked address;
    # redirects are not followed: they could leave the allowed hosts and addresses
    async with httpx.AsyncClient(
        timeout=policy.fetch_timeout, follow_redirects=False, trust_env=False
    ) as client:
        for address in addresses:
            request_url, headers, extensions = pinned(target, address)
            try:
                return await fetch_bytes(client, request_url, headers, extensions, url, policy)
            except httpx.ConnectError as e:  # the next address of a host with several
                failure = e
            except (httpx.HTTPError, httpx.InvalidURL) as e:
                raise RequestError(f"fetching {shown(url)} failed: {type(e).__name__}: {e}") from e
    raise RequestError(f"fetching {shown(url)} failed: could not connect to {host} ({failure})")


async def fetch_bytes(client, request_url, headers, extensions, url: str, policy: ImagePolicy) -> bytes:
    data = bytearray()
    async with client.stream("GET", request_url, headers=headers, extensions=extensions) as response:
        if response.status_code != 200:
            raise RequestError(f"fetching {shown(url)} gave HTTP {response.status_code}")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > policy.max_bytes:
            raise RequestError(
                f"{shown(url)} is {int(declared):,} bytes; the limit is {policy.max_bytes:,}", 413
            )
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > policy.max_bytes:
                raise RequestError(f"{shown(url)} is over the limit of {policy.max_bytes:,} bytes", 413)
    return bytes(data)


async def remote_bytes(url: str, policy: ImagePolicy) -> bytes:
    if not policy.allow_remote:
        raise RequestError(
            "remote image URLs are disabled: send the image as a data URI, or start the server with "
            "--allow-remote-images",
            403,
        )
    target = remote_url(url)
    if policy.remote_hosts and target.host not in policy.remote_hosts:
        raise RequestError(
            f"images from {target.host!r} are not allowed (allowed: {', '.join(policy.remote_hosts)})", 403
        )
    try:  # one deadline for all of it: a server that drips a byte at a time is cut off too
        data = await asyncio.wait_for(download(target, url, policy), policy.fetch_timeout)
    except asyncio.TimeoutError as e:
        raise RequestError(
            f"fetching {shown(url)} took over {policy.fetch_timeout:g} s, the limit for a remote image: "
            "send the image as a data URI or from a faster host"
        ) from e
    return data


async def fetch_image_bytes(url: str, policy: ImagePolicy) -> tuple[bytes, str]:
    """The encoded image an `image_url` names (at most `policy.max_bytes`), and its name for errors."""
    try:
        scheme = urlparse(url).scheme.lower()
    except ValueError as e:  # e.g. an unclosed IPv6 bracket
        raise RequestError(f"the image URL {shown(url)} is not a valid URL ({e})") from e
    if scheme == "data":
        return await run_in_threadpool(data_uri_bytes, url, policy), "the data URI's image"
    if scheme in ("http", "https"):
        return await remote_bytes(url, policy), url
    if scheme in ("file", ""):
        return await run_in_threadpool(local_bytes, url, policy)
    raise RequestError(
        f"image URLs of scheme {shown(scheme)} are not accepted (data:, and http(s) or files if enabled)"
    )


class PreparedImages:
    """Images as the model's `preprocess` made them, by a digest of their encoded bytes, least recently
    used first out beyond `budget_bytes` (their tensors' size): a conversation sends its image again with
    every turn, and a later turn then skips decoding, transforming and hashing it. Only bytes that decode
    are kept; a different encoding of the same picture is another entry."""

    def __init__(self, budget_bytes: int):
        self.budget, self.held = budget_bytes, 0
        self._entries: OrderedDict[bytes, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=32).digest()

    def get(self, key: bytes):
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: bytes, prepared) -> None:
        size = sum(_nbytes(view) for view in prepared.views)
        with self._lock:
            if size > self.budget or key in self._entries:
                return
            self._entries[key] = (prepared, size)
            self.held += size
            while self.held > self.budget:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.held -= dropped

    def __len__(self) -> int:
        return len(self._entries)


def _nbytes(view) -> int:
    if isinstance(view, dict):
        return sum(_nbytes(v) for v in view.values())
    return view.numel() * view.element_size() if hasattr(view, "numel") else 0
