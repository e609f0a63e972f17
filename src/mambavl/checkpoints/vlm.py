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
import inspect
import json
import os
import tempfile
from pathlib import Path

import torch

from mambavl.checkpoints.fields import ConfigFields, is_int, show, type_problems
from mambavl.checkpoints.files import (
    CheckpointError,
    HubUnavailable,
    hub_files,
    model_file,
    read_json,
    read_state_dict,
    read_weights,
    resolve_model_dir,
)
from mambavl.lm.config import LMConfig
from mambavl.lm.load import assign_lm_weights, check_weights, checkpoint_dtype, to_our_keys
from mambavl.projectors import PROJECTORS, projector_from_groups, seed_groups
from mambavl.vision import RADIO_TOWERS
from mambavl.vlm.model import VLM, VLMConfig, build_tower
from mambavl.vlm.tokenizer import TextTokenizer, hub_chat_template, tokenizer_file

FORMAT = "mambavl-vlm"


# ---- our layout ------------------------------------------------------------------------------------------
def config_to_dict(config: VLMConfig) -> dict:
    out = dataclasses.asdict(config)
    out["lm"].pop("extra", None)
    return out


def config_from_dict(d: dict, where: str | Path = "config.json") -> VLMConfig:
    """A VLMConfig from the "config" object of our config.json, every field checked: its type, its
    range, the names it must be one of. A wrong field is a CheckpointError naming `where` and the field."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: 'config' must be an object, got {show(d)}")
    problems = type_problems(VLMConfig, d, "config.") or _value_problems(d)
    if problems:
        raise CheckpointError(
            f"{where}: invalid model config:\n  - "
            + "\n  - ".join(problems)
            + "\nCorrect these fields, or save the model again with mambavl."
        )
    d = dict(d)
    lm = dict(d.pop("lm"))
    for key in ("mixers", "ffns", "dt_limit"):
        if key in lm:
            lm[key] = tuple(lm[key])
    if d.get("anyres") is not None:
        d["anyres"] = tuple(tuple(p) for p in d["anyres"])
    if d.get("image_wrap") is not None:
        d["image_wrap"] = tuple(d["image_wrap"])
    if d.get("tower_options"):
        d["tower_options"] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in d["tower_options"].items()
        }
    try:
        return VLMConfig(lm=LMConfig(**lm), **d)
    except ValueError as e:  # LMConfig's checks: ranges, and sizes that do not fit together
        raise CheckpointError(f"{where}: config.lm: {e}") from e


def _value_problems(d: dict) -> list[str]:
    """The fields of a well-typed config dict whose values mambavl cannot run (unknown names, ranges)."""
    from mambavl.vision import RADIO_TOWERS, RadioConfig, tower_names
    from mambavl.vision.transforms import RESIZE_STRATEGIES
    from mambavl.vlm.prompts import PROMPT_FORMATS

    choices = {
        "tower": tower_names(),
        "projector": sorted(PROJECTORS),
        "prompt_format": [*PROMPT_FORMATS, "chat-template"],
        "resize": list(RESIZE_STRATEGIES),
        "image_placement": ["first", "placeholder"],
        "hub_layout": [None, "cobra", "mlmamba"],
        "tokenizer": ["tokenizer.json"],  # our layout keeps the tokenizer beside the weights
    }
    problems = [
        f"config.{k}: {show(d[k])} is not one of {options}"
        for k, options in choices.items()
        if k in d and d[k] not in options
    ]
    problems += [
        f"config.{k}: must be ≥ 1, got {d[k]}" for k in ("max_length", "max_pixels") if d.get(k, 1) < 1
    ]
    if d.get("anyres") is not None and (not d["anyres"] or any(w < 1 or h < 1 for w, h in d["anyres"])):
        problems.append(
            f"config.anyres: expected [[width, height], ...] of positive sizes, got {show(d['anyres'])}"
        )
    if options := d.get("tower_options"):
        if d.get("tower") not in RADIO_TOWERS:
            problems.append(f"config.tower_options: tower {show(d.get('tower'))} takes no options")
        else:
            problems += type_problems(RadioConfig, options, "config.tower_options.")
    if (wrap := d.get("image_wrap")) is not None and not all(wrap):
        problems.append(f"config.image_wrap: both markers must be non-empty, got {show(wrap)}")
    if not d.get("eos_token", "x"):
        problems.append("config.eos_token: must not be empty")
    if d.get("prompt_format") == "chat-template" and not d.get("chat_template"):
        problems.append("config.chat_template: the chat-template prompt format needs the template itself")
    if d.get("projector") in PROJECTORS and (options := d.get("projector_options")):
        accepted = inspect.signature(PROJECTORS[d["projector"]]).parameters
        open_ended = any(p.kind is p.VAR_KEYWORD for p in accepted.values())  # checked when it is built
        problems += [
            f"config.projector_options.{k}: not an option of projector {d['projector']!r}"
            for k in options
            if not open_ended and k not in accepted
        ]
    return problems


def _build(
    config: VLMConfig, where: Path, tokenizer: TextTokenizer | None = None, layer_field: str = ""
) -> VLM:
    """The model a config describes, on the meta device (no memory); a config that still cannot build one
    (an option of the wrong kind, say) is a CheckpointError naming the file."""
    try:
        with torch.device("meta"):
            vlm = VLM(config, tokenizer=tokenizer)
    except (ValueError, TypeError, KeyError, RuntimeError, OverflowError) as e:
        raise CheckpointError(
            f"{where}: the config does not describe a model mambavl can build ({type(e).__name__}: {e})"
        ) from e
    towers = vlm.vision.towers.values() if hasattr(vlm.vision, "towers") else [vlm.vision]
    for tower in (t for t in towers if hasattr(t, "feature_index")):  # timm towers: where features come from
        depth = len(tower.model.blocks)
        if not 0 <= tower.feature_index < depth:
            field = layer_field or "config.feature_layer"
            raise CheckpointError(
                f"{where}: {field}={config.feature_layer} is not a block of the {depth}-block tower "
                f"{config.tower!r}; expected -1 (the last) ... -{depth} (the first)"
            )
    return vlm


def _tokenizer_beside(directory: Path, config: VLMConfig, where: Path) -> TextTokenizer:
    """The tokenizer.json beside the weights, checked against the model: it holds the config's eos_token
    and no id the LM's embedding lacks."""
    tokenizer = tokenizer_file(model_file(directory, "tokenizer.json"), config.eos_token)
    if tokenizer.vocab_size > config.lm.vocab_size:
        raise CheckpointError(
            f"{directory / 'tokenizer.json'}: {tokenizer.vocab_size} tokens, but the language model has "
            f"{config.lm.vocab_size} embeddings ({where}); this tokenizer does not belong to the model"
        )
    return tokenizer


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
    """Everything to run the model offline: config, all weights (vision included), the tokenizer, and
    the chat template (fetched once from the tokenizer's repo where the preset names none)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = vlm.state_dict()
    if vlm.config.lm.tie_embeddings:
        sd.pop("lm.lm_head.weight")
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    config = config_to_dict(vlm.config) | {"tokenizer": "tokenizer.json"}
    if config["prompt_format"] == "chat-template" and not config["chat_template"]:
        config["chat_template"] = hub_chat_template(vlm.config.tokenizer)
    _atomic_write(
        directory / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": FORMAT})
    )
    _atomic_write(directory / "tokenizer.json", lambda p: vlm.tokenizer.tokenizer.save(p))
    body = json.dumps({"format": FORMAT, "version": 1, "config": config}, indent=2)
    _atomic_write(directory / "config.json", lambda p: Path(p).write_text(body))
    return directory


def _from_ours(directory: Path, raw: dict, dtype: torch.dtype | None = None) -> VLM:
    where = directory / "config.json"
    if (version := raw.get("version")) != 1:
        raise CheckpointError(f"{where}: version {show(version)}; this mambavl reads version 1 of its layout")
    config = config_from_dict(raw.get("config"), where)
    vlm = _build(config, where, _tokenizer_beside(directory, config, where))
    weights = model_file(directory, "model.safetensors")
    sd = read_weights(weights)
    tied = config.lm.tie_embeddings
    expected = {k: v.shape for k, v in vlm.state_dict().items() if not (tied and k == "lm.lm_head.weight")}
    dtype = checkpoint_dtype(sd, "lm.embedding.weight") if dtype is None else dtype
    labels = {k: f"{weights.name}:{k}" for k in sd}
    sd = check_weights(sd, expected, labels, f"{directory}: weights vs config", dtype)
    vlm.load_state_dict(sd, strict=False, assign=True)
    if tied:
        vlm.lm.lm_head.weight = vlm.lm.embedding.weight
    return vlm


# ---- the seeds' layouts --------------------------------------------------------------------------------
def _find_checkpoint(directory: Path) -> Path:
    for name in ("checkpoints/latest-checkpoint.pt", "latest-checkpoint.pt"):
        if (directory / name).is_file():
            return model_file(directory, name)
    raise CheckpointError(
        f"{directory}: no checkpoints/latest-checkpoint.pt or latest-checkpoint.pt (Cobra / ML-Mamba "
        "layouts), and no config.json of mambavl's own layout"
    )


def _read_groups(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A Cobra / ML-Mamba checkpoint's {"model": {group: state_dict}}, its structure checked."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many kinds for a truncated zip, a pickle of code, a legacy file
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from e
    groups = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(
            f"{path}: expected {{'model': {{group: state_dict}}}} as Cobra and ML-Mamba save it; "
            "this file holds something else"
        )
    for name, part in groups.items():
        if not isinstance(part, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in part.items()
        ):
            raise CheckpointError(f"{path}: model[{show(name)}] is not a state_dict (names to tensors)")
    return groups


def _seed_config(directory: Path, groups: set[str], preset: VLMConfig | None) -> VLMConfig:
    """A VLMConfig from a Cobra/ML-Mamba run config (config.json["model"]), else from the preset."""
    from mambavl.presets import LLM_BACKBONES, msc_options
    from mambavl.vision import TOWER_SETS, TOWERS
    from mambavl.vision.transforms import SQUARE_RESIZES

    projector = projector_from_groups(groups)
    where = directory / "config.json"
    if not where.is_file():
        if preset is None:
            raise CheckpointError(f"{directory}: no config.json to say which model these weights belong to")
        return preset
    model = read_json(where).get("model")
    if not isinstance(model, dict) or "llm_backbone_id" not in model:
        raise CheckpointError(f"{where}: expected a run config with a 'model' section")
    f = ConfigFields(model, where, "model.")
    llm_id = f.text("llm_backbone_id")
    if llm_id not in LLM_BACKBONES:
        raise CheckpointError(
            f"{where}: unknown llm_backbone_id {show(llm_id)}; known: {sorted(LLM_BACKBONES)}"
        )
    lm, tokenizer, prompt_format = LLM_BACKBONES[llm_id]
    arch = f.text("arch_specifier", "no-align+fused-gelu-mlp")
    if not projector and (projector := arch.split("+")[-1]) not in PROJECTORS:
        raise CheckpointError(
            f"{where}: model.arch_specifier {show(arch)} ends in projector {show(projector)}; "
            f"mambavl knows {sorted(PROJECTORS)}"
        )
    return VLMConfig(
        name=f.text("model_id", directory.name),
        tower=f.text("vision_backbone_id", choices=sorted(TOWER_SETS | TOWERS)),
        projector=projector,
        projector_options=msc_options(lm) if projector == "msc" else {},
        lm=lm,
        tokenizer=tokenizer,
        prompt_format=prompt_format,
        resize=f.text("image_resize_strategy", "resize-naive", SQUARE_RESIZES),
        max_length=f.integer("llm_max_length", 2048),
        hub_id=preset.hub_id if preset else None,
        hub_layout=preset.hub_layout if preset else None,
    )


def _from_seed(
    directory: Path, preset: VLMConfig | None, pretrained_tower: bool, dtype: torch.dtype | None = None
) -> VLM:
    path = _find_checkpoint(directory)
    groups = _read_groups(path)
    config = _seed_config(directory, set(groups), preset)
    vlm = _build(config, directory / "config.json")
    # the tower is not stored: timm's pretrained weights (or the fixed init of a tiny tower)
    vlm.vision = build_tower(config.tower, pretrained_tower and not _tiny(config), config.feature_layer)

    if "llm_backbone" not in groups:
        raise CheckpointError(
            f"{path}: only {sorted(groups)} saved (an align-stage checkpoint?); it holds no language model. "
            "Load the finetuned run directory instead."
        )
    # LM: strip FSDP's `llm.` prefix (Cobra), then mamba_ssm's key names -> ours
    llm = {k.removeprefix("llm."): v for k, v in groups["llm_backbone"].items()}
    labels = {k: f"{path.name}:llm_backbone.{k}" for k in llm}
    sd, source = to_our_keys(llm, "mamba_ssm", config.lm, labels, str(path))
    everything = sd | {
        f"{g}.{k}": v for g, part in groups.items() if g != "llm_backbone" for k, v in part.items()
    }
    dtype = checkpoint_dtype(everything, "embedding.weight") if dtype is None else dtype
    assign_lm_weights(vlm.lm, sd, source, f"{path}: llm_backbone", dtype)

    # projector groups: Cobra stores one ("projector"); ML-Mamba three (the MSC projector's own)
    for group, module in seed_groups(vlm.projector).items():
        if group not in groups:
            raise CheckpointError(
                f"{path}: the checkpoint has no '{group}' weights (groups: {sorted(groups)})"
            )
        sd = groups[group]
        expected = {k: v.shape for k, v in module.state_dict().items()}
        labels = {k: f"{path.name}:{group}.{k}" for k in sd}
        module.load_state_dict(check_weights(sd, expected, labels, f"{path}: {group}", dtype), assign=True)
    return vlm


def _tiny(config: VLMConfig) -> bool:
    """Tiny towers have no pretrained weights."""
    return config.tower.startswith("tiny-")


# ---- Viper's LLaVA-style layout --------------------------------------------------------------------------
# model_type -> (the LM's transformers model_type, the prefix its weights live under)
LLAVA_TYPES = {"llava_falcon_mamba": ("falcon_mamba", "backbone."), "llava_jamba": ("jamba", "model.")}
LLAVA_TOWERS = {"openai/clip-vit-large-patch14-336": "clip-vit-l-336px"}
LLAVA_PROJECTORS = {"linear": "linear", "mlp2x_gelu": "gelu-mlp"}
LLAVA_EOS = {"falcon_mamba": "<|im_end|>", "jamba": "<|eom|>"}


def _pinpoints(f: ConfigFields) -> tuple[tuple[int, int], ...]:
    value = f.raw.get("image_grid_pinpoints")
    ok = (
        isinstance(value, list)
        and value
        and all(isinstance(p, list) and len(p) == 2 and all(is_int(v) and v > 0 for v in p) for p in value)
    )
    if not ok:
        raise f.fail(
            "image_grid_pinpoints", "a list of [width, height] pairs of positive sizes (anyres)", value
        )
    return tuple(tuple(p) for p in value)


def _tokenizer_settings(
    directory: Path, default_eos: str, preset: VLMConfig | None
) -> tuple[str, str | None]:
    """(eos token, chat template) from tokenizer_config.json (or chat_template.jinja beside it), the
    preset, or the family's default eos."""
    path = directory / "tokenizer_config.json"
    t = ConfigFields(read_json(path) if path.is_file() else {}, path)
    eos = t.raw.get("eos_token")
    if isinstance(eos, dict):  # transformers' AddedToken form
        eos = ConfigFields(eos, path, "eos_token.").text("content")
    elif eos is not None:
        eos = t.text("eos_token")
    template = t.raw.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next(
            (x.get("template") for x in template if isinstance(x, dict) and x.get("name") == "default"), None
        )
    if template is not None and not isinstance(template, str):
        raise t.fail("chat_template", "a Jinja template string (or a list of named ones)", template)
    jinja = directory / "chat_template.jinja"  # where transformers 5 saves it
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    eos = preset.eos_token if preset else eos or default_eos
    return eos, template or (preset.chat_template if preset else None)


