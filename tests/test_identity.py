"""Model identity: each collection records which weights filled it, and a model whose files differ from that
record is refused at start-up (not served, listed with the reason) instead of mixing two models' embeddings in
one collection. Real services over real Milvus Lite files, real ONNX models built here."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from pymilvus import MilvusClient

from idios.settings import Settings
from idios.identity import IDENTITIES
from idios.schema import create_collection
from tests.conftest import ROOT, Service, make_settings, running_service
from tests.test_scripts import script

import make_thumb_model

pytestmark = pytest.mark.timeout(180)

PULLED = {"repo": "immich-app/ViT-B-32__openai", "revision": "0123abc" + "d" * 33, "layout": "immich"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_folders(tmp: Path) -> Path:
    """thumb_grid (as committed) and thumb_b (built here, with a `source` as a pulled model has one)."""
    root = tmp / "models"
    shutil.copytree(ROOT / "models" / "thumb_grid", root / "thumb_grid")
    make_thumb_model.build(root / "thumb_b", name="thumb_b")
    set_manifest(root / "thumb_b", source=PULLED)
    return root


def set_manifest(folder: Path, **fields: Any) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(fields)
    manifest["sha256"] = {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.name != "manifest.json"}
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def other_weights(folder: Path) -> None:
    """Another model's visual file of the same dimension: other bytes (a doc string), the same graph."""
    model = make_thumb_model.visual_model()
    model.doc_string = "other weights"
    onnx.save(model, folder / "visual.onnx")
    set_manifest(folder)


async def listing(svc: Service) -> dict[str, dict[str, Any]]:
    async with svc.http.get(f"{svc.url}/models") as resp:
        assert resp.status == 200
        return {m["name"]: m for m in await resp.json()}


