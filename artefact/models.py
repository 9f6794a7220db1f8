"""``build_model(cfg)``: an SMP architecture on a timm or SMP encoder with one to three heads.

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
from artefact.errors import UserError, one_line
from artefact.taxonomy import HEAD_CLASS_NAMES

ENCODER_ALIASES = {
    "convnext_tiny": "tu-convnext_tiny",
    "swin_tiny": "tu-swin_tiny_patch4_window7_224",
    "coatnet_0": "tu-coatnet_0_rw_224",
    "maxvit_tiny": "tu-maxvit_tiny_tf_224",
    **{f"segformer_b{size}": f"mit_b{size}" for size in range(6)},
}
_ARCHS = {"unet": smp.Unet, "upernet": smp.UPerNet}


def smp_native_encoders() -> list[str]:
    """SMP's own encoders that timm lacks (SegFormer's ``mit_b*``, ``efficientnet-b*``, ...).

    A name in both lists (``resnet50``) means timm's, as it did before SMP's were accepted;
    SMP's deprecated ``timm-*`` copies are left out: their ``tu-`` names are the same models.
    """
    return [
        name
        for name in smp.encoders.get_encoder_names()
        if not name.startswith(("tu-", "timm-")) and not timm.is_model(name)
    ]


def is_smp_native(encoder: str) -> bool:
    """Whether a resolved encoder name is one of SMP's own rather than a ``tu-`` timm model."""
    return not encoder.startswith("tu-")


def resolve_encoder(name: str) -> str:
    """Alias, bare timm name or SMP encoder -> SMP's name for it: 'tu-<timm name>' or SMP's
    own ('mit_b3'), with close matches from both lists on a typo."""
    name = ENCODER_ALIASES.get(name, name)
    if name in smp_native_encoders():
        return name
    timm_name = name.removeprefix("tu-")
    if not timm.is_model(timm_name.split(".")[0]):
        candidates = list(dict.fromkeys([*ENCODER_ALIASES, *smp_native_encoders(), *timm.list_models()]))
        close = difflib.get_close_matches(timm_name, candidates, n=5, cutoff=0.6)
        hint = (
            f" Close matches: {', '.join(close)}."
            if close
            else " See timm.list_models() and smp.encoders.get_encoder_names() for the names."
        )
        raise UserError(f"model.encoder = {name!r} is neither a timm model nor an SMP encoder.{hint}")
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
    if _takes_img_size(encoder):
        kwargs["img_size"] = resolution
    base = _construct(cfg, encoder, kwargs)
    model = SegmentationModel(base, cfg.heads)
    _check_resolution(model, encoder, resolution)
    return model


def _takes_img_size(encoder: str) -> bool:
    """Fixed-size transformers (Swin, CoAtNet, MaxViT, ViT) are built for one input size;
    SMP's own encoders (SegFormer's MiT included) take any multiple of 32."""
    if is_smp_native(encoder):
        return False
    config = timm.get_pretrained_cfg(encoder.removeprefix("tu-").split(".")[0])
    return config is not None and bool(config.fixed_input_size)


def local_weights_file(pretrained: str) -> Path:
    """``model.pretrained`` given as a path: the weights file, which must exist."""
    path = Path(pretrained)
    if not path.is_file():
        raise UserError(f"model.pretrained = {pretrained!r}: no such weights file.")
    return path