def _llava_config(directory: Path, raw: dict, preset: VLMConfig | None) -> VLMConfig:
    from mambavl.lm.layouts import lm_config_from_json
    from mambavl.vision import TOWER_SETS

    where = directory / "config.json"
    f = ConfigFields(raw, where)
    lm_type, _ = LLAVA_TYPES[raw["model_type"]]
    lm, _ = lm_config_from_json(raw | {"model_type": lm_type}, where)
    tower_id = f.text("mm_vision_tower", "openai/clip-vit-large-patch14-336")
    tower = LLAVA_TOWERS.get(tower_id, tower_id)
    if tower not in TOWER_SETS:
        raise CheckpointError(
            f"{where}: mm_vision_tower {show(tower_id)} is not a tower mambavl knows ({sorted(LLAVA_TOWERS)})"
        )
    projector = LLAVA_PROJECTORS[f.text("mm_projector_type", "linear", sorted(LLAVA_PROJECTORS))]
    f.text("mm_vision_select_feature", "patch", ["patch"])  # "cls_patch" keeps CLS: not supported
    anyres = _pinpoints(f) if f.text("image_aspect_ratio", "square") == "anyres" else None
    eos, chat_template = _tokenizer_settings(directory, LLAVA_EOS[lm_type], preset)
    has_tokenizer = (directory / "tokenizer.json").is_file()
    if not has_tokenizer and preset is None:
        raise CheckpointError(f"{directory}: no tokenizer.json beside the weights")
    name = raw.get("_name_or_path")
    return VLMConfig(
        name=name if isinstance(name, str) and name else directory.name,
        tower=tower,
        projector=projector,
        lm=lm,
        tokenizer=str(directory / "tokenizer.json") if has_tokenizer else preset.tokenizer,
        prompt_format="chat-template",
        feature_layer=f.integer("mm_vision_select_layer", -2, minimum=None),
        image_placement="placeholder",
        anyres=anyres,
        image_newline="unpad" in f.text("mm_patch_merge_type", "flat"),
        eos_token=eos,
        system_prompt=preset.system_prompt if preset else "You are a helpful language and vision assistant. ",
        chat_template=chat_template,
        max_length=f.integer("tokenizer_model_max_length", 32768),
    )


