"""Typed, frozen configuration loaded from YAML, with ``a.b=value`` overrides.

One tree covers a single training run (data, model, loss, train) and a sweep (sweep,
resources). Every error names the field and the allowed values, so a typo in a profile
fails before any cluster starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artefact.config_tree import build, deep_merge, to_dict
from artefact.errors import UserError
from artefact.taxonomy import HEADS

ARCHS = ("unet", "upernet")
AMP_MODES = ("auto", "fp16", "bf16", "off")
DEVICES = ("auto", "cpu", "cuda")
SWEEP_MODES = ("search", "fair")
SCHEDULERS = ("asha", "none")
TRAINERS = ("ray_train", "in_process")
OBJECTIVES = {
    "miou_fine": ("val/miou_fine", "max"),
    "miou_coarse": ("val/miou_coarse", "max"),
    "miou_binary": ("val/miou_binary", "max"),
    "img_per_s": ("perf/img_per_s", "max"),
    "peak_mem_mb": ("perf/peak_mem_mb", "min"),
    "gpu_hours": ("perf/gpu_hours", "min"),
}
"""What ``sweep.objectives`` may name: a metric every epoch reports, and its direction."""
HOLDOUT_FIELDS = ("material", "content")
CV_KINDS = re.compile(r"(content|material)|kfold:(\d+)")
"""``data.cv``: leave one content type out, leave one material out, or K grouped folds."""
LOSS_KINDS = ("dice", "dice_ce", "dice_focal")
CLASS_WEIGHTINGS = ("none", "inverse_freq", "inverse_sqrt", "inverse_sqrt_log")


@dataclass(frozen=True)
class DataConfig:
    path: str | None = None
    """A raw source (parquet shards or folder layout) or a prepared cache; None = synthetic."""
    resolution: int = 64
    """Side of the square training crops and validation tiles; a multiple of 32."""
    max_side: int = 512
    """prepare shrinks images so that their longer side is at most this."""
    val_fraction: float = 0.2
    holdout: str | None = None
    """Leave-one-group-out: 'material=Paper' or 'content=Line art' becomes the validation side."""
    augment_copies: int = 0
    """Offline flipped/rotated copies (0..3) added to the training side only."""
    split_seed: int = 0
    cv: str | None = None
    """Cross-validation folds, built into the cache: 'content' (each content type held out in
    turn), 'material' (each material) or 'kfold:K' (K folds of source images, stratified by
    material). A fair sweep then trains every encoder x seed on every fold."""
    fold: int | None = None
    """The fold a run validates on (set per trial by a sweep with data.cv); None: the cache's split."""
    crops_per_image: int = 1
    """Random training crops drawn from each training image per epoch."""
    in_memory: bool = False
    """Keep the decoded cache in RAM instead of reading memory-mapped files each epoch."""
    num_workers: int = 0
    max_pixels: int = 250_000_000

    def __post_init__(self) -> None:
        _check(
            self.resolution >= 32 and self.resolution % 32 == 0,
            "data.resolution",
            self.resolution,
            "a positive multiple of 32 (e.g. 256, 384)",
        )
        _check(
            self.max_side >= self.resolution, "data.max_side", self.max_side, f">= data.resolution ({self.resolution})"
        )
        _check(0 < self.val_fraction < 1, "data.val_fraction", self.val_fraction, "a number between 0 and 1")
        _check(0 <= self.augment_copies <= 3, "data.augment_copies", self.augment_copies, "0, 1, 2 or 3")
        _check(self.crops_per_image >= 1, "data.crops_per_image", self.crops_per_image, ">= 1")
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, ">= 0")
        _check(self.max_pixels > 0, "data.max_pixels", self.max_pixels, "> 0")
        key, _, value = (self.holdout or "material=any").partition("=")
        _check(key in HOLDOUT_FIELDS and bool(value), "data.holdout", self.holdout, "'material=<x>' or 'content=<x>'")
        kind = CV_KINDS.fullmatch(self.cv or "kfold:2")
        _check(bool(kind) and int(kind[2] or 2) >= 2, "data.cv", self.cv, "content, material or kfold:K with K >= 2")
        _check(not (self.cv and self.holdout), "data.cv", self.cv, f"no data.holdout ({self.holdout!r}): choose one")
        ok_fold = self.fold is None or (self.cv is not None and self.fold >= 0)
        _check(ok_fold, "data.fold", self.fold, "null, or a fold number >= 0 with data.cv set")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "unet"
    encoder: str = "tu-test_convnext"
    """Any timm model as 'tu-<name>', a bare timm name, or an alias such as convnext_tiny."""
    heads: tuple[str, ...] = ("binary", "coarse", "fine")
    pretrained: bool | str = False
    """False, True (timm weights from the hub) or a path to a local weights file."""

    def __post_init__(self) -> None:
        _check(self.arch in ARCHS, "model.arch", self.arch, ARCHS)
        _check(
            len(self.heads) > 0 and set(self.heads) <= set(HEADS) and len(set(self.heads)) == len(self.heads),
            "model.heads",
            list(self.heads),
            f"a non-empty subset of {list(HEADS)}",
        )
        _check("fine" in self.heads, "model.heads", list(self.heads), "a list that includes 'fine'")


