"""Optional API keys: read-write, or read-only (search, compare, urls, count, dump)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import Enum

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from idios.settings import Settings

PUBLIC_PATHS = {"/ping", "/", "/docs", "/openapi.json"}
PUBLIC_PREFIXES = ("/static/",)
READ_ACTIONS = {"search", "search_batch", "compare", "urls", "dump", "count"}

class Access(str, Enum):
    READ = "ro"
    WRITE = "rw"


@dataclass(frozen=True)
class ApiKeys:
    keys: tuple[tuple[bytes, Access], ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys | None:
        """The configured keys (IDIOS_API_KEYS and/or IDIOS_API_KEYS_FILE), or None when none are set."""
        lines = settings.api_keys.split(",")
        if settings.api_keys_file is not None:
            lines += settings.api_keys_file.read_text().splitlines()
        keys = []
        for line in (item.strip() for item in lines):
            if not line or line.startswith("#"):
                continue
            secret, _, mode = line.rpartition(":") if line.endswith((":ro", ":rw")) else (line, "", "rw")
            keys.append((secret.encode(), Access(mode)))
        return cls(tuple(keys)) if keys else None

    def lookup(self, presented: str) -> Access | None:
        """Constant-time: every key is compared, whatever matches first."""
        candidate = presented.encode()
        found: Access | None = None
        for secret, access in self.keys:
            if hmac.compare_digest(secret, candidate):
                found = access
        return found


def presented_key(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("X-API-Key", "").strip()


def is_read(request: web.Request) -> bool:
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return True
    return request.path.rstrip("/").rsplit("/", 1)[-1] in READ_ACTIONS


def _deny(status: int, kind: str, detail: str) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="idios"'} if status == 401 else {}
    return web.Response(body=orjson.dumps({"detail": detail, "type": kind}), status=status,
                        content_type="application/json", headers=headers)


def auth_middleware(keys: ApiKeys) -> Middleware:
    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIXES):
            return await handler(request)
        access = keys.lookup(presented_key(request))
        if access is None:
            return _deny(401, "unauthorized", "A valid API key is required (Authorization: Bearer KEY or X-API-Key)")
        if access is Access.READ and not is_read(request):
            return _deny(403, "forbidden", "This API key is read-only")
        return await handler(request)

    return check_key
