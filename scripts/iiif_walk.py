"""IIIF Presentation input for bulk_ingest.py: walk manifests and collections (2.x and 3.0) depth-first, in document
order, and yield one record per painted image of each canvas, as the walk goes.

A record's url is the image's Image API service as its full image, `{service}/full/max/0/default.jpg` (the key
the service stores a IIIF image under, idios/iiif.py), or the image's own url when it has no service. Its metadata
is flat, so the service's metadata filters can select it: iiif_manifest, iiif_canvas, canvas_index, label,
manifest_label, and when present rights, required_statement and iiif_service.

Every document that cannot be used (HTTP error, timeout, not JSON, not IIIF, too large, over the limits) becomes
one record with `problem` set and the document's url, so it lands in the failed file; the walk goes on.
Positions count records from 0 in walk order (a failed document takes one): they change when a document fails
on one run and not on another, so they do not say what is done. Each record of a manifest has a `key` that does:
(the manifest's url as the walk reached it, the record's index among that manifest's records). A failed document
has no key: it is not done, and the next run fetches it again.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import hashlib
import ipaddress
import json
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from iiif_documents import classify, doc_id, embedded, manifest_images, members
from ingest_input import Record
from service_client import RETRY_STATUSES, ScriptError, backoff, loads, say

ACCEPT = "application/ld+json, application/json"
MAX_BYTES = 64 * 1024 * 1024  # one document; a 10^5-canvas manifest is ~50 MB
SNIFF_BYTES = 64 * 1024
MAX_REDIRECTS = 10
CREDENTIALS = frozenset({"authorization", "cookie", "proxy-authorization"})
HEADERS_SHAPE = '{"host pattern": {"Header": "value"}}'
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
PRESENTATION = re.compile(r"iiif\.io/api/presentation|\"@?type\"\s*:\s*\"(?:sc:)?(?:Manifest|Collection)\"")


@dataclass(frozen=True)
class WalkOptions:
    """What bounds a walk, and the language labels are shown in."""

    language: str = "en"
    max_documents: int = 10_000
    max_depth: int = 8
    timeout: float = 60.0
    retries: int = 2
    backoff_max: float = 30.0
    max_bytes: int = MAX_BYTES
    headers: str = ""  # JSON, as the service's IDIOS_FETCH_HEADERS: request headers per document host


class DocumentError(Exception):
    """A document that cannot be used; `kind` is the failed file's type; `wait`: the server's Retry-After."""

    def __init__(self, kind: str, message: str, transient: bool = False, wait: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.transient = transient
        self.wait = wait


# --- politeness toward document servers --------------------------------------------------------------------------
# A copy of idios/hostlimits.py's retry_after, is_loopback and HostHeaders (host patterns as idios/netguard.py's
# HostAllowlist): this client runs without the service's package (see iiif_documents.canonical).
# tests/test_iiif_ingest.py holds the copy equal to the service's; change both together.


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a Retry-After header asks for (delay-seconds or an HTTP-date); None for none or nonsense."""
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


class DocumentHeaders:
    """Request headers per document host: the JSON of the service's IDIOS_FETCH_HEADERS (the default of
    --iiif-headers), its host patterns (names, `*.example.org`; comma-separated) and its rule that credentials
    (Authorization, Cookie, Proxy-Authorization) never travel over plain http to another machine."""

    def __init__(self, spec: str) -> None:
        self._rules: list[tuple[list[str], dict[str, str]]] = []
        if not spec.strip():
            return
        try:
            data = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ScriptError(f"--iiif-headers is not JSON ({exc}); it must be {HEADERS_SHAPE}") from None
        if not isinstance(data, dict) or not all(
                isinstance(h, dict) and all(isinstance(k, str) and TOKEN.fullmatch(k) and isinstance(v, str)
                                            and not any(c in v for c in "\r\n\0") for k, v in h.items())
                for h in data.values()):
            raise ScriptError(f"--iiif-headers must be {HEADERS_SHAPE}: header names, one-line string values")
        for pattern, headers in data.items():
            names = [p.strip().lower().rstrip(".").strip("[]") for p in pattern.split(",")]
            if not all(names) or any("*" in n.removeprefix("*.") for n in names):
                raise ScriptError(f"--iiif-headers: {pattern!r} is not a host pattern (a name, or *.example.org)")
            self._rules.append((names, headers))

    def for_url(self, url: str) -> dict[str, str]:
        parsed = URL(url)
        host = (parsed.host or "").lower().rstrip(".").strip("[]")
        out: dict[str, str] = {}
        for names, headers in self._rules:
            if any(host == n or (n.startswith("*.") and host.endswith(n[1:])) for n in names):
                out.update(headers)
        if parsed.scheme != "https" and not loopback(host):
            out = {k: v for k, v in out.items() if k.lower() not in CREDENTIALS}
        return out


