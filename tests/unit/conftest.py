from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.harness import Harness


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()
