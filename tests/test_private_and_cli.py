"""Private addresses are refused by default; `python -m idios serve` runs the whole service as users start it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from idios.settings import Settings
from tests.conftest import ROOT, running_service, wait_for_ping
from tests.distributed import free_port


async def test_private_addresses_are_refused_by_default(tmp_path: Path, models_dir: Path, images: str) -> None:
    settings = Settings.from_env({}, data_dir=tmp_path, models_dir=models_dir)
    assert settings.allow_private_urls is False
    port = images.rsplit(":", 1)[1]
    async with running_service(settings) as svc:
        for url in (f"{images}/img/a.jpg", f"http://localhost:{port}/img/a.jpg", f"http://[::1]:{port}/img/a.jpg",
                    "http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/a.jpg"):
            async with svc.http.post(svc.model("thumb_grid") + "/add", json={"url": url}) as resp:
                body = await resp.json()
                assert resp.status == 422, url
                assert body["detail"][0]["type"] == "private_address", (url, body)
        async with svc.http.get(svc.model("thumb_grid") + "/count") as resp:
            assert await resp.json() == 0


@pytest.mark.timeout(120)
async def test_serve_command_end_to_end(tmp_path: Path, models_dir: Path, images: str) -> None:
    port = free_port()
    env = {**os.environ, "IDIOS_DATA_DIR": str(tmp_path / "data"), "IDIOS_MODELS_DIR": str(models_dir),
           "IDIOS_ALLOW_PRIVATE_URLS": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "idios", "serve", "--port", str(port), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            await wait_for_ping(http, base)
            url = f"{images}/img/cli.jpg"
            async with http.post(f"{base}/models/thumb_text/add", json={"url": url, "metadata": {"a": 1}}) as resp:
                assert resp.status == 204
            async with http.post(f"{base}/models/thumb_text/search", json={"url": url, "limit": 1}) as resp:
                hits = await resp.json()
                assert hits == [{"url": url, "metadata": {"a": 1}, "similarity": pytest.approx(100, abs=0.01)}]
            async with http.get(f"{base}/models/thumb_text/count") as resp:
                assert await resp.json() == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    assert b"Traceback" not in out, out.decode(errors="replace")[-2000:]


@pytest.mark.timeout(120)
async def test_sigterm_lets_the_request_in_flight_finish(tmp_path: Path, models_dir: Path) -> None:
    """SIGTERM while a restore body is still arriving: the request is read to its end and answered, the write is
    kept, and the process exits soon after. (With aiohttp's own shutdown the rest of the body was dropped and the
    process sat out its 60 s shutdown timeout before cutting the request off unanswered.)"""
    port = free_port()
    env = {**os.environ, "IDIOS_DATA_DIR": str(tmp_path / "data"), "IDIOS_MODELS_DIR": str(models_dir)}
    cmd = (sys.executable, "-m", "idios", "serve", "--port", str(port))
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    rows = [{"url": f"http://drain.test/{i:03d}", "metadata": {"i": i}, "embedding": [1.0] + [0.0] * 191}
            for i in range(200)]
    body = orjson.dumps(rows)
    half = len(body) // 2
    signalled = asyncio.Event()

    async def upload() -> AsyncIterator[bytes]:
        yield body[:half]
        proc.send_signal(signal.SIGTERM)
        signalled.set()
        await asyncio.sleep(1.5)  # the server is stopping while the rest is on its way
        yield body[half:]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        await wait_for_ping(http, base)
        start = asyncio.get_running_loop().time()
        async with http.post(f"{base}/models/thumb_grid/restore", data=upload(),
                             headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 204, await resp.text()
            assert resp.headers.get("Connection", "").lower() == "close"  # the next request goes elsewhere
        assert signalled.is_set()
        with pytest.raises(aiohttp.ClientConnectionError):  # no longer listening
            async with http.get(f"{base}/ping"):
                pass
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    took = asyncio.get_running_loop().time() - start
    assert proc.returncode == 0 and b"Traceback" not in out, out.decode(errors="replace")[-2000:]
    assert took < 20, f"stopping took {took:.1f} s"
    assert b"finishing 1 request(s) in flight" in out

    async with running_service(Settings.from_env({}, data_dir=tmp_path / "data", models_dir=models_dir)) as svc:
        async with svc.http.get(svc.model("thumb_grid") + "/count") as resp:
            assert await resp.json() == len(rows)