def loopback(host: str) -> bool:
    """True for a host that names this machine: a loopback address (IPv4-mapped too), or localhost."""
    key = host.lower().rstrip(".").strip("[]")
    if key == "localhost" or key.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(key)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def looks_like_iiif(path: str) -> bool:
    """Whether a .json file is a Presentation document, from its head only (a manifest can be 50 MB)."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES).decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    return head.startswith("{") and PRESENTATION.search(head) is not None


def url_stem(url: str) -> str:
    """A file name stem for the state and failed files of a URL input: readable, and unique by a hash."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")[:80]
    return f"{readable}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"


# --- values: language maps, HTML, length --------------------------------------------------------------------------


class DocumentFetcher:
    """Fetches and parses one IIIF document, bounded in size and time; transient failures retried, after the
    server's Retry-After when it gives one (a wait longer than --iiif-timeout fails the document at once, and the
    next run asks again); each request, redirects included, carries its own host's headers (DocumentHeaders)."""

    def __init__(self, http: aiohttp.ClientSession, options: WalkOptions) -> None:
        self._http = http
        self._options = options
        self._headers = DocumentHeaders(options.headers)

    async def url(self, url: str) -> Any:
        last: DocumentError | None = None
        for attempt in range(self._options.retries + 1):
            if attempt:
                assert last is not None
                delay = backoff(attempt - 1, self._options.backoff_max)
                await asyncio.sleep(delay if last.wait is None else max(delay, last.wait))
            try:
                return await parse(await self._once(url))
            except DocumentError as exc:
                if not exc.transient:
                    raise
                if exc.wait is not None and exc.wait > self._options.timeout:
                    raise DocumentError(exc.kind, f"{exc}, and asked to wait {exc.wait:.0f} s, longer than the "
                                        f"{self._options.timeout:g} s a document may take", True) from None
                last = exc
        assert last is not None
        raise last

    async def _once(self, url: str) -> bytes:
        cap = self._options.max_bytes
        try:
            async with asyncio.timeout(self._options.timeout):  # redirects included, as aiohttp's own would be
                for _ in range(MAX_REDIRECTS + 1):  # followed here, so that each host gets its own headers only
                    async with self._http.get(url, headers=self._headers.for_url(url),
                                              allow_redirects=False) as resp:
                        if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                            url = str(resp.url.join(URL(resp.headers["Location"])))
                            continue
                        return await self._body(resp, cap)
                raise DocumentError("iiif_http_error", f"more than {MAX_REDIRECTS} redirects")
        except TimeoutError:
            raise DocumentError("iiif_timeout", f"no whole answer within {self._options.timeout:g} s", True) from None
        except (aiohttp.InvalidURL, ValueError) as exc:
            raise DocumentError("iiif_bad_member", f"not a fetchable url: {exc}") from None
        except aiohttp.ClientError as exc:
            raise DocumentError("iiif_unreachable", f"{type(exc).__name__}: {exc}".rstrip(": "), True) from None

    @staticmethod
    async def _body(resp: aiohttp.ClientResponse, cap: int) -> bytes:
        if resp.status >= 400:
            transient = resp.status in RETRY_STATUSES
            wait = retry_after(resp.headers.get("Retry-After")) if resp.status in (429, 503) else None
            raise DocumentError("iiif_http_error", f"answered HTTP {resp.status}", transient, wait)
        if resp.content_length is not None and resp.content_length > cap:
            raise too_large(cap)
        data = bytearray()
        async for chunk in resp.content.iter_chunked(1 << 16):
            data += chunk
            if len(data) > cap:
                raise too_large(cap)
        return bytes(data)

    def file(self, path: str) -> bytes:
        size = Path(path).stat().st_size
        if size > self._options.max_bytes:
            raise too_large(self._options.max_bytes)
        return Path(path).read_bytes()


def too_large(cap: int) -> DocumentError:
    return DocumentError("iiif_too_large", f"larger than {cap // (1024 * 1024)} MB")


async def parse(data: bytes) -> Any:
    """The JSON of a document, parsed off the event loop (a large manifest takes a while)."""
    try:
        return await asyncio.to_thread(loads, data.removeprefix(b"\xef\xbb\xbf"))
    except (ValueError, RecursionError) as exc:
        raise DocumentError("iiif_not_json", f"not JSON: {exc}") from None


# --- the walk -------------------------------------------------------------------------------------------------------


