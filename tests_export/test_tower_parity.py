"""Exported ONNX towers compute what open_clip's own forward pass computes, for every batch size."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from idios.embed import TextEncoder
from idios.engines.onnxruntime import OrtTower
from idios.models import load_manifest
from tests_export.conftest import COSINE_TOWER, Exported, cosines, skimage_photo

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
TEXTS = ("a photo of an astronaut", "a cup of coffee", "a cat", "a rocket on its launch pad")
LONG_TEXT = " ".join(["a very long caption about a museum archive photograph"] * 12)  # past 77 tokens
MODELS = ("vit_b32", "rn50", "vit_s32_file")


@dataclass
class Towers:
    """One exported model's ONNX sessions next to open_clip's own outputs for the same inputs."""

    exported: Exported
    images: torch.Tensor
    tokens: torch.Tensor
    want_images: np.ndarray
    want_texts: np.ndarray
    visual: OrtTower
    text: OrtTower
    encoder: TextEncoder


_towers: dict[str, Towers] = {}


@pytest.fixture(params=MODELS)
def exported(request: pytest.FixtureRequest) -> Exported:
    return request.getfixturevalue(request.param)


@pytest.fixture
def towers(exported: Exported) -> Towers:
    """Reference outputs and sessions, built once per model."""
    key = exported.folder.name
    if key not in _towers:
        c = exported.clip
        transform = open_clip.image_transform(c.image_size, is_train=False, mean=c.mean, std=c.std)
        images = torch.stack([transform(skimage_photo(p)) for p in PHOTOS])
        tokens = c.tokenizer(list(TEXTS))
        with torch.no_grad():
            want_i = F.normalize(c.model.encode_image(images), dim=-1).numpy()
            want_t = F.normalize(c.model.encode_text(tokens), dim=-1).numpy()
        spec = load_manifest(exported.folder)
        assert spec.text is not None
        _towers[key] = Towers(exported, images, tokens, want_i, want_t,
                              OrtTower(spec.visual, 2), OrtTower(spec.text.file, 2),
                              TextEncoder(spec.text, OrtTower(spec.text.file, 2)))
    return _towers[key]


def assert_matches(got: np.ndarray, want: np.ndarray, all_want: np.ndarray) -> None:
    """Cosine per row, and an error far below the gap between different inputs.

    Random weights can map different inputs to nearly the same direction (RN50 does), where a cosine bound
    alone would pass whatever came out; the second check keeps the test able to fail."""
    assert got.shape == want.shape
    assert cosines(got, want).min() >= COSINE_TOWER
    gaps = [np.linalg.norm(all_want[i] - all_want[j]) for i in range(len(all_want)) for j in range(i)]
    assert np.linalg.norm(got - want, axis=1).max() < 0.01 * min(gaps)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_image_tower_matches_open_clip(towers: Towers, batch: int) -> None:
    got = towers.visual.run(towers.images[:batch].numpy())
    assert_matches(got, towers.want_images[:batch], towers.want_images)


@pytest.mark.parametrize("batch", [1, 4])
def test_text_tower_matches_open_clip(towers: Towers, batch: int) -> None:
    """The tower on open_clip's own 77-token input."""
    got = towers.text.run(towers.tokens[:batch].numpy())
    assert_matches(got, towers.want_texts[:batch], towers.want_texts)


@pytest.mark.parametrize("batch", [1, 4])
def test_runtime_text_encoder_matches_open_clip(towers: Towers, batch: int) -> None:
    """What the service runs: its tokenizer, padded only to the longest text of the batch, through the tower
    exported with a dynamic length, against open_clip's forward pass over the full context."""
    tokens = towers.encoder.tokens(list(TEXTS[:batch]))
    assert towers.encoder.trimmed and tokens.shape[1] < 77
    assert_matches(towers.encoder.run(list(TEXTS[:batch])), towers.want_texts[:batch], towers.want_texts)


def test_text_past_the_context_matches_open_clip(towers: Towers) -> None:
    c = towers.exported.clip
    with torch.no_grad():
        want = F.normalize(c.model.encode_text(c.tokenizer([LONG_TEXT, "a cat"])), dim=-1).numpy()
    assert towers.encoder.tokens([LONG_TEXT]).shape == (1, 77)
    got = towers.encoder.run([LONG_TEXT, "a cat"])
    assert cosines(got, want).min() >= COSINE_TOWER


def test_manifest_describes_the_export(exported: Exported) -> None:
    raw = json.loads((exported.folder / "manifest.json").read_text())
    spec = load_manifest(exported.folder)
    c = exported.clip
    assert (spec.image_size, spec.mean, spec.std, spec.resize) == (c.image_size, c.mean, c.std, "shortest")
    assert spec.text is not None and spec.text.context_length == 77 and spec.text.clean == "clip"
    assert raw["precision"] == "fp32" and raw["source"]["library"] == "open_clip"
    with torch.no_grad():
        assert spec.dim == c.model.encode_image(torch.zeros(1, 3, c.image_size, c.image_size)).shape[-1]
    from export_model import sha256

    assert raw["sha256"] == {p.name: sha256(p) for p in exported.folder.iterdir() if p.name != "manifest.json"}
    tower = OrtTower(spec.visual, 1)
    assert isinstance(tower.session.get_inputs()[0].shape[0], str), "the batch dimension must be dynamic"
    text_shape = OrtTower(spec.text.file, 1).session.get_inputs()[0].shape
    assert all(isinstance(d, str) for d in text_shape), "batch and sequence length must be dynamic"


def test_openai_presets_keep_quick_gelu(vit_b32: Exported, rn50: Exported, vit_s32_file: Exported) -> None:
    """OpenAI's weights were trained with QuickGELU; open_clip's plain configs would silently use GELU."""
    for e, want in ((vit_b32, True), (rn50, True), (vit_s32_file, False)):
        assert json.loads((e.folder / "manifest.json").read_text())["source"]["quick_gelu"] is want
        assert e.clip.quick_gelu is want


def test_checkpoint_file_export_records_weights(vit_s32_file: Exported) -> None:
    raw = json.loads((vit_s32_file.folder / "manifest.json").read_text())
    assert raw["random_weights"] is False and raw["source"]["pretrained"] == "vit_s32.pt"
    assert raw["source"]["arch"] == "ViT-S-32" and raw["name"] == "vit_s32_file"
