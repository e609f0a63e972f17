"""VLM checkpoints: our own layout (config.json + model.safetensors + tokenizer.json, everything needed
offline) and the seeds' original ones, read into a `VLM`:

- Cobra / prismatic run dir: `config.json` {"model": {arch_specifier, vision_backbone_id,
  llm_backbone_id, image_resize_strategy, llm_max_length, ...}} and `checkpoints/latest-checkpoint.pt`
  = {"model": {"projector": ..., "llm_backbone": ...}}; LM keys carry `llm.` (FSDP saves);
- ML-Mamba: `latest-checkpoint.pt` (repo root, or a run dir's checkpoints/) = {"model": {"llm_backbone",
  "mlp", "bidirectional_mamba", "projector"}}; LM keys without `llm.`;
in both, the vision tower is not stored: timm's pretrained weights (or, for tiny towers, their fixed init).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch

from mambavl.checkpoints.files import CheckpointError, hub_file, read_json
from mambavl.lm.config import LMConfig
from mambavl.lm.load import assign_lm_weights, check_weights, to_our_keys
from mambavl.vlm.model import VLM, VLMConfig, build_tower
from mambavl.vlm.tokenizer import TextTokenizer

FORMAT = "mambavl-vlm"


# ---- our layout ------------------------------------------------------------------------------------------
def config_to_dict(config: VLMConfig) -> dict:
    out = dataclasses.asdict(config)
    out["lm"].pop("extra", None)
    return out


def config_from_dict(d: dict) -> VLMConfig:
    d = dict(d)
    lm = dict(d.pop("lm"))
    for key in ("mixers", "ffns", "dt_limit"):
        lm[key] = tuple(lm[key])
    return VLMConfig(lm=LMConfig(**lm), **d)


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_pretrained(vlm: VLM, directory: str | Path) -> Path:
    """Everything to run the model offline: config, all weights (vision included), the tokenizer."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = vlm.state_dict()
    if vlm.config.lm.tie_embeddings:
        sd.pop("lm.lm_head.weight")
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    config = config_to_dict(vlm.config) | {"tokenizer": "tokenizer.json"}
    _atomic_write(
        directory / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": FORMAT})
    )
    _atomic_write(directory / "tokenizer.json", lambda p: vlm.tokenizer.tokenizer.save(p))
    body = json.dumps({"format": FORMAT, "version": 1, "config": config}, indent=2)
    _atomic_write(directory / "config.json", lambda p: Path(p).write_text(body))
    return directory


def _from_ours(directory: Path, raw: dict) -> VLM:
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    config = config_from_dict(raw["config"])
    tokenizer = TextTokenizer(Tokenizer.from_file(str(directory / "tokenizer.json")), config.eos_token)
    with torch.device("meta"):
        vlm = VLM(config, tokenizer=tokenizer)
    try:
        sd = load_file(str(directory / "model.safetensors"))
    except Exception as e:
        raise CheckpointError(f"{directory / 'model.safetensors'}: cannot read the weights ({e})") from e
    tied = config.lm.tie_embeddings
    expected = {k: v.shape for k, v in vlm.state_dict().items() if not (tied and k == "lm.lm_head.weight")}
    check_weights(sd, expected, {k: f"model.safetensors:{k}" for k in sd}, f"{directory}: weights vs config")
    vlm.load_state_dict(sd, strict=False, assign=True)
    if tied:
        vlm.lm.lm_head.weight = vlm.lm.embedding.weight
    return vlm


# ---- the seeds' layouts --------------------------------------------------------------------------------
def _find_checkpoint(directory: Path) -> Path:
    for candidate in (directory / "checkpoints" / "latest-checkpoint.pt", directory / "latest-checkpoint.pt"):
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"{directory}: no checkpoints/latest-checkpoint.pt or latest-checkpoint.pt (Cobra / ML-Mamba "
        "layouts), and no config.json of mambavl's own layout"
    )