async def call(svc: Service, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with svc.http.request(method, svc.url + path, json=body) as resp:
        return resp.status, await resp.json() if resp.content_type == "application/json" else await resp.text()


def records(settings: Settings) -> dict[str, dict[str, Any]]:
    """The identity records as stored, read with a client of our own (the service is stopped)."""
    client = MilvusClient(settings.milvus_target)
    try:
        if not client.has_collection(IDENTITIES):
            return {}
        rows = client.query(IDENTITIES, filter='model >= ""', output_fields=["model", "identity"])
        return {r["model"]: r["identity"] for r in rows}
    finally:
        client.close()


async def test_first_start_records_the_identity_and_a_restart_serves_the_same_files(
    tmp_path: Path, images: str
) -> None:
    models = model_folders(tmp_path)
    settings = make_settings(tmp_path / "data", models)
    grid_sha, b_sha = sha256(models / "thumb_grid" / "visual.onnx"), sha256(models / "thumb_b" / "visual.onnx")
    url = f"{images}/img/identity/a.jpg"
    async with running_service(settings) as svc:
        found = await listing(svc)
        assert found["thumb_grid"]["identity"] == {"visual_sha256": grid_sha, "dim": 192}
        assert found["thumb_grid"]["source"] is None  # the committed model was built here
        assert found["thumb_b"]["identity"] == {"visual_sha256": b_sha, "dim": 192}
        assert found["thumb_b"]["source"] == PULLED
        assert not any("refused" in m for m in found.values())
        assert found["thumb_b"]["engines"]["visual"] is not None and found["thumb_b"]["text"] is False
        assert (await call(svc, "POST", "/models/thumb_b/add", {"url": url}))[0] == 204
    assert records(settings) == {
        "thumb_grid": {"model": "thumb_grid", "dim": 192, "visual_sha256": grid_sha, "source": None},
        "thumb_b": {"model": "thumb_b", "dim": 192, "visual_sha256": b_sha, "source": PULLED},
    }

    async with running_service(settings) as svc:  # the same files: served, with what they stored
        assert sorted(svc.backend.specs) == ["thumb_b", "thumb_grid"] and svc.backend.refused == {}
        assert await call(svc, "GET", "/models/thumb_b/count") == (200, 1)
        status, hits = await call(svc, "POST", "/models/thumb_b/search", {"url": url, "limit": 1})
        assert status == 200 and hits[0]["url"] == url

    # the same bytes from a mirror: another source alone is no refusal, and the record keeps the first one
    set_manifest(models / "thumb_b", source={**PULLED, "repo": "mirror.example/ViT-B-32__openai"})
    async with running_service(settings) as svc:
        found = await listing(svc)
        assert "refused" not in found["thumb_b"] and found["thumb_b"]["source"]["repo"].startswith("mirror.")
        assert await call(svc, "GET", "/models/thumb_b/count") == (200, 1)
    assert records(settings)["thumb_b"]["source"] == PULLED


async def test_other_weights_under_a_served_name_are_refused_and_the_other_models_still_served(
    tmp_path: Path, images: str, caplog: pytest.LogCaptureFixture
) -> None:
    models = model_folders(tmp_path)
    settings = make_settings(tmp_path / "data", models)
    visual = models / "thumb_b" / "visual.onnx"
    old_bytes, old = visual.read_bytes(), sha256(visual)
    async with running_service(settings) as svc:
        assert (await call(svc, "POST", "/models/thumb_b/add", {"url": f"{images}/img/identity/b.jpg"}))[0] == 204
    other_weights(models / "thumb_b")
    new = sha256(visual)
    assert new != old

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="idios"):
        async with running_service(settings) as svc:
            found = await listing(svc)
            reason = found["thumb_b"]["refused"]
            assert old[:12] in reason and new[:12] in reason and "immich-app/ViT-B-32__openai@0123abc" in reason
            assert str(models / "thumb_b") in reason
            assert found["thumb_b"]["identity"] == {"visual_sha256": new, "dim": 192}  # the files as found
            assert "engines" not in found["thumb_b"] and found["thumb_b"]["text"] is False
            # nothing embeds into the refused collection: no runtime, no batcher, no route
            assert "thumb_b" not in svc.backend.specs and "thumb_b" not in svc.backend.visual
            for method, path, body in (("POST", "/models/thumb_b/add", {"url": f"{images}/img/identity/c.jpg"}),
                                       ("POST", "/models/thumb_b/search", {"url": f"{images}/img/identity/b.jpg"}),
                                       ("POST", "/models/thumb_b/restore", []),
                                       ("POST", "/models/thumb_b/remove", {"url": f"{images}/img/identity/b.jpg"})):
                status, answer = await call(svc, method, path, body)
                assert status == 409 and answer["type"] == "model_refused", (path, status, answer)
                assert reason in answer["detail"]
            # its rows can still be read, to move them to a model of their own
            assert await call(svc, "GET", "/models/thumb_b/count") == (200, 1)
            assert await call(svc, "GET", "/models/thumb_b/urls") == (200, [f"{images}/img/identity/b.jpg"])
            status, rows = await call(svc, "GET", "/models/thumb_b/dump")
            assert status == 200 and len(rows) == 1 and len(rows[0]["embedding"]) == 192
            status, answer = await call(svc, "GET", "/models/nope/count")
            assert status == 404 and answer["models"] == ["thumb_grid"]
            # the other model of the same folder is served
            assert "refused" not in found["thumb_grid"] and found["thumb_grid"]["engines"]["visual"] is not None
            url = f"{images}/img/identity/grid.jpg"
            assert (await call(svc, "POST", "/models/thumb_grid/add", {"url": url}))[0] == 204
            assert await call(svc, "GET", "/models/thumb_grid/count") == (200, 1)
            # the client scripts say so in one line instead of sending to it
            moved = await script("bulk_ingest.py", "--from-model", "thumb_grid", "--model", "thumb_b",
                                 "--server", svc.url, "--no-state", "--failed", tmp_path / "f.jsonl")
            assert moved.rc == 2 and "'thumb_b' is not served" in moved.err and "Traceback" not in moved.err, moved
            # ...but a refused model's rows can be moved out of it, into one that is served
            moved = await script("bulk_ingest.py", "--from-model", "thumb_b", "--model", "thumb_grid",
                                 "--server", svc.url, "--no-state", "--failed", tmp_path / "f.jsonl")
            assert moved.rc == 0, moved.err
            assert await call(svc, "GET", "/models/thumb_grid/urls") == (200, sorted([
                url, f"{images}/img/identity/b.jpg"]))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "model thumb_b is not served" in errors[0], errors
    assert old[:12] in errors[0] and new[:12] in errors[0]
    assert records(settings)["thumb_b"]["visual_sha256"] == old  # a refusal changes nothing stored

    visual.write_bytes(old_bytes)  # the old weights back: served again, with what they stored
    set_manifest(models / "thumb_b")
    async with running_service(settings) as svc:
        assert "refused" not in (await listing(svc))["thumb_b"]
        assert await call(svc, "GET", "/models/thumb_b/count") == (200, 1)


