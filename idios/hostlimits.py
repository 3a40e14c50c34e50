"""What the fetcher owes each image host: at most fetch_per_host requests at once, at most fetch_host_rate
requests a second, the headers IDIOS_FETCH_HEADERS gives that host (and no other), and patience when it answers
429 or 503."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict

from idios.netguard import HostAllowlist

BACKOFF_FIRST = 0.5  # seconds before the first retry when the host gives no Retry-After; doubled each time
BACKOFF_CAP = 8.0
SWEEP_FLOOR = 1024  # hosts tracked before idle entries are swept
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP header name (RFC 9110 token)
_SHAPE = 'a JSON object {"host-pattern": {"Header": "value"}}'


def host_key(host: str) -> str:
    """The name limits are kept under: `Example.org.` and `example.org` are one host."""
    return host.lower().rstrip(".").strip("[]")


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a Retry-After header asks to wait (delta-seconds or an HTTP-date); None when absent or unreadable."""
    value = (value or "").strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is GMT; parsedate_to_datetime leaves "-0000" naive
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff(retry: int) -> float:
    """The wait before retry number `retry` (0 first) when the host did not say how long."""
    return min(BACKOFF_CAP, BACKOFF_FIRST * 2.0 ** retry)


@dataclass
class _Host:
    """One host's state, kept only while a request to it runs or waits, or its next request must still wait."""

    slots: asyncio.BoundedSemaphore | None
    users: int = 0  # requests inside slot(), waiting or running
    next_at: float = 0.0  # loop time before which no request may start


class HostLimits:
    """Per-host concurrency and request spacing, on top of the fetcher's global semaphore. Idle hosts are
    forgotten: an entry lives while a request to it is in slot() (at most fetch_concurrency of them) or for
    one rate interval after its last request, so a crawl over a million hosts keeps a bounded map."""

    def __init__(self, per_host: int, rate: float) -> None:
        self._per_host = max(per_host, 0)
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._hosts: dict[str, _Host] = {}
        self._sweep_at = SWEEP_FLOOR

    def __len__(self) -> int:
        """Hosts tracked now."""
        return len(self._hosts)

    @contextlib.asynccontextmanager
    async def slot(self, host: str) -> AsyncIterator[None]:
        """Held around one HTTP request to `host`, its response read included."""
        if not self._per_host and not self._interval:
            yield
            return
        key = host_key(host)
        state = self._hosts.get(key)
        if state is None:
            self._sweep()
            slots = asyncio.BoundedSemaphore(self._per_host) if self._per_host else None
            state = self._hosts[key] = _Host(slots)
        state.users += 1
        try:
            async with state.slots if state.slots is not None else contextlib.nullcontext():
                await self._space(state)
                yield
        finally:
            state.users -= 1
            if not state.users and state.next_at <= asyncio.get_running_loop().time():
                del self._hosts[key]

    async def _space(self, state: _Host) -> None:
        """Waits for this request's turn: turns are handed out one interval apart, in the order asked."""
        if not self._interval:
            return
        now = asyncio.get_running_loop().time()
        start = max(now, state.next_at)
        state.next_at = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)

    def _sweep(self) -> None:
        """Drops idle hosts whose spacing has passed; run when the map doubles, so it costs O(1) a request."""
        if len(self._hosts) < self._sweep_at:
            return
        now = asyncio.get_running_loop().time()
        for key in [k for k, h in self._hosts.items() if not h.users and h.next_at <= now]:
            del self._hosts[key]
        self._sweep_at = max(SWEEP_FLOOR, 2 * len(self._hosts))


class HostHeaders:
    """Request headers per image host (IDIOS_FETCH_HEADERS), host patterns matched as IDIOS_FETCH_HOSTS does.
    Every matching entry applies, in the order written, a later one replacing an earlier one's header. Parsed
    once at start-up: a value that cannot be used stops the process with a message, not the first download."""

    def __init__(self, spec: str) -> None:
        self._rules: list[tuple[HostAllowlist, dict[str, str]]] = []
        if not spec.strip():
            return
        try:
            data = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"IDIOS_FETCH_HEADERS is not JSON ({exc}); it must be {_SHAPE}") from None
        if not isinstance(data, dict):
            raise SystemExit(f"IDIOS_FETCH_HEADERS must be {_SHAPE}")
        for pattern, headers in data.items():
            self._rules.append((_pattern(pattern), _headers(pattern, headers)))

    def for_host(self, host: str) -> CIMultiDict[str]:
        """The headers for one request to `host` (a fresh mapping the caller may change)."""
        out: CIMultiDict[str] = CIMultiDict()
        for hosts, headers in self._rules:
            if hosts.allows(host):
                out.update(headers)
        return out


def _pattern(pattern: str) -> HostAllowlist:
    parts = [p.strip() for p in pattern.split(",")]
    if not all(parts) or any("*" in p.removeprefix("*.") for p in parts):
        raise SystemExit(f"IDIOS_FETCH_HEADERS: {pattern!r} is not a host pattern (a name, or *.example.org)")
    return HostAllowlist(pattern)


def _headers(pattern: str, headers: Any) -> dict[str, str]:
    if not isinstance(headers, dict):
        raise SystemExit(f"IDIOS_FETCH_HEADERS: the value for {pattern!r} must be an object of header: value")
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            raise SystemExit(f"IDIOS_FETCH_HEADERS: {name!r} (for {pattern!r}) is not a header name")
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            raise SystemExit(f"IDIOS_FETCH_HEADERS: the value of {name} for {pattern!r} must be a one-line string")
    return dict(headers)
