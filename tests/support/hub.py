"""A small Hugging Face Hub emulator on 127.0.0.1, for tests and offline demos.

It serves the endpoints huggingface_hub really calls (model search, model info, tree listing,
paths-info, resolve with Range and the cache headers) from files on disk, and can inject faults.
Point huggingface_hub at it with HF_ENDPOINT=emulator.url.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

_CHUNK = 64 * 1024


@dataclass
class HostedFile:
    path: str
    source: Path
    size: int
    sha256: str
    git_oid: str


@dataclass
class HostedRepo:
    repo_id: str
    gated: bool = False
    revisions: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    commits: dict[str, dict[str, HostedFile]] = field(default_factory=dict)  # commit -> files
    # What the model search reports and sorts by
    downloads: int = 0
    likes: int = 0
    trending: float = 0.0
    created: str = "2026-01-01T00:00:00.000Z"
    last_modified: str = "2026-01-01T00:00:00.000Z"
    gguf: dict | None = None  # the Hub's summary of the first GGUF model file; computed when None

    @property
    def files(self) -> dict[str, HostedFile]:
        """The files at the head of main (or of the only revision)."""
        head = self.revisions.get("main") or next(iter(self.revisions.values()))
        return self.commits[head]


@dataclass
class Fault:
    """What goes wrong with a resolve request: "500"; "429" (Too Many Requests, with Retry-After:
    `retry_after` when given); "stall" (the request is read and never answered, for `delay`
    seconds or until the emulator stops); "reset" (connection reset after `after_bytes` of the
    body); "slow" (`delay` per 64 KiB chunk of the body)."""

    kind: str
    pattern: str = "*"  # fnmatch against the file path in the repo
    times: int = 1  # how many requests it hits; -1 for all
    after_bytes: int = 0
    delay: float = 0.05
    method: str = "GET"  # the requests it hits: "GET", "HEAD" (huggingface_hub's metadata call) or "*"
    retry_after: int | None = None
    downloads_only: bool = False  # spare Range reads of a part (a header): hit whole files and resumes only


@dataclass
class LoggedRequest:
    method: str
    path: str
    range: str | None
    status: int


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_oid(size: int, sha256: str) -> str:
    # Real LFS files have the git sha1 of their pointer file; any stable 40-hex id will do here.
    return hashlib.sha1(f"blob {size}\0{sha256}".encode()).hexdigest()


class HubEmulator:
    """Start with `with HubEmulator() as hub:` or start()/stop()."""

    def __init__(self, tokens: set[str] | None = None):
        self.repos: dict[str, HostedRepo] = {}
        self.faults: list[Fault] = []
        self.log: list[LoggedRequest] = []
        self.tokens = tokens or {"hf_testtoken"}  # tokens allowed into gated repos
        self._lock = threading.Lock()
        self._stopped = threading.Event()  # ends every stall
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content ---------------------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, Path | str],
        *,
        gated: bool = False,
        revision: str = "main",
        downloads: int = 0,
        likes: int = 0,
        trending: float = 0.0,
        last_modified: str | None = None,
    ) -> str:
        """Publish `files` (repo path -> local file) as a new commit on `revision`; return the commit.
        The search figures (downloads, likes, trending score, last modified) are what it reports."""
        repo = self.repos.setdefault(repo_id, HostedRepo(repo_id, gated=gated))
        repo.gated = gated
        repo.downloads, repo.likes, repo.trending = downloads, likes, trending
        repo.last_modified = last_modified or datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        repo.gguf = None
        hosted = {}
        for repo_path, source in files.items():
            source = Path(source)
            size = source.stat().st_size
            sha = _sha256(source)
            hosted[repo_path] = HostedFile(repo_path, source, size, sha, _git_oid(size, sha))
        commit = hashlib.sha1(
            json.dumps(
                [repo_id, revision, len(repo.commits), sorted((p, f.sha256) for p, f in hosted.items())]
            ).encode()
        ).hexdigest()
        repo.commits[commit] = hosted
        repo.revisions[revision] = commit
        return commit

    def inject(
        self,
        kind: str,
        pattern: str = "*",
        *,
        times: int = 1,
        after_bytes: int = 0,
        delay: float = 0.05,
        method: str = "GET",
        retry_after: int | None = None,
        downloads_only: bool = False,
    ) -> Fault:
        fault = Fault(kind, pattern, times, after_bytes, delay, method, retry_after, downloads_only)
        with self._lock:
            self.faults.append(fault)
        return fault

    def header_reads(self) -> list[LoggedRequest]:
        """Range reads of a file: how localrun reads a GGUF header without downloading the file."""
        return [r for r in self.log if r.method == "GET" and "/resolve/" in r.path and r.range]

    def downloads(self, pattern: str = "*") -> list[LoggedRequest]:
        """GET requests on resolve URLs whose path matches `pattern` (fnmatch)."""
        return [
            r
            for r in self.log
            if r.method == "GET"
            and "/resolve/" in r.path
            and fnmatch.fnmatch(r.path.split("/resolve/", 1)[1].split("/", 1)[1], pattern)
        ]

    def _take_fault(self, file_path: str, method: str, range_header: str | None) -> Fault | None:
        # huggingface_hub downloads a whole file, or resumes one with an open-ended range (bytes=N-)
        download = range_header is None or range_header.strip().endswith("-")
        with self._lock:
            for fault in self.faults:
                if fault.times == 0 or fault.method not in ("*", method) or (fault.downloads_only and not download):
                    continue
                if fnmatch.fnmatch(file_path, fault.pattern):
                    if fault.times > 0:
                        fault.times -= 1
                    return fault
        return None

    # -- server ----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "emulator not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubEmulator:
        self._stopped.clear()
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_API_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?P<rest>/.*)?$")
_RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: HubEmulator
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    # -- helpers ---------------------------------------------------------------------------------
    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self._record(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _record(self, status: int) -> None:
        """Logged before the answer goes out: a client that has its answer finds it in the log."""
        self.hub.log.append(
            LoggedRequest(self.command, unquote(urlparse(self.path).path), self.headers.get("Range"), status)
        )

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"X-Error-Code": code, "X-Error-Message": message})

    def _authorized(self, repo: HostedRepo) -> bool:
        if not repo.gated:
            return True
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth[7:] in self.hub.tokens

    def _repo(self, repo_id: str) -> HostedRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _commit(self, repo: HostedRepo, rev: str) -> str | None:
        rev = unquote(rev)
        commit = repo.revisions.get(rev) or (rev if rev in repo.commits else None)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    @staticmethod
    def _entry(f: HostedFile) -> dict:
        return {
            "type": "file",
            "oid": f.git_oid,
            "size": f.size,
            "path": f.path,
            "lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134},
        }

    # -- routes ----------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def _route(self) -> None:
        url = urlparse(self.path)
        path = unquote(url.path)
        if m := _RESOLVE_RE.match(path):
            return self._resolve(m["repo"], m["rev"], m["path"])
        if path.rstrip("/") == "/api/models":
            return self._search(parse_qs(url.query))
        if m := _API_RE.match(path):
            return self._api(m["repo"], m["rest"] or "", parse_qs(url.query))
        self._error(404, "NotFound", "Not found")

    @staticmethod
    def _info(repo: HostedRepo, commit: str) -> dict:
        """Everything the Hub can say about a repo at a commit (a search expands a part of it)."""
        files = repo.commits[commit]
        has_gguf = any(p.lower().endswith(".gguf") for p in files)
        info = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": repo.downloads,
            "likes": repo.likes,
            "trendingScore": repo.trending,
            "tags": ["gguf"] if has_gguf else [],
            "library_name": "gguf" if has_gguf else None,
            "lastModified": repo.last_modified,
            "createdAt": repo.created,
            "siblings": [
                {
                    "rfilename": f.path,
                    "size": f.size,
                    "blobId": f.git_oid,
                    "lfs": {"sha256": f.sha256, "size": f.size, "pointerSize": 134},
                }
                for f in files.values()
            ],
        }
        if has_gguf:
            info["gguf"] = _gguf_summary(repo)
        return info

    def _search(self, query: dict[str, list[str]]) -> None:
        """GET /api/models, as HfApi.list_models asks it: substring `search`, `author`, `filter`
        tags (all must match), `num_parameters` ("min:1B,max:8B"), `sort` (descending unless
        direction=1), `limit`, and either `expand` (`expand[]`) to name the fields, or `full`;
        otherwise the Hub's default fields."""
        found = []
        for repo in list(self.hub.repos.values()):
            info = self._info(repo, repo.revisions.get("main") or next(iter(repo.revisions.values())))
            if any(word.lower() not in repo.repo_id.lower() for word in query.get("search", [])):
                continue
            if "author" in query and info["author"] != query["author"][0]:
                continue
            if any(tag not in info["tags"] for tag in query.get("filter", [])):
                continue
            if "num_parameters" in query and not _in_range(
                info.get("gguf", {}).get("total"), query["num_parameters"][0]
            ):
                continue
            found.append(info)
        sort = query.get("sort", [None])[0]
        if sort:
            descending = query.get("direction", ["-1"])[0] != "1"
            found.sort(key=lambda info: (info.get(sort) or 0, info["id"]), reverse=descending)
        found = found[: int(query.get("limit", ["1000"])[0])]
        expand = query.get("expand", []) + query.get("expand[]", [])
        if expand:
            keep = {"_id", "id", *expand}
        elif query.get("full", ["false"])[0].lower() in ("1", "true"):
            keep = set().union(*(info.keys() for info in found))
        else:
            keep = {"_id", "id", "modelId", "likes", "trendingScore", "private", "downloads", "tags"}
            keep |= {"library_name", "createdAt"}
        body = [{key: value for key, value in info.items() if key in keep} for info in found]
        return self._send(200, json.dumps(body).encode())

    def _api(self, repo_id: str, rest: str, query: dict[str, list[str]]) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if rest == "" or rest.startswith("/revision/"):
            commit = self._commit(repo, rest[len("/revision/") :] if rest else "main")
            if commit is None:
                return
            info = self._info(repo, commit)
            info.pop("gguf", None)  # only a search expands it here
            return self._send(200, json.dumps(info).encode())
        if m := re.match(r"^/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?$", rest):
            commit = self._commit(repo, m["rev"])
            if commit is None:
                return
            sub = (m["sub"] or "").strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            entries, folders = [], set()
            for f in repo.commits[commit].values():
                if sub and not f.path.startswith(sub + "/"):
                    continue
                relative = f.path[len(sub) + 1 :] if sub else f.path
                parts = relative.split("/")
                prefix = sub + "/" if sub else ""
                if recursive:
                    for depth in range(1, len(parts)):
                        folders.add(prefix + "/".join(parts[:depth]))
                    entries.append(self._entry(f))
                elif len(parts) == 1:
                    entries.append(self._entry(f))
                else:
                    folders.add(prefix + parts[0])
            if sub and not entries and not folders:
                return self._error(404, "EntryNotFound", f"{sub} does not exist on {m['rev']}")
            entries += [
                {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                for d in sorted(folders)
            ]
            return self._send(200, json.dumps(entries).encode())
        if m := re.match(r"^/paths-info/(?P<rev>[^/]+)$", rest):
            commit = self._commit(repo, m["rev"])
            if commit is None:
                return
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode() if length else ""
            if self.headers.get("Content-Type", "").startswith("application/json"):
                wanted = json.loads(raw or "{}").get("paths", [])
            else:
                wanted = parse_qs(raw).get("paths", [])
            files = repo.commits[commit]
            return self._send(200, json.dumps([self._entry(files[p]) for p in wanted if p in files]).encode())
        self._error(404, "NotFound", "Not found")

    def _resolve(self, repo_id: str, rev: str, file_path: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if not self._authorized(repo):
            return self._error(
                401,
                "GatedRepo",
                "Access to model is restricted. You must have access to it and be authenticated to access it.",
            )
        commit = self._commit(repo, rev)
        if commit is None:
            return
        hosted = repo.commits[commit].get(file_path)
        if hosted is None:
            return self._error(404, "EntryNotFound", f"{file_path} does not exist on {rev}")

        fault = self.hub._take_fault(file_path, self.command, self.headers.get("Range"))
        if fault is not None and fault.kind == "500":
            return self._error(500, "InternalError", "Injected server error")
        if fault is not None and fault.kind == "429":
            headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
            body = json.dumps({"error": "Too many requests"}).encode()
            return self._send(429, body, {"X-Error-Message": "Too many requests", **headers})
        if fault is not None and fault.kind == "stall":
            self.hub._stopped.wait(fault.delay)
            self.close_connection = True
            return self._record(0)  # 0: never answered

        start, end = 0, hosted.size - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header:
            m = re.match(r"bytes=(\d*)-(\d*)$", range_header.strip())
            if not m:
                return self._error(416, "BadRange", "Bad range")
            if m[1]:
                start = int(m[1])
                end = min(int(m[2]), hosted.size - 1) if m[2] else hosted.size - 1
            else:  # suffix range: the last N bytes
                start = max(0, hosted.size - int(m[2]))
            if start >= hosted.size or start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{hosted.size}")
                self.send_header("Content-Length", "0")
                self._record(416)
                return self.end_headers()
            status = 206
        length = end - start + 1

        self.send_response(status)
        etag = f'"{hosted.sha256}"'
        for key, value in {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(length),
            "Accept-Ranges": "bytes",
            "ETag": etag,
            "X-Linked-Etag": etag,
            "X-Linked-Size": str(hosted.size),
            "X-Repo-Commit": commit,
        }.items():
            self.send_header(key, value)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{hosted.size}")
        self._record(status)
        self.end_headers()
        if self.command == "HEAD":
            return

        sent = 0
        with hosted.source.open("rb") as f:
            f.seek(start)
            while sent < length:
                chunk = f.read(min(_CHUNK, length - sent))
                if not chunk:
                    break
                if fault is not None and fault.kind == "reset" and sent + len(chunk) > fault.after_bytes:
                    self.wfile.write(chunk[: max(0, fault.after_bytes - sent)])
                    self.wfile.flush()
                    time.sleep(0.3)  # let the client read what was sent: an RST discards unread data
                    self._reset()
                    return
                if fault is not None and fault.kind == "slow":
                    time.sleep(fault.delay)
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                sent += len(chunk)

    def _reset(self) -> None:
        """Abort the connection with a TCP RST, as a dropped network link would look to the client."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        try:
            self.connection.close()
        except OSError:
            pass


def _in_range(total: int | None, bounds: str) -> bool:
    """Whether a parameter count is within the Hub's "min:6B,max:128B" (either bound optional)."""
    if total is None:
        return False
    units = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
    for bound in bounds.split(","):
        side, _, value = bound.partition(":")
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMBT]?)", value.strip().upper())
        if m is None:
            continue
        limit = float(m[1]) * units[m[2]]
        if (side == "min" and total < limit) or (side == "max" and total > limit):
            return False
    return True


def _gguf_summary(repo: HostedRepo) -> dict:
    """The Hub's `gguf` field: the architecture, parameter count, trained context and chat template
    of the repo's first GGUF model file (read once per commit)."""
    if repo.gguf is None:
        from localrun.model.header import interpret, parse_local

        models = sorted(p for p in repo.files if p.endswith(".gguf") and "mmproj" not in p.lower())
        if not models:
            return {}
        try:
            parsed, size = parse_local(repo.files[models[0]].source)
            header = interpret([parsed], [size], models[0])
        except Exception:  # not a GGUF after all: the Hub says nothing about it
            repo.gguf = {}
            return repo.gguf
        repo.gguf = {"total": header.n_params, "architecture": header.architecture}
        repo.gguf["context_length"] = header.n_ctx_train
        if header.chat_template:
            repo.gguf["chat_template"] = header.chat_template
    return repo.gguf


@contextmanager
def refusing_endpoint() -> Iterator[str]:
    """A loopback URL where connections are refused: the port is bound (so no one else takes it)
    and never listened on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextmanager
def unanswering_endpoint() -> Iterator[str]:
    """A loopback URL whose server accepts connections and never answers: the kernel completes
    the handshake from the listen backlog, and nothing ever reads or writes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
