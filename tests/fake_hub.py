"""A small, real HTTP server that speaks the part of the Hugging Face Hub API used for downloads.

Why: tests must drive the *real* ``huggingface_hub`` client (URL building, ETag/commit headers,
cache layout, resume-on-drop, error mapping) without network access. Routes and headers follow
huggingface_hub 2.4.0 (``hf_api.model_info``/``list_repo_tree``, ``file_download``,
``utils._http.hf_raise_for_status``):

* ``GET /api/models/{repo}[/revision/{rev}]`` (``?blobs=true``, ``?expand=...``): model info.
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=..``: tree listing; ``snapshot_download``
  lists files with this, not with ``siblings``.
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``: served directly (no CDN redirect, no Xet headers,
  so the client uses plain HTTP); honours ``Range``.
* Errors carry ``X-Error-Code`` (RepoNotFound, GatedRepo, RevisionNotFound, EntryNotFound),
  which is what the client maps to exception classes. Models only; repo ids are ``org/name``.

Auth mirrors the real Hub: model info and tree listings of gated repos are public, file
downloads need a token from ``valid_tokens`` (else 401 ``GatedRepo``; with no valid tokens, never).
If ``valid_tokens`` is non-empty, any *other* bearer token gets 401 "Invalid credentials in
Authorization header" (as the Hub does, even on public repos); if empty, tokens are ignored.

Endpoint: ``huggingface_hub`` reads ``HF_ENDPOINT`` once, at import, into
``constants.ENDPOINT``/``HUGGINGFACE_CO_URL_TEMPLATE`` and the module-level ``HfApi`` behind
``huggingface_hub.model_info`` etc. The one recommended way is::

    with FakeHub(repos=...) as hub:
        hub.patch_client(monkeypatch, tmp_path)   # then call the client as production code does

Passing ``endpoint=hub.url`` to ``snapshot_download``/``hf_hub_download``/``HfApi`` also works,
but only for calls that expose it, and it leaves cache, token and telemetry unisolated.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    import pytest

Files = dict[str, bytes]
Repos = dict[str, dict[str, Files]]

_INFO = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?")
_TREE = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?")
_RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received; ``path`` is URL-encoded as sent, header keys are lower-cased."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


class _HubError(Exception):
    """An error response, shaped the way ``hf_raise_for_status`` expects it."""

    def __init__(
        self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def folder_files(root: Path, prefix: str = "") -> Files:
    """A folder's files as a repo's `Files`, under `prefix` (a subfolder in the repo)."""
    return {
        f"{prefix}{p.relative_to(root)}": p.read_bytes() for p in root.rglob("*") if p.is_file()
    }


def _git_oid(data: bytes) -> str:
    """Git blob id, as the Hub reports in ``oid``/``blobId`` and plain-file ETags."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=N-``, ``N-M`` or ``-K`` -> half-open (start, end); None if unsatisfiable."""
    m = _RANGE.fullmatch(header)
    if m is None or m.groups() == ("", ""):
        return None
    first, last = m.groups()
    if not first:
        start, end = max(size - int(last), 0), size
    else:
        start, end = int(first), min(int(last) + 1, size) if last else size
    return (start, end) if start < end else None


