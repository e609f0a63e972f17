"""Model directories written to hurt: each is a tiny real model, saved by the project's own code (or as the
seeds save theirs), then broken one way. Every one must be refused with a CheckpointError that names the
problem: never a raw KeyError / TypeError / AttributeError, never a silent load. Paths taken from files
(shard index entries, symlinks) must stay inside their model directory; code in a pickle never runs."""

import hashlib
import json
import os
import re
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file, save_file

import refmodels
from mambavl.checkpoints import CheckpointError
from mambavl.checkpoints.files import PathError, confined
from mambavl.checkpoints.vlm import load, save_pretrained
from mambavl.lm import load_lm
from mambavl.vision.images import ImageError, load_image
from mambavl.vlm.tokenizer import numbered_tokenizer
from test_viper import write_llava
from test_vlm_checkpoints import perturbed, write_cobra

DELETE = object()


# ---- the bases: one tiny model per layout, saved once ----------------------------------------------------
@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    vlm = perturbed("tiny-cobra")
    return {
        "ours": save_pretrained(vlm, root / "ours"),
        "cobra": write_cobra(vlm, root / "cobra"),
        "llava": write_llava(root, "llava_falcon_mamba")[0],
    }


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return Path(
        refmodels.save(refmodels.make("mamba-untied-conv3-vocab101"), tmp_path_factory.mktemp("lm") / "m")
    )


