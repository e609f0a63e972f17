"""Test set-up: no network, ever (the hub is switched off before anything imports it), and seeded RNGs."""

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# An empty private cache, so that nothing a developer has downloaded can make a test pass.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="mambavl-test-hf-")
os.environ.pop("HF_HUB_CACHE", None)
# Without a GPU, Triton kernels run in its interpreter (it must be chosen before triton is imported).
if os.environ.get("CUDA_VISIBLE_DEVICES") != "" and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)

# The suite runs in two worker processes (pytest-xdist, `-n 2` in pyproject.toml): one thread of torch's
# each, so that the two do not fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection or name lookup beyond this machine fails the test at once (loopback stays open for
    the tests' own servers). It holds for every test, so that no test, and no mistake in a fake of the
    hub, can turn into a real download; the files that exercise the hub check it with `network_closed`."""
    import ipaddress
    import socket

    def host_of(address) -> str:
        return address[0] if isinstance(address, tuple) else str(address)

    def guard(original):
        def connect(sock, address, *args):
            if sock.family in (socket.AF_INET, socket.AF_INET6) and host_of(address) not in LOOPBACK:
                raise AssertionError(f"the test tried to connect to {address!r}: tests never use the network")
            return original(sock, address, *args)

        return connect

    lookup = socket.getaddrinfo

    def literal(host) -> bool:
        """An address written out ("10.1.2.3", "2130706433", "::ffff:127.0.0.1"): resolving it asks no
        name server, as the server's checks of remote image URLs do."""
        host = host.decode() if isinstance(host, bytes) else str(host)
        try:
            ipaddress.ip_address(host.strip("[]"))
            return True
        except ValueError:
            pass
        try:
            socket.inet_aton(host)
            return True
        except OSError:
            return False

    def getaddrinfo(host, *args, **kwargs):
        if host not in (*LOOPBACK, None, "") and not literal(host):
            raise AssertionError(f"the test tried to look up {host!r}: tests never use the network")
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guard(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(socket.socket.connect_ex))
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def network_closed():
    """A check that `no_network` holds where it is called: a name lookup and a connection to a public
    address both fail at once with the guard's error, while loopback stays open. Files whose tests reach
    for the hub call it, so a guard that stopped applying there fails the run instead of going quiet."""
    import socket

    def check() -> None:
        with pytest.raises(AssertionError, match="tests never use the network"):
            socket.getaddrinfo("huggingface.co", 443)
        with (
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock,
            pytest.raises(AssertionError, match="tests never use the network"),
        ):
            sock.connect(("198.51.100.7", 443))  # a documentation address: never reached either way
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            with socket.create_connection(server.getsockname(), timeout=5):
                pass

    return check


@pytest.fixture
def exact_fp32():
    """fp32 matmuls and convolutions without TF32 on GPUs (TF32 differs from the CPU reference by ~1e-3)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """The model `mambavl demo --out DIR` saves (DIR/model), from a shortened run (a few seconds): what
    the server tests serve. Its held-out images are in DIR/data."""
    from mambavl.demo import DemoConfig, run_demo

    out = tmp_path_factory.mktemp("demo") / "demo"
    run_demo(
        DemoConfig(
            out=out,
            train_scenes=40,
            heldout_scenes=26,
            align_steps=4,
            finetune_steps=12,
            batch_size=8,
            blind=False,
        )
    )
    return out / "model"
