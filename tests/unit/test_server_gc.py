"""The coordinator's garbage-collector settings once it serves."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from accord.coordinator._server import GC_THRESHOLDS, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("restore_gc")
def test_start_up_objects_are_frozen_and_collections_rarer() -> None:
    kept = [object() for _ in range(10)]
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    tune_gc()
    assert gc.get_threshold() == GC_THRESHOLDS
    assert GC_THRESHOLDS[0] > 700  # rarer than CPython's default
    # Everything alive at start-up (these objects included) is out of the collector's sight.
    assert gc.get_freeze_count() > len(kept)
    # A cycle made after start-up is still collected.
    a: list[object] = []
    a.append(a)
    assert gc.is_tracked(a)
    del a
    assert gc.collect() >= 1
