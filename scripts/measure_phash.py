#!/usr/bin/env python3
"""How far copies and near duplicates of real photos are from their original in pHash bits: the measurement
behind idios.phash.EXACT_BITS, and how much the decoder's JPEG draft mode moves a hash.

Photos: scikit-image's bundled ones and, when scikit-learn is installed, its two sample images. Every variant is
encoded to bytes and read back through the service's own decoder (idios.decode.load_rgb: EXIF rotation, draft
mode, RGB), as an added image would be; its hash is compared with the original's.

    python scripts/measure_phash.py            # the table; also says whether our hash equals imagehash's
"""

from __future__ import annotations

import io
import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from idios.decode import DecodeLimits, load_rgb  # noqa: E402
from idios.phash import EXACT_BITS, distance, phash  # noqa: E402

# Photographs bundled with scikit-image (no download); camera, moon, coins, page, text, grass, gravel, brick are grey
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "moon", "coins", "page", "text", "grass", "gravel",
          "brick", "hubble_deep_field", "immunohistochemistry", "retina", "cell", "clock", "motorcycle_left")
LIMITS = DecodeLimits(min_side=1)  # small resizes of small photos are still images to hash
TARGET = 224  # the model input size the decoder drafts towards (CLIP ViT-B, thumb_grid)


def photos() -> dict[str, Image.Image]:
    """The bundled photos as RGB, in a fixed order; a loader that fails (a photo needing a download) is skipped."""
    from skimage import data

    out: dict[str, Image.Image] = {}
    for name in PHOTOS:
        try:
            loaded = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
        except Exception as exc:  # noqa: BLE001 - a photo that is not bundled
            print(f"skipped {name}: {exc.__class__.__name__}", file=sys.stderr)
            continue
        out[name] = Image.fromarray(np.asarray(loaded)).convert("RGB")
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        print("scikit-learn not installed: its 2 sample photos are left out", file=sys.stderr)
        return out
    for file, arr in zip(load_sample_images().filenames, load_sample_images().images, strict=True):
        out[Path(file).stem] = Image.fromarray(arr).convert("RGB")
    return out


def encoded(im: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def scaled(im: Image.Image, f: float) -> Image.Image:
    return im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.Resampling.BICUBIC)


def centre_crop(im: Image.Image, f: float) -> Image.Image:
    w, h = im.size
    dx, dy = round(w * (1 - f) / 2), round(h * (1 - f) / 2)
    return im.crop((dx, dy, w - dx, h - dy))


def exif_rotated(im: Image.Image, orientation: int) -> bytes:
    """A JPEG whose pixels are stored turned, with the EXIF orientation that turns them back."""
    stored = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(im.transpose(stored[orientation]), "JPEG", quality=95, exif=exif)


def tone(im: Image.Image, brightness: float = 1.0, contrast: float = 1.0) -> Image.Image:
    return ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(brightness)).enhance(contrast)


def rescan(im: Image.Image, seed: int) -> bytes:
    """A print scanned again: a little turned and cropped, another tone curve, sensor noise, a soft lens, JPEG."""
    rng = np.random.default_rng(seed)
    turned = centre_crop(im.rotate(1.5, resample=Image.Resampling.BICUBIC), 0.96)
    toned = tone(turned, 1.05, 1.1)
    noisy = np.asarray(toned, dtype=np.float32) + rng.normal(0, 3, (toned.height, toned.width, 3))
    soft = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))
    return encoded(soft, "JPEG", quality=85)