class FakeHub:
    """In-process Hub: ``repos[repo][commit][path] = bytes``, ``refs[repo][branch] = commit``."""

    def __init__(
        self,
        repos: Repos,
        refs: dict[str, dict[str, str]] | None = None,
        gated: set[str] | frozenset[str] = frozenset(),
        valid_tokens: set[str] | frozenset[str] = frozenset(),
        lfs_threshold: int = 1 << 20,
    ) -> None:
        self.repos, self.refs, self.lfs_threshold = repos, refs or {}, lfs_threshold
        self.gated, self.valid_tokens = set(gated), set(valid_tokens)
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._drops: dict[tuple[str, str], int] = {}
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def drop_connection_once(self, repo: str, path: str, after_bytes: int) -> None:
        """Make the next Range-less GET of ``path`` announce the full length but stop early."""
        with self._lock:
            self._drops[(repo, path)] = after_bytes

    def env(self, hf_home: Path, **extra: str) -> dict[str, str]:
        """What points a child process's Hub client here (its cache in `hf_home`, no
        telemetry), with `extra` on top."""
        return {
            "HF_ENDPOINT": self.url, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1",
        } | extra  # fmt: skip

    def patch_client(self, monkeypatch: pytest.MonkeyPatch, hf_home: Path) -> None:
        """Point the already-imported client here and isolate cache, token and telemetry.

        Constants are patched because they were frozen at import; env vars are set too so that
        subprocesses importing ``huggingface_hub`` afresh agree. Telemetry is disabled because
        building the User-Agent otherwise fetches ``{ENDPOINT}/api/agent-harnesses`` once.
        """
        from huggingface_hub import constants, hf_api

        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", self.url)
        monkeypatch.setenv("HF_HOME", str(hf_home))
        monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
        template = self.url + "/{repo_id}/resolve/{revision}/{filename}"
        for name, value in {
            "ENDPOINT": self.url,
            "HUGGINGFACE_CO_URL_TEMPLATE": template,
            "HF_HUB_CACHE": str(hf_home / "hub"),
            "HF_TOKEN_PATH": str(hf_home / "token"),
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_TELEMETRY": True,
        }.items():
            monkeypatch.setattr(constants, name, value)
        monkeypatch.setattr(hf_api.api, "endpoint", self.url)

    # -- data model -------------------------------------------------------------------------

    def _lookup(self, repo: str, rev: str, token: str | None, gate: bool) -> tuple[str, Files]:
        if repo not in self.repos:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        if gate and repo in self.gated and token not in self.valid_tokens:
            msg = f"Access to model {repo} is restricted. You must be authenticated to access it."
            raise _HubError(401, "GatedRepo", msg)
        commit = self.refs.get(repo, {}).get(rev, rev)
        if commit not in self.repos[repo]:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit, self.repos[repo][commit]

    def _entry(self, path: str, data: bytes) -> dict[str, Any]:
        """Tree entry; files >= ``lfs_threshold`` are LFS (oid of the pointer, sha256 in lfs)."""
        entry: dict[str, Any] = {"type": "file", "oid": _git_oid(data), "size": len(data)}
        if len(data) >= self.lfs_threshold:
            sha = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\n"
            pointer += f"size {len(data)}\n"
            entry["oid"] = _git_oid(pointer.encode())
            entry["lfs"] = {"oid": sha, "size": len(data), "pointerSize": len(pointer)}
        return {**entry, "path": path}

    def _info(self, repo: str, rev: str, token: str | None, query: dict[str, list[str]]) -> Any:
        commit, files = self._lookup(repo, rev, token, gate=False)
        siblings: list[dict[str, Any]] = []
        for path, data in sorted(files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if query.get("blobs", ["false"])[0].lower() == "true":
                e = self._entry(path, data)
                sibling |= {"size": e["size"], "blobId": e["oid"]}
                if lfs := e.get("lfs"):
                    sibling["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"]}
                    sibling["lfs"]["pointerSize"] = lfs["pointerSize"]
            siblings.append(sibling)
        gated = "manual" if repo in self.gated else False
        info = {"id": repo, "sha": commit, "private": False, "gated": gated, "disabled": False,
                "tags": [], "siblings": siblings}  # fmt: skip
        if expand := query.get("expand"):
            info = {k: v for k, v in info.items() if k == "id" or k in expand}
        return info

    def _tree(self, repo: str, rev: str, path: str, token: str | None, recursive: bool) -> Any:
        _, files = self._lookup(repo, rev, token, gate=False)
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        dirs: set[str] = set()
        entries = []
        for name, data in sorted(files.items()):
            if name.startswith(prefix):
                parts = name[len(prefix) :].split("/")
                depth = len(parts) if recursive else min(len(parts), 2)
                dirs.update(prefix + "/".join(parts[:i]) for i in range(1, depth))
                if recursive or len(parts) == 1:
                    entries.append(self._entry(name, data))
        folders = [
            {"type": "directory", "oid": _git_oid(d.encode()), "size": 0, "path": d}
            for d in sorted(dirs)
        ]
        if prefix and not entries and not folders:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on {rev}")
        return folders + entries

    def _take_drop(self, repo: str, path: str) -> int | None:
        with self._lock:
            return self._drops.pop((repo, path), None)


class _Server(ThreadingHTTPServer):
    hub: FakeHub


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.0 (one request per connection), so shutdown never waits on keep-alive sockets."""

    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Keep pytest output clean."""

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        hub, url = self.server.hub, urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        query = parse_qs(url.query)
        with hub._lock:
            hub._requests.append(RecordedRequest(self.command, url.path, query, headers))
        auth = headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else None
        try:
            if token is not None and hub.valid_tokens and token not in hub.valid_tokens:
                raise _HubError(401, None, "Invalid credentials in Authorization header")
            if m := _RESOLVE.fullmatch(url.path):
                self._resolve(unquote(m["repo"]), unquote(m["rev"]), unquote(m["path"]), token)
            elif m := _TREE.fullmatch(url.path):
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                args = (unquote(m["repo"]), unquote(m["rev"]), unquote(m["path"] or ""))
                self._json(hub._tree(*args, token, recursive))
            elif m := _INFO.fullmatch(url.path):
                self._json(hub._info(unquote(m["repo"]), unquote(m["rev"] or "main"), token, query))
            else:
                raise _HubError(404, None, "Not Found")
        except _HubError as e:
            extra = {"X-Error-Code": e.code} if e.code else {}
            body = json.dumps({"error": e.message}).encode()
            self._send(e.status, body, {**extra, "X-Error-Message": e.message, **e.headers})

    def _resolve(self, repo: str, rev: str, path: str, token: str | None) -> None:
        hub = self.server.hub
        commit, files = hub._lookup(repo, rev, token, gate=True)
        if path not in files:
            raise _HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        data, entry = files[path], hub._entry(path, files[path])
        headers = {"X-Repo-Commit": commit, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"}
        if lfs := entry.get("lfs"):
            headers |= {"X-Linked-Etag": f'"{lfs["oid"]}"', "X-Linked-Size": str(len(data))}
        status, start, end, cut = 200, 0, len(data), None
        if rng := self.headers.get("Range"):
            span = _parse_range(rng, len(data))
            if span is None:
                unsatisfiable = {"Content-Range": f"bytes */{len(data)}"}
                raise _HubError(416, None, "Range Not Satisfiable", unsatisfiable)
            status, (start, end) = 206, span
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        elif self.command == "GET":
            cut = hub._take_drop(repo, path)
        self._send(status, data[start:end], headers, limit=cut)

    def _json(self, payload: Any) -> None:
        self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def _send(
        self, status: int, body: bytes, headers: dict[str, str], limit: int | None = None
    ) -> None:
        """Announce the full Content-Length; ``limit`` truncates the body to fake a drop."""
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body[:limit])
