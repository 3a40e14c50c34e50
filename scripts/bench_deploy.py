"""What benchmark.py runs against: a pool of pre-encoded JPEGs on a loopback server, the service as real
subprocesses (embedded `serve`, or `api` + `worker` over RabbitMQ on a Milvus server), peak RSS."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from PIL import Image

from milvus_standalone import free_port  # noqa: F401  (one helper, re-exported for tests and benchmark)

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("IDIOS_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
POOL = web.AppKey("pool", list)


def photo_like(seed: int, size: tuple[int, int] = (1000, 750)) -> bytes:
    """A distinct ~1000-px JPEG: smooth random colour fields plus grain, so it compresses like a photo."""
    rnd = np.random.default_rng(seed)
    coarse = Image.fromarray(rnd.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    grain = rnd.normal(0, 12, (size[1], size[0], 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def jpeg_pool(count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct JPEGs, encoded before any timing starts."""
    return [photo_like(seed + i) for i in range(count)]


async def _serve_pool(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    return web.Response(body=pool[int(request.match_info["i"]) % len(pool)], content_type="image/jpeg")


@asynccontextmanager
async def image_server(pool: list[bytes]) -> AsyncIterator[str]:
    """Serve /img/{i}/{anything}.jpg = pool[i]; the tail makes every URL distinct. Yields the base URL."""
    app = web.Application()
    app[POOL] = pool
    app.router.add_get("/img/{i:\\d+}/{tail:.+}", _serve_pool)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def status_mb(pid: int, field: str) -> float:
    """A kB field of a live process's /proc status, in MB (10^6 bytes); 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return 0.0


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the most memory the process has held, file pages it maps included."""
    return status_mb(pid, "VmHWM")


def private_rss_mb(pid: int) -> float:
    """RssAnon now: private memory, without the file pages it maps (OpenVINO's cache, libraries), which the
    kernel can drop and other processes share."""
    return status_mb(pid, "RssAnon")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used, all its threads; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (Milvus Lite runs its engine as a child process)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            found += [kid, *children(kid)]
    return found


@dataclass
class Deployment:
    """A running service: its base URL, and the processes whose peak RSS is reported, by role."""

    url: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    metrics_url: str = ""  # where the worker's Prometheus metrics are (batch sizes and times per stage)
    milvus_db: str = ""  # the database on the Milvus server (distributed deployments)

    def cpu(self) -> float:
        """CPU seconds used so far by every process of the deployment, children (Milvus Lite) included."""
        return sum(cpu_seconds(pid) for p in self.procs.values() for pid in (p.pid, *children(p.pid)))

    def rss(self) -> dict[str, float]:
        out = {role: peak_rss_mb(p.pid) for role, p in self.procs.items()}
        out |= {f"{role} private now": private_rss_mb(p.pid) for role, p in self.procs.items()}
        for role, p in self.procs.items():
            kids = sum(peak_rss_mb(k) for k in children(p.pid))
            if kids:
                out[f"{role}_children"] = kids
        return out


def service_env(**settings: object) -> dict[str, str]:
    """This environment without IDIOS_* variables, plus the given settings as IDIOS_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDIOS_")}
    env.update({f"IDIOS_{k.upper()}": str(v) for k, v in settings.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start(command: str, log: Path, **settings: object) -> subprocess.Popen[bytes]:
    """`python -m idios COMMAND` with these settings, output to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "idios", command], cwd=ROOT, env=service_env(**settings),
                                stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_ready(url: str, procs: list[subprocess.Popen[bytes]], path: str, timeout: float = 180) -> None:
    """Until GET url+path answers 200; fail early when a process died."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while time.monotonic() < deadline:
            dead = [p.args for p in procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"service process exited early: {dead}")
            try:
                async with http.get(url + path) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.3)
    raise RuntimeError(f"{url}{path} did not answer within {timeout} s")


COMMON = {"allow_private_urls": 1, "health_port": 0, "log_level": "WARNING"}


@asynccontextmanager
async def embedded(models: Path, tmp: Path, **extra: object) -> AsyncIterator[Deployment]:
    """`python -m idios serve`: API + worker + Milvus Lite in one process."""
    port = free_port()
    # one OpenVINO cache for both deployments: serve compiles cold, the workers started after it read it back
    proc = start("serve", tmp / "serve.log", port=port, data_dir=tmp / "embedded", models_dir=models,
                 **(COMMON | {"openvino_cache": tmp / "openvino-cache"} | extra))
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_ready(url, [proc], "/ping")
        yield Deployment(url, {"serve": proc}, url + "/metrics")
    finally:
        stop(proc)


@contextmanager
def fresh_database(uri: str) -> Iterator[str]:
    """A new database on the Milvus server at `uri`, dropped with its collections afterwards: deployments
    sharing one server (one per machine) never see each other's rows."""
    from pymilvus import MilvusClient

    name = f"idios_{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        try:
            client = MilvusClient(uri, timeout=30)
            if name in client.list_databases():
                inside = MilvusClient(uri, timeout=30, db_name=name)
                for collection in inside.list_collections():
                    inside.drop_collection(collection)
                inside.close()
                client.drop_database(name)
            client.close()
        except Exception as exc:  # the server may be down after a fault test; it is stopped anyway
            print(f"could not drop Milvus database {name}: {exc}", file=sys.stderr)