def copy(base: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    shutil.copytree(base, directory, symlinks=True)
    (tmp_path / "outside").mkdir()
    return directory


# ---- ways to break a directory ----------------------------------------------------------------------------
def edit_json(path: Path, change) -> None:
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def put(obj: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        obj = obj[key]
    if value is DELETE:
        del obj[last]
    else:
        obj[last] = value


def field(dotted: str, value, file: str = "config.json"):
    """Set (or delete) one field of a JSON file of the directory; `dotted` walks nested objects."""
    return lambda d: edit_json(d / file, lambda raw: put(raw, dotted, value))


def text(name: str, body: str | bytes):
    def write(d: Path) -> None:
        (d / name).write_bytes(body if isinstance(body, bytes) else body.encode())

    return write


def symlink_out(name: str):
    """`name` replaced by a symlink to a copy of itself outside the directory: same bytes, wrong place."""

    def link(d: Path) -> None:
        target = d.parent / "outside" / Path(name).name
        shutil.move(d / name, target)
        os.symlink(target, d / name)

    return link


def our_weights(change):
    def edit(d: Path) -> None:
        sd = load_file(d / "model.safetensors")
        change(sd)
        save_file(sd, d / "model.safetensors")

    return edit


def seed_groups(change):
    def edit(d: Path) -> None:
        path = d / "checkpoints" / "latest-checkpoint.pt"
        checkpoint = torch.load(path, weights_only=True)
        change(checkpoint["model"])
        torch.save(checkpoint, path)

    return edit


def first_key_of(sd: dict, prefix: str = "") -> str:
    return next(k for k in sd if k.startswith(prefix) and sd[k].is_floating_point())


def poison(prefix: str, value: float):
    def change(sd: dict) -> None:
        sd[first_key_of(sd, prefix)].view(-1)[3] = value

    return change


def llava_sharded_out(d: Path) -> None:
    """Weights moved to a shard outside the directory, reached through the shard index."""
    shutil.move(d / "model.safetensors", d.parent / "outside" / "x.safetensors")
    keys = load_file(d.parent / "outside" / "x.safetensors")
    index = {"weight_map": dict.fromkeys(keys, "../outside/x.safetensors")}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def planted_pickle(marker: Path):
    """A checkpoint whose unpickling would run code: it creates `marker`."""

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    def plant(d: Path) -> None:
        torch.save({"model": {"projector": Payload()}}, d / "checkpoints" / "latest-checkpoint.pt")

    return plant


@dataclass(frozen=True)
class Case:
    name: str
    base: str  # "ours", "cobra" or "llava"
    breaks: object  # directory -> None
    says: str  # a regex the error message must match


def cfg(dotted: str, value):
    return field(f"config.{dotted}", value)


CASES = [
    # mambavl's own layout: config.json's fields
    Case(
        "lm-size-as-string", "ours", cfg("lm.d_model", "64"), r"config\.lm\.d_model: expected int, got '64'"
    ),
    Case("lm-layers-missing", "ours", cfg("lm.n_layer", DELETE), r"config\.lm\.n_layer: missing"),
    Case("lm-vocab-as-bool", "ours", cfg("lm.vocab_size", True), r"config\.lm\.vocab_size: expected int"),
    Case(
        "lm-negative-state",
        "ours",
        cfg("lm.d_state", -1),
        r"config\.lm: .*d_state must be in \[1, 16777216\], got -1",
    ),
    Case("lm-billion-layers", "ours", cfg("lm.n_layer", 10**9), r"n_layer must be in \[1, 4096\]"),
    Case("lm-nan-epsilon", "ours", cfg("lm.norm_eps", float("nan")), r"norm_eps must be finite and > 0"),
    Case("lm-unknown-mixer", "ours", cfg("lm.mixers", ["mamba1", "rwkv"]), r"unknown mixer\(s\) \['rwkv'\]"),
    Case("lm-inverted-dt-limit", "ours", cfg("lm.dt_limit", [1.0, 0.5]), r"dt_limit must be \(low, high\)"),
    Case("lm-not-an-object", "ours", cfg("lm", [64, 2]), r"config\.lm: expected an object"),
    Case("unknown-field", "ours", cfg("colour", "red"), r"config\.colour: not a field mambavl knows"),
    Case("unknown-tower", "ours", cfg("tower", "resnet-50"), r"config\.tower: 'resnet-50' is not one of"),
    Case(
        "unknown-projector",
        "ours",
        cfg("projector", "qformer"),
        r"config\.projector: 'qformer' is not one of",
    ),
    Case("unknown-prompt-format", "ours", cfg("prompt_format", "vicuna"), r"config\.prompt_format: 'vicuna'"),
    Case("unknown-resize", "ours", cfg("resize", "stretch"), r"config\.resize: 'stretch' is not one of"),
    Case("unknown-placement", "ours", cfg("image_placement", "middle"), r"config\.image_placement"),
    Case("unknown-hub-layout", "ours", cfg("hub_layout", "zip"), r"config\.hub_layout: 'zip'"),
    Case("negative-max-length", "ours", cfg("max_length", -5), r"config\.max_length: must be ≥ 1, got -5"),
    Case("zero-max-pixels", "ours", cfg("max_pixels", 0), r"config\.max_pixels: must be ≥ 1, got 0"),
    Case("max-length-as-float", "ours", cfg("max_length", 2048.5), r"config\.max_length: expected int"),
    Case("empty-anyres-pinpoint", "ours", cfg("anyres", [[0, 56]]), r"config\.anyres: expected \[\[width"),
    Case(
        "feature-layer-past-tower",
        "ours",
        cfg("feature_layer", 7),
        r"feature_layer=7 is not a block of the 3-block",
    ),
    Case("feature-layer-before-tower", "ours", cfg("feature_layer", -4), r"feature_layer=-4 is not a block"),
    Case(
        "projector-option-unknown",
        "ours",
        cfg("projector_options", {"depth": 9}),
        r"projector_options\.depth",
    ),
    Case(
        "tokenizer-elsewhere", "ours", cfg("tokenizer", "../x/tokenizer.json"), r"config\.tokenizer: '\.\./x"
    ),
    Case(
        "chat-template-missing", "ours", cfg("prompt_format", "chat-template"), r"config\.chat_template: the"
    ),
    Case(
        "eos-not-in-tokenizer",
        "ours",
        cfg("eos_token", "<|nope|>"),
        r"tokenizer\.json: has no '<\|nope\|>' token",
    ),
    Case("empty-eos", "ours", cfg("eos_token", ""), r"config\.eos_token: must not be empty"),
    Case("config-section-missing", "ours", field("config", DELETE), r"'config' must be an object, got None"),
    Case("future-version", "ours", field("version", 2), r"version 2; this mambavl reads version 1"),
    Case("config-not-json", "ours", text("config.json", "{format: mambavl"), r"config\.json: not valid JSON"),
    Case(
        "config-a-list", "ours", text("config.json", "[1, 2]"), r"expected a JSON object \{\.\.\.\}, got list"
    ),
    Case(
        "config-nested-deep", "ours", text("config.json", "[" * 100_000), r"not valid JSON \(RecursionError"
    ),
    Case(
        "config-bad-utf8",
        "ours",
        text("config.json", b'{"format": "\xff"}'),
        r"not valid JSON \(UnicodeDecode",
    ),
    Case("tokenizer-missing", "ours", lambda d: (d / "tokenizer.json").unlink(), r"no such tokenizer file"),
    Case(
        "tokenizer-garbage",
        "ours",
        text("tokenizer.json", '{"model": 3}'),
        r"not a tokenizer file `tokenizers`",
    ),
    Case(
        "tokenizer-too-big",
        "ours",
        lambda d: numbered_tokenizer(1000).tokenizer.save(str(d / "tokenizer.json")),
        r"1000 tokens, but the language model has 264 embeddings",
    ),
    Case(
        "tokenizer-symlink-out",
        "ours",
        symlink_out("tokenizer.json"),
        r"'tokenizer\.json' leads out of .* symlink",
    ),
    Case(
        "weights-symlink-out", "ours", symlink_out("model.safetensors"), r"'model\.safetensors' leads out of"
    ),
    Case("config-symlink-out", "ours", symlink_out("config.json"), r"'config\.json' leads out of"),
    Case(
        "weights-missing",
        "ours",
        lambda d: (d / "model.safetensors").unlink(),
        r"model\.safetensors: file not found",
    ),
    Case("weights-truncated", "ours", text("model.safetensors", b"\x10\x00\x00"), r"cannot read the weights"),
    Case(
        "weights-nan-projector",
        "ours",
        our_weights(poison("projector.", float("nan"))),
        r"1 tensor\(s\) hold values that are not finite:\n  - model\.safetensors:projector\.\S+: 1 of",
    ),
    Case(
        "weights-inf-lm",
        "ours",
        our_weights(poison("lm.layers.1.", float("inf"))),
        r"lm\.layers\.1\..*NaN or ±inf",
    ),
    Case(
        "weights-wrong-shape",
        "ours",
        our_weights(lambda sd: sd.update({"projector.projector.0.bias": torch.zeros(3)})),
        r"model\.safetensors:projector\.projector\.0\.bias has shape \(3,\), the config expects",
    ),
    Case(
        "weights-extra-key",
        "ours",
        our_weights(lambda sd: sd.update({"lm.layers.9.norm.weight": torch.zeros(64)})),
        r"no place for: model\.safetensors:lm\.layers\.9\.norm\.weight",
    ),
    # Cobra / prismatic run directory
    Case(
        "run-llm-id-a-number",
        "cobra",
        field("model.llm_backbone_id", 5),
        r"model\.llm_backbone_id must be a non",
    ),
    Case(
        "run-llm-id-unknown", "cobra", field("model.llm_backbone_id", "llama-7b"), r"unknown llm_backbone_id"
    ),
    Case(
        "run-tower-missing",
        "cobra",
        field("model.vision_backbone_id", DELETE),
        r"model\.vision_backbone_id is missing",
    ),
    Case(
        "run-tower-unknown",
        "cobra",
        field("model.vision_backbone_id", "vit-h"),
        r"model\.vision_backbone_id='vit-h'",
    ),
    Case(
        "run-projector-unknown",
        "cobra",
        field("model.arch_specifier", "no-align+qformer"),
        r"projector 'qformer'",
    ),
    Case(
        "run-max-length",
        "cobra",
        field("model.llm_max_length", -5),
        r"model\.llm_max_length must be an integer ≥ 1",
    ),
    Case(
        "run-resize-unknown",
        "cobra",
        field("model.image_resize_strategy", "warp"),
        r"image_resize_strategy='warp'",
    ),
    Case("run-model-a-list", "cobra", field("model", [1]), r"expected a run config with a 'model' section"),
    Case(
        "run-checkpoint-a-list",
        "cobra",
        lambda d: torch.save([1, 2], d / "checkpoints" / "latest-checkpoint.pt"),
        r"expected \{'model': \{group: state_dict\}\}",
    ),
    Case(
        "run-group-not-tensors",
        "cobra",
        seed_groups(lambda g: g.update(projector=[1])),
        r"model\['projector'\] is not",
    ),
    Case(
        "run-nan-projector",
        "cobra",
        seed_groups(lambda g: poison("", float("nan"))(g["projector"])),
        r"not finite",
    ),
    Case(
        "run-checkpoint-symlink-out",
        "cobra",
        symlink_out("checkpoints/latest-checkpoint.pt"),
        r"'checkpoints/latest-checkpoint\.pt' leads out of",
    ),
    # Viper / LLaVA directory
    Case(
        "llava-size-as-string",
        "llava",
        field("hidden_size", "64"),
        r"hidden_size must be an integer ≥ 1, got '64'",
    ),
    Case(
        "llava-pinpoints",
        "llava",
        field("image_grid_pinpoints", [[56]]),
        r"image_grid_pinpoints must be a list of",
    ),
    Case(
        "llava-projector",
        "llava",
        field("mm_projector_type", "resampler"),
        r"mm_projector_type='resampler' is not",
    ),
    Case(
        "llava-select-layer",
        "llava",
        field("mm_vision_select_layer", 10),
        r"mm_vision_select_layer=10 is not a",
    ),
    Case(
        "llava-merge-type",
        "llava",
        field("mm_patch_merge_type", 5),
        r"mm_patch_merge_type must be a non-empty",
    ),
    Case(
        "llava-max-length",
        "llava",
        field("tokenizer_model_max_length", -5),
        r"tokenizer_model_max_length must be",
    ),
    Case(
        "llava-eos",
        "llava",
        field("eos_token", {"content": 5}, "tokenizer_config.json"),
        r"tokenizer_config\.json: eos_token\.content must be a non-empty string",
    ),
    Case(
        "llava-chat-template",
        "llava",
        field("chat_template", 5, "tokenizer_config.json"),
        r"chat_template must be a Jinja template",
    ),
    Case(
        "llava-shard-outside",
        "llava",
        llava_sharded_out,
        r"index\.json: the entry '\.\./outside/x\.safetensors'",
    ),
    Case(
        "llava-model-type-a-list",
        "llava",
        field("model_type", ["llava_jamba"]),
        r"model_type must be a non-empty string, got \[.llava_jamba.\]",
    ),
]


def test_there_are_enough_cases():
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_broken_model_directory_is_refused_by_name(case, bases, tmp_path):
    directory = copy(bases[case.base], tmp_path)
    case.breaks(directory)
    with pytest.raises(CheckpointError) as e:  # a KeyError, TypeError, ... would fail the test here
        load(directory)
    assert re.search(case.says, str(e.value)), str(e.value)


def test_unbroken_bases_load(bases):
    for directory in bases.values():
        assert load(directory).num_parameters() > 0


# ---- code in pickles never runs ---------------------------------------------------------------------------
def test_planted_pickle_in_a_run_directory_never_runs(bases, tmp_path):
    directory = copy(bases["cobra"], tmp_path)
    marker = tmp_path / "code-ran"
    planted_pickle(marker)(directory)
    with pytest.raises(CheckpointError, match=r"latest-checkpoint\.pt: cannot read the checkpoint"):
        load(directory)
    assert not marker.exists()


def test_planted_pickle_beside_a_language_model_never_runs(lm_dir, tmp_path):
    directory = copy(lm_dir, tmp_path)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    (directory / "model.safetensors").unlink()
    torch.save({"embedding.weight": Payload()}, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot read the weights"):
        load_lm(directory)
    assert not marker.exists()


# ---- paths from files stay in their directory --------------------------------------------------------------
def sharded(lm_dir: Path, tmp_path: Path) -> tuple[Path, dict]:
    """The LM as two shards and an index, as transformers saves a big model."""
    directory = copy(lm_dir, tmp_path)
    sd = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    keys = sorted(sd)
    half = len(keys) // 2
    for name, part in (("model-1.safetensors", keys[:half]), ("model-2.safetensors", keys[half:])):
        save_file({k: sd[k] for k in part}, directory / name)
    index = {k: "model-1.safetensors" if i < half else "model-2.safetensors" for i, k in enumerate(keys)}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return directory, index


def test_a_sharded_model_loads(lm_dir, tmp_path):
    directory, _ = sharded(lm_dir, tmp_path)
    assert load_lm(directory).config.d_model == 32


@pytest.mark.parametrize(
    "entry,says",
    [
        (
            "../outside/model-2.safetensors",
            r"'\.\./outside/model-2\.safetensors' leads out of .* with '\.\.'",
        ),
        ("sub/../../outside/model-2.safetensors", r"leads out of .* with '\.\.'"),
        ("ABSOLUTE", r"is an absolute path"),
        ("model-2.safe\x00tensors", r"contains a NUL byte"),
        ("", r"is not a path"),
        ("LINK", r"'link\.safetensors' leads out of .* through a symlink"),
    ],
)
def test_shard_index_entries_must_stay_in_the_directory(lm_dir, tmp_path, entry, says):
    directory, index = sharded(lm_dir, tmp_path)
    outside = tmp_path / "outside" / "model-2.safetensors"
    shutil.move(directory / "model-2.safetensors", outside)  # the bytes are fine: only the place is wrong
    if entry == "ABSOLUTE":
        entry = str(outside)
    if entry == "LINK":
        os.symlink(outside, directory / "link.safetensors")
        entry = "link.safetensors"
    index = {k: entry if v == "model-2.safetensors" else v for k, v in index.items()}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: the entry") as e:
        load_lm(directory)
    assert re.search(says, str(e.value)), str(e.value)


def test_shard_index_entry_that_is_not_a_name(lm_dir, tmp_path):
    directory, index = sharded(lm_dir, tmp_path)
    index[next(iter(index))] = ["model-1.safetensors"]
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    with pytest.raises(CheckpointError, match=r"weight_map\[.*\] is not a file name"):
        load_lm(directory)


def test_language_model_weights_symlinked_out_are_refused(lm_dir, tmp_path):
    directory = copy(lm_dir, tmp_path)
    symlink_out("model.safetensors")(directory)
    with pytest.raises(CheckpointError, match=r"'model\.safetensors' leads out of .* through a symlink"):
        load_lm(directory)


def test_symlinks_inside_the_directory_are_fine(lm_dir, tmp_path):
    directory = copy(lm_dir, tmp_path)
    (directory / "weights").mkdir()
    shutil.move(directory / "model.safetensors", directory / "weights" / "model.safetensors")
    os.symlink("weights/model.safetensors", directory / "model.safetensors")
    assert load_lm(directory).config.d_model == 32


def hf_cache(src: Path, cache: Path, repo: str, revision: str = "0123abcd") -> Path:
    """`src` laid out as the Hugging Face cache keeps a download: files in `blobs/` named by hash, the
    snapshot made of relative symlinks to them; returns the snapshot directory."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    (folder / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        blob = folder / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return snapshot


def test_hugging_face_cache_snapshots_load_through_their_symlinks(lm_dir, bases, tmp_path):
    snapshot = hf_cache(lm_dir, tmp_path / "hub", "acme/tiny-mamba")
    assert (snapshot / "config.json").is_symlink()
    assert load_lm(snapshot).config.d_model == 32
    vlm_snapshot = hf_cache(bases["ours"], tmp_path / "hub", "acme/tiny-cobra")
    assert load(vlm_snapshot).config.name == "tiny-cobra"


def test_a_hub_id_resolves_to_the_cache_and_loads(lm_dir):
    from huggingface_hub import constants

    snapshot = hf_cache(lm_dir, Path(constants.HF_HUB_CACHE), "acme/cached-tiny-mamba")
    try:
        assert load_lm("acme/cached-tiny-mamba").config.d_model == 32
    finally:
        shutil.rmtree(snapshot.parent.parent)


def test_a_cache_symlink_into_another_repo_is_refused(lm_dir, tmp_path):
    snapshot = hf_cache(lm_dir, tmp_path / "hub", "acme/tiny-mamba")
    other = hf_cache(lm_dir, tmp_path / "hub", "evil/other")
    (snapshot / "model.safetensors").unlink()
    os.symlink(os.path.relpath(other / "model.safetensors", snapshot), snapshot / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"leads out of .*models--acme--tiny-mamba through a symlink"):
        load_lm(snapshot)


def test_confined_names_each_way_out(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "loop").symlink_to(root / "loop")
    assert confined(root, "a/b.png") == root / "a" / "b.png"
    assert confined(root, "a/../b.png") == root / "a/../b.png"  # stays inside: fine
    for entry, says in [
        ("../b.png", "with '..'"),
        (str(tmp_path / "b.png"), "absolute path"),
        ("a\x00b", "NUL byte"),
        ("loop", "cannot be resolved"),
        (None, "is not a path"),
    ]:
        with pytest.raises(PathError, match=re.escape(says)):
            confined(root, entry)


# ---- weights: dtypes and values ---------------------------------------------------------------------------
def test_mixed_dtypes_load_in_the_language_models_dtype(bases, tmp_path):
    """fp16 projector weights beside fp32 ones: the model loads in one dtype, the LM embedding's (fp32),
    the fp16 values exactly; asked for bf16, every weight is bf16."""
    directory = copy(bases["ours"], tmp_path)
    halves = {}

    def half_projector(sd):
        for k in [k for k in sd if k.startswith("projector.")]:
            sd[k] = halves[k] = sd[k].half()

    our_weights(half_projector)(directory)
    vlm = load(directory)
    assert {p.dtype for p in vlm.parameters()} == {torch.float32}
    for k, v in halves.items():
        torch.testing.assert_close(vlm.state_dict()[k], v.float(), rtol=0, atol=0)
    assert {p.dtype for p in load(directory, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


def test_values_beyond_the_target_dtype_are_reported(lm_dir, tmp_path):
    """An fp16 embedding sets the dtype; an fp32 tensor holding 1e6 would become inf in fp16: refused."""
    directory = copy(lm_dir, tmp_path)
    sd = load_file(directory / "model.safetensors")
    sd["backbone.embeddings.weight"] = sd["backbone.embeddings.weight"].half()
    sd["backbone.norm_f.weight"][0] = 1e6
    save_file(sd, directory / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"norm_f\.weight: 1 of 32 values beyond the range of torch\.float16"
    ):
        load_lm(directory)
    assert load_lm(directory, dtype=torch.float32).norm_f.weight[0] == 1e6


def test_nan_language_model_weights_are_named(lm_dir, tmp_path):
    directory = copy(lm_dir, tmp_path)
    sd = load_file(directory / "model.safetensors")
    sd["backbone.layers.0.mixer.A_log"][0, 0] = float("nan")
    sd["lm_head.weight"][:2] = float("-inf")
    save_file(sd, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"2 tensor\(s\) hold values that are not finite") as e:
        load_lm(directory)
    assert "model.safetensors:backbone.layers.0.mixer.A_log: 1 of 512 values NaN or ±inf" in str(e.value)
    assert "model.safetensors:lm_head.weight: 64 of 3232 values" in str(e.value)


# ---- images -----------------------------------------------------------------------------------------------
def png_with_text_bomb(before_pixels: bool) -> bytes:
    """A valid 8×8 PNG plus a zTXt chunk that inflates past PIL's MAX_TEXT_CHUNK (before or after IDAT)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    data = b"k\x00\x00" + zlib.compress(b"a" * (PngImagePlugin.MAX_TEXT_CHUNK + 1))
    chunk = struct.pack(">I", len(data)) + b"zTXt" + data + struct.pack(">I", zlib.crc32(b"zTXt" + data))
    at = png.index(b"IDAT" if before_pixels else b"IEND") - 4
    return png[:at] + chunk + png[at:]


@pytest.mark.parametrize("before_pixels", [True, False])
def test_png_text_chunk_bomb_is_an_image_error(before_pixels):
    with pytest.raises(ImageError, match="Decompressed data too large"):
        load_image(png_with_text_bomb(before_pixels))
