"""A stand-in for a Hugging Face hub on loopback: the parts of its protocol huggingface_hub's downloads use.

- `GET /api/models/ORG/NAME/revision/REV`: the repo's info at a revision (its commit `sha`, its files);
- `GET /api/models/ORG/NAME/tree/REV[/PATH]?recursive=...`: the file listing, with sizes and LFS sha256s;
- `HEAD`/`GET /ORG/NAME/resolve/REV/PATH`: a file, with `X-Repo-Commit`, `ETag`/`X-Linked-Etag` and sizes;
- errors as the hub sends them: 404 with `X-Error-Code: RepoNotFound`, `RevisionNotFound` or `EntryNotFound`,
  401 for a private repo asked for without its token.

Point HF_ENDPOINT at `FakeHub.url` and huggingface_hub (its cache, HF_TOKEN, HF_HUB_OFFLINE) runs unchanged."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

from tests.servers import serving


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = ""
    token: str | None = None  # a private repo: only this bearer token sees it
    requests: int = 0

    def __post_init__(self) -> None:
        if not self.commit:
            digest = hashlib.sha1()
            for path in sorted(self.files):
                digest.update(path.encode() + b"\0" + hashlib.sha256(self.files[path]).digest())
            self.commit = digest.hexdigest()


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    url: str = ""
    log: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self.revision)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}", self.tree)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}/{path:.*}", self.tree)
        app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.*}", self.resolve)
        return app

    def _repo(self, request: web.Request) -> Repo:
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        self.log.append(f"{request.method} {request.path_qs}")
        repo = self.repos.get(repo_id)
        auth = request.headers.get("Authorization", "")
        if repo is None or (repo.token is not None and auth != f"Bearer {repo.token}"):
            status = 401 if repo is not None or not auth else 404
            raise _error(status, "RepoNotFound", "Repository not found")
        rev = request.match_info["rev"]
        if rev not in ("main", repo.commit):
            raise _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        repo.requests += 1
        return repo

    async def revision(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        return web.json_response({
            "_id": repo.commit[:24], "id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": repo.token is not None,
            "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [], "library_name": "idios",
            "lastModified": "2026-12-01T00:00:00.000Z", "createdAt": "2026-12-01T00:00:00.000Z",
            "siblings": [{"rfilename": p} for p in sorted(repo.files)],
        })

    async def tree(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        prefix = request.match_info.get("path", "").strip("/")
        recursive = request.query.get("recursive", "false").lower() in ("1", "true")
        entries, folders = [], set()
        for path in sorted(repo.files):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1:] if prefix else path
            if "/" in rest and not recursive:
                folders.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                continue
            for i in range(1, rest.count("/") + 1):
                folders.add((prefix + "/" if prefix else "") + "/".join(rest.split("/")[:i]))
            data = repo.files[path]
            entries.append({"type": "file", "oid": _git_oid(data), "size": len(data), "path": path,
                            "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 132}})
        listing = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        return web.json_response(listing + entries)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        path = request.match_info["path"]
        if path not in repo.files:
            raise _error(404, "EntryNotFound", f"{path} does not exist", commit=repo.commit)
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
        data = repo.files[path]
        sha = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
                   "X-Linked-Size": str(len(data)), "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(data))})
        start = 0
        if request.http_range.start is not None:
            start = request.http_range.start
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return web.Response(status=206, body=data[start:], headers=headers)
        return web.Response(body=data, headers=headers)


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _error(status: int, code: str, message: str, commit: str | None = None) -> web.HTTPException:
    headers = {"X-Error-Code": code, "X-Error-Message": message}
    if commit:
        headers["X-Repo-Commit"] = commit
    cls = {401: web.HTTPUnauthorized, 404: web.HTTPNotFound}[status]
    return cls(headers=headers, text=f'{{"error": "{message}"}}', content_type="application/json")


@asynccontextmanager
async def fake_hub(repos: dict[str, Repo]) -> AsyncIterator[FakeHub]:
    hub = FakeHub(repos)
    async with serving(hub.app(), "127.0.0.1") as base:
        hub.url = base.rstrip("/")
        yield hub