@dataclass(frozen=True)
class LossConfig:
    binary: float = 0.2
    coarse: float = 0.3
    fine: float = 0.5
    kind: str = "dice"
    """dice (soft Dice over the classes present), dice_ce (+ cross-entropy) or dice_focal (+ focal, gamma 2)."""
    class_weights: str = "none"
    """Per-class loss weights from the training side's pixel counts, per head: none, inverse_freq (1/f),
    inverse_sqrt (1/sqrt f) or inverse_sqrt_log (log1p(1/sqrt f)); a class without training pixels gets 0."""
    class_weight_clip: tuple[float, float] = (0.1, 10.0)
    """[low, high] for the weights once normalised to mean 1 over the classes with training pixels."""

    def __post_init__(self) -> None:
        for head in HEADS:
            _check(getattr(self, head) >= 0, f"loss.{head}", getattr(self, head), "a weight >= 0")
        _check(self.kind in LOSS_KINDS, "loss.kind", self.kind, LOSS_KINDS)
        _check(self.class_weights in CLASS_WEIGHTINGS, "loss.class_weights", self.class_weights, CLASS_WEIGHTINGS)
        clip = list(self.class_weight_clip)
        _check(
            len(clip) == 2 and 0 < clip[0] <= clip[1],
            "loss.class_weight_clip",
            clip,
            "[low, high] with 0 < low <= high, e.g. [0.1, 10]",
        )

    def weights(self, heads: tuple[str, ...]) -> dict[str, float]:
        """The weights of the model's heads, normalised to sum to 1."""
        raw = {head: getattr(self, head) for head in heads}
        total = sum(raw.values())
        _check(total > 0, "loss", raw, "weights whose sum over the model's heads is > 0")
        return {head: weight / total for head, weight in raw.items()}


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    amp: str = "auto"
    device: str = "auto"
    seed: int = 0
    steps_per_epoch: int | None = None
    """Cap on training steps per epoch, for smoke runs; None = one pass over the data."""
    max_failures: int = 2
    """Worker failures a trial survives, each time restarting from its last checkpoint."""
    channels_last: bool = False
    """Channels-last (NHWC) model and batches: faster convolutions on some GPUs (README, Performance)."""
    compile: bool | str = "auto"
    """torch.compile the training step's model: true, false, or auto (where it earns back its
    compile time: a GPU trial of enough steps; README, "Compiled models"). Trials of a sweep
    share compiled code on each node, so only an encoder's first trial compiles from scratch."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", self.epochs, ">= 1")
        _check(self.max_failures >= 0, "train.max_failures", self.max_failures, ">= 0")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, ">= 1")
        _check(self.lr > 0, "train.lr", self.lr, "> 0")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        _check(self.grad_clip > 0, "train.grad_clip", self.grad_clip, "> 0")
        _check(self.amp in AMP_MODES, "train.amp", self.amp, AMP_MODES)
        _check(self.device in DEVICES, "train.device", self.device, DEVICES)
        _check(self.compile in (True, False, "auto"), "train.compile", self.compile, "true, false or auto")
        _check(
            self.steps_per_epoch is None or self.steps_per_epoch >= 1,
            "train.steps_per_epoch",
            self.steps_per_epoch,
            "null or >= 1",
        )


@dataclass(frozen=True)
class SweepConfig:
    mode: str = "search"
    """search: Optuna TPE + early stopping; fair: every encoder with the same config and N seeds."""
    encoders: tuple[str, ...] = ("tu-test_convnext", "tu-test_resnet")
    trials: int = 4
    """search: number of trials. fair: ignored (encoders x seeds)."""
    seeds: int = 1
    """fair: seeds per encoder."""
    batch_sizes: tuple[int, ...] = (4, 8)
    encoder_max_batch: dict[str, int] = field(default_factory=dict)
    """Largest batch per encoder ({segformer_b3: 32}), keyed as in sweep.encoders, for encoders
    that need more memory per image than the others. A trial of such an encoder trains at this
    batch instead of a larger one, with the learning rate scaled by the same ratio (the seeds'
    rule: lr x batch / reference batch). Entries for encoders not in the sweep are ignored."""
    lr_min: float = 3e-4
    lr_max: float = 3e-3
    search_loss_weights: bool = True
    search_loss_kinds: tuple[str, ...] = ()
    """search: loss.kind values to choose from per trial; empty = loss.kind in every trial."""
    search_class_weights: tuple[str, ...] = ()
    """search: loss.class_weights values to choose from per trial; empty = loss.class_weights in every trial."""
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    metric: str = "val/miou_fine"
    objectives: tuple[str, ...] = ()
    """search: two or more of ``OBJECTIVES`` (miou_fine, img_per_s, ...) for Optuna's
    multi-objective sampler; the report marks the trials on their Pareto front. Empty: the
    search maximises ``metric`` alone."""
    seed: int = 0

    def scaled_batch(self, encoder: str, batch_size: int, lr: float) -> tuple[int, float]:
        """(batch, lr) for a trial of ``encoder`` asked to train at ``batch_size`` and ``lr``:
        capped at the encoder's ``encoder_max_batch``, with lr scaled by the same ratio."""
        cap = self.encoder_max_batch.get(encoder, batch_size)
        if cap >= batch_size:
            return batch_size, lr
        return cap, lr * cap / batch_size

    @property
    def stops_trials_early(self) -> bool:
        """Whether ASHA may end a trial before its last epoch (a search with the asha scheduler)."""
        return self.mode == "search" and self.scheduler == "asha"

    def __post_init__(self) -> None:
        _check(self.mode in SWEEP_MODES, "sweep.mode", self.mode, SWEEP_MODES)
        _check(len(self.encoders) > 0, "sweep.encoders", list(self.encoders), "a non-empty list of encoder names")
        _check(self.trials >= 1, "sweep.trials", self.trials, ">= 1")
        _check(self.seeds >= 1, "sweep.seeds", self.seeds, ">= 1")
        _check(
            len(self.batch_sizes) > 0 and min(self.batch_sizes) >= 1,
            "sweep.batch_sizes",
            list(self.batch_sizes),
            "a non-empty list of sizes >= 1",
        )
        for encoder, batch in self.encoder_max_batch.items():
            _check(batch >= 1, f"sweep.encoder_max_batch.{encoder}", batch, ">= 1")
        _check(0 < self.lr_min <= self.lr_max, "sweep.lr_min", self.lr_min, f"> 0 and <= sweep.lr_max ({self.lr_max})")
        for name, choices, allowed in (
            ("search_loss_kinds", self.search_loss_kinds, LOSS_KINDS),
            ("search_class_weights", self.search_class_weights, CLASS_WEIGHTINGS),
        ):
            _check(
                set(choices) <= set(allowed) and len(set(choices)) == len(choices),
                f"sweep.{name}",
                list(choices),
                f"a list of distinct values from {list(allowed)} (empty: not searched)",
            )
        _check(self.scheduler in SCHEDULERS, "sweep.scheduler", self.scheduler, SCHEDULERS)
        if self.objectives:
            _check(
                set(self.objectives) <= set(OBJECTIVES) and len(set(self.objectives)) == len(self.objectives) >= 2,
                "sweep.objectives",
                list(self.objectives),
                f"two or more distinct names from {list(OBJECTIVES)}",
            )
            _check(
                self.mode == "search",
                "sweep.objectives",
                list(self.objectives),
                "sweep.mode = search (fair mode searches nothing)",
            )
            _check(
                self.scheduler == "none",
                "sweep.objectives",
                list(self.objectives),
                "sweep.scheduler = none: ASHA stops trials on one metric and cannot weigh several",
            )
        _check(self.grace_period >= 1, "sweep.grace_period", self.grace_period, ">= 1")
        _check(self.reduction_factor >= 2, "sweep.reduction_factor", self.reduction_factor, ">= 2")
        _check(
            self.metric in ("val/miou_fine", "val/miou_coarse", "val/miou_binary")
            or self.metric.startswith("val/iou/"),
            "sweep.metric",
            self.metric,
            "a maximised validation metric: val/miou_fine, val/miou_coarse, val/miou_binary or val/iou/<class>",
        )


