"""Export tests: real open_clip / timm models exported to ONNX once per session, compared with torch forwards.

Run in the export environment (requirements/export-dev.txt): `python -m pytest tests_export`."""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import export_clip as ec  # noqa: E402
import export_model as em  # noqa: E402

COSINE_TOWER = 0.9999


def pytest_configure(config: pytest.Config) -> None:
    # no model hub: huggingface_hub (open_clip's weights, pull) stays offline unless a test points it at its own
    # stand-in hub, and `serve` pulls no default model
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["IDIOS_DEFAULT_MODEL"] = ""
    # torch's own internals warn about torch's internals; nothing here is actionable.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:torch.*")
    config.addinivalue_line("filterwarnings", "ignore::FutureWarning:torch.*")


@dataclass
class Exported:
    """A model folder and the torch model its ONNX files were traced from."""

    folder: Path
    clip: ec.ClipModel


def export_clip_folder(out: Path, name: str, clip: ec.ClipModel, arch: str) -> Path:
    """What `export_model.export` writes, from a model this test also keeps in memory."""
    folder = out / name
    manifest = em.write_clip(folder, name, clip, arch, None)
    manifest.update(precision="fp32", random_weights=True)
    em.write_manifest(folder, manifest)
    return folder


@pytest.fixture(scope="session")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exported")


@pytest.fixture(scope="session")
def vit_b32(out_dir: Path) -> Exported:
    """ViT-B-32 with the graph of OpenAI's weights (QuickGELU), random weights, and its int8 copy."""
    clip = ec.load("ViT-B-32", "openai", random_weights=True)
    folder = export_clip_folder(out_dir, "vit_b32", clip, "ViT-B-32")
    em.quantize(folder, out_dir / "vit_b32_int8", "vit_b32_int8")
    return Exported(folder, clip)


@pytest.fixture(scope="session")
def rn50(out_dir: Path) -> Exported:
    """RN50 through the command line (random weights); the reference is the same seeded build in memory."""
    assert em.main(["rn50", "--random-weights", "--out", str(out_dir)]) == 0
    return Exported(out_dir / "rn50", ec.load("RN50", "openai", random_weights=True))


@pytest.fixture(scope="session")
def vit_s32_file(out_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """A small open_clip config (stands in for ViT-L-14) exported from a local checkpoint file: ARCH:PATH."""
    import open_clip

    torch.manual_seed(1)
    model = open_clip.create_model("ViT-S-32").eval()
    ckpt = tmp_path_factory.mktemp("ckpt") / "vit_s32.pt"
    torch.save(model.state_dict(), ckpt)
    assert em.main([f"ViT-S-32:{ckpt}", "--name", "vit_s32_file", "--out", str(out_dir)]) == 0
    clip = ec.load("ViT-S-32", None, random_weights=True)
    clip.model = model
    return Exported(out_dir / "vit_s32_file", clip)


@pytest.fixture(scope="session")
def effnet(out_dir: Path) -> Path:
    """effnet_lite0 with its real ImageNet weights."""
    assert em.main(["effnet_lite0", "--out", str(out_dir)]) == 0
    return out_dir / "effnet_lite0"


def skimage_photo(name: str) -> Image.Image:
    """A real photograph that ships inside scikit-image, as RGB."""
    from skimage import data

    return Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [N, D] arrays."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)
