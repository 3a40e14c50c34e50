"""The worker side of the RabbitMQ bus: consume jobs, run them through the JobHandler, reply, then ack."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from idios import errors
from idios.amqp import ATTEMPT_HEADER, RETRY_DELAY_MS, Topology, connect, connection_lost
from idios.messages import BusJob, JobResult
from idios.settings import Settings
from idios.worker import JobHandler

log = logging.getLogger(__name__)



class JobConsumer:
    """Consumes the job queue with a prefetch sized to the batchers, so one worker fills its model batches
    from many requests. A message is acked only after its write is in Milvus and its reply is published; a
    worker that dies leaves its messages unacked, and the broker hands them to another worker."""

    def __init__(self, settings: Settings, handler: JobHandler) -> None:
        self._settings = settings
        self._handler = handler
        self._topology = Topology(settings.queue_prefix)
        self._tasks: set[asyncio.Task[None]] = set()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self.handled = 0

    async def __aenter__(self) -> JobConsumer:
        self._connection = await connect(self._settings, "idios-worker")
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=self._settings.worker_prefetch)
        self._queue = await self._topology.declare(self._channel)
        self._consumer_tag = await self._queue.consume(self._on_message)
        log.info("consuming %s with prefetch %d", self._topology.jobs, self._settings.worker_prefetch)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drain()

    @property
    def holding(self) -> int:
        """Jobs this worker has taken from the queue and not yet acked."""
        return len(self._tasks)

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed

    async def drain(self) -> None:
        """Stop consuming, finish what is held within drain_timeout, then close (unfinished jobs are requeued)."""
        if self._queue is not None and self._consumer_tag is not None:
            try:
                await self._queue.cancel(self._consumer_tag)
            except Exception as exc:  # the broker may already be gone
                log.warning("cancelling the consumer failed: %s", exc)
            self._consumer_tag = None
        if self._tasks:
            log.info("draining %d jobs (up to %.0f s)", len(self._tasks), self._settings.drain_timeout)
            done, pending = await asyncio.wait(self._tasks, timeout=self._settings.drain_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self._process(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        """One message, guarded: no failure here is left as an unobserved task exception."""
        try:
            await self._run(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if connection_lost(exc) or isinstance(exc, aiormq.exceptions.AMQPError):
                # The broker went away between the job's write and its reply or ack. The write stands; the
                # broker hands the unacked message out again once it is back (upserts by url make it safe).
                log.warning("job %s not acked, the broker connection is gone (%s); it will be redelivered",
                            message.correlation_id, exc.__class__.__name__)
                return
            log.exception("job %s: replying or acking failed; requeued", message.correlation_id)
            try:
                await message.reject(requeue=True)
            except Exception as again:
                log.warning("job %s could not be requeued either (%s)", message.correlation_id, again)

    async def _run(self, message: AbstractIncomingMessage) -> None:
        try:
            job = BusJob.from_wire(orjson.loads(message.body))
        except Exception as exc:  # a poison message: never retried, kept for inspection
            log.error("malformed job %s dead-lettered: %s", message.correlation_id, exc)
            await self._reply(message, JobResult(error=errors.WorkerFailure(f"malformed job: {exc}").to_data()))
            await message.reject(requeue=False)
            return
        result = await self._handler.handle(job)
        if result.error is not None and result.error.get("transient"):
            attempt = _attempt(message.headers)
            if attempt < self._settings.max_attempts:
                log.warning("job attempt %d failed (%s); retrying in %.1f s", attempt, result.error["message"],
                            RETRY_DELAY_MS / 1000, extra={"request_id": job.request_id})
                await self._republish(message, attempt + 1)  # the retry queue holds it, not this worker
                await message.ack()
                return
            log.error("job failed %d times; dead-lettered: %s", attempt, result.error["message"],
                      extra={"request_id": job.request_id})
            await self._reply(message, result)
            await message.reject(requeue=False)
            return
        await self._reply(message, result)
        await message.ack()
        self.handled += 1

    async def _reply(self, message: AbstractIncomingMessage, result: JobResult) -> None:
        if not message.reply_to or self._channel is None:
            return
        await self._channel.default_exchange.publish(
            aio_pika.Message(orjson.dumps(result.to_wire()), content_type="application/json",
                             correlation_id=message.correlation_id),
            routing_key=message.reply_to,
        )

    async def _republish(self, message: AbstractIncomingMessage, attempt: int) -> None:
        """The job again, into the retry queue: the broker moves it back to the job queue after RETRY_DELAY_MS."""
        assert self._channel is not None
        headers = dict(message.headers or {})
        headers[ATTEMPT_HEADER] = attempt
        await self._channel.default_exchange.publish(
            aio_pika.Message(message.body, content_type=message.content_type, headers=headers,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                             correlation_id=message.correlation_id, reply_to=message.reply_to),
            routing_key=self._topology.retry,
        )


def _attempt(headers: dict[str, Any] | None) -> int:
    try:
        return max(1, int((headers or {}).get(ATTEMPT_HEADER, 1)))
    except (TypeError, ValueError):
        return 1
