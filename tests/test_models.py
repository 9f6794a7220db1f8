"""Model construction: output shapes for every arch x head set, fixed-size encoders, aliases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from builders import small_config

from artefact.config import ModelConfig
from artefact.errors import UserError
from artefact.gpu_memory import estimate_training_gb
from artefact.models import (
    ENCODER_ALIASES,
    build_model,
    count_parameters,
    forward_gflop,
    resolve_encoder,
    smp_native_encoders,
)
from artefact.train.loop import train
from artefact.train.reporters import LocalReporter

CLASSES = {"binary": 2, "coarse": 4, "fine": 16}
TINY = ("tu-test_convnext", "tu-test_resnet", "tu-test_coatnet", "tu-test_maxvit")


@pytest.mark.parametrize("encoder", TINY)
@pytest.mark.parametrize("arch", ["unet", "upernet"])
@pytest.mark.parametrize("heads", [("fine",), ("binary", "coarse", "fine")], ids=["fine", "three-heads"])
def test_output_shapes(encoder: str, arch: str, heads: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, encoder=encoder, heads=heads), 64)
    model.train()  # UPerNet's BatchNorm on 1x1 maps needs a batch of 2 in training mode
    outputs = model(torch.randn(2, 3, 64, 64))
    assert list(outputs) == list(heads)
    for head, logits in outputs.items():
        assert logits.shape == (2, CLASSES[head], 64, 64), head
        assert torch.isfinite(logits).all()
    sum(logits.mean() for logits in outputs.values()).backward()
    assert all(p.grad is not None for p in model.heads.parameters()), "every head is trained"


@pytest.mark.parametrize(("encoder", "resolution"), [("tu-test_coatnet", 96), ("tu-test_maxvit", 128)])
def test_fixed_size_encoder_at_a_non_default_resolution(encoder: str, resolution: int) -> None:
    """Fixed-size encoders must be built for the resolution; the model then takes exactly that size."""
    assert timm.get_pretrained_cfg(encoder.removeprefix("tu-")).fixed_input_size
    plain = smp.Unet(encoder, encoder_weights=None, classes=16).eval()
    with pytest.raises((RuntimeError, AssertionError)), torch.no_grad():
        plain(torch.zeros(1, 3, resolution, resolution))  # what happens without img_size

    model = build_model(ModelConfig(encoder=encoder, heads=("binary", "fine")), resolution).eval()
    with torch.no_grad():
        outputs = model(torch.zeros(2, 3, resolution, resolution))
        assert outputs["fine"].shape == (2, 16, resolution, resolution)
        assert outputs["binary"].shape == (2, 2, resolution, resolution)
        with pytest.raises((RuntimeError, AssertionError)):
            model(torch.zeros(1, 3, resolution + 32, resolution + 32))


def test_heads_are_separate_modules_sharing_encoder_and_decoder() -> None:
    one = build_model(ModelConfig(heads=("fine",)), 64)
    three = build_model(ModelConfig(heads=("binary", "coarse", "fine")), 64)
    assert set(three.heads) == {"binary", "coarse", "fine"}
    extra = count_parameters(three) - count_parameters(one)
    head_params = sum(count_parameters(three.heads[h]) for h in ("binary", "coarse"))
    assert extra == head_params > 0
    assert count_parameters(one) == sum(p.numel() for p in one.parameters())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("convnext_tiny", "tu-convnext_tiny"),
        ("swin_tiny", "tu-swin_tiny_patch4_window7_224"),
        ("coatnet_0", "tu-coatnet_0_rw_224"),
        ("maxvit_tiny", "tu-maxvit_tiny_tf_224"),
        ("test_convnext", "tu-test_convnext"),
        ("tu-test_resnet", "tu-test_resnet"),
        ("tu-convnext_tiny.fb_in1k", "tu-convnext_tiny.fb_in1k"),
        ("segformer_b3", "mit_b3"),
        ("mit_b0", "mit_b0"),
        ("efficientnet-b0", "efficientnet-b0"),
        ("resnet50", "tu-resnet50"),  # in both lists: timm's, as before SMP's own were accepted
    ],
)
def test_encoder_names_resolve(name: str, expected: str) -> None:
    assert resolve_encoder(name) == expected


def test_every_alias_is_a_timm_model_or_an_smp_encoder() -> None:
    for target in ENCODER_ALIASES.values():
        assert timm.is_model(target.removeprefix("tu-")) or target in smp_native_encoders()


def test_a_typo_of_an_smp_encoder_gets_close_matches_from_its_list() -> None:
    with pytest.raises(UserError, match=r"'mit_b9' is neither a timm model nor an SMP encoder\. Close matches: mit_b"):
        resolve_encoder("mit_b9")


def test_smp_encoders_are_costed_on_the_meta_device() -> None:
    """SMP's MiT cannot be built on the meta device; its cost model is built on the CPU instead."""
    model = ModelConfig("unet", "segformer_b0", ("fine",), False)
    assert forward_gflop(model, 128) == pytest.approx(4 * forward_gflop(model, 64), rel=0.05)
    assert estimate_training_gb(model, 64, 8, amp=True) > estimate_training_gb(model, 64, 1, amp=True)


