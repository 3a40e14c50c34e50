#!/usr/bin/env python3
"""Duplicate detection quality: pair precision and recall of `similarity >= min_similarity`, per model.

Images: real photos (scikit-image's bundled ones and scikit-learn's two samples), each with its four corner tiles
as look-alike distinct images (scripts/neardup_recall.py), and every one of those with edited copies: copies
(re-encoded, halved, another format), rescans (slight rotation, tone, noise, blur, shift, all together) and
crops keeping 81-90% of the area. An original and its edits form a group; two images are duplicates when they
are in one group. Every pair is scored through the service's own decoder and engine, and precision and recall
are counted per edit kind (its images against every original) and over all pairs, at each threshold of a sweep.
The threshold it recommends (a manifest's `duplicates.min_similarity`) is the lowest from which pair precision over
all pairs stays at least 0.99. Every random edit is seeded: the figures are the same on every run.

    python scripts/duplicate_quality.py MODEL_DIR [MODEL_DIR ...] [--engines=onnxruntime:fp32] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

import neardup_recall as nd  # also puts the repository on sys.path, for idios

from idios.models import load_manifest  # noqa: E402

SEED = 15
SWEEP = tuple(float(t) for t in range(70, 100))
# The default is the lowest threshold at and above which pair precision over all pairs is at least this: the most
# duplicates found while fewer than 1 in 100 reported pairs is wrong. A wrong pair costs more than a missed one in
# an archive (someone may delete a distinct photo), and a real archive has far more non-duplicate pairs per
# duplicate than this set, so the bar is set high rather than at the best F1.
MIN_PRECISION = 0.99

Edit = Callable[[Image.Image, np.random.Generator], bytes]


def _scan(im: Image.Image) -> bytes:
    return nd.encode(im, "JPEG", quality=90)


def _rotate(im: Image.Image, rng: np.random.Generator, lo: float = 1.0, hi: float = 3.0) -> Image.Image:
    # a print laid on the scanner glass a little askew: white bed shows in the corners
    angle = float(rng.uniform(lo, hi)) * float(rng.choice([-1.0, 1.0]))
    return im.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=(255, 255, 255))


def _tone(im: Image.Image, rng: np.random.Generator, spread: float = 1.0) -> Image.Image:
    gamma = float(np.exp(rng.uniform(-0.25, 0.25) * spread))
    lut = [round(255 * (i / 255) ** gamma) for i in range(256)] * 3
    im = im.point(lut)
    im = ImageEnhance.Contrast(im).enhance(1 + float(rng.uniform(-0.15, 0.2)) * spread)
    return ImageEnhance.Brightness(im).enhance(1 + float(rng.uniform(-0.15, 0.15)) * spread)


def _noise(im: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    noise = rng.standard_normal((im.height, im.width, 3), dtype=np.float32) * np.float32(sigma)
    return Image.fromarray(np.clip(np.rint(np.asarray(im, dtype=np.float32) + noise), 0, 255).astype(np.uint8))


def _window(im: Image.Image, rng: np.random.Generator, keep: float) -> Image.Image:
    """A `keep` fraction of each side, at a random place."""
    w, h = im.size
    cw, ch = round(w * keep), round(h * keep)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return im.crop((x, y, x + cw, y + ch))


def _shift(im: Image.Image, rng: np.random.Generator, lo: float = 0.02, hi: float = 0.05) -> Image.Image:
    """2-5% trimmed off one side and off the top or bottom: the scanner's frame sat elsewhere."""
    w, h = im.size
    dx, dy = round(w * rng.uniform(lo, hi)), round(h * rng.uniform(lo, hi))
    left, right = (dx, w) if rng.random() < 0.5 else (0, w - dx)
    top, bottom = (dy, h) if rng.random() < 0.5 else (0, h - dy)
    return im.crop((left, top, right, bottom))


