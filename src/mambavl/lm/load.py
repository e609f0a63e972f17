"""`load_lm`: a language model from a directory or hub id, in any layout mambavl reads, with every
key and shape checked before a single weight is used — nothing half-loads."""

from __future__ import annotations

from pathlib import Path

import torch

from mambavl.checkpoints.files import CheckpointError, read_json, read_state_dict, resolve_model_dir
from mambavl.lm.config import LMConfig
from mambavl.lm.layouts import fold_falcon_h1, lm_config_from_json, rename_keys, stack_experts
from mambavl.lm.model import LanguageModel


def load_lm(path_or_hub_id: str | Path, dtype: torch.dtype | None = None, device=None) -> LanguageModel:
    """Load a Mamba-1 / FalconMamba / Mamba-2 / Jamba language model.

    `path_or_hub_id`: a directory with config.json and weights (HF or mamba_ssm layout) or a hub id,
    looked up in the local Hugging Face cache first. `dtype=None` keeps the checkpoint's dtype (where it
    mixes dtypes, that of its embedding: see `checkpoint_dtype`); `device=None` means CPU. Weights that
    are NaN or infinite are refused, naming each tensor.
    """
    directory = resolve_model_dir(path_or_hub_id)
    config_path = directory / "config.json"
    config, layout = lm_config_from_json(read_json(config_path), config_path)
    raw, origin = read_state_dict(directory)

    sd, source = to_our_keys(raw, layout, config, {k: f"{origin[k].name}:{k}" for k in raw}, str(directory))

    try:
        with torch.device("meta"):
            model = LanguageModel(config)
    except (RuntimeError, OverflowError) as e:  # sizes within bounds one by one, too big together
        raise CheckpointError(f"{config_path}: the config describes a model too large to build ({e})") from e
    if dtype is None:
        dtype = checkpoint_dtype(sd, "embedding.weight")
    assign_lm_weights(model, sd, source, f"{directory}: the weights do not match {config_path.name}", dtype)
    return model.to(device=device or "cpu").eval()


def checkpoint_dtype(sd: dict[str, torch.Tensor], key: str) -> torch.dtype | None:
    """The floating dtype a checkpoint loads in: its only one, or, where it mixes several (fp16 tensors
    beside fp32 ones, say), that of `key` (the LM's embedding): a model gets one dtype, never two halves
    that fail or silently compute differently. None: nothing to go by (the check names the missing key)."""
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        return dtypes.pop()
    return sd[key].dtype if key in sd and sd[key].is_floating_point() else None


def to_our_keys(
    raw: dict[str, torch.Tensor], layout: str, config: LMConfig, labels: dict[str, str], where: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A checkpoint's LM tensors in `layout` -> ours, and for each of our keys the label of its source
    (`labels`: original key -> "file:key", for error messages). Per-expert hub weights are stacked; a
    tied head is dropped (mamba_ssm saves it; it is the embedding)."""
    names = rename_keys(raw, layout, config)
    sd, source = {}, {}
    for k, v in raw.items():
        ours = names[k]
        if ours in sd:  # one tensor saved under several names (Zamba2's shared blocks, per use)
            if sd[ours].shape != v.shape or not torch.equal(sd[ours], v):
                raise CheckpointError(
                    f"{where}: {labels[k]} and {source[ours]} are the same weight ({ours}) but differ"
                )
            continue
        sd[ours], source[ours] = v, labels[k]
    if layout in ("jamba", "nemotron_h"):
        sd = stack_experts(sd, config.n_experts, where)
    if layout == "falcon_h1":
        sd = fold_falcon_h1(sd, config, where)
    fused = [k for k in sd if k.endswith(".gate_up_proj.weight")] if layout == "granitemoehybrid" else []
    for key in fused:  # Granite's fused shared MLP
        gate, up = sd.pop(key).chunk(2, dim=0)  # the gate's rows first
        base = key.removesuffix("gate_up_proj.weight")
        sd[base + "gate_proj.weight"], sd[base + "up_proj.weight"] = gate, up
        source[base + "gate_proj.weight"] = source[base + "up_proj.weight"] = source.pop(key)
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd, source


def assign_lm_weights(model: LanguageModel, sd: dict, source: dict, what: str, dtype=None) -> None:
    """Check `sd` (our keys) against the model, then make its tensors (cast to `dtype`) the model's
    parameters."""
    tied = model.config.tie_embeddings
    expected = {k: v.shape for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    sd = check_weights(sd, expected, source, what, dtype)
    model.load_state_dict(sd, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.embedding.weight


def check_weights(
    sd: dict, expected: dict, source: dict, what: str, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Every expected key present with its shape, nothing extra, every value finite once cast to `dtype`
    (None: as stored); else one error listing all problems. Returns the tensors, cast."""
    problems = []
    if missing := [k for k in expected if k not in sd]:
        listed = ", ".join(f"{k} {tuple(expected[k])}" for k in missing[:8])
        problems.append(f"{len(missing)} weight(s) missing: {listed}{' ...' if len(missing) > 8 else ''}")
    if unexpected := [k for k in sd if k not in expected]:
        listed = ", ".join(source.get(k, k) for k in unexpected[:8])
        problems.append(
            f"{len(unexpected)} weight(s) the config has no place for: {listed}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    for k, shape in expected.items():
        if k in sd and sd[k].shape != shape:
            problems.append(
                f"{source.get(k, k)} has shape {tuple(sd[k].shape)}, the config expects {tuple(shape)}"
            )
    if problems:
        raise CheckpointError(
            f"{what}:\n  - "
            + "\n  - ".join(problems)
            + "\nCheck that the config belongs to these weights (layers, sizes, vocab, tied head)."
        )
    cast = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in sd.items()}
    if bad := nonfinite(sd, cast, source):
        listed = "\n  - ".join(bad[:8]) + ("\n  - ..." if len(bad) > 8 else "")
        raise CheckpointError(
            f"{what}: {len(bad)} tensor(s) hold values that are not finite:\n  - {listed}\n"
            "A model with them answers garbage: use an earlier checkpoint, or one saved without the fault."
        )
    return cast


def nonfinite(stored: dict, cast: dict, source: dict) -> list[str]:
    """Each tensor with NaN or ±inf values, as stored or once cast (fp32 values beyond fp16's range)."""
    out = []
    for k, v in cast.items():
        if not v.is_floating_point() or bool(torch.isfinite(v).all()):
            continue
        n = int((~torch.isfinite(v)).sum())
        if v.dtype != stored[k].dtype and bool(torch.isfinite(stored[k]).all()):
            why = f"beyond the range of {v.dtype} (stored as {stored[k].dtype})"
        else:
            why = "NaN or ±inf"
        out.append(f"{source.get(k, k)}: {n} of {v.numel()} values {why}")
    return out
