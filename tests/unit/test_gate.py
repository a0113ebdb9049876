"""The node gate: per-volume locks (ABORTED, never a wait) and the node-wide exclusive mode."""

from __future__ import annotations

import threading
import time

import pytest

from csi.errors import Aborted
from csi.gate import NodeGate


def test_second_hold_of_the_same_volume_is_aborted() -> None:
    locks = NodeGate()
    with locks.hold("vol-1"):
        with pytest.raises(Aborted) as err:
            with locks.hold("vol-1"):
                pytest.fail("the second hold must not be entered")
        assert "vol-1" in str(err.value)
        with locks.hold("vol-2"):  # another volume is independent
            pass
    with locks.hold("vol-1"):  # released on exit
        pass


def test_hold_from_another_thread_is_aborted_not_blocked() -> None:
    locks = NodeGate()
    outcome: list[BaseException | None] = []

    def other() -> None:
        try:
            with locks.hold("vol-1"):
                outcome.append(None)
        except Aborted as exc:
            outcome.append(exc)

    with locks.hold("vol-1"):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(5)
        assert not thread.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], Aborted)


def test_lock_is_released_after_an_exception() -> None:
    locks = NodeGate()
    with pytest.raises(RuntimeError), locks.hold("vol-1"):
        raise RuntimeError("boom")
    with locks.hold("vol-1"):
        with pytest.raises(Aborted):
            with locks.hold("vol-1"):
                pass
    with pytest.raises(KeyboardInterrupt), locks.hold("vol-1"):
        raise KeyboardInterrupt  # even a BaseException releases it
    with locks.hold("vol-1"):
        pass


def test_exclusive_waits_for_running_operations_and_refuses_new_ones() -> None:
    gate = NodeGate()
    entered = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def operation() -> None:
        with gate.hold("vol-1"):
            entered.set()
            release.wait(5)
            order.append("operation done")

    worker = threading.Thread(target=operation)
    worker.start()
    assert entered.wait(5)

    def node_wide() -> None:
        with gate.exclusive(timeout=5):
            order.append("exclusive")

    holder = threading.Thread(target=node_wide)
    holder.start()
    time.sleep(0.1)  # the exclusive caller is waiting now: new volume operations are refused
    with pytest.raises(Aborted) as err:
        with gate.hold("vol-2"):
            pytest.fail("a new operation must not start while the node is being taken")
    assert "node-wide" in str(err.value)
    release.set()
    worker.join(5)
    holder.join(5)
    assert order == ["operation done", "exclusive"]
    with gate.hold("vol-2"):  # released: operations run again
        pass


def test_exclusive_gives_up_after_its_timeout_and_leaves_the_gate_open() -> None:
    gate = NodeGate()
    with gate.hold("vol-1"):
        with pytest.raises(Aborted) as err:
            with gate.exclusive(timeout=0.05):
                pytest.fail("must not get the node while vol-1 is busy")
        assert "vol-1" in str(err.value)
        with gate.hold("vol-2"):  # the failed attempt does not keep the node shut
            pass
    with gate.exclusive(timeout=1):
        with pytest.raises(Aborted):
            with gate.exclusive(timeout=1):
                pass
    assert gate.busy() == []
