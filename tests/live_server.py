"""A real server process (`python -m server`) on a loopback port, for SDK-level tests.

`ServerProcess` is reusable: tests that restart or kill the server start their own on a given
root (checkpoint directory, hence the same metadata database, and the same port).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/api/v1/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server at {url} did not become healthy in {timeout} s")


def cache_dir(root: Path) -> Path:
    """The built-in model and compilation cache (shared across test servers when TUFT_TEST_CACHE is set)."""
    return Path(os.environ.get("TUFT_TEST_CACHE", root / "cache"))


class ServerProcess:
    """`python -m server` (or `launcher`) serving `root/checkpoints` on a fixed port, so a
    restarted server is reachable at the same URL by clients that are still polling."""

    def __init__(
        self,
        root: Path,
        *,
        port: int | None = None,
        args: Sequence[str] = (),
        launcher: Sequence[str] = ("-m", "server"),
    ) -> None:
        self.root = root
        self.checkpoint_dir = root / "checkpoints"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = list(args)
        self.launcher = list(launcher)
        self.process: subprocess.Popen | None = None
        self._starts = 0

    def start(self) -> ServerProcess:
        self._starts += 1
        log = (self.root / f"server-{self._starts}.log").open("w")
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
        command = [
            sys.executable, *self.launcher,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--checkpoint-dir", str(self.checkpoint_dir),
            "--cache-dir", str(cache_dir(self.root)),
            *self.args,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        wait_until_healthy(self.url, self.process)
        return self

    def kill(self) -> None:
        """`kill -9`: no shutdown handlers, nothing flushed that was not already written."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)

    def log(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.root.glob("server-*.log")))
