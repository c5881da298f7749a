"""A local fake of the Hugging Face Hub HTTP API, as huggingface_hub calls it.

Real HTTP on 127.0.0.1, the Hub's wire format:
- GET /api/models/{repo}/revision/{rev}: model info with `sha` and `siblings`;
- GET /api/models/{repo}/tree/{rev}?recursive=...: the file listing snapshot_download reads;
- HEAD/GET /{repo}/resolve/{rev}/{path}: small files straight away with ETag (git blob sha1),
  X-Repo-Commit and Content-Length; LFS files as a 302 to a "CDN" on another host name
  (localhost) with X-Linked-Etag (sha256) and X-Linked-Size, like huggingface.co;
- GET /cdn/{sha256}: the LFS bytes, honouring Range (206);
- GET /api/models?search=&limit=: the model search;
- errors with the Hub's X-Error-Code header (RepoNotFound, RevisionNotFound, EntryNotFound).
Every request is recorded; faults (`fail`) are injected per path.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD = 1024  # bytes; bigger files are served like LFS files


@dataclass
class FakeFile:
    """One file of a repository at the fake's single commit."""

    path: str
    content: bytes

    @property
    def is_lfs(self) -> bool:
        """Whether the Hub would keep it in LFS (and redirect to the CDN)."""
        return len(self.content) > LFS_THRESHOLD

    @property
    def git_sha1(self) -> str:
        """The git blob id: the ETag of a non-LFS file."""
        header = f"blob {len(self.content)}\0".encode()
        return hashlib.sha1(header + self.content).hexdigest()

    @property
    def sha256(self) -> str:
        """The LFS oid: the ETag of an LFS file."""
        return hashlib.sha256(self.content).hexdigest()

    @property
    def etag(self) -> str:
        """What the cache names the blob after."""
        return self.sha256 if self.is_lfs else self.git_sha1


@dataclass
class FakeRepo:
    """A model repository with one commit, reachable as `main` or by its hash."""

    repo_id: str
    files: list[FakeFile]
    commit: str = ""
    downloads: int = 0
    likes: int = 0
    pipeline_tag: str = "text-generation"

    def __post_init__(self) -> None:
        if not self.commit:
            self.commit = hashlib.sha1(self.repo_id.encode()).hexdigest()

    def file(self, path: str) -> FakeFile | None:
        """The file at `path`, if any."""
        return next((f for f in self.files if f.path == path), None)


@dataclass(frozen=True)
class Seen:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


@dataclass
class FakeHub:
    """The fake's state: repositories, recorded requests and pending faults."""

    repos: dict[str, FakeRepo] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    # path -> list of faults to apply to the next GETs of that path: "truncate" or a status.
    fail: dict[str, list[str | int]] = field(default_factory=dict)
    endpoint: str = ""
    cdn: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, repo: FakeRepo) -> FakeRepo:
        """Publish a repository."""
        self.repos[repo.repo_id] = repo
        return repo

    def seen(self, method: str | None = None, prefix: str = "") -> list[Seen]:
        """Requests so far, filtered by method and path prefix."""
        with self.lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and r.path.startswith(prefix)
            ]

    def clear(self) -> None:
        """Forget recorded requests."""
        with self.lock:
            self.requests.clear()


