"""``set_process_fields``: a gateway's index on every log line when ``server.workers`` > 1."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from qpher_proxy import logs
from qpher_proxy.logs import AccessLog, configure_logging, set_process_fields


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger("qpher")
    saved = (root.handlers[:], root.level, root.propagate, logs._fast_stream)
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        yield out
    finally:
        set_process_fields({})
        root.handlers[:], root.level, root.propagate, logs._fast_stream = saved


def test_every_line_carries_the_process_fields(stream: io.StringIO) -> None:
    set_process_fields({"gateway": 1})
    logging.getLogger("qpher.server").info("serving", extra={"fields": {"listen": ["127.0.0.1:1"]}})
    AccessLog().write({"method": "GET", "status": 200})
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["gateway"] == 1 and lines[0]["listen"] == ["127.0.0.1:1"]
    assert lines[1]["gateway"] == 1 and lines[1]["status"] == 200 and lines[1]["msg"] == "request"


def test_no_process_fields_no_extra_key(stream: io.StringIO) -> None:
    logging.getLogger("qpher.server").info("serving")
    AccessLog().write({"method": "GET"})
    assert all("gateway" not in json.loads(line) for line in stream.getvalue().splitlines())
