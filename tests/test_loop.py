"""The training loop on CPU: it learns, it resumes, tiled prediction, datasets."""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import random_rows, small_config, write_folder
from torch.utils.data import DataLoader

from artefact.config import Config
from artefact.data import dataset
from artefact.data.cache import PrepareParams, read_index
from artefact.data.dataset import ArrayStore, TrainDataset, ValDataset
from artefact.data.prepare import prepare
from artefact.errors import TrainingDiverged, TrialOutOfMemory, UserError
from artefact.models import build_model
from artefact.taxonomy import FINE_NAMES, IGNORE_INDEX
from artefact.train import evaluation, loop
from artefact.train.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from artefact.train.evaluation import predict_tiled
from artefact.train.faults import FAULT_ENV, planned_fault
from artefact.train.loop import train
from artefact.train.reporters import LocalReporter

QUIET = {"log": lambda *_: None}


def untrained_metrics(cfg: Config, cache: Path) -> dict[str, float]:
    """The model ``train`` starts from (same seed), scored by the same validation code."""
    loop._seed_everything(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.resolution)
    val_set = ValDataset(cache, cfg.data.resolution)
    return evaluation.validate(
        model,
        DataLoader(val_set, batch_size=1),
        val_set.materials,
        [],
        evaluation.Normaliser(torch.device("cpu")),
        loop.build_loss(cfg, cache, torch.device("cpu")),
        None,
        cfg.data.resolution,
        cfg.train.batch_size,
        loop.Ranks(),
        len(val_set),
    )[0]


@pytest.mark.slow
def test_a_short_cpu_run_learns(tmp_path: Path, synthetic_cache: Path) -> None:
    cfg = small_config()  # heads [fine], 64 px, 8 crops per image, lr 3e-3, 5 epochs
    baseline = untrained_metrics(cfg, synthetic_cache)
    reporter = LocalReporter(tmp_path, **QUIET)
    final = train(cfg, synthetic_cache, reporter)

    scores = [h["val/miou_fine"] for h in reporter.history]
    print(f"untrained val/miou_fine {baseline['val/miou_fine']:.4f}; per epoch {[round(s, 4) for s in scores]}")
    assert [h["epoch"] for h in reporter.history] == [1, 2, 3, 4, 5]
    assert final == reporter.history[-1]
    assert final["val/miou_fine"] > baseline["val/miou_fine"] + 0.06
    assert final["val/loss"] < baseline["val/loss"] - 0.1
    assert reporter.history[-1]["train/loss"] < reporter.history[0]["train/loss"]

    # The metrics a sweep and MLflow rely on.
    assert final["model/params"] == 1_697_384
    assert final["model/gflop_per_image"] > 0
    assert final["perf/img_per_s"] > 0 and final["perf/peak_mem_mb"] > 0
    assert any(key.startswith("val/iou/") and key[8:] in FINE_NAMES for key in final)
    assert sum(key.startswith("val/miou_fine_by_material/") for key in final) == 10
    assert all(0.0 <= value <= 1.0 for key, value in final.items() if key.startswith("val/iou"))

    best = load_checkpoint(tmp_path / "best" / CHECKPOINT_FILE)
    latest = load_checkpoint(tmp_path / "latest" / CHECKPOINT_FILE)
    assert latest["epoch"] == 4 and latest["best"] == pytest.approx(max(scores))
    assert best["epoch"] == int(np.argmax(scores))

    # The best epoch's figures: one confusion matrix per head, overlays of the first val images.
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figures[0] == "confusion_fine.png" and len(figures) == 1 + evaluation.PREDICTION_IMAGES, figures
    assert all(name.startswith("prediction_") for name in figures[1:])


class _StopAfter(LocalReporter):
    """Keeps checkpoints like LocalReporter, then simulates a killed job after ``epochs`` epochs."""

    def __init__(self, out: Path, epochs: int) -> None:
        super().__init__(out, **QUIET)
        self.stop_after = epochs

    def report(self, metrics, checkpoint, evaluation) -> None:
        super().report(metrics, checkpoint, evaluation)
        if metrics["epoch"] == self.stop_after:
            raise KeyboardInterrupt