def _from_llava(
    directory: Path,
    raw: dict,
    preset: VLMConfig | None,
    pretrained_tower: bool,
    dtype: torch.dtype | None = None,
) -> VLM:
    config = _llava_config(directory, raw, preset)
    where = directory / "config.json"
    lm_type, prefix = LLAVA_TYPES[raw["model_type"]]
    tokenizer = (
        _tokenizer_beside(directory, config, where) if (directory / "tokenizer.json").is_file() else None
    )
    vlm = _build(config, where, tokenizer, layer_field="mm_vision_select_layer")
    # reloaded, as Viper does
    vlm.vision = build_tower(config.tower, pretrained_tower and not _tiny(config), config.feature_layer)

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
    dtype = checkpoint_dtype(sd | mm, "embedding.weight") if dtype is None else dtype
    assign_lm_weights(vlm.lm, sd, source, f"{directory}: language model", dtype)

    projector = {
        "projector." + k.removeprefix("mm_projector."): v
        for k, v in mm.items()
        if k.startswith("mm_projector.")
    }
    expected = {k: v.shape for k, v in vlm.projector.state_dict().items()}
    labels = {k: f"mm_projector.{k.removeprefix('projector.')}" for k in projector}
    projector = check_weights(projector, expected, labels, f"{directory}: mm_projector", dtype)
    vlm.projector.load_state_dict(projector, assign=True)
    if config.image_newline:
        if "image_newline" not in mm:
            raise CheckpointError(
                f"{directory}: mm_patch_merge_type asks for {prefix}image_newline, which is missing"
            )
        newline = {"image_newline": mm["image_newline"]}
        expected = {"image_newline": torch.Size([config.lm.d_model])}
        newline = check_weights(
            newline, expected, {"image_newline": f"{prefix}image_newline"}, str(directory), dtype
        )
        vlm.image_newline = torch.nn.Parameter(newline["image_newline"])
    return vlm


