"""Engines: the rule that picks engine and precision per tower, the real OpenVINO and onnxruntime towers on
the same files, what the service reports, and the fidelity measurement that `auto` trusts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from idios.embed import TextEncoder
from idios.engines import BF16_MIN_COSINE, Machine, TowerWeights, check_names, plan
from idios.engines.onnxruntime import CPU, OrtTower
from idios.engines.openvino import OpenVinoTower, cpu_capabilities
from idios.models import load_manifest
from tests.conftest import ROOT, make_settings, running_service
from tests.imagekit import encode, picture

CUDA = "CUDAExecutionProvider"
BF16_CPU = Machine(frozenset({"FP32", "BF16", "INT8"}), (CPU,))
PLAIN_CPU = Machine(frozenset({"FP32", "INT8"}), (CPU,))
NO_OPENVINO = Machine(None, (CPU,))
FLOAT = TowerWeights(Path("visual.onnx"), bf16_min_cosine=0.99995)
CAPS = cpu_capabilities()
HAS_BF16 = CAPS is not None and "BF16" in CAPS


def test_auto_runs_bf16_only_where_the_cpu_has_it_and_the_model_held_it() -> None:
    assert plan(FLOAT, "auto", "auto", BF16_CPU).runs == ("openvino", "bf16")
    low = TowerWeights(Path("v.onnx"), bf16_min_cosine=0.998)
    chosen = plan(low, "auto", "auto", BF16_CPU)
    assert chosen.runs == ("openvino", "fp32") and "0.99800" in chosen.reason and chosen.warning is None
    never = plan(TowerWeights(Path("v.onnx")), "auto", "auto", BF16_CPU)
    assert never.runs == ("openvino", "fp32") and "python -m idios fidelity" in never.reason
    assert plan(FLOAT, "auto", "auto", PLAIN_CPU).runs == ("openvino", "fp32")
    assert plan(FLOAT, "auto", "auto", NO_OPENVINO).runs == ("onnxruntime", "fp32")


def test_what_was_asked_for_wins_and_what_cannot_run_is_warned_about() -> None:
    assert plan(FLOAT, "onnxruntime", "auto", BF16_CPU).runs == ("onnxruntime", "fp32")
    assert plan(FLOAT, "openvino", "fp32", BF16_CPU).runs == ("openvino", "fp32")
    low = TowerWeights(Path("v.onnx"), bf16_min_cosine=0.99)
    forced = plan(low, "auto", "bf16", BF16_CPU)
    assert forced.runs == ("openvino", "bf16") and "0.99000" in (forced.warning or "")
    no_bf16 = plan(FLOAT, "auto", "bf16", PLAIN_CPU)
    assert no_bf16.runs == ("openvino", "fp32") and "no bf16" in (no_bf16.warning or "")
    ort_bf16 = plan(FLOAT, "onnxruntime", "bf16", BF16_CPU)
    assert ort_bf16.runs == ("onnxruntime", "fp32") and "run fp32" in (ort_bf16.warning or "")
    missing = plan(FLOAT, "openvino", "auto", NO_OPENVINO)
    assert missing.runs == ("onnxruntime", "fp32") and "not available" in (missing.warning or "")
    float_int8 = plan(FLOAT, "auto", "int8", BF16_CPU)
    assert float_int8.runs == ("openvino", "bf16") and "--int8-static" in (float_int8.warning or "")


def test_a_gpu_provider_keeps_onnxruntime_and_int8_files_keep_their_engine() -> None:
    gpu = Machine(frozenset({"BF16"}), (CUDA, CPU))
    assert plan(FLOAT, "auto", "auto", gpu).runs == ("onnxruntime", "fp32")
    assert CUDA in plan(FLOAT, "auto", "auto", gpu).reason
    dynamic = TowerWeights(Path("v.onnx"), "int8", "onnxruntime")
    assert plan(dynamic, "auto", "auto", BF16_CPU).runs == ("onnxruntime", "int8")
    static = TowerWeights(Path("v.xml"), "int8", "openvino")
    assert plan(static, "auto", "fp32", BF16_CPU).runs == ("openvino", "int8")
    assert "int8" in (plan(static, "auto", "fp32", BF16_CPU).warning or "")
    with pytest.raises(ValueError, match="onnxruntime cannot run it"):
        plan(static, "onnxruntime", "auto", BF16_CPU)


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="IDIOS_ENGINE='tensorflow'"):
        check_names("tensorflow", "auto")
    with pytest.raises(ValueError, match="IDIOS_PRECISION='fp16'"):
        check_names("auto", "fp16")


def _batch(spec_dir: Path, n: int) -> np.ndarray:
    from idios.decode import DecodeLimits, preprocess

    spec = load_manifest(spec_dir)
    return np.stack([preprocess(encode(picture(f"engine-{i}")), spec, DecodeLimits()) for i in range(n)])


@pytest.mark.skipif(CAPS is None, reason="OpenVINO cannot run on this machine")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_and_onnxruntime_agree_on_the_same_file(models_dir: Path, precision: str) -> None:
    """Same ONNX file, both engines, every batch size the batcher makes: unit vectors within 0.999."""
    path = models_dir / "thumb_text" / "visual.onnx"
    ov, ort = OpenVinoTower(path, 2, precision), OrtTower(path, 2)
    x = _batch(models_dir / "thumb_text", 16)
    for n in (1, 3, 16):
        a, b = ov.run(x[:n]), ort.run(x[:n])
        assert a.shape == (n, 192) and a.dtype == np.float32
        assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
        assert (a * b).sum(axis=1).min() >= BF16_MIN_COSINE
    spec = load_manifest(models_dir / "thumb_text")
    assert spec.text is not None
    texts = ["red", "green blue", "a red and yellow picture with black"]
    ov_text = TextEncoder(spec.text, OpenVinoTower(spec.text.file, 1, precision))
    ort_text = TextEncoder(spec.text, OrtTower(spec.text.file, 1))
    assert ((ov_text.run(texts) * ort_text.run(texts)).sum(axis=1) >= BF16_MIN_COSINE).all()


@pytest.mark.skipif(CAPS is None, reason="OpenVINO cannot run on this machine")
async def test_the_service_says_what_runs_each_tower(tmp_path: Path, models_dir: Path) -> None:
    async with running_service(make_settings(tmp_path, models_dir)) as svc:
        async with svc.http.get(f"{svc.url}/models") as resp:
            models = {m["name"]: m["engines"] for m in await resp.json()}
        async with svc.http.get(f"{svc.url}/metrics") as resp:
            metrics = await resp.text()
    # thumb_grid's manifest records its bf16 fidelity (1.0); thumb_text was never measured: fp32
    grid = {"engine": "openvino", "precision": "bf16" if HAS_BF16 else "fp32", "device": "CPU"}
    assert models["thumb_grid"] == {"visual": grid, "text": None}
    fp32 = {"engine": "openvino", "precision": "fp32", "device": "CPU"}
    assert models["thumb_text"] == {"visual": fp32, "text": fp32}
    line = ('idios_model_engine{device="CPU",engine="openvino",model="thumb_grid",precision="%s",tower="visual"} 1.0'
            % grid["precision"])
    assert line in metrics
    async with running_service(make_settings(tmp_path / "ort", models_dir, engine="onnxruntime")) as svc:
        async with svc.http.get(f"{svc.url}/models") as resp:
            engines = {m["name"]: m["engines"]["visual"] for m in await resp.json()}
    assert engines["thumb_grid"] == {"engine": "onnxruntime", "precision": "fp32", "device": CPU}


@pytest.mark.parametrize("flag, message", [("--engine=torch", "IDIOS_ENGINE='torch': use one of auto, onnxruntime"),
                                           ("--precision=fp16", "IDIOS_PRECISION='fp16': use one of auto")])
def test_the_cli_refuses_an_unknown_engine_or_precision_in_one_line(tmp_path: Path, flag: str, message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "idios", "serve", flag, "--data-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(CAPS is None, reason="OpenVINO cannot run on this machine")
def test_fidelity_is_measured_recorded_and_trusted(tmp_path: Path, models_dir: Path) -> None:
    folder = tmp_path / "thumb_text"
    shutil.copytree(models_dir / "thumb_text", folder)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(encode(picture(f"fidelity-{i}")))
    cmd = [sys.executable, "-m", "idios", "fidelity", str(folder), "--images", str(photos)]
    few = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert few.returncode == 2 and few.stderr.strip() == "error: measure on at least 8 real photos (got 3)"
    for i in range(3, 10):
        (photos / f"{i}.jpg").write_bytes(encode(picture(f"fidelity-{i}")))
    (photos / "notes.txt").write_text("not a photo")
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    recorded = json.loads((folder / "manifest.json").read_text())["fidelity"]["bf16"]
    assert json.loads(done.stdout)["bf16"] == recorded
    assert recorded["visual"]["items"] == 10 and recorded["text"]["items"] >= 3  # the toy tower knows colour words only
    assert 0.999 <= recorded["visual"]["min_cosine"] <= 1 and 0.999 <= recorded["text"]["min_cosine"] <= 1
    spec = load_manifest(folder)
    machine = Machine(frozenset(CAPS or ()), (CPU,))
    expected = "bf16" if HAS_BF16 else "fp32"
    assert plan(spec.tower_weights("visual"), "auto", "auto", machine).precision == expected
    assert plan(spec.tower_weights("text"), "auto", "auto", machine).precision == expected


@pytest.mark.skipif(CAPS is None, reason="OpenVINO cannot run on this machine")
def test_the_openvino_cache_is_written_reused_and_never_stale(tmp_path: Path, models_dir: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    path, cache = tmp_path / "visual.onnx", tmp_path / "cache"
    shutil.copyfile(models_dir / "thumb_text" / "visual.onnx", path)
    x = _batch(models_dir / "thumb_text", 4)
    first = OpenVinoTower(path, 1, "fp32", cache).run(x)
    (entry,) = cache.iterdir()  # the process's own compiling folder is gone
    blobs = {f.name: f.stat().st_mtime_ns for f in entry.iterdir()}
    assert len(blobs) == 1 and next(iter(blobs)).endswith(".blob")
    assert np.allclose(OpenVinoTower(path, 1, "fp32", cache).run(x), first, atol=1e-6)  # read back
    assert list(cache.iterdir()) == [entry]
    assert {f.name: f.stat().st_mtime_ns for f in entry.iterdir()} == blobs  # found, not written again
    path.write_bytes(path.read_bytes())  # the same name, a new file: never served from the old entry
    OpenVinoTower(path, 1, "fp32", cache).run(x)
    assert len(list(cache.iterdir())) == 2
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level("WARNING", logger="idios.engines.openvino"):
        assert np.allclose(OpenVinoTower(path, 1, "fp32", blocker).run(x), first, atol=1e-6)
    assert "unusable" in caplog.text and "compiled visual.onnx without it" in caplog.text


def det_model(folder: Path) -> Path:
    """A model folder whose tower uses Det, which onnxruntime runs and OpenVINO 2026.4 cannot convert."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir()
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 224, 224])
    y = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph([helper.make_node("Det", ["image"], ["embedding"])], "det", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              folder / "visual.onnx")
    manifest = {"name": "det", "dim": 3, "image_size": 224, "resize": "squash", "mean": [0.5] * 3,
                "std": [0.5] * 3, "visual": {"file": "visual.onnx"}, "precision": "fp32"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.skipif(CAPS is None, reason="OpenVINO cannot run on this machine")
def test_a_file_openvino_cannot_compile_runs_on_onnxruntime_under_auto(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    from idios.embed import load_tower
    from idios.engines import detect_machine
    from idios.metrics import Metrics
    from idios.settings import Settings

    spec = load_manifest(det_model(tmp_path / "det"))
    machine = detect_machine("cpu")
    with caplog.at_level("WARNING", logger="idios.embed"):
        tower = load_tower(spec, "visual", Settings(data_dir=tmp_path), machine, Metrics())
    assert (tower.engine, tower.precision) == ("onnxruntime", "fp32")
    assert "OpenVINO cannot run it" in caplog.text and "Det" in caplog.text
    x = np.tile(np.eye(224, dtype=np.float32), (2, 3, 1, 1))
    x[:, 1, 0] *= 2  # determinants 1, 2, 3 per channel
    x[:, 2, 0] *= 3
    assert np.allclose(tower.run(x), np.array([1, 2, 3]) / np.sqrt(14), atol=1e-5)
    with pytest.raises(Exception, match="Det"):  # asked for by name: no quiet fallback
        load_tower(spec, "visual", Settings(data_dir=tmp_path, engine="openvino"), machine, Metrics())


CACHE_USER = """
import sys
from pathlib import Path
import numpy as np
from idios.engines.openvino import OpenVinoTower
x = np.load(sys.argv[3])
np.save(sys.argv[4], OpenVinoTower(Path(sys.argv[1]), 1, "bf16", Path(sys.argv[2])).run(x))
"""


@pytest.mark.skipif(CAPS is None, reason="OpenVINO cannot run on this machine")
def test_processes_starting_together_on_a_cold_cache_all_run_right(tmp_path: Path, models_dir: Path) -> None:
    """Two workers on one machine start at once on an empty cache: none may read another's half-written blob
    (seen in a CI-style run: a worker's first batch failed in OpenVINO's Reshape)."""
    path = models_dir / "thumb_text" / "visual.onnx"
    x = _batch(models_dir / "thumb_text", 3)
    np.save(tmp_path / "x.npy", x)
    want = OpenVinoTower(path, 1, "bf16").run(x)
    for attempt in range(3):
        cache = tmp_path / f"cache{attempt}"
        procs = [subprocess.Popen([sys.executable, "-c", CACHE_USER, str(path), str(cache), str(tmp_path / "x.npy"),
                                   str(tmp_path / f"out{attempt}-{i}.npy")], cwd=ROOT, stderr=subprocess.PIPE)
                 for i in range(4)]
        try:
            errors = [p.communicate(timeout=120)[1].decode() for p in procs]
        finally:
            for p in procs:
                p.kill()
        assert [p.returncode for p in procs] == [0] * 4, errors
        for i in range(4):
            assert np.allclose(np.load(tmp_path / f"out{attempt}-{i}.npy"), want, atol=1e-6)
        assert all(not f.name.startswith(".compiling-") for f in cache.iterdir())