@pytest.mark.slow
def test_an_smp_native_encoder_trains_for_an_epoch(tmp_path: Path, synthetic_cache: Path) -> None:
    """SegFormer's MiT-B0 (SMP's own encoder, not timm's) under the real loop, three heads."""
    cfg = small_config(model={"encoder": "mit_b0", "heads": ["binary", "coarse", "fine"]}, train={"epochs": 1})
    reporter = LocalReporter(tmp_path, log=lambda *_: None)
    final = train(cfg, synthetic_cache, reporter)
    assert final["epoch"] == 1 and math.isfinite(final["train/loss"])
    assert final["model/params"] == count_parameters(build_model(cfg.model, cfg.data.resolution))
    assert 0.0 <= final["val/miou_fine"] <= 1.0


def test_local_pretrained_weights_file_is_loaded(tmp_path: Path) -> None:
    state = timm.create_model("test_convnext", pretrained=False).state_dict()
    state = {k: torch.full_like(v, 0.125) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, tmp_path / "weights.pth")
    model = build_model(ModelConfig(encoder="tu-test_convnext", pretrained=str(tmp_path / "weights.pth")), 64)
    values = torch.cat([p.detach().flatten() for p in model.encoder.parameters()])
    assert torch.all(values == 0.125)
    with pytest.raises(UserError, match="no such weights file"):
        build_model(ModelConfig(pretrained=str(tmp_path / "missing.pth")), 64)


def test_a_weights_file_of_another_model_is_refused_not_silently_skipped(tmp_path: Path) -> None:
    """timm loads a feature extractor's file leniently: another model's keys would only be logged."""
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(UserError, match=r"do not fit encoder tu-test_convnext \(only 0 of the 101 keys"):
        build_model(ModelConfig(encoder="tu-test_convnext", pretrained=str(tmp_path / "resnet.pth")), 64)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights from it"):
        build_model(ModelConfig(encoder="tu-test_convnext", pretrained=str(tmp_path / "junk.pth")), 64)


REAL = [
    ("convnext_tiny", 31.9e6),
    ("swin_tiny", 31.6e6),
    ("coatnet_0", 30.8e6),
    ("maxvit_tiny", 33.3e6),
]


@pytest.mark.slow
@pytest.mark.parametrize(("alias", "params"), REAL, ids=[a for a, _ in REAL])
def test_real_encoders_build_at_256(alias: str, params: float) -> None:
    model = build_model(ModelConfig(arch="unet", encoder=alias, heads=("fine",), pretrained=False), 256).eval()
    assert count_parameters(model) == pytest.approx(params, rel=0.02)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 256, 256))["fine"].shape == (1, 16, 256, 256)


@pytest.mark.parametrize("arch", ["unet", "upernet"])
def test_costs_are_counted_on_the_meta_device_for_both_architectures(arch: str) -> None:
    model = ModelConfig(arch, "tu-test_convnext", ("binary", "coarse", "fine"), False)
    small, large = forward_gflop(model, 64), forward_gflop(model, 128)
    assert small > 0 and large == pytest.approx(4 * small, rel=0.05)  # FLOP grow with the pixel count
    one, eight = estimate_training_gb(model, 64, 1, amp=True), estimate_training_gb(model, 64, 8, amp=True)
    assert eight > one > 0
