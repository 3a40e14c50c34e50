"""bulk_ingest.py's command line: its help text, its options and their checks, and what they settle (the input
spec, the IIIF walk's options, the name the state file gives the source)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from iiif_walk import DocumentHeaders, WalkOptions, is_url, looks_like_iiif, url_stem
from ingest_input import DUMP_PAGE, FORMATS, InputSpec
from service_client import ScriptError, add_service_args

DESCRIPTION = """\
Add the images listed in INPUT to an Idios service, in add_bulk batches sent with bounded concurrency.

INPUT (a file, - for stdin, or the http(s) URL of a IIIF manifest or collection) is one of:
  text   one url per line; blank lines and lines starting with # are skipped
  jsonl  one JSON object per line: {"url": "...", "metadata": {...}}; metadata is optional, other keys are
         ignored (so a --failed file can be fed back as input)
  csv    a header row, then one image per row. The url is in the column named by --url-column. Metadata is
         the JSON object in --metadata-column when that is given; otherwise every other non-empty column,
         as a string ({"title": "...", "year": "1999"})
  iiif   a IIIF Presentation 2.x or 3.0 manifest or collection, as an http(s) URL or a file: one record per
         image painted on each canvas (v3 items -> Canvas -> AnnotationPage -> painting Annotation -> body,
         a Choice body's first item only; v2 the first sequence's canvases -> images -> resource, an
         oa:Choice's default). The url is the image's Image API service as {service}/full/max/0/default.jpg
         (a trailing /info.json or / taken off the service's id, a ?query kept after the path), else the
         image's own id. A canvas that cannot be read is one failed record (type iiif_bad_canvas).
         Metadata: iiif_manifest, iiif_canvas, canvas_index (0-based), label, manifest_label, and when present
         rights (v3 rights, v2 license), required_statement ("Label: value"; v2 attribution), iiif_service.
         Labels in --iiif-language, else "none", else the first language; several values joined with "; ";
         HTML reduced to its text when that is plain; each value cut at 4000 characters.
         Collections are followed depth-first in document order (each URL once: loops are cut), at most
         --iiif-max-documents fetched and --iiif-max-depth deep; a manifest embedded whole is not fetched.
         A document that cannot be used (HTTP error, timeout, not JSON, not IIIF, over 64 MB, past a limit) is
         one failed record (type iiif_*) and the walk goes on. The total is not known ahead, so the bar has no ETA.
--format auto (the default) takes iiif for an http(s) URL and for a *.json file that is a manifest or collection,
csv for *.csv, jsonl for *.jsonl/*.ndjson, otherwise jsonl when the first line starts with '{', else text.
Records are numbered from 0 in input order ("positions"); for iiif, in walk order (--limit counts these).

Resuming: after each finished batch its positions are appended to the state file (default INPUT.MODEL.state.jsonl;
stdin needs an explicit --state; for a URL, STEM.MODEL.state.jsonl in the current folder, STEM made from the URL).
Run the same command again after a crash or Ctrl-C and it sends only what is
not done; at most the batches in flight are sent again, and the service answers those "found" without
fetching the images again. For iiif, the walk fetches every document again, and what is done is kept per
manifest (its url and the indexes of its images done), not by position, so a document that fails on one run and
not on another shifts nothing. A document that failed is not done: the next run fetches it again and sends its
images; its failure is in the failed file of each run where it fails. Resuming assumes each manifest lists the
same images in the same order (new canvases at the end are fine); if not, start over with a new state file.
A state file an older bulk_ingest.py wrote for iiif (by position) is refused.
--skip-existing also lists the urls the service holds and never sends those. Urls are compared as the service
keys them: a IIIF image request by its image (.../full/full/0/default.jpg is .../full/max/0/default.jpg), so
two records of one batch naming the same image are sent once, the second counted in "duplicates".

Failures: every record that failed is written to the --failed file (JSON Lines: position, url, error, type,
metadata). Items failing for a reason that may pass (image_timeout, image_unreachable, job_timeout, worker
errors) are retried --item-retries times first. Requests are retried after connection errors, timeouts, 429
and 5xx (--retries, exponential backoff). To retry the failures later: bulk_ingest.py FAILED_FILE --model M.
A IIIF document that failed (type iiif_*) is listed with its own url: running the same command again retries
it; or ingest it as an input of its own, bulk_ingest.py URL --model M (with its own --state).

Moving to another model (--from-model OLD --model NEW, no INPUT): the records are the url and metadata of every
row OLD holds, paged through POST /models/OLD/dump in the service's cursor order (by url) and numbered from 0;
NEW fetches and embeds each image itself. Pages are fetched as the senders need them, so memory stays at about
one page whatever OLD holds. The numbering is stable as long as OLD is not written, so an interrupted run resumes
like any other. Default files: from-OLD.NEW.state.jsonl and from-OLD.NEW.failed.jsonl in the current folder; the
state file is refused for another server or another OLD. If OLD was written in between, start over with a new
state file: what NEW already holds is answered "found" without being fetched again (or pass --skip-existing).
The bar's total is GET /models/OLD/count. OLD is left as it is; remove its rows yourself once NEW is checked.

Output: a progress bar on stderr (rate, ETA) and, at the end, one JSON line on stdout with this run's counts.
Exit status: 0 when every record was handled, failed images included; 2 for bad arguments or input;
3 when the service cannot be reached after the retries or refuses the requests (bad key, unknown model,
batch too large); 130 on Ctrl-C.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?",
                   help="the list of images: a file, - for stdin, or a IIIF manifest or collection URL (not with "
                        "--from-model)")
    add_service_args(p)
    g = p.add_argument_group("input")
    g.add_argument("--from-model", metavar="OLD",
                   help="instead of INPUT: add the url and metadata of every row model OLD holds (re-embedding them "
                        "into --model)")
    g.add_argument("--page-size", type=int,
                   help=f"with --from-model: rows per dump request of OLD, at most 16384 (default: {DUMP_PAGE})")
    g.add_argument("--format", choices=FORMATS, default="auto", help="input format (default: %(default)s)")
    g.add_argument("--url-column", default="url", help="CSV: the column holding the url (default: %(default)s)")
    g.add_argument("--metadata-column", help="CSV: a column holding a JSON object used as the metadata")
    g.add_argument("--limit", type=int, help="handle only the records at positions below LIMIT (try a sample first)")
    g = p.add_argument_group("IIIF input (--format iiif)")
    g.add_argument("--iiif-language", default="en",
                   help="language of the labels kept, from IIIF language maps (default: %(default)s)")
    g.add_argument("--iiif-max-documents", type=int, default=10_000,
                   help="most manifests and collections fetched in one walk (default: %(default)s)")
    g.add_argument("--iiif-max-depth", type=int, default=8,
                   help="deepest collection nesting followed, the input being 0 (default: %(default)s)")
    g.add_argument("--iiif-timeout", type=float, default=60.0,
                   help="seconds allowed to fetch one document; connection errors, timeouts, 429 and 5xx are "
                        "retried as --retries says (default: %(default)s)")
    g.add_argument("--iiif-headers", default=os.environ.get("IDIOS_FETCH_HEADERS", ""), metavar="JSON",
                   help='request headers per document host, {"host pattern": {"Header": "value"}}, as the '
                        "service's IDIOS_FETCH_HEADERS gives them for images (default: that variable); "
                        "credentials are never sent over plain http to another machine")
    g = p.add_argument_group("sending")
    g.add_argument("--batch", type=int, default=256,
                   help="records per add_bulk request, at most the server's limit of 10,000 (default: %(default)s)")
    g.add_argument("--concurrency", type=int, default=4, help="add_bulk requests in flight (default: %(default)s)")
    g.add_argument("--item-retries", type=int, default=2,
                   help="re-sends of an item that failed for a transient reason (default: %(default)s)")
    g.add_argument("--skip-existing", action="store_true",
                   help="first list the urls the service holds (POST /urls) and never send those")
    g = p.add_argument_group("files")
    g.add_argument("--state", type=Path,
                   help="the state file (default: INPUT.MODEL.state.jsonl; from-OLD.MODEL.state.jsonl in the current "
                        "folder with --from-model)")
    g.add_argument("--no-state", action="store_true", help="keep no state: a re-run starts from the beginning")
    g.add_argument("--failed", type=Path,
                   help="where failed records go, JSON Lines (default: INPUT.MODEL.failed.jsonl, "
                        "bulk_ingest.MODEL.failed.jsonl for stdin, from-OLD.MODEL.failed.jsonl with --from-model)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill in default paths; refuse impossible values."""
    if not 1 <= args.batch <= 10_000:
        p.error("--batch must be between 1 and 10000")
    if args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    if args.limit is not None and args.limit < 0:
        p.error("--limit must not be negative")
    if args.from_model is not None:
        check_from_model(p, args)
        return
    if args.input is None:
        p.error("give INPUT (a file, or - for stdin) or --from-model OLD")
    if args.page_size is not None:
        p.error("--page-size is for --from-model")
    stdin = args.input == "-"
    check_format(p, args)
    if not stdin and not is_url(args.input) and not Path(args.input).is_file():
        p.error(f"no such file: {args.input}")
    stem = url_stem(args.input) if is_url(args.input) else args.input
    if args.no_state:
        args.state = None
    elif args.state is None and not stdin:
        args.state = Path(f"{stem}.{args.model}.state.jsonl")
    if args.failed is None:
        args.failed = Path(f"bulk_ingest.{args.model}.failed.jsonl" if stdin else f"{stem}.{args.model}.failed.jsonl")


def check_format(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Settle --format auto to iiif for a URL or a .json manifest or collection; a URL is read only as IIIF, and
    IIIF is not read from stdin; the --iiif-* limits must be positive."""
    if args.iiif_max_documents < 1 or args.iiif_max_depth < 0 or args.iiif_timeout <= 0:
        p.error("--iiif-max-documents and --iiif-timeout must be positive, --iiif-max-depth not negative")
    try:
        DocumentHeaders(args.iiif_headers)  # checked before anything is sent; the walk builds its own
    except ScriptError as exc:
        p.error(str(exc))
    if is_url(args.input):
        if args.format not in ("auto", "iiif"):
            p.error(f"a URL input is read as IIIF only (--format iiif or auto), not as {args.format}")
        args.format = "iiif"
    elif args.input == "-" and args.format == "iiif":
        p.error("--format iiif reads a file or an http(s) URL, not stdin")
    elif args.format == "auto" and args.input.lower().endswith(".json") and Path(args.input).is_file():
        try:
            if looks_like_iiif(args.input):
                args.format = "iiif"
        except OSError as exc:
            p.error(f"cannot read {args.input}: {exc}")


def check_from_model(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--from-model OLD: no INPUT and none of its options, another model than --model; default file names."""
    if args.input is not None:
        p.error("give either INPUT or --from-model, not both")
    if not args.from_model:
        p.error("--from-model needs a model name")
    if args.from_model == args.model:
        p.error(f"--from-model and --model are both {args.model!r}: name the model to move to with --model")
    input_options = (("--format", args.format, "auto"), ("--url-column", args.url_column, "url"),
                     ("--metadata-column", args.metadata_column, None), ("--iiif-language", args.iiif_language, "en"),
                     ("--iiif-max-documents", args.iiif_max_documents, 10_000),
                     ("--iiif-max-depth", args.iiif_max_depth, 8), ("--iiif-timeout", args.iiif_timeout, 60.0))
    given = [flag for flag, value, default in input_options if value != default]
    if given:
        p.error(f"{', '.join(given)}: only for an INPUT file, not with --from-model")
    if args.page_size is None:
        args.page_size = DUMP_PAGE
    elif not 1 <= args.page_size <= 16384:
        p.error("--page-size must be between 1 and 16384")
    stem = f"from-{args.from_model}.{args.model}"
    if args.no_state:
        args.state = None
    elif args.state is None:
        args.state = Path(f"{stem}.state.jsonl")
    if args.failed is None:
        args.failed = Path(f"{stem}.failed.jsonl")


def source_name(args: argparse.Namespace) -> str:
    """What the records come from, as the state file's header names it: the input file, -, a IIIF URL, or OLD's
    url."""
    if args.from_model is not None:
        return f"{args.server.rstrip('/')}/models/{args.from_model}"
    if args.input == "-" or is_url(args.input):
        return str(args.input)
    return str(Path(args.input).resolve())


def input_spec(args: argparse.Namespace) -> InputSpec:
    return InputSpec(args.input, args.format, args.url_column, args.metadata_column)


def walk_options(args: argparse.Namespace) -> WalkOptions:
    return WalkOptions(language=args.iiif_language, max_documents=args.iiif_max_documents,
                       max_depth=args.iiif_max_depth, timeout=args.iiif_timeout, retries=max(0, args.retries),
                       backoff_max=args.backoff_max, headers=args.iiif_headers)
