"""A real CLIP architecture exported the way Immich exports it, published on the stand-in hub, pulled with
`python -m idios pull`, and served as open_clip computes it.

Immich's ONNX exports cannot be downloaded here (no model hub), so this builds one as Immich's exporter does
(machine-learning/export/immich_model_exporter: `torch.onnx.export` of `encode_image` / `encode_text` with
`normalize=True`, inputs `image` float32 [1, 3, 224, 224] and `text` int32 [1, 77], no dynamic axes; open_clip's
own `get_model_config` as config.json and `get_model_preprocess_cfg` as visual/preprocess_cfg.json; a CLIP
tokenizer.json whose pad token is its end token) from ViT-B-32 with random weights; and in the newer style of
immich-app/ml-models, a visual tower that takes RGB bytes [N, 224, 224, 3] at any batch size and normalises
them in the graph. What this holds: the layout is read from the files open_clip itself writes; the batch-1
towers run in pieces; byte input gets the resized, cropped bytes; int32 ids padded with the end token (49407,
not open_clip's 0) give open_clip's embeddings."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from torch import nn

from idios.decode import DecodeLimits, preprocess
from idios.embed import TextEncoder
from idios.engines.onnxruntime import OrtTower
from idios.engines.openvino import OpenVinoTower
from idios.models import load_manifest
from tests.hubserver import Repo, fake_hub
from tests.test_pull import hub_env, pull
from tests_export.conftest import COSINE_TOWER, Exported, cosines, encode, skimage_photo
from tests_export.test_tower_parity import PHOTOS, TEXTS
import export_clip as ec

pytestmark = pytest.mark.timeout(600)


class Encode(nn.Module):
    """`model.encode_image` or `model.encode_text` with normalize=True, as Immich's exporter traces them."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = getattr(self.model, self.method)(x, normalize=True)
        return out


class EncodeBytes(nn.Module):
    """Immich's newer visual exports: RGB bytes [N, S, S, 3] in, cast, transposed and normalised in the graph."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chw = x.float().permute(0, 3, 1, 2) / 255.0
        out: torch.Tensor = self.model.encode_image((chw - self.mean) / self.std, normalize=True)
        return out


def immich_onnx(module: nn.Module, example: torch.Tensor, name: str, path: Path, dynamic: bool = False) -> bytes:
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), input_names=[name], output_names=["embedding"],
                              opset_version=17, dynamo=False,
                              dynamic_axes={name: {0: "batch"}, "embedding": {0: "batch"}} if dynamic else None)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    return path.read_bytes()


def immich_repo(clip: ec.ClipModel, tmp: Path, pixels: str) -> dict[str, bytes]:
    model = clip.model
    if pixels == "uint8":  # the newer style: bytes, any batch size
        visual = immich_onnx(EncodeBytes(model, clip.mean, clip.std), torch.zeros(2, 224, 224, 3, dtype=torch.uint8),
                             "image", tmp / "v.onnx", dynamic=True)
    else:  # the older style: normalised floats, a batch of 1
        visual = immich_onnx(Encode(model, "encode_image"), torch.randn(1, 3, 224, 224), "image", tmp / "v.onnx")
    return {
        "config.json": json.dumps(open_clip.get_model_config("ViT-B-32")).encode(),
        "visual/preprocess_cfg.json": json.dumps(open_clip.get_model_preprocess_cfg(model)).encode(),
        "visual/model.onnx": visual,
        "textual/model.onnx": immich_onnx(Encode(model, "encode_text"), torch.ones(1, 77, dtype=torch.int32), "text",
                                          tmp / "t.onnx"),
        "textual/tokenizer.json": ec.tokenizer_json(clip.tokenizer).encode(),
        # Hugging Face's CLIP tokenizer calls the end token <|endoftext|>, open_clip's <end_of_text>: the same id
        "textual/tokenizer_config.json": json.dumps({"pad_token": clip.tokenizer.decoder[clip.tokenizer.eot_token_id],
                                                     "model_max_length": 77}).encode(),
    }


@pytest.mark.parametrize("pixels", ["float", "uint8"])
async def test_an_immich_style_export_of_vit_b32_is_pulled_and_served_as_open_clip_computes_it(
    vit_b32: Exported, tmp_path: Path, pixels: str
) -> None:
    clip = vit_b32.clip
    files = immich_repo(clip, tmp_path, pixels)
    models = tmp_path / "models"
    async with fake_hub({"immich-app/ViT-B-32__openai": Repo(files)}) as hub:
        rc, _, err = await pull(hub_env(hub.url, tmp_path), models, "vit_b32", timeout=300)
    assert rc == 0, err[-3000:]
    spec = load_manifest(models / "vit_b32")
    assert (spec.dim, spec.image_size, spec.resize, spec.interpolation) == (512, 224, "shortest", "bicubic")
    assert spec.mean == pytest.approx(clip.mean) and spec.std == pytest.approx(clip.std)
    assert spec.text is not None and spec.text.clean == "lower" and spec.text.context_length == 77
    assert spec.text.pad_id == clip.tokenizer.eot_token_id == 49407

    assert spec.pixels == pixels
    photos = [encode(skimage_photo(p), "JPEG", quality=95) for p in PHOTOS]
    images = np.stack([preprocess(p, spec, DecodeLimits()) for p in photos])
    floats = np.stack([preprocess(p, dataclasses.replace(spec, pixels="float"), DecodeLimits()) for p in photos])
    with torch.no_grad():  # open_clip's forward pass on the normalised floats, whatever the file takes
        want_images = clip.model.encode_image(torch.from_numpy(floats), normalize=True).numpy()
        want_texts = clip.model.encode_text(clip.tokenizer(list(TEXTS)), normalize=True).numpy()
    for tower in (OrtTower(spec.visual, 2), OpenVinoTower(spec.visual, 2, "fp32")):
        assert tower.feed.batch == (1 if pixels == "float" else None)
        assert cosines(tower.run(images), want_images).min() >= COSINE_TOWER, tower.engine
    text = OrtTower(spec.text.file, 2)
    assert text.feed.dtypes == (np.int32,) and text.feed.batch == 1
    got = TextEncoder(spec.text, text).run(list(TEXTS))
    assert cosines(got, want_texts).min() >= COSINE_TOWER
