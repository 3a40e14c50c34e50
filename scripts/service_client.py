"""What bulk_ingest.py, dump.py and restore.py share: an HTTP client of the Idios API with bounded retries.

The scripts talk to the service only over HTTP, so they run on any machine with requirements/tools.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from tqdm import tqdm

try:  # orjson is several times faster on embeddings; the scripts still work without it
    import orjson

    def dumps(data: Any) -> bytes:
        return orjson.dumps(data)

    loads: Callable[[bytes | str], Any] = orjson.loads
except ImportError:  # pragma: no cover - tools.txt installs orjson
    import json

    def dumps(data: Any) -> bytes:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()

    loads = json.loads

DEFAULT_SERVER = "http://127.0.0.1:4213"
EXIT_USAGE = 2  # bad arguments or unreadable input
EXIT_SERVICE = 3  # the service could not be reached after retries, or refused the requests themselves
EXIT_INTERRUPTED = 130
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class ScriptError(Exception):
    """An error of the script itself (not of one image): reported in one line, exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class ServiceError(ScriptError):
    """The service refused a request (4xx) or kept failing after every retry (connection errors, 5xx)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message, EXIT_SERVICE)
        self.status = status

    @property
    def transient(self) -> bool:
        """True when retrying later could succeed: no answer at all, or a 5xx/429."""
        return self.status is None or self.status in RETRY_STATUSES


def add_service_args(parser: argparse.ArgumentParser) -> None:
    """The options every script takes: where the service is, which model, credentials, retries, progress."""
    g = parser.add_argument_group("service")
    g.add_argument("--server", default=DEFAULT_SERVER, help="base URL of the Idios API (default: %(default)s)")
    g.add_argument("--model", required=True, help="model name, as listed by GET /models")
    g.add_argument("--api-key", default=os.environ.get("IDIOS_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $IDIOS_API_KEY; unset = no header)")
    g.add_argument("--timeout", type=float, default=600.0,
                   help="seconds allowed for one request, including the server's work (default: %(default)s)")
    g.add_argument("--retries", type=int, default=6,
                   help="retries of a request after a connection error, timeout, 429 or 5xx, with exponential "
                        "backoff capped at --backoff-max seconds (default: %(default)s)")
    g.add_argument("--backoff-max", type=float, default=30.0, help="longest wait between retries (default: %(default)s)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar on stderr (default: only when stderr is a terminal)")


def backoff(attempt: int, cap: float) -> float:
    """Exponential backoff with jitter: about 0.5 s, 1 s, 2 s, … never above `cap`."""
    return min(cap, 0.5 * 2.0**attempt) * random.uniform(0.5, 1.0)


class ServiceClient:
    """One aiohttp session to the API; JSON in and out; transient failures retried with bounded backoff."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.base = args.server.rstrip("/")
        self.model = args.model
        self.retries = max(0, args.retries)
        self.backoff_max = args.backoff_max
        self._headers = {"Content-Type": "application/json"}
        if args.api_key:
            self._headers["Authorization"] = f"Bearer {args.api_key}"
        self._timeout = aiohttp.ClientTimeout(total=args.timeout)
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ServiceClient:
        self._http = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()

    def model_path(self, route: str, model: str | None = None) -> str:
        """The path of `route` under `model` (default: --model)."""
        return f"/models/{model or self.model}/{route}"

    async def request(self, method: str, path: str, body: bytes | None = None, raw: bool = False) -> Any:
        """Send one request; retry what may pass later; return the decoded JSON (None for 204), or with
        `raw` the body's bytes."""
        assert self._http is not None, "use ServiceClient as an async context"
        last: ServiceError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(backoff(attempt - 1, self.backoff_max))
            try:
                return await self._once(method, path, body, raw)
            except ServiceError as exc:
                if not exc.transient:
                    raise
                last = exc
        assert last is not None
        raise ServiceError(f"{last} (after {self.retries} retries)", last.status)

    async def _once(self, method: str, path: str, body: bytes | None, raw: bool) -> Any:
        assert self._http is not None
        url = self.base + path
        try:
            async with self._http.request(method, url, data=body) as resp:
                data = await resp.read()
                if resp.status >= 400:
                    raise ServiceError(f"{method} {path} answered {resp.status}: {detail(data)}", resp.status)
                if raw:
                    return data
                return loads(data) if data else None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ServiceError(f"{method} {path} failed: {type(exc).__name__}: {exc}".rstrip(": ")) from None

    async def check_model(self, model: str | None = None, reading: bool = False) -> dict[str, Any]:
        """The entry of `model` (default: --model) in GET /models, or a one-line error naming the models there are.
        A model the service refuses (its files are not those that filled its collection) is an error too,
        unless only its rows are to be read (`reading`: count, urls and dump still answer for it)."""
        name = model or self.model
        models = await self.request("GET", "/models")
        for entry in models:
            if entry.get("name") == name:
                if entry.get("refused") and not reading:
                    raise ScriptError(f"model {name!r} is not served by {self.base}: {entry['refused']}", EXIT_USAGE)
                return dict(entry)
        names = ", ".join(sorted(str(m.get("name")) for m in models)) or "none"
        raise ScriptError(f"model {name!r} is not loaded by {self.base} (models: {names})", EXIT_USAGE)


def detail(raw: bytes, limit: int = 300) -> str:
    """A short readable form of an error body."""
    text = raw.decode("utf-8", "replace").strip()
    return text if len(text) <= limit else text[:limit] + "…"


def progress(args: argparse.Namespace, total: int | None, unit: str, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr with rate and ETA (ETA only when the total is known)."""
    disable = None if args.progress is None else not args.progress
    return tqdm(total=total, initial=initial, unit=unit, unit_scale=True, dynamic_ncols=True,
                smoothing=0.1, disable=disable, file=sys.stderr)


def say(message: str) -> None:
    """A line on stderr that does not tear a progress bar."""
    tqdm.write(message, file=sys.stderr)


def run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a script's async main; turn its own errors and Ctrl-C into one line and an exit code."""
    try:
        return asyncio.run(main())
    except ScriptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