@dataclass(frozen=True)
class ResourcesConfig:
    workers_per_trial: int = 1
    """Ray Train workers (DDP ranks) per trial."""
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | str = 0.0
    """Fractions below 1 pack several trials onto one GPU; ``auto``: by the GPU's memory, the
    node's CPUs and an earlier sweep's GPU busy share (``gpu_memory.resolve_gpu_packing``)."""
    gpu_memory_gb: float | None = None
    """Memory of one GPU, to refuse batch sizes that cannot fit before the sweep starts."""
    gpu_memory_margin: float = 0.0
    """The share of a trial's GPU memory the memory check keeps free: for the estimate's
    error, the display and the allocator's fragmentation on a small GPU."""
    node_cpus: int = 2
    node_gpus: int = 0
    node_memory_gb: int = 8
    """The node a profile is written for: cluster/submit.sh asks SLURM for this much per node."""
    trainer: str = "ray_train"
    """``ray_train``: each trial fits a Ray Train TorchTrainer (Train's dashboard view, worker
    restarts, DDP). ``in_process``: a one-worker trial trains in its Tune process, which saves
    Train's start-up per trial (seconds): worth it only where trials are that short."""
    gpu_arch: str | None = None
    """The GPUs' architecture (``sm_70`` for a V100S): checked against the torch build's
    list before a job is queued, where no GPU need be visible."""

    def __post_init__(self) -> None:
        _check(self.workers_per_trial >= 1, "resources.workers_per_trial", self.workers_per_trial, ">= 1")
        _check(self.trainer in TRAINERS, "resources.trainer", self.trainer, " or ".join(TRAINERS))
        _check(
            self.trainer == "ray_train" or self.workers_per_trial == 1,
            "resources.trainer",
            self.trainer,
            f"ray_train with resources.workers_per_trial = {self.workers_per_trial} (DDP runs under Ray Train)",
        )
        _check(
            self.gpu_arch is None or re.fullmatch(r"sm_\d{2,3}", self.gpu_arch) is not None,
            "resources.gpu_arch",
            self.gpu_arch,
            "a CUDA architecture such as sm_70 (V100), sm_86 (RTX 30xx) or sm_90 (H100)",
        )
        _check(self.node_cpus >= 1, "resources.node_cpus", self.node_cpus, ">= 1")
        _check(self.node_gpus >= 0, "resources.node_gpus", self.node_gpus, ">= 0")
        _check(self.node_memory_gb >= 1, "resources.node_memory_gb", self.node_memory_gb, ">= 1")
        _check(self.cpus_per_worker > 0, "resources.cpus_per_worker", self.cpus_per_worker, "> 0")
        _check(
            0 <= self.gpu_memory_margin < 1, "resources.gpu_memory_margin", self.gpu_memory_margin, "0 <= margin < 1"
        )
        gpus = self.gpus_per_worker
        _check(
            gpus == "auto" or (not isinstance(gpus, str) and gpus >= 0 and (gpus <= 1 or gpus == int(gpus))),
            "resources.gpus_per_worker",
            gpus,
            "auto, a fraction <= 1 or a whole number",
        )


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def __post_init__(self) -> None:
        self.loss.weights(self.model.heads)
        if self.model.arch == "upernet":
            _check(
                self.train.batch_size >= 2,
                "train.batch_size",
                self.train.batch_size,
                ">= 2 with model.arch=upernet (its pyramid pooling BatchNorm needs 2+ samples)",
            )
            _check(
                min(self.sweep.batch_sizes) >= 2,
                "sweep.batch_sizes",
                list(self.sweep.batch_sizes),
                "sizes >= 2 with model.arch=upernet (its pyramid pooling BatchNorm needs 2+ samples)",
            )
            for encoder, batch in self.sweep.encoder_max_batch.items():
                _check(
                    batch >= 2,
                    f"sweep.encoder_max_batch.{encoder}",
                    batch,
                    ">= 2 with model.arch=upernet (its pyramid pooling BatchNorm needs 2+ samples)",
                )

    def replace(self, **sections: dict[str, Any]) -> Config:
        """A copy with some fields of some sections changed, validated like a loaded config."""
        return from_dict(deep_merge(to_dict(self), sections))


@dataclass(frozen=True)
class SweepRequest:
    """One invocation of the sweep: the config plus where it runs and logs."""

    cfg: Config
    profile: str
    profile_file: Path
    name: str
    results: Path
    workspace: Path
    tracking_uri: str
    address: str | None = None
    resume: bool = False
    verbose: bool = False


def _check(ok: bool, name: str, value: object, allowed: object) -> None:
    if not ok:
        raise UserError(f"config field {name} = {value!r} is invalid: expected {allowed}.")


def from_dict(raw: dict[str, Any], where: str = "config") -> Config:
    return build(Config, raw, where, "")
