"""Named datasets, as Cobra's / prismatic's registry lays them out under a data root (`download/...`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StageData:
    annotations: str  # the LLaVA JSON, relative to the data root
    images: str  # the image root, relative to the data root


@dataclass(frozen=True)
class DatasetSpec:
    align: StageData
    finetune: StageData

    def stage(self, stage: str, root: str | Path) -> tuple[Path, Path]:
        part = {"align": self.align, "finetune": self.finetune}.get(stage)
        if part is None:
            raise ValueError(f"stage must be 'align' or 'finetune', got {stage!r}")
        return Path(root) / part.annotations, Path(root) / part.images


_ALIGN = StageData("download/llava-laion-cc-sbu-558k/chat.json", "download/llava-laion-cc-sbu-558k")
DATASETS: dict[str, DatasetSpec] = {
    # LLaVA-Pretrain 558k for align, llava_v1_5_mix665k for finetune
    "llava-v15": DatasetSpec(
        _ALIGN,
        StageData("download/llava-v1.5-instruct/llava_v1_5_mix665k.json", "download/llava-v1.5-instruct"),
    ),
    # Cobra's finetune mixture: LLaVA-v1.5 + LVIS-Instruct-4V + LRV-Instruct
    "llava-lvis4v-lrv": DatasetSpec(
        _ALIGN,
        StageData(
            "download/llava-v1.5-instruct/llava_v1_5_lvis4v_lrv_mix1231k.json", "download/llava-v1.5-instruct"
        ),
    ),
}


def dataset_paths(name: str, root: str | Path, stage: str) -> tuple[Path, Path]:
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name].stage(stage, root)
