"""Device, AMP and memory decisions, made once at start-up with clear errors."""

from __future__ import annotations

import os
import re
import resource
import sys
from pathlib import Path

import torch

from artefact.errors import UserError

CUDA12_INSTALL = "make install TORCH=cu126"
"""A CUDA 12.6 build of the pinned torch, for GPUs older than the default build covers (a V100)."""
NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")
"""Present wherever an NVIDIA kernel driver is loaded, whatever torch thinks of it."""


def select_device(name: str, gpus_per_worker: float = 0.0) -> torch.device:
    """The trial's device. A trial given GPUs (``gpus_per_worker``) never falls back to the
    CPU: hours of CPU training in place of minutes on the GPU is a failure, not a default."""
    if (name == "cuda" or gpus_per_worker > 0) and not torch.cuda.is_available():
        raise UserError(
            f"train.device = {name!r}, resources.gpus_per_worker = {gpus_per_worker:g}, but CUDA is not usable"
            f" in this process: {cuda_unusable_reason()}."
        )
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


def cuda_unusable_reason() -> str:
    """Why ``torch.cuda.is_available()`` is False here, with what to install, in one line."""
    if torch.version.cuda is None:
        return f"this torch {torch.__version__} is built without CUDA; reinstall it: make install (or {CUDA12_INSTALL})"
    try:
        driver_text = NVIDIA_DRIVER_FILE.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "no NVIDIA GPU or driver is visible; run it on a GPU node, or use --profile cpu-smoke"
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1", "NoDevFiles"):
        return "CUDA_VISIBLE_DEVICES hides every GPU (a SLURM job without --gres=gpu?)"
    version = re.search(r"\b\d+\.\d+(?:\.\d+)?\b", driver_text)
    driver = f"the NVIDIA driver {version.group()}" if version else "the NVIDIA driver"
    return (
        f"{driver} does not work with torch {torch.__version__}'s CUDA {torch.version.cuda} ({_cuda_init_error()});"
        f" if it is too old, update it or install a build for an older CUDA: {CUDA12_INSTALL}"
    )


def _cuda_init_error() -> str:
    """torch's own first line on why CUDA does not start (a driver too old, no device, ...)."""
    try:
        torch.cuda.init()
    except Exception as error:  # torch raises RuntimeError or its own AssertionError here
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return "torch starts CUDA but sees no device"


def check_cuda_usable(gpus_per_worker: float, profile: str) -> None:
    """A profile that asks for GPUs, run where CUDA does not work, would wait for GPUs that
    never come; its pre-flight check says so instead."""
    if gpus_per_worker == 0 or torch.cuda.is_available():
        return
    raise UserError(
        f"profile {profile} asks for GPUs (resources.gpus_per_worker = {gpus_per_worker:g}) but CUDA is not usable"
        f" here: {cuda_unusable_reason()}."
    )


def arch_supported(arch: str, arch_list: list[str]) -> bool:
    """Whether a build compiled for ``arch_list`` runs on ``arch`` (``sm_89``): kernels for its
    own architecture or an earlier one of the same major version (an sm_86 kernel runs on
    sm_89), or PTX for any earlier architecture, which the driver compiles for it."""
    major, minor = divmod(int(arch.removeprefix("sm_")), 10)
    for built in arch_list:
        kind, _, number = built.partition("_")
        found = re.match(r"\d+", number)
        if found is None:
            continue
        built_major, built_minor = divmod(int(found.group()), 10)
        if kind == "sm" and built_major == major and built_minor <= minor:
            return True
        if kind == "compute" and (built_major, built_minor) <= (major, minor):
            return True
    return False


def _unsupported(what: str, arch: str) -> str:
    arch_list = torch.cuda.get_arch_list()
    built = f"supports only {', '.join(arch_list)}" if arch_list else "is built without CUDA"
    return (
        f"{what} is {arch}, but this torch {torch.__version__} (CUDA {torch.version.cuda}) {built}."
        f" Install a build for it: {CUDA12_INSTALL} covers sm_50 to sm_90, the default build sm_75 and newer."
    )


def check_gpu_supported(device: torch.device) -> None:
    """A V100 (sm_70) under a CUDA 13 build fails deep inside the first kernel; fail here instead."""
    major, minor = torch.cuda.get_device_capability(device)
    arch = f"sm_{major}{minor}"
    if not arch_supported(arch, torch.cuda.get_arch_list()):
        raise UserError(_unsupported(f"the GPU {torch.cuda.get_device_name(device)}", arch))


def check_arch_built(gpu_arch: str | None) -> None:
    """The profile's GPUs (``resources.gpu_arch``) against this torch build, where no GPU need
    be visible: on a login node, before a job waits hours in the queue to fail."""
    if gpu_arch is not None and not arch_supported(gpu_arch, torch.cuda.get_arch_list()):
        raise UserError(_unsupported("resources.gpu_arch of this profile", gpu_arch))


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on sm_80+, fp16 (with a GradScaler) on sm_70 and sm_75, whose tensor cores
    take fp16 only; off on older GPUs (no tensor cores: fp16 saves nothing) and on the CPU."""
    if mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if mode == "bf16":
        if capability is not None and capability[0] < 8:
            raise UserError("train.amp = 'bf16' needs an sm_80+ GPU (a V100 has no useful bf16); use fp16 or auto.")
        return torch.bfloat16
    if capability is None or capability[0] < 7:
        return None
    return torch.bfloat16 if capability[0] >= 8 else torch.float16


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
