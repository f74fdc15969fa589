"""A Hugging Face Hub stand-in on 127.0.0.1, speaking the routes huggingface_hub uses.

Routes: GET /api/models/{repo}[/revision/{rev}] (model info: commit sha, files with sizes),
GET /api/models/{repo}/tree/{rev}[/{path}] (the file list), HEAD and GET
/{repo}/resolve/{rev}/{path} (X-Repo-Commit, ETag, Content-Length, Range requests).
Every request and every byte sent is recorded, so tests can check what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class Repo:
    def __init__(self, folder: Path, claimed_sizes: dict[str, int] | None = None):
        self.files = {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}
        h = hashlib.sha1()
        for name, p in self.files.items():
            h.update(name.encode() + hashlib.sha256(p.read_bytes()).digest())
        self.sha = h.hexdigest()
        self.etags = {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in self.files.items()}
        self.claimed = claimed_sizes or {}

    def size(self, name: str) -> int:
        return self.claimed.get(name, self.files[name].stat().st_size)


class FakeHub:
    def __init__(self, repos: dict[str, Repo]):
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []  # (method, repo path, Range header)
        self.sent: Counter[str] = Counter()  # bytes of file bodies sent, by file name
        self.stall_after: dict[str, int] = {}  # file -> bytes after which a GET blocks until released
        self.release = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                hub._resolve(self, head=True)

            def do_GET(self):
                path = urlparse(self.path).path
                if path.startswith("/api/models/"):
                    hub._api(self, path[len("/api/models/"):])
                else:
                    hub._resolve(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def fetched(self, method: str = "GET") -> list[str]:
        return [p for m, p, _ in self.requests if m == method]

    # --- routes ---------------------------------------------------------------------

    def _send_json(self, h, data, status=200, error_code=None):
        body = json.dumps(data).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        if error_code:
            h.send_header("X-Error-Code", error_code)
        h.end_headers()
        h.wfile.write(body)

    def _find(self, rest: str) -> tuple[str | None, str]:
        for repo_id in self.repos:
            if rest == repo_id or rest.startswith(repo_id + "/"):
                return repo_id, rest[len(repo_id) + 1:]
        return None, rest

    def _rev_ok(self, repo: Repo, rev: str) -> bool:
        return rev in ("main", repo.sha)

    def _api(self, h, rest: str) -> None:
        repo_id, tail = self._find(unquote(rest))
        self.requests.append(("API", rest, None))
        if repo_id is None:
            return self._send_json(h, {"error": "Repository not found"}, 404, "RepoNotFound")
        repo = self.repos[repo_id]
        parts = tail.split("/") if tail else []
        if not parts or parts[0] == "revision":
            rev = parts[1] if len(parts) > 1 else "main"
            if not self._rev_ok(repo, rev):
                return self._send_json(h, {"error": "Invalid rev id"}, 404, "RevisionNotFound")
            siblings = [{"rfilename": n, "size": repo.size(n), "blobId": repo.etags[n][:40]} for n in repo.files]
            return self._send_json(h, {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
                                       "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})
        if parts[0] == "tree" and len(parts) >= 2:
            if not self._rev_ok(repo, parts[1]):
                return self._send_json(h, {"error": "Invalid rev id"}, 404, "RevisionNotFound")
            prefix = "/".join(parts[2:])
            entries = [{"type": "file", "path": n, "size": repo.size(n), "oid": repo.etags[n][:40]}
                       for n in repo.files if not prefix or n.startswith(prefix + "/")]
            return self._send_json(h, entries)
        return self._send_json(h, {"error": "not found"}, 404)

    def _resolve(self, h, head: bool) -> None:
        path = unquote(urlparse(h.path).path).lstrip("/")
        repo_id, tail = self._find(path)
        rng = h.headers.get("Range")
        self.requests.append(("HEAD" if head else "GET", path, rng))
        if repo_id is None or not tail.startswith("resolve/"):
            return self._send_json(h, {"error": "Repository not found"}, 404, "RepoNotFound")
        repo = self.repos[repo_id]
        _, rev, name = tail.split("/", 2)
        if not self._rev_ok(repo, rev):
            return self._send_json(h, {"error": "Invalid rev id"}, 404, "RevisionNotFound")
        if name not in repo.files:
            return self._send_json(h, {"error": "Entry not found"}, 404, "EntryNotFound")
        data = repo.files[name].read_bytes()
        start = 0
        if rng and rng.startswith("bytes="):
            start = int(rng[len("bytes="):].split("-")[0])
        body = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", repo.sha)
        h.send_header("ETag", f'"{repo.etags[name]}"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(body)))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if head:
            return
        stall = self.stall_after.get(name)
        step = 256 * 1024
        try:
            for i in range(0, len(body), step):
                if stall is not None and start == 0 and i >= stall:
                    self.release.wait(120)
                    return
                h.wfile.write(body[i:i + step])
                h.wfile.flush()
                self.sent[name] += len(body[i:i + step])
        except (BrokenPipeError, ConnectionResetError):
            pass
