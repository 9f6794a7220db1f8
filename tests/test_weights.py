"""Pretrained weights offline: a real Hugging Face cache, laid out as huggingface_hub writes
it, for a tiny timm encoder and one of SMP's own; models built and trained from it with
HF_HUB_OFFLINE=1; ``weights check`` / ``weights fetch``; what each trial records."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from builders import REPO, run_cli
from huggingface_hub import constants
from huggingface_hub.errors import RemoteEntryNotFoundError
from safetensors.torch import save as safetensors_bytes
from sweep_helpers import import_script
from torch import nn

from artefact import cli, weights
from artefact.config import Config, ModelConfig
from artefact.errors import UserError
from artefact.models import build_model
from artefact.train.reporters import trial_params

TIMM_REPO = timm.get_pretrained_cfg("test_convnext").hf_hub_id
"""Where timm fetches test_convnext's default tag from, as timm itself says."""
SMP_HUB = smp.encoders.encoders["mit_b0"]["pretrained_settings"]["imagenet"]
"""SMP's repository and pinned revision for mit_b0's ImageNet weights."""
encoder_bench = import_script("encoder_bench")


@dataclass(frozen=True)
class Cache:
    hf_home: Path
    timm_commit: str
    timm_state: dict[str, torch.Tensor]
    """test_convnext's cached weights (the whole classifier, as timm's hub files hold)."""
    smp_state: dict[str, torch.Tensor]
    """mit_b0's cached weights (the encoder's own state dict, as SMP's hub files hold)."""


