"""What the fetcher owes each image host: at most fetch_per_host requests at once, at most fetch_host_rate
requests a second, the headers IDIOS_FETCH_HEADERS gives that host (and no other; credentials never over plain
http to another machine), and patience when it answers 429 or 503: its Retry-After holds all its requests back.
Waiting here is queueing, not downloading: the fetcher bounds it by job_timeout, not fetch_timeout."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import ipaddress
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict
from yarl import URL

from idios import errors
from idios.netguard import HostAllowlist, literal_address

BACKOFF_FIRST = 0.5  # seconds before the first retry when the host gives no Retry-After; doubled each time
BACKOFF_CAP = 8.0
SWEEP_FLOOR = 1024  # hosts tracked before idle entries are swept
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP header name (RFC 9110 token)
_SHAPE = 'a JSON object {"host-pattern": {"Header": "value"}}'
CREDENTIALS = frozenset({"authorization", "cookie", "proxy-authorization"})  # never sent in cleartext off-machine
WARNED_HOSTS = 1024  # hosts remembered as warned about dropped credentials before the memory starts over

log = logging.getLogger(__name__)


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
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)  # the one request choosing its start time now
    users: int = 0  # requests inside slot(), waiting or running
    next_at: float = 0.0  # loop time before which no request may start: rate spacing, Retry-After or backoff


class HostLimits:
    """Who may send a request now: at most `concurrency` requests running in all, `per_host` to one host, and to
    one host one each 1/`rate` seconds and none before a Retry-After it asked for (hold()).

    A request queues in this order, and holds nothing of anyone else's while it waits: its host's slot, then its
    host's turn (a FIFO lock: the holder sleeps until next_at, and next_at moves only when a request is actually
    let through, so a waiter cancelled or timed out takes no turn and gives none back), then a global slot, taken
    last, so that a host's queue never holds one and an idle host waits only for downloads actually running.
    The wait is bounded by the caller's deadline; past it, or when the turn is known to come after it, slot()
    raises ImageTimeout. Idle hosts are forgotten: an entry lives while a request to it is in slot() or until
    its next_at passes, so a crawl over a million hosts keeps a bounded map."""

    def __init__(self, per_host: int, rate: float, concurrency: int = 0, max_hold: float = math.inf) -> None:
        self._per_host = max(per_host, 0)
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._running = asyncio.BoundedSemaphore(concurrency) if concurrency > 0 else None
        self._max_hold = max_hold
        self._hosts: dict[str, _Host] = {}
        self._sweep_at = SWEEP_FLOOR

    def __len__(self) -> int:
        """Hosts tracked now."""
        return len(self._hosts)

    @contextlib.asynccontextmanager
    async def slot(self, host: str, deadline: float | None = None) -> AsyncIterator[None]:
        """Held around one HTTP request to `host`, its response read included; entered when the request may be
        sent, waiting at most until `deadline` (loop time; None: no bound)."""
        key = host_key(host)
        queued = bool(self._per_host or self._interval) or key in self._hosts
        state = self._state(key) if queued else None
        if state is not None:
            state.users += 1
        try:
            async with contextlib.AsyncExitStack() as held:
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._admit(held, state, deadline, host)
                except TimeoutError:
                    raise _late(host) from None
                yield
        finally:
            if state is not None:
                state.users -= 1
                if not state.users and state.next_at <= asyncio.get_running_loop().time():
                    self._hosts.pop(key, None)

    def hold(self, host: str, seconds: float) -> None:
        """The host answered 429 or 503 asking for `seconds` (or a backoff): none of its requests starts before
        then, not only the one answered. Capped at max_hold, past which every waiter's deadline is anyway."""
        state = self._state(host_key(host))
        state.next_at = max(state.next_at, asyncio.get_running_loop().time() + min(seconds, self._max_hold))

    async def _admit(self, held: contextlib.AsyncExitStack, state: _Host | None, deadline: float | None,
                     host: str) -> None:
        """Takes, into `held`, what one request needs before it is sent: see the class docstring for the order."""
        if state is None:
            await self._enter_running(held)
            return
        if state.slots is not None:
            await held.enter_async_context(state.slots)
        loop = asyncio.get_running_loop()
        async with state.turn:
            while True:
                await _until(state, deadline, host)
                if self._running is not None:
                    await self._running.acquire()
                if state.next_at <= loop.time():
                    break
                if self._running is not None:  # a hold came while this waited for a global slot: wait it out
                    self._running.release()
            if self._running is not None:
                held.callback(self._running.release)
            state.next_at = loop.time() + self._interval

    async def _enter_running(self, held: contextlib.AsyncExitStack) -> None:
        if self._running is not None:
            await held.enter_async_context(self._running)

    def _state(self, key: str) -> _Host:
        state = self._hosts.get(key)
        if state is None:
            self._sweep()
            slots = asyncio.BoundedSemaphore(self._per_host) if self._per_host else None
            state = self._hosts[key] = _Host(slots)
        return state

    def _sweep(self) -> None:
        """Drops idle hosts whose spacing has passed; run when the map doubles, so it costs O(1) a request."""
        if len(self._hosts) < self._sweep_at:
            return
        now = asyncio.get_running_loop().time()
        for key in [k for k, h in self._hosts.items() if not h.users and h.next_at <= now]:
            del self._hosts[key]
        self._sweep_at = max(SWEEP_FLOOR, 2 * len(self._hosts))


