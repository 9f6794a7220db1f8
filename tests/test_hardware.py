"""Device, AMP and CUDA-build decisions on the GPUs users have, with the device's answers
faked: this machine has no GPU, and its torch build (CUDA 13) lacks the V100's sm_70."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from artefact.errors import UserError
from artefact.train import compilation, hardware
from artefact.train.compilation import BREAK_EVEN_IMAGES, compiles
from artefact.train.hardware import (
    amp_dtype,
    arch_supported,
    check_arch_built,
    check_gpu_supported,
    cuda_unusable_reason,
    select_device,
)

CUDA13_BUILD = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
CUDA126_BUILD = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
CUDA = torch.device("cuda")


@pytest.fixture
def gpu(monkeypatch):
    """A fake GPU of a given capability, under a given build's architecture list."""

    def fake(capability: tuple[int, int], arch_list: list[str], name: str = "Fake GPU") -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return fake


@pytest.mark.parametrize(
    ("capability", "gpu_name", "auto", "bf16_ok"),
    [
        ((6, 1), "GTX 1080 (sm_61)", None, False),  # no tensor cores: fp16 would save nothing
        ((7, 0), "V100S (sm_70)", torch.float16, False),
        ((7, 5), "T4 (sm_75)", torch.float16, False),
        ((8, 6), "RTX 3050 (sm_86)", torch.bfloat16, True),
        ((9, 0), "H100 (sm_90)", torch.bfloat16, True),
    ],
    ids=["sm_61", "sm_70", "sm_75", "sm_86", "sm_90"],
)
def test_amp_follows_the_gpu_generation(gpu, capability, gpu_name, auto, bf16_ok) -> None:
    gpu(capability, CUDA126_BUILD, gpu_name)
    assert amp_dtype("auto", CUDA) is auto
    assert amp_dtype("fp16", CUDA) is torch.float16  # forced: the GradScaler path, on any GPU
    assert amp_dtype("off", CUDA) is None
    if bf16_ok:
        assert amp_dtype("bf16", CUDA) is torch.bfloat16
    else:
        with pytest.raises(UserError, match=r"train.amp = 'bf16' needs an sm_80\+ GPU"):
            amp_dtype("bf16", CUDA)


def test_amp_is_off_on_the_cpu_unless_forced() -> None:
    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu) is None
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    assert amp_dtype("fp16", cpu) is torch.float16


@pytest.mark.parametrize(
    ("arch", "build", "runs"),
    [
        ("sm_70", CUDA13_BUILD, False),  # a V100 under PyPI's default build
        ("sm_70", CUDA126_BUILD, True),
        ("sm_61", CUDA13_BUILD, False),
        ("sm_86", CUDA13_BUILD, True),
        ("sm_89", CUDA13_BUILD, True),  # an RTX 40xx or L4 runs the sm_86 kernels of its major version
        ("sm_89", ["sm_75", "sm_90"], False),  # no sm_8x kernels and no PTX to compile them from
        ("sm_89", ["sm_75", "sm_90", "compute_90"], False),  # PTX runs only on its own or newer GPUs
        ("sm_89", ["sm_75", "compute_86"], True),
        ("sm_90", CUDA13_BUILD, True),
        ("sm_120", ["sm_100", "sm_120a"], True),  # suffixed architectures count as their number
    ],
)
def test_a_build_runs_its_own_architectures_and_newer_ones_through_ptx(arch, build, runs) -> None:
    assert arch_supported(arch, build) is runs


def test_a_v100_under_the_default_build_fails_at_start_up_with_the_install_command(gpu) -> None:
    gpu((7, 0), CUDA13_BUILD, "Tesla V100S-PCIE-32GB")
    with pytest.raises(UserError) as refused:
        check_gpu_supported(CUDA)
    message = str(refused.value)
    assert "the GPU Tesla V100S-PCIE-32GB is sm_70" in message
    assert "supports only sm_75, sm_80" in message and "make install TORCH=cu126" in message
    gpu((7, 0), CUDA126_BUILD, "Tesla V100S-PCIE-32GB")
    check_gpu_supported(CUDA)


def test_the_profile_architecture_is_checked_without_a_gpu(monkeypatch) -> None:
    """What cluster/submit.sh relies on, on a login node with no GPU."""
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CUDA13_BUILD)
    with pytest.raises(UserError, match=r"resources.gpu_arch of this profile is sm_70, .* make install TORCH=cu126"):
        check_arch_built("sm_70")
    check_arch_built("sm_86")
    check_arch_built(None)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: [])  # a CPU-only build
    with pytest.raises(UserError, match="is built without CUDA"):
        check_arch_built("sm_86")


def test_each_reason_cuda_is_unusable_is_named_with_its_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "is built without CUDA; reinstall it: make install" in cuda_unusable_reason()

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(hardware, "NVIDIA_DRIVER_FILE", tmp_path / "absent")
    assert cuda_unusable_reason().startswith("no NVIDIA GPU or driver is visible")

    driver = tmp_path / "version"
    monkeypatch.setattr(hardware, "NVIDIA_DRIVER_FILE", driver)
    for line, version in (
        ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023", "535.104.05"),
        ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.14  Release Build", "550.54.14"),
    ):
        driver.write_text(line + "\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
        reason = cuda_unusable_reason()
        assert f"the NVIDIA driver {version} does not work with torch" in reason and "CUDA 13.0" in reason
        assert "make install TORCH=cu126" in reason and "(" in reason  # torch's own words in brackets

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cuda_unusable_reason().startswith("CUDA_VISIBLE_DEVICES hides every GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA is not usable")
def test_a_trial_given_gpus_never_trains_on_the_cpu_instead() -> None:
    with pytest.raises(UserError, match="resources.gpus_per_worker = 0.5, but CUDA is not usable"):
        select_device("auto", gpus_per_worker=0.5)
    with pytest.raises(UserError, match="train.device = 'cuda'"):
        select_device("cuda")
    assert select_device("auto").type == "cpu"  # a CPU profile


@pytest.mark.parametrize(
    ("capability", "triton", "images", "compiled"),
    [
        ((9, 0), True, BREAK_EVEN_IMAGES, True),  # H100/H200, a trial long enough to earn it back
        ((7, 0), True, BREAK_EVEN_IMAGES, True),  # V100S: Triton builds for sm_70
        ((9, 0), True, 50 * 660, False),  # a shipped profile's trial on ARTeFACT: too short to pay
        ((9, 0), False, 10**6, False),  # no Triton: Inductor cannot build GPU kernels
        ((6, 1), True, 10**6, False),  # below Triton's sm_70
    ],
)
def test_compile_auto_compiles_a_long_enough_gpu_trial_that_triton_can_build_for(
    gpu, monkeypatch, capability: tuple[int, int], triton: bool, images: int, compiled: bool
) -> None:
    gpu(capability, CUDA126_BUILD)
    monkeypatch.setattr(compilation.importlib.util, "find_spec", lambda name: object() if triton else None)
    assert compiles("auto", CUDA, images) is compiled


def test_compile_auto_never_compiles_on_the_cpu_and_true_or_false_are_obeyed() -> None:
    cpu = torch.device("cpu")
    assert compiles("auto", cpu, 10**6) is False
    assert compiles(True, cpu, 1) is True
    assert compiles(False, CUDA, 10**6) is False
