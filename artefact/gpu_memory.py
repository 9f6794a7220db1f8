"""GPU memory: a trial's training memory, estimated on PyTorch's meta device (no weights, no
compute: one forward pass counts the bytes autograd saves for the backward pass), so that an
impossible batch size fails in seconds instead of as an out-of-memory error an hour into the
sweep; and, for ``resources.gpus_per_worker: auto``, how many trials share one GPU.
"""

from __future__ import annotations

import math

import torch

from artefact.config import Config, ModelConfig
from artefact.errors import Problems, UserError
from artefact.gpu_busy import BUSY_GOAL, BusyMeasurement
from artefact.models import count_parameters, meta_model

OPTIMISER_COPIES = 4
"""fp32 weights, gradients and AdamW's two moments."""
CUDA_OVERHEAD_GB = 0.75
"""CUDA context, cuDNN workspaces and allocator slack, measured loosely."""


def estimate_training_gb(model_cfg: ModelConfig, resolution: int, batch_size: int, amp: bool) -> float:
    """Estimated peak training memory in GB for one worker."""
    saved = 0

    def count(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    model = meta_model(model_cfg, resolution)
    # Two images, not one: in training mode UPerNet's pooled BatchNorm refuses a batch of one.
    with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        model(torch.zeros(2, 3, resolution, resolution))
    activations = saved / 2 * (0.5 if amp else 1.0) * batch_size
    return (count_parameters(model) * 4 * OPTIMISER_COPIES + activations) / 2**30 + CUDA_OVERHEAD_GB


def largest_batch_need(cfg: Config, encoder: str) -> tuple[int, float]:
    """(the largest batch ``encoder`` trains at in this sweep, the GB that batch needs)."""
    asked = max(cfg.sweep.batch_sizes) if cfg.sweep.mode == "search" else cfg.train.batch_size
    batch, _ = cfg.sweep.scaled_batch(encoder, asked, cfg.train.lr)
    model = ModelConfig(cfg.model.arch, encoder, cfg.model.heads, False)
    return batch, estimate_training_gb(model, cfg.data.resolution, batch, cfg.train.amp != "off")


def check_fits(cfg: Config) -> None:
    """Refuse a sweep whose largest batch cannot fit the profile's share of a GPU (one line
    per encoder that does not fit)."""
    res = cfg.resources
    if res.gpu_memory_gb is None or res.gpus_per_worker == 0:
        return
    share = res.gpu_memory_gb * min(1.0, res.gpus_per_worker) * (1 - res.gpu_memory_margin)
    margin = f", less a margin of {res.gpu_memory_margin:.0%}" if res.gpu_memory_margin else ""
    problems = Problems()
    for encoder in cfg.sweep.encoders:
        with problems.check():  # every encoder that does not fit, not only the first
            batch, need = largest_batch_need(cfg, encoder)
            if need > share:
                raise UserError(
                    f"batch size {batch} with {encoder} ({cfg.model.arch}, {cfg.data.resolution} px) needs about"
                    f" {need:.1f} GB, but each trial gets {share:.1f} GB (resources.gpu_memory_gb ="
                    f" {res.gpu_memory_gb} x gpus_per_worker = {res.gpus_per_worker}{margin}). Lower"
                    f" sweep.batch_sizes / train.batch_size (or sweep.encoder_max_batch.{encoder}) or"
                    " data.resolution, or give each trial more of a GPU."
                )
    problems.raise_any()


MAX_TRIALS_PER_GPU = 4
"""The most trials ``gpus_per_worker: auto`` packs onto one GPU until a sweep of the same
shape has measured how busy its GPUs were (``gpu_busy.latest_busy``)."""


def resolve_gpu_packing(cfg: Config, measured: BusyMeasurement | None = None) -> tuple[Config, str | None]:
    """``resources.gpus_per_worker: auto`` made a number: 1 / (trials per GPU), as many as
    fit the GPU's memory (less the margin) at the sweep's largest batch, as the node's CPUs
    allow (``node_cpus / node_gpus / cpus_per_worker``), and as keep the GPU ``BUSY_GOAL``
    busy by an earlier sweep's ``measured`` busy share (without one, at most
    ``MAX_TRIALS_PER_GPU``). Returns the config and a line saying what was chosen and why
    (None: nothing to resolve)."""
    res = cfg.resources
    if res.gpus_per_worker != "auto":
        return cfg, None
    if res.gpu_memory_gb is None or res.node_gpus < 1:
        raise UserError(
            "resources.gpus_per_worker = auto packs trials onto GPUs by memory: it needs"
            f" resources.gpu_memory_gb (one GPU's memory; now {res.gpu_memory_gb}) and resources.node_gpus >= 1"
            f" (now {res.node_gpus}); set them, or set gpus_per_worker to a number."
        )
    if res.workers_per_trial > 1:
        return cfg.replace(
            resources={"gpus_per_worker": 1.0}
        ), "resources.gpus_per_worker = auto: 1 (a DDP worker takes a whole GPU)"
    try:
        needs = {encoder: largest_batch_need(cfg, encoder) for encoder in cfg.sweep.encoders}
    except UserError:  # an unknown encoder: the preflight names it with the others' problems
        return cfg.replace(resources={"gpus_per_worker": 1.0}), None
    encoder = max(needs, key=lambda name: needs[name][1])
    batch, need = needs[encoder]
    usable = res.gpu_memory_gb * (1 - res.gpu_memory_margin)
    by_memory = math.floor(usable / need)
    by_cpus = math.floor(res.node_cpus / res.node_gpus / res.cpus_per_worker)
    if measured is None:
        by_busy = MAX_TRIALS_PER_GPU
        busy_reason = f"at most {MAX_TRIALS_PER_GPU} until a sweep like this one has measured how busy its GPUs were"
    else:
        by_busy, wanted = measured.trials_for_goal(), measured.trials_wanted()
        busy_reason = (
            f"sweep {measured.sweep} kept its GPUs {measured.busy:.0%} busy with {measured.trials_per_gpu:g} per GPU;"
            f" {wanted} per GPU would keep them {BUSY_GOAL:.0%} busy"
            + ("" if wanted == by_busy else f", and auto at most doubles a measured packing: {by_busy}")
        )
    trials = max(1, min(by_memory, by_cpus, by_busy))
    share = math.floor(10_000 / trials) / 10_000  # Ray counts GPU fractions to 1e-4
    return cfg.replace(resources={"gpus_per_worker": share}), (
        f"resources.gpus_per_worker = auto: {share:g} ({trials} trial(s) per GPU; {encoder} at batch {batch} needs"
        f" about {need:.1f} GB of {usable:.1f} GB, room for {by_memory}; the node's CPUs allow {by_cpus};"
        f" {busy_reason})"
    )