def _resume_config(epochs: int) -> Config:
    return small_config(data={"crops_per_image": 1}, train={"epochs": epochs, "steps_per_epoch": 3})


@pytest.mark.slow
def test_resume_continues_an_interrupted_run(tmp_path: Path, synthetic_cache: Path, monkeypatch) -> None:
    cfg = _resume_config(epochs=3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, synthetic_cache, _StopAfter(tmp_path, epochs=2))
    latest = tmp_path / "latest" / CHECKPOINT_FILE
    saved = load_checkpoint(latest)
    assert saved["epoch"] == 1 and saved["gpu_seconds"] == 0.0  # zero-based: two epochs done, on no GPU
    save_checkpoint({**saved, "gpu_seconds": 7200.0}, latest)  # as if the first attempt ran on a GPU for 2 h

    seen = {}
    original = loop._train_epoch

    def spy(net, *args, **kwargs):
        seen.setdefault("weights", {k: v.clone() for k, v in net.state_dict().items()})
        return original(net, *args, **kwargs)

    monkeypatch.setattr(loop, "_train_epoch", spy)
    reporter = LocalReporter(tmp_path, **QUIET, resume=True)
    train(cfg, synthetic_cache, reporter, resume_from=latest)

    assert [h["epoch"] for h in reporter.history] == [3], "the resumed run starts at epoch 3"
    assert reporter.history[0]["perf/gpu_hours"] == 2.0, "a restarted trial's cost counts its earlier attempts"
    assert seen["weights"].keys() == saved["model"].keys()
    for key, value in saved["model"].items():
        assert torch.equal(seen["weights"][key], value), f"{key} was not restored"
    resumed = load_checkpoint(latest)
    assert resumed["epoch"] == 2
    # Optimizer and schedule continue rather than restart: 3 epochs x 3 steps in all.
    steps = {int(s["step"]) for s in resumed["optimizer"]["state"].values()}
    assert steps == {9}
    assert resumed["scheduler"]["last_epoch"] == 9
    assert resumed["best"] == pytest.approx(max(saved["best"], reporter.history[0]["val/miou_fine"]))


@pytest.mark.slow
def test_resume_to_more_epochs_keeps_the_best_checkpoint(tmp_path: Path, synthetic_cache: Path) -> None:
    first = LocalReporter(tmp_path, **QUIET)
    train(_resume_config(epochs=2), synthetic_cache, first)
    best_before = max(h["val/miou_fine"] for h in first.history)
    best_bytes = (tmp_path / "best" / CHECKPOINT_FILE).read_bytes()
    reporter = LocalReporter(tmp_path, **QUIET, resume=True)
    assert reporter.best == pytest.approx(best_before)
    train(_resume_config(epochs=3), synthetic_cache, reporter, resume_from=tmp_path / "latest" / CHECKPOINT_FILE)
    assert [h["epoch"] for h in reporter.history] == [3]
    if reporter.history[0]["val/miou_fine"] <= best_before:
        assert (tmp_path / "best" / CHECKPOINT_FILE).read_bytes() == best_bytes


def test_a_checkpoint_from_elsewhere_is_refused_clearly(tmp_path: Path, synthetic_cache: Path) -> None:
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="lacks"):
        train(
            _resume_config(epochs=1),
            synthetic_cache,
            LocalReporter(tmp_path, **QUIET),
            resume_from=tmp_path / "foreign.pt",
        )


@pytest.mark.slow
def test_upernet_with_three_heads_and_a_ragged_last_batch(tmp_path: Path, synthetic_cache: Path) -> None:
    """38 crops in batches of 37 leave a batch of 1, which UPerNet's BatchNorm cannot take: it is dropped."""
    cfg = small_config(
        model={"arch": "upernet", "heads": ["binary", "coarse", "fine"]},
        data={"crops_per_image": 1},
        train={"epochs": 1, "batch_size": 37},
    )
    metrics = train(cfg, synthetic_cache, LocalReporter(tmp_path, **QUIET))
    for head in ("binary", "coarse", "fine"):
        assert 0.0 <= metrics[f"val/miou_{head}"] <= 1.0
        assert math.isfinite(metrics[f"train/loss_{head}"])
    assert metrics["train/loss"] == pytest.approx(
        0.2 * metrics["train/loss_binary"] + 0.3 * metrics["train/loss_coarse"] + 0.5 * metrics["train/loss_fine"],
        rel=1e-5,
    )


