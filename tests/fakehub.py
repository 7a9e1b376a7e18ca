"""A tiny stand-in for the Hugging Face Hub on 127.0.0.1, for download tests without a network.

It answers what `huggingface_hub`'s `hf_hub_download` and `snapshot_download` ask for:

- `GET /api/models/{repo}/revision/{revision}` (and `/api/models/{repo}`): the repo's info, with
  the commit (`sha`) and its files (`siblings`);
- `GET /api/models/{repo}/tree/{revision}[/{folder}]`: the file listing (`recursive` honoured);
- `HEAD`/`GET /{repo}/resolve/{revision}/{file}`: a file, with the headers the client needs
  (commit, etag, size);

and the Hub's error codes for missing files, gated and unknown repos, and unknown revisions.
Every request is recorded, so tests can check what was (not) downloaded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """The stand-in server; it starts at once and serves until `close()`.

    Attributes:
        repos: repo id -> the folder whose files the repo holds (subfolders included).
        gated: repo ids that answer 403 GatedRepo to everything.
        known_revisions: when set, the only branch/tag names that exist (the commit always does);
            others answer 404 RevisionNotFound. None: every name exists.
        requests: (method, repo, file) of every file request; API calls are recorded as
            ("API", repo, "revision/<rev>" or "tree/<rev>").
        revisions: the branch/tag names clients asked for (the commit the Hub hands back, which
            the client then uses for each file, is not counted).
        url: the endpoint, for `HF_ENDPOINT`.
    """

    def __init__(self) -> None:
        self.repos: dict[str, Path] = {}
        self.gated: set[str] = set()
        self.known_revisions: set[str] | None = None
        self.requests: list[tuple[str, str, str]] = []
        self.revisions: set[str] = set()
        self._lock = threading.Lock()  # the server answers from several threads
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
        """The files of `repo` that were downloaded (GET), not just looked at (HEAD)."""
        return {f for m, r, f in self.requests if r == repo and m == "GET"}

    # --- routing ---------------------------------------------------------------------------------

    def _answer(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        url = urlsplit(req.path)
        path = url.path.lstrip("/")
        if path.startswith("api/models/"):
            return self._api(req, path.removeprefix("api/models/"), parse_qs(url.query), body)
        if "/resolve/" not in path:
            return self._error(req, 404, "EntryNotFound")
        # Split before unquoting: a revision such as "refs/pr/1" arrives as one quoted segment.
        repo, rest = path.split("/resolve/", 1)
        revision, _, name = rest.partition("/")
        repo, revision, name = unquote(repo), unquote(revision), unquote(name)
        self._record("GET" if body else "HEAD", repo, name, revision)
        if not self._check_repo(req, repo, revision):
            return
        file = self._file(repo, name)
        if file is None:
            return self._error(req, 404, "EntryNotFound")
        data = file.read_bytes()
        req.send_response(200)
        req.send_header("X-Repo-Commit", COMMIT)
        req.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if body:
            req.wfile.write(data)

    def _api(self, req: BaseHTTPRequestHandler, path: str, query: dict[str, list[str]], body: bool) -> None:
        # "{repo}/revision/{rev}", "{repo}/tree/{rev}[/{folder}]" or "{repo}"; a repo id may hold a "/".
        for kind in ("revision", "tree"):
            head, sep, tail = path.partition(f"/{kind}/")
            if sep:
                revision, _, folder = tail.partition("/")
                repo, revision, folder = unquote(head), unquote(revision), unquote(folder)
                break
        else:
            kind, repo, revision, folder = "revision", unquote(path), "main", ""
        self._record("API", repo, f"{kind}/{revision}", revision)
        if not self._check_repo(req, repo, revision):
            return
        files = self._files(repo)
        if kind == "revision":
            info = {
                "id": repo,
                "sha": COMMIT,
                "private": False,
                "siblings": [{"rfilename": f} for f in files],
            }
            return self._json(req, info, body)
        prefix = f"{folder.strip('/')}/" if folder else ""
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for name in files:
            if not name.startswith(prefix):
                continue
            rest = name.removeprefix(prefix)
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/", 1)[0])
                continue
            data = (self.repos[repo] / name).read_bytes()
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id
            entries.append({"type": "file", "path": name, "size": len(data), "oid": blob})
        entries += [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]
        self._json(req, entries, body)

    # --- helpers ---------------------------------------------------------------------------------

    def _record(self, method: str, repo: str, name: str, revision: str) -> None:
        with self._lock:
            self.requests.append((method, repo, name))
            if revision != COMMIT:
                self.revisions.add(revision)

    def _check_repo(self, req: BaseHTTPRequestHandler, repo: str, revision: str) -> bool:
        """Answer the Hub's error for a gated or unknown repo or revision; True when there is none."""
        if repo in self.gated:
            self._error(req, 403, "GatedRepo")
        elif repo not in self.repos:
            self._error(req, 401, "RepoNotFound")
        elif self.known_revisions is not None and revision not in self.known_revisions | {COMMIT}:
            self._error(req, 404, "RevisionNotFound")
        else:
            return True
        return False

    def _files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def _file(self, repo: str, name: str) -> Path | None:
        root = self.repos[repo].resolve()
        file = (root / name).resolve()
        return file if file.is_file() and file.is_relative_to(root) else None

    @staticmethod
    def _json(req: BaseHTTPRequestHandler, value: object, body: bool) -> None:
        data = json.dumps(value).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
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
