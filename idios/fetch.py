"""The fetch actor's tool: download one image with bounded concurrency, time, size and redirects."""

from __future__ import annotations

import asyncio
from types import TracebackType

import aiohttp
from yarl import URL

from idios import errors
from idios.metrics import Metrics
from idios.netguard import AddressPolicy, BlockedAddress, GuardedResolver, HostAllowlist, literal_address
from idios.settings import Settings

REDIRECTS = {301, 302, 303, 307, 308}
USER_AGENT = "Idios/0.1 (+reverse image search)"
CHUNK = 64 * 1024


class ImageFetcher:
    """Downloads image bytes. The URL given stays the image's id; redirects are followed by hand so that
    every hop is checked against the private-address rule and counted."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._semaphore = asyncio.Semaphore(settings.fetch_concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._policy = AddressPolicy(settings.allow_private_urls, settings.private_allowlist)
        self._hosts = HostAllowlist(settings.fetch_hosts)

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

    async def fetch(self, url: str) -> bytes:
        """The body behind `url`, or an ImageError naming why not."""
        async with self._semaphore:
            try:
                async with asyncio.timeout(self._settings.fetch_timeout):
                    return await self._follow(url)
            except TimeoutError:
                self._metrics.fetch_failures.labels(errors.ImageTimeout.type).inc()
                raise errors.ImageTimeout(
                    f"Image download took longer than {self._settings.fetch_timeout:g} s"
                ) from None
            except errors.IdiosError as exc:
                self._metrics.fetch_failures.labels(exc.type).inc()
                raise

    async def _follow(self, url: str) -> bytes:
        assert self._session is not None, "fetcher used outside its context"
        target = URL(url)
        for _ in range(self._settings.max_redirects + 1):
            self._check_target(target)
            try:
                async with self._session.get(target, allow_redirects=False) as resp:
                    if resp.status in REDIRECTS and "Location" in resp.headers:
                        target = target.join(URL(resp.headers["Location"]))
                        continue
                    if resp.status >= 400:
                        raise errors.ImageHttpError(f"Image URL answered HTTP {resp.status}", http_status=resp.status)
                    return await self._read(resp)
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, BlockedAddress):
                    raise errors.PrivateAddress(
                        f"{target.host} resolves to a private address; IDIOS_ALLOW_PRIVATE_URLS or "
                        "IDIOS_PRIVATE_ALLOWLIST can allow it"
                    ) from None
                raise errors.ImageUnreachable(f"Cannot connect to {target.host}: {exc.os_error}") from None
            except aiohttp.ClientError as exc:
                raise errors.ImageUnreachable(f"Image download failed: {exc.__class__.__name__}: {exc}") from None
        raise errors.TooManyRedirects(f"More than {self._settings.max_redirects} redirects")

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

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        cap = self._settings.max_image_bytes
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
