"""The import path of sweeps saved before the package layout of #21: Tune pickled their
searcher (``ResumableOptunaSearch``, with its ``SearchSpace``) and their callback
(``ProgressLog``) as ``artefact.search.<name>``, and ``--resume`` unpickles them from there."""

from artefact.tune.progress import ProgressLog
from artefact.tune.space import SearchSpace
from artefact.tune.tuner import ResumableOptunaSearch

__all__ = ["ProgressLog", "ResumableOptunaSearch", "SearchSpace"]
