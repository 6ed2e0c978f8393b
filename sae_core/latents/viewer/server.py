"""Serving a `LatentSite` over HTTP on loopback only, with the standard library."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from sae_core.errors import ConfigError
from sae_core.latents.viewer.site import LatentSite

HOST = "127.0.0.1"  # never another interface: the data may be private


class _SiteServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, site: LatentSite, port: int):
        self.site = site
        super().__init__((HOST, port), _Handler)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"


class _Handler(BaseHTTPRequestHandler):
    server: _SiteServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        found = self.server.site.get(urlsplit(self.path).path)
        if found is None:
            self.send_error(404)
            return
        body, kind = found
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        """Quiet: one line per request would bury the URL the command printed."""


def make_server(site: LatentSite, port: int = 0) -> _SiteServer:
    """A server for `site` on 127.0.0.1:port (0: a free port); `.url` says where."""
    try:
        return _SiteServer(site, port)
    except OSError as err:
        raise ConfigError(
            f"--port {port}: cannot listen on {HOST}:{port} ({err.strerror}); choose another "
            "port, or --port 0 for a free one"
        ) from None


@contextmanager
def serving(site: LatentSite, port: int = 0) -> Iterator[str]:
    """Serve `site` from a background thread for the duration of the block; yields the URL."""
    server = make_server(site, port)
    thread = threading.Thread(target=server.serve_forever, name="latent-viewer", daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