def _shifted(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's weights moved by 0.5, so that they differ from any fresh initialisation."""
    return {k: (v + 0.5 if v.is_floating_point() else v).contiguous() for k, v in module.state_dict().items()}


def _add_to_cache(hub: Path, repo_id: str, files: dict[str, bytes], revision: str | None = None) -> str:
    """Lay files out as huggingface_hub does: blobs named by their sha256, a snapshot folder
    per commit of links to them, and refs/main naming the commit (unless one is pinned)."""
    commit = revision or hashlib.sha1(repo_id.encode()).hexdigest()
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    if revision is None:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        (snapshot / name).symlink_to(f"../../blobs/{digest}")
    return commit


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Cache:
    hf_home = tmp_path_factory.mktemp("hf_home")
    torch.manual_seed(0)
    timm_state = _shifted(timm.create_model("test_convnext"))
    smp_state = _shifted(smp.encoders.get_encoder("mit_b0"))
    commit = _add_to_cache(hf_home / "hub", TIMM_REPO, {"model.safetensors": safetensors_bytes(timm_state)})
    smp_files = {"config.json": b"{}", "model.safetensors": safetensors_bytes(smp_state)}
    _add_to_cache(hf_home / "hub", SMP_HUB["repo_id"], smp_files, SMP_HUB["revision"])
    return Cache(hf_home, commit, timm_state, smp_state)


@pytest.fixture
def offline(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> Cache:
    """This process reads the test's cache and never the network. huggingface_hub reads
    HF_HOME and HF_HUB_OFFLINE on import, so its constants are set instead."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache.hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_timm_and_smp_encoders_load_the_cached_weights_offline(offline: Cache) -> None:
    timm_model = build_model(ModelConfig(encoder="tu-test_convnext", pretrained=True), 64)
    assert torch.equal(timm_model.encoder.model.stem_0.weight, offline.timm_state["stem.0.weight"])
    smp_model = build_model(ModelConfig(encoder="mit_b0", pretrained=True), 64)
    assert torch.equal(smp_model.encoder.patch_embed1.proj.weight, offline.smp_state["patch_embed1.proj.weight"])
    scratch = build_model(ModelConfig(encoder="mit_b0", pretrained=False), 64)
    assert not torch.equal(scratch.encoder.patch_embed1.proj.weight, offline.smp_state["patch_embed1.proj.weight"])


def test_a_missing_cache_entry_names_the_fetch_command(empty_cache: Path) -> None:
    with pytest.raises(
        UserError, match=r"not in the Hugging Face cache .*run: python -m artefact weights fetch --encoders mit_b0$"
    ):
        build_model(ModelConfig(encoder="mit_b0", pretrained=True), 64)


def test_a_local_file_loads_into_an_smp_encoder_or_is_refused_by_name(cache: Cache, tmp_path: Path) -> None:
    fits = tmp_path / "mit_b0.pth"
    torch.save(cache.smp_state, fits)
    model = build_model(ModelConfig(encoder="mit_b0", pretrained=str(fits)), 64)
    assert torch.equal(model.encoder.patch_embed1.proj.weight, cache.smp_state["patch_embed1.proj.weight"])

    other = tmp_path / "convnext.safetensors"
    other.write_bytes(safetensors_bytes(cache.timm_state))
    with pytest.raises(
        UserError,
        match=rf"model\.pretrained = '{other}': its weights do not fit encoder mit_b0 \(\d+ of its keys missing",
    ):
        build_model(ModelConfig(encoder="mit_b0", pretrained=str(other)), 64)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not weights")
    with pytest.raises(UserError, match=rf"model\.pretrained = '{garbage}': cannot read weights from it"):
        build_model(ModelConfig(encoder="mit_b0", pretrained=str(garbage)), 64)


def test_weights_check_lists_each_encoder_and_exits_2_when_one_is_missing(offline: Cache, capsys) -> None:
    assert cli.main(["weights", "check", "--encoders", "tu-test_convnext,segformer_b0"]) == 0
    out = capsys.readouterr().out
    assert "cached   tu-test_convnext" in out and f"{TIMM_REPO}@{offline.timm_commit}" in out
    assert f"{SMP_HUB['repo_id']}@{SMP_HUB['revision']}" in out

    assert cli.main(["weights", "check", "--encoders", "tu-test_convnext,test_resnet,mit_b1"]) == 2
    captured = capsys.readouterr()
    assert "missing  test_resnet" in captured.out and "missing  mit_b1" in captured.out
    (line,) = captured.err.splitlines()
    assert line.startswith("error: ") and line.endswith("weights fetch --encoders test_resnet,mit_b1")


def test_weights_fetch_offline_fails_in_one_line_naming_the_encoders(offline: Cache, capsys) -> None:
    assert cli.main(["weights", "fetch", "--encoders", "tu-test_convnext,test_resnet"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "HF_HUB_OFFLINE is set, so the weights of test_resnet cannot be downloaded" in line


def test_weights_fetch_with_everything_cached_asks_nothing_of_the_network(
    cache: Cache, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache.hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(weights.huggingface_hub, "hf_hub_download", mock.Mock(side_effect=AssertionError))
    assert cli.main(["weights", "fetch", "--encoders", "tu-test_convnext,mit_b0"]) == 0
    out = capsys.readouterr().out
    assert out.count("cached   ") == 2 and "all 2 encoders' weights are in the Hugging Face cache" in out


def test_fetch_tries_timms_names_in_timms_order(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repository without model.safetensors: timm then loads pytorch_model.bin, so fetch that."""
    repo = timm.get_pretrained_cfg("test_resnet").hf_hub_id
    calls = []

    def download(repo_id: str, filename: str, revision: str | None = None) -> str:
        calls.append((repo_id, filename, revision))
        if (repo_id, filename) == (repo, "model.safetensors"):
            raise RemoteEntryNotFoundError("404", response=mock.MagicMock())
        return "somewhere"

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(weights.huggingface_hub, "hf_hub_download", download)
    weights.fetch_missing({"test_resnet": "tu-test_resnet", "mit_b0": "mit_b0"}, log=lambda _: None)
    assert calls[:2] == [(repo, "model.safetensors", None), (repo, "pytorch_model.bin", None)]
    # SMP's own: both files at the pinned revision.
    assert calls[2:] == [
        (SMP_HUB["repo_id"], name, SMP_HUB["revision"]) for name in ("config.json", "model.safetensors")
    ]


def test_each_trial_records_where_its_weights_came_from(offline: Cache, tmp_path: Path) -> None:
    def source(pretrained: bool | str) -> str:
        return trial_params(Config(model=ModelConfig(encoder="test_convnext", pretrained=pretrained)))["weights_source"]

    assert source(True) == f"{TIMM_REPO}@{offline.timm_commit}"
    assert source(False) == "none"
    file = tmp_path / "weights.safetensors"
    file.write_bytes(safetensors_bytes(offline.timm_state))
    assert source(str(file)) == f"file:{file.resolve()} sha256:{hashlib.sha256(file.read_bytes()).hexdigest()}"


def test_check_refuses_missing_weights_and_passes_once_they_are_cached(offline: Cache, capsys) -> None:
    flags = ["--check", "--profile", "cpu-smoke", "--set", "model.pretrained=true"]
    assert encoder_bench.main([*flags, "--encoders", "tu-test_convnext,mit_b0"]) == 0
    assert encoder_bench.main([*flags, "--encoders", "tu-test_convnext,test_resnet"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("run: python -m artefact weights fetch --encoders test_resnet")


@pytest.mark.slow
def test_training_offline_starts_from_the_cached_weights(
    cache: Cache, tmp_path: Path, synthetic_workspace: Path, synthetic_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole path in a fresh process, as a compute node runs it: HF_HOME and HF_HUB_OFFLINE=1."""
    monkeypatch.setenv("HF_HOME", str(cache.hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    out = tmp_path / "run"
    result = run_cli(
        "train",
        "--config",
        str(REPO / "sweeps" / "cpu-smoke.yaml"),
        "--out",
        str(out),
        "--workspace",
        str(synthetic_workspace),
        "model.pretrained=true",
        "model.heads=[fine]",
        "train.epochs=1",
        "train.steps_per_epoch=1",
        "train.device=cpu",
    )
    assert result.returncode == 0, result.stderr
    trained = torch.load(out / "latest" / "checkpoint.pt", weights_only=False)["model"]["encoder.model.stem_0.weight"]
    # One AdamW step at lr 2e-3 moves each weight by about 2e-3; the cached ones are 0.5 from any fresh start.
    assert (trained - cache.timm_state["stem.0.weight"]).abs().max() < 0.05
