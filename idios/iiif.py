"""IIIF Image API (2.x and 3.0): recognise a service's urls, read its info.json, ask for the smallest derivative
that keeps the model's preprocessing exact, and name each image by one canonical key.

The canonical key (what Idios stores as the image's id):
- an image request `{base}/{region}/{size}/{rotation}/{quality}.{format}` is keyed with its size set to `max`:
  `{base}/{region}/max/{rotation}/{quality}.{format}`; so `full/full`, `full/max`, `full/!800,800` and `full/1024,`
  of one image are one entry, while a region (`x,y,w,h`, `pct:...`, `square`), a rotation or a quality is an entry
  of its own;
- an `info.json` url is keyed as the full image, `{base}/full/max/0/default.jpg`;
- a service's bare base url cannot be told from any other url without asking its server, so it stays as given
  (the worker finds out it is IIIF when the server answers with an info.json).
The worker never fetches the key itself: it reads the service's info.json and asks for a derivative (ImageSource).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from idios import errors

INFO_MAX_BYTES = 1024 * 1024  # an info.json is a few KB; a server answering MBs is not a IIIF service
MAX_SIDE = 1_000_000  # a side past this in info.json is absurd (the largest published images are ~10^5 px)
MAX_SIZES = 1000  # entries of `sizes` read
INFO_ACCEPT = "application/ld+json, application/json;q=0.9, */*;q=0.1"

_REGION = r"full|square|\d+,\d+,\d+,\d+|pct:\d+(?:\.\d+)?,\d+(?:\.\d+)?,\d+(?:\.\d+)?,\d+(?:\.\d+)?"
_SIZE = r"full|\^?max|\^?\d+,|\^?,\d+|\^?!?\d+,\d+|\^?pct:\d+(?:\.\d+)?"
_ROTATION = r"!?\d+(?:\.\d+)?"
_QUALITY = r"default|color|gray|bitonal|native|grey|colour"
_FORMAT = r"jpg|jpeg|png|gif|webp|tif|tiff|jp2|pdf"
IMAGE_REQUEST = re.compile(
    rf"^(?P<base>https?://[^/?#]+/[^?#]*[^/?#])/(?P<region>{_REGION})/(?P<size>{_SIZE})/"
    rf"(?P<rotation>{_ROTATION})/(?P<quality>{_QUALITY})\.(?P<format>{_FORMAT})$"
)
INFO_URL = re.compile(r"^(?P<base>https?://[^/?#]+/[^?#]*[^/?#])/info\.json$")


@dataclass(frozen=True)
class ImageRef:
    """An image of a IIIF service: its base and the region, rotation, quality and format asked for."""

    base: str
    region: str = "full"
    rotation: str = "0"
    quality: str = "default"
    format: str = "jpg"

    @property
    def key(self) -> str:
        return f"{self.base}/{self.region}/max/{self.rotation}/{self.quality}.{self.format}"

    def request(self, size: str) -> str:
        return f"{self.base}/{self.region}/{size}/{self.rotation}/{self.quality}.{self.format}"


def parse(url: str) -> ImageRef | None:
    """The IIIF image `url` names (an image request or an info.json url), or None for any other url."""
    if m := IMAGE_REQUEST.match(url):
        return ImageRef(m["base"], m["region"], m["rotation"], m["quality"], m["format"])
    if m := INFO_URL.match(url):
        return ImageRef(m["base"])
    return None


def canonical(url: str) -> str:
    """The key Idios stores `url` under (see the module's docstring); any url that is not IIIF is its own key."""
    ref = parse(url)
    return url if ref is None else ref.key


def thumbnail(url: str, side: int = 200) -> str | None:
    """A JPEG of the IIIF image `url` that fits side x side (what the built-in page shows, app.js thumbSource),
    or None when `url` is not recognisably IIIF."""
    ref = parse(url)
    return None if ref is None else dataclasses.replace(ref, format="jpg").request(f"!{side},{side}")


@dataclass(frozen=True)
class ImageService:
    """What an info.json says that the size choice needs."""

    version: int  # 2 or 3
    level: int  # compliance level 0, 1 or 2
    width: int
    height: int
    sizes: tuple[tuple[int, int], ...] = ()  # the sizes a level-0 server has ready
    max_width: int | None = None
    max_height: int | None = None
    max_area: int | None = None
    features: frozenset[str] = frozenset()  # extraFeatures (3) / profile supports (2)
    formats: frozenset[str] = frozenset({"jpg"})  # formats it serves: jpg always, png at level 2, extras listed

    def format_for(self, ref: ImageRef, preferred: str) -> str:
        """The format to ask for: the url's own unless it is the default jpg, then `preferred` where served."""
        if ref.format != "jpg" or preferred not in self.formats:
            return ref.format
        return preferred

    def supports_region(self, region: str) -> bool:
        if region == "full" or self.level >= 2:
            return True
        wanted = "regionSquare" if region == "square" else "regionByPct" if region.startswith("pct:") else "regionByPx"
        if self.level == 1 and wanted != "regionByPct":
            return True
        return wanted in self.features


def looks_like_json(data: bytes) -> bool:
    return data[:1] == b"{" or data.lstrip()[:1] == b"{"


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIDE:
        raise errors.IIIFInfoInvalid(f"info.json: {what} must be a whole number from 1 to {MAX_SIDE}, not {value!r:.40}")
    return value


def _strings(value: Any) -> set[str]:
    return {str(v) for v in value} if isinstance(value, list) else set()


def _level(profile: Any) -> tuple[int, set[str], set[str]]:
    """Compliance level, features and formats from a profile (2.x: [uri, {supports, formats}]; 3.0: "levelN")."""
    first = profile[0] if isinstance(profile, list) and profile else profile
    level = 0
    if isinstance(first, str) and (m := re.search(r"level([0-2])", first)):
        level = int(m[1])
    features: set[str] = set()
    formats = {"jpg", "png"} if level == 2 else {"jpg"}
    for extra in profile[1:] if isinstance(profile, list) else ():
        if isinstance(extra, dict):
            features |= _strings(extra.get("supports"))
            formats |= _strings(extra.get("formats"))
    return level, features, formats


def parse_info(data: bytes) -> ImageService:
    """Read an info.json; raise IIIFInfoInvalid when it is not one this service can use."""
    try:
        info = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise errors.IIIFInfoInvalid("The IIIF info.json is not JSON") from None
    if not isinstance(info, dict):
        raise errors.IIIFInfoInvalid("The IIIF info.json is not a JSON object")
    context = info.get("@context")
    contexts = " ".join(c for c in (context if isinstance(context, list) else [context]) if isinstance(c, str))
    if "iiif.io/api/image/3" in contexts or info.get("type") == "ImageService3":
        version = 3
    elif "iiif.io/api/image/2" in contexts:
        version = 2
    elif "iiif.io/api/image/1" in contexts:
        raise errors.IIIFUnsupported("IIIF Image API 1.x services are not supported; 2.x and 3.0 are")
    else:
        raise errors.IIIFInfoInvalid("The JSON is not a IIIF Image API info.json (no Image API @context)")
    width, height = _int(info.get("width"), "width"), _int(info.get("height"), "height")
    level, features, formats = _level(info.get("profile"))
    if version == 3:
        features |= _strings(info.get("extraFeatures"))
        formats |= _strings(info.get("extraFormats"))
    sizes: list[tuple[int, int]] = []
    for entry in info.get("sizes") or [] if isinstance(info.get("sizes"), list) else []:
        if len(sizes) >= MAX_SIZES:
            break
        w, h = (entry.get("width"), entry.get("height")) if isinstance(entry, dict) else (None, None)
        if isinstance(w, int) and isinstance(h, int) and 0 < w <= width and 0 < h <= height:
            sizes.append((w, h))  # a listed size larger than the image, or malformed, is skipped
    limits = [info.get(k) for k in ("maxWidth", "maxHeight", "maxArea")]
    max_width, max_height, max_area = (v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
                                       for v in limits)
    return ImageService(version, level, width, height, tuple(sorted(set(sizes))), max_width, max_height,
                        max_area, frozenset(features), frozenset(formats))


def region_box(service: ImageService, region: str) -> tuple[int, int]:
    """The width and height of `region` of the image, clipped to it as the Image API says."""
    w, h = service.width, service.height
    if region == "full":
        return w, h
    if region == "square":
        return min(w, h), min(w, h)
    if region.startswith("pct:"):
        px, py, pw, ph = (float(v) for v in region[4:].split(","))
        x, y, rw, rh = px * w / 100, py * h / 100, pw * w / 100, ph * h / 100
    else:
        x, y, rw, rh = (float(v) for v in region.split(","))
    cw, ch = min(rw, w - x), min(rh, h - y)
    if cw < 1 or ch < 1:
        raise errors.IIIFUnsupported(f"The region {region} lies outside the {w}x{h} image")
    return max(1, round(cw)), max(1, round(ch))


def _full(service: ImageService) -> str:
    return "max" if service.version == 3 else "full"


def _fit_limits(service: ImageService, w: int, h: int) -> tuple[int, int]:
    """(w, h) scaled down, keeping its shape, until the server's maxWidth / maxHeight / maxArea allow it."""
    scale = 1.0
    if service.max_width:
        scale = min(scale, service.max_width / w)
    if service.max_height or service.max_width:
        scale = min(scale, (service.max_height or service.max_width or h) / h)
    if service.max_area:
        scale = min(scale, math.sqrt(service.max_area / (w * h)))
    return max(1, math.floor(w * scale)), max(1, math.floor(h * scale))


def size_choices(service: ImageService, ref: ImageRef, short_side: int) -> list[tuple[str, int]]:
    """The size parameters to ask for, best first, each with the short side it gives: the smallest derivative
    whose short side is at least `short_side`; the whole region when it is smaller; on a level-0 server the
    smallest listed size that is large enough, else the full image and then the largest listed size."""
    if not service.supports_region(ref.region):
        raise errors.IIIFUnsupported(
            f"The IIIF server (level {service.level}) cannot cut the region {ref.region}; index the full image")
    rw, rh = region_box(service, ref.region)
    if service.level == 0:
        listed = [(w, h) for w, h in service.sizes if ref.region == "full"]
        fits = [s for s in listed if min(s) >= short_side]
        named = [_listed(service, w, h) for w, h in (fits[:1] if fits else [])]
        choices = [(n, short_side) for n in named]
        if not fits:
            choices.append((_full(service), min(rw, rh)))
            if listed:
                w, h = listed[-1]
                choices.append((_listed(service, w, h), min(w, h)))
        return choices
    if min(rw, rh) <= short_side:
        w, h = rw, rh
    else:
        # in whole numbers: the short side exactly, the long one rounded up (floats made 896 into 897)
        w, h = (short_side, -(-rh * short_side // rw)) if rw <= rh else (-(-rw * short_side // rh), short_side)
    fw, fh = _fit_limits(service, w, h)
    if (fw, fh) == (rw, rh):
        return [(_full(service), min(rw, rh))]
    return [(f"{fw},", min(fw, fh))]


def _listed(service: ImageService, w: int, h: int) -> str:
    # a level-0 server has files only under the canonical size form: `w,` in 2.x, `w,h` in 3.0
    return f"{w},{h}" if service.version == 3 else f"{w},"


class Fetcher(Protocol):
    async def fetch(self, url: str, *, max_bytes: int | None = None, accept: str | None = None) -> bytes: ...


class InfoCache:
    """info.json of the services seen lately, by base url: at most `size`, each for `ttl` seconds."""

    def __init__(self, size: int, ttl: float) -> None:
        self._size, self._ttl = max(0, size), ttl
        self._items: OrderedDict[str, tuple[float, ImageService]] = OrderedDict()

    def get(self, base: str) -> ImageService | None:
        item = self._items.get(base)
        if item is None:
            return None
        if item[0] < time.monotonic():
            del self._items[base]
            return None
        self._items.move_to_end(base)
        return item[1]

    def put(self, base: str, service: ImageService) -> None:
        if not self._size:
            return
        self._items[base] = (time.monotonic() + self._ttl, service)
        self._items.move_to_end(base)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class DerivativePolicy:
    """What to ask a IIIF server for (IDIOS_IIIF_SCALE, IDIOS_IIIF_FORMAT): a short side `scale` x the model's
    input side, in `format` where the server offers it. Measured (scripts/measure_iiif.py, README "IIIF"): the
    server's own JPEG (quality ~75) is what moves an embedding, not the size. A JPEG-sensitive real-weights CNN
    stayed at cosine >= 0.991 of the server's full image at 4x in JPEG (0.90 at 2x), 0.9990 at 4x in PNG; a PNG
    costs ~12x the bytes and, on the reference server, ~3x the time. thumb_grid: 1.0000 at any size, either way.
    """

    scale: float = 4.0
    format: str = "jpg"

    def __post_init__(self) -> None:
        if not self.scale > 0 or not re.fullmatch(_FORMAT, self.format):
            raise SystemExit(f"IDIOS_IIIF_SCALE must be above 0 and IDIOS_IIIF_FORMAT one of {_FORMAT.replace('|', ', ')}"
                             f" (not {self.scale!r}, {self.format!r})")

    def short_side(self, input_side: int) -> int:
        return max(1, math.ceil(self.scale * input_side))


class ImageSource:
    """The bytes to embed for a url: through the IIIF Image API when the url is a IIIF image (or its server
    answers an info.json), a derivative just large enough for the model; else the url's own bytes."""

    def __init__(self, fetcher: Fetcher, cache: InfoCache, policy: DerivativePolicy | None = None) -> None:
        self._fetcher = fetcher
        self.cache = cache
        self.policy = policy or DerivativePolicy()

    async def fetch(self, url: str, input_side: int) -> bytes:
        ref = parse(url)
        if ref is None:
            data = await self._fetcher.fetch(url)
            if not looks_like_json(data):
                return data
            # a bare service base answers (or redirects to) its info.json
            ref = ImageRef(url.rstrip("/"))
            service = _info_or_not_an_image(data)
            self.cache.put(ref.base, service)
        else:
            service = await self._service(ref.base)
        return await self._derivative(service, ref, self.policy.short_side(input_side))

    async def _service(self, base: str) -> ImageService:
        service = self.cache.get(base)
        if service is None:
            data = await self._fetcher.fetch(f"{base}/info.json", max_bytes=INFO_MAX_BYTES, accept=INFO_ACCEPT)
            service = parse_info(data)
            self.cache.put(base, service)
        return service

    async def _derivative(self, service: ImageService, ref: ImageRef, short_side: int) -> bytes:
        choices = size_choices(service, ref, short_side)
        ref = dataclasses.replace(ref, format=service.format_for(ref, self.policy.format))
        for i, (size, _) in enumerate(choices):
            try:
                return await self._fetcher.fetch(ref.request(size))
            except errors.ImageHttpError as exc:
                # a level-0 server may lack the full image: the next choice; any other failure is the answer
                if i == len(choices) - 1 or exc.extra.get("http_status") not in (400, 403, 404, 501):
                    raise
        raise AssertionError("size_choices returns at least one choice")


def _info_or_not_an_image(data: bytes) -> ImageService:
    try:
        return parse_info(data)
    except errors.IIIFInfoInvalid as exc:
        raise errors.NotAnImage(f"The url answered JSON that is not an image: {exc.message}") from None
