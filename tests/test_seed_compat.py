"""Scripts written for Cobra and ML-Mamba run once their import says mambavl: their READMEs' snippets,
verbatim but for the import, the hub id (a local run directory in the seed's own layout) and the image URL
(a local file); `load`'s keywords, the registry functions, the VLM attributes they read; tiny presets by
name (`load`, `mambavl convert`). Nothing here reaches the network."""

import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import requests
import torch
from PIL import Image
from typer.testing import CliRunner

import mambavl
from mambavl.checkpoints import CheckpointError
from mambavl.cli import app
from mambavl.presets import PRESETS, RELEASES
from serving import printable_tiny_cobra
from test_vlm_checkpoints import write_cobra, write_mlmamba

# Every test here runs under conftest's `no_network` (autouse; named here so that it is plain): a name
# lookup or a connection beyond loopback fails the test at once. The hub and the image URLs below are
# replaced by local fakes; `test_no_test_here_can_reach_the_network` checks that the guard holds here.
pytestmark = pytest.mark.usefixtures("no_network")

# Cobra's README, "Usage" (github.com/h-zhao1997/cobra)
COBRA_README = """
import requests
import torch

from PIL import Image
from pathlib import Path

from cobra import load

hf_token = Path(".hf_token").read_text().strip()
device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

# Load a pretrained VLM (either local path, or ID to auto-download from the HF Hub)
model_id = "cobra+3b"
vlm = load(model_id, hf_token=hf_token)
vlm.to(device, dtype=torch.bfloat16)

# Download an image and specify a prompt
image_url = "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png"
image = Image.open(requests.get(image_url, stream=True).raw).convert("RGB")
user_prompt = "What is going on in this image?"

# Build prompt
prompt_builder = vlm.get_prompt_builder()
prompt_builder.add_turn(role="human", message=user_prompt)
prompt_text = prompt_builder.get_prompt()

# Generate!
generated_text = vlm.generate(
    image,
    prompt_text,
    cg=True,
    do_sample=True,
    temperature=0.4,
    max_new_tokens=512,
    min_length=1,
)
"""

# ML-Mamba's README, "Usage" (github.com/WenjunHuang94/ML-Mamba)
MLMAMBA_README = r"""
import requests
import torch

from PIL import Image
from pathlib import Path

from mlmamba import load

hf_token = Path(".hf_token").read_text().strip()
device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
# In case your GPU does not support bf16
dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

# Load a pretrained VLM (either local path, or ID to auto-download from the HF Hub)
model_id = "mlmamba+3b"
vlm = load(model_id, hf_token=hf_token)

vlm.to(device, dtype=dtype)
image = Image.open("pic/test0.png").convert("RGB")
user_prompt = "Provide a detailed description of this image"

# Build prompt
prompt_builder = vlm.get_prompt_builder()
prompt_builder.add_turn(role="human", message=user_prompt)
prompt_text = prompt_builder.get_prompt()

# Generate!
generated_text = vlm.generate(
    image,
    prompt_text,
    use_cache=True,
    do_sample=True,
    temperature=1.0,
    max_new_tokens=512,
)

print(f'user_prompt : {user_prompt} \ngenerated_text : {generated_text}')
"""

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))


def test_no_test_here_can_reach_the_network(network_closed):
    """Every test here exercises code that would reach the hub: conftest's guard keeps them all on this
    machine, and this checks that it holds here."""
    network_closed()


def ported(snippet: str, **changes: tuple[str, str]) -> str:
    """The snippet with each (old, new) change made exactly once (a changed README fails here, loudly)."""
    for old, new in changes.values():
        assert snippet.count(old) == 1, f"the snippet no longer says {old!r}"
        snippet = snippet.replace(old, new)
    return snippet


@pytest.fixture
def offline():
    """The hub is off (conftest), and conftest's guard fails any connection beyond this machine."""
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.fixture
def user_dir(tmp_path, monkeypatch, offline):
    """The working directory of a user who followed the READMEs: a `.hf_token` file beside the script;
    `requests.get` reads file:// URLs (the image URL points at a local file)."""
    monkeypatch.chdir(tmp_path)
    Path(".hf_token").write_text("hf_not_a_real_token\n")

    def get(url, stream=False, **kwargs):
        assert url.startswith("file://"), url
        return SimpleNamespace(raw=io.BytesIO(Path(url.removeprefix("file://")).read_bytes()))

    monkeypatch.setattr(requests, "get", get)
    return tmp_path


