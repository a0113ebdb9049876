"""Glue between servicers and domain errors: one decorator turns a DriverError into a status."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from csi.errors import DriverError, status_code_name

log = logging.getLogger(__name__)

R = TypeVar("R")
Handler = Callable[[Any, Any, grpc.ServicerContext], R]


def handles_errors(method: Handler[R]) -> Handler[R]:
    """Abort the call with the table's status code; unexpected errors become INTERNAL."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> R:
        try:
            return method(self, request, context)
        except DriverError as exc:
            context.abort(grpc.StatusCode[status_code_name(exc)], str(exc))
        except Exception as exc:
            log.exception("unexpected error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper
