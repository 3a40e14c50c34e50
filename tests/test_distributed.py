"""The distributed deployment under faults: real RabbitMQ, worker processes, a shared Milvus server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest

from idios.amqp import AmqpBus
from idios.messages import BusJob, JobKind
from tests.conftest import ROOT, Service, wait_for_ping
from tests.distributed import (
    AMQP_URL,
    BrokerNode,
    MilvusStandalone,
    distributed,
    free_port,
    fresh_database,
    require_broker,
    settings_for,
    start_worker,
    stop_worker,
    worker_health,
    worker_env,
)

pytestmark = pytest.mark.timeout(240)


async def add(svc: Service, url: str) -> tuple[int, Any]:
    async with svc.http.post(svc.model("thumb_grid") + "/add", json={"url": url}) as resp:
        return resp.status, await resp.read()


async def stored(svc: Service, urls: list[str]) -> set[str]:
    return await svc.backend.store.existing("thumb_grid", urls)


async def test_sigkill_of_a_worker_mid_batch_loses_no_answered_write(
    tmp_path: Path, models_dir: Path, images: str, milvus: MilvusStandalone) -> None:
    async with distributed(tmp_path, models_dir, milvus, workers=2, health=True) as (svc, _, procs):
        logs = [tmp_path / f"worker{i}.log" for i in range(2)]
        async with asyncio.timeout(60):  # both consuming (a worker serves its health endpoint once it is)
            while True:
                try:
                    before = [await worker_health(svc.http, log) for log in logs]
                    break
                except (AssertionError, aiohttp.ClientError):
                    await asyncio.sleep(0.1)
        urls = [f"{images}/slow/kill/{uuid.uuid4().hex}.jpg?delay=3" for _ in range(30)]
        pending = [asyncio.create_task(add(svc, u)) for u in urls]
        async with asyncio.timeout(20):  # until both hold jobs, so the killed one dies with some unacked
            while min(held := [(await worker_health(svc.http, log))["holding"] for log in logs]) == 0:
                await asyncio.sleep(0.05)
        procs[0].send_signal(signal.SIGKILL)
        await asyncio.to_thread(procs[0].wait, 10)  # not on the loop that serves the API
        results = await asyncio.gather(*pending)
        statuses = [s for s, _ in results]
        # every request is answered: the dead worker's unacked messages were redelivered to the other one
        assert all(s == 204 or (s >= 500 and b'"type"' in body) for s, body in results), results
        answered = [u for u, s in zip(urls, statuses, strict=True) if s == 204]
        assert len(answered) == len(urls), statuses
        assert await stored(svc, answered) == set(answered)
        # the survivor did all the work, the killed worker's unacked jobs included
        after = await worker_health(svc.http, logs[1])
        assert after["handled"] - before[1]["handled"] == len(urls), (held, before, after)


async def test_sigterm_drains_held_jobs_and_exits_cleanly(tmp_path: Path, models_dir: Path, images: str, milvus: MilvusStandalone) -> None:
    async with distributed(tmp_path, models_dir, milvus, workers=1) as (svc, settings, procs):
        urls = [f"{images}/slow/term/{uuid.uuid4().hex}.jpg?delay=1" for _ in range(10)]
        pending = [asyncio.create_task(add(svc, u)) for u in urls]
        await asyncio.sleep(0.5)
        procs[0].send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(procs[0].wait, 30) == 0
        replacement = start_worker(settings, tmp_path / "replacement.log")
        try:
            results = await asyncio.gather(*pending)
        finally:
            stop_worker(replacement)
        assert [s for s, _ in results] == [204] * len(urls)
        assert await stored(svc, urls) == set(urls)
        log = (tmp_path / "worker0.log").read_text()
        assert "draining" in log and "worker stopped" in log and "Traceback" not in log


def close_connection(name: str) -> None:
    """Have the broker drop the connection that named itself `name` (as a broker restart would)."""
    out = subprocess.run(
        ["rabbitmqctl", "list_connections", "pid", "client_properties", "-q"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    for line in out.splitlines():
        pid, _, props = line.partition("\t")
        if f'{{"connection_name","{name}"}}' in props:
            subprocess.run(["rabbitmqctl", "close_connection", pid, "test: broker connection restart"],
                           check=True, capture_output=True, timeout=60)
            return
    raise AssertionError(f"no broker connection named {name}")


async def test_api_recovers_when_its_broker_connection_is_cut_under_load(
    tmp_path: Path, models_dir: Path, images: str, milvus: MilvusStandalone) -> None:
    async with distributed(tmp_path, models_dir, milvus, workers=1) as (svc, _, _):
        bus = svc.backend.bus
        assert isinstance(bus, AmqpBus)
        urls = [f"{images}/slow/cut/{uuid.uuid4().hex}.jpg?delay=0.5" for _ in range(20)]
        pending = [asyncio.create_task(add(svc, u)) for u in urls]
        await asyncio.sleep(0.3)
        await asyncio.to_thread(close_connection, bus.connection_name)
        more = [f"{images}/img/cut-after/{uuid.uuid4().hex}.jpg" for _ in range(5)]
        pending += [asyncio.create_task(add(svc, u)) for u in more]
        results = await asyncio.gather(*pending)
        assert [s for s, _ in results] == [204] * len(results)
        assert await stored(svc, urls + more) == set(urls + more)
        async with svc.http.get(svc.url + "/ping?rpc=1") as resp:
            assert resp.status == 200


async def raw_job(body: bytes, prefix: str, expect_dead: int) -> tuple[dict[str, Any], int]:
    """Publish a job by hand with a reply queue of our own; return the reply and the dead-letter count after."""
    conn = await aio_pika.connect(AMQP_URL, timeout=10)
    async with conn:
        channel = await conn.channel()
        replies = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(
            aio_pika.Message(body, correlation_id="raw", reply_to=replies.name), routing_key=f"{prefix}.jobs"
        )
        async with asyncio.timeout(60):
            async with replies.iterator() as it:
                async for message in it:
                    await message.ack()
                    reply = orjson.loads(message.body)
                    break
        for _ in range(50):
            dead = await channel.declare_queue(f"{prefix}.jobs.dead", durable=True, passive=True)
            if dead.declaration_result.message_count >= expect_dead:
                break
            await asyncio.sleep(0.1)
        return reply, dead.declaration_result.message_count


async def test_poison_and_failing_jobs_end_in_the_dead_letter_queue(
    tmp_path: Path, models_dir: Path, images: str, milvus: MilvusStandalone) -> None:
    async with distributed(tmp_path, models_dir, milvus, workers=1, max_attempts=2) as (svc, settings, _):
        reply, dead = await raw_job(b"\x00not json", settings.queue_prefix, expect_dead=1)
        assert reply["error"]["type"] == "worker_error" and "malformed job" in reply["error"]["message"]
        assert dead == 1
        # a job that fails inside the worker every time: retried max_attempts times, then dead-lettered
        bad = BusJob(JobKind.RESTORE, "thumb_grid", rows=[{"url": "http://x.test/no-embedding"}])
        reply, dead = await raw_job(orjson.dumps(bad.to_wire()), settings.queue_prefix, expect_dead=2)
        assert reply["error"]["type"] == "worker_error" and reply["error"]["status"] == 500
        assert dead == 2
        worker_log = (tmp_path / "worker0.log").read_text()
        assert "attempt 1 failed" in worker_log and "failed 2 times; dead-lettered" in worker_log
        assert "retrying in 1.0 s" in worker_log  # through the broker's retry queue, which exists:
        async with await aio_pika.connect(settings.amqp_url) as conn:
            await (await conn.channel()).declare_queue(f"{settings.queue_prefix}.jobs.retry", passive=True)
        # the service is still fine
        assert (await add(svc, f"{images}/img/after-poison.jpg"))[0] == 204


async def test_api_command_and_worker_health(tmp_path: Path, models_dir: Path, images: str, milvus: MilvusStandalone) -> None:
    await require_broker()
    prefix = f"idios-test-{uuid.uuid4().hex[:10]}"
    with fresh_database(milvus.uri) as db:
        # a toy model runs in microseconds, so give images time to meet in the batcher
        settings = settings_for((milvus.uri, db), prefix, models_dir, tmp_path, max_wait_ms=300)
        health_port, api_port = free_port(), free_port()
        worker = start_worker(settings, tmp_path / "worker.log", health_port=health_port)
        env = {**worker_env(settings), "IDIOS_PORT": str(api_port)}
        with (tmp_path / "api.log").open("ab") as log:
            api = subprocess.Popen([sys.executable, "-m", "idios", "api"], cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{api_port}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                await wait_for_ping(http, base)
                urls = [f"{images}/img/health/{i}.jpg" for i in range(32)]
                statuses = await asyncio.gather(*(
                    _status(http.post(f"{base}/models/thumb_grid/add", json={"url": u})) for u in urls
                ))
                assert statuses == [204] * len(urls)
                async with http.get(f"http://127.0.0.1:{health_port}/health") as resp:
                    health = await resp.json()
                assert resp.status == 200 and health["status"] == "ok" and health["broker"] and health["milvus"]
                embed = health["embed"]["thumb_grid"]
                assert embed["images"] == len(urls)
                # many requests, few model runs: the worker batches across requests
                assert embed["batches"] < len(urls) / 2, embed
                # the worker says what runs its visual towers; the API runs none, only text towers
                assert embed["engine"] in ("openvino", "onnxruntime") and embed["precision"] in ("fp32", "bf16")
                async with http.get(f"{base}/models") as resp:
                    engines = {m["name"]: m["engines"] for m in await resp.json()}
                assert engines["thumb_grid"] == {"visual": None, "text": None}
                assert engines["thumb_text"]["visual"] is None and engines["thumb_text"]["text"]["engine"] in (
                    "openvino", "onnxruntime")
        finally:
            api.send_signal(signal.SIGTERM)
            api_rc = await asyncio.to_thread(api.wait, 30)
            worker_rc = stop_worker(worker)
            from tests.distributed import delete_queues

            await delete_queues(prefix)
        assert api_rc == 0 and worker_rc == 0, (tmp_path / "api.log").read_text()[-2000:]


async def _status(request: Any) -> int:
    async with request as resp:
        return int(resp.status)


def test_api_refuses_to_start_without_a_broker_or_a_milvus_server(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDIOS_")}
    for cmd, extra in (("api", {}), ("worker", {"IDIOS_AMQP_URL": AMQP_URL})):
        out = subprocess.run([sys.executable, "-m", "idios", cmd], cwd=ROOT, env={**env, **extra},
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert "IDIOS_AMQP_URL" in out.stderr or "IDIOS_MILVUS_URI" in out.stderr
        assert "Traceback" not in out.stderr


async def test_broker_restarted_under_load_loses_no_answered_write_and_everyone_reconnects(
        tmp_path: Path, models_dir: Path, images: str, milvus: MilvusStandalone) -> None:
    """A RabbitMQ node of the test's own, stopped and started again while jobs are in flight: every url answered
    as added is stored, every request is answered, and the API and both workers reconnect by themselves."""
    await require_broker()
    node = BrokerNode()
    await node.start()
    try:
        async with distributed(tmp_path, models_dir, milvus, workers=2, amqp_url=node.url) as (svc, settings, _):
            tag = uuid.uuid4().hex[:8]
            urls = [f"{images}/slow/brk-{tag}-{i}.jpg?delay=1" for i in range(40)]
            pending = [asyncio.create_task(add(svc, u)) for u in urls]
            await asyncio.sleep(1.5)  # jobs are on the queue and in the workers' hands
            await asyncio.to_thread(node.stop)
            await node.start()
            results = await asyncio.gather(*pending)
            assert all(s == 204 or (s >= 500 and b'"type"' in body) for s, body in results), results
            answered = [u for u, (s, _) in zip(urls, results, strict=True) if s == 204]
            assert await stored(svc, answered) == set(answered)
            # everyone is back: fresh adds through the same API are answered, and both workers consume again
            after = [f"{images}/img/brk-after-{tag}-{i}.jpg" for i in range(8)]
            assert [s for s, _ in await asyncio.gather(*(add(svc, u) for u in after))] == [204] * len(after)
            deadline = time.monotonic() + 60  # aio-pika retries every 5 s
            while f"{settings.queue_prefix}.jobs\t2" not in (consumers := node.rabbitmqctl(
                    "list_queues", "name", "consumers", "-q")):
                assert time.monotonic() < deadline, consumers
                await asyncio.sleep(1)
            print(f"broker restart: {len(answered)} of {len(urls)} in-flight adds answered 204, all stored")
    finally:
        await asyncio.to_thread(node.close)
