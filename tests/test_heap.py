"""The collector around the stack's imports and at exit: paused inside the block, garbage
from before it collected, the heap frozen only after new modules, and frozen at exit."""

from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path

import pytest

from artefact.heap import collector_paused, exit_process


@pytest.fixture
def unfrozen():
    """Each test starts from a heap with nothing frozen, and leaves it so."""
    gc.unfreeze()
    yield
    gc.unfreeze()


class _Node:
    """Something a reference cycle can be made of, and a weak reference can watch."""

    def __init__(self) -> None:
        self.me = self


def test_imports_run_with_the_collector_paused_and_what_they_made_is_frozen(
    tmp_path: Path, monkeypatch, unfrozen
) -> None:
    (tmp_path / "freshly_imported.py").write_text("LONG_LIVED = [object() for _ in range(1000)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "freshly_imported", raising=False)
    earlier_garbage = weakref.ref(_Node())  # a cycle: only the collector can free it
    with collector_paused():
        assert not gc.isenabled()
        import freshly_imported  # noqa: F401
    assert gc.isenabled()
    assert gc.get_freeze_count() > 1000
    assert earlier_garbage() is None  # collected before the freeze, not kept for good


def test_a_block_that_imports_nothing_new_freezes_nothing(unfrozen) -> None:
    """A reused trial process: the previous trial's objects must stay collectable."""
    with collector_paused():
        import json  # noqa: F401  (loaded already)
    assert gc.get_freeze_count() == 0 and gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_command_exits_with_its_status_and_its_heap_frozen(unfrozen) -> None:
    """Frozen, the heap is skipped by the interpreter's last collection (~2 s at a sweep's end)."""
    assert gc.get_freeze_count() == 0
    with pytest.raises(SystemExit) as exited:
        exit_process(3)
    assert exited.value.code == 3
    assert gc.get_freeze_count() > 0
