"""Session fixtures of the deployment tests (``make test-deploy``): an engine, the base image, the
product image built once from a clean-checkout build context. See ``_docker.py`` for why each is
made the way it is."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._docker import Docker, DockerUnavailable, base_image, build_context, build_image, docker_engine


@pytest.fixture(scope="session")
def docker() -> Iterator[Docker]:
    try:
        with docker_engine() as engine:
            yield engine
    except DockerUnavailable as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"deployment tests cannot run under CI: {exc}")
        pytest.skip(f"deployment tests need a Docker engine: {exc}")


@pytest.fixture(scope="session")
def base(docker: Docker) -> str:
    return base_image(docker)


@pytest.fixture(scope="session")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_context(tmp_path_factory.mktemp("context"))


@pytest.fixture(scope="session")
def image(docker: Docker, base: str, context: Path) -> Iterator[str]:
    tag = f"qpher-proxy:test-{uuid.uuid4().hex[:8]}"
    proc = build_image(docker, context, tag, base=base)
    assert proc.returncode == 0, f"image build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    yield tag
    docker.run("rmi", "-f", tag, check=False)
