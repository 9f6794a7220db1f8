"""The main job: an encoder and hyperparameter sweep on ARTeFACT (``--help`` says how).

Run from a checkout; an installed package runs the same job as ``python -m artefact sweep``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from artefact.heap import exit_process  # noqa: E402
from artefact.sweep_cli import main  # noqa: E402

if __name__ == "__main__":
    exit_process(main())
