"""`edgelm serve`: an OpenAI-compatible HTTP server for one model.

    engine.py    slots (one Session each), the waiting line, the thread that runs every forward pass
    protocol.py  the OpenAI / llama-server wire format: request models, response objects
    app.py       the FastAPI routes, errors in OpenAI's shape, the Host / API key / body size guard

    from edgelm.serve import Server
    with Server(model, port=0, parallel=2) as srv:      # in a background thread (tests, notebooks)
        openai.OpenAI(base_url=srv.url + "/v1", api_key="-")...
"""
from __future__ import annotations

import ipaddress
import socket
import threading

from ..errors import EdgeLMError
from .app import LOOPBACK_HOSTS, ServerConfig, create_app
from .engine import Engine

__all__ = ["Server", "ServerConfig", "is_loopback"]


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server:
    """The engine, the app and a uvicorn server on (host, port); port 0 picks a free one."""

    def __init__(self, model, host: str = "127.0.0.1", port: int = 8080, parallel: int = 1, max_queue: int = 32,
                 config: ServerConfig | None = None, access_log: bool = False, cache_ram_mib: int = 256):
        import uvicorn
        self.model = model
        self.config = config or ServerConfig(loopback_only=is_loopback(host))
        self.engine = Engine(model, parallel, max_queue, cache_ram_mib << 20)
        self.app = create_app(model, self.engine, self.config)
        self.sock = _bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        # open connections are bounded too (a flood gets uvicorn's 503 before any work): the slots, the waiting
        # line and room for /health, /tokenize and clients that reconnect
        ucfg = uvicorn.Config(self.app, log_level="info" if access_log else "warning", access_log=access_log,
                              timeout_graceful_shutdown=2, limit_concurrency=max(64, 4 * (parallel + max_queue)))
        self.uvicorn = uvicorn.Server(ucfg)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until Ctrl-C or SIGTERM. The engine runs on this thread (the one that loaded the model: see
        Engine.run), HTTP on another."""
        import signal
        http = self._start_http()

        def stop(*_):
            raise KeyboardInterrupt
        previous = signal.signal(signal.SIGTERM, stop)
        try:
            self.engine.run()
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.engine.close()
            self.uvicorn.should_exit = True
            http.join(timeout=10)
            self.sock.close()

    def _start_http(self) -> threading.Thread:
        self.uvicorn.config.install_signal_handlers = False    # signals are the engine thread's (run())
        thread = threading.Thread(target=self.uvicorn.run, kwargs=dict(sockets=[self.sock]), name="edgelm-http",
                                  daemon=True)
        thread.start()
        while not self.uvicorn.started:
            if not thread.is_alive():
                raise EdgeLMError(f"the server on {self.url} did not start")
            thread.join(0.02)
        return thread

    # -- in background threads ---------------------------------------------------------------------
    def __enter__(self) -> "Server":
        self.engine.start()
        self._thread = self._start_http()
        return self

    def __exit__(self, *exc) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.engine.close()
        self.sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except socket.gaierror as e:            # (an OSError: first)
        sock.close()
        raise EdgeLMError(f"cannot listen on {host}:{port}: {e}") from None
    except OSError as e:
        sock.close()
        raise EdgeLMError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
