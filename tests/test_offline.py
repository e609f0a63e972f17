"""Offline, nothing that needs the Hugging Face hub hangs or hides that it does: it fails at once, on one
line naming what it needed from where and the option that avoids it. No test here touches the network:
the connection the reachability check opens is replaced, and the hub library's download with it."""

import pickle
import threading
import time

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from PIL import Image
from typer.testing import CliRunner

import mambavl
from mambavl.checkpoints import files
from mambavl.checkpoints.files import CheckpointError, HubUnavailable, hub_files, hub_unreachable
from mambavl.cli import app

# Every test here runs under conftest's `no_network` (autouse; named here so that it is plain): a name
# lookup or a connection beyond loopback fails the test at once. The hub and the image URLs below are
# replaced by local fakes; `test_no_test_here_can_reach_the_network` checks that the guard holds here.
pytestmark = pytest.mark.usefixtures("no_network")

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def test_no_test_here_can_reach_the_network(network_closed):
    """Every test here exercises code that would reach the hub: conftest's guard keeps them all on this
    machine, and this checks that it holds here."""
    network_closed()


class Connections:
    """Stands in for `socket.create_connection`: records where it was asked to connect, and answers as
    told: refused (an OSError), accepted, or never (a stalled lookup, until the test ends)."""

    def __init__(self, answer: str = "refused"):
        self.answer, self.asked, self.release = answer, [], threading.Event()

    def __call__(self, address, timeout=None):
        self.asked.append(address)
        if self.answer == "stalled":
            self.release.wait(30)
        if self.answer == "accepted":
            return _Socket()
        raise OSError(101, "Network is unreachable")


class _Socket:
    def close(self) -> None:
        pass


class Hub:
    """Stands in for `huggingface_hub.hf_hub_download`: an empty cache, and downloads that only a test
    that asks for them gets (else the test fails: nothing may download)."""

    def __init__(self, tmp_path, downloads: str | None = None):
        self.tmp_path, self.downloads, self.fetched = tmp_path, downloads, []

    def __call__(self, repo_id, filename, local_files_only=False, **options):
        if local_files_only:
            raise LocalEntryNotFoundError(f"{repo_id}/{filename} is not cached")
        if self.downloads is None:
            pytest.fail(f"a download of {repo_id}/{filename} was attempted")
        if self.downloads == "fail":
            raise OSError("401 Client Error\nUnauthorized for url ...\nmore detail")
        self.fetched.append((repo_id, filename))
        path = self.tmp_path / "downloaded" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        return str(path)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path, HF_HUB_OFFLINE=1, no proxy, and no network: the
    reachability check's connections and the hub library's downloads are both replaced."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    connections = Connections()
    monkeypatch.setattr(files.socket, "create_connection", connections)
    fake = Hub(tmp_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    yield connections, fake
    connections.release.set()


def one_line(text: str) -> str:
    text = text.strip()
    assert "\n" not in text, text
    return text


def write_data(tmp_path):
    """One usable sample with its image."""
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    path = tmp_path / "data.json"
    path.write_text(
        '[{"id": "ok", "image": "a.png", "conversations": '
        '[{"from": "human", "value": "<image>\\nWhat?"}, {"from": "gpt", "value": "A cat."}]}]'
    )
    return path


# ---- mambavl data check ------------------------------------------------------------------------------------
def test_data_check_offline_with_the_default_model_fails_at_once_naming_model(hub, tmp_path):
    connections, _ = hub
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["data", "check", "--annotations", str(write_data(tmp_path))])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 2, result.output  # a set-up problem, not bad data (that is 1)
    assert elapsed < 3, f"took {elapsed:.1f} s"
    line = one_line(result.output)
    assert line.startswith("error: --model cobra+3b needs the tokenizer (tokenizer.json)"), line
    assert "https://huggingface.co/xiuyul/mamba-2.8b-zephyr" in line and "HF_HUB_OFFLINE=1" in line
    assert "Pass --model DIR, a local model directory" in line
    assert connections.asked == []  # offline means offline: not even a connection is tried


def test_data_check_with_the_hub_unreachable_fails_fast_naming_model(hub, tmp_path, monkeypatch):
    connections, _ = hub
    monkeypatch.delenv("HF_HUB_OFFLINE")
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["data", "check", "--annotations", str(write_data(tmp_path))])
    assert result.exit_code == 2, result.output
    assert time.perf_counter() - start < 5
    line = one_line(result.output)
    assert (
        "the hub (huggingface.co:443) cannot be reached (OSError: [Errno 101] Network is unreachable)" in line
    )
    assert "--model DIR" in line and "HF_HUB_OFFLINE" not in line
    assert connections.asked == [("huggingface.co", 443)]  # one quick look, not the library's retries


