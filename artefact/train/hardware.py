"""Device, AMP and memory decisions, made once at start-up with clear errors."""

from __future__ import annotations

import resource
import sys

import torch

from artefact.errors import UserError

V100_INSTALL_HINT = "pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu126"


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA GPU is visible; use device: auto or cpu.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        check_gpu_supported(device)
    return device


def configure_kernels(device: torch.device) -> None:
    """cuDNN autotuning (training crops and validation tiles have fixed sizes) and TF32 for
    the float32 matrix work outside autocast."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


def check_cuda_usable(gpus_per_worker: float, profile: str) -> None:
    """A profile that asks for GPUs, run where CUDA does not work, would wait for GPUs that
    never come; its pre-flight check says so instead."""
    if gpus_per_worker == 0 or torch.cuda.is_available():
        return
    reason = (
        f"this torch {torch.__version__} is built without CUDA"
        if torch.version.cuda is None
        else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU, or no working driver"
    )
    raise UserError(
        f"profile {profile} asks for GPUs (resources.gpus_per_worker = {gpus_per_worker:g}) but CUDA is not usable"
        f" here: {reason}. Run it on a GPU machine, or use --profile cpu-smoke."
    )


def check_gpu_supported(device: torch.device) -> None:
    """A V100 (sm_70) under a CUDA 13 build fails deep inside the first kernel; fail here instead."""
    major, minor = torch.cuda.get_device_capability(device)
    arch_list = torch.cuda.get_arch_list()
    supported = f"sm_{major}{minor}" in arch_list or any(
        a.startswith("compute_") and int(a.removeprefix("compute_")) <= major * 10 + minor for a in arch_list
    )
    if not supported:
        raise UserError(
            f"the GPU {torch.cuda.get_device_name(device)} is sm_{major}{minor}, but this torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}) supports only {', '.join(arch_list)}. "
            f"Install a build for it, e.g. for a V100: {V100_INSTALL_HINT}"
        )


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on sm_80+, fp16 (with a GradScaler) on older GPUs, off on the CPU."""
    if mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16":
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
            raise UserError("train.amp = 'bf16' needs an sm_80+ GPU (a V100 has no useful bf16); use fp16 or auto.")
        return torch.bfloat16
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


PEAK_TFLOPS = {
    "H200": {torch.bfloat16: 989.0, torch.float16: 989.0},
    "H100": {torch.bfloat16: 989.0, torch.float16: 989.0},
    "A100": {torch.bfloat16: 312.0, torch.float16: 312.0},
    "V100S": {torch.float16: 130.0},
    "V100": {torch.float16: 125.0},
}
"""Dense tensor-core peaks from the vendors' data sheets (SXM parts), by device-name substring.
V100S before V100: the first substring found wins."""


def peak_tflops(device_name: str, dtype: torch.dtype | None) -> float | None:
    """The device's peak for ``dtype``; None when the GPU or precision is not in the table."""
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            return peaks.get(dtype)
    return None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """GPU: peak allocated since the last reset. CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
