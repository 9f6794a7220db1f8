"""The winner you can use: the sweep's best model logged to MLflow and registered, and
``python -m artefact predict`` segmenting new images with it; bad inputs refused."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from builders import free_port, small_config
from mlflow.tracking import MlflowClient
from PIL import Image
from sweep_helpers import REPO, sweep_runs

from artefact import cli
from artefact.config_files import dump_yaml
from artefact.models import build_model
from artefact.predict import CLASSES_FILE, CONFIG_FILE, log_best, overlay
from artefact.report.trials import TrialSummary
from artefact.taxonomy import class_table, palette
from artefact.tracking.models import load_logged_model
from artefact.tracking.store import check_store, finish_sweep, open_sweep
from artefact.tracking.trials import close_trial, find_trial_run
from artefact.tracking.vocabulary import BEST_RUN_TAG, SweepRun
from artefact.train.checkpoint import CHECKPOINT_FILE, save_checkpoint
from artefact.train.evaluation import Normaliser, predict_tiled

METRIC = "val/miou_fine"
SIZES = ((40, 52), (64, 64), (97, 150), (230, 301))
"""(height, width) of the test images: smaller than a 64 px tile, one tile, several tiles
and not a multiple of 64, and larger than the profile's max_side (so shrunk, then scaled back)."""


@dataclass
class LoggedSweep:
    uri: str
    tracking: SweepRun
    line: str
    model: torch.nn.Module
    best_run: str
    other_run: str


def _trial_run(tracking: SweepRun, trial_id: str, cfg, checkpoint: Path | None) -> str:
    """A finished trial's child run holding its config.yaml, as a sweep leaves it."""
    close_trial(tracking, trial_id, "completed", None, str(checkpoint) if checkpoint else None)
    client = MlflowClient(tracking.uri)
    run_id = find_trial_run(client, tracking, trial_id)
    client.log_text(run_id, dump_yaml(cfg), CONFIG_FILE)
    return run_id


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> LoggedSweep:
    """A sweep of three trials (one failed) in a SQLite store, whose best model ``log_best`` logged."""
    root = tmp_path_factory.mktemp("logged")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    check_store(uri)
    tracking = open_sweep(uri, "unit", {})
    cfg = small_config(data={"max_side": 160}, model={"heads": ["binary", "fine"]}, train={"batch_size": 4})
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.resolution).eval()
    save_checkpoint({"model": model.state_dict()}, root / "best" / CHECKPOINT_FILE)
    best_run = _trial_run(tracking, "t_best", cfg, root / "best")
    other_run = _trial_run(tracking, "t_other", cfg, None)
    summaries = [
        TrialSummary("t_best", {"encoder": cfg.model.encoder}, "completed", 2, None, {METRIC: 0.5}, str(root / "best")),
        TrialSummary("t_other", {"encoder": cfg.model.encoder}, "stopped_early", 1, None, {METRIC: 0.2}, None),
        TrialSummary("t_failed", {"encoder": cfg.model.encoder}, "failed", 1, "NaN loss", {METRIC: 0.9}, None),
    ]
    line = log_best(tracking, summaries, METRIC)
    finish_sweep(tracking)
    return LoggedSweep(uri, tracking, line, model, best_run, other_run)


def test_the_best_model_is_logged_registered_and_named_by_the_parent_run(logged: LoggedSweep) -> None:
    assert re.search(rf"trial t_best \({METRIC} 0\.5000\) logged to run {logged.best_run}", logged.line)
    assert "registered as artefact-unit version 1" in logged.line and "--run best:unit" in logged.line
    client = MlflowClient(logged.uri)
    assert client.get_run(logged.tracking.parent_run_id).data.tags[BEST_RUN_TAG] == logged.best_run
    [version] = client.search_model_versions("name = 'artefact-unit'")
    assert version.run_id == logged.best_run
    [model] = client.search_logged_models([logged.tracking.experiment_id])
    assert model.source_run_id == logged.best_run and model.name == "model"

    loaded = load_logged_model(logged.uri, "best:unit", "cpu")
    assert loaded.run_id == logged.best_run
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = logged.model(image), loaded.model.eval()(image)
    for head in ("binary", "fine"):
        torch.testing.assert_close(got[head], expected[head])  # the checkpoint's weights, not fresh ones
    assert yaml.safe_load(loaded.files[CONFIG_FILE])["model"]["heads"] == ["binary", "fine"]
    classes = json.loads(loaded.files[CLASSES_FILE])
    assert classes == json.loads(json.dumps(class_table(("binary", "fine"))))
    assert classes["fine"][15] == {"id": 15, "name": "Lightleak", "fine_ids": [15], "colour": "#F6FF1B"}


