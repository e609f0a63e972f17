"""`load_lm`: a language model from a directory or hub id, in any layout mambavl reads, with every
key and shape checked before a single weight is used — nothing half-loads."""

from __future__ import annotations

from pathlib import Path

import torch

from mambavl.checkpoints.files import CheckpointError, read_json, read_state_dict, resolve_model_dir
from mambavl.lm.config import LMConfig
from mambavl.lm.layouts import lm_config_from_json, rename_keys, stack_experts
from mambavl.lm.model import LanguageModel


def load_lm(path_or_hub_id: str | Path, dtype: torch.dtype | None = None, device=None) -> LanguageModel:
    """Load a Mamba-1 / FalconMamba / Mamba-2 / Jamba language model.

    `path_or_hub_id`: a directory with config.json and weights (HF or mamba_ssm layout) or a hub id,
    looked up in the local Hugging Face cache first. `dtype=None` keeps the checkpoint's dtype (that of
    its embedding); `device=None` means CPU.
    """
    directory = resolve_model_dir(path_or_hub_id)
    config_path = directory / "config.json"
    config, layout = lm_config_from_json(read_json(config_path), config_path)
    raw, origin = read_state_dict(directory)

    sd, source = to_our_keys(raw, layout, config, {k: f"{origin[k].name}:{k}" for k in raw}, str(directory))

    with torch.device("meta"):
        model = LanguageModel(config)
    if dtype is None:
        dtype = sd["embedding.weight"].dtype
    assign_lm_weights(model, sd, source, f"{directory}: the weights do not match {config_path.name}", dtype)
    return model.to(device=device or "cpu").eval()


def to_our_keys(
    raw: dict[str, torch.Tensor], layout: str, config: LMConfig, labels: dict[str, str], where: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A checkpoint's LM tensors in `layout` -> ours, and for each of our keys the label of its source
    (`labels`: original key -> "file:key", for error messages). Jamba's per-expert weights are stacked; a
    tied head is dropped (mamba_ssm saves it; it is the embedding)."""
    names = rename_keys(raw, layout)
    sd = {names[k]: v for k, v in raw.items()}
    source = {names[k]: labels[k] for k in raw}
    if layout == "jamba":
        sd = stack_experts(sd, config.n_experts, where)
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd, source


def assign_lm_weights(model: LanguageModel, sd: dict, source: dict, what: str, dtype=None) -> None:
    """Check `sd` (our keys) against the model, then make its tensors the model's parameters."""
    tied = model.config.tie_embeddings
    expected = {k: v.shape for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    check_weights(sd, expected, source, what)
    model.load_state_dict(
        {k: v if dtype is None else v.to(dtype) for k, v in sd.items()}, strict=False, assign=True
    )
    if tied:
        model.lm_head.weight = model.embedding.weight


def check_weights(sd: dict, expected: dict, source: dict, what: str) -> None:
    """Every expected key present with its shape, nothing extra; else one error listing all problems."""
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
