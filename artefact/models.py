"""``build_model(cfg)``: an SMP architecture on a timm encoder with one to three heads.

The heads share the encoder and decoder; each is SMP's own segmentation head, so a
one-head model is exactly POC-5.8's UNet and a three-head model is POC-5.5's UPerNet.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from artefact.config import ModelConfig
from artefact.errors import UserError
from artefact.taxonomy import HEAD_CLASS_NAMES

ENCODER_ALIASES = {
    "convnext_tiny": "tu-convnext_tiny",
    "swin_tiny": "tu-swin_tiny_patch4_window7_224",
    "coatnet_0": "tu-coatnet_0_rw_224",
    "maxvit_tiny": "tu-maxvit_tiny_tf_224",
}
_ARCHS = {"unet": smp.Unet, "upernet": smp.UPerNet}


def resolve_encoder(name: str) -> str:
    """Alias or bare timm name -> SMP's 'tu-<timm name>', with close matches on a typo."""
    name = ENCODER_ALIASES.get(name, name)
    timm_name = name.removeprefix("tu-")
    if not timm.is_model(timm_name.split(".")[0]):
        candidates = list(dict.fromkeys([*ENCODER_ALIASES, *timm.list_models()]))
        close = difflib.get_close_matches(timm_name, candidates, n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else " See timm.list_models() for the names."
        raise UserError(f"model.encoder = {name!r} is not a timm model.{hint}")
    return f"tu-{timm_name}"


class SegmentationModel(nn.Module):
    """Encoder -> decoder -> {head name: logits at input resolution}."""

    def __init__(self, base: smp.base.SegmentationModel, heads: tuple[str, ...]) -> None:
        super().__init__()
        self.encoder = base.encoder
        self.decoder = base.decoder
        template = base.segmentation_head
        conv, upsample = template[0], template[1]
        scale = int(upsample.scale_factor) if isinstance(upsample, nn.Upsample) else 1
        self.heads = nn.ModuleDict(
            {
                head: template
                if head == "fine"
                else smp.base.SegmentationHead(
                    conv.in_channels, len(HEAD_CLASS_NAMES[head]), kernel_size=conv.kernel_size[0], upsampling=scale
                )
                for head in heads
            }
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        decoded = self.decoder(self.encoder(images))
        return {head: module(decoded) for head, module in self.heads.items()}


def build_model(cfg: ModelConfig, resolution: int) -> SegmentationModel:
    """Build the model for square inputs of ``resolution`` px and check it accepts them."""
    encoder = resolve_encoder(cfg.encoder)
    kwargs: dict = {}
    if isinstance(cfg.pretrained, str):
        weights = Path(cfg.pretrained)
        if not weights.is_file():
            raise UserError(f"model.pretrained = {cfg.pretrained!r}: no such weights file.")
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
    if _takes_img_size(encoder):
        kwargs["img_size"] = resolution
    base = _construct(cfg, encoder, kwargs)
    model = SegmentationModel(base, cfg.heads)
    _check_resolution(model, encoder, resolution)
    return model


def _takes_img_size(encoder: str) -> bool:
    """Fixed-size transformers (Swin, CoAtNet, MaxViT, ViT) are built for one input size."""
    config = timm.get_pretrained_cfg(encoder.removeprefix("tu-").split(".")[0])
    return config is not None and bool(config.fixed_input_size)


def _construct(cfg: ModelConfig, encoder: str, kwargs: dict) -> smp.base.SegmentationModel:
    try:
        return _ARCHS[cfg.arch](
            encoder_name=encoder,
            encoder_weights=True if cfg.pretrained else None,
            classes=len(HEAD_CLASS_NAMES["fine"]),
            **kwargs,
        )
    except (OSError, RuntimeError) as error:
        if cfg.pretrained is True:
            raise UserError(
                f"model.pretrained = true: could not fetch weights for {encoder} ({error}). Without network"
                " access, download them elsewhere and set model.pretrained to the local file, or use false."
            ) from None
        raise UserError(f"model.encoder = {encoder!r}: could not build it with {cfg.arch}: {error}") from None
    except (TypeError, ValueError, AssertionError, KeyError) as error:
        raise UserError(f"model.encoder = {encoder!r} cannot be used with model.arch={cfg.arch}: {error}") from None


def _check_resolution(model: nn.Module, encoder: str, resolution: int) -> None:
    """A dry run at the configured size, so a bad resolution fails before training starts."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, resolution, resolution))
    except (RuntimeError, AssertionError, ValueError) as error:
        raise UserError(
            f"data.resolution = {resolution} does not work with model.encoder = {encoder}: {error}."
            " Choose a resolution the encoder supports (a multiple of 32; windowed transformers may need"
            " a multiple of their window size times 32)."
        ) from None
    finally:
        model.train(was_training)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(cfg: ModelConfig, resolution: int) -> SegmentationModel:
    """The model on PyTorch's meta device: shapes only, no weights and no compute, so
    costs can be counted in a second even for the large encoders.

    Built once per process and shared, so callers run it but never change it: the
    pre-flight checks ask for each encoder twice (GPU memory, checkpoint space), and a
    reused trial process asks for its model's FLOP at every trial."""
    return _shared_meta_model(cfg.arch, cfg.encoder, tuple(cfg.heads), resolution)


@functools.cache
def _shared_meta_model(arch: str, encoder: str, heads: tuple[str, ...], resolution: int) -> SegmentationModel:
    with torch.device("meta"):
        return build_model(ModelConfig(arch, encoder, heads, False), resolution)


TRAINING_FLOP_FACTOR = 3
"""Training costs about 3x the forward pass (forward, backward for inputs and for weights).
FlopCounterMode is not used for the backward pass: it ignores ``groups`` in convolution
backward and counts a depthwise 7x7 convolution as a dense one, which makes UNet-ConvNeXt-T
look like 272 GFLOP per training image at 384 px instead of about 122."""


def forward_gflop(cfg: ModelConfig, resolution: int) -> float:
    """Forward-pass GFLOP per image at ``resolution`` (a multiply-add counts as 2 FLOP)."""
    # Two images in training mode (the shared model stays as built: UPerNet's pooled
    # BatchNorm refuses one image there); convolution and matmul FLOP scale with the batch.
    model = meta_model(cfg, resolution)  # outside the counter: building it may run a probe forward
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model(torch.zeros(2, 3, resolution, resolution))
    return counter.get_total_flops() / 2 / 1e9
