"""Estimate a trial's GPU memory before a sweep starts, so an impossible batch size
fails in seconds instead of as an out-of-memory error an hour into the sweep.

The model is built on PyTorch's meta device (no weights, no compute) and one forward
pass counts the bytes autograd saves for the backward pass.
"""

from __future__ import annotations

import torch

from artefact.config import Config, ModelConfig
from artefact.errors import Problems, UserError
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


def check_fits(cfg: Config) -> None:
    """Refuse a sweep whose largest batch cannot fit the profile's share of a GPU (one line
    per encoder that does not fit)."""
    res = cfg.resources
    if res.gpu_memory_gb is None or res.gpus_per_worker == 0:
        return
    share = res.gpu_memory_gb * min(1.0, res.gpus_per_worker)
    asked = max(cfg.sweep.batch_sizes) if cfg.sweep.mode == "search" else cfg.train.batch_size
    problems = Problems()
    for encoder in cfg.sweep.encoders:
        with problems.check():  # every encoder that does not fit, not only the first
            batch, _ = cfg.sweep.scaled_batch(encoder, asked, cfg.train.lr)
            model = ModelConfig(cfg.model.arch, encoder, cfg.model.heads, False)
            need = estimate_training_gb(model, cfg.data.resolution, batch, cfg.train.amp != "off")
            if need > share:
                raise UserError(
                    f"batch size {batch} with {encoder} ({cfg.model.arch}, {cfg.data.resolution} px) needs about"
                    f" {need:.1f} GB, but each trial gets {share:.1f} GB (resources.gpu_memory_gb ="
                    f" {res.gpu_memory_gb} x gpus_per_worker = {res.gpus_per_worker}). Lower sweep.batch_sizes /"
                    f" train.batch_size (or sweep.encoder_max_batch.{encoder}) or data.resolution, or give each"
                    " trial more of a GPU."
                )
    problems.raise_any()