def answers_in_a_few_tokens(vlm):
    """`vlm` with its end-of-text logit raised to about the top logit of a typical step, so that answers
    end within a few tokens: the READMEs' max_new_tokens=512 then costs seconds, not minutes, on a CPU in
    bf16 / fp16. The EOS row of the (tied) output embedding is set along the mean final hidden state."""
    seen = []
    hook = vlm.lm.lm_head.register_forward_hook(lambda m, i, o: seen.append((i[0][:, -1], o[:, -1])))
    pb = vlm.get_prompt_builder()
    pb.add_turn("human", "Hello?")
    vlm.generate(IMAGE, pb.get_prompt(), max_new_tokens=16)
    hook.remove()
    hidden = torch.cat([h for h, _ in seen]).mean(0)
    top = torch.cat([logits for _, logits in seen]).max(-1).values.median()
    with torch.no_grad():
        vlm.lm.lm_head.weight[vlm.tokenizer.eos_token_id] = top * hidden / hidden.norm() ** 2
    return vlm


def generate_as_the_snippet_does(directory, like: mambavl.VLM, user_prompt, image, **params) -> str:
    """What our own API answers for the snippet's steps, on the snippet's model's device and dtype."""
    vlm = mambavl.load(directory).to(like.device, dtype=like.dtype)
    pb = vlm.get_prompt_builder()
    pb.add_turn("human", user_prompt)
    return vlm.generate(image, pb.get_prompt(), **params)


def test_cobra_readme_runs_after_changing_the_import(user_dir):
    run = write_cobra(answers_in_a_few_tokens(printable_tiny_cobra()), user_dir / "runs" / "tiny-cobra")
    IMAGE.save(user_dir / "beignets.png")
    code = ported(
        COBRA_README,
        import_=("from cobra import load", "from mambavl import load"),
        model=('model_id = "cobra+3b"', f"model_id = {str(run)!r}"),
        url=(
            "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png",
            f"file://{user_dir / 'beignets.png'}",
        ),
    )
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, "cobra_readme.py", "exec"), scope)

    assert scope["vlm"].dtype == torch.bfloat16
    torch.manual_seed(0)
    want = generate_as_the_snippet_does(
        run, scope["vlm"], "What is going on in this image?", IMAGE.convert("RGB"),
        do_sample=True, temperature=0.4, max_new_tokens=512, min_length=1,
    )  # fmt: skip
    assert scope["generated_text"] == want and want.strip()


def test_mlmamba_readme_runs_after_changing_the_import(user_dir, capsys):
    run = write_mlmamba(answers_in_a_few_tokens(mambavl.create("tiny-mlmamba")), user_dir / "runs" / "ml")
    (user_dir / "pic").mkdir()
    IMAGE.save(user_dir / "pic" / "test0.png")  # the README's own relative path
    code = ported(
        MLMAMBA_README,
        import_=("from mlmamba import load", "from mambavl import load"),
        model=('model_id = "mlmamba+3b"', f"model_id = {str(run)!r}"),
    )
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, "mlmamba_readme.py", "exec"), scope)

    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert scope["vlm"].dtype == dtype
    torch.manual_seed(0)
    want = generate_as_the_snippet_does(
        run, scope["vlm"], "Provide a detailed description of this image", IMAGE.convert("RGB"),
        do_sample=True, temperature=1.0, max_new_tokens=512,
    )  # fmt: skip
    assert scope["generated_text"] == want and want.strip()
    assert f"generated_text : {want}" in capsys.readouterr().out


