"""Configuration: YAML and overrides, types, validation messages, safe loading."""

from __future__ import annotations

from pathlib import Path

import pytest

from artefact.config import Config, from_dict
from artefact.config_files import dump_yaml, load_config, parse_overrides
from artefact.errors import UserError


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.heads == ("binary", "coarse", "fine")
    assert cfg.loss.weights(cfg.model.heads) == pytest.approx({"binary": 0.2, "coarse": 0.3, "fine": 0.5})


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = _yaml(
        tmp_path,
        "data:\n  resolution: 96\n  holdout: material=Paper\n"
        "model:\n  arch: upernet\n  heads: [fine]\n"
        "train:\n  lr: 3e-3\n  epochs: 4\n",
    )
    cfg = load_config(path, ["train.epochs=7", "model.encoder=coatnet_0", "data.max_side=256"])
    assert cfg.data.resolution == 96 and cfg.data.holdout == "material=Paper" and cfg.data.max_side == 256
    assert cfg.model.arch == "upernet" and cfg.model.heads == ("fine",) and cfg.model.encoder == "coatnet_0"
    assert cfg.train.lr == 0.003 and isinstance(cfg.train.lr, float), "PyYAML reads 3e-3 as a string"
    assert cfg.train.epochs == 7
    assert cfg.loss.weights(cfg.model.heads) == {"fine": 1.0}


def test_dump_and_load_round_trip(tmp_path: Path) -> None:
    cfg = from_dict({"model": {"heads": ["binary", "fine"], "pretrained": "/weights.pth"}, "train": {"lr": 5e-4}})
    again = load_config(_yaml(tmp_path, dump_yaml(cfg)))
    assert again == cfg


def test_replace_is_validated() -> None:
    cfg = Config()
    assert cfg.replace(train={"epochs": 9}).train.epochs == 9
    assert cfg.replace(train={"epochs": 9}).train.lr == cfg.train.lr
    with pytest.raises(UserError, match="train.epochs"):
        cfg.replace(train={"epochs": 0})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  epoch: 3\n", r"unknown config key train\.epoch\. Did you mean epochs\?"),
        ("modle:\n  arch: unet\n", r"unknown config key modle\. Did you mean model\?"),
        ("data:\n  resolutoin: 64\n", r"Did you mean resolution\?"),
        ("train:\n  zzz: 1\n", r"unknown config key train\.zzz\. Known keys: epochs, batch_size"),
    ],
)
def test_unknown_keys_suggest_the_close_key(tmp_path: Path, text: str, expected: str) -> None:
    path = _yaml(tmp_path, text)
    with pytest.raises(UserError, match=expected) as error:
        load_config(path)
    assert str(path) in str(error.value)


def test_unknown_override_key() -> None:
    with pytest.raises(UserError, match=r"train\.batchsize\. Did you mean batch_size\?"):
        load_config(None, ["train.batchsize=4"])


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object:artefact.config.TrainConfig {{epochs: 1}}",
        "!!python/name:os.system",
    ],
)
def test_python_tags_are_refused(tmp_path: Path, tag: str) -> None:
    marker = tmp_path / "ran"
    path = _yaml(tmp_path, f"train: {tag.format(marker=marker)}\n")
    with pytest.raises(UserError, match="not valid safe YAML"):
        load_config(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["data.resolution=48"], "data.resolution"),
        (["data.resolution=0"], "data.resolution"),
        (["data.resolution=512", "data.max_side=256"], "data.max_side"),
        (["data.val_fraction=1"], "data.val_fraction"),
        (["data.augment_copies=4"], "data.augment_copies"),
        (["data.holdout=Paper"], "data.holdout"),
        (["data.holdout=colour=red"], "data.holdout"),
        (["data.max_pixels=0"], "data.max_pixels"),
        (["model.arch=segformer"], "model.arch"),
        (["model.heads=[binary]"], "model.heads"),
        (["model.heads=[fine, fine]"], "model.heads"),
        (["model.heads=[]"], "model.heads"),
        (["loss.fine=-0.5"], "loss.fine"),
        (["loss.binary=0", "loss.coarse=0", "loss.fine=0"], "loss"),
        (["loss.kind=focal"], "loss.kind"),
        (["loss.class_weights=inverse"], "loss.class_weights"),
        (["loss.class_weight_clip=[0.1]"], "loss.class_weight_clip"),
        (["loss.class_weight_clip=[5, 1]"], "loss.class_weight_clip"),
        (["loss.class_weight_clip=[0, 10]"], "loss.class_weight_clip"),
        (["sweep.search_class_weights=[none, inverse]"], "sweep.search_class_weights"),
        (["sweep.search_loss_kinds=[dice, dice]"], "sweep.search_loss_kinds"),
        (["model.heads=[fine]", "loss.fine=0"], "loss"),
        (["model.arch=upernet", "train.batch_size=1"], "train.batch_size"),
        (["train.batch_size=0"], "train.batch_size"),
        (["train.lr=0"], "train.lr"),
        (["train.amp=fp8"], "train.amp"),
        (["train.device=tpu"], "train.device"),
        (["train.compile=always"], "train.compile"),
        (["train.steps_per_epoch=0"], "train.steps_per_epoch"),
        (["resources.gpus_per_worker=1.5"], "resources.gpus_per_worker"),
        (["resources.gpus_per_worker=half"], "resources.gpus_per_worker"),
        (["resources.gpus_per_worker=-1"], "resources.gpus_per_worker"),
        (["resources.trainer=ray-train"], "resources.trainer"),
        (["resources.trainer=in_process", "resources.workers_per_trial=2"], "resources.trainer"),
        (["resources.gpu_arch=sm70"], "resources.gpu_arch"),
        (["resources.gpu_memory_margin=1"], "resources.gpu_memory_margin"),
        (["resources.gpu_arch=sm_7.0"], "resources.gpu_arch"),
        (["sweep.lr_min=0.1", "sweep.lr_max=0.01"], "sweep.lr_min"),
        (["sweep.encoder_max_batch.mit_b3=0"], "sweep.encoder_max_batch.mit_b3"),
        (["model.arch=upernet", "sweep.encoder_max_batch.mit_b3=1"], "sweep.encoder_max_batch.mit_b3"),
    ],
)
def test_invalid_values_name_the_field(overrides: list[str], field: str) -> None:
    with pytest.raises(UserError, match=rf"config field {field} = .* is invalid: expected"):
        load_config(None, overrides)


