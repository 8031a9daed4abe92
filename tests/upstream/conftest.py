"""Collect garbage after every test, so that a leaked socket or generator is reported (as an
error, under ``filterwarnings = error``) by the test that leaked it, not by a later one."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    yield
    gc.collect()