def _seed_config(directory: Path, groups: set[str], preset: VLMConfig | None) -> VLMConfig:
    """A VLMConfig from a Cobra/ML-Mamba run config (config.json["model"]), else from the preset."""
    from mambavl.presets import LLM_BACKBONES, msc_options

    projector = "msc" if "bidirectional_mamba" in groups else None
    if not (directory / "config.json").is_file():
        if preset is None:
            raise CheckpointError(f"{directory}: no config.json to say which model these weights belong to")
        return preset
    model = read_json(directory / "config.json").get("model")
    if not isinstance(model, dict) or "llm_backbone_id" not in model:
        raise CheckpointError(f"{directory / 'config.json'}: expected a run config with a 'model' section")
    llm_id = model["llm_backbone_id"]
    if llm_id not in LLM_BACKBONES:
        raise CheckpointError(
            f"{directory / 'config.json'}: unknown llm_backbone_id {llm_id!r}; known: {sorted(LLM_BACKBONES)}"
        )
    lm, tokenizer, prompt_format = LLM_BACKBONES[llm_id]
    arch = model.get("arch_specifier", "no-align+fused-gelu-mlp")
    return VLMConfig(
        name=model.get("model_id", directory.name),
        tower=model["vision_backbone_id"],
        projector=projector or arch.split("+")[-1],
        projector_options=msc_options(lm) if projector == "msc" else {},
        lm=lm,
        tokenizer=tokenizer,
        prompt_format=prompt_format,
        resize=model.get("image_resize_strategy", "resize-naive"),
        max_length=model.get("llm_max_length", 2048),
        hub_id=preset.hub_id if preset else None,
        hub_layout=preset.hub_layout if preset else None,
    )


def _from_seed(directory: Path, preset: VLMConfig | None, pretrained_tower: bool) -> VLM:
    path = _find_checkpoint(directory)
    try:
        groups = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["model"]
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from e
    config = _seed_config(directory, set(groups), preset)
    with torch.device("meta"):
        vlm = VLM(config, pretrained_tower=False)
    # the tower is not stored: timm's pretrained weights (or the fixed init of a tiny tower)
    vlm.vision = build_tower(config.tower, pretrained_tower, config.feature_layer)

    if "llm_backbone" not in groups:
        raise CheckpointError(
            f"{path}: only {sorted(groups)} saved (an align-stage checkpoint?); it holds no language model. "
            "Load the finetuned run directory instead."
        )
    # LM: strip FSDP's `llm.` prefix (Cobra), then mamba_ssm's key names -> ours
    llm = {k.removeprefix("llm."): v for k, v in groups["llm_backbone"].items()}
    labels = {k: f"{path.name}:llm_backbone.{k}" for k in llm}
    sd, source = to_our_keys(llm, "mamba_ssm", config.lm, labels, str(path))
    assign_lm_weights(vlm.lm, sd, source, f"{path}: llm_backbone")

    # projector groups: Cobra stores one ("projector"); ML-Mamba three (mlp, bidirectional_mamba, projector)
    if config.projector == "msc":
        parts = {"mlp": vlm.projector.mlp, "bidirectional_mamba": vlm.projector.bidirectional_mamba}
        parts["projector"] = vlm.projector.projector
    else:
        parts = {"projector": vlm.projector}
    for group, module in parts.items():
        if group not in groups:
            raise CheckpointError(
                f"{path}: the checkpoint has no '{group}' weights (groups: {sorted(groups)})"
            )
        sd = groups[group]
        expected = {k: v.shape for k, v in module.state_dict().items()}
        check_weights(sd, expected, {k: f"{path.name}:{group}.{k}" for k in sd}, f"{path}: {group}")
        module.load_state_dict(sd, strict=True, assign=True)
    return vlm


