"""A training run, as one explicit config: the model, the stage, the data, and the optimisation.

Hyperparameters left unset take the seed recipe's values for the stage (`STAGE_DEFAULTS`), which are
Cobra's (`cobra/conf/models.py`, class `Cobra_3B`, `align_*` / `finetune_*` fields; the same values as
prismatic-vlms' LLaVa-v1.5 recipe). Cobra's scripts/pretrain.py copies them by stage the same way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from mambavl.train.trackers import TRACKERS
from mambavl.train.trackers import parse as parse_trackers

STAGES = ("align", "finetune", "full")

# Cobra_3B: align_* and finetune_* (epochs, global / per-device batch, lr, weight decay, grad clip,
# "linear-warmup+cosine-decay" with warmup_ratio 0.03). Cobra's "full-finetune" uses the finetune values.
STAGE_DEFAULTS: dict[str, dict] = {
    "align": dict(
        epochs=1,
        global_batch_size=256,
        per_device_batch_size=16,
        learning_rate=1e-3,
        weight_decay=0.0,
        max_grad_norm=1.0,
        warmup_ratio=0.03,
    ),
    "finetune": dict(
        epochs=2,
        global_batch_size=128,
        per_device_batch_size=16,
        learning_rate=2e-5,
        weight_decay=0.1,
        max_grad_norm=1.0,
        warmup_ratio=0.03,
    ),
}
STAGE_DEFAULTS["full"] = STAGE_DEFAULTS["finetune"]


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # the LM's projections (Mamba in/x/out, attention, MLP); peft matches module names by suffix
    targets: tuple[str, ...] = ("in_proj", "x_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class TrainConfig:
    model: str  # a preset (random init), a saved model dir, a Cobra / ML-Mamba run dir, or a hub id
    run_dir: Path
    stage: str = "finetune"
    data: tuple[str, ...] = ()  # ANNOTATIONS[:IMAGE_ROOT[:WEIGHT]] sources
    dataset: str | None = None  # a registered dataset id (with data_root)
    data_root: Path | None = None
    # optimisation; None = the stage's default
    epochs: int | None = None
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    global_batch_size: int | None = None
    per_device_batch_size: int | None = None
    learning_rate: float | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    warmup_ratio: float | None = None
    min_lr_ratio: float = 0.0  # cosine decays to this fraction of the peak
    # model
    train_vision: bool = False  # the vision tower stays frozen unless asked
    train_lm: bool = False  # align: train the LM too (an LM that starts from random weights needs it)
    lora: LoraConfig | None = None  # LoRA on the LM instead of training it whole (finetune / full)
    precision: str = "auto"  # "bf16" (autocast, fp32 master weights), "fp32", "auto": bf16 on GPUs
    # "auto": off on one GPU (the faster step), switched on for good if a step runs out of GPU memory (that
    # step is redone); on with several processes and on CPUs. True / False: always on / off.
    gradient_checkpointing: bool | str = "auto"
    resize: str | None = None  # image resize strategy (default: the model's)
    # data
    skip_bad: bool = False  # train without unusable samples: those found up front, and images that fail
    # to load mid-run (each listed in run_dir/skipped.jsonl); else the first one stops the run
    verify_images: bool = False  # decode every image before training (else only their existence is checked)
    group_by_length: bool = True
    blank_images: bool = False  # replace every image by a grey one: the blind baseline
    cache_images: bool = False  # keep every transformed image in memory after its first use
    num_workers: int = 0
    # run
    seed: int = 7  # Cobra's default
    save_every: int = 0  # optimizer steps between checkpoints (0: at the end of each epoch only)
    keep_checkpoints: int = 2
    log_every: int = 1
    resume: bool = False  # continue the run in run_dir (else a run dir that holds a run is refused)
    progress: bool = True
    report_to: tuple[str, ...] = ()  # trackers besides metrics.jsonl: "wandb", "tensorboard"
    save_final: bool = True  # checkpoint and export the model at the end (off: a throughput measurement)
    profile_step: int = 0  # profile this step (from 1) by kernel into run_dir/profile.txt; 0: none
    # run a frozen vision tower through torch.compile (its norms, activations and attention fused; the
    # first step, and each new batch size, waits for the compilation); "auto": on GPUs when it is frozen
    compile_vision: bool | str = "auto"
    # AdamW's kernels on GPUs: "torch" (torch's fused AdamW) or "triton" (`train.adamw.TritonAdamW`: every
    # parameter in one launch, the gradients' norm in one more; not yet the default: it has not run on a GPU)
    adamw_kernels: str = "torch"

    def compiles_vision(self, device_type: str, frozen: bool) -> bool:
        """Whether the run compiles its vision tower (`compile_vision`; "auto": a frozen one on GPUs)."""
        return self.compile_vision is True or (
            self.compile_vision == "auto" and frozen and device_type == "cuda"
        )

    def resolved(self) -> TrainConfig:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        defaults = STAGE_DEFAULTS[self.stage]
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        cfg = replace(self, **filled, report_to=parse_trackers(self.report_to))
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.global_batch_size <= 0 or self.per_device_batch_size <= 0:
            raise ValueError("batch sizes must be positive")
        if self.global_batch_size % self.per_device_batch_size:
            raise ValueError(
                f"global batch size {self.global_batch_size} is not a multiple of the per-device batch "
                f"size {self.per_device_batch_size}"
            )
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.lora is not None and self.stage == "align":
            raise ValueError("LoRA adapts the LM, which the align stage does not train: use finetune or full")
        if self.max_steps is None and (self.epochs or 0) <= 0:
            raise ValueError("give epochs ≥ 1 or max_steps")
        unknown = [name for name in self.report_to if name not in TRACKERS]
        if unknown:
            raise ValueError(f"report_to: unknown tracker(s) {unknown}; choose from {', '.join(TRACKERS)}")
        if self.gradient_checkpointing not in (True, False, "auto"):
            raise ValueError(
                f"gradient_checkpointing must be true, false or 'auto', got {self.gradient_checkpointing!r}"
            )
        if self.adamw_kernels not in ("torch", "triton"):
            raise ValueError(f"adamw_kernels must be 'torch' or 'triton', got {self.adamw_kernels!r}")
        if self.compile_vision not in (True, False, "auto"):
            raise ValueError(f"compile_vision must be true, false or 'auto', got {self.compile_vision!r}")
        if self.compile_vision is True and (self.stage == "full" or self.train_vision):
            raise ValueError("compile_vision compiles a frozen vision tower; this run trains it")
        if self.profile_step < 0:
            raise ValueError(
                f"profile_step must be a step number (from 1), or 0 for none; got {self.profile_step}"
            )

    # ---- files ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["run_dir"] = str(self.run_dir)
        d["data_root"] = None if self.data_root is None else str(self.data_root)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; known: {sorted(known)}")
        d = dict(d)
        if d.get("lora") is not None:
            lora = dict(d["lora"])
            if "targets" in lora:
                lora["targets"] = tuple(lora["targets"])
            d["lora"] = LoraConfig(**lora)
        if d.get("run_dir") is not None:
            d["run_dir"] = Path(d["run_dir"])
        if d.get("data_root") is not None:
            d["data_root"] = Path(d["data_root"])
        if "data" in d:
            d["data"] = tuple([d["data"]] if isinstance(d["data"], str) else d["data"])
        if "report_to" in d:
            d["report_to"] = parse_trackers(d["report_to"])
        return cls(**d)


def read_config_file(path: str | Path) -> dict:
    """Options from a JSON or TOML file (keys: TrainConfig's field names)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ValueError(f"{path}: TOML config files need Python ≥ 3.11; use JSON") from None
        return tomllib.loads(path.read_text())
    if path.suffix == ".json":
        return json.loads(path.read_text())
    raise ValueError(f"{path}: config files are .json or .toml")
