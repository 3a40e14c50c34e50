"""What travels on the job bus: jobs in, results out. Plain frozen data, serialisable as JSON."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np


class JobKind(str, Enum):
    ADD = "add"  # fetch, embed, upsert one image
    EMBED = "embed"  # fetch and embed one image; nothing is written
    RESTORE = "restore"  # upsert rows given with their embeddings
    PING = "ping"  # a round trip through the bus and a worker


@dataclass(frozen=True)
class BusJob:
    """One unit of work sent over the job bus to a worker: embed or add an image, restore rows, or a ping."""

    kind: JobKind
    model: str = ""
    url: str = ""
    metadata: dict[str, Any] | None = None
    image: bytes | None = None  # an uploaded image, used instead of fetching `url`
    rows: list[dict[str, Any]] = field(default_factory=list)
    request_id: str = ""
    hashed: bool = False  # EMBED of an image the API will store itself: its perceptual hash comes back too

    def to_wire(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind.value, "model": self.model, "request_id": self.request_id}
        if self.url:
            data["url"] = self.url
        if self.metadata is not None:
            data["metadata"] = self.metadata
        if self.image is not None:
            data["image"] = base64.b64encode(self.image).decode("ascii")
        if self.rows:
            data["rows"] = self.rows
        if self.hashed:
            data["hashed"] = True
        return data

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> BusJob:
        image = data.get("image")
        return cls(
            kind=JobKind(data["kind"]),
            model=data.get("model", ""),
            url=data.get("url", ""),
            metadata=data.get("metadata"),
            image=base64.b64decode(image) if image is not None else None,
            rows=data.get("rows") or [],
            request_id=data.get("request_id", ""),
            hashed=bool(data.get("hashed", False)),
        )


@dataclass(frozen=True)
class JobResult:
    """A job's outcome: an embedding (EMBED*), a count of rows written, or an error as plain data."""

    embedding: np.ndarray | None = None
    written: int = 0
    error: dict[str, Any] | None = None
    # an EMBED job's image's perceptual hash, when asked for (BusJob.hashed); "" otherwise
    phash: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_wire(self) -> dict[str, Any]:
        data: dict[str, Any] = {"written": self.written}
        if self.embedding is not None:
            data["embedding"] = self.embedding.astype(np.float32).tolist()
        if self.error is not None:
            data["error"] = self.error
        if self.phash:
            data["phash"] = self.phash
        return data

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> JobResult:
        emb = data.get("embedding")
        return cls(
            embedding=np.asarray(emb, dtype=np.float32) if emb is not None else None,
            written=int(data.get("written", 0)),
            error=data.get("error"),
            phash=str(data.get("phash") or ""),
        )
