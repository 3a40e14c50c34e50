"""The engines against open_clip's own forward pass: OpenVINO bf16 and NNCF int8 on real photos and real
queries, the fidelity the export records, and `auto` following it (effnet_lite0 measures under 0.999: fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from idios.embed import TextEncoder
from idios.engines import BF16_MIN_COSINE, Machine, plan
from idios.engines.onnxruntime import CPU
from idios.engines.openvino import OpenVinoTower, cpu_capabilities
from idios.models import load_manifest
from tests_export.conftest import Exported, cosines, skimage_photo

import export_model as em  # noqa: E402  (scripts/ is on sys.path via conftest)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "horse", "hubble_deep_field", "page")
TEXTS = ["a photo of an astronaut", "a cup of coffee", "a cat", "a rocket on its launch pad",
         "an engraving of a ship in a storm", "portrait of a woman in a red dress"]
CAPS = cpu_capabilities()
HAS_BF16 = CAPS is not None and "BF16" in CAPS
MACHINE = Machine(None if CAPS is None else frozenset(CAPS), (CPU,))
pytestmark = pytest.mark.skipif(CAPS is None, reason="OpenVINO cannot run on this machine")


def reference(exported: Exported) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """open_clip's preprocessed photos, and its own normalised image and text embeddings of them."""
    c = exported.clip
    transform = open_clip.image_transform(c.image_size, is_train=False, mean=c.mean, std=c.std)
    images = torch.stack([transform(skimage_photo(p)) for p in PHOTOS])
    with torch.no_grad():
        want_i = F.normalize(c.model.encode_image(images), dim=-1).numpy()
        want_t = F.normalize(c.model.encode_text(c.tokenizer(TEXTS)), dim=-1).numpy()
    return images.numpy(), want_i, want_t


def assert_same_items(got: np.ndarray, want: np.ndarray, floor: float) -> None:
    """Each row within `floor` of its reference, and closer to it than to any other item's where the reference
    tells them apart (random weights map some photos to one direction: cosine 0.9999999 between two here)."""
    assert cosines(got, want).min() >= floor, cosines(got, want)
    others = want @ want.T
    np.fill_diagonal(others, -1)
    distinct = others.max(axis=1) < floor
    assert distinct.sum() >= len(want) // 2  # else this check could not fail
    assert (np.argmax(got @ want.T, axis=1) == np.arange(len(want)))[distinct].all()


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16: OpenVINO would run fp32")
@pytest.mark.parametrize("model", ["vit_b32", "vit_s32_file"])
def test_bf16_towers_match_open_clip(model: str, request: pytest.FixtureRequest) -> None:
    exported: Exported = request.getfixturevalue(model)
    images, want_i, want_t = reference(exported)
    spec = load_manifest(exported.folder)
    assert spec.text is not None
    for batch in (1, len(images)):
        got = np.concatenate([OpenVinoTower(spec.visual, 2, "bf16").run(images[i:i + batch])
                              for i in range(0, len(images), batch)])
        assert_same_items(got, want_i, BF16_MIN_COSINE)
    encoder = TextEncoder(spec.text, OpenVinoTower(spec.text.file, 2, "bf16"))
    assert encoder.trimmed
    assert_same_items(encoder.run(TEXTS), want_t, BF16_MIN_COSINE)


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16: bf16 cannot be measured")
def test_the_export_records_bf16_fidelity_and_auto_follows_it(rn50: Exported, effnet: Path) -> None:
    """Exports through the command line measure bf16 on scikit-image's photos. RN50 holds it; effnet_lite0 with
    its real weights does not (measured here: min 0.9979), so `auto` keeps it on fp32."""
    clip = load_manifest(rn50.folder)
    held = json.loads((rn50.folder / "manifest.json").read_text())["fidelity"]["bf16"]
    assert set(held) == {"visual", "text"} and held["visual"]["items"] == len(em.SKIMAGE_PHOTOS)
    for kind in ("visual", "text"):
        chosen = plan(clip.tower_weights(kind), "auto", "auto", MACHINE)
        assert chosen.runs == ("openvino", "bf16" if held[kind]["min_cosine"] >= BF16_MIN_COSINE else "fp32")
    effnet_spec = load_manifest(effnet)
    low = effnet_spec.bf16_min_cosine("visual")
    assert low is not None and 0.99 < low < BF16_MIN_COSINE
    chosen = plan(effnet_spec.tower_weights("visual"), "auto", "auto", MACHINE)
    assert chosen.runs == ("openvino", "fp32") and "under 0.999" in chosen.reason


def test_nncf_int8_matches_open_clip(vit_b32: Exported, tmp_path: Path) -> None:
    """--int8-static: NNCF on ten real photos and the sample queries, saved as OpenVINO IR; cosine >= 0.99 to
    open_clip's own fp32 forward pass on real photos and queries (measured 0.996 / 0.999 with random weights)."""
    photos = em.photo_bytes(None)
    folder = em.quantize_static(vit_b32.folder, tmp_path / "vit_b32_int8_static", "vit_b32_int8_static",
                                photos[:10], photos)
    raw = json.loads((folder / "manifest.json").read_text())
    assert raw["precision"] == "int8" and raw["engine"] == "openvino" and raw["visual"]["file"] == "visual.xml"
    assert raw["fidelity"]["int8"]["visual"]["min_cosine"] >= 0.99
    assert set(raw["sha256"]) == {"visual.xml", "visual.bin", "text.xml", "text.bin", "tokenizer.json"}
    spec = load_manifest(folder)
    assert plan(spec.tower_weights("visual"), "auto", "auto", MACHINE).runs == ("openvino", "int8")
    images, want_i, want_t = reference(vit_b32)
    assert_same_items(OpenVinoTower(spec.visual, 2, "int8").run(images), want_i, 0.99)
    assert spec.text is not None
    encoder = TextEncoder(spec.text, OpenVinoTower(spec.text.file, 2, "int8"))
    assert_same_items(encoder.run(TEXTS), want_t, 0.99)
