"""Structured logging: one JSON object per line (or plain text), never a secret.

Loggers are named ``qpher.<layer>``. Callers pass facts through ``extra={"fields": {...}}``;
the formatter copies them into the JSON object. Nothing here inspects values for secrets: the
rule is enforced where values are produced (no caller passes a key, a plaintext or a secret).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from ._json import compact_encoder, iso_millis

_STD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

# Fields on every line of this process (a gateway's index when server.workers > 1), and the
# same as a JSON fragment (``"gateway":1,``) for the access log's fast path.
_process_fields: dict[str, Any] = {}
_process_json = ""


def set_process_fields(fields: dict[str, Any]) -> None:
    """Add ``fields`` to every log line this process writes from now on."""
    global _process_json
    _process_fields.clear()
    _process_fields.update(fields)
    _process_json = json.dumps(fields, separators=(",", ":"), default=str)[1:-1] + "," if fields else ""


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        obj.update(_process_fields)
        fields = record.__dict__.get("fields")
        if isinstance(fields, dict):
            obj.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            # The type and a traceback for operators; exception messages in this product are
            # safe by construction (QpherError), foreign ones are mapped before they get here.
            obj["exc_type"] = record.exc_info[0].__name__
            obj["traceback"] = self.formatException(record.exc_info)
        return json.dumps(obj, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        fields = record.__dict__.get("fields")
        if _process_fields:
            fields = {**_process_fields, **(fields if isinstance(fields, dict) else {})}
        if isinstance(fields, dict) and fields:
            base += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return base


_fast_stream: TextIO | None = None  # the JSON handler's stream, for the access log's fast path


_dumps_line = compact_encoder(ensure_ascii=True, default=str)


class AccessLog:
    """One line per request on the ``qpher.access`` logger.

    With the JSON format configured by :func:`configure_logging`, the line is written straight
    to the handler's stream (the same JSON shape the formatter makes, at a third of the cost of
    building a ``LogRecord``); otherwise it goes through ``logging`` as usual."""

    def __init__(self) -> None:
        self._logger = logging.getLogger("qpher.access")

    def write(self, fields: dict[str, Any]) -> None:
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        stream = _fast_stream
        if stream is None:
            logger.info("request", extra={"fields": fields})
            return
        head = f'{{"ts":"{iso_millis(time.time())}","level":"info","logger":"qpher.access","msg":"request",'
        try:
            stream.write(head + _process_json + _dumps_line(fields)[1:] + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # as logging.Handler.handleError would: a log line never fails a request


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    global _fast_stream
    _fast_stream = (stream or sys.stderr) if fmt == "json" else None
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("qpher")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
