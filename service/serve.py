"""``yilian serve``: uvicorn, with a listening socket of its own for every worker (Linux).

uvicorn's workers share the one socket their parent bound, and the kernel hands each new
connection to the worker that waited last: a few busy keep-alive clients — a HIS's
connection pool, the bench's 32 wrk connections — land on one worker while the other idles.
Measured: 30 of wrk's 32 connections on one worker in two of three runs, and up to a fifth of
the machine idle while that worker's threads queued for its interpreter lock. With
``SO_REUSEPORT`` each worker listens on a socket of its own bound to the same address, and
the kernel spreads new connections over them by a hash of their addresses (what nginx's
``reuse_port`` and gunicorn's ``--reuse-port`` do).

uvicorn hands every worker the sockets it was given by pickling them into the new process;
:class:`OwnListeners` is an empty list that unpickles as a fresh socket of the worker's own,
so uvicorn's supervisor (health checks, restarts, signals) stays as it is.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess


def serve(app: str, *, host: str, port: int, workers: int, log_level: str, proxy_headers: bool = True) -> None:
    """Run ``app`` (an import string) like ``uvicorn.run``, with a listener per worker where
    the platform balances connections over them."""
    if workers <= 1 or not balances_listeners():
        uvicorn.run(app, host=host, port=port, workers=workers, log_level=log_level, proxy_headers=proxy_headers)
        return
    config = uvicorn.Config(app, host=host, port=port, workers=workers, log_level=log_level,
                            proxy_headers=proxy_headers)
    listener(host, port).close()  # an address in use fails here, once, not in every worker
    Multiprocess(config, sockets=OwnListeners(host, port)).run()


def balances_listeners() -> bool:
    """Linux spreads connections over the sockets of a ``SO_REUSEPORT`` group; other systems
    accept the option but may send every connection to one socket."""
    return sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) in that address's ``SO_REUSEPORT`` group."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class OwnListeners(list):  # type: ignore[type-arg]
    """Empty in the supervisor; in each worker, unpickled as ``[listener(host, port)]``."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.host, self.port = host, port

    def __reduce__(self) -> tuple[Any, ...]:
        return _bind_own_listener, (self.host, self.port)


def _bind_own_listener(host: str, port: int) -> list[socket.socket]:
    return [listener(host, port)]
