"""The distributed deployment for tests: a Milvus server, the real RabbitMQ, worker processes, the API."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from idios.api.app import create_app
from idios.composition import distributed_backend
from idios.settings import Settings
from tests.conftest import ROOT, Service, wait_for_ping
from tests.servers import serving

import bench_deploy  # noqa: E402  (scripts/, on sys.path through tests.conftest)
from bench_deploy import fresh_database, free_port  # noqa: E402,F401  (shared with the benchmark)
from milvus_standalone import MilvusStandalone  # noqa: E402

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


def settings_for(milvus: tuple[str, str], prefix: str, models: Path, data: Path, **kw: object) -> Settings:
    """`milvus`: the server's URI and the database this deployment keeps its collections in."""
    uri, db = milvus
    base: dict[str, object] = {"amqp_url": AMQP_URL, "milvus_uri": uri, "milvus_db": db, "queue_prefix": prefix,
                               "models_dir": models, "data_dir": data, "allow_private_urls": True, "health_port": 0,
                               "drain_timeout": 20}
    return Settings(**(base | kw))  # type: ignore[arg-type]


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


class BrokerNode:
    """A RabbitMQ node of the test's own (the machine's `rabbitmq-server`, its own name, ports, config and
    data folder), so a test can stop and start a broker without touching the one on 5672."""

    def __init__(self) -> None:
        # rabbitmq-server drops to the rabbitmq user when started as root: its folder must be one that user can
        # reach, so not under pytest's private basetemp. close() removes it.
        folder = self.folder = Path(tempfile.mkdtemp(prefix="idios-rabbit-"))
        folder.chmod(0o777)
        self.port, self.dist_port = free_port(), free_port()
        self.name = f"idios-{uuid.uuid4().hex[:8]}@localhost"
        self._proc: subprocess.Popen[bytes] | None = None
        (folder / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (folder / "enabled_plugins").write_text("[].\n")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        return {**os.environ, "RABBITMQ_NODENAME": self.name, "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq.conf"),
                "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"), "RABBITMQ_LOG_BASE": str(self.folder / "log"),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins")}

    async def start(self, timeout: float = 90) -> None:
        with (self.folder / "server.log").open("ab") as out:
            self._proc = subprocess.Popen(["rabbitmq-server"], env=self._env(), stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                # the port first, with a plain socket: an AMQP connection that fails half-way leaves an
                # aio_pika Connection whose __del__, if it runs after this loop is gone, warns "coroutine
                # 'Connection.close' was never awaited" into whichever test is running then
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 3)
                writer.close()
                conn = await aio_pika.connect(self.url, timeout=3)
                await conn.close()
                return
            except Exception:
                gc.collect()  # such a half-made connection is closed now, on this loop
                if self._proc.poll() is not None or asyncio.get_running_loop().time() > deadline:
                    self.stop()
                    raise RuntimeError(f"the test's RabbitMQ node did not start; see {self.folder}") from None
                await asyncio.sleep(0.5)

    def rabbitmqctl(self, *args: str) -> str:
        return subprocess.run(["rabbitmqctl", "-n", self.name, *args], env=self._env(), capture_output=True,
                              text=True, timeout=60).stdout

    def stop(self, timeout: float = 60) -> None:
        """A clean broker stop (as a restart does); the process group is killed if it outlives `timeout`."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self.rabbitmqctl("stop")
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@asynccontextmanager
async def start_api(settings: Settings, log: Path) -> AsyncIterator[str]:
    """A second API process (`python -m idios api`) of the same deployment; yields its base URL once it answers
    a round trip through a worker, and stops it afterwards."""
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "idios", "api"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**worker_env(settings), "IDIOS_PORT": str(port)})
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            await wait_for_ping(http, base, timeout=120)
        yield base
    finally:
        stop_worker(proc)


async def delete_queues(prefix: str, amqp_url: str = AMQP_URL) -> None:
    await bench_deploy.delete_queues(prefix, amqp_url)


@asynccontextmanager
async def api_service(settings: Settings) -> AsyncIterator[Service]:
    app = create_app(settings, distributed_backend)
    async with serving(app) as url, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as http:
        yield Service(url, app, http)


async def wait_for_workers(svc: Service, timeout: float = 60) -> None:
    """Until a job makes the round trip through the broker and a worker."""
    await wait_for_ping(svc.http, svc.url, timeout)


@asynccontextmanager
async def distributed(tmp: Path, models: Path, milvus: MilvusStandalone, workers: int = 2, health: bool = False,
                      **kw: object) -> AsyncIterator[tuple[Service, Settings, list[subprocess.Popen[bytes]]]]:
    """A whole distributed deployment on the suite's Milvus server, in a database and under a queue prefix of
    its own, torn down (queues and database included) afterwards. With `health`, each worker serves its health
    endpoint (worker_health finds it)."""
    await require_broker()
    prefix = f"idios-test-{uuid.uuid4().hex[:10]}"
    with fresh_database(milvus.uri) as db:
        settings = settings_for((milvus.uri, db), prefix, models, tmp, job_timeout=90, **kw)
        procs = [start_worker(settings, tmp / f"worker{i}.log", health_port=free_port() if health else 0)
                 for i in range(workers)]
        try:
            async with api_service(settings) as svc:
                if workers:
                    await wait_for_workers(svc)
                yield svc, settings, procs
        finally:
            for p in procs:
                stop_worker(p)
            await delete_queues(prefix, settings.amqp_url or AMQP_URL)


async def worker_health(http: aiohttp.ClientSession, log: Path) -> dict[str, Any]:
    """The health answer of the worker that writes `log` (its health URL is in its "worker ready" line)."""
    match = re.search(r"health (http://\S+/health)", log.read_text())
    assert match, f"no health URL in {log}"
    async with http.get(match.group(1)) as resp:
        return dict(await resp.json())
