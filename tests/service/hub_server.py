"""A real HTTP server on 127.0.0.1 that answers the hub routes huggingface_hub reads files through
(HEAD and GET /{repo_id}/resolve/{revision}/{filename}, with X-Repo-Commit, ETag and the error codes the
library maps), serving folders as repositories; per repository it can send slowly, or announce a size
larger than what it holds."""
from __future__ import annotations

import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

CHUNK = 64 << 10


class HubServer:
    def __init__(self, repos: dict[str, Path], seconds_per_chunk: dict[str, float] | None = None,
                 announced_sizes: dict[tuple[str, str], int] | None = None):
        self.repos = repos
        self.seconds_per_chunk = seconds_per_chunk or {}
        self.announced_sizes = announced_sizes or {}
        self.gets: list[str] = []
        """Paths of every GET served (the tests check nothing was fetched for a refused source)."""
        self.sent: dict[str, float] = {}
        """Path -> time.monotonic() when its last byte was sent."""
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub.gets.append(self.path)
                hub._answer(self, body=True)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="hub-server", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @staticmethod
    def commit(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        repo, sep, rest = unquote(handler.path.split("?")[0]).lstrip("/").partition("/resolve/")
        revision, _, file_name = rest.partition("/")
        if not sep or repo not in self.repos:
            return _error(handler, 401, "RepoNotFound")
        if revision not in ("main", self.commit(repo)):
            return _error(handler, 404, "RevisionNotFound")
        path = self.repos[repo] / file_name
        if "/" in file_name or not path.is_file():
            return _error(handler, 404, "EntryNotFound")
        data = path.read_bytes()
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", self.commit(repo))
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("Content-Length", str(self.announced_sizes.get((repo, file_name), len(data))))
        handler.end_headers()
        if body:
            delay = self.seconds_per_chunk.get(repo, 0.0)
            for start in range(0, len(data), CHUNK):
                handler.wfile.write(data[start:start + CHUNK])
                handler.wfile.flush()
                time.sleep(delay)
            self.sent[handler.path] = time.monotonic()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _error(handler: BaseHTTPRequestHandler, status: int, code: str) -> None:
    handler.send_response(status)
    handler.send_header("X-Error-Code", code)
    handler.send_header("Content-Length", "0")
    handler.end_headers()
