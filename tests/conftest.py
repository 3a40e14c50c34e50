"""Fixtures: a real image server on loopback, real model folders, and the embedded service on a real port."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from idios.api.app import create_app
from idios.api.backend import BACKEND, Backend
from idios.composition import embedded_backend
from idios.settings import Settings
from tests.imagekit import image_server
from tests.servers import serving

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import make_thumb_model
from milvus_standalone import MilvusStandalone


def pytest_configure(config: pytest.Config) -> None:
    """No test reaches a model hub: `serve` pulls no default model, and huggingface_hub stays offline unless a
    test points it at its own stand-in hub (tests/hubserver.py). Processes the tests start inherit this."""
    os.environ["IDIOS_DEFAULT_MODEL"] = ""
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def milvus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusStandalone]:
    """The real Milvus server (2.3.5 standalone) the distributed tests share, started once per run and always
    stopped; each deployment keeps its collections in a database of its own (tests.distributed)."""
    server = MilvusStandalone(tmp_path_factory.mktemp("milvus-server"))
    server.start()
    try:
        yield server
    finally:
        # SIGKILL, not SIGTERM: its data is a temporary folder with nothing to keep, and with SIGTERM the last
        # test's teardown waited out stop()'s 30 s every time (30.0-30.5 s measured; 0.02 s now)
        server.kill()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed thumb_grid model plus thumb_text, the same with a toy text tower."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(ROOT / "models" / "thumb_grid", root / "thumb_grid")
    make_thumb_model.build(root / "thumb_text", name="thumb_text", text=True)
    return root


@pytest.fixture(scope="session")
async def images() -> AsyncIterator[str]:
    async with image_server() as base:
        yield base


@dataclass
class Service:
    url: str
    app: web.Application
    http: aiohttp.ClientSession

    @property
    def backend(self) -> Backend:
        return self.app[BACKEND]

    def model(self, name: str) -> str:
        return f"{self.url}/models/{name}"


@asynccontextmanager
async def running_service(settings: Settings) -> AsyncIterator[Service]:
    """The embedded service (API + worker + Milvus Lite) listening on a free loopback port."""
    app = create_app(settings, embedded_backend)
    async with serving(app) as url, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        yield Service(url, app, http)


def make_settings(tmp: Path, models: Path, **kw: object) -> Settings:
    return Settings(data_dir=tmp, models_dir=models, allow_private_urls=True, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="session", params=["embedded", "amqp"])
async def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> AsyncIterator[Service]:
    """The API under test: `embedded` (one process) and `amqp` (API + 2 worker processes over RabbitMQ)."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "embedded":
        async with running_service(make_settings(tmp, models_dir)) as svc:
            yield svc
    else:
        from tests.distributed import distributed

        async with distributed(tmp, models_dir, request.getfixturevalue("milvus"), workers=2) as (svc, _, _):
            yield svc


async def wait_for_ping(http: aiohttp.ClientSession, base: str, timeout: float = 60) -> None:
    """Until `base` answers /ping?rpc=1: the API is up and a job made the round trip through a worker."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            async with http.get(base + "/ping?rpc=1", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status == 200:
                    return
        except (aiohttp.ClientConnectionError, TimeoutError):
            pass  # not listening yet, or the ping waits in the queue until a worker is up
        await asyncio.sleep(0.2)
    raise AssertionError(f"{base} did not answer /ping?rpc=1 within {timeout:g} s")


@pytest.fixture
def uniq() -> str:
    """A fresh path segment so each test's URLs are its own in the shared collections."""
    return uuid.uuid4().hex[:12]
