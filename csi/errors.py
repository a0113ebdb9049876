"""Domain errors and the one table that maps them to gRPC status codes.

The lifecycle raises these; only the servicer layer turns them into gRPC statuses, so the
lifecycle never imports grpc. Messages are meant for a person: say what was wrong and what to do.
Messages must never contain key material (nothing here ever receives it).
"""

from __future__ import annotations


class DriverError(Exception):
    """Base of every error the driver reports to the CO."""


class InvalidArgument(DriverError):
    """The request is malformed or asks for something we do not support."""


class NotFound(DriverError):
    """The volume or path the request names does not exist."""


class AlreadyExists(DriverError):
    """The volume exists with an incompatible capability, readonly flag or parameters."""


class Aborted(DriverError):
    """Another operation on the same volume is in flight; the CO should retry later."""


class ResourceExhausted(DriverError):
    """The capacity budget, the data dir's free space or the volume limit cannot hold it."""


class NamespaceLimitExceeded(ResourceExhausted):
    """A namespace's share of this node (bytes or volume count) cannot hold the volume: inline
    volumes escape ResourceQuota, so this per-node limit is what stops one tenant taking it."""

    def __init__(self, message: str, *, namespace: str, limit: str) -> None:
        super().__init__(message)
        self.namespace = namespace
        self.limit = limit  # "bytes" or "volumes": which of the namespace's limits was hit


class OutOfRange(DriverError):
    """The capacity range asked for cannot be met within this node's size limits."""


class FailedPrecondition(DriverError):
    """The node is not in a state that allows the operation (e.g. the volume is busy)."""


class Unavailable(DriverError):
    """A transient condition (e.g. the target is still busy); retrying may succeed."""


class Internal(DriverError):
    """A host command failed in a way the caller cannot fix."""


class Unimplemented(DriverError):
    """A feature that this build of the driver does not offer yet."""


class Busy(FailedPrecondition):
    """A mount or mapping is still in use; nothing was torn down, kubelet should retry."""


# The one table: domain error -> gRPC status code name (grpc.StatusCode[name]).
STATUS_CODES: dict[type[DriverError], str] = {
    InvalidArgument: "INVALID_ARGUMENT",
    NotFound: "NOT_FOUND",
    AlreadyExists: "ALREADY_EXISTS",
    Aborted: "ABORTED",
    ResourceExhausted: "RESOURCE_EXHAUSTED",
    OutOfRange: "OUT_OF_RANGE",
    FailedPrecondition: "FAILED_PRECONDITION",
    Unavailable: "UNAVAILABLE",
    Internal: "INTERNAL",
    Unimplemented: "UNIMPLEMENTED",
}


def status_code_name(error: BaseException) -> str:
    """The gRPC status code name for an error; anything unknown is INTERNAL."""
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return "INTERNAL"
