"""Model folders: each folder under models/ with a manifest.json is a model the service serves."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from idios.engines import TowerWeights
from idios.textclean import CLEANERS

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
MANIFEST = "manifest.json"
RESIZES = ("shortest", "squash")
PIXELS = ("float", "uint8")
INTERPOLATIONS = ("bicubic", "bilinear")


@dataclass(frozen=True)
class TextTower:
    file: Path
    tokenizer: Path
    context_length: int
    clean: str = "none"  # a key of idios.textclean.CLEANERS: what the model's tokenizer did before BPE
    pad_id: int = 0  # the id texts are padded with (open_clip: 0; Hugging Face tokenizers: their pad token)
    # pad a batch to its longest text when the file's length is dynamic: right for our CLIP exports only (causal
    # mask, end-token pooling); other towers are padded to context_length whatever their file allows
    trim: bool = True


@dataclass(frozen=True)
class ModelSpec:
    """What a manifest says about a model: enough to preprocess, run and store its embeddings."""

    name: str
    dim: int
    image_size: int
    resize: str  # "shortest": resize the short side then centre-crop; "squash": resize to a square
    interpolation: str  # a key of INTERPOLATIONS: the resampling filter the model was trained with
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    visual: Path
    # what the visual tower takes: "float" = [N, 3, S, S] float32 normalised with mean/std; "uint8" = [N, S, S, 3]
    # RGB bytes, resized and cropped only (the file normalises them itself: Immich's newer exports)
    pixels: str
    visual_data: tuple[Path, ...]  # files the visual tower reads besides its own (ONNX external data)
    text: TextTower | None
    random_weights: bool
    raw: dict[str, Any]

    @property
    def collection(self) -> str:
        return f"idios_{self.name}"

    @property
    def visual_files(self) -> tuple[Path, ...]:
        """Every file the visual tower's weights are in: its file, an OpenVINO .xml's .bin, external data."""
        extra = (self.visual.with_suffix(".bin"),) if self.visual.suffix == ".xml" else ()
        return (self.visual, *extra, *self.visual_data)

    @property
    def has_text(self) -> bool:
        return self.text is not None

    def tower_weights(self, kind: str) -> TowerWeights:
        """What the manifest says of the `visual` or `text` tower's file: weights, engine, bf16 fidelity."""
        path = self.visual if kind == "visual" else self.text.file if self.text else None
        if path is None:
            raise ValueError(f"model {self.name} has no {kind} tower")
        return TowerWeights(path, self.precision, self.raw.get("engine"), self.bf16_min_cosine(kind))

    @property
    def precision(self) -> str:
        """The weights as exported: `fp32`, or `int8` for a quantised copy."""
        return str(self.raw.get("precision", "fp32"))

    @property
    def duplicate_similarity(self) -> float | None:
        """The similarity from which two images count as duplicates for this model, as measured on real photos
        (manifest `duplicates.min_similarity`, scripts/duplicate_quality.py); None when never measured."""
        value = (self.raw.get("duplicates") or {}).get("min_similarity")
        return float(value) if isinstance(value, (int, float)) and 0 <= value <= 100 else None

    def bf16_min_cosine(self, kind: str) -> float | None:
        """The least bf16-vs-fp32 cosine measured for a tower (manifest `fidelity.bf16.KIND.min_cosine`)."""
        entry = ((self.raw.get("fidelity") or {}).get("bf16") or {}).get(kind) or {}
        value = entry.get("min_cosine")
        return float(value) if isinstance(value, (int, float)) else None


def load_manifest(folder: Path) -> ModelSpec:
    """Parse and check one model folder's manifest."""
    raw = orjson.loads((folder / MANIFEST).read_bytes())
    name = str(raw.get("name", folder.name))
    if not NAME_RE.match(name):
        raise ValueError(f"{folder}: model name {name!r} must match {NAME_RE.pattern}")
    visual = folder / raw["visual"]["file"]
    if not visual.is_file():
        raise ValueError(f"{folder}: visual tower {visual.name} is missing")
    visual_data = tuple(folder / str(f) for f in raw["visual"].get("data", []))
    if not all(p.is_file() for p in visual_data):
        raise ValueError(f"{folder}: a data file of the visual tower is missing")
    pixels = str(raw["visual"].get("pixels", "float"))
    if pixels not in PIXELS:
        raise ValueError(f"{folder}: visual pixels must be one of {', '.join(PIXELS)}")
    text = None
    if raw.get("text"):
        t = raw["text"]
        clean = str(t.get("clean", "none"))
        text = TextTower(folder / t["file"], folder / t["tokenizer"], int(t.get("context_length", 77)), clean,
                         int(t.get("pad_id", 0)), bool(t.get("trim", True)))
        if not text.file.is_file() or not text.tokenizer.is_file():
            raise ValueError(f"{folder}: text tower or tokenizer file is missing")
        if clean not in CLEANERS:
            raise ValueError(f"{folder}: text clean must be one of {sorted(CLEANERS)}")
    resize = str(raw.get("resize", "shortest"))
    if resize not in RESIZES:
        raise ValueError(f"{folder}: resize must be one of {', '.join(RESIZES)}")
    interpolation = str(raw.get("interpolation", "bicubic"))
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"{folder}: interpolation must be one of {', '.join(INTERPOLATIONS)}")
    if str(raw.get("precision", "fp32")) not in ("fp32", "int8"):
        raise ValueError(f"{folder}: precision must be 'fp32' or 'int8'")
    mean, std = tuple(float(x) for x in raw["mean"]), tuple(float(x) for x in raw["std"])
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{folder}: mean and std need 3 values")
    return ModelSpec(
        name=name,
        dim=int(raw["dim"]),
        image_size=int(raw["image_size"]),
        resize=resize,
        interpolation=interpolation,
        mean=mean,
        std=std,
        visual=visual,
        pixels=pixels,
        visual_data=visual_data,
        text=text,
        random_weights=bool(raw.get("random_weights", False)),
        raw=raw,
    )


def discover(models_dir: Path) -> dict[str, ModelSpec]:
    """Every valid model under `models_dir`, by name; broken folders are logged and skipped."""
    specs: dict[str, ModelSpec] = {}
    if not models_dir.is_dir():
        return specs
    # a dot folder is a pull still under way (idios/hub.py renames it into place when it is whole)
    for folder in sorted(p for p in models_dir.iterdir() if (p / MANIFEST).is_file() and not p.name.startswith(".")):
        try:
            spec = load_manifest(folder)
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            log.error("skipping model folder %s: %s", folder, exc)
            continue
        if spec.name in specs:
            log.error("skipping %s: model name %s is already taken", folder, spec.name)
            continue
        if spec.random_weights:
            log.warning("MODEL %s HAS RANDOM WEIGHTS: its embeddings are meaningless outside tests/benchmarks", spec.name)
        specs[spec.name] = spec
    return specs