_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?P<sub>/.*)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CDN = re.compile(r"^/cdn/(?P<oid>[0-9a-f]{64})$")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

        def do_HEAD(self) -> None:
            self._dispatch(head=True)

        def do_GET(self) -> None:
            self._dispatch(head=False)

        # --- helpers ---------------------------------------------------------------------

        def _send(
            self,
            status: int,
            body: bytes = b"",
            headers: dict[str, str] | None = None,
            head: bool = False,
        ) -> None:
            self.send_response(status)
            merged = {"Content-Type": "application/json", **(headers or {})}
            merged.setdefault("Content-Length", str(len(body)))
            for name, value in merged.items():
                self.send_header(name, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, doc: Any, headers: dict[str, str] | None = None) -> None:
            self._send(200, json.dumps(doc).encode(), headers)

        def _error(self, status: int, code: str, message: str, head: bool) -> None:
            body = json.dumps({"error": message}).encode()
            headers = {"X-Error-Code": code, "X-Error-Message": message}
            self._send(status, body, headers, head=head)

        def _repo_rev(self, repo_id: str, rev: str, head: bool) -> FakeRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found", head)
                return None
            if unquote(rev) not in ("main", repo.commit):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                return None
            return repo

        # --- routes ----------------------------------------------------------------------

        def _dispatch(self, head: bool) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            with hub.lock:
                hub.requests.append(
                    Seen(
                        "HEAD" if head else "GET",
                        path,
                        parse_qs(url.query),
                        {k.lower(): v for k, v in self.headers.items()},
                    )
                )
                faults = hub.fail.get(path)
                fault = faults.pop(0) if faults and not head else None
            if isinstance(fault, int):
                self._error(fault, "Injected", f"injected {fault}", head)
                return
            if path == "/api/models":
                self._search(parse_qs(url.query))
            elif match := _INFO.match(path):
                self._info(match["repo"], match["rev"])
            elif match := _TREE.match(path):
                self._tree(match["repo"], match["rev"])
            elif match := _RESOLVE.match(path):
                self._resolve(match["repo"], match["rev"], match["path"], head)
            elif match := _CDN.match(path):
                self._cdn(match["oid"], head, truncate=fault == "truncate")
            else:
                self._error(404, "NotFound", f"no route {path}", head)

        def _search(self, query: dict[str, list[str]]) -> None:
            text = (query.get("search") or [""])[0].lower()
            limit = int((query.get("limit") or ["1000"])[0])
            found = [r for r in hub.repos.values() if text in r.repo_id.lower()][:limit]
            self._json(
                [
                    {
                        "_id": r.commit[:24],
                        "id": r.repo_id,
                        "modelId": r.repo_id,
                        "likes": r.likes,
                        "downloads": r.downloads,
                        "private": False,
                        "pipeline_tag": r.pipeline_tag,
                        "tags": ["safetensors", r.pipeline_tag],
                        "createdAt": "2024-01-02T03:04:05.000Z",
                        "lastModified": "2024-05-06T07:08:09.000Z",
                        "library_name": "transformers",
                    }
                    for r in found
                ]
            )

        def _info(self, repo_id: str, rev: str) -> None:
            repo = self._repo_rev(repo_id, rev, head=False)
            if repo is None:
                return
            self._json(
                {
                    "_id": repo.commit[:24],
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "sha": repo.commit,
                    "private": False,
                    "gated": False,
                    "disabled": False,
                    "downloads": repo.downloads,
                    "likes": repo.likes,
                    "tags": [repo.pipeline_tag],
                    "pipeline_tag": repo.pipeline_tag,
                    "lastModified": "2024-05-06T07:08:09.000Z",
                    "createdAt": "2024-01-02T03:04:05.000Z",
                    "siblings": [{"rfilename": f.path} for f in repo.files],
                }
            )

        def _tree(self, repo_id: str, rev: str) -> None:
            repo = self._repo_rev(repo_id, rev, head=False)
            if repo is None:
                return
            entries: list[dict[str, Any]] = []
            folders = sorted({f.path.rsplit("/", 1)[0] for f in repo.files if "/" in f.path})
            for folder in folders:
                entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
            for f in repo.files:
                entry: dict[str, Any] = {
                    "type": "file",
                    "oid": f.git_sha1,
                    "size": len(f.content),
                    "path": f.path,
                }
                if f.is_lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": len(f.content), "pointerSize": 134}
                entries.append(entry)
            self._json(entries)

        def _resolve(self, repo_id: str, rev: str, path: str, head: bool) -> None:
            repo = self._repo_rev(repo_id, rev, head)
            if repo is None:
                return
            found = repo.file(path)
            if found is None:
                self._send(
                    404,
                    b"",
                    {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit},
                    head=head,
                )
                return
            common = {"X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes"}
            if found.is_lfs:
                self._send(
                    302,
                    b"",
                    {
                        **common,
                        "Location": f"{hub.cdn}/cdn/{found.sha256}",
                        "X-Linked-Etag": f'"{found.sha256}"',
                        "X-Linked-Size": str(len(found.content)),
                        "ETag": f'"{found.git_sha1}"',
                    },
                    head=head,
                )
                return
            self._send(
                200,
                found.content,
                {
                    **common,
                    "ETag": f'"{found.git_sha1}"',
                    "Content-Type": "application/octet-stream",
                },
                head=head,
            )

        def _cdn(self, oid: str, head: bool, truncate: bool) -> None:
            blob = next(
                (f for r in hub.repos.values() for f in r.files if f.is_lfs and f.sha256 == oid),
                None,
            )
            if blob is None:
                self._send(404, b"", head=head)
                return
            data = blob.content
            start = 0
            status = 200
            headers = {"Content-Type": "application/octet-stream", "ETag": f'"{oid}"'}
            ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if ranged:
                start = int(ranged[1])
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            if not truncate:
                self._send(status, body, headers, head=head)
                return
            # Promise the whole body, send three quarters, drop the connection: a network cut.
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body[: len(body) * 3 // 4])
            self.wfile.flush()
            self.close_connection = True

    return Handler


@contextmanager
def running_hub() -> Iterator[FakeHub]:
    """Serve a FakeHub on 127.0.0.1 (its CDN on `localhost`, another host name)."""
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    port = server.server_address[1]
    hub.endpoint = f"http://127.0.0.1:{port}"
    hub.cdn = f"http://localhost:{port}"
    thread = threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