# ---- Viper's LLaVA-style layout --------------------------------------------------------------------------
# model_type -> (the LM's transformers model_type, the prefix its weights live under)
LLAVA_TYPES = {"llava_falcon_mamba": ("falcon_mamba", "backbone."), "llava_jamba": ("jamba", "model.")}
LLAVA_TOWERS = {"openai/clip-vit-large-patch14-336": "clip-vit-l-336px"}
LLAVA_PROJECTORS = {"linear": "linear", "mlp2x_gelu": "gelu-mlp"}
LLAVA_EOS = {"falcon_mamba": "<|im_end|>", "jamba": "<|eom|>"}


def _llava_config(directory: Path, raw: dict, preset: VLMConfig | None) -> VLMConfig:
    from mambavl.lm.layouts import lm_config_from_json
    from mambavl.vision import TOWER_SETS

    where = directory / "config.json"
    lm_type, _ = LLAVA_TYPES[raw["model_type"]]
    lm, _ = lm_config_from_json(raw | {"model_type": lm_type}, where)
    tower_id = raw.get("mm_vision_tower", "openai/clip-vit-large-patch14-336")
    tower = LLAVA_TOWERS.get(tower_id, tower_id)
    if tower not in TOWER_SETS:
        raise CheckpointError(
            f"{where}: mm_vision_tower {tower_id!r} is not a tower mambavl knows ({sorted(LLAVA_TOWERS)})"
        )
    projector = LLAVA_PROJECTORS.get(raw.get("mm_projector_type", "linear"))
    if projector is None:
        raise CheckpointError(
            f"{where}: mm_projector_type {raw['mm_projector_type']!r}; known: {sorted(LLAVA_PROJECTORS)}"
        )
    if raw.get("mm_vision_select_feature", "patch") != "patch":
        raise CheckpointError(f"{where}: only mm_vision_select_feature 'patch' (CLS dropped) is supported")
    anyres = None
    if raw.get("image_aspect_ratio") == "anyres":
        anyres = tuple(tuple(p) for p in raw["image_grid_pinpoints"])
    tokenizer_config = directory / "tokenizer_config.json"
    tok_cfg = read_json(tokenizer_config) if tokenizer_config.is_file() else {}
    eos = preset.eos_token if preset else tok_cfg.get("eos_token") or LLAVA_EOS[lm_type]
    if isinstance(eos, dict):
        eos = eos.get("content")
    has_tokenizer = (directory / "tokenizer.json").is_file()
    if not has_tokenizer and preset is None:
        raise CheckpointError(f"{directory}: no tokenizer.json beside the weights")
    return VLMConfig(
        name=raw.get("_name_or_path") or directory.name,
        tower=tower,
        projector=projector,
        lm=lm,
        tokenizer=str(directory / "tokenizer.json") if has_tokenizer else preset.tokenizer,
        prompt_format="chat-template",
        feature_layer=raw.get("mm_vision_select_layer", -2),
        image_placement="placeholder",
        anyres=anyres,
        image_newline="unpad" in raw.get("mm_patch_merge_type", "flat"),
        eos_token=eos,
        system_prompt=preset.system_prompt if preset else "You are a helpful language and vision assistant. ",
        chat_template=tok_cfg.get("chat_template") or (preset.chat_template if preset else None),
        max_length=raw.get("tokenizer_model_max_length", 32768),
    )


