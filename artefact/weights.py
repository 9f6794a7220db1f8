"""Pretrained encoder weights in the Hugging Face cache, for compute nodes without network.

timm and SMP download ImageNet weights from the Hugging Face hub into huggingface_hub's
cache (``$HF_HOME/hub``, or ``$HF_HUB_CACHE``) and, with ``HF_HUB_OFFLINE=1``, read them
from there only. So the weights are fetched ahead of time on a machine with network
(``python -m artefact weights fetch``), a sweep checks before it starts that every
encoder's files are cached, and each trial records which files it started from.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import segmentation_models_pytorch as smp
import timm
from huggingface_hub import constants
from huggingface_hub.errors import RemoteEntryNotFoundError
from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives, hf_split

from artefact.errors import Problems, UserError, one_line
from artefact.models import is_smp_native, local_weights_file, resolve_encoder

Log = Callable[[str], None]


@dataclass(frozen=True)
class HubWeights:
    """An encoder's pretrained weights on the hub: the repository and the files its library
    downloads. Each entry of ``files`` is one file, as the names the library tries in turn;
    the last entry holds the weights."""

    encoder: str
    repo_id: str
    revision: str | None
    """None: the repository's main branch (``refs/main`` in the cache)."""
    files: tuple[tuple[str, ...], ...]


def hub_weights(encoder: str) -> HubWeights:
    """Where a resolved encoder's pretrained weights come from, as its library finds them:
    SMP's own encoders from SMP's ImageNet repository at a pinned revision (``config.json``
    and ``model.safetensors``); timm's from the tag's ``hf_hub_id``, where timm 1.0 loads
    ``model.safetensors`` and falls back to ``pytorch_model.bin`` (or the tag's own file)."""
    if is_smp_native(encoder):
        settings = smp.encoders.encoders[encoder]["pretrained_settings"]
        if "imagenet" not in settings:
            raise UserError(
                f"model.pretrained = true: SMP has no ImageNet weights for {encoder} (only {', '.join(settings)});"
                " use model.pretrained=false or a local weights file."
            )
        hub = settings["imagenet"]
        return HubWeights(encoder, hub["repo_id"], hub["revision"], (("config.json",), ("model.safetensors",)))
    try:
        config = timm.get_pretrained_cfg(encoder.removeprefix("tu-"))
    except RuntimeError as error:  # a tag timm does not know
        raise UserError(f"model.encoder = {encoder!r}: {error} timm.list_pretrained() lists the tags.") from None
    if config is None or not config.hf_hub_id:
        raise UserError(
            f"model.pretrained = true: timm has no pretrained weights on the Hugging Face hub for {encoder};"
            " use model.pretrained=false or a local weights file."
        )
    repo_id, revision = hf_split(config.hf_hub_id)
    name = config.hf_hub_filename or HF_WEIGHTS_NAME
    names = (name,) if name.endswith(".safetensors") else (*_get_safe_alternatives(name), name)
    return HubWeights(encoder, repo_id, revision, (names,))


def cached_files(weights: HubWeights) -> list[Path] | None:
    """The cached path of each file of ``weights`` (the first of its names that is cached,
    as the library would load offline), or None when one is missing."""
    found = []
    for names in weights.files:
        paths = (huggingface_hub.try_to_load_from_cache(weights.repo_id, n, revision=weights.revision) for n in names)
        path = next((p for p in paths if isinstance(p, str)), None)
        if path is None:
            return None
        found.append(Path(path))
    return found


def _fetch_command(encoders: Iterable[str]) -> str:
    return f"python -m artefact weights fetch --encoders {shlex.quote(','.join(encoders))}"


def resolve_all(names: Iterable[str], problems: Problems) -> dict[str, str]:
    """Each encoder name as given -> its resolved name; an unknown one becomes a problem
    (with close matches) and is left out, so the other checks still run on the rest."""
    resolved = {}
    for name in names:
        with problems.check():
            resolved[name] = resolve_encoder(name)
    return resolved


