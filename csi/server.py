"""The gRPC server on a unix socket, with a logging interceptor and graceful shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc

from csi.logs import sanitize

log = logging.getLogger("csi.rpc")

MAX_WORKERS = 32
GRACE_SECONDS = 30.0


if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor


class LoggingInterceptor(_Interceptor):
    """Logs every RPC as one JSON line: method, volume id, duration, code; secrets stripped."""

    def __init__(self, observe: Callable[[str, str, float], None] | None = None) -> None:
        self.observe = observe

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = details.method.rsplit("/", 1)[-1]

        def logged(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.monotonic()
            code = "OK"
            try:
                return inner(request, context)
            except Exception:
                code = _code_name(context, default="UNKNOWN")
                raise
            finally:
                elapsed = time.monotonic() - start
                if code == "OK":
                    code = _code_name(context, default="OK")
                fields = {
                    "method": method,
                    "volume_id": getattr(request, "volume_id", "") or None,
                    "duration_ms": round(elapsed * 1000, 1),
                    "code": code,
                    "request": sanitize(request),
                }
                details_text = _details(context)
                if details_text:
                    fields["error"] = details_text
                level = logging.INFO if code == "OK" else logging.WARNING
                log.log(level, "rpc %s %s", method, code, extra={"fields": fields})
                if self.observe is not None:
                    self.observe(method, code, elapsed)

        return grpc.unary_unary_rpc_method_handler(
            logged,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _code_name(context: grpc.ServicerContext, default: str) -> str:
    code = context.code() if hasattr(context, "code") else None
    return code.name if isinstance(code, grpc.StatusCode) else default


def _details(context: grpc.ServicerContext) -> str:
    details = context.details() if hasattr(context, "details") else None
    if isinstance(details, bytes):
        return details.decode(errors="replace")
    return str(details) if details else ""


class Server:
    """Owns the grpc.Server and its socket file."""

    def __init__(
        self,
        socket_path: str,
        register: list[Callable[[grpc.Server], None]],
        interceptor: LoggingInterceptor | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="rpc"),
            interceptors=[interceptor or LoggingInterceptor()],
        )
        for add in register:
            add(self.grpc)

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.socket_path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # a stale socket from a crashed run
        self.grpc.add_insecure_port(f"unix://{self.socket_path}")
        self.grpc.start()
        log.info("serving on unix://%s", self.socket_path)

    def stop(self, grace: float = GRACE_SECONDS) -> None:
        """Refuse new RPCs, let in-flight ones finish (up to ``grace``), remove the socket."""
        self.grpc.stop(grace).wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        log.info("stopped")


def wait_for_signal(stop: threading.Event) -> None:
    while not stop.wait(3600):
        pass
