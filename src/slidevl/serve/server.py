"""Run the viewer's app under a real uvicorn server in a background thread.

Used by the browser tests and the load benchmark (and handy in notebooks): the socket is
bound before the thread starts, so the port is known and there is no race for it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator

import uvicorn
from fastapi import FastAPI

from slidevl.serve.cli import check_bind_host


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0, *,
                      allow_remote: bool = False, start_timeout: float = 20.0) -> Iterator[str]:
    """Serve ``app`` on ``host:port`` (0 = a free port) while the block runs; yield the base URL."""
    check_bind_host(host, allow_remote)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="slidevl-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"uvicorn did not start on {host}:{bound_port} within {start_timeout:.0f} s")
        time.sleep(0.02)
    url_host = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{url_host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
