from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.harness import Harness


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


@pytest.fixture
def h() -> Iterator[Harness]:
    """A driver in ``all`` mode: Identity, Controller and Node services on one socket."""
    harness = Harness(mode="all")
    yield harness
    harness.close()
