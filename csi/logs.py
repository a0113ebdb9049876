"""Structured logging: one JSON object per line, and request sanitising for RPC logs."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from google.protobuf.message import Message

from csi.proto import csi_pb2

STRIPPED = "***stripped***"
MAX_LOGGED_STRING = 256  # a hostile 1 MB parameter must not land whole in every log line


def sanitize(message: Message) -> dict[str, Any]:
    """The message as a dict with every field marked ``csi_secret`` replaced by a placeholder."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.GetOptions().Extensions[csi_pb2.csi_secret]:  # type: ignore[index]
            out[field.name] = STRIPPED
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.name] = {_plain(k): _plain(v) for k, v in value.items()}
        elif field.message_type is not None and field.is_repeated:
            out[field.name] = [sanitize(v) for v in value]
        elif field.message_type is not None:
            out[field.name] = sanitize(value)
        elif field.is_repeated:
            out[field.name] = [_plain(v) for v in value]
        else:
            out[field.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Message):
        return sanitize(value)
    if isinstance(value, str) and len(value) > MAX_LOGGED_STRING:
        return f"{value[:MAX_LOGGED_STRING]}... ({len(value)} characters)"
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, sort_keys=False)


def setup(log_format: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