def test_no_model_when_every_trial_failed_or_the_store_is_away(tmp_path: Path, monkeypatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    check_store(uri)
    tracking = open_sweep(uri, "failing", {})
    failed = [TrialSummary("t1", {"encoder": "x"}, "failed", 1, "NaN loss", {}, None)]
    assert log_best(tracking, failed, METRIC) == "no model logged: no trial finished with a score"

    def away(*_args) -> None:
        raise ConnectionError("the store went away")

    monkeypatch.setattr("artefact.predict.trial_text", away)
    scored = [TrialSummary("t2", {"encoder": "x"}, "completed", 1, None, {METRIC: 0.1}, str(tmp_path))]
    assert log_best(tracking, scored, METRIC) == "no model logged: the MLflow store did not answer"
    assert BEST_RUN_TAG not in MlflowClient(uri).get_run(tracking.parent_run_id).data.tags


def _write_images(folder: Path) -> dict[str, tuple[int, int]]:
    """PNG and JPEG images of ``SIZES``, RGB and greyscale: stem -> (width, height)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = {}
    for number, (height, width) in enumerate(SIZES):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if number == 1:
            image.convert("L").save(folder / f"image_{number}.png")
        else:
            image.save(folder / f"image_{number}.{'jpg' if number == 2 else 'png'}")
        sizes[f"image_{number}"] = (width, height)
    return sizes


def test_predict_writes_a_mask_of_class_ids_and_an_overlay_per_image(logged: LoggedSweep, tmp_path: Path) -> None:
    sizes = _write_images(tmp_path / "images")
    out = tmp_path / "out"
    code = cli.main(
        ["predict", "--run", "best:unit", "--images", str(tmp_path / "images"), "--out", str(out)]
        + ["--tracking-uri", logged.uri]
    )
    assert code == 0
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{stem}.png" for stem in sorted(sizes)]
    for stem, size in sizes.items():
        mask = Image.open(out / "masks" / f"{stem}.png")
        assert mask.mode == "L" and mask.size == size
        assert np.asarray(mask).max() <= 15
        shown = Image.open(out / "overlays" / f"{stem}.png")
        assert shown.mode == "RGB" and max(shown.size) == min(max(size), 160)  # the scale the model saw

    # The small RGB image, segmented by hand: black padding to a whole tile, ImageNet normalisation.
    pixels = np.asarray(Image.open(tmp_path / "images" / "image_0.png"))
    padded = np.zeros((64, 64, 3), dtype=np.uint8)
    padded[:40, :52] = pixels
    batch = torch.from_numpy(padded.transpose(2, 0, 1)).unsqueeze(0)
    logits = predict_tiled(logged.model, Normaliser(torch.device("cpu")).images(batch), 64, chunk=4)["fine"]
    expected = logits[0, :, :40, :52].argmax(0).numpy()
    assert np.array_equal(np.asarray(Image.open(out / "masks" / "image_0.png")), expected)


def test_overlay_blends_damage_in_the_official_colours_and_keeps_clean_pixels() -> None:
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    mask = np.array([[0, 1], [15, 0]], dtype=np.uint8)
    shown = overlay(image, mask)
    assert (shown[0, 0] == image[0, 0]).all() and (shown[1, 1] == image[1, 1]).all()
    assert shown[0, 1].tolist() == [round(50 + c / 2) for c in palette()[1]]
    assert shown[1, 0].tolist() == [round(50 + c / 2) for c in palette()[15]]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown run", r"--run 0{32}: the store sqlite:///\S*logged\S*/mlflow\.db has no such run"),
        ("unknown sweep", r"--run best:nosweep: the store .* has no sweep named 'nosweep'"),
        ("sweep without a model", r"--run best:empty: sweep 'empty' has no logged model"),
        ("parent run", r"has no logged model\. A sweep logs one, in its best trial's run"),
        ("trial without a model", r"--run [0-9a-f]{32}: run [0-9a-f]{32} has no logged model"),
        ("non-image file", r"notes\.txt: cannot read the image"),
        ("truncated image", r"broken\.png: the image data is corrupt or truncated"),
        ("same stem", r"image_0\.png and image_0\.tif would both write image_0\.png"),
        ("missing store", r"--tracking-uri sqlite:///.*nowhere\.db: no MLflow store there"),
        ("unreachable server", r"the MLflow server does not answer"),
        ("out is a file", r"--out .*: a file is there, not a folder"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    case: str, expected: str, logged: LoggedSweep, tmp_path: Path, capsys, monkeypatch, bad_input_tried
) -> None:
    images, out = tmp_path / "images", tmp_path / "out"
    _write_images(images)
    run, uri = "best:unit", logged.uri
    if case == "unknown run":  # the store named by the environment, as MLflow's own tools take it
        run, uri = "0" * 32, None
        monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.uri)
    elif case == "unknown sweep":
        run = "best:nosweep"
    elif case == "sweep without a model":
        finish_sweep(open_sweep(logged.uri, "empty", {}))
        run = "best:empty"
    elif case == "parent run":
        run = logged.tracking.parent_run_id
    elif case == "trial without a model":
        run = logged.other_run
    elif case == "non-image file":
        (images / "notes.txt").write_text("not an image")
    elif case == "truncated image":
        data = (images / "image_3.png").read_bytes()
        (images / "broken.png").write_bytes(data[: len(data) // 2])
    elif case == "same stem":
        Image.new("RGB", (8, 8)).save(images / "image_0.tif")
    elif case == "missing store":
        uri = f"sqlite:///{tmp_path / 'nowhere.db'}"
    elif case == "unreachable server":
        uri = f"http://127.0.0.1:{free_port()}"
    elif case == "out is a file":
        out.write_text("")
    flags = ["--run", run, "--images", str(images), "--out", str(out)] + (["--tracking-uri", uri] if uri else [])
    code = cli.main(["predict", *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(expected, lines[0]), err
    assert not (out.is_dir() and any(out.rglob("*"))), "nothing is written before every check passed"
    assert not (tmp_path / "nowhere.db").exists()
    bad_input_tried("predict")


def test_predict_on_the_default_sweep(default_sweep, tmp_path: Path) -> None:
    """The main job logs its best trial's model; ``predict --run best:default`` uses it."""
    done, _, store = default_sweep
    assert done.returncode == 0, done.stderr[-3000:]
    parent, children = sweep_runs(store, "default")
    scored = [c for c in children if c.data.tags["artefact.outcome"] != "failed"]
    best = max(scored, key=lambda c: c.data.metrics[METRIC])
    assert parent.data.tags[BEST_RUN_TAG] == best.info.run_id
    assert f"best model: trial {best.data.tags['artefact.trial_id']}" in done.stdout
    assert "Downloading artifacts" not in done.stderr
    client = MlflowClient(f"sqlite:///{store}")
    [version] = client.search_model_versions("name = 'artefact-default'")
    assert version.run_id == best.info.run_id

    sizes = _write_images(tmp_path / "images")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "artefact", "predict", "--run", "best:default", "--images"]
    command += [str(tmp_path / "images"), "--out", str(out), "--tracking-uri", f"sqlite:///{store}"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"wrote {len(sizes)} masks" in finished.stdout
    assert "INFO" not in finished.stdout + finished.stderr
    for stem, size in sizes.items():
        mask = Image.open(out / "masks" / f"{stem}.png")
        assert mask.size == size and set(np.unique(np.asarray(mask))) <= set(range(16))
        assert (out / "overlays" / f"{stem}.png").is_file()
