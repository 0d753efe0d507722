"""A local HTTP file server for offline download tests (127.0.0.1 only, Range requests supported)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


class _Handler(BaseHTTPRequestHandler):
    """GET files under ``root``; ``Range: bytes=N-`` → 206; ``cut[path] = n`` sends n bytes once, then drops."""

    def __init__(self, *args, root: Path, log: list, cut: dict, **kw) -> None:
        self.root, self.log_, self.cut = root, log, cut
        super().__init__(*args, **kw)

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        rel = unquote(self.path.split("?", 1)[0]).lstrip("/")
        path = (self.root / rel).resolve()
        self.log_.append((rel, self.headers.get("Range")))
        if not path.is_file() or self.root.resolve() not in path.parents:
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-", 1)[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        n = self.cut.pop(rel, None)
        if n is not None:  # simulate a dropped connection
            self.wfile.write(body[:n])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@contextmanager
def serve(root: Path) -> Iterator[tuple[str, list, dict]]:
    """Serve ``root`` on 127.0.0.1; yields ``(base_url, request_log, cut)``."""
    log: list = []
    cut: dict = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, root=Path(root), log=log, cut=cut))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log, cut
    finally:
        server.shutdown()
        server.server_close()