def _from_llava(directory: Path, raw: dict, preset: VLMConfig | None, pretrained_tower: bool) -> VLM:
    from mambavl.checkpoints.files import read_state_dict

    config = _llava_config(directory, raw, preset)
    lm_type, prefix = LLAVA_TYPES[raw["model_type"]]
    with torch.device("meta"):
        vlm = VLM(config)
    vlm.vision = build_tower(config.tower, pretrained_tower, config.feature_layer)  # reloaded, as Viper does

    tensors, origin = read_state_dict(directory)
    lm_sd, mm = {}, {}
    for key, value in tensors.items():
        rest = key.removeprefix(prefix)
        if rest.startswith(("mm_projector.", "image_newline")):
            mm[rest] = value
        elif rest.startswith(("vision_tower.", "pos_emb.")):
            continue  # the tower comes from its own weights; Viper's Jamba keeps an unused rotary table
        else:
            lm_sd[key] = value
    labels = {k: f"{origin[k].name}:{k}" for k in lm_sd}
    sd, source = to_our_keys(lm_sd, lm_type, config.lm, labels, str(directory))
    assign_lm_weights(vlm.lm, sd, source, f"{directory}: language model")

    projector = {
        "projector." + k.removeprefix("mm_projector."): v
        for k, v in mm.items()
        if k.startswith("mm_projector.")
    }
    expected = {k: v.shape for k, v in vlm.projector.state_dict().items()}
    check_weights(
        projector,
        expected,
        {k: f"mm_projector.{k.removeprefix('projector.')}" for k in projector},
        f"{directory}: mm_projector",
    )
    vlm.projector.load_state_dict(projector, assign=True)
    if config.image_newline:
        if "image_newline" not in mm:
            raise CheckpointError(
                f"{directory}: mm_patch_merge_type asks for {prefix}image_newline, which is missing"
            )
        vlm.image_newline = torch.nn.Parameter(mm["image_newline"])
    return vlm


# ---- entry point -----------------------------------------------------------------------------------------
def _download_preset(config: VLMConfig) -> Path:
    files = {
        "cobra": [f"{config.name}/config.json", f"{config.name}/checkpoints/latest-checkpoint.pt"],
        "mlmamba": ["latest-checkpoint.pt"],
    }[config.hub_layout]
    try:
        paths = [hub_file(config.hub_id, f) for f in files]
    except Exception as e:
        raise CheckpointError(
            f"{config.name}: could not fetch {files} from {config.hub_id} ({type(e).__name__}: {e}); "
            "download them into a directory and pass its path"
        ) from e
    return paths[0].parent


def load(
    name_or_path: str | Path, dtype: torch.dtype | None = None, device=None, pretrained_tower: bool = True
) -> VLM:
    """A VLM from our layout, a Cobra / ML-Mamba run directory, or a preset name (its released weights,
    from the Hugging Face cache or the hub). Tiny towers are never pretrained."""
    from mambavl.presets import PRESETS

    name = str(name_or_path)
    preset = PRESETS.get(name)
    directory = Path(name_or_path).expanduser()
    if not directory.is_dir():
        if preset is None or preset.hub_layout is None:
            raise CheckpointError(
                f"{name}: neither a model directory nor a preset with released weights "
                f"({sorted(k for k, v in PRESETS.items() if v.hub_layout)})"
            )
        directory = _download_preset(preset)
    raw = read_json(directory / "config.json") if (directory / "config.json").is_file() else {}
    if raw.get("format") == FORMAT:
        vlm = _from_ours(directory, raw)
    elif raw.get("model_type") in LLAVA_TYPES:
        vlm = _from_llava(directory, raw, preset, pretrained_tower and not _tiny_tower(raw, preset))
    else:
        vlm = _from_seed(directory, preset, pretrained_tower and not _tiny_tower(raw, preset))
    if dtype is not None:
        vlm = vlm.to(dtype)
    return vlm.to(device or "cpu").eval()


def _tiny_tower(cfg: dict, preset: VLMConfig | None) -> bool:
    """Tiny towers have no pretrained weights (`cfg`: the directory's config.json, or {})."""
    tower = (cfg.get("model") or {}).get("vision_backbone_id") or cfg.get("mm_vision_tower")
    tower = tower or (preset.tower if preset else "")
    return tower.startswith("tiny-")


def convert(source: str | Path, destination: str | Path) -> Path:
    """An original checkpoint (or preset) -> mambavl's own layout."""
    return save_pretrained(load(source), destination)
