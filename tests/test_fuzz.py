"""The API fuzzed against its own OpenAPI document: schemathesis drives a live `python -m idios serve`."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ROOT, wait_for_ping
from tests.distributed import free_port

# Every answer, errors included, must be one the document declares (status, content type, body schema,
# headers), no request may get a 5xx, and a method a path does not take gets a 405 with Allow. Whether the
# document is strict enough to predict every 422 (a url's host, an image's contents) is not checked.
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "response_headers_conformance,unsupported_method")


@pytest.mark.timeout(300)
async def test_every_answer_matches_the_openapi_document(tmp_path: Path, models_dir: Path) -> None:
    port = free_port()
    # Images only from loopback (IDIOS_FETCH_HOSTS): any other host in a generated url is refused before a
    # DNS lookup, so the fuzzer's urls never leave this machine.
    env = {**os.environ, "IDIOS_DATA_DIR": str(tmp_path / "data"), "IDIOS_MODELS_DIR": str(models_dir),
           "IDIOS_ALLOW_PRIVATE_URLS": "1", "IDIOS_FETCH_HOSTS": "127.0.0.1", "IDIOS_FETCH_TIMEOUT": "5"}
    log = (tmp_path / "serve.log").open("wb")
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "idios", "serve", "--port", str(port), cwd=ROOT, env=env, stdout=log,
        stderr=asyncio.subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            await wait_for_ping(http, base)
        fuzz = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "schemathesis"), "run", f"{base}/openapi.json", "--checks", CHECKS,
            "--phases", "examples,coverage,fuzzing", "--max-examples", "40", "--seed", "4213", "--workers", "1",
            "--generation-database", "none", "--request-timeout", "30",
            cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1"})
        out, _ = await asyncio.wait_for(fuzz.communicate(), 240)
    finally:
        serve.send_signal(signal.SIGTERM)
        await asyncio.wait_for(serve.wait(), 30)
        log.close()
    report = out.decode(errors="replace")
    assert fuzz.returncode == 0, report[-8000:]
    assert " passed" in report and "generated" in report, report[-2000:]
    served = (tmp_path / "serve.log").read_text(errors="replace")
    # aiohttp's own parser logs the requests it refuses itself (a NUL in a header) with a traceback; anything
    # else that logged one is a bug of ours
    ours = [block for block in served.split("Traceback")[1:] if "idios/" in block]
    assert not ours, ours[0][:3000]
