"""The cluster trigger of an emergency shred: an annotation on this node's Node object.

``kubectl annotate node NODE luks-ephemeral.csi.io/shred=$(date +%s) --overwrite`` shreds every
volume on the node; a later, different value shreds again; removing the annotation (or setting it
empty) unseals the node, but only if the seal came from the annotation (a seal from the CLI is
the CLI's to lift). A Warning event ``EmergencyShred`` on the Node carries the shred's one-line
summary; a Normal event ``Unsealed`` says when the removal unsealed.

The last value acted on is remembered in ``<state dir>/shred-annotation`` (as its SHA-256, and
its first ``MAX_SHOWN`` characters for a person), so a driver restart does not shred again for
the same value; the state dir is memory-backed, and after a reboot there is nothing left to
shred anyway. A value of any length is a request: a long one is shown (in logs, in the seal)
truncated, and compared by digest, so two long values that share a prefix are still different
requests. When the file cannot be read, nothing counts as handled: a present annotation shreds
(again), which errs on the side the operator asked for.

Only ADDED and MODIFIED watch events are acted on: a DELETED Node has no annotations, and must
not read as "annotation removed".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from csi.kube import KubeError, NodeEvent, WatchExpired
from csi.seal import ANNOTATION as ANNOTATION
from csi.statefiles import (  # re-exported: the watch is where it is read
    fsync_dir,
    read_bounded,
    write_atomically,
)

log = logging.getLogger(__name__)

STATE_FILE = "shred-annotation"
MAX_STATE_BYTES = 4096
MAX_SHOWN = 256  # characters of a value that logs, events and the seal show
SHRED_REASON = "EmergencyShred"
UNSEAL_REASON = "Unsealed"
WATCH_SECONDS = 300  # the server ends each watch after this; we then read the node afresh
BACKOFF = (1.0, 30.0)  # first and longest wait after a failure (seconds), doubling in between
HEALTHY_SESSION = 1.0  # a watch that ends sooner than this counts as a failure (no busy loop)


Notify = Callable[[str, str, str], None]  # (reason, message, type): an Event on the Node


class ShredReport(Protocol):
    @property
    def summary(self) -> str:
        """One line for a person: "shredded 3 of 3 volumes in 0.41 s; node sealed"."""
        ...

    @property
    def complete(self) -> bool:
        """Every key gone."""
        ...


class Shredder(Protocol):
    def shred_all(self, *, trigger: str, annotation: str) -> ShredReport: ...

    def unseal(self, *, trigger: str) -> bool:
        """True if the node was sealed and is now unsealed."""
        ...

    def sealed_by(self) -> str | None:
        """The trigger of the seal ("annotation", "cli", ...), or None when not sealed."""
        ...


class NodeApi(Protocol):
    """What this module needs of ``csi.kube.KubeApi``."""

    def node_annotations(self, name: str) -> tuple[dict[str, str], str]: ...

    def watch_node(
        self, name: str, resource_version: str, timeout_seconds: int
    ) -> ClosableWatch: ...

    def node_event(self, reason: str, message: str, type: str = "Warning") -> None: ...


class ClosableWatch(Protocol):
    def __iter__(self) -> Iterator[NodeEvent]: ...

    def __next__(self) -> NodeEvent: ...

    def close(self) -> None: ...


def shown(value: str) -> str:
    """The value as logs and the seal show it: bounded, one line."""
    value = value.replace("\n", "\\n").replace("\r", "\\r")
    return value if len(value) <= MAX_SHOWN else value[: MAX_SHOWN - 3] + "..."


def digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


class NodeShredWatch:
    """Watches the Node ``node`` and acts on its shred annotation; ``handle`` is the logic.

    ``notify(reason, message, type)`` posts the Node events (default: ``api.node_event``).
    """

    def __init__(
        self,
        api: NodeApi,
        shredder: Shredder,
        node: str,
        state_dir: str,
        *,
        notify: Notify | None = None,
        watch_seconds: int = WATCH_SECONDS,
        backoff: tuple[float, float] = BACKOFF,
    ) -> None:
        self.api = api
        self.notify: Notify = notify if notify is not None else api.node_event
        self.shredder = shredder
        self.node = node
        self.path = os.path.join(state_dir, STATE_FILE)
        self.watch_seconds = watch_seconds
        self.backoff = backoff
        self._handled: str | None = None  # digest of the last value acted on
        self._loaded = False
        self._lock = threading.Lock()  # one handle() at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: ClosableWatch | None = None
        self._watch_lock = threading.Lock()

    # the logic ---------------------------------------------------------------------------
    def handle(self, annotations: Mapping[str, str]) -> str | None:
        """Act on the node's annotations; returns "shred", "unseal" or None (nothing to do).

        A new value shreds, then is remembered (a crash in between shreds again on restart:
        better twice than not at all), then the Warning event is posted. A shred that raises is
        not remembered, so the next look at the node (the next change, or the re-read after each
        watch) tries again.
        """
        value = annotations.get(ANNOTATION, "")
        with self._lock:
            if value:
                return self._shred(value)
            return self._unseal()

    def _shred(self, value: str) -> str | None:
        wanted = digest(value)
        if self._remembered() == wanted:
            return None
        log.warning("node %s: annotation %s=%r asks for an emergency shred of every volume",
                    self.node, ANNOTATION, shown(value))  # fmt: skip
        try:
            report = self.shredder.shred_all(trigger="annotation", annotation=shown(value))
        except Exception as exc:
            log.exception("node %s: the emergency shred failed; retrying on the next look at "
                          "the node", self.node)  # fmt: skip
            self._post(SHRED_REASON, f"emergency shred failed: {type(exc).__name__}: {exc}")
            return None
        self._remember(wanted, value)
        if report.complete:
            log.warning("node %s: emergency shred: %s", self.node, report.summary)
        else:
            log.error("node %s: emergency shred INCOMPLETE: %s", self.node, report.summary)
        self._post(SHRED_REASON, report.summary)
        return "shred"

    def _unseal(self) -> str | None:
        if self._remembered() is not None:
            self._forget()
        if self.shredder.sealed_by() != "annotation":
            return None  # not sealed, or sealed by the CLI: the annotation cannot lift that
        if not self.shredder.unseal(trigger="annotation"):
            return None
        log.warning("node %s: annotation %s removed: node unsealed", self.node, ANNOTATION)
        self._post(UNSEAL_REASON, f"annotation {ANNOTATION} removed: node unsealed; publish and "
                   "stage are accepted again", type="Normal")  # fmt: skip
        return "unseal"

    def _post(self, reason: str, message: str, type: str = "Warning") -> None:
        """An event is news, not the action: its failure is logged and changes nothing."""
        try:
            self.notify(reason, message, type)
        except Exception as exc:
            log.warning("node %s: cannot post event %s: %s", self.node, reason, exc)

    # what was handled ----------------------------------------------------------------------
    def _remembered(self) -> str | None:
        if not self._loaded:
            self._handled = self._load()
            self._loaded = True
        return self._handled

    def _load(self) -> str | None:
        try:
            data = read_bounded(self.path, MAX_STATE_BYTES)
        except OSError as exc:
            log.warning("cannot read %s (%s): no shred annotation counts as handled", self.path,
                        exc)  # fmt: skip
            return None
        if data is None:
            return None
        try:
            if len(data) > MAX_STATE_BYTES:
                raise ValueError(f"longer than {MAX_STATE_BYTES} bytes")
            handled = json.loads(data)["sha256"]
            if not isinstance(handled, str) or len(handled) != 64:
                raise ValueError("no SHA-256 in it")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s is not ours (%s): no shred annotation counts as handled", self.path,
                        exc)  # fmt: skip
            return None
        return handled

    def _remember(self, handled: str, value: str) -> None:
        """Atomically: temp file, fsync, rename, fsync the directory. A failure is logged: the
        shred is done; at worst a restart repeats it."""
        self._handled, self._loaded = handled, True
        data = json.dumps({"sha256": handled, "value": shown(value)}).encode()
        try:
            write_atomically(self.path, data)
        except OSError as exc:
            log.warning("cannot record the handled shred annotation in %s: %s (a restart will "
                        "shred again)", self.path, exc)  # fmt: skip

    def _forget(self) -> None:
        self._handled, self._loaded = None, True
        try:
            os.unlink(self.path)
            fsync_dir(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", self.path, exc)

    # background loop ---------------------------------------------------------------------
    def start(self) -> None:
        """Watch in a daemon thread until ``stop()``."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="node-shred-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop watching: a blocked watch read ends at once; a shred in progress finishes."""
        self._stop.set()
        with self._watch_lock:
            if self._watch is not None:
                self._watch.close()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        delay = self.backoff[0]
        resume: str | None = None  # where the next watch starts: see _session
        while not self._stop.is_set():
            started = time.monotonic()
            failed = False
            try:
                resume = self._session(resume)
            except WatchExpired as exc:
                # from the object's (or the last event's) resourceVersion, which can be older
                # than the API server's watch window: watch from now on instead
                failed = resume == ""  # even a watch from now expired: something is wrong
                resume = ""
                log.info("node %s: watch expired (%s); reading the node again", self.node, exc)
            except KubeError as exc:
                log.warning("node %s: shred annotation watch: %s; retrying in %.1f s",
                            self.node, exc, delay)  # fmt: skip
                failed = True
            except Exception:  # a bug here must not end the watch for good
                log.exception("node %s: shred annotation watch failed", self.node)
                failed = True
            if failed or (resume != "" and time.monotonic() - started < HEALTHY_SESSION):
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, self.backoff[1])
            else:
                delay = self.backoff[0]

    def _session(self, resume: str | None) -> str | None:
        """Read the node and act on it, then act on each change until the watch ends; returns
        the resourceVersion to resume from (the last event's or bookmark's), or None.

        The watch starts from ``resume``; with None from the resourceVersion just read; with ""
        from now (the server then sends the current state first, as an ADDED event).
        """
        annotations, version = self.api.node_annotations(self.node)
        self._handle_safely(annotations)
        if self._stop.is_set():
            return None
        watch = self.api.watch_node(
            self.node, version if resume is None else resume, self.watch_seconds
        )
        with self._watch_lock:
            if self._stop.is_set():
                watch.close()
                return None
            self._watch = watch
        last: str | None = None
        try:
            for kind, annotations, version in watch:
                last = version or last
                if self._stop.is_set():
                    return None
                if kind in ("ADDED", "MODIFIED"):
                    self._handle_safely(annotations)
                # BOOKMARK only moves the resourceVersion on; DELETED is no request at all
        finally:
            with self._watch_lock:
                self._watch = None
            watch.close()
        return last

    def _handle_safely(self, annotations: Mapping[str, str]) -> None:
        try:
            self.handle(annotations)
        except Exception:
            log.exception("node %s: cannot act on the shred annotation", self.node)
