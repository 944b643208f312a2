"""Starts the real server (`python -m server`) on a loopback port for SDK-level tests.

`server_url` is the shared session-wide server; tests that kill or restart a server start
their own `live_server.ServerProcess`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from live_server import ServerProcess


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = ServerProcess(tmp_path_factory.mktemp("server"))
    try:
        yield server.start().url
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def _sdk_environment() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TINKER_TELEMETRY"] = "0"