def check_cached(encoders: Mapping[str, str], log: Log | None = None) -> None:
    """Refuse encoders whose pretrained weights are not cached, in one line that names them
    and the fetch command: compute nodes read the cache offline. ``encoders`` maps names as
    given to resolved ones. With ``log``, each encoder is also listed (``weights check``)."""
    problems = Problems()
    missing = []
    for given, encoder in encoders.items():
        with problems.check():
            weights = hub_weights(encoder)
            files = cached_files(weights)
            if files is None:
                missing.append(given)
            if log is not None:
                log(_line("cached" if files else "missing", given, _where(weights, files)))
    if missing:
        problems.add(
            f"model.pretrained = true: the pretrained weights of {', '.join(missing)} are not in the Hugging Face"
            f" cache {constants.HF_HUB_CACHE}; on a machine with network (same HF_HOME) run: {_fetch_command(missing)}"
        )
    problems.raise_any()


def check_pretrained(pretrained: bool | str, encoders: Mapping[str, str]) -> None:
    """The weights ``model.pretrained`` asks for are there: its local file, or (true) every
    encoder's files in the Hugging Face cache."""
    if isinstance(pretrained, str):
        local_weights_file(pretrained)
    elif pretrained:
        check_cached(encoders)


def fetch_missing(encoders: Mapping[str, str], log: Log = print) -> None:
    """Download each encoder's weights that are not cached yet (huggingface_hub draws a
    progress bar per file). Cached ones are left alone, without asking the network."""
    problems = Problems()
    wanted: list[tuple[str, HubWeights]] = []
    for given, encoder in encoders.items():
        with problems.check():
            weights = hub_weights(encoder)
            files = cached_files(weights)
            if files is None:
                wanted.append((given, weights))
            else:
                log(_line("cached", given, _where(weights, files)))
    if wanted and huggingface_hub.is_offline_mode():
        problems.add(
            f"weights fetch: HF_HUB_OFFLINE is set, so the weights of {', '.join(g for g, _ in wanted)} cannot be"
            " downloaded; run this on a machine with network (a login node) without HF_HUB_OFFLINE."
        )
        wanted = []
    for given, weights in wanted:
        log(_line("fetching", given, weights.repo_id))
        try:
            _download(weights)
        except OSError as error:  # the hub's HTTP errors and an unreachable network are OSErrors
            problems.add(
                f"weights fetch: cannot download {weights.repo_id} for {given} ({one_line(error)}); check the"
                " network, then run the same command again."
            )
    problems.raise_any()


def _download(weights: HubWeights) -> None:
    for names in weights.files:
        for name in names:
            try:
                huggingface_hub.hf_hub_download(weights.repo_id, name, revision=weights.revision)
                break
            except RemoteEntryNotFoundError:  # the repository lacks this name: try the next, as the library does
                if name == names[-1]:
                    raise


def weights_source(pretrained: bool | str, encoder: str) -> str:
    """What a trial's encoder starts from, for its MLflow run: ``none`` (scratch), the hub
    repository at the commit of the cached files (``<repo>@<commit>``), or
    ``file:<path> sha256:<digest>``. Raises the fetch hint when the cache lacks them."""
    if pretrained is False:
        return "none"
    if isinstance(pretrained, str):
        path = local_weights_file(pretrained).resolve()
        with path.open("rb") as file:
            return f"file:{path} sha256:{hashlib.file_digest(file, 'sha256').hexdigest()}"
    weights = hub_weights(encoder)
    files = cached_files(weights)
    if files is None:
        check_cached({encoder: encoder})
    return _where(weights, files)


def _where(weights: HubWeights, files: list[Path] | None) -> str:
    """``<repo>@<commit>``: the snapshot folder a cached file lies in is named by its commit."""
    return f"{weights.repo_id}@{files[-1].parent.name}" if files else weights.repo_id


def _line(state: str, encoder: str, where: str) -> str:
    return f"{state:<9}{encoder:<32} {where}"