class Walker:
    """One walk: numbers the records, remembers the documents seen (the loop guard) and counts them (the limit)."""

    def __init__(self, fetcher: DocumentFetcher, options: WalkOptions) -> None:
        self._fetcher = fetcher
        self._options = options
        self._seen: set[str] = set()
        self._position = 0
        self.fetched = 0
        self.repeated = 0
        self.failed = 0

    def _record(self, url: str | None, metadata: dict[str, Any] | None = None, problem: str | None = None,
                kind: str = "input_error", key: tuple[str, int] | None = None) -> Record:
        rec = Record(self._position, url, metadata, problem, kind, key)
        self._position += 1
        return rec

    def _failed(self, url: str | None, kind: str, message: str, parent: str | None) -> Record:
        self.failed += 1
        return self._record(url, {"iiif_parent": parent} if parent else None, message, kind)

    def _repeated(self, url: str) -> bool:
        """Whether `url` was walked already (the loop guard); counted when it was."""
        if url.split("#", 1)[0] in self._seen:
            self.repeated += 1
            return True
        return False

    def _mark(self, url: str) -> None:
        self._seen.add(url.split("#", 1)[0])

    async def walk(self, source: str) -> AsyncGenerator[Record, None]:
        """Every record of the document `source` (a URL, or a local file) and what it contains."""
        async with aclosing(self._document(source, 0, None)) as records:
            async for rec in records:
                yield rec
        say(f"iiif: {self.fetched} documents read, {self.failed} failed, {self.repeated} repeated references skipped")

    async def _document(self, url: str, depth: int, parent: str | None) -> AsyncGenerator[Record, None]:
        """Fetch one document (unless seen, or over the limits) and walk it."""
        if parent is not None and not is_url(url):
            yield self._failed(url, "iiif_bad_member", "a member's id is not an http(s) url", parent)
            return
        if self._repeated(url):
            return
        self._mark(url)
        if self.fetched >= self._options.max_documents:
            yield self._failed(url, "iiif_limit", f"past --iiif-max-documents ({self._options.max_documents})", parent)
            return
        self.fetched += 1
        try:
            doc = await (self._fetcher.url(url) if is_url(url) else parse(self._fetcher.file(url)))
        except DocumentError as exc:
            yield self._failed(url, exc.kind, str(exc), parent)
            return
        except OSError as exc:
            yield self._failed(url, "iiif_unreadable", f"{type(exc).__name__}: {exc}", parent)
            return
        async with aclosing(self._resource(doc, url, depth, parent, None)) as records:
            async for rec in records:
                yield rec

    async def _resource(self, doc: Any, where: str, depth: int, parent: str | None,
                        hint: str | None) -> AsyncGenerator[Record, None]:
        """Walk a parsed manifest or collection (fetched, or embedded in its collection)."""
        what = classify(doc, hint)
        if what is None:
            yield self._failed(where, "iiif_not_iiif", "not a IIIF Presentation manifest or collection", parent)
            return
        kind, version = what
        declared = doc_id(doc)
        if declared:
            self._mark(declared)  # a reference to it by its own id (not the url it came from) is a loop too
        if kind == "Manifest":
            for rec in self._manifest(doc, version, where, parent):
                yield rec
            return
        for member, member_hint in members(doc, version):
            async with aclosing(self._member(member, member_hint, version, where, depth + 1)) as records:
                async for rec in records:
                    yield rec

    def _manifest(self, doc: dict[str, Any], version: int, where: str, parent: str | None) -> Iterator[Record]:
        """The manifest's records, each keyed by (`where`, its index); a canvas that cannot be read is one record
        of its own (iiif_documents.manifest_images), so only what every canvas shares can fail the rest."""
        try:
            for index, painted in enumerate(manifest_images(doc, version, self._options.language)):
                yield self._record(painted.url, painted.metadata, painted.problem, painted.kind, (where, index))
        except (AttributeError, TypeError, KeyError, ValueError, RecursionError) as exc:
            yield self._failed(where, "iiif_not_iiif", f"malformed manifest, read up to here: {exc!r}", parent)

    async def _member(self, member: Any, hint: str | None, version: int, parent: str,
                      depth: int) -> AsyncGenerator[Record, None]:
        """A collection member: walked as given when embedded whole, else fetched by its id."""
        mid = member if isinstance(member, str) and member else doc_id(member) if isinstance(member, dict) else None
        if mid is None:
            yield self._failed(None, "iiif_bad_member", "a collection member without an id", parent)
            return
        if self._repeated(mid):
            return
        if depth > self._options.max_depth:
            yield self._failed(mid, "iiif_limit", f"deeper than --iiif-max-depth ({self._options.max_depth})", parent)
            return
        if not isinstance(member, dict) or not embedded(member, version):
            async with aclosing(self._document(mid, depth, parent)) as records:
                async for rec in records:
                    yield rec
            return
        self._mark(mid)
        async with aclosing(self._resource(member, mid, depth, parent, hint)) as records:
            async for rec in records:
                yield rec


@asynccontextmanager
async def iiif_records(source: str, options: WalkOptions) -> AsyncIterator[AsyncIterator[Record]]:
    """The records of the IIIF document `source` (URL or file), walked as they are read; the HTTP session the
    documents are fetched with lives as long as the walk."""
    timeout = aiohttp.ClientTimeout(total=options.timeout)
    async with aiohttp.ClientSession(timeout=timeout, headers={"Accept": ACCEPT}) as http:
        walker = Walker(DocumentFetcher(http, options), options)
        async with aclosing(walker.walk(source)) as records:
            yield records
