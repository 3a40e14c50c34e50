"""Command line: `python -m idios serve` runs the embedded service (API + worker in one process); `pull` fetches
a CLIP model from a Hugging Face hub."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import orjson
from idios.engines import check_names
from idios.hub import SHORT_NAMES
from idios.engines.onnxruntime import providers_for
from idios.memory import fix_mmap_threshold
from idios.settings import Settings, add_arguments, from_args, require_distributed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m idios", description="Idios reverse image search")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="API and worker in one process, Milvus Lite in the data folder",
        description="Run the embedded service. Every flag can also be set with its IDIOS_* environment variable.",
    )
    add_arguments(serve)
    api = commands.add_parser(
        "api", help="the stateless HTTP API of the distributed deployment (needs IDIOS_AMQP_URL, IDIOS_MILVUS_URI)"
    )
    add_arguments(api)
    worker = commands.add_parser(
        "worker", help="a worker of the distributed deployment (needs IDIOS_AMQP_URL, IDIOS_MILVUS_URI)"
    )
    add_arguments(worker)
    fidelity = commands.add_parser(
        "fidelity", help="measure how bf16 moves a model's embeddings from fp32 and record it in its manifest",
        description="Runs the model in OpenVINO fp32 and bf16 on real photos (and its text tower on sample queries) "
                    "and writes the cosines into manifest.json: IDIOS_PRECISION=auto runs bf16 only where the "
                    "least cosine is at least 0.999.",
    )
    fidelity.add_argument("model_dir", type=Path, help="a model folder (with manifest.json)")
    pull = commands.add_parser(
        "pull", help="fetch a CLIP model from a Hugging Face hub into models/NAME (no torch needed)",
        description="Fetches Immich's ONNX exports of CLIP (immich-app/...) or a repo laid out as a models/NAME "
                    "folder, checks that the service can serve it exactly, and installs it. huggingface_hub's "
                    "settings apply: HF_ENDPOINT (a mirror), HF_TOKEN, HF_HUB_OFFLINE, HF_HOME (its cache). "
                    "Short names: " + "; ".join(f"{k} = {v[0]} ({v[1]})" for k, v in SHORT_NAMES.items()),
    )
    pull.add_argument("model", help="a short name or a repo (ORG/NAME)")
    pull.add_argument("--name", help="the name to serve it under (default: the short name, or from the repo)")
    pull.add_argument("--models-dir", type=Path, default=None, help="default: IDIOS_MODELS_DIR or models")
    pull.add_argument("--revision", help="a branch, tag or commit of the repo (default: main)")
    pull.add_argument("--fidelity-images", type=Path, metavar="DIR",
                      help="then measure bf16 against fp32 on these real photos (at least 8), so that "
                           "IDIOS_PRECISION=auto may run it in bf16")
    fidelity.add_argument("--images", type=Path, required=True,
                          help="a folder of real photos, at least 8, like the ones the model will see")
    return parser


def run_fidelity(model_dir: Path, images: Path) -> int:
    """`python -m idios fidelity`: measure, record, print the result as one JSON line."""
    from idios.engines.fidelity import photos_in, record

    try:
        result = record(model_dir, photos_in(images))
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(orjson.dumps({"model": model_dir.name, "bf16": result}).decode())
    return 0


def run_pull(args: argparse.Namespace) -> int:
    """`python -m idios pull`: one line on success or failure; 2 = refused, 1 = the hub or the disk failed."""
    from idios.hub import PullError, pull

    models_dir = args.models_dir or Settings.from_env().models_dir
    try:
        done = pull(args.model, models_dir, args.name, args.revision)
    except PullError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.status
    if done.already:
        print(f"{done.folder} already holds {done.repo}@{done.revision[:12]}")
    else:
        towers = "image and text search" if done.text else "image search only"
        print(f"pulled {done.repo}@{done.revision[:12]} into {done.folder} ({done.layout} layout, {done.dim}-d, "
              f"{towers}); restart the service to serve it; the same files elsewhere: --revision {done.revision}")
    if args.fidelity_images:
        return run_fidelity(done.folder, args.fidelity_images)
    return 0


class JsonFormatter(logging.Formatter):
    """One JSON object a line, with the request id that follows a job from the API to the worker."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "fidelity":
        raise SystemExit(run_fidelity(args.model_dir, args.images))
    if args.command == "pull":
        logging.basicConfig(level="WARNING")
        raise SystemExit(run_pull(args))
    settings = from_args(args)
    configure_logging(settings)
    fix_mmap_threshold(settings.malloc_mmap_threshold_kb)  # before any model is loaded
    try:
        providers_for(settings.execution_provider)  # a bad name stops start-up, a missing one is warned about
    except ValueError as exc:
        raise SystemExit(f"IDIOS_EXECUTION_PROVIDER: {exc}") from None
    try:
        check_names(settings.engine, settings.precision)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if args.command == "worker":
        from idios.workerproc import run_worker

        asyncio.run(run_worker(settings))
        return
    if args.command == "api":
        require_distributed(settings)
    from idios.api.app import create_app, serve_http  # not imported by a worker
    from idios.composition import distributed_backend, embedded_backend

    if args.command == "serve":
        from idios.hub import first_run

        first_run(settings.models_dir, settings.default_model)
    factory = embedded_backend if args.command == "serve" else distributed_backend
    asyncio.run(serve_http(create_app(settings, factory), settings))


if __name__ == "__main__":
    main()
