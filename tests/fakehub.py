"""A tiny stand-in for the Hugging Face Hub on 127.0.0.1, for download tests without a network.

It answers `huggingface_hub`'s HEAD/GET on `/{repo}/resolve/{revision}/{file}` with the headers
the client needs (commit, etag, size), and the Hub's error codes for missing, gated and unknown
repos. Every file request is recorded, so tests can check what was (not) downloaded.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Path] = {}
        self.gated: set[str] = set()
        self.requests: list[tuple[str, str, str]] = []  # (method, repo, file)
        self.revisions: set[str] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fetched(self, repo: str) -> set[str]:
        return {f for m, r, f in self.requests if r == repo and m == "GET"}

    def _answer(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(req.path.split("?")[0]).lstrip("/")
        if "/resolve/" not in path:
            return self._error(req, 404, "EntryNotFound")
        repo, rest = path.split("/resolve/", 1)
        revision, _, name = rest.partition("/")
        self.requests.append(("GET" if body else "HEAD", repo, name))
        self.revisions.add(revision)
        if repo in self.gated:
            return self._error(req, 403, "GatedRepo")
        if repo not in self.repos:
            return self._error(req, 401, "RepoNotFound")
        file = self.repos[repo] / name
        if not file.is_file():
            return self._error(req, 404, "EntryNotFound")
        data = file.read_bytes()
        req.send_response(200)
        req.send_header("X-Repo-Commit", COMMIT)
        req.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if body:
            req.wfile.write(data)

    @staticmethod
    def _error(req: BaseHTTPRequestHandler, status: int, code: str) -> None:
        req.send_response(status)
        req.send_header("X-Error-Code", code)
        req.send_header("X-Error-Message", code)
        req.send_header("Content-Length", "0")
        req.end_headers()
