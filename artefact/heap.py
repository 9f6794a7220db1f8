"""Importing the torch, Ray and MLflow stacks with the garbage collector paused.

Those imports create some 650,000 long-lived objects, and CPython's collector walks all of
them again and again while they arrive: on this 2-core machine the sweep's driver imports
in 5.8 s instead of 8.4 s with it paused. Frozen afterwards, those objects are also skipped
by later full collections (rare: none ran in two cpu-smoke training epochs).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the collector around a block of imports; if they loaded new modules, freeze the heap.

    Freezing keeps the heap's garbage cycles forever: about 10,000 small objects after the
    whole stack, harmless before any model exists. A block that found its modules loaded
    already (a reused trial process) freezes nothing, so no earlier trial's garbage is kept.
    """
    loaded = len(sys.modules)
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if len(sys.modules) > loaded:
            gc.freeze()
        if enabled:
            gc.enable()