def test_class_weights_and_the_loss_kind_reach_training_and_validation(tmp_path: Path, synthetic_cache: Path) -> None:
    """The same steps on the same crops, unweighted and weighted: every head's losses change
    and stay finite (the coarse head meets crops without coarse labels)."""
    runs = {}
    for weighting in ("none", "inverse_sqrt_log"):
        cfg = small_config(
            model={"heads": ["binary", "coarse", "fine"]},
            loss={"kind": "dice_focal", "class_weights": weighting},
            data={"crops_per_image": 1},
            train={"epochs": 1, "steps_per_epoch": 2},
        )
        runs[weighting] = train(cfg, synthetic_cache, LocalReporter(tmp_path / weighting, **QUIET))
    for key in ("train/loss_binary", "train/loss_coarse", "train/loss_fine", "val/loss"):
        assert math.isfinite(runs["inverse_sqrt_log"][key]), key
        assert runs["inverse_sqrt_log"][key] != pytest.approx(runs["none"][key], rel=1e-4), key


def test_too_few_crops_for_a_batch(synthetic_cache: Path, tmp_path: Path) -> None:
    cfg = small_config(data={"crops_per_image": 1}, train={"batch_size": 64})
    with pytest.raises(UserError, match="fewer than train.batch_size"):
        train(cfg, synthetic_cache, LocalReporter(tmp_path, **QUIET))


def test_predict_tiled_matches_per_tile_forward() -> None:
    torch.manual_seed(0)
    model = build_model(small_config(model={"heads": ["binary", "fine"]}).model, 64).eval()
    image = torch.randn(1, 3, 128, 192)
    stitched = predict_tiled(model, image, 64, chunk=4)
    assert stitched["fine"].shape == (1, 16, 128, 192) and stitched["binary"].shape == (1, 2, 128, 192)
    with torch.no_grad():
        for row in range(2):
            for col in range(3):
                tile = image[:, :, row * 64 : (row + 1) * 64, col * 64 : (col + 1) * 64]
                expected = model(tile)
                for head in ("binary", "fine"):
                    got = stitched[head][:, :, row * 64 : (row + 1) * 64, col * 64 : (col + 1) * 64]
                    torch.testing.assert_close(got, expected[head], rtol=1e-4, atol=1e-5)


