"""Every error the service answers with: an HTTP status and a stable machine-readable type."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar


class IdiosError(Exception):
    """Base error. `status` is the HTTP status; `type` is stable for clients to branch on."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    # A failure of the service's own (a store outage, a bug hit by chance), not of the input: a worker tries
    # the job again, up to max_attempts (consumer.JobConsumer). Crosses the queue in to_data.
    transient: ClassVar[bool] = False

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def to_body(self) -> Any:
        return {"detail": self.message, "type": self.type, **self.extra}

    def to_data(self) -> dict[str, Any]:
        """Plain data, so the error can cross a queue (never pickled code)."""
        return {"type": self.type, "status": self.status, "message": self.message, "extra": self.extra,
                "transient": self.transient}


class FieldError(IdiosError):
    """A 422 about one input field, in the shape of FastAPI's validation errors."""

    status = 422
    type = "value_error"
    loc: tuple[str | int, ...] = ("body", "url")

    def __init__(self, message: str, loc: tuple[str | int, ...] | None = None, **extra: Any) -> None:
        super().__init__(message, **extra)
        if loc is not None:
            self.loc = loc

    def to_body(self) -> Any:
        return {"detail": [{"loc": list(self.loc), "msg": self.message, "type": self.type}]}

    def to_data(self) -> dict[str, Any]:
        data = super().to_data()
        data["extra"] = {**self.extra, "loc": list(self.loc)}
        return data


class RequestInvalid(IdiosError):
    """A request that failed validation; carries a list of FastAPI-style error items."""

    status = 422
    type = "validation_error"

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(str(e.get("msg")) for e in errors))
        self.errors = errors

    def to_body(self) -> Any:
        return {"detail": self.errors}


class ImageError(FieldError):
    """The image behind a URL (or an upload) cannot be used."""

    type = "image_error"


class ImageUnreachable(ImageError):
    type = "image_unreachable"


class ImageTimeout(ImageError):
    type = "image_timeout"


class ImageHttpError(ImageError):
    type = "image_http_error"


class TooManyRedirects(ImageError):
    type = "image_too_many_redirects"


class PrivateAddress(ImageError):
    type = "private_address"


class HostNotAllowed(ImageError):
    """An image host outside IDIOS_FETCH_HOSTS."""

    type = "host_not_allowed"


class ImageTooLarge(ImageError):
    type = "image_too_large"


class NotAnImage(ImageError):
    type = "not_an_image"


class ImageTooSmall(ImageError):
    type = "image_too_small"


class IIIFInfoInvalid(ImageError):
    """A IIIF Image API service whose info.json cannot be used (not JSON, not IIIF, absurd dimensions)."""

    type = "iiif_info_invalid"


class IIIFUnsupported(ImageError):
    """A IIIF image request this service cannot honour: a region from a level-0 server, an API before 2.0."""

    type = "iiif_unsupported"


class FilterUnsupported(FieldError):
    """A filter the store cannot run as given (Milvus Lite's limits; idios/store.py CollectionStore.where)."""

    type = "filter_unsupported"
    loc = ("body", "filter")


class MetadataTooLong(FieldError):
    """Metadata that an edit would make longer than limits.METADATA_MAX (idios/writer.py edit_metadata)."""

    type = "value_error.metadata_json_too_long"
    loc: tuple[str | int, ...] = ("body", "metadata")


class InvalidUrl(FieldError):
    type = "value_error.url"


class TextNotSupported(FieldError):
    type = "text_not_supported"
    loc = ("body", "text")


class DimensionMismatch(FieldError):
    type = "value_error.dimension"
    loc = ("body", "embedding")


class ModelNotFound(IdiosError):
    status = 404
    type = "model_not_found"


class ModelRefused(IdiosError):
    """A model that is not served: its files differ from the weights that filled its collection (idios/identity.py)."""

    status = 409
    type = "model_refused"


class AlreadyInserted(IdiosError):
    status = 409
    type = "already_inserted"

    def __init__(self) -> None:
        super().__init__("Image already inserted")


class NearDuplicate(IdiosError):
    """search_add with min_similarity: a stored image (`url`) is at least that similar (`similarity`)."""

    status = 409
    type = "near_duplicate"


class NotFound(IdiosError):
    status = 404
    type = "not_found"


class JobNotFound(IdiosError):
    status = 404
    type = "job_not_found"


class JobRunning(IdiosError):
    """A job of the same kind already runs for the model (idios/jobs.py); `job` names it."""

    status = 409
    type = "job_running"


class JobNotDone(IdiosError):
    """The result of a job that has not finished (or failed, or was cancelled) was asked for."""

    status = 409
    type = "job_not_done"


class JobFinished(IdiosError):
    """A job that is not running any more was asked to stop."""

    status = 409
    type = "job_finished"


class PayloadTooLarge(IdiosError):
    status = 413
    type = "payload_too_large"


class UnsupportedMediaType(IdiosError):
    status = 415
    type = "unsupported_media_type"


class FormInvalid(IdiosError):
    """A multipart/form-data body that cannot be parsed (no boundary, broken part headers)."""

    status = 400
    type = "form_invalid"


class JobTimeout(IdiosError):
    status = 504
    type = "job_timeout"


class Unavailable(IdiosError):
    status = 503
    type = "unavailable"
    transient = True


class StoreUnavailable(Unavailable):
    """The Milvus server cannot be reached or is recovering; the request may be sent again."""

    type = "store_unavailable"


class WorkerFailure(IdiosError):
    status = 500
    type = "worker_error"
    transient = True


def brief(exc: BaseException) -> str:
    """An exception in one line for a log or an answer: its first line (pymilvus's `message` when it has one), at
    most 200 characters, or its class name when it says nothing."""
    lines = str(getattr(exc, "message", "") or exc).strip().splitlines()
    return (lines[0] if lines else exc.__class__.__name__)[:200]


def _all_subclasses(cls: type[IdiosError]) -> list[type[IdiosError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def from_data(data: dict[str, Any]) -> IdiosError:
    """Rebuild an error that crossed the queue as data; unknown types become a WorkerFailure."""
    by_type = {c.type: c for c in _all_subclasses(IdiosError) if c not in (RequestInvalid, AlreadyInserted)}
    cls = by_type.get(str(data.get("type")), WorkerFailure)  # a few dozen classes: no cache needed
    extra = dict(data.get("extra") or {})
    message = str(data.get("message", "worker error"))
    if data.get("type") == AlreadyInserted.type:
        return AlreadyInserted()
    if issubclass(cls, FieldError):
        loc = extra.pop("loc", None)
        return cls(message, loc=tuple(loc) if loc else None, **extra)
    return cls(message, **extra)


@contextmanager
def first_failure() -> Iterator[None]:
    """Around an asyncio.TaskGroup: its failure surfaces as the first task's exception (say a 503 or a 422 that
    names one input), not as an ExceptionGroup the error middleware would answer with a 500."""
    try:
        yield
    except ExceptionGroup as group:
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        raise exc from None
