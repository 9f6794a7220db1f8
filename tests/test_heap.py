"""The collector pause around first imports: paused inside, frozen heap only after new modules."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

from artefact.heap import collector_paused


def test_imports_run_with_the_collector_paused_and_what_they_made_is_frozen(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "freshly_imported.py").write_text("LONG_LIVED = [object() for _ in range(1000)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "freshly_imported", raising=False)
    gc.unfreeze()
    try:
        with collector_paused():
            assert not gc.isenabled()
            import freshly_imported  # noqa: F401
        assert gc.isenabled()
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()


def test_a_block_that_imports_nothing_new_freezes_nothing() -> None:
    """A reused trial process: the previous trial's garbage must stay collectable."""
    gc.unfreeze()
    with collector_paused():
        import json  # noqa: F401  (loaded already)
    assert gc.get_freeze_count() == 0 and gc.isenabled()
