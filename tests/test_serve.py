"""``yilian serve --workers N`` gives every worker a listening socket of its own (service/serve.py),
so that the kernel spreads keep-alive connections over the workers instead of piling them on
the worker that waited last."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from service.serve import balances_listeners
from tests.live_server import ROOT, free_port, stop, wait_healthy

pytestmark = pytest.mark.skipif(not balances_listeners(), reason="SO_REUSEPORT balancing is Linux's")

LISTEN, ESTABLISHED = "0A", "01"


@contextmanager
def yilian_serve(database_url: str, workers: int) -> Iterator[tuple[int, subprocess.Popen]]:
    port = free_port()
    env = {**os.environ, "YILIAN_DATABASE_URL": database_url, "YILIAN_AUTH": "off", "YILIAN_LOG_LEVEL": "warning",
           "YILIAN_DATABASE_POOL_SIZE": "4", "YILIAN_BASE_URL": f"http://127.0.0.1:{port}/fhir"}
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                                "--workers", str(workers)], cwd=ROOT, env=env, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, 60.0)
        yield port, process
    finally:
        stop(process)


def _sockets(port: int, state: str) -> list[str]:
    """Inodes of this host's IPv4 TCP sockets on local ``port`` in ``state``."""
    inodes = []
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for line in table:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == state:
                inodes.append(fields[9])
    return inodes


def _owners(inodes: list[str]) -> Counter[int]:
    """How many of these sockets each process holds."""
    wanted, owners = {f"socket:[{inode}]" for inode in inodes}, Counter[int]()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:  # gone, or not ours to look at
            continue
        owners[int(pid)] += len(links & wanted)
    return +owners


def _wait_for(condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_each_worker_listens_and_keep_alive_connections_spread_over_them(engine: object, database_url: str) -> None:
    with yilian_serve(database_url, workers=2) as (port, server):
        _wait_for(lambda: len(_owners(_sockets(port, LISTEN))) >= 2)  # the second worker may start later
        listeners = _owners(_sockets(port, LISTEN))
        assert len(listeners) == 2 and set(listeners.values()) == {1}, listeners  # one socket per worker
        assert server.pid not in listeners  # the supervisor holds none: it would never accept

        clients = []
        for _ in range(24):  # keep-alive connections opened one after another, like a client pool
            client = socket.create_connection(("127.0.0.1", port))
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            assert client.recv(1024).startswith(b"HTTP/1.1 200")
            clients.append(client)
        per_worker = _owners(_sockets(port, ESTABLISHED)) - Counter({os.getpid(): 24})
        assert set(per_worker) == set(listeners), per_worker
        assert min(per_worker.values()) >= 3, per_worker  # shared socket: often 24 and 0
        for client in clients:
            client.close()

        # A worker that dies is replaced by one with a listener of its own.
        victim = next(iter(listeners))
        os.kill(victim, signal.SIGKILL)
        _wait_for(lambda: victim not in _owners(_sockets(port, LISTEN)) and len(_owners(_sockets(port, LISTEN))) == 2)