def test_class_weighting_errors_list_the_allowed_values() -> None:
    with pytest.raises(UserError) as error:
        load_config(None, ["loss.class_weights=inverse"])
    assert str(error.value) == (
        "config field loss.class_weights = 'inverse' is invalid: expected"
        " ('none', 'inverse_freq', 'inverse_sqrt', 'inverse_sqrt_log')."
    )
    cfg = load_config(None, ["loss.class_weight_clip=[0.05, 20]", "sweep.search_loss_kinds=[dice_focal, dice]"])
    assert cfg.loss.class_weight_clip == (0.05, 20.0) and cfg.sweep.search_loss_kinds == ("dice_focal", "dice")


def test_loss_weights_only_matter_for_the_model_heads() -> None:
    cfg = load_config(None, ["model.heads=[fine]", "loss.binary=0", "loss.coarse=0", "loss.fine=2"])
    assert cfg.loss.weights(cfg.model.heads) == {"fine": 1.0}
    assert load_config(None, ["model.arch=unet", "train.batch_size=1"]).train.batch_size == 1


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epochs=three", "must be an integer"),
        ("train.epochs=2.5", "must be an integer"),
        ("train.epochs=true", "must be an integer"),
        ("train.lr=fast", "must be a finite number"),
        ("train.lr=.nan", "must be a finite number"),
        ("model.heads=fine", "must be a list"),
        ("model.pretrained=3", "has the wrong type; expected bool or str"),
        ("data.in_memory=yes-please", "must be true or false"),
        ("train=5", "train must be a mapping"),
        ("sweep.encoder_max_batch=[32]", "sweep.encoder_max_batch = \\[32\\] must be a mapping"),
        ("sweep.encoder_max_batch.mit_b3=big", "sweep.encoder_max_batch.mit_b3 = 'big' must be an integer"),
    ],
)
def test_wrong_types(override: str, expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        load_config(None, [override])


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(_yaml(tmp_path, "- a\n- b\n"))
    with pytest.raises(UserError, match="not valid safe YAML"):
        load_config(_yaml(tmp_path, "train: [unclosed\n"))
    assert load_config(_yaml(tmp_path, "")) == Config()


def test_override_syntax() -> None:
    assert parse_overrides(["a.b.c=1", "a.d=[x, y]", "e=null"]) == {"a": {"b": {"c": 1}, "d": ["x", "y"]}, "e": None}
    with pytest.raises(UserError, match="section.field=value"):
        parse_overrides(["train.epochs"])
    with pytest.raises(UserError, match="not valid YAML"):
        parse_overrides(["train.epochs=[1"])


def test_an_encoder_that_needs_a_smaller_batch_trains_at_it_with_the_lr_scaled() -> None:
    """The seeds' rule (POC-5.9: MiT-B3 at 32 with lr 1e-3 x 32 / 96)."""
    sweep = load_config(None, ["sweep.encoders=[convnext_tiny, mit_b3]", "sweep.encoder_max_batch={mit_b3: 32}"]).sweep
    assert sweep.scaled_batch("mit_b3", 96, 1e-3) == (32, pytest.approx(1e-3 * 32 / 96))
    assert sweep.scaled_batch("mit_b3", 16, 1e-3) == (16, 1e-3), "a cap above the batch changes nothing"
    assert sweep.scaled_batch("convnext_tiny", 96, 1e-3) == (96, 1e-3)