def test_data_check_offline_with_a_local_model_directory_needs_no_hub(hub, tmp_path):
    connections, _ = hub
    model = mambavl.create("tiny-cobra").save_pretrained(tmp_path / "model")
    args = ["data", "check", "--annotations", str(write_data(tmp_path)), "--model", str(model)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "1 usable samples, 0 with problems" in result.output and connections.asked == []


# ---- mambavl.load and the other hub users --------------------------------------------------------------
def test_loading_a_preset_offline_is_one_line_naming_the_hub_id(hub):
    connections, _ = hub
    with pytest.raises(CheckpointError) as caught:
        mambavl.load("cobra+3b")
    line = one_line(str(caught.value))
    assert line.startswith("cobra+3b's released weights (cobra+3b/config.json, "), line
    assert "https://huggingface.co/han1997/cobra" in line and "HF_HUB_OFFLINE=1 forbids downloading" in line
    assert "Pass a local model directory instead" in line
    assert connections.asked == []


def test_loading_a_preset_with_the_hub_unreachable_fails_fast(hub, monkeypatch):
    connections, _ = hub
    monkeypatch.delenv("HF_HUB_OFFLINE")
    start = time.perf_counter()
    with pytest.raises(HubUnavailable) as caught:
        mambavl.load("cobra+3b")
    assert time.perf_counter() - start < 5
    line = one_line(str(caught.value))
    assert "han1997/cobra" in line and "cannot be reached" in line and "HF_HUB_OFFLINE" not in line
    assert "Pass a local model directory instead" in line
    assert len(connections.asked) == 1  # two files are missing; one look tells about both


def test_a_hub_model_id_offline_names_the_repo(hub, monkeypatch):
    from mambavl.checkpoints import resolve_model_dir

    def snapshot_download(repo_id, local_files_only=False, **options):
        if not local_files_only:
            pytest.fail(f"a download of {repo_id} was attempted")
        raise LocalEntryNotFoundError(f"{repo_id} is not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(HubUnavailable, match=r"state-spaces/mamba-130m: not in the local Hugging Face cache"):
        resolve_model_dir("state-spaces/mamba-130m")


def test_hub_unavailable_survives_pickling(hub):
    """Raised in a data loader worker, it reaches the main process whole."""
    error = HubUnavailable("the tokenizer (tokenizer.json)", "org/name", "HF_HUB_OFFLINE=1 forbids it")
    again = pickle.loads(pickle.dumps(error.instead("Pass --model DIR.", needed_by="--model x")))
    assert str(again).startswith("--model x needs the tokenizer") and str(again).endswith("Pass --model DIR.")


# ---- the reachability check -----------------------------------------------------------------------------
def test_a_stalled_lookup_is_given_up_after_the_timeout(hub, monkeypatch):
    connections, _ = hub
    monkeypatch.delenv("HF_HUB_OFFLINE")
    connections.answer = "stalled"
    start = time.perf_counter()
    why = hub_unreachable(timeout_s=0.2)
    assert time.perf_counter() - start < 2
    assert why == "the hub (huggingface.co:443) did not answer within 0.2 s (no network?)"


def test_the_check_goes_to_the_proxy_the_environment_names(hub, monkeypatch):
    connections, _ = hub
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert "the proxy (proxy.internal:3128) cannot be reached" in hub_unreachable()
    assert connections.asked == [("proxy.internal", 3128)]


def test_a_reachable_hub_downloads_only_what_is_not_cached(hub, tmp_path, monkeypatch):
    connections, fake = hub
    monkeypatch.delenv("HF_HUB_OFFLINE")
    connections.answer = "accepted"
    fake.downloads = "ok"
    paths = hub_files("org/name", ["config.json", "weights.bin"])
    assert [p.name for p in paths] == ["config.json", "weights.bin"] and all(p.is_file() for p in paths)
    assert fake.fetched == [("org/name", "config.json"), ("org/name", "weights.bin")]


def test_a_failed_download_is_one_line_naming_the_file(hub, monkeypatch):
    connections, fake = hub
    monkeypatch.delenv("HF_HUB_OFFLINE")
    connections.answer, fake.downloads = "accepted", "fail"
    with pytest.raises(CheckpointError) as caught:
        hub_files("org/name", ["config.json"])
    line = one_line(str(caught.value))
    assert line.startswith("org/name: downloading config.json from https://huggingface.co/org/name failed")
    assert "(OSError: 401 Client Error)" in line


def test_training_a_preset_offline_fails_before_building_it(hub, tmp_path):
    """The tokenizer is fetched first: offline, cobra+3b's 3.5B weights are never allocated."""
    data, run = str(write_data(tmp_path)), str(tmp_path / "r")
    args = ["train", "--model", "cobra+3b", "--data", data, "--run-dir", run]
    start = time.perf_counter()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert time.perf_counter() - start < 3
    line = one_line(result.output)
    assert line.startswith("error: --model cobra+3b needs the tokenizer (tokenizer.json)")
    assert "--model DIR" in line
    assert not (tmp_path / "r").exists()


def test_this_files_tests_cannot_reach_past_the_machine():
    """The guard every test here runs under: a lookup or a connection beyond loopback fails at once."""
    import socket

    with pytest.raises(AssertionError, match="never use the network"):
        socket.getaddrinfo("huggingface.co", 443)
    with pytest.raises(AssertionError, match="never use the network"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)
    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname(), timeout=1):
        pass  # loopback stays open for the tests' own servers