# ---- load --------------------------------------------------------------------------------------------------
def fake_hub(monkeypatch, root: Path, cached: bool) -> list:
    """`hf_hub_download` over a local folder of repo files; its calls, with their keywords, in a list."""
    calls = []

    def download(repo_id, filename, local_files_only=False, **options):
        calls.append(dict(repo_id=repo_id, filename=filename, local_files_only=local_files_only, **options))
        if local_files_only and not cached:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
        return str(root / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    # the hub answers (here HF_HUB_OFFLINE is set, which would refuse any download before it is tried)
    monkeypatch.setattr("mambavl.checkpoints.files.hub_unreachable", lambda *args: None)
    return calls


@pytest.mark.parametrize("cached", [True, False])
def test_a_released_preset_comes_from_the_cache_or_the_hub_with_the_token(
    tmp_path, monkeypatch, offline, cached
):
    # the hub repo han1997/cobra holds cobra+3b/{config.json, checkpoints/latest-checkpoint.pt}
    want = printable_tiny_cobra()
    write_cobra(want, tmp_path / "hub" / "cobra+3b")
    calls = fake_hub(monkeypatch, tmp_path / "hub", cached)

    vlm = mambavl.load("Cobra-DINOSigLIP 3B", hf_token="hf_abc", cache_dir=tmp_path / "cache")

    files = ["cobra+3b/config.json", "cobra+3b/checkpoints/latest-checkpoint.pt"]
    tries = [[True], [True, False]][not cached]  # the cache first; a download only when it is not there
    assert [(c["filename"], c["local_files_only"]) for c in calls] == [(f, t) for f in files for t in tries]
    assert all(c["repo_id"] == "han1997/cobra" for c in calls)
    assert all(c["token"] == "hf_abc" and c["cache_dir"] == tmp_path / "cache" for c in calls)
    assert vlm.config.hub_id == "han1997/cobra"
    for key, value in want.state_dict().items():
        torch.testing.assert_close(vlm.state_dict()[key], value, atol=0, rtol=0, msg=key)


def test_load_without_a_token_passes_none_of_the_hub_keywords(tmp_path, monkeypatch, offline):
    write_cobra(printable_tiny_cobra(), tmp_path / "hub" / "cobra+3b")
    calls = fake_hub(monkeypatch, tmp_path / "hub", cached=True)
    mambavl.load("cobra+3b")
    assert calls and all(set(c) == {"repo_id", "filename", "local_files_only"} for c in calls)


@pytest.mark.parametrize("preset", ["tiny-cobra", "tiny-mlmamba"])
def test_load_builds_a_tiny_preset_with_random_weights_and_says_so(preset, offline):
    torch.manual_seed(0)
    want = mambavl.create(preset)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=rf"{preset} is a tiny preset and has no released weights"):
        vlm = mambavl.load(preset, dtype=torch.bfloat16)
    assert vlm.config == PRESETS[preset]
    assert vlm.dtype == torch.bfloat16 and not vlm.training
    for key, value in want.state_dict().items():
        torch.testing.assert_close(vlm.state_dict()[key], value.to(torch.bfloat16), atol=0, rtol=0, msg=key)


def test_load_for_training_returns_a_model_in_training_mode(tmp_path, offline):
    run = write_cobra(printable_tiny_cobra(), tmp_path / "run")
    assert not mambavl.load(run).training
    trainable = mambavl.load(run, hf_token="unused for a local directory", load_for_training=True)
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize("name", ["viper-mamba-7b", "no/such/dir", "cobra"])
def test_load_refuses_what_it_cannot_build(name, offline):
    with pytest.raises(CheckpointError) as raised:
        mambavl.load(name)
    message = str(raised.value)
    assert message.startswith(f"{name}: neither a model directory nor a preset that load can build")
    assert "cobra+3b, mlmamba+3b" in message and "tiny-cobra, tiny-mlmamba" in message
    assert "mambavl.create(name)" in message


# ---- the registry functions --------------------------------------------------------------------------------
def test_available_models_and_their_names():
    assert mambavl.available_models() == ["cobra+3b", "mlmamba+3b"]
    assert sorted(RELEASES) == mambavl.available_models()  # every released preset has its registry row
    assert mambavl.available_model_names() == [
        "cobra+3b",
        "Cobra-DINOSigLIP 3B",
        "mlmamba+3b",
        "MLMamba-DINOSigLIP 3B",
    ]


def test_get_model_description_prints_and_returns_it(capsys):
    described = mambavl.get_model_description("cobra+3b")
    assert json.loads(capsys.readouterr().out) == described
    assert described["name"] == "Cobra 3B"
    assert described["language_model"] == "Mamba 2.8B Zephyr"
    assert described["datasets"] == ["LLaVa v1.5 Instruct", "LVIS-Instruct-4V", "LRV-Instruct"]
    assert described["llm_backbone_id"] == "mamba-2.8b-zephyr"
    assert described["released_weights"] == "han1997/cobra"
    assert mambavl.get_model_description("Cobra-DINOSigLIP 3B") == described

    ml = mambavl.get_model_description("mlmamba+3b")
    assert ml["projector"] == "msc" and ml["llm_backbone_id"] == "mamba2-2.7b"
    tiny = mambavl.get_model_description("tiny-cobra")
    assert tiny["name"] == "tiny-cobra" and tiny["released_weights"] is None


def test_get_model_description_names_the_choices():
    with pytest.raises(ValueError, match=r"'cobra\+7b' is not a model name: use a preset \(cobra\+3b, "):
        mambavl.get_model_description("cobra+7b")


