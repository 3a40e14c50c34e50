"""The fetch actor's tool: download one image with bounded concurrency, time, size and redirects, politely
toward each image host (idios/hostlimits.py: per-host concurrency, rate, headers, retries of 429 and 503).

Two clocks bound a fetch. fetch_timeout is the download's: the time its requests run (connect, answer, body)
plus the Retry-After or backoff waits it asks for, over all its redirects and retries. job_timeout bounds the
queueing (for a global slot, the host's slot and the host's turn), which the API would answer 504 after anyway:
a request queued behind a slow or rate-limited host is not charged for the host's other downloads."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import TracebackType

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from idios import errors
from idios.hostlimits import HostHeaders, HostLimits, backoff, retry_after
from idios.metrics import Metrics
from idios.netguard import AddressPolicy, BlockedAddress, GuardedResolver, HostAllowlist, literal_address
from idios.settings import Settings

REDIRECTS = {301, 302, 303, 307, 308}
RETRIED = {429, 503}  # the host is busy: asked again after Retry-After or a backoff
USER_AGENT = "Idios/0.1 (+reverse image search)"
CHUNK = 64 * 1024


@dataclass
class _Call:
    """What one fetch() asks beyond the settings, and the retries it has left."""

    cap: int  # bytes
    accept: str | None
    budget: float  # seconds of fetch_timeout left: time spent in requests and in retry waits is taken off
    queue_deadline: float  # loop time by which every queueing for a slot or a turn must have ended
    retries_left: int


@dataclass(frozen=True)
class _Busy:
    """A 429 or 503: come back later, after `wait` seconds if the host said (Retry-After)."""

    status: int
    wait: float | None


class ImageFetcher:
    """Downloads image bytes. The URL given stays the image's id; redirects are followed by hand so that
    every hop is checked against the private-address rule and counted, and each hop's host gets its own limits and
    headers (an Authorization meant for one host never follows a redirect to another, nor goes over plain http to
    another machine: HostHeaders.for_url)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._policy = AddressPolicy(settings.allow_private_urls, settings.private_allowlist)
        self._hosts = HostAllowlist(settings.fetch_hosts)
        self._limits = HostLimits(settings.fetch_per_host, settings.fetch_host_rate,
                                  concurrency=max(settings.fetch_concurrency, 1),
                                  max_hold=max(settings.job_timeout, settings.fetch_timeout))
        self._headers = HostHeaders(settings.fetch_headers)  # a bad IDIOS_FETCH_HEADERS stops start-up here

    async def __aenter__(self) -> ImageFetcher:
        s = self._settings
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self._policy),
            limit=max(s.fetch_concurrency, 1),
            ttl_dns_cache=60,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout, sock_read=s.fetch_timeout),
            headers={"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5"},
            auto_decompress=True,
        )
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url: str, *, max_bytes: int | None = None, accept: str | None = None) -> bytes:
        """The body behind `url`, or an ImageError naming why not. `max_bytes` lowers the size limit for this call
        (never past max_image_bytes); `accept` replaces the Accept header (a IIIF info.json wants JSON)."""
        s = self._settings
        cap = s.max_image_bytes if max_bytes is None else min(max_bytes, s.max_image_bytes)
        queue_deadline = asyncio.get_running_loop().time() + s.job_timeout
        call = _Call(cap, accept, s.fetch_timeout, queue_deadline, s.fetch_retries)
        try:
            return await self._follow(URL(url), call)
        except errors.IdiosError as exc:
            self._metrics.fetch_failures.labels(exc.type).inc()
            raise

    async def _follow(self, target: URL, call: _Call) -> bytes:
        for _ in range(self._settings.max_redirects + 1):
            self._check_target(target)
            outcome = await self._patiently(target, call)
            if isinstance(outcome, bytes):
                return outcome
            target = outcome
        raise errors.TooManyRedirects(f"More than {self._settings.max_redirects} redirects")

    async def _patiently(self, target: URL, call: _Call) -> bytes | URL:
        """One hop's answer, asked again after a 429 or 503 while retries last and the wait fits in what is left
        of fetch_timeout; a wait past it fails at once rather than sleeping into a timeout. The wait holds the
        whole host back (HostLimits.hold), and this request waits it out in the host's queue like the others: a
        Retry-After always (the host asked), a backoff (our guess) only while this request retries on it."""
        while True:
            outcome = await self._request(target, call)
            if not isinstance(outcome, _Busy):
                return outcome
            wait = outcome.wait
            if wait is None:
                wait = backoff(self._settings.fetch_retries - call.retries_left)
            if outcome.wait is not None or (call.retries_left > 0 and wait <= call.budget):
                self._limits.hold(target.host or "", wait)
            message = f"Image URL answered HTTP {outcome.status}"
            if call.retries_left <= 0:
                raise errors.ImageHttpError(message, http_status=outcome.status)
            if wait > call.budget:
                raise errors.ImageHttpError(f"{message}, asking to wait {wait:g} s: past the download's "
                                            f"{self._settings.fetch_timeout:g} s", http_status=outcome.status)
            call.retries_left -= 1
            call.budget -= wait
            self._metrics.fetch_retries.labels(str(outcome.status)).inc()

    async def _request(self, target: URL, call: _Call) -> bytes | URL | _Busy:
        """One HTTP request, sent once its host's limits let it (the wait bounded by job_timeout) and bounded by
        what is left of fetch_timeout from then: the body, a redirect's next URL, or a busy answer."""
        headers = self._headers.for_url(target)
        if call.accept is not None:
            headers["Accept"] = call.accept
        async with self._limits.slot(target.host or "", call.queue_deadline):
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                async with asyncio.timeout(call.budget):
                    return await self._exchange(target, headers, call.cap)
            except TimeoutError:
                raise errors.ImageTimeout(
                    f"Image download took longer than {self._settings.fetch_timeout:g} s"
                ) from None
            finally:
                call.budget -= loop.time() - started

    async def _exchange(self, target: URL, headers: CIMultiDict[str], cap: int) -> bytes | URL | _Busy:
        """The request itself, its failures named."""
        assert self._session is not None, "fetcher used outside its context"
        try:
            async with self._session.get(target, allow_redirects=False, headers=headers) as resp:
                if resp.status in REDIRECTS and "Location" in resp.headers:
                    return target.join(URL(resp.headers["Location"]))
                if resp.status in RETRIED:
                    return _Busy(resp.status, retry_after(resp.headers.get("Retry-After")))
                if resp.status >= 400:
                    raise errors.ImageHttpError(f"Image URL answered HTTP {resp.status}", http_status=resp.status)
                return await self._read(resp, cap)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, BlockedAddress):
                raise errors.PrivateAddress(
                    f"{target.host} resolves to a private address; IDIOS_ALLOW_PRIVATE_URLS or "
                    "IDIOS_PRIVATE_ALLOWLIST can allow it"
                ) from None
            raise errors.ImageUnreachable(f"Cannot connect to {target.host}: {exc.os_error}") from None
        except aiohttp.ClientError as exc:
            raise errors.ImageUnreachable(f"Image download failed: {exc.__class__.__name__}: {exc}") from None

    def _check_target(self, target: URL) -> None:
        if target.scheme not in ("http", "https") or not target.host:
            raise errors.InvalidUrl(f"Redirected to a URL that is not http(s): {str(target)[:200]}")
        if not self._hosts.allows(target.host):
            raise errors.HostNotAllowed(f"{target.host[:200]} is not among the image hosts allowed (IDIOS_FETCH_HOSTS)")
        ip = literal_address(target.host)
        if ip is not None and not self._policy.permits(ip):
            raise errors.PrivateAddress(
                f"{target.host} is a private address; IDIOS_ALLOW_PRIVATE_URLS or IDIOS_PRIVATE_ALLOWLIST can allow it"
            )

    async def _read(self, resp: aiohttp.ClientResponse, cap: int) -> bytes:
        if resp.content_length is not None and resp.content_length > cap:
            raise errors.ImageTooLarge(f"Image is {resp.content_length} bytes; the limit is {cap}")
        buf = bytearray()
        async for chunk in resp.content.iter_chunked(CHUNK):
            buf += chunk
            if len(buf) > cap:
                raise errors.ImageTooLarge(f"Image is larger than the limit of {cap} bytes")
        if not buf:
            raise errors.NotAnImage("Image URL returned an empty body")
        return bytes(buf)