async def _until(state: _Host, deadline: float | None, host: str) -> None:
    """Sleeps until the host's next_at, which a hold may push on meanwhile; fails at once when it is past the
    deadline rather than sleeping into the timeout."""
    loop = asyncio.get_running_loop()
    while state.next_at > loop.time():
        if deadline is not None and state.next_at > deadline:
            raise _late(host)
        await asyncio.sleep(state.next_at - loop.time())


def _late(host: str) -> errors.ImageTimeout:
    return errors.ImageTimeout(f"Waited for its turn at {host[:200]} until the job's time ran out "
                               "(IDIOS_JOB_TIMEOUT); the host is busy or limited (IDIOS_FETCH_PER_HOST, "
                               "IDIOS_FETCH_HOST_RATE, Retry-After)")


class HostHeaders:
    """Request headers per image host (IDIOS_FETCH_HEADERS), host patterns matched as IDIOS_FETCH_HOSTS does.
    Every matching entry applies, in the order written, a later one replacing an earlier one's header. Parsed
    once at start-up: a value that cannot be used stops the process with a message, not the first download."""

    def __init__(self, spec: str) -> None:
        self._rules: list[tuple[HostAllowlist, dict[str, str]]] = []
        self._warned: set[str] = set()
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
        """The headers configured for `host`, whatever the scheme (a fresh mapping the caller may change)."""
        out: CIMultiDict[str] = CIMultiDict()
        for hosts, headers in self._rules:
            if hosts.allows(host):
                out.update(headers)
        return out

    def for_url(self, url: URL) -> CIMultiDict[str]:
        """The headers for one request to `url`: for_host's, less Authorization, Cookie and Proxy-Authorization
        when the url is plain http to a host other than this machine, where anyone on the path could read them
        (an http url, or a same-host redirect from https to http). A warning says so, once per host."""
        host = url.host or ""
        out = self.for_host(host)
        if url.scheme == "https" or is_loopback(host):
            return out
        dropped = sorted({name for name in out if name.lower() in CREDENTIALS})
        for name in dropped:
            out.popall(name)
        if dropped and host_key(host) not in self._warned:
            if len(self._warned) >= WARNED_HOSTS:
                self._warned.clear()
            self._warned.add(host_key(host))
            log.warning("not sending %s to %s over plain http (IDIOS_FETCH_HEADERS are sent in cleartext only to "
                        "this machine); use an https url", ", ".join(dropped), host[:200])
        return out


def is_loopback(host: str) -> bool:
    """True for a host that names this machine: a loopback address, or localhost (RFC 6761)."""
    key = host_key(host)
    if key == "localhost" or key.endswith(".localhost"):
        return True
    ip = literal_address(key)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip is not None and ip.is_loopback


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
