"""Whether a run compiles its model (``train.compile``), and where compiled code is kept so
that a sweep's later trials of an encoder load it instead of compiling again.

Measured (docs/performance.md, "Compiled models"): on an H100, UNet-ConvNeXt-T at 384 px,
batch 32, channels-last, bf16, a compiled step took 47 ms instead of 70 (+47% img/s; +88% over
the eager layout), for about a minute of compiling at the first step. On 2 CPU cores, with
the tiny test encoder at 64 px, batch 32: 56 s to compile cold, 2.6 s with a warm cache, for
steps 6% faster.
"""

from __future__ import annotations

import getpass
import importlib.util
import os
import re
import tempfile
from pathlib import Path

import torch

COLD_COMPILE_S = 60.0
"""The first compiled step's extra time on an H100 (UNet-ConvNeXt-T, 384 px, batch 32)."""
IMAGE_SAVING_S = 1 / 460 - 1 / 675
"""Training time a compiled model saves per image there: 460 img/s eager, 675 compiled."""
BREAK_EVEN_IMAGES = round(COLD_COMPILE_S / IMAGE_SAVING_S)
"""Training images a trial needs before a cold compile has paid for itself: about 87,000.
A trial of any shipped profile plans about 33,000 (660 crops x 50 epochs on ARTeFACT), and
ASHA stops most trials sooner, so ``auto`` leaves them eager: see the README's "Compiled
models" for when ``true`` pays, with the compile cache warm."""
TRITON_MIN_CAPABILITY = (7, 0)
"""Inductor's GPU kernels need Triton, which builds for compute capability 7.0 (V100) and
up; the installed Triton 3.8 bundles ptxas 12.9, which still targets sm_70."""


def compiles(setting: bool | str, device: torch.device, planned_images: int) -> bool:
    """``train.compile`` resolved for a run that trains on ``planned_images`` images on ``device``.

    ``auto`` compiles only a CUDA run with Triton for its GPU and at least
    ``BREAK_EVEN_IMAGES`` images. Never on the CPU, where compiling costs a minute (2 cores)
    for steps a few percent faster.
    """
    if setting != "auto":
        return bool(setting)
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return False
    if torch.cuda.get_device_capability(device) < TRITON_MIN_CAPABILITY:
        return False
    return planned_images >= BREAK_EVEN_IMAGES


def compile_cache_folder(sweep: str) -> Path:
    """The sweep's compiled-code folder on this node: node-local (Inductor's cache is many
    small files, slow on a shared file system) and per user and sweep."""
    try:
        user = re.sub(r"[^A-Za-z0-9_.-]", "_", getpass.getuser())
    except (KeyError, OSError):  # a container's uid without a name
        user = f"uid{os.getuid()}"
    return Path(tempfile.gettempdir()) / f"artefact-compiled-{user}" / sweep


def use_compile_cache(folder: Path) -> None:
    """Point TorchInductor's cache (FX graphs, AOTAutograd graphs, Triton and C++ kernels) at
    ``folder``, which Inductor makes when it first compiles; it reads the variable whenever it
    compiles, so this process and the processes it starts afterwards share it."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
