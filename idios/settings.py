"""Service settings: read once from the environment (and flags) in main(), then passed down."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

_TRUE = {"1", "true", "yes", "on"}


def _bool(text: str) -> bool:
    return text.strip().lower() in _TRUE


# settings whose empty value means something (IDIOS_DEFAULT_MODEL= : never pull); elsewhere empty = the default
EMPTY_IS_A_VALUE = frozenset({"default_model"})


@dataclass(frozen=True)
class Settings:
    """Every tunable of the service. Each field maps to the environment variable IDIOS_<NAME>."""

    host: str = field(default="127.0.0.1", metadata={"help": "address the HTTP API binds to"})
    port: int = field(default=4213, metadata={"help": "HTTP API port"})
    data_dir: Path = field(default=Path("data"), metadata={"help": "folder for the Milvus Lite file and other state"})
    models_dir: Path = field(default=Path("models"), metadata={"help": "folder holding one sub-folder per model"})
    default_model: str = field(default="vit_b32", metadata={
        "help": "model `serve` pulls from the hub when models_dir holds no CLIP model (empty = never)"})
    amqp_url: str | None = field(default=None, metadata={"help": "RabbitMQ URL; unset = in-process job bus"})
    queue_prefix: str = field(default="idios", metadata={"help": "prefix of every RabbitMQ queue Idios declares"})
    prefetch: int = field(default=0, metadata={"help": "AMQP prefetch per worker (0 = 4 x max_batch)"})
    max_attempts: int = field(default=3, metadata={"help": "tries of a job that fails transiently before dead-lettering"})
    drain_timeout: float = field(default=30.0, metadata={
        "help": "seconds a stopping process finishes what it holds: a worker its jobs, the API its requests"})
    health_port: int = field(default=4214, metadata={"help": "worker health endpoint port, or the first free one above it (0 = off)"})
    milvus_uri: str | None = field(
        default=None, metadata={"help": "Milvus server URI (http://host:19530); unset = Milvus Lite in data_dir"}
    )
    milvus_token: str | None = field(default=None, metadata={"help": "Milvus token (user:password or API key)"})
    milvus_timeout: float = field(default=30.0, metadata={"help": "seconds allowed for one Milvus call"})
    milvus_db: str = field(default="default", metadata={
        "help": "database on a Milvus server holding this deployment's collections (created if missing)"})
    milvus_retry: float = field(default=60.0, metadata={
        "help": "seconds a write keeps trying while the Milvus server is unreachable or recovering"})
    search_ef: int = field(default=128, metadata={"help": "HNSW search breadth (ef): higher = better recall, slower"})
    dedup_memory_mb: int = field(default=1024, metadata={
        "help": "on Milvus Lite, a duplicates job holds the vectors of collections up to this size in memory and "
                "compares them there (much faster than Lite's range search); larger ones are range-searched"})
    index_type: str = field(
        default="", metadata={"help": "vector index: FLAT/IVF_FLAT on Milvus Lite, HNSW on a server (empty = auto)"}
    )
    max_batch: int = field(default=16, metadata={"help": "images per model run"})
    max_wait_ms: float = field(default=10.0, metadata={"help": "longest wait to fill a model batch"})
    write_batch: int = field(default=512, metadata={"help": "rows per Milvus upsert"})
    write_wait_ms: float = field(default=20.0, metadata={"help": "longest wait to fill a Milvus write batch"})
    fetch_concurrency: int = field(default=32, metadata={"help": "concurrent image downloads"})
    fetch_timeout: float = field(default=20.0, metadata={"help": "seconds for one whole image download"})
    connect_timeout: float = field(default=5.0, metadata={"help": "seconds to connect to an image host"})
    max_redirects: int = field(default=5, metadata={"help": "redirects followed per image"})
    fetch_per_host: int = field(default=8, metadata={
        "help": "concurrent downloads from one image host (0 = only fetch_concurrency bounds them)"})
    fetch_host_rate: float = field(default=0.0, metadata={
        "help": "most requests a second to one image host (0 = no limit)"})
    fetch_retries: int = field(default=3, metadata={
        "help": "retries of a download answered 429 or 503, after Retry-After or a growing backoff, within "
                "fetch_timeout"})
    fetch_headers: str = field(default="", metadata={
        "help": 'request headers per image host, JSON: {"iiif.example.org": {"User-Agent": "...", "Authorization": '
                '"Bearer ..."}, "*.example.net": {...}} (a host pattern as in fetch_hosts)'})
    iiif_info_cache: int = field(default=10_000, metadata={
        "help": "IIIF Image API services whose info.json a worker keeps (least recently used go first)"})
    iiif_info_ttl: float = field(default=3600.0, metadata={"help": "seconds a worker keeps a IIIF info.json"})
    iiif_scale: float = field(default=4.0, metadata={
        "help": "a IIIF image is fetched with its short side this many times the model's input side (never "
                "larger than the image): smaller = fewer bytes, an embedding further from the full image's"})
    iiif_format: str = field(default="jpg", metadata={
        "help": "format asked of a IIIF server that offers it: jpg, or png (lossless: the embedding of the full "
                "image exactly, at ~12x the bytes); a url naming another format keeps it"})
    max_image_bytes: int = field(default=32 * 1024 * 1024, metadata={"help": "largest image download"})
    max_image_pixels: int = field(default=100_000_000, metadata={"help": "largest declared image area"})
    min_image_side: int = field(default=150, metadata={"help": "smallest accepted image side, pixels"})
    decode_threads: int = field(default=2, metadata={"help": "threads decoding images"})
    engine: str = field(default="auto", metadata={
        "help": "inference engine: auto (OpenVINO on the CPU, onnxruntime for GPU providers and onnxruntime int8 "
                "models), onnxruntime, openvino"})
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 where the CPU has it and the model's measured fidelity holds), fp32, bf16, int8"})
    openvino_cache: str = field(default="", metadata={
        "help": "folder of OpenVINO's compiled-model cache (empty = DATA_DIR/openvino-cache; off = none)"})
    onnx_threads: int = field(default=0, metadata={"help": "threads of one model run, either engine (0 = all cores)"})
    execution_provider: str = field(
        default="cpu",
        metadata={"help": "onnxruntime execution providers in order of preference, comma-separated: cpu, cuda, "
                          "tensorrt, rocm, openvino, coreml, dml or a full provider name; CPU is always the fallback"},
    )
    malloc_mmap_threshold_kb: int = field(
        default=1024, metadata={"help": "glibc: larger blocks are mapped and returned when freed (0 = glibc default)"}
    )
    text_search: bool = field(
        default=True, metadata={"help": "load the models' text towers in the API (off: no text search, less memory)"}
    )
    onnx_spin: bool = field(
        default=True, metadata={"help": "onnxruntime threads spin while waiting for work (off: less CPU stolen)"}
    )
    max_in_flight: int = field(default=256, metadata={"help": "jobs a worker holds at once"})
    job_timeout: float = field(default=120.0, metadata={"help": "seconds before a job is answered 504"})
    max_request_bytes: int = field(default=256 * 1024 * 1024, metadata={"help": "largest request body"})
    max_bulk_items: int = field(default=10_000, metadata={"help": "most items in one add_bulk or restore"})
    allow_private_urls: bool = field(
        default=False, metadata={"help": "allow image URLs resolving to loopback/private/link-local addresses"}
    )
    private_allowlist: str = field(
        default="", metadata={"help": "comma-separated CIDRs or host names allowed although private"}
    )
    fetch_hosts: str = field(default="", metadata={
        "help": "comma-separated hosts images may be fetched from (*.example.org for its subdomains), checked on "
                "every redirect before any DNS lookup; empty = any host"})
    api_keys: str = field(
        default="", metadata={"help": "comma-separated API keys; KEY:ro for read-only (empty = no keys needed)"}
    )
    api_keys_file: Path | None = field(default=None, metadata={"help": "file with one API key (KEY or KEY:ro) a line"})
    log_level: str = field(default="INFO", metadata={"help": "logging level"})
    log_format: str = field(default="text", metadata={"help": "text, or json for one JSON object a line"})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from IDIOS_* variables; explicit overrides win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"IDIOS_{f.name.upper()}")
            if raw is not None and (raw != "" or f.name in EMPTY_IS_A_VALUE):
                values[f.name] = _convert(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def milvus_target(self) -> str:
        """The URI handed to pymilvus: a server URI, or the Milvus Lite file in the data folder."""
        return self.milvus_uri or str(self.data_dir / "milvus.db")

    @property
    def is_milvus_lite(self) -> bool:
        return self.milvus_uri is None or not self.milvus_uri.startswith(("http://", "https://", "tcp://"))

    @property
    def openvino_cache_dir(self) -> Path | None:
        if self.openvino_cache.strip().lower() == "off":
            return None
        return Path(self.openvino_cache) if self.openvino_cache else self.data_dir / "openvino-cache"

    @property
    def worker_prefetch(self) -> int:
        return self.prefetch or 4 * max(1, self.max_batch)

    @property
    def vector_index(self) -> str:
        if self.index_type:
            return self.index_type.upper()
        return "FLAT" if self.is_milvus_lite else "HNSW"


def _kind(f: dataclasses.Field[Any]) -> str:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return kind.replace(" | None", "")


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = _kind(f)
    try:
        if kind == "bool":
            return _bool(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
    except ValueError as exc:
        raise SystemExit(f"IDIOS_{f.name.upper()}={raw!r}: {exc}") from None
    return raw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one --flag per setting, documented with its environment variable and default."""
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (env IDIOS_{f.name.upper()}, default: {f.default})"
        kind = _kind(f)
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            conv = {"int": int, "float": float, "Path": Path}.get(kind, str)
            parser.add_argument(flag, dest=f.name, type=conv, default=None, help=help_text)


def from_args(namespace: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment, overridden by any flag given on the command line."""
    names = {f.name for f in fields(Settings)}
    return Settings.from_env(environ, **{k: v for k, v in vars(namespace).items() if k in names})


def require_distributed(settings: Settings) -> None:
    """The split deployment needs a broker and a Milvus that every process can reach."""
    if not settings.amqp_url:
        raise SystemExit("idios api/worker need IDIOS_AMQP_URL (RabbitMQ); use `python -m idios serve` for one process")
    if settings.is_milvus_lite:
        raise SystemExit("idios api/worker need IDIOS_MILVUS_URI (a Milvus server shared by every process); "
                         "a Milvus Lite file can only be opened by one process")
