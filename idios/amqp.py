"""The job bus over RabbitMQ (aio-pika): queue topology, and the API side's request/reply client."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from idios import errors
from idios.messages import BusJob, JobResult
from idios.settings import Settings

log = logging.getLogger(__name__)

ATTEMPT_HEADER = "x-idios-attempt"
PUBLISH_RETRY_DELAY = 0.2
# How long a job that failed transiently waits in the retry queue before it is back in the job queue. The
# broker keeps the time (a queue TTL that dead-letters into the job queue), so a waiting job holds no worker's
# prefetch slot. A queue argument like DELIVERY_LIMIT, so a constant.
RETRY_DELAY_MS = 1000
# Deliveries of one message (worker crashes included) before the broker dead-letters it. A queue argument:
# every process must declare the same value, so it is a constant, not a setting.
DELIVERY_LIMIT = 10


@dataclass(frozen=True)
class Topology:
    """Queue names under one prefix, so deployments (and test runs) never touch each other's queues."""

    prefix: str

    @property
    def jobs(self) -> str:
        return f"{self.prefix}.jobs"

    @property
    def dead(self) -> str:
        return f"{self.prefix}.jobs.dead"

    @property
    def retry(self) -> str:
        return f"{self.prefix}.jobs.retry"

    def reply(self) -> str:
        return f"{self.prefix}.reply.{uuid.uuid4().hex}"

    async def declare(self, channel: AbstractChannel) -> AbstractQueue:
        """Declare the dead-letter queue, the retry queue and the durable job queue (idempotent)."""
        await channel.declare_queue(self.dead, durable=True)
        await channel.declare_queue(self.retry, durable=True, arguments={
            "x-message-ttl": RETRY_DELAY_MS, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": self.jobs})
        return await channel.declare_queue(
            self.jobs,
            durable=True,
            arguments={
                # a quorum queue counts deliveries: a message that keeps killing workers is dead-lettered too
                "x-queue-type": "quorum",
                "x-delivery-limit": DELIVERY_LIMIT,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.dead,
            },
        )


async def connect(settings: Settings, name: str) -> AbstractRobustConnection:
    """A connection that reconnects by itself and names itself in the broker's connection list."""
    assert settings.amqp_url, "IDIOS_AMQP_URL is not set"
    return await aio_pika.connect_robust(
        settings.amqp_url, timeout=10, client_properties={"connection_name": name}
    )


def job_message(job: BusJob, correlation_id: str, reply_to: str, attempt: int = 1) -> aio_pika.Message:
    return aio_pika.Message(
        orjson.dumps(job.to_wire(), option=orjson.OPT_SERIALIZE_NUMPY),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=correlation_id,
        reply_to=reply_to,
        headers={ATTEMPT_HEADER: attempt},
    )


class AmqpBus:
    """Request/reply over RabbitMQ: publish with confirms, one reply queue per API process, futures
    completed by correlation id, and a per-request timeout (504)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._topology = Topology(settings.queue_prefix)
        self._pending: dict[str, asyncio.Future[JobResult]] = {}
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._reply_queue = self._topology.reply()
        self.connection_name = f"idios-api-{self._reply_queue.rsplit('.', 1)[-1][:12]}"

    async def __aenter__(self) -> AmqpBus:
        self._connection = await connect(self._settings, self.connection_name)
        self._channel = await self._connection.channel(publisher_confirms=True)
        await self._topology.declare(self._channel)
        # Not exclusive: the queue outlives a broker blip (replies wait in it), and x-expires removes it
        # a minute after this process is gone.
        queue = await self._channel.declare_queue(self._reply_queue, arguments={"x-expires": 60_000})
        await queue.consume(self._on_reply, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(errors.Unavailable("The API is shutting down"))
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        fut = self._pending.get(message.correlation_id or "")
        if fut is None or fut.done():
            return  # a late or duplicate reply (the job was redelivered); its caller has its answer
        try:
            fut.set_result(JobResult.from_wire(orjson.loads(message.body)))
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            fut.set_exception(errors.WorkerFailure(f"unreadable reply from a worker: {exc}"))

    async def request(self, job: BusJob) -> JobResult:
        cid = uuid.uuid4().hex
        fut: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        try:
            async with asyncio.timeout(self._settings.job_timeout):
                await self._publish(job_message(job, cid, self._reply_queue))
                return await fut
        except TimeoutError:
            raise errors.JobTimeout(
                f"No worker answered within {self._settings.job_timeout:g} s; are workers running?"
            ) from None
        finally:
            self._pending.pop(cid, None)

    async def _publish(self, message: aio_pika.Message) -> None:
        """Publish with a broker confirm, retrying while the robust connection reconnects (within the job's
        timeout); any other failure, a refusal by the broker included, is answered at once."""
        while True:
            try:
                assert self._channel is not None
                await self._channel.default_exchange.publish(message, routing_key=self._topology.jobs)
                return
            except Exception as exc:
                if not connection_lost(exc):
                    raise errors.Unavailable(f"the broker refused the job: {exc.__class__.__name__}: {exc}") from exc
                log.warning("publish failed (%s: %s); retrying", exc.__class__.__name__, exc)
                await asyncio.sleep(PUBLISH_RETRY_DELAY)

    async def queue_depth(self) -> int | None:
        """Jobs waiting in the queue, where the broker tells."""
        if self._channel is None:
            return None
        queue = await self._channel.declare_queue(self._topology.jobs, passive=True)
        return queue.declaration_result.message_count


def connection_lost(exc: BaseException) -> bool:
    """The connection or channel is gone (the robust connection is reconnecting), as opposed to a refusal."""
    if isinstance(exc, (ConnectionError, aiormq.exceptions.AMQPConnectionError,
                        aiormq.exceptions.ChannelInvalidStateError, aio_pika.exceptions.ChannelClosed)):
        return True
    return isinstance(exc, RuntimeError) and "closed" in str(exc).lower()