# ---- NVIDIA's Nemotron Omni layout (transformers' nemotron_h_omni) ---------------------------------------
NEMOTRON_TYPES = ("nemotron_h_omni",)
_RADIO = "vision_model.radio_model.model."
# the released processor's image settings: preprocessor_config.json field -> RadioConfig field
_NEMOTRON_IMAGE = {"min_num_patches": "min_patches", "max_num_patches": "max_patches"}


def _legacy(f: ConfigFields, name: str, legacy: str):
    """A field under its current name, else under the released checkpoint's older one."""
    return f.raw.get(name) if f.raw.get(name) is not None else f.raw.get(legacy)


def _nemotron_config(directory: Path, raw: dict, preset: VLMConfig | None) -> VLMConfig:
    """The VLMConfig of a Nemotron Omni checkpoint: C-RADIO at each image's own size, the pixel-shuffle
    merge, the RMSNorm-ReLU² projector, a Nemotron-H LM; `<img>` … `</img>` around the image at the
    prompt's `<image>`. Audio and video are not read (their weights are skipped)."""
    from mambavl.lm.layouts import lm_config_from_json

    where = directory / "config.json"
    f = ConfigFields(raw, where)
    text = _legacy(f, "text_config", "llm_config")
    if not isinstance(text, dict):
        raise f.fail("text_config", "an object (the Nemotron-H language model's config)", text)
    lm, lm_type = lm_config_from_json({"model_type": "nemotron_h"} | text, where)
    if lm_type != "nemotron_h":
        raise CheckpointError(f"{where}: text_config.model_type must be nemotron_h, got {show(lm_type)}")
    v = f.section("vision_config")
    if v.flag("use_swiglu_ffn", False):
        raise CheckpointError(
            f"{where}: vision_config.use_swiglu_ffn=true is not a C-RADIO tower mambavl runs"
        )
    v.text("hidden_act", "gelu", ["gelu"])
    hidden = v.integer("hidden_size", 1280)
    vit_hidden = _legacy(f, "vision_hidden_size", "vit_hidden_size")
    if vit_hidden is not None and vit_hidden != hidden:
        raise CheckpointError(
            f"{where}: vision_hidden_size {show(vit_hidden)} differs from vision_config.hidden_size {hidden}"
        )
    ratio = f.number("downsample_ratio", 0.5)
    merge = round(1 / ratio)
    if merge < 1 or abs(merge * ratio - 1) > 1e-6:
        raise f.fail("downsample_ratio", "1 / an integer (0.5: 2×2 patches a position)", ratio)
    text_f = ConfigFields(text, where, "text_config.")
    options = dict(
        hidden_size=hidden,
        depth=v.integer("num_hidden_layers", 32),
        num_heads=v.integer("num_attention_heads", 16),
        mlp_ratio=v.number("mlp_ratio", 4.0),
        patch_size=v.integer("patch_size", 16),
        max_img_size=v.integer("max_img_size", 2048),
        num_cls_tokens=v.integer("num_cls_tokens", 3, minimum=0),
        num_registers=v.integer("num_registers", 7, minimum=0),
        layer_norm_eps=v.number("layer_norm_eps", 1e-6),
        qkv_bias=v.flag("qkv_bias", True),
        final_norm=text_f.integer("num_nextn_predict_layers", 0, minimum=0) > 0,
        merge=merge,
    )
    pre_path = directory / "preprocessor_config.json"
    pre = ConfigFields(read_json(pre_path) if pre_path.is_file() else {}, pre_path)
    if pre.raw.get("patch_size") is not None and pre.integer("patch_size") != options["patch_size"]:
        raise CheckpointError(
            f"{pre_path}: patch_size {pre.raw['patch_size']} differs from the tower's {options['patch_size']}"
        )
    for theirs, ours in _NEMOTRON_IMAGE.items():
        if pre.raw.get(theirs) is not None:
            options[ours] = pre.integer(theirs, minimum=0)
    for ours, names in (("mean", ("image_mean", "norm_mean")), ("std", ("image_std", "norm_std"))):
        value = next((pre.raw[n] for n in names if pre.raw.get(n) is not None), None)
        if value is not None:
            if not (
                isinstance(value, list) and len(value) == 3 and all(isinstance(x, int | float) for x in value)
            ):
                raise pre.fail(names[0], "three numbers", value)
            options[ours] = tuple(float(x) for x in value)
    default = dataclasses.asdict(RADIO_TOWERS["c-radio-h"])
    options = {k: val for k, val in options.items() if default[k] != val}
    eos, chat_template = _tokenizer_settings(directory, "<|im_end|>", preset)
    has_tokenizer = (directory / "tokenizer.json").is_file()
    if not has_tokenizer and preset is None:
        raise CheckpointError(f"{directory}: no tokenizer.json beside the weights")
    if chat_template is None and preset is None:
        raise CheckpointError(f"{directory}: no chat template (tokenizer_config.json or chat_template.jinja)")
    name = raw.get("_name_or_path")
    return VLMConfig(
        name=name if isinstance(name, str) and name else directory.name,
        tower="c-radio-h",
        tower_options=options,
        projector="rmsnorm-relu2-mlp",
        projector_options={"hidden": f.integer("projector_hidden_size", 4096)},
        lm=lm,
        tokenizer=str(directory / "tokenizer.json") if has_tokenizer else preset.tokenizer,
        prompt_format="chat-template",
        resize="dynamic",
        image_placement="placeholder",
        image_wrap=("<img>", "</img>"),
        eos_token=eos,
        system_prompt=preset.system_prompt if preset else None,
        chat_template=chat_template or preset.chat_template,
        max_length=text_f.integer("max_position_embeddings", 131072),
    )