async def test_a_collection_made_before_identities_gets_a_record_on_first_start(tmp_path: Path) -> None:
    models = model_folders(tmp_path)
    settings = make_settings(tmp_path / "data", models)
    settings.data_dir.mkdir(parents=True)
    client = MilvusClient(settings.milvus_target)  # as an older version left it: a collection, no record
    try:
        create_collection(client, "idios_thumb_b", 192, "FLAT", phash=False)
        row = np.zeros(192, dtype=np.float32)
        row[0] = 1.0
        client.insert("idios_thumb_b", [{"url": "http://old.test/a", "embedding": row, "metadata": {}}])
        assert not client.has_collection(IDENTITIES)
    finally:
        client.close()
    async with running_service(settings) as svc:
        found = await listing(svc)
        assert "refused" not in found["thumb_b"]
        assert await call(svc, "GET", "/models/thumb_b/count") == (200, 1)
    stored = records(settings)["thumb_b"]
    assert stored == {"model": "thumb_b", "dim": 192, "visual_sha256": sha256(models / "thumb_b" / "visual.onnx"),
                      "source": PULLED}


async def test_a_model_of_another_dimension_is_refused_not_a_crash(tmp_path: Path) -> None:
    """Under a name whose collection holds vectors of another length: with a record (other bytes, other dim)
    and without one (a collection of an older version); either way the other models start and are served."""
    models = model_folders(tmp_path)
    settings = make_settings(tmp_path / "data", models)
    async with running_service(settings) as svc:
        assert "refused" not in (await listing(svc))["thumb_b"]
    old = sha256(models / "thumb_b" / "visual.onnx")
    make_thumb_model.build(models / "thumb_b", name="thumb_b", dim=256)
    new = sha256(models / "thumb_b" / "visual.onnx")
    async with running_service(settings) as svc:
        found = await listing(svc)
        reason = found["thumb_b"]["refused"]
        assert old[:12] in reason and new[:12] in reason and "192-d" in reason and "256-d" in reason
        assert found["thumb_b"]["dim"] == 256 and found["thumb_b"]["identity"] == {"visual_sha256": new, "dim": 256}
        assert (await call(svc, "POST", "/models/thumb_b/search", {"url": "http://x.test/a.jpg"}))[0] == 409
        assert await call(svc, "GET", "/models/thumb_b/count") == (200, 0)  # read-only: the 192-d collection
        assert await call(svc, "GET", "/models/thumb_grid/count") == (200, 0)

    older = make_settings(tmp_path / "older", models)  # a 192-d collection without a record, 256-d files
    older.data_dir.mkdir(parents=True)
    client = MilvusClient(older.milvus_target)
    try:
        create_collection(client, "idios_thumb_b", 192, "FLAT")
    finally:
        client.close()
    async with running_service(older) as svc:
        found = await listing(svc)
        reason = found["thumb_b"]["refused"]
        assert "holds 192-d vectors" in reason and new[:12] in reason and "256-d" in reason
        assert (await call(svc, "POST", "/models/thumb_b/search", {"text": "red"}))[0] == 409
        assert "refused" not in found["thumb_grid"]
        assert await call(svc, "GET", "/models/thumb_grid/count") == (200, 0)
    assert "thumb_b" not in records(older)  # nothing is recorded for files that cannot fill the collection


async def test_weights_in_external_data_are_part_of_the_identity(tmp_path: Path) -> None:
    """A tower past protobuf's 2 GiB keeps its weights beside the .onnx (`visual.data`): other weights there
    with the same graph file are other weights, and refused."""
    from tests import hubrepos

    models = model_folders(tmp_path)
    folder = models / "thumb_b"
    (folder / "visual.onnx").unlink()
    model = make_thumb_model.visual_model()
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(512, dtype=np.float32), "unused_weight"))
    for rel, data in hubrepos.external(model.SerializeToString(), "v").items():
        (folder / rel.split("/", 1)[1]).write_bytes(data)
    (folder / "model.onnx").rename(folder / "visual.onnx")
    set_manifest(folder, visual={"file": "visual.onnx", "data": ["unused_weight"]})
    settings = make_settings(tmp_path / "data", models)
    async with running_service(settings) as svc:
        assert "refused" not in (await listing(svc))["thumb_b"]
    graph = sha256(folder / "visual.onnx")
    (folder / "unused_weight").write_bytes(np.full(512, 2, dtype=np.float32).tobytes())
    assert sha256(folder / "visual.onnx") == graph  # the graph file is unchanged
    async with running_service(settings) as svc:
        assert "refused" in (await listing(svc))["thumb_b"]