async def delete_queues(prefix: str, amqp_url: str = AMQP_URL) -> None:
    import aio_pika

    conn = await aio_pika.connect(amqp_url, timeout=5)
    async with conn:
        channel = await conn.channel()
        for name in (f"{prefix}.jobs", f"{prefix}.jobs.dead", f"{prefix}.jobs.retry"):
            await channel.queue_delete(name)


@asynccontextmanager
async def distributed(models: Path, tmp: Path, milvus_uri: str, workers: int = 1, **extra: object
                      ) -> AsyncIterator[Deployment]:
    """`python -m idios api` + `worker` processes over the real RabbitMQ, under a fresh queue prefix that is
    deleted afterwards, on the Milvus server at `milvus_uri` in a fresh database, dropped afterwards."""
    prefix = f"idios-bench-{uuid.uuid4().hex[:10]}"
    with fresh_database(milvus_uri) as db:
        settings = dict(COMMON | {"openvino_cache": tmp / "openvino-cache"} | extra, amqp_url=AMQP_URL,
                        milvus_uri=milvus_uri, milvus_db=db, queue_prefix=prefix, models_dir=models,
                        data_dir=tmp / "distributed")
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            health = free_port()
            for i in range(workers):
                role, extra = (f"worker{i}", {}) if workers > 1 else ("worker", {"health_port": health})
                procs[role] = start("worker", tmp / f"worker{i}.log", **(settings | extra))
            port = free_port()
            procs["api"] = start("api", tmp / "api.log", port=port, **settings)
            url = f"http://127.0.0.1:{port}"
            await wait_ready(url, list(procs.values()), "/ping?rpc=1")
            yield Deployment(url, procs, f"http://127.0.0.1:{health}/metrics" if workers == 1 else "", db)
        finally:
            for proc in procs.values():
                stop(proc)
            await delete_queues(prefix)


def figure_table(fig: dict[str, Any], kinds: list[str], name_width: int,
                 cell_width: int) -> tuple[list[str], Callable[[str, Callable[[Any], Any]], None]]:
    """A printed table of figures, a column per deployment in `kinds`: its lines (the header so far) and
    `row(name, get)`, which adds the line of `get(fig[kind])` for each kind ("-" where a figure is missing)."""
    lines = [f"{'':{name_width}}" + "".join(f"{k:>{cell_width}}" for k in kinds)]

    def row(name: str, get: Callable[[Any], Any]) -> None:
        cells = []
        for k in kinds:
            try:
                cells.append(f"{get(fig[k]):>{cell_width}}")
            except (KeyError, TypeError):
                cells.append(f"{'-':>{cell_width}}")
        lines.append(f"{name:{name_width}}" + "".join(cells))

    return lines, row
