"""uvicorn in a background thread: how tests and benchmarks run a real server in-process on loopback."""

from __future__ import annotations

import threading
import time
from typing import Any


class ServerThread:
    """Serve ``app`` on ``host``:``port`` (0: a free port) until ``stop()``; ``url`` once started.

    Usable as a context manager. Startup waits at most ``timeout`` seconds.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 60) -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="lorakit-serve-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {timeout} s on {host}:{port}.")
            time.sleep(0.02)
        sockets = self.server.servers[0].sockets
        self.host, self.port = sockets[0].getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