def _nemotron_tower_keys(vision: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The released RADIO keys (`radio_model.model.` removed) without what our tower does not hold: the
    video patch projection (video is not read), the summary indices, the input conditioner (the image
    transform normalises), and LayerScale factors, which C-RADIO does not have (all ones)."""
    out = {}
    for key, value in vision.items():
        if ".layer_scale" in key:
            if not torch.all(value == 1):
                raise CheckpointError(
                    f"{where}: {key} holds a LayerScale other than 1, which C-RADIO does not have"
                )
            continue
        if key.startswith(("patch_generator.video_embedder.", "summary_idxs", "input_conditioner.")):
            continue
        out[key] = value
    return out


def _from_nemotron(
    directory: Path, raw: dict, preset: VLMConfig | None, dtype: torch.dtype | None = None
) -> VLM:
    config = _nemotron_config(directory, raw, preset)
    where = directory / "config.json"
    tokenizer = (
        _tokenizer_beside(directory, config, where) if (directory / "tokenizer.json").is_file() else None
    )
    vlm = _build(config, where, tokenizer)
    tensors, origin = read_state_dict(directory)
    lm_sd, tower, projector, labels = {}, {}, {}, {}
    for key, value in tensors.items():
        if key.startswith("language_model."):
            lm_sd[key.removeprefix("language_model.")] = value
            labels[key.removeprefix("language_model.")] = f"{origin[key].name}:{key}"
        elif key.startswith(_RADIO):
            tower[key.removeprefix(_RADIO)] = value
        elif key.startswith("vision_model.radio_model."):
            tower[key.removeprefix("vision_model.radio_model.")] = value
        elif key.startswith("vision_projector.vision_final_layernorm."):
            tower["final_norm." + key.removeprefix("vision_projector.vision_final_layernorm.")] = value
        elif key.startswith("mlp1."):
            index, rest = key.removeprefix("mlp1.").split(".", 1)
            part = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}.get(index, f"mlp1.{index}")
            projector[f"{part}.{rest}"] = value
        elif key.startswith(("sound_encoder.", "sound_projection.")):
            continue  # audio is not read
        else:
            raise CheckpointError(f"{origin[key]}: {key} is no part of a Nemotron Omni model mambavl knows")
    sd, source = to_our_keys(lm_sd, "nemotron_h", config.lm, labels, str(directory))
    dtype = checkpoint_dtype(sd, "embedding.weight") if dtype is None else dtype
    assign_lm_weights(vlm.lm, sd, source, f"{directory}: language model", dtype)
    for module, part, prefix in ((vlm.vision, tower, _RADIO), (vlm.projector, projector, "mlp1 as ")):
        if module is vlm.vision:
            part = _nemotron_tower_keys(part, str(directory))
        expected = {k: val.shape for k, val in module.state_dict().items()}
        names = {k: f"{prefix}{k}" for k in part}
        module.load_state_dict(
            check_weights(part, expected, names, f"{directory}: {prefix}", dtype), assign=True
        )
    return vlm


# ---- entry point -----------------------------------------------------------------------------------------
def _download_preset(config: VLMConfig, **hub_options) -> Path:
    """The directory of a preset's released files in the Hugging Face cache, downloaded if need be; offline
    (or with the hub out of reach) a one-line HubUnavailable at once, naming the files and the way round."""
    files = {
        "cobra": [f"{config.name}/config.json", f"{config.name}/checkpoints/latest-checkpoint.pt"],
        "mlmamba": ["latest-checkpoint.pt"],
    }[config.hub_layout]
    needed = f"{config.name}'s released weights ({', '.join(files)})"
    try:
        paths = hub_files(config.hub_id, files, needed, **hub_options)
    except HubUnavailable as e:
        raise e.instead(
            "Pass a local model directory instead: one holding these files, or a model saved by "
            "save_pretrained or `mambavl convert`."
        ) from None
    return paths[0].parent


def _hub_model_dir(name: str) -> Path | None:
    """The local snapshot of a released model that is read from its own hub files (`HUB_MODELS`),
    downloaded if need be; None for any other name."""
    from mambavl.presets import HUB_MODELS

    if name not in HUB_MODELS:
        return None
    return resolve_model_dir(HUB_MODELS[name][0])


def _layout(directory: Path) -> tuple[str, dict]:
    """Which layout a model directory holds ("ours", "llava", "nemotron" or "seed": a Cobra / ML-Mamba
    run), and its config.json ({} when it has none, as a seed's checkpoint-only directory may)."""
    config = directory / "config.json"
    raw = read_json(config) if config.is_file() else {}
    if raw.get("format") == FORMAT:
        return "ours", raw
    model_type = ConfigFields(raw, config).text("model_type", None)
    if model_type in LLAVA_TYPES:
        return "llava", raw
    if model_type in NEMOTRON_TYPES:
        return "nemotron", raw
    return "seed", raw


def load(
    name_or_path: str | Path,
    dtype: torch.dtype | None = None,
    device=None,
    pretrained_tower: bool = True,
    **hub_options,
) -> VLM:
    """A VLM from our layout, a Cobra / ML-Mamba run directory, or a preset name (its released weights,
    from the Hugging Face cache or the hub; `hub_options`: `hf_hub_download`'s `token`, `cache_dir`).
    Tiny towers are never pretrained.

    Nothing in the directory is trusted: every config field is checked, every file must resolve inside
    the directory, NaN or infinite weights are refused. `dtype=None` keeps the checkpoint's dtype; one
    that mixes dtypes loads in its LM embedding's (see `checkpoint_dtype`)."""
    from mambavl.presets import HUB_MODELS, PRESETS

    name = str(name_or_path)
    preset = PRESETS.get(name)
    directory = _hub_model_dir(name) or Path(name_or_path).expanduser()
    if not directory.is_dir():
        if preset is None or preset.hub_layout is None:
            raise CheckpointError(
                f"{name}: neither a model directory nor a preset with released weights "
                f"({sorted(k for k, v in PRESETS.items() if v.hub_layout)}) nor a released model read from "
                f"its hub files ({sorted(HUB_MODELS)})"
            )
        directory = _download_preset(preset, **hub_options)
    layout, raw = _layout(directory)
    if layout == "ours":
        vlm = _from_ours(directory, raw, dtype)
    elif layout == "llava":
        vlm = _from_llava(directory, raw, preset, pretrained_tower, dtype)
    elif layout == "nemotron":
        vlm = _from_nemotron(directory, raw, preset, dtype)
    else:
        vlm = _from_seed(directory, preset, pretrained_tower, dtype)
    if dtype is not None:
        vlm = vlm.to(dtype)
    return vlm.to(device or "cpu").eval()


def convert(source: str | Path, destination: str | Path) -> Path:
    """An original checkpoint (or preset) -> mambavl's own layout."""
    return save_pretrained(load(source), destination)


# ---- a model without its weights: its config, and the files it is loaded from -----------------------------
def read_config(name_or_path: str | Path) -> tuple[VLMConfig, str] | None:
    """The config `load` builds, and the name of the layout it reads, without reading the weights (of a
    Cobra / ML-Mamba checkpoint only its group names, which tell ML-Mamba's projector): a preset's own, or a
    model directory's. None: the directory holds no VLM (a language model alone, say)."""
    from mambavl.presets import PRESETS

    name = str(name_or_path)
    directory = _hub_model_dir(name) or Path(name_or_path).expanduser()
    if not directory.is_dir():
        if name in PRESETS:
            return PRESETS[name], "mambavl preset"
        raise CheckpointError(f"{name}: neither a model directory nor a preset ({', '.join(PRESETS)})")
    layout, raw = _layout(directory)
    if layout == "ours":
        return config_from_dict(raw.get("config"), directory / "config.json"), "mambavl"
    if layout == "llava":
        return _llava_config(directory, raw, None), f"LLaVA / Viper ({raw['model_type']})"
    if layout == "nemotron":
        return _nemotron_config(directory, raw, None), f"Nemotron Omni ({raw['model_type']})"
    seed_files = (directory / "checkpoints" / "latest-checkpoint.pt", directory / "latest-checkpoint.pt")
    if "model" not in raw and (raw or not any(p.is_file() for p in seed_files)):
        return None
    groups = set(_read_groups(_find_checkpoint(directory)))  # mmap: the tensors are not read
    return _seed_config(directory, groups, None), "ML-Mamba" if projector_from_groups(groups) else "Cobra"


def model_files(name_or_path: str | Path) -> list[Path]:
    """The files `load` reads for a model directory or a preset's released weights (config, weights,
    tokenizer): what tells one model from another. Empty for a preset without released weights."""
    from mambavl.checkpoints.files import weight_files
    from mambavl.presets import PRESETS

    directory = _hub_model_dir(str(name_or_path)) or Path(name_or_path).expanduser()
    if not directory.is_dir():
        preset = PRESETS.get(str(name_or_path))
        if preset is None:
            raise CheckpointError(f"{name_or_path}: neither a model directory nor a preset")
        if preset.hub_layout is None:
            return []
        directory = _download_preset(preset)
    layout, _ = _layout(directory)
    if layout == "ours":
        files = [directory / "model.safetensors", directory / "tokenizer.json"]
    elif layout in ("llava", "nemotron"):
        files = [*weight_files(directory), directory / "tokenizer.json", directory / "tokenizer_config.json"]
    else:
        files = [_find_checkpoint(directory)]
    return [p for p in (directory / "config.json", *files) if p.is_file()]
