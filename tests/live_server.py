"""A real uvicorn server (several worker processes) on a loopback port, for tests whose
claims are about real HTTP and real concurrency across workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_server(database_url: str, *, workers: int = 2, env: dict[str, str] | None = None,
                startup_timeout: float = 60.0) -> Iterator[str]:
    """Serve ``service.main:app`` on 127.0.0.1 and yield its FHIR base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    environment = {**os.environ, "YILIAN_DATABASE_URL": database_url, "YILIAN_BASE_URL": f"{base}/fhir",
                   "YILIAN_AUTH": "off", "YILIAN_LOG_LEVEL": "warning",
                   # the test process holds connections too: stay well below max_connections
                   "YILIAN_DATABASE_POOL_SIZE": "10", **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(workers), "--log-level", "warning"],
        cwd=ROOT, env=environment, start_new_session=True,
    )
    try:
        wait_healthy(base, process, startup_timeout)
        yield f"{base}/fhir"
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (supervisor and workers), SIGKILL if it lingers."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def wait_healthy(base: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was healthy")
        try:
            if httpx.get(f"{base}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server at {base} was not healthy after {timeout:.0f} s")
