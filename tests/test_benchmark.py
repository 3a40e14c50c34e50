"""scripts/benchmark.py in quick mode: every phase runs for real and reports every figure (speed is not judged)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.conftest import ROOT
from tests.distributed import MilvusStandalone, require_broker


def positive_numbers(figures: dict[str, object], where: str = "") -> list[str]:
    """Paths of every figure in a nested dict that is not a number > 0 (lists of numbers included)."""
    bad = []
    for key, value in figures.items():
        path = f"{where}.{key}"
        if isinstance(value, dict):
            bad += positive_numbers(value, path)
        elif isinstance(value, list):
            bad += [path for v in value if not isinstance(v, (int, float)) or v < 0]
        elif isinstance(value, bool) or isinstance(value, str):
            continue
        elif not isinstance(value, (int, float)) or value <= 0:
            bad.append(path)
    return bad


@pytest.mark.timeout(400)
async def test_quick_benchmark_reports_every_figure(models_dir: Path, tmp_path: Path,
                                                    milvus: MilvusStandalone) -> None:
    await require_broker()
    out = tmp_path / "bench.json"
    # thumb_text is thumb_grid with a toy text tower, so the text search figure is exercised too
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--models-dir", str(models_dir), "--model", "thumb_text",
         "--rows", "2000", "--images", "40", "--searches", "8", "--seconds", "1", "--json", str(out),
         "--set", "max_batch=8", "--milvus-uri", milvus.uri],
        cwd=ROOT, capture_output=True, text=True, timeout=380,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = orjson.loads(out.read_bytes())
    assert set(fig) >= {"meta", "ceiling", "decode_ms_per_image", "ingest", "search", "restore", "dump", "rss_mb",
                        "floors"}
    assert set(fig["ingest"]) == {"embedded", "amqp_1_worker"}
    for figures in fig["ingest"].values():
        assert set(figures) >= {"add_images_per_s", "add_bulk_images_per_s", "images_per_s", "ratio_to_ceiling",
                                "ceiling_images_per_s", "model_busy_fraction", "mean_embed_batch",
                                "milvus_write_fraction", "model_cpu_ms_per_image", "service_cpu_ms_per_image",
                                "harness_cpu_ms_per_image", "cpu_bound_on_ratio", "over_onnxruntime_fp32_ceiling",
                                "onnxruntime_fp32_ceiling_images_per_s", "decode_cpu_ms_per_image",
                                "rest_cpu_ms_per_image", "engine", "ceiling_before_images_per_s",
                                "ceiling_after_images_per_s"}
        assert figures["mean_embed_batch"] <= 8  # --set reached the services
    # every engine and precision this machine runs, measured side by side; the service's own first
    engines = {(f["engine"], f["precision"]) for f in fig["engines"].values()}
    assert ("onnxruntime", "fp32") in engines and fig["ceiling"] == fig["engines"]["service"]
    assert all("over_onnxruntime_fp32" in f for f in fig["engines"].values())
    assert "image_url_p50_over_model_and_search" in fig["search"]
    assert fig["meta"]["max_batch"] == 8 and fig["ceiling"]["batch"] == 8 and fig["meta"]["settings"] == {
        "max_batch": "8"}
    for kind in ("indexed_url", "image_url", "upload", "text"):
        assert set(fig["search"][kind]) == {"p50_ms", "p95_ms", "p99_ms", "n"}
    assert fig["restore"]["rows"] == 2000
    floors = fig["floors"]
    assert floors["rows"] == 2000 and floors["text_model"]["trimmed"] is True
    assert set(floors) >= {"insert_rows_per_s", "insert_parallel_rows_per_s", "upsert_rows_per_s",
                           "read_by_key_rows_per_s", "pk_lookup", "search_top10"}
    assert "over_bare_insert" in fig["restore"] and "over_bare_read" in fig["dump"]
    assert {"indexed_url_p50_over_bare_lookup_and_search", "text_p50_over_bare_text_and_search"} <= set(fig["search"])
    assert fig["dump"]["rows"] >= 2000 + 40  # the restored rows and the ingested images
    assert {"serve"} <= set(fig["rss_mb"]["embedded"]) and {"api", "worker"} <= set(fig["rss_mb"]["amqp"])
    for figures in fig["ingest"].values():  # a difference of two measurements, taken apart: any sign
        assert isinstance(figures.pop("rest_cpu_ms_per_image"), float)
    assert positive_numbers(fig) == []
    assert "ingest embedded / its engine's ceiling" in proc.stdout and "peak RSS amqp worker" in proc.stdout
    assert "restore / bare Milvus Lite" in proc.stdout and "/ bare onnxruntime fp32" in proc.stdout


@pytest.mark.timeout(300)
def test_duplicates_benchmark_finds_every_planted_group(tmp_path: Path) -> None:
    """scripts/bench_duplicates.py on Milvus Lite, small: the job runs over HTTP and every planted group comes
    back as planted (the figures at 100k rows are in the README)."""
    out = tmp_path / "dup.json"
    proc = subprocess.run([sys.executable, "scripts/bench_duplicates.py", "--rows", "3000", "--skip", "server",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = orjson.loads(out.read_bytes())["lite"]
    assert fig["quality"]["exact_groups"] == fig["quality"]["found_groups"] > 0, fig["quality"]
    assert fig["quality"]["pair_recall"] == fig["quality"]["pair_precision"] == 1.0
    assert fig["job"]["rows"] == 3000 and fig["job"]["wall_s"] > 0
    assert "job wall s" in proc.stdout


@pytest.mark.timeout(300)
def test_iiif_scripts_measure_against_the_reference_server() -> None:
    """scripts/measure_iiif.py and scripts/bench_iiif.py, small, against the reference IIIF server: every figure
    the README quotes comes out (the full runs' figures are in the README's IIIF section)."""
    measure = subprocess.run([sys.executable, "scripts/measure_iiif.py", "--factors", "1,4", "--rounds", "1"],
                             cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert measure.returncode == 0, measure.stderr[-3000:]
    rows = [line for line in measure.stdout.splitlines() if line.startswith("| thumb_grid |")]
    assert len(rows) == 2 and all(cell.count(" / ") == 2 for cell in rows), measure.stdout  # jpg, png x F=1, 4
    assert "| IIIF sized, default: jpg at 4x |" in measure.stdout and "| master file (plain url) |" in measure.stdout
    bench = subprocess.run([sys.executable, "scripts/bench_iiif.py", "--images", "8"], cwd=ROOT,
                           capture_output=True, text=True, timeout=280)
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert "| IIIF manifest (sized derivatives) | 4 |" in bench.stdout and "| plain master urls | 4 |" in bench.stdout


@pytest.mark.timeout(300)
def test_search_benchmark_reports_both_targets() -> None:
    """scripts/bench_search.py, small: the weighted-query ratios and the search_batch speed-up come out (the full
    run's figures are in the README's "Weighted and batch searches")."""
    proc = subprocess.run([sys.executable, "scripts/bench_search.py", "--rows", "2000", "--rounds", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| image urls", "| stored urls"))]
    assert len(rows) == 2 and all(float(line.rstrip(" |").rsplit("| ", 1)[1]) > 0 for line in rows), proc.stdout
    assert "search_batch" in proc.stdout and "x (target >= 5x)" in proc.stdout
