"""`python -m idios pull` against a stand-in hub on loopback (tests/hubserver.py) speaking huggingface_hub's
protocol: both layouts, what it refuses, how it fails, and `serve`'s first run."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest

from idios.decode import DecodeLimits, preprocess
from idios.models import load_manifest
from tests import hubrepos
from tests.conftest import ROOT, make_settings, make_thumb_model, running_service, wait_for_ping
from tests.distributed import free_port
from tests.hubserver import FakeHub, Repo, fake_hub
from tests.imagekit import jpeg, plain

VIT = "immich-app/ViT-B-32__openai"
XLM = "immich-app/XLM-Roberta-Large-Vit-B-32"
COLOURS = {"red": (230, 20, 20), "green": (20, 200, 30), "blue": (20, 30, 220), "yellow": (230, 220, 20),
           "grey": (128, 128, 128)}


def hub_env(hub_url: str, tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a pull: this hub, a cache of the test's own, online (conftest makes the rest offline)."""
    env = {**os.environ, "HF_ENDPOINT": hub_url, "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", **extra}
    env.pop("HF_TOKEN", None)
    return env | extra


async def pull(env: dict[str, str], models: Path, *args: str, timeout: float = 120) -> tuple[int, str, str]:
    """`python -m idios pull ARGS --models-dir MODELS` to the end: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "idios", "pull", *args, "--models-dir", str(models), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:  # a pull still running when the test fails is killed
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def error_line(err: str) -> str:
    """The one line a failed pull prints (huggingface_hub's progress bars aside)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_onnx(data: bytes | str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The source file's own output (its bytes, or its path when it has external data), one item at a time."""
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    out = session.run(None, feeds)[0]
    return np.asarray(out[0], dtype=np.float32)


def immich_tokens(files: dict[str, bytes], text: str, mask: bool) -> dict[str, np.ndarray]:
    """Token ids as Immich's ML service makes them for this repo: its tokenizer.json, padded to the context
    with the tokenizer config's pad token, int32."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(files["textual/tokenizer.json"].decode())
    pad = json.loads(files["textual/tokenizer_config.json"])["pad_token"]
    pad = pad["content"] if isinstance(pad, dict) else pad
    tok.enable_padding(length=hubrepos.CONTEXT, pad_token=pad, pad_id=tok.token_to_id(pad))
    tok.enable_truncation(max_length=hubrepos.CONTEXT)
    enc = tok.encode(" ".join(text.split()))
    if mask:
        return {"input_ids": np.array([enc.ids], dtype=np.int32),
                "attention_mask": np.array([enc.attention_mask], dtype=np.int32)}
    return {"text": np.array([enc.ids], dtype=np.int32)}


@asynccontextmanager
async def served(tmp: Path, models: Path, images: str) -> AsyncIterator[Any]:
    """The embedded service on `models`, onnxruntime fp32 (the engine the source files' outputs come from)."""
    async with running_service(make_settings(tmp / "data", models, engine="onnxruntime")) as svc:
        yield svc


async def add_colours(svc: Any, model: str, images: str) -> dict[str, str]:
    urls = {name: f"{images}/colour/{r},{g},{b}" for name, (r, g, b) in COLOURS.items()}
    async with svc.http.post(svc.model(model) + "/add_bulk", json=[{"url": u} for u in urls.values()]) as resp:
        assert resp.status == 200, await resp.text()
    return urls


async def stored_embeddings(svc: Any, model: str) -> dict[str, np.ndarray]:
    async with svc.http.get(svc.model(model) + "/dump", params={"limit": "100"}) as resp:
        assert resp.status == 200
        return {r["url"]: np.asarray(r["embedding"], dtype=np.float32) for r in await resp.json()}


async def search_text(svc: Any, model: str, text: str) -> list[dict[str, Any]]:
    async with svc.http.post(svc.model(model) + "/search", json={"text": text, "limit": 3}) as resp:
        assert resp.status == 200, await resp.text()
        hits: list[dict[str, Any]] = await resp.json()
        return hits


def visual_of(files: dict[str, bytes], colour: tuple[int, int, int], spec: Any) -> np.ndarray:
    tensor = preprocess(plain(colour), spec, DecodeLimits())
    return run_onnx(files["visual/model.onnx"], {"image": tensor[None]})


@pytest.mark.timeout(240)
async def test_pull_of_an_immich_export_serves_what_its_onnx_files_compute(tmp_path: Path, images: str) -> None:
    files = hubrepos.immich_clip()
    async with fake_hub({VIT: Repo(files)}) as hub:
        models = tmp_path / "models"
        rc, out, err = await pull(hub_env(hub.url, tmp_path), models, "vit_b32")
        assert rc == 0, err
        assert out.startswith(f"pulled {VIT}@") and out.count("\n") == 1, out
        assert not any("armnn" in line or "README" in line for line in hub.log if line.startswith("GET /immich")), hub.log
    manifest = json.loads((models / "vit_b32/manifest.json").read_text())
    commit = hub.repos[VIT].commit
    assert manifest["source"] == {"repo": VIT, "revision": commit, "layout": "immich"}
    assert manifest["sha256"] == {rel: sha256(files[rel]) for rel in
                                  ("visual/model.onnx", "textual/model.onnx", "textual/tokenizer.json")}
    assert manifest["text"]["pad_id"] == hubrepos.vocab()["<|endoftext|>"] != 0 and manifest["text"]["clean"] == "lower"
    assert leftovers(models) == ["vit_b32"]
    spec = load_manifest(models / "vit_b32")

    async with served(tmp_path, models, images) as svc:
        urls = await add_colours(svc, "vit_b32", images)  # five at once: the batch-1 tower runs them one by one
        stored = await stored_embeddings(svc, "vit_b32")
        for name, url in urls.items():
            assert np.allclose(stored[url], visual_of(files, COLOURS[name], spec), atol=1e-6), name
        hits = await search_text(svc, "vit_b32", "  RED  ")
        want = run_onnx(files["textual/model.onnx"], immich_tokens(files, "red", mask=False))
        assert hits[0]["url"] == urls["red"]
        assert hits[0]["similarity"] == pytest.approx(100 * float(want @ stored[urls["red"]]), abs=1e-3)
        async with svc.http.get(svc.url + "/models") as resp:
            listed = {m["name"]: m for m in await resp.json()}
        assert listed["vit_b32"]["text"] is True


@pytest.mark.timeout(240)
async def test_pull_of_a_multilingual_mclip_export_feeds_the_mask_and_keeps_case(tmp_path: Path, images: str) -> None:
    files = hubrepos.immich_mclip()
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(8):
        (photos / f"{i}.jpg").write_bytes(jpeg(f"fidelity-{i}"))
    async with fake_hub({XLM: Repo(files)}) as hub:
        models = tmp_path / "models"
        rc, out, err = await pull(hub_env(hub.url, tmp_path), models, "xlm_b32", "--fidelity-images", str(photos))
        assert rc == 0, err
    manifest = json.loads((models / "xlm_b32/manifest.json").read_text())
    assert manifest["text"]["clean"] == "none" and manifest["text"]["pad_id"] == 1
    # the text tower's weights are files of their own beside model.onnx: fetched, linked, hashed; the
    # tokenizer's other form is not a weight
    weights = sorted(rel for rel in files if rel.startswith("textual/") and "." not in rel.split("/")[1])
    assert weights and manifest["text"]["data"] == weights
    assert set(weights) <= set(manifest["sha256"]) and "textual/sentencepiece.bpe.model" not in manifest["sha256"]
    assert not (models / "xlm_b32/textual/sentencepiece.bpe.model").exists()
    # measured after the pull (both towers, the text one fed its mask): auto may then run it in bf16
    bf16 = manifest["fidelity"]["bf16"]
    assert bf16["visual"]["items"] == 8 and bf16["text"]["items"] > 0 and bf16["text"]["min_cosine"] > 0.99
    async with served(tmp_path, models, images) as svc:
        urls = await add_colours(svc, "xlm_b32", images)
        stored = await stored_embeddings(svc, "xlm_b32")
        for text, colour in (("red", "red"), ("Red", "green"), ("a blue", "blue")):
            hits = await search_text(svc, "xlm_b32", text)
            want = run_onnx(str(models / "xlm_b32/textual/model.onnx"), immich_tokens(files, text, mask=True))
            assert hits[0]["url"] == urls[colour], (text, hits)
            assert hits[0]["similarity"] == pytest.approx(100 * float(want @ stored[urls[colour]]), abs=1e-3), text


@pytest.mark.parametrize("clean, query, colour", [("canonicalize", "RED!!", "red"), (None, "Red", "green")])
async def test_pull_of_a_byte_input_siglip_like_export(tmp_path: Path, images: str, clean: str | None, query: str,
                                                       colour: str) -> None:
    """Immich's newest layout: the visual tower takes uint8 [batch, S, S, 3] and normalises itself; a Hugging
    Face tokenizer keeps case, and open_clip's config says the clean-up (`canonicalize`, else `whitespace`)."""
    files = hubrepos.immich_siglip(clean)
    async with fake_hub({"immich-app/ViT-B-16-SigLIP__webli": Repo(files)}) as hub:
        models = tmp_path / "models"
        rc, out, err = await pull(hub_env(hub.url, tmp_path), models, "immich-app/ViT-B-16-SigLIP__webli",
                                  "--name", "siglip")
        assert rc == 0, err
    manifest = json.loads((models / "siglip/manifest.json").read_text())
    assert manifest["visual"]["pixels"] == "uint8" and manifest["resize"] == "squash"
    assert manifest["text"]["clean"] == (clean or "whitespace") and manifest["text"]["context_length"] == 64
    spec = load_manifest(models / "siglip")
    tensor = preprocess(plain(COLOURS["red"]), spec, DecodeLimits())
    assert tensor.dtype == np.uint8 and tensor.shape == (224, 224, 3) and (tensor[0, 0] == COLOURS["red"]).all()
    async with served(tmp_path, models, images) as svc:
        urls = await add_colours(svc, "siglip", images)
        stored = await stored_embeddings(svc, "siglip")
        for name, url in urls.items():
            want = run_onnx(files["visual/model.onnx"], {"image": preprocess(plain(COLOURS[name]), spec,
                                                                              DecodeLimits())[None]})
            assert np.allclose(stored[url], want, atol=1e-6), name
        hits = await search_text(svc, "siglip", query)
        assert hits[0]["url"] == urls[colour], (query, hits)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


async def test_pull_of_an_idios_layout_repo_and_a_tampered_one(tmp_path: Path) -> None:
    files = folder_files(make_thumb_model.build(tmp_path / "built", name="thumb_text", text=True))
    tampered = dict(files, **{"text.onnx": files["text.onnx"] + b"\0"})
    async with fake_hub({"museum/thumb-text": Repo(files), "museum/tampered": Repo(tampered)}) as hub:
        models, env = tmp_path / "models", hub_env(hub.url, tmp_path)
        rc, out, err = await pull(env, models, "museum/thumb-text")
        assert rc == 0, err
        assert "museum/thumb-text" in out and "idios layout" in out
        folder = models / "thumb_text"  # the name the repo's name gives
        towers = {rel: data for rel, data in files.items() if rel != "manifest.json"}
        assert {rel: (folder / rel).read_bytes() for rel in towers} == towers
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["name"] == "thumb_text" and manifest["source"]["layout"] == "idios"
        assert manifest["sha256"] == {rel: sha256(files[rel]) for rel in ("visual.onnx", "text.onnx", "tokenizer.json")}

        rc, _, err = await pull(env, models, "museum/tampered", "--name", "other")
        assert rc == 2 and "text.onnx does not match the sha256" in error_line(err)
        assert leftovers(models) == ["thumb_text"]


@pytest.mark.parametrize("change, says", [
    ({"preprocess": {**hubrepos.PREPROCESS, "resize_mode": "longest"}}, "resize_mode 'longest'"),
    ({"preprocess": {**hubrepos.PREPROCESS, "interpolation": "lanczos"}}, "interpolation 'lanczos'"),
    ({"preprocess": {**hubrepos.PREPROCESS, "size": [224, 256]}}, "only square"),
    ({"dim": 512}, "makes 192-d embeddings"),
    ({"pad_token": "<pad>"}, "pad token '<pad>' of textual/tokenizer_config.json is not in"),
])
async def test_pull_refuses_in_one_line_what_it_cannot_serve_exactly(tmp_path: Path, change: dict[str, Any],
                                                                     says: str) -> None:
    async with fake_hub({"someone/odd-clip": Repo(hubrepos.immich_clip(**change))}) as hub:
        models = tmp_path / "models"
        rc, _, err = await pull(hub_env(hub.url, tmp_path), models, "someone/odd-clip")
    assert rc == 2
    assert says in error_line(err)
    assert leftovers(models) == []


async def test_pull_failures_are_one_line_and_the_cache_serves_offline(tmp_path: Path) -> None:
    private = Repo(hubrepos.immich_clip(), token="hf_secret")
    async with fake_hub({VIT: Repo(hubrepos.immich_clip()), "museum/private-clip": private}) as hub:
        models, env = tmp_path / "models", hub_env(hub.url, tmp_path)
        rc, _, err = await pull(env, models, "museum/no-such-repo")
        assert rc == 1 and "no model repo museum/no-such-repo" in error_line(err)
        rc, _, err = await pull(env, models, "vit_b32", "--revision", "v9")
        assert rc == 1 and "has no revision 'v9'" in error_line(err)
        rc, _, err = await pull(env, models, "museum/private-clip")
        assert rc == 1 and "a private one needs HF_TOKEN" in error_line(err)
        rc, _, err = await pull(env | {"HF_TOKEN": "hf_secret"}, models, "museum/private-clip")
        assert rc == 0, err
        rc, _, err = await pull(env, models, "not a repo")
        assert rc == 2 and "neither a short name" in error_line(err)
        rc, _, err = await pull(env, models, "vit_b32", "--name", "Bad-Name")
        assert rc == 2 and "must match" in error_line(err)

        rc, out, err = await pull(env | {"HF_HUB_OFFLINE": "1"}, models, "vit_b32")
        assert rc == 1 and "HF_HUB_OFFLINE is set and the cache holds no copy" in error_line(err)
        rc, out, err = await pull(env, models, "vit_b32")
        assert rc == 0, err
        rc, out, err = await pull(env, models, "vit_b32")
        assert rc == 0 and "already holds" in out
        rc, _, err = await pull(env | {"HF_TOKEN": "hf_secret"}, models, "museum/private-clip", "--name", "vit_b32")
        assert rc == 2 and "already holds immich-app/ViT-B-32__openai@" in error_line(err)
    # the hub is gone: huggingface_hub's cache still has every file, and a second copy comes from it
    closed = f"http://127.0.0.1:{free_port()}"
    rc, out, err = await pull(hub_env(closed, tmp_path, HF_HUB_OFFLINE="1"), models, "vit_b32", "--name", "again")
    assert rc == 0, err
    assert (models / "again/visual/model.onnx").read_bytes() == (models / "vit_b32/visual/model.onnx").read_bytes()
    rc, _, err = await pull(hub_env(closed, tmp_path), models, "xlm_b32")
    assert rc == 1 and "cannot reach the hub" in error_line(err)
    # a models folder that cannot be written (here: under a file): one line, from the cache as well
    (tmp_path / "a-file").write_text("")
    rc, _, err = await pull(hub_env(closed, tmp_path, HF_HUB_OFFLINE="1"), tmp_path / "a-file" / "models", "vit_b32")
    assert rc == 1 and "cannot write into" in error_line(err)
    assert leftovers(models) == ["again", "private_clip", "vit_b32"]


async def start_serve(env: dict[str, str], port: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "idios", "serve", "--port", str(port), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )


async def listed_models(env: dict[str, str]) -> tuple[list[str], str]:
    """`serve` started on `env` until it answers: the models it lists, and what it printed."""
    port = free_port()
    proc = await start_serve(env, port)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            await wait_for_ping(http, f"http://127.0.0.1:{port}", timeout=90)
            async with http.get(f"http://127.0.0.1:{port}/models") as resp:
                names = sorted(m["name"] for m in await resp.json() if not m.get("refused"))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
        finally:  # one that does not stop on SIGTERM is killed, and the test fails below
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    return names, out.decode(errors="replace")


@pytest.mark.timeout(240)
async def test_serve_pulls_the_default_clip_model_on_first_run_or_says_how(tmp_path: Path, models_dir: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "thumb_grid").symlink_to(models_dir / "thumb_grid", target_is_directory=True)
    closed = f"http://127.0.0.1:{free_port()}"
    base = {"IDIOS_DATA_DIR": str(tmp_path / "data"), "IDIOS_MODELS_DIR": str(models)}

    env = hub_env(closed, tmp_path, **base)
    env.pop("IDIOS_DEFAULT_MODEL", None)  # as a user runs it: the default applies
    names, out = await listed_models(env)
    assert names == ["thumb_grid"]
    assert out.count("python -m idios pull vit_b32") == 1, out
    assert "Traceback" not in out

    async with fake_hub({VIT: Repo(hubrepos.immich_clip())}) as hub:
        names, out = await listed_models(env | {"HF_ENDPOINT": hub.url, "IDIOS_DEFAULT_MODEL": ""})
        assert names == ["thumb_grid"] and not hub.log  # empty: never
        names, out = await listed_models(env | {"HF_ENDPOINT": hub.url})
        assert names == ["thumb_grid", "vit_b32"], out
        assert any(line.startswith("GET /api/models/" + VIT) for line in hub.log)
        count = len(hub.log)
        names, out = await listed_models(env | {"HF_ENDPOINT": hub.url})  # a CLIP model is there: no pull
        assert names == ["thumb_grid", "vit_b32"] and len(hub.log) == count
        (tmp_path / "a-file").write_text("")
        names, out = await listed_models(env | {"HF_ENDPOINT": hub.url,
                                                "IDIOS_MODELS_DIR": str(tmp_path / "a-file" / "models")})
        assert names == [] and "cannot write into" in out and "Traceback" not in out


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_a_fixed_batch_runs_in_pieces_and_the_ids_are_cast(tmp_path: Path, engine: str) -> None:
    from idios.engines.onnxruntime import OrtTower
    from idios.engines.openvino import OpenVinoTower

    path = tmp_path / "mclip_text.onnx"
    path.write_bytes(hubrepos.text_mclip(hubrepos.vocab(case=True)))
    tower = OrtTower(path, 1) if engine == "onnxruntime" else OpenVinoTower(path, 1, "fp32")
    assert tower.feed.batch == 1 and tower.feed.dtypes == (np.int32, np.int32)
    ids = np.random.default_rng(1).integers(0, 8, (5, hubrepos.CONTEXT))  # int64, as the tokenizer gives them
    mask = np.ones_like(ids)
    mask[:, 10:] = 0
    together = tower.run(ids, mask)
    one_by_one = np.concatenate([tower.run(ids[i:i + 1], mask[i:i + 1]) for i in range(5)])
    assert together.shape == (5, 192) and np.allclose(together, one_by_one, atol=1e-6)
    assert not np.allclose(tower.run(ids), together, atol=1e-3)  # no mask given: all ones, the padding counts


def test_a_hub_stand_in_repo_round_trips(tmp_path: Path) -> None:
    """The stand-in's commit is a function of the files: changing a file gives a new revision."""
    a, b = Repo({"x": b"1"}), Repo({"x": b"2"})
    assert a.commit != b.commit and len(a.commit) == 40
    assert FakeHub({"o/a": a}).repos["o/a"] is a
