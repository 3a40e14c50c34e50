"""The service loads exported folders with onnxruntime only, and text search works on the CLIP model."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.conftest import make_settings, running_service
from tests_export.conftest import Exported, encode, skimage_photo


async def test_service_serves_exported_models(vit_b32: Exported, effnet: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for folder in (vit_b32.folder, vit_b32.folder.parent / "vit_b32_int8", effnet):
        (models / folder.name).symlink_to(folder, target_is_directory=True)
    async with running_service(make_settings(tmp_path / "data", models)) as svc:
        async with svc.http.get(f"{svc.url}/models") as r:
            listed = {m["name"]: m["text"] for m in await r.json()}
        assert listed == {"vit_b32": True, "vit_b32_int8": True, "effnet_lite0": False}
        photos = {n: encode(skimage_photo(n), "JPEG", quality=90) for n in ("astronaut", "coffee", "chelsea")}
        for model in listed:
            for name, data in photos.items():
                form = aiohttp.FormData()
                form.add_field("url", f"https://example.org/{name}.jpg")
                form.add_field("image", data, filename=f"{name}.jpg", content_type="image/jpeg")
                async with svc.http.post(svc.model(model) + "/add", data=form) as r:
                    assert r.status == 204, await r.text()
            form = aiohttp.FormData()
            form.add_field("image", photos["coffee"], filename="q.jpg", content_type="image/jpeg")
            async with svc.http.post(svc.model(model) + "/search", data=form) as r:
                hits = await r.json()
            assert hits[0]["url"] == "https://example.org/coffee.jpg" and hits[0]["similarity"] > 99.9
        async with svc.http.post(svc.model("vit_b32") + "/search", json={"text": "a cup of coffee", "limit": 3}) as r:
            assert r.status == 200
            hits = await r.json()
        assert len(hits) == 3 and hits[0]["similarity"] >= hits[-1]["similarity"]
        async with svc.http.post(svc.model("effnet_lite0") + "/search", json={"text": "coffee"}) as r:
            assert r.status == 422 and "text_not_supported" in await r.text()