# ---- the VLM's attributes ----------------------------------------------------------------------------------
def test_the_attributes_the_seeds_scripts_read(tmp_path):
    vlm = mambavl.load(write_cobra(printable_tiny_cobra(), tmp_path / "run"))
    assert vlm.model_id == "tiny-cobra"
    assert vlm.arch_specifier == "fused-gelu-mlp"  # no released run config: the projector
    assert vlm.half_precision_dtype == torch.bfloat16

    vision, llm = vlm.vision_backbone, vlm.llm_backbone
    assert (vision.identifier, llm.identifier) == ("tiny-dinosiglip", "tiny-mamba")
    assert vision.half_precision_dtype == llm.half_precision_dtype == torch.bfloat16
    assert vision.image_transform is vision.get_image_transform() is vlm.image_transform
    assert vision.image_resize_strategy == "resize-naive"
    size = vlm.vision.image_size
    assert vision.default_image_resolution == (3, size, size)
    assert (vision.embed_dim, vision.num_patches) == (vlm.vision.embed_dim, vlm.vision.num_patches)
    pixels = vlm.pixel_values([IMAGE])
    torch.testing.assert_close(vision(pixels), vlm.vision(pixels))

    assert llm.llm is vlm.lm and llm.tokenizer is llm.get_tokenizer() is vlm.tokenizer
    assert llm.embed_dim == vlm.config.lm.d_model
    ids = torch.tensor([vlm.tokenizer.encode("hi")])
    torch.testing.assert_close(llm.embed_input_ids(ids), vlm.lm.embed(ids))

    # what the seeds' scripts do with them: each backbone in its half-precision dtype
    vlm.vision_backbone.to(dtype=vlm.vision_backbone.half_precision_dtype)
    assert next(vlm.vision.parameters()).dtype == torch.bfloat16 and vlm.lm.dtype == torch.float32
    vlm.llm_backbone.to(dtype=vlm.llm_backbone.half_precision_dtype)
    assert vlm.lm.dtype == torch.bfloat16
    assert sum(p.numel() for p in llm.parameters()) == vlm.lm.num_parameters()


@pytest.mark.parametrize(
    ("preset", "arch", "vision", "llm"),
    [
        ("cobra+3b", "no-align+fused-gelu-mlp", "dinosiglip-vit-so-384px", "mamba-2.8b-zephyr"),
        ("mlmamba+3b", "no-align+fused-gelu-mlp", "dinosiglip-vit-so-384px", "mamba2-2.7b"),
        ("viper-mamba-7b", "linear", "clip-vit-l-336px", "tiiuae/falcon-mamba-7b-instruct"),
    ],
)
def test_released_models_answer_as_their_run_configs_say(preset, arch, vision, llm):
    vlm = mambavl.create(preset, device="meta")
    assert (vlm.model_id, vlm.arch_specifier) == (preset, arch)
    assert (vlm.vision_backbone.identifier, vlm.llm_backbone.identifier) == (vision, llm)


# ---- tiny presets by name ----------------------------------------------------------------------------------
def test_convert_command_writes_a_tiny_preset(tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)  # no directory called tiny-cobra here: the name is the preset's
    torch.manual_seed(0)
    result = CliRunner().invoke(app, ["convert", "tiny-cobra", "ours"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "note: tiny-cobra is a tiny preset and has no released weights" in output
    assert "wrote ours" in output

    torch.manual_seed(0)
    want = mambavl.create("tiny-cobra")
    converted = mambavl.load(tmp_path / "ours")
    assert converted.config.name == "tiny-cobra"
    for key, value in want.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, atol=0, rtol=0, msg=key)
    prompt = "In: hi\nOut: "
    assert converted.generate(None, prompt, max_new_tokens=6) == want.generate(None, prompt, max_new_tokens=6)


def test_convert_in_python_takes_a_tiny_preset_too(tmp_path, offline):
    with pytest.warns(UserWarning, match="no released weights"):
        out = mambavl.convert("tiny-viper-mamba", tmp_path / "ours")
    assert mambavl.load(out).config.name == "tiny-viper-mamba"


def test_convert_command_explains_an_unknown_source(tmp_path, offline):
    result = CliRunner().invoke(app, ["convert", "viper-mamba-7b", str(tmp_path / "ours")])
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert "error: viper-mamba-7b: neither a model directory nor a preset that load can build" in output
    assert not (tmp_path / "ours").exists()


def test_chat_still_wants_random_weights_asked_for_by_name(offline):
    # the command line builds random weights only with --random-weights; `load` is the Python API's
    result = CliRunner().invoke(app, ["chat", "--model", "tiny-cobra"], input="")
    assert result.exit_code == 1
    assert "neither a model directory nor a preset with released weights" in " ".join(result.output.split())