def test_datasets_crop_and_pad_with_the_ignore_index(synthetic_cache: Path) -> None:
    index = read_index(synthetic_cache)
    train_set = TrainDataset(synthetic_cache, 64, crops_per_image=3)
    assert len(train_set) == 3 * sum(r["split"] == "train" for r in index)
    image, mask = train_set[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert mask.shape == (64, 64) and mask.dtype == torch.uint8

    big = TrainDataset(synthetic_cache, 192, crops_per_image=1)  # larger than every synthetic image
    _, padded = big[0]
    assert padded.shape == (192, 192)
    assert (padded == IGNORE_INDEX).sum() >= 192 * 192 - 160 * 160, "padding is ignored, never class 0"

    val_set = ValDataset(synthetic_cache, 64)
    assert len(val_set) == sum(r["split"] == "val" for r in index) == 10
    image, mask, material, position = val_set[0]
    row = val_set.rows[0]
    assert image.shape[1] % 64 == 0 and image.shape[2] % 64 == 0
    assert image.shape[1] >= row["height"] and image.shape[1] - row["height"] < 64
    stored = np.load(synthetic_cache / "masks" / f"{row['id']}.npy")
    assert np.array_equal(mask[: row["height"], : row["width"]].numpy(), stored)
    assert (mask[row["height"] :, :] == IGNORE_INDEX).all() and (mask[:, row["width"] :] == IGNORE_INDEX).all()
    assert (image[:, row["height"] :, :] == 0).all()
    assert val_set.materials[material] == row["material"] and position == 0


def test_in_memory_store_serves_the_same_arrays(synthetic_cache: Path) -> None:
    mapped = ValDataset(synthetic_cache, 64)
    in_ram = ValDataset(synthetic_cache, 64, in_memory=True)
    for i in range(len(mapped)):
        for a, b in zip(mapped[i][:2], in_ram[i][:2], strict=True):
            assert torch.equal(a, b)


def test_mapped_store_keeps_each_sample_open_within_a_bound(synthetic_cache: Path, monkeypatch) -> None:
    ids = [row["id"] for row in read_index(synthetic_cache)][:3]
    store = ArrayStore(synthetic_cache, ids, in_memory=False)
    image, mask = store.get(ids[0])
    assert isinstance(image, np.memmap) and isinstance(mask, np.memmap)
    assert store.get(ids[0])[0] is image, "a sample's maps are opened once, not at every crop"

    # A spawned DataLoader worker gets the store without its maps (and none of their bytes).
    restored = pickle.loads(pickle.dumps(store))
    assert len(pickle.dumps(store)) < image.nbytes
    assert np.array_equal(restored.get(ids[0])[0], image)

    monkeypatch.setattr(dataset, "MAPS_KEPT", 2)
    store.get(ids[1])
    store.get(ids[2])  # a third sample: the kept maps are let go first
    assert store.get(ids[0])[0] is not image
    assert np.array_equal(store.get(ids[0])[0], image)


def test_augmentations_follow_the_seed_and_differ_between_workers(tmp_path: Path) -> None:
    """Albumentations' Compose ignores global seeds and is copied into every DataLoader worker."""
    source = write_folder(tmp_path / "src", random_rows(2, size=(96, 96), materials=("Paper",)))
    cache = prepare(source, tmp_path / "cache", PrepareParams(), **QUIET)  # one train image, one val

    def crops(seed: int, workers: int) -> torch.Tensor:
        loop._seed_everything(seed)
        dataset = TrainDataset(cache, 32, crops_per_image=8)
        loader = DataLoader(dataset, batch_size=1, num_workers=workers, worker_init_fn=loop._worker_seed)
        return torch.cat([images for images, _ in loader])

    assert torch.equal(crops(0, workers=0), crops(0, workers=0)), "train.seed makes augmentation reproducible"
    assert not torch.equal(crops(0, workers=0), crops(1, workers=0))
    parallel = crops(0, workers=2)  # worker 0 serves items 0, 2, 4, 6 and worker 1 items 1, 3, 5, 7
    assert not torch.equal(parallel[0::2], parallel[1::2]), "each worker needs its own random stream"
    assert torch.equal(parallel, crops(0, workers=2))


def test_a_fresh_run_forgets_an_earlier_runs_best(tmp_path: Path) -> None:
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "metric.json").write_text('{"val/miou_fine": 0.99}')
    assert LocalReporter(tmp_path, **QUIET, resume=True).best == 0.99
    assert LocalReporter(tmp_path, **QUIET).best == -math.inf
    assert not (tmp_path / "best").exists()


@pytest.mark.parametrize(
    ("plan", "failure", "message"),
    [
        ("nan@2", TrainingDiverged, "the training loss became NaN or infinite at epoch 2"),
        ("oom@2:encoder=tu-test_convnext,batch_size=8", TrialOutOfMemory, "train.batch_size=8, data.resolution=64"),
    ],
)
def test_an_injected_fault_stops_the_run_in_its_epoch(
    synthetic_cache: Path, tmp_path: Path, monkeypatch, plan, failure, message
) -> None:
    monkeypatch.setenv(FAULT_ENV, f"oom@1:encoder=tu-test_resnet; {plan}")  # the first plan matches nothing
    reporter = LocalReporter(tmp_path, **QUIET)
    with pytest.raises(failure, match=re.escape(message)):
        train(small_config(data={"crops_per_image": 2}, train={"epochs": 4}), synthetic_cache, reporter)
    assert [int(m["epoch"]) for m in reporter.history] == [1]  # stopped in epoch 2, not after epoch 4


@pytest.mark.parametrize("plan", ["nan", "nan@0", "nan@two", "explode@1", "oom@1:colour=red", "oom@1:encoder"])
def test_a_malformed_fault_plan_is_refused_before_training(monkeypatch, plan: str) -> None:
    monkeypatch.setenv(FAULT_ENV, plan)
    with pytest.raises(UserError, match=rf"{FAULT_ENV}=.*expected <kind>@<epoch>"):
        planned_fault(small_config())