def _rescan(im: Image.Image, rng: np.random.Generator) -> bytes:
    im = _shift(_rotate(im, rng, 1.0, 2.0), rng, 0.02, 0.03)
    return nd.encode(_noise(_tone(im, rng, 0.6), rng, 3.0), "JPEG", quality=85)


# kind -> (family, edit); every random choice comes from the generator, seeded per image and edit
EDITS: dict[str, tuple[str, Edit]] = {
    "jpeg q40": ("copy", lambda im, rng: nd.encode(im, "JPEG", quality=40)),
    "half size": ("copy", lambda im, rng: nd.encode(im.resize((im.width // 2, im.height // 2),
                                                              Image.Resampling.LANCZOS), "JPEG", quality=85)),
    "webp q60": ("copy", lambda im, rng: nd.encode(im, "WEBP", quality=60, method=2)),
    "png": ("copy", lambda im, rng: nd.encode(im, "PNG", compress_level=1)),  # lossless at any level: the fast one
    "rotate 1-3°": ("rescan", lambda im, rng: _scan(_rotate(im, rng))),
    "tone": ("rescan", lambda im, rng: _scan(_tone(im, rng))),
    "noise": ("rescan", lambda im, rng: _scan(_noise(im, rng, float(rng.uniform(4.0, 8.0))))),
    "blur": ("rescan", lambda im, rng: _scan(im.filter(ImageFilter.GaussianBlur(float(rng.uniform(1.0, 2.0)))))),
    "shift 2-5%": ("rescan", lambda im, rng: _scan(_shift(im, rng))),
    "rescan (all)": ("rescan", _rescan),
    "crop 95%": ("crop", lambda im, rng: _scan(_window(im, rng, 0.95))),
    "crop 90%": ("crop", lambda im, rng: _scan(_window(im, rng, 0.90))),
}
FAMILIES = ("copy", "rescan", "crop")
ORIGINAL = "original"


@dataclass(frozen=True)
class ImageSet:
    """Image files in groups: `group[i]` is the original image i is (an edit of), `photo[i]` the photo that
    original is (a tile of), `kind[i]` its edit."""

    names: list[str]
    group: np.ndarray
    photo: np.ndarray
    kind: list[str]
    blobs: list[bytes]


def originals() -> dict[str, Image.Image]:
    """scikit-image's and scikit-learn's photos, each with its four corner tiles as distinct images."""
    from sklearn.datasets import load_sample_images

    pics = nd.photos()
    samples = load_sample_images()
    for path, arr in zip(samples.filenames, samples.images, strict=True):
        im = nd.as_photo(np.asarray(arr))
        if im is not None:
            pics[Path(path).stem] = im
    out: dict[str, Image.Image] = {}
    for name, im in pics.items():
        out[name] = im
        out.update(nd.corner_tiles(name, im))
    return out


def _files(g: int, im: Image.Image, seed: int) -> list[bytes]:
    """An original (as a JPEG, q95) and its edits, each seeded by (seed, original, edit): the same in any order."""
    edits = [fn(im, np.random.default_rng([seed, g, e])) for e, (_, fn) in enumerate(EDITS.values())]
    return [nd.encode(im, "JPEG", quality=95), *edits]


def build_set(seed: int = SEED, threads: int = 2) -> ImageSet:
    """Every original and each of its edits."""
    pics = originals()
    with ThreadPoolExecutor(threads) as pool:  # Pillow and numpy let go of the GIL for the heavy part
        files = list(pool.map(_files, range(len(pics)), pics.values(), [seed] * len(pics)))
    names, group, photo, kind = [], [], [], []
    photos: dict[str, int] = {}
    for g, name in enumerate(pics):
        names += [name, *(f"{name} ({edit})" for edit in EDITS)]
        kind += [ORIGINAL, *EDITS]
        group += [g] * (1 + len(EDITS))
        photo += [photos.setdefault(name.split("/")[0], len(photos))] * (1 + len(EDITS))
    return ImageSet(names, np.asarray(group), np.asarray(photo), kind, [b for f in files for b in f])


def similarities(emb: np.ndarray) -> np.ndarray:
    """100 x cosine, clamped to 0..100, as the service reports it (idios/store.py)."""
    sims: np.ndarray = np.clip(100.0 * (emb @ emb.T), 0.0, 100.0)
    return sims


def counts(sims: np.ndarray, same: np.ndarray, tiles: np.ndarray, sweep: tuple[float, ...]) -> list[dict[str, float]]:
    """Precision, recall and the counts behind them at each threshold, for pairs scored `sims`; `tiles` marks the
    distinct pairs cut from one photo, whose false pairs are also counted apart."""
    pos, neg, near = np.sort(sims[same]), np.sort(sims[~same]), np.sort(sims[~same & tiles])

    def above(a: np.ndarray, t: float) -> int:
        return int(a.size - np.searchsorted(a, t, "left"))

    rows = []
    for t in sweep:
        tp, fp, fp_near = above(pos, t), above(neg, t), above(near, t)
        rows.append({"min_similarity": t, "precision": tp / (tp + fp) if tp + fp else 1.0,
                     "recall": tp / pos.size if pos.size else 1.0, "tp": tp, "fp": fp, "fn": int(pos.size) - tp,
                     "fp_same_photo": fp_near,
                     "precision_other_photos": tp / (tp + fp - fp_near) if tp + fp - fp_near else 1.0})
    return rows


def score(s: ImageSet, emb: np.ndarray, sweep: tuple[float, ...]) -> dict[str, Any]:
    """The sweep over all pairs, over each kind's and family's images against every original, and the pairs
    nearest the boundary."""
    sims = similarities(emb)
    same = s.group[:, None] == s.group[None, :]
    tiles = s.photo[:, None] == s.photo[None, :]
    kinds = np.asarray(s.kind)
    is_orig = kinds == ORIGINAL
    upper = np.triu_indices(len(s.names), 1)
    out: dict[str, Any] = {"all": counts(sims[upper], same[upper], tiles[upper], sweep), "kinds": {}, "families": {}}
    members = {edit: kinds == edit for edit in EDITS}
    members.update({f: np.isin(kinds, [k for k, (kf, _) in EDITS.items() if kf == f]) for f in FAMILIES})
    for key, rows in members.items():
        # the kind's images against every original: its own (a duplicate) and all the others
        scored = counts(sims[rows][:, is_orig], same[rows][:, is_orig], tiles[rows][:, is_orig], sweep)
        out["families" if key in FAMILIES else "kinds"][key] = scored
    pair_sims, pair_same = sims[upper], same[upper]
    order = np.argsort(pair_sims, kind="stable")
    neg, pos = order[~pair_same[order]][::-1][:5], order[pair_same[order]][:5]

    def pair(i: int) -> dict[str, Any]:
        return {"a": s.names[upper[0][i]], "b": s.names[upper[1][i]], "similarity": round(float(pair_sims[i]), 2)}

    out["nearest_distinct"] = [pair(int(i)) for i in neg]
    out["farthest_duplicates"] = [pair(int(i)) for i in pos]
    return out


def recommend(rows: list[dict[str, float]], min_precision: float = MIN_PRECISION,
              key: str = "precision") -> dict[str, float] | None:
    """The lowest threshold of the sweep at and above which precision (`key`) holds `min_precision`: the highest
    recall that keeps it, without betting on a lucky dip in the false pairs."""
    best = None
    for r in sorted(rows, key=lambda r: -r["min_similarity"]):
        if r[key] < min_precision:
            break
        best = r if r["tp"] > 0 else best
    return best


def best_f1(rows: list[dict[str, float]]) -> dict[str, float]:
    def f1(r: dict[str, float]) -> float:
        return 2 * r["precision"] * r["recall"] / (r["precision"] + r["recall"] or 1.0)

    return max(rows, key=f1)


def measure(folder: Path, runs: str, s: ImageSet, sweep: tuple[float, ...] = SWEEP) -> dict[str, Any]:
    """Embed the set with one model on one engine and score it."""
    spec = load_manifest(folder)
    emb = nd.embed_all(nd.open_on(spec.visual, runs), spec, s.blobs)
    result = score(s, emb, sweep)
    result.update(model=spec.name, engine=runs, recommended=recommend(result["all"]), best_f1=best_f1(result["all"]),
                  recommended_other_photos=recommend(result["all"], key="precision_other_photos"))
    return result


def describe(s: ImageSet) -> dict[str, int]:
    n = len(s.names)
    dup = int(sum(c * (c - 1) // 2 for c in np.bincount(s.group)))
    return {"images": n, "originals": int(s.group.max()) + 1, "edits": len(EDITS), "pairs": n * (n - 1) // 2,
            "duplicate_pairs": dup}


def table(result: dict[str, Any], sweep: tuple[float, ...]) -> list[str]:
    """Markdown: one row per threshold, precision/recall over all pairs, then recall per family and kind."""
    cols = list(FAMILIES) + list(EDITS)
    lines = ["| min_similarity | precision | recall | false pairs (of one photo) | " + " | ".join(cols) + " |",
             "| --- |" + " --- |" * (3 + len(cols))]
    for i, t in enumerate(sweep):
        a = result["all"][i]
        per = [result["families"][c][i] if c in FAMILIES else result["kinds"][c][i] for c in cols]
        lines.append(f"| {t:g} | {a['precision']:.3f} | {a['recall']:.3f} | {a['fp']} ({a['fp_same_photo']}) | "
                     + " | ".join(f"{r['recall']:.2f}/{r['precision']:.2f}" for r in per) + " |")
    return lines


def summary(r: dict[str, Any]) -> list[str]:
    """The sweep's table, the recommendation (and the alternatives weighed) and the pairs nearest the boundary."""
    rec, f1, other = r["recommended"], r["best_f1"], r["recommended_other_photos"]

    def pairs(key: str) -> str:
        return "; ".join(f"{p['a']} ~ {p['b']} {p['similarity']}" for p in r[key])

    return [
        f"\n## {r['model']} ({r['engine']})", *table(r, SWEEP),
        "recommended: " + (f"min_similarity {rec['min_similarity']:g}: precision {rec['precision']:.3f}, recall "
                           f"{rec['recall']:.3f}" if rec else f"none in the sweep reaches {MIN_PRECISION}"),
        f"best F1: min_similarity {f1['min_similarity']:g} (precision {f1['precision']:.3f}, "
        f"recall {f1['recall']:.3f})",
        "when only different photos count as false pairs: " + (
            f"min_similarity {other['min_similarity']:g} (precision {other['precision_other_photos']:.3f}, recall "
            f"{other['recall']:.3f})" if other else "none"),
        "nearest distinct pairs: " + pairs("nearest_distinct"),
        "farthest duplicates: " + pairs("farthest_duplicates"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="model folders (with a manifest.json)")
    parser.add_argument("--engines", default="onnxruntime:fp32", help="ENGINE:PRECISION, comma-separated")
    parser.add_argument("--seed", type=int, default=SEED, help="seeds every random edit")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)
    s = build_set(args.seed)
    info = describe(s)
    print(f"{info['images']} images ({info['originals']} originals x {info['edits'] + 1}), {info['pairs']} pairs, "
          f"{info['duplicate_pairs']} of them duplicates. Cells: recall/precision of that kind's images against "
          f"every original. Recommended: the lowest min_similarity with pair precision >= {MIN_PRECISION}.")
    results = []
    for folder in args.models:
        for runs in args.engines.split(","):
            results.append(measure(folder, runs, s))
            print("\n".join(summary(results[-1])))
    if args.json:
        args.json.write_text(json.dumps({"set": info, "seed": args.seed, "min_precision": MIN_PRECISION,
                                         "results": results}, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
