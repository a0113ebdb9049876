from __future__ import annotations

import grpc
import pytest

from tests.unit.harness import Harness, code_of


def test_publish_then_unpublish_leaves_nothing(harness: Harness) -> None:
    request = harness.publish(attributes={"size": "64Mi"})
    assert harness.host.mount_source(request.target_path) is not None
    assert len(harness.journal_files()) == 1
    harness.unpublish()
    assert harness.leftovers() == []


def test_unknown_parameter_is_invalid_argument(harness: Harness) -> None:
    with pytest.raises(grpc.RpcError) as err:
        harness.publish(attributes={"sise": "1Gi"})
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "sise" in str(err.value.details())
    assert harness.leftovers() == []
