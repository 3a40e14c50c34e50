"""The distributed deployment for tests: a Milvus server, the real RabbitMQ, worker processes, the API."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aio_pika
import aiohttp
import pytest
from aiohttp import web

from idios.api.app import create_app
from idios.api.backend import distributed_backend
from idios.settings import Settings
from tests.conftest import ROOT, Service, wait_for_ping

import bench_deploy  # noqa: E402  (scripts/, on sys.path through tests.conftest)
from bench_deploy import free_port, milvus_server  # noqa: E402,F401  (shared with the benchmark)

AMQP_URL = os.environ.get("IDIOS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def require_broker() -> None:
    """Skip (or, in CI, fail) when no RabbitMQ answers."""
    try:
        conn = await aio_pika.connect(AMQP_URL, timeout=5)
        await conn.close()
    except Exception as exc:
        reason = f"RabbitMQ is not reachable at {AMQP_URL}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def settings_for(milvus_uri: str, prefix: str, models: Path, data: Path, **kw: object) -> Settings:
    return Settings(amqp_url=AMQP_URL, milvus_uri=milvus_uri, queue_prefix=prefix, models_dir=models,
                    data_dir=data, allow_private_urls=True, health_port=0, drain_timeout=20,
                    **kw)  # type: ignore[arg-type]


def worker_env(settings: Settings, health_port: int = 0) -> dict[str, str]:
    """The environment that makes a `python -m idios` process use exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDIOS_")}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value is not None:
            env[f"IDIOS_{f.name.upper()}"] = str(int(value) if isinstance(value, bool) else value)
    env.update({"IDIOS_HEALTH_PORT": str(health_port), "PYTHONUNBUFFERED": "1"})
    return env


def start_worker(settings: Settings, log: Path, health_port: int = 0) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "idios", "worker"], cwd=ROOT, env=worker_env(settings, health_port),
            stdout=out, stderr=subprocess.STDOUT,
        )


def stop_worker(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -9
    return int(proc.returncode)


async def delete_queues(prefix: str) -> None:
    await bench_deploy.delete_queues(prefix, AMQP_URL)


@asynccontextmanager
async def api_service(settings: Settings) -> AsyncIterator[Service]:
    app = create_app(settings, distributed_backend)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as http:
            yield Service(f"http://127.0.0.1:{runner.addresses[0][1]}", app, http)
    finally:
        await runner.cleanup()


async def wait_for_workers(svc: Service, timeout: float = 60) -> None:
    """Until a job makes the round trip through the broker and a worker."""
    await wait_for_ping(svc.http, svc.url, timeout)


@asynccontextmanager
async def distributed(tmp: Path, models: Path, workers: int = 2, **kw: object) -> AsyncIterator[
        tuple[Service, Settings, list[subprocess.Popen[bytes]]]]:
    """A whole distributed deployment under a fresh queue prefix, torn down (queues included) afterwards."""
    await require_broker()
    prefix = f"idios-test-{uuid.uuid4().hex[:10]}"
    with milvus_server(tmp) as uri:
        settings = settings_for(uri, prefix, models, tmp, job_timeout=90, **kw)
        procs = [start_worker(settings, tmp / f"worker{i}.log") for i in range(workers)]
        try:
            async with api_service(settings) as svc:
                await wait_for_workers(svc)
                yield svc, settings, procs
        finally:
            for p in procs:
                stop_worker(p)
            await delete_queues(prefix)