def _construct(cfg: ModelConfig, encoder: str, kwargs: dict) -> smp.base.SegmentationModel:
    """SMP's model with the encoder's pretrained weights: from the Hugging Face cache (timm
    encoders take ``True``, SMP's own 'imagenet') or from a local file (timm reads it through
    ``pretrained_cfg_overlay``; SMP has no such option, so its encoders get it here)."""
    file = local_weights_file(cfg.pretrained) if isinstance(cfg.pretrained, str) else None
    weights: bool | str | None = None
    if is_smp_native(encoder):
        weights = "imagenet" if cfg.pretrained is True else None
    elif cfg.pretrained:
        weights = True
        if file is not None:
            _check_timm_file(file, encoder, kwargs)
            kwargs = {**kwargs, "pretrained_cfg_overlay": {"file": str(file)}}
    try:
        base = _ARCHS[cfg.arch](
            encoder_name=encoder, encoder_weights=weights, classes=len(HEAD_CLASS_NAMES["fine"]), **kwargs
        )
    except (OSError, RuntimeError) as error:
        reason = one_line(error)
        if file is not None:
            raise UserError(f"model.pretrained = {cfg.pretrained!r}: cannot load it into {encoder}: {reason}") from None
        if cfg.pretrained is True:
            from artefact.weights import check_cached  # it imports this module

            check_cached({encoder: encoder})  # not cached (and no network): the fetch command
            raise UserError(f"model.pretrained = true: cannot load the cached weights of {encoder}: {reason}") from None
        raise UserError(f"model.encoder = {encoder!r}: could not build it with {cfg.arch}: {error}") from None
    except (TypeError, ValueError, AssertionError, KeyError) as error:
        raise UserError(f"model.encoder = {encoder!r} cannot be used with model.arch={cfg.arch}: {error}") from None
    if file is not None and is_smp_native(encoder):
        _load_encoder_file(base.encoder, file, encoder)
    return base


def _read_weights_file(file: Path) -> dict[str, torch.Tensor]:
    try:
        return timm.models.load_state_dict(str(file))
    except Exception as error:  # torch, pickle and safetensors each raise their own kinds
        raise UserError(
            f"model.pretrained = {str(file)!r}: cannot read weights from it"
            f" ({type(error).__name__}: {one_line(error)})."
        ) from None


def _check_timm_file(file: Path, encoder: str, kwargs: dict) -> None:
    """timm loads a local file into a feature extractor leniently: a file of another model
    would only log "unexpected keys" and the encoder would train from scratch. So most of
    the timm model's own keys (shapes only, built on the meta device) must be in the file."""
    state = _read_weights_file(file)
    with torch.device("meta"):
        expected = set(timm.create_model(encoder.removeprefix("tu-"), pretrained=False, **kwargs).state_dict())
    matched = len(expected & set(state))
    if matched < len(expected) / 2:
        raise UserError(
            f"model.pretrained = {str(file)!r}: its weights do not fit encoder {encoder} (only {matched} of the"
            f" {len(expected)} keys of {encoder.removeprefix('tu-')} are in it, e.g. it lacks"
            f" {sorted(expected - set(state))[:3]}). Give that timm model's own state dict."
        )


def _load_encoder_file(module: nn.Module, file: Path, encoder: str) -> None:
    """A local weights file for one of SMP's own encoders: the encoder's own state dict, as
    in SMP's hub files (``model.safetensors``) or a torch file holding one."""
    where = f"model.pretrained = {str(file)!r}"
    state = _read_weights_file(file)
    expected = set(module.state_dict())
    try:
        module.load_state_dict(state)  # SMP's own override: it drops the classifier's keys first
    except RuntimeError as error:  # torch lists every key; name a few
        missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
        detail = (
            f"{len(missing)} of its keys missing, e.g. {missing[:3]}; {len(unknown)} unknown, e.g. {unknown[:3]}"
            if missing or unknown
            else one_line(error)
        )
        raise UserError(
            f"{where}: its weights do not fit encoder {encoder} ({detail}). Give the encoder's own state dict,"
            " as in SMP's hub file model.safetensors."
        ) from None


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
    cfg = ModelConfig(arch, encoder, heads, False)
    if is_smp_native(resolve_encoder(encoder)):
        # SMP's MiT reads a tensor's value (``.item()``) while it is built, which the meta
        # device cannot answer: build it on the CPU, then drop the weights.
        return build_model(cfg, resolution).to("meta")
    with torch.device("meta"):
        return build_model(cfg, resolution)


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