Variant = Callable[[Image.Image], bytes]
COPIES: dict[str, Variant] = {
    **{f"jpeg q{q}": (lambda im, q=q: encoded(im, "JPEG", quality=q)) for q in (30, 50, 75, 95)},
    "png": encoded,
    "webp q80": lambda im: encoded(im, "WEBP", quality=80),
    **{f"resize {round(f * 100)}%": (lambda im, f=f: encoded(scaled(im, f))) for f in (0.25, 0.5, 0.75, 1.5, 2.0)},
    "resize 50% + jpeg q75": lambda im: encoded(scaled(im, 0.5), "JPEG", quality=75),
    **{f"exif orientation {o}": (lambda im, o=o: exif_rotated(im, o)) for o in (3, 6, 8)},
}
NEAR: dict[str, Variant] = {
    **{f"crop {round(f * 100)}%": (lambda im, f=f: encoded(centre_crop(im, f))) for f in (0.95, 0.9, 0.85)},
    "crop 90% (corner)": lambda im: encoded(im.crop((0, 0, round(im.width * 0.9), round(im.height * 0.9)))),
    **{f"rotate {a}°": (lambda im, a=a: encoded(im.rotate(a, resample=Image.Resampling.BICUBIC))) for a in (2, 3, 5)},
    "rescan": lambda im: rescan(im, 0),
}
TONE: dict[str, Variant] = {
    "brightness -20%": lambda im: encoded(tone(im, brightness=0.8)),
    "brightness +20%": lambda im: encoded(tone(im, brightness=1.2)),
    "contrast -20%": lambda im: encoded(tone(im, contrast=0.8)),
    "contrast +30%": lambda im: encoded(tone(im, contrast=1.3)),
}
OTHER_EDITS: dict[str, Variant] = {  # neither copies nor what the brief calls near: what pHash makes of them
    "gif (256 colours)": lambda im: encoded(im, "GIF"),
    "greyscale": lambda im: encoded(im.convert("L")),
    "mirror": lambda im: encoded(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
}


def hash_of(data: bytes) -> str:
    return phash(load_rgb(data, TARGET, LIMITS))


def row(name: str, kind: str, dists: list[int]) -> str:
    d = np.asarray(dists)
    within = float(np.mean(d <= EXACT_BITS))
    return (f"| {name} | {kind} | {len(d)} | {d.min()} | {np.median(d):g} | {d.max()} | "
            f"{100 * within:.0f}% |")


def draft_rows(pics: dict[str, Image.Image]) -> list[str]:
    """A hash from the decoder's reduced-size JPEG decode vs from the full decode, of large JPEGs."""
    out = []
    for side, scale in ((2800, "1/2"), (5600, "1/4")):  # short sides: drafted to 1400, above 6 x 224
        dists = []
        for im in pics.values():
            big = scaled(im, side / min(im.size))
            data = encoded(big, "JPEG", quality=90)
            full = Image.open(io.BytesIO(data)).convert("RGB")
            drafted = load_rgb(data, TARGET, LIMITS)
            assert drafted.width < full.width, "the decoder did not draft"
            dists.append(distance(phash(full), phash(drafted)))
        d = np.asarray(dists)
        out.append(f"| {side} px short side, drafted to {scale} | {len(d)} | {d.min()} | {np.median(d):g} | "
                   f"{d.max()} | {np.bincount(d).tolist()} |")
    return out


def imagehash_check(pics: dict[str, Image.Image]) -> str:
    try:
        import imagehash
    except ImportError:
        return "imagehash is not installed: not compared"
    same = sum(phash(im) == str(imagehash.phash(im)) for im in pics.values())
    return f"equal to imagehash.phash on {same} of {len(pics)} photos"


def cost(pics: dict[str, Image.Image]) -> str:
    """CPU per hash of a decoded image: as a drafted JPEG reaches it for a 224 px model, and a large PNG."""
    source = pics.get("astronaut", next(iter(pics.values())))
    out = []
    for w, h, rounds in ((1344, 1008, 50), (4000, 3000, 10)):
        im = source.resize((w, h), Image.Resampling.BICUBIC)
        start = time.process_time()
        for _ in range(rounds):
            phash(im)
        out.append(f"{1000 * (time.process_time() - start) / rounds:.1f} ms for {w}x{h}")
    return "cost of a hash, CPU: " + ", ".join(out)


def main() -> int:
    pics = photos()
    originals = {name: hash_of(encoded(im)) for name, im in pics.items()}
    print(f"{len(pics)} photos: {', '.join(pics)}")
    print(imagehash_check(pics))
    print(f"EXACT_BITS = {EXACT_BITS}\n")
    print("| variant | class | n | min | median | max | within EXACT_BITS |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    groups = (("copy", COPIES), ("near", NEAR), ("tone", TONE), ("other edit", OTHER_EDITS))
    summary: dict[str, list[int]] = {}
    for kind, variants in groups:
        for name, make in variants.items():
            dists = [distance(originals[p], hash_of(make(im))) for p, im in pics.items()]
            summary.setdefault(kind, []).extend(dists)
            print(row(name, kind, dists))
    others = [distance(originals[a], originals[b]) for a, b in itertools.combinations(pics, 2)]
    print(row("another photo (every pair)", "different", others))
    print()
    summary["different"] = others
    for kind, dists in summary.items():
        print(f"{kind}: {np.bincount(np.asarray(dists), minlength=33)[:33].tolist()} (count per distance 0..32)")
    print("\n| counted exact at distance <= | " + " | ".join(summary) + " |")
    print("| --- |" + " --- |" * len(summary))
    for bits in range(0, 10, 2):  # two hashes with 32 bits set each differ in an even number of bits
        shares = [f"{100 * float(np.mean(np.asarray(d) <= bits)):.1f}%" for d in summary.values()]
        print(f"| {bits} | " + " | ".join(shares) + " |")
    print("\n| JPEG decode | n | min | median | max | count per distance |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(draft_rows(pics)))
    print(cost(pics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
