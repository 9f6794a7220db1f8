"""The sweep's winner, ready to use: logged to MLflow as a model when a sweep ends, and
loaded by ``python -m artefact predict`` to segment new images.

An image is segmented as validation scores the model: brought to the scale of the training
cache (longer side at most ``data.max_side``, shrunk as ``prepare`` shrinks it), padded and
tiled at the training resolution, and its mask scaled back to the image's own size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn
from tqdm import tqdm

from artefact.config import Config, from_dict
from artefact.config_files import dump_yaml
from artefact.data.prepare import bounded_size, shrink_image
from artefact.data.sources.sample import DEFAULT_MAX_PIXELS, open_image
from artefact.errors import UserError
from artefact.models import build_model
from artefact.taxonomy import class_table, palette
from artefact.tracking.models import load_logged_model, log_best_model
from artefact.tracking.store import check_store_exists
from artefact.tracking.trials import trial_text
from artefact.tracking.vocabulary import SweepRun, registered_model_name, unless_store_is_away
from artefact.train.checkpoint import CHECKPOINT_FILE, load_checkpoint, write_atomic
from artefact.train.evaluation import Normaliser, class_map, segment
from artefact.train.hardware import amp_dtype, configure_kernels, select_device

if TYPE_CHECKING:
    from artefact.report.trials import TrialSummary

CONFIG_FILE = "config.yaml"
CLASSES_FILE = "classes.json"
MASKS_FOLDER = "masks"
OVERLAYS_FOLDER = "overlays"
OVERLAY_ALPHA = 0.5
"""Weight of a class's colour over a damaged pixel; clean pixels keep the image's own."""
REQUIREMENTS = ("torch", "torchvision", "timm", "segmentation-models-pytorch")
"""What loading the logged model needs besides this package (it unpickles its classes)."""


def best_trial(summaries: list[TrialSummary], metric: str) -> TrialSummary | None:
    """The scored trial with the highest ``metric`` and a checkpoint; None when every trial failed."""
    scored = [s for s in summaries if s.outcome != "failed" and metric in s.best and s.best_checkpoint]
    return max(scored, key=lambda s: s.best[metric], default=None)


def log_best(tracking: SweepRun, summaries: list[TrialSummary], metric: str) -> str:
    """Log the best trial's model into its run and register it; returns the line the sweep
    prints about it. A failure here never fails the finished sweep."""
    best = best_trial(summaries, metric)
    if best is None:
        return "no model logged: no trial finished with a score"
    said: list[str] = []
    if not unless_store_is_away(lambda: said.append(_log_trial_model(tracking, best, metric))):
        return "no model logged: the MLflow store did not answer"
    return said[0]


def _log_trial_model(tracking: SweepRun, best: TrialSummary, metric: str) -> str:
    config = trial_text(tracking, best.trial_id, CONFIG_FILE)
    if config is None:
        return f"no model logged: the run of the best trial, {best.trial_id}, lacks its {CONFIG_FILE}"
    try:
        cfg = from_dict(yaml.safe_load(config), f"trial {best.trial_id} {CONFIG_FILE}")
        model = trained_model(cfg, Path(best.best_checkpoint))
    except UserError as error:
        return f"no model logged: {error}"
    with tempfile.TemporaryDirectory(prefix="artefact-model-files-") as folder:
        files = [Path(folder) / CONFIG_FILE, Path(folder) / CLASSES_FILE]
        files[0].write_text(dump_yaml(cfg), encoding="utf-8")
        files[1].write_text(json.dumps(class_table(cfg.model.heads), indent=2), encoding="utf-8")
        requirements = [f"{name}=={version(name)}" for name in REQUIREMENTS]
        run_id, registered = log_best_model(tracking, best.trial_id, model, files, requirements)
    name = registered_model_name(tracking.sweep)
    where = f"registered as {name} version {registered}" if registered else "not registered (no model registry)"
    return (
        f"best model: trial {best.trial_id} ({metric} {best.best[metric]:.4f}) logged to run {run_id}, {where}."
        f" Segment images with: python -m artefact predict --run best:{tracking.sweep} --images DIR --out DIR"
    )


def trained_model(cfg: Config, checkpoint: Path) -> nn.Module:
    """The trial's model with the weights of its best checkpoint folder, on the CPU. The
    pretrained weights it started from are not fetched again: the checkpoint replaces them."""
    model = build_model(dataclasses.replace(cfg.model, pretrained=False), cfg.data.resolution)
    model.load_state_dict(load_checkpoint(checkpoint / CHECKPOINT_FILE)["model"])
    return model.eval()


def predict(
    run: str, images: Path, out: Path, tracking_uri: str, max_pixels: int = DEFAULT_MAX_PIXELS, log=print
) -> list[Path]:
    """Segment every image in ``images`` with the model of ``run`` (a run id or best:<sweep>):
    ``out/masks/<stem>.png`` (fine class ids, the image's size) and ``out/overlays/<stem>.png``.

    The run, its model and every input are checked before anything is written; each output
    is written whole (temporary name, then rename), replacing one of the same name.
    """
    inputs = input_images(images)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file is there, not a folder; pass a folder for the masks and overlays.")
    check_store_exists(tracking_uri)
    device = select_device("auto")
    trained = load_logged_model(tracking_uri, run, device.type)
    if CONFIG_FILE not in trained.files:
        raise UserError(f"--run {run}: its model was logged without {CONFIG_FILE}; it cannot be used here.")
    cfg = from_dict(yaml.safe_load(trained.files[CONFIG_FILE]), f"run {trained.run_id} {CONFIG_FILE}")
    for path in inputs:
        check_image(path, max_pixels)
    model = trained.model.to(device).eval()
    configure_kernels(device)
    segmenter = _Segmenter(model, cfg, device)
    mode = _new_file_mode()
    (out / MASKS_FOLDER).mkdir(parents=True, exist_ok=True)
    (out / OVERLAYS_FOLDER).mkdir(parents=True, exist_ok=True)
    masks = []
    for path in tqdm(inputs, desc="segmenting", unit="image", file=sys.stderr, disable=None):
        with open_image(path, str(path), max_pixels) as image:
            size = image.size
            pixels = shrink_image(image, bounded_size(size, cfg.data.max_side), str(path))
        mask = segmenter(pixels)
        full = Image.fromarray(mask)
        if full.size != size:
            full = full.resize(size, Image.Resampling.NEAREST)
        masks.append(_write_png(full, out / MASKS_FOLDER / f"{path.stem}.png", mode))
        _write_png(Image.fromarray(overlay(pixels, mask)), out / OVERLAYS_FOLDER / f"{path.stem}.png", mode)
    log(
        f"wrote {len(masks)} masks (fine class ids 0-15) to {out / MASKS_FOLDER} and overlays to"
        f" {out / OVERLAYS_FOLDER}, with the model of run {trained.run_id}"
    )
    return masks


def input_images(folder: Path) -> list[Path]:
    """The files of ``folder`` (not its subfolders, not hidden files), whose names give distinct masks."""
    if not folder.is_dir():
        raise UserError(f"--images {folder}: no such folder; pass a folder of images.")
    files = sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))
    if not files:
        raise UserError(f"--images {folder}: the folder holds no files; pass a folder of images.")
    by_stem: dict[str, list[str]] = defaultdict(list)
    for path in files:
        by_stem[path.stem].append(path.name)
    for stem, names in by_stem.items():
        if len(names) > 1:
            raise UserError(f"--images {folder}: {' and '.join(names)} would both write {stem}.png; rename one.")
    return files


def check_image(path: Path, max_pixels: int) -> None:
    """A file Pillow can identify and whose data passes its integrity check, within the pixel bound."""
    with open_image(path, str(path), max_pixels) as image:
        try:
            image.verify()
        except (OSError, SyntaxError, ValueError) as error:
            raise UserError(
                f"{path}: the image data is corrupt or truncated ({error}); replace or remove it."
            ) from None


class _Segmenter:
    """An RGB uint8 image (H, W, 3) -> its fine mask (H, W), tiled as validation tiles it."""

    def __init__(self, model: nn.Module, cfg: Config, device: torch.device) -> None:
        self.model = model
        self.normalise = Normaliser(device)
        self.dtype = amp_dtype("auto", device)
        self.resolution = cfg.data.resolution
        self.chunk = cfg.train.batch_size

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).unsqueeze(0)
        logits = segment(self.model, image, self.normalise, self.dtype, self.resolution, self.chunk)
        return class_map(logits["fine"])[0].to(torch.uint8).cpu().numpy()


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with each damaged pixel blended with its class's official colour."""
    blended = image * (1 - OVERLAY_ALPHA) + palette()[mask] * OVERLAY_ALPHA
    return np.where((mask > 0)[..., None], blended.round(), image).astype(np.uint8)


def _write_png(image: Image.Image, path: Path, mode: int) -> Path:
    write_atomic(path, lambda stream: image.save(stream, format="PNG"))
    path.chmod(mode)
    return path


def _new_file_mode() -> int:
    """The permissions a plain ``open`` gives a new file: atomic writes start from a private
    temporary file (0600), which would keep masks from the colleagues who share the folder."""
    umask = os.umask(0o077)  # read it by setting it; restrictive meanwhile
    os.umask(umask)
    return 0o666 & ~umask
