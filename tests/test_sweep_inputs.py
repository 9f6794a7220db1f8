"""Bad input to the main job: a clear one-line error, exit code 2, and nothing started or written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sweep_helpers import import_script

from artefact.train.hardware import arch_supported

REPO = Path(__file__).resolve().parents[1]
encoder_bench = import_script("encoder_bench")
V100_BUILT = arch_supported("sm_70", torch.cuda.get_arch_list())


def test_help_documents_every_flag(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        encoder_bench.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--profile",
        "--data",
        "--mode",
        "--encoders",
        "--trials",
        "--epochs",
        "--name",
        "--resume",
        "--tracking-uri",
        "--address",
        "--seeds",
        "--set",
        "--verbose",
        "--check",
    ):
        assert flag in text, flag


def test_a_new_sweep_never_joins_an_existing_one_in_the_store(tmp_path: Path, capsys, monkeypatch) -> None:
    from artefact.tracking.store import open_sweep

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    open_sweep(store, "taken", {"profile": "cpu-smoke"})
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    code = encoder_bench.main(["--results", str(tmp_path / "results"), "--tracking-uri", store, "--name", "taken"])
    err = capsys.readouterr().err
    assert code == 2 and "already has a sweep named 'taken'" in err, err
    assert not (tmp_path / "results" / "taken").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA is not usable")
def test_a_gpu_profile_never_falls_back_to_the_cpu(tmp_path: Path, capsys, bad_input_tried) -> None:
    """The sweep itself, not only --check: it stops before any cluster, store or folder."""
    argv = ["--profile", "laptop", "--set", "model.pretrained=false", "--results", str(tmp_path / "results")]
    argv += ["--workspace", str(tmp_path / "ws"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert encoder_bench.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: profile laptop asks for GPUs (resources.gpus_per_worker = 1) but CUDA is not usable here" in err
    assert list(tmp_path.iterdir()) == []
    bad_input_tried("GPU profile without CUDA")


def test_a_prepared_cache_given_as_data_fixes_the_recorded_split(synthetic_cache: Path, tmp_path: Path) -> None:
    import json

    from artefact.config import Config, SweepRequest
    from artefact.sweep import _with_cache_split

    cfg = Config().replace(data={"path": str(synthetic_cache), "val_fraction": 0.5, "split_seed": 9})
    request = SweepRequest(cfg, "cpu-smoke", tmp_path / "p.yaml", "x", tmp_path, tmp_path, "sqlite:///x.db")
    recorded = _with_cache_split(request).cfg.data
    prepared = json.loads((synthetic_cache / "manifest.json").read_text())["params"]
    assert (recorded.val_fraction, recorded.split_seed) == (prepared["val_fraction"], prepared["split_seed"])
    assert recorded.path == str(synthetic_cache)


def test_a_sweep_that_fails_before_any_trial_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    """E.g. the local cluster refusing to start: the same command can then simply be run again."""
    from artefact import sweep
    from artefact.config import Config, SweepRequest
    from artefact.errors import UserError
    from artefact.tracking.store import sweep_exists
    from artefact.tune import cluster

    def refuse(address, verbose):
        raise UserError("the local Ray cluster bound to 10.0.0.1 instead of 127.0.0.1")

    monkeypatch.setattr(cluster, "connect", refuse)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    profile = REPO / "sweeps" / "cpu-smoke.yaml"
    request = SweepRequest(Config(), "cpu-smoke", profile, "early", tmp_path / "results", tmp_path / "ws", store)
    with pytest.raises(UserError, match="bound to"):
        sweep.run(request, log=lambda *_: None)
    assert not (tmp_path / "results" / "early").exists()
    assert not sweep_exists(store, "early")


@pytest.mark.parametrize(
    ("flags", "code", "expected"),
    [
        (
            # As cluster/submit.sh checks it on a login node: no GPU there, weights not wanted here.
            ["--profile", "laptop", "--check=elsewhere", "--set", "model.pretrained=false"],
            0,
            "ok: profile laptop, search mode, encoders convnext_tiny, swin_tiny, coatnet_0",
        ),
        (
            # The V100S's sm_70 needs a CUDA 12 build; PyPI's default (CUDA 13) has none.
            ["--profile", "v100s-x2", "--check=elsewhere", "--set", "model.pretrained=false"],
            0 if V100_BUILT else 2,
            "ok: profile v100s-x2" if V100_BUILT else "gpu_arch of this profile is sm_70, but this torch",
        ),
        (["--encoders", "mit_b3,segformer_b0"], 0, "ok: profile cpu-smoke, search mode, encoders mit_b3, segformer_b0"),
        (["--encoders", "convnext_tinny"], 2, "Close matches: convnext_tiny"),
        (["--set", "train.epoch=3"], 2, "unknown config key train.epoch"),
        (["--name", "../x"], 2, "--name '../x'"),
    ],
    ids=["good", "v100-build", "smp-encoders", "bad-encoder", "bad-key", "bad-name"],
)
def test_check_only_checks_and_starts_nothing(tmp_path: Path, capsys, flags, code, expected) -> None:
    """What cluster/submit.sh and the SLURM job run before anything is queued or started."""
    argv = ["--check", "--results", str(tmp_path / "results"), "--workspace", str(tmp_path / "ws"), *flags]
    assert encoder_bench.main(argv + ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == code
    captured = capsys.readouterr()
    assert expected in captured.out + captured.err
    assert list(tmp_path.iterdir()) == []  # no results, cache or store


def test_check_reports_every_problem_at_once(tmp_path: Path, capsys, monkeypatch) -> None:
    """One line per problem, so that one --check run shows everything to fix."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))  # empty
    argv = ["--check", "--profile", "v100s-x2", "--encoders", "convnext_tinny,convnext_tiny,mit_b3"]
    argv += ["--set", "model.pretrained=true", "--set", "resources.gpu_memory_gb=4", "--data", str(tmp_path / "no")]
    assert encoder_bench.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    expected = [
        "'convnext_tinny' is neither a timm model nor an SMP encoder",
        "with convnext_tiny (unet, 384 px) needs about",
        "with mit_b3 (unet, 384 px) needs about",
        "the pretrained weights of convnext_tiny, mit_b3 are not in the Hugging Face cache",
        f"--data {tmp_path / 'no'}: no such file or folder.",
    ]
    if not V100_BUILT:
        expected.append("resources.gpu_arch of this profile is sm_70")
    if not torch.cuda.is_available():
        expected.append("profile v100s-x2 asks for GPUs (resources.gpus_per_worker = 0.5) but CUDA is not usable here")
    assert len(lines) == len(expected), lines
    for part in expected:
        assert [line.startswith("error: ") for line in lines if part in line] == [True], (part, lines)
