"""Images of API requests: `data:` URIs always; remote http(s) URLs and local files only when the server
was started to allow them (remote hosts from an allow-list if one is given, local files inside one
directory). Every refusal is a `RequestError` with the HTTP status and a message that says the fix."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

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
    local_dir: Path | None = None  # local paths and file:// URLs inside this directory
    fetch_timeout: float = 10.0


def decode(data: bytes, policy: ImagePolicy, name: str) -> Image.Image:
    if len(data) > policy.max_bytes:
        raise RequestError(f"{name} is {len(data):,} bytes; the limit is {policy.max_bytes:,}", 413)
    try:
        return load_image(data, policy.max_pixels)
    except ImageError as e:
        raise RequestError(f"{name}: {e}") from e


def from_data_uri(url: str, policy: ImagePolicy) -> Image.Image:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise RequestError("a data URI must look like data:image/png;base64,<data>")
    mime = header[5:].split(";")[0]
    if mime and not mime.startswith("image/"):
        raise RequestError(f"the data URI holds {mime!r}, not an image (image/png, image/jpeg, ...)")
    if ";base64" not in header:
        raise RequestError("only base64 data URIs are accepted (data:image/...;base64,...)")
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise RequestError(f"the image is over the limit of {policy.max_bytes:,} bytes", 413)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"the data URI's payload is not valid base64 ({e})") from e
    return decode(data, policy, "the data URI's image")


def from_local(url: str, policy: ImagePolicy) -> Image.Image:
    if policy.local_dir is None:
        raise RequestError(
            "local image paths are disabled: send the image as a data URI, or start the server with "
            "--image-dir DIR to serve files from DIR",
            403,
        )
    raw = unquote(urlparse(url).path) if url.startswith("file://") else url
    root = policy.local_dir.resolve()
    path = (root / raw).resolve()  # an absolute `raw` replaces root; `..` is resolved away
    if not path.is_relative_to(root):
        raise RequestError(f"{raw}: outside the directory the server may read images from", 403)
    if not path.is_file():
        raise RequestError(f"{raw}: no such image file", 404)
    return decode(path.read_bytes(), policy, raw)


async def from_remote(url: str, policy: ImagePolicy) -> Image.Image:
    import httpx

    if not policy.allow_remote:
        raise RequestError(
            "remote image URLs are disabled: send the image as a data URI, or start the server with "
            "--allow-remote-images",
            403,
        )
    host = urlparse(url).hostname or ""
    if policy.remote_hosts and host not in policy.remote_hosts:
        raise RequestError(
            f"images from {host!r} are not allowed (allowed: {', '.join(policy.remote_hosts)})", 403
        )
    data = bytearray()
    try:  # redirects are not followed: they could leave the allowed hosts
        async with (
            httpx.AsyncClient(timeout=policy.fetch_timeout, follow_redirects=False) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise RequestError(f"fetching {url} gave HTTP {response.status_code}")
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > policy.max_bytes:
                    raise RequestError(f"{url} is over the limit of {policy.max_bytes:,} bytes", 413)
    except httpx.HTTPError as e:
        raise RequestError(f"fetching {url} failed: {type(e).__name__}: {e}") from e
    return decode(bytes(data), policy, url)


async def fetch_image(url: str, policy: ImagePolicy) -> Image.Image:
    """The RGB image an `image_url` names."""
    from starlette.concurrency import run_in_threadpool

    scheme = urlparse(url).scheme.lower()
    if scheme == "data":
        return await run_in_threadpool(from_data_uri, url, policy)
    if scheme in ("http", "https"):
        return await from_remote(url, policy)
    if scheme in ("file", ""):
        return await run_in_threadpool(from_local, url, policy)
    raise RequestError(
        f"image URLs of scheme {scheme!r} are not accepted (data:, and http(s) or files if enabled)"
    )
