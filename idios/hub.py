"""`python -m idios pull`: CLIP models from a Hugging Face hub into `models/NAME`, without torch.

Two layouts are read: Immich's published ONNX exports (`immich-app/ViT-B-32__openai` and dozens more; read by
idios/immich.py), and ours: a repo holding a `models/NAME/` folder as this service reads it (`manifest.json` and
the files it names).

Files come through huggingface_hub, so HF_ENDPOINT (a mirror), HF_TOKEN, HF_HUB_OFFLINE and its cache (HF_HOME)
apply. A pull builds the folder beside its final place and renames it in at the end, so an interrupted or refused
pull leaves nothing a starting service would read. What the service cannot serve exactly (a letterboxed resize,
an unknown filter, towers whose inputs or outputs do not fit) is refused with one line instead of served
approximately."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from idios import errors, immich
from idios.identity import sha256_of
from idios.models import MANIFEST, NAME_RE, load_manifest

log = logging.getLogger(__name__)

# short names for the common ones; any other repo is named as ORG/NAME
SHORT_NAMES: dict[str, tuple[str, str]] = {
    "vit_b32": ("immich-app/ViT-B-32__openai", "OpenAI CLIP ViT-B/32: English, 512-d, the quick one"),
    "vit_b16": ("immich-app/ViT-B-16__openai", "OpenAI CLIP ViT-B/16: English, 512-d, finer detail"),
    "vit_l14": ("immich-app/ViT-L-14__openai", "OpenAI CLIP ViT-L/14: English, 768-d, best and slowest"),
    "xlm_b32": ("immich-app/XLM-Roberta-Large-Vit-B-32",
                "M-CLIP XLM-RoBERTa-Large text (50+ languages) with OpenAI's ViT-B/32 images, 512-d"),
}
PROBE_TEXT = "a photo of a cat"


class PullError(Exception):
    """A pull that did not happen: one line for the user, and the exit status."""

    status = 1


class Refused(PullError):
    """A repo the service cannot serve exactly, or a request it will not carry out."""

    status = 2


@dataclass(frozen=True)
class Pulled:
    name: str
    folder: Path
    repo: str
    revision: str
    layout: str
    text: bool
    dim: int
    already: bool = False


def resolve(ref: str) -> tuple[str, str]:
    """A short name or ORG/NAME → (repo, the model name it is served under by default)."""
    if ref in SHORT_NAMES:
        return SHORT_NAMES[ref][0], ref
    if re.fullmatch(r"[\w.-]+/[\w.-]+", ref):
        return ref, re.sub(r"_+", "_", re.sub(r"[^a-z0-9]", "_", ref.split("/")[1].lower())).strip("_")
    raise Refused(f"{ref!r} is neither a short name ({', '.join(SHORT_NAMES)}) nor a repo named ORG/NAME")


def endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def pull(ref: str, models_dir: Path, name: str | None = None, revision: str | None = None) -> Pulled:
    """Fetch `ref` and install it as `models_dir/NAME`; raises PullError (or Refused) with one line."""
    repo, default_name = resolve(ref)
    name = name or default_name
    if not NAME_RE.match(name):
        raise Refused(f"model name {name!r} must match {NAME_RE.pattern} (choose one with --name)")
    target = models_dir / name
    snapshot = _fetch(repo, revision, ["manifest.json", *immich.SMALL])
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else (revision or "main")
    layout = "idios" if (snapshot / MANIFEST).is_file() else "immich" if (snapshot / "config.json").is_file() else None
    if layout is None:
        raise Refused(f"{repo} is no model repo Idios can read: it has neither manifest.json (a models/NAME folder "
                      "of ours) nor config.json with visual/model.onnx (Immich's layout)")
    existing = _existing(target)
    if existing is not None:
        if existing.get("repo") == repo and existing.get("revision") == commit:
            spec = load_manifest(target)
            return Pulled(name, target, repo, commit, layout, spec.has_text, spec.dim, already=True)
        held = f"{existing['repo']}@{str(existing.get('revision'))[:12]}" if existing else "another model"
        raise Refused(f"{target} already holds {held}: pull with --name OTHER, or remove the folder first (its "
                      "collection was filled by those weights)")
    try:
        work = _workspace(models_dir, name)
    except OSError as exc:
        raise PullError(f"cannot write into {models_dir}: {exc.strerror or exc}") from None
    try:
        if layout == "idios":
            manifest = _from_idios(repo, commit, snapshot, work)
        else:
            snapshot = _fetch(repo, commit, immich.FILES, immich.SKIP)
            manifest = immich.read(snapshot, work, _link)
        if ref in SHORT_NAMES and layout == "immich":
            manifest["description"] = SHORT_NAMES[ref][1]
        files = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file())
        manifest.update(name=name, source={"repo": repo, "revision": commit, "layout": layout},
                        sha256={rel: sha256_of(work / rel) for rel in files})
        with (work / MANIFEST).open("wb") as f:  # whole on disk before the rename makes it a model
            f.write(orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        dim, text = check(work)
        try:
            os.rename(work, target)
        except OSError as exc:
            raise Refused(f"{target} appeared while pulling: {exc.strerror}") from None
    except immich.Unservable as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise Refused(str(exc)) from None
    except OSError as exc:  # a full or read-only disk while linking, copying or writing
        shutil.rmtree(work, ignore_errors=True)
        raise PullError(f"cannot write {target}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Pulled(name, target, repo, commit, layout, text, dim)


def _workspace(models_dir: Path, name: str) -> Path:
    """A dot folder beside the model's place (discover() skips dot folders), after removing what an earlier
    pull of the same name left when it was killed."""
    models_dir.mkdir(parents=True, exist_ok=True)
    for stale in models_dir.glob(f".pull-{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".pull-{name}-", dir=models_dir))


def _existing(target: Path) -> dict[str, Any] | None:
    """The `source` of a model already at `target` ({} for one with none); None where there is no model."""
    if not (target / MANIFEST).is_file():
        if target.exists() and any(target.iterdir()):
            raise Refused(f"{target} exists and is not a model folder: remove it, or pull with --name OTHER")
        return None
    try:
        source = orjson.loads((target / MANIFEST).read_bytes()).get("source")
    except orjson.JSONDecodeError:
        source = None
    return source if isinstance(source, dict) and "repo" in source else {}


def _fetch(repo: str, revision: str | None, patterns: list[str], skip: list[str] | None = None) -> Path:
    """huggingface_hub's snapshot of the files of `repo` matching `patterns` (its cache, its settings)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, ignore_patterns=skip))
    except GatedRepoError:
        raise PullError(f"{repo} is gated on {endpoint()}: accept its terms there and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise PullError(f"no model repo {repo} on {endpoint()} (a private one needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise PullError(f"{repo} has no revision {revision!r} on {endpoint()}") from None
    except LocalEntryNotFoundError as exc:
        if constants.is_offline_mode():
            raise PullError(f"HF_HUB_OFFLINE is set and the cache holds no copy of {repo}") from None
        cause = exc.__cause__ or exc
        raise PullError(f"cannot reach the hub at {endpoint()} ({errors.brief(cause)}) and the cache holds no copy "
                        f"of {repo}") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "an error"
        raise PullError(f"the hub at {endpoint()} answered {status} for {repo}") from None
    except OSError as exc:
        raise PullError(f"cannot store {repo}: {exc}") from None
    except Exception as exc:  # the transport's own errors (huggingface_hub lets a few through unwrapped)
        raise PullError(f"cannot reach the hub at {endpoint()} ({exc.__class__.__name__}: {errors.brief(exc)})") from None


def _link(src: Path, dst: Path) -> None:
    """One more name for a cached file (same disk), or a copy (another disk); never a symlink into the cache."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


def _from_idios(repo: str, commit: str, small: Path, work: Path) -> dict[str, Any]:
    """One of our own model folders, published as a repo: its manifest and the files it names."""
    try:
        manifest: dict[str, Any] = orjson.loads((small / MANIFEST).read_bytes())
        names = _files(manifest)
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise Refused(f"{repo}: manifest.json is not a model manifest ({exc})") from None
    snapshot = _fetch(repo, commit, names)
    expected = manifest.get("sha256") or {}
    for rel in names:
        if not (snapshot / rel).is_file():
            raise Refused(f"{repo}: manifest.json names {rel}, which the repo does not hold")
        _link(snapshot / rel, work / rel)
        if rel in expected and sha256_of(work / rel) != expected[rel]:
            raise Refused(f"{repo}: {rel} does not match the sha256 its manifest records")
    return manifest


def _files(manifest: dict[str, Any]) -> list[str]:
    """The files a manifest's towers need (an OpenVINO .xml brings its .bin)."""
    names = [manifest["visual"]["file"], *manifest["visual"].get("data", [])]
    text = manifest.get("text")
    if text:
        names += [text["file"], *text.get("data", []), text["tokenizer"]]
    names += [n[:-4] + ".bin" for n in names if n.endswith(".xml")]
    for n in names:
        if not isinstance(n, str) or n.startswith("/") or ".." in Path(n).parts:
            raise TypeError(f"file {n!r} is not a path inside the model folder")
    return names


def check(folder: Path) -> tuple[int, bool]:
    """Load the model as the service loads it (the engine and precision IDIOS_ENGINE / IDIOS_PRECISION pick
    here) and run each tower once: inputs as the manifest says, outputs of its dim. Returns (dim, has text)."""
    from idios.embed import TextEncoder, load_tower
    from idios.engines import detect_machine
    from idios.metrics import Metrics
    from idios.settings import Settings

    try:
        spec = load_manifest(folder)
    except (ValueError, KeyError, TypeError) as exc:
        raise Refused(f"the manifest does not describe a model the service can load: {exc}") from None
    settings, metrics = Settings.from_env(), Metrics()
    try:
        machine = detect_machine(settings.execution_provider)
        visual = load_tower(spec, "visual", settings, machine, metrics)
        size, batch = spec.image_size, visual.feed.batch or 1
        probe = (np.zeros((batch, size, size, 3), dtype=np.uint8) if spec.pixels == "uint8"
                 else np.zeros((batch, 3, size, size), dtype=np.float32))
        out = visual.run(probe)
        if out.shape[-1] != spec.dim:
            raise Refused(f"the visual tower makes {out.shape[-1]}-d embeddings; the manifest says {spec.dim}-d")
        if spec.text is not None:
            text = load_tower(spec, "text", settings, machine, metrics)
            if text.feed.dtypes[0] not in (np.int32, np.int64):
                raise Refused(f"the text tower takes {text.feed.dtypes[0].__name__}, not token ids")
            dim = TextEncoder(spec.text, text).run([PROBE_TEXT]).shape[-1]
            if dim != spec.dim:
                raise Refused(f"the text tower makes {dim}-d embeddings, the visual tower {spec.dim}-d")
    except Refused:
        raise
    except Exception as exc:  # the engine's own words on a file it cannot run, or inputs it rejects
        raise Refused(f"the model does not run as the service would run it: {errors.brief(exc)}") from None
    return spec.dim, spec.text is not None


def first_run(models_dir: Path, default: str) -> None:
    """`serve` with no CLIP model (none with a text tower) in `models_dir`: pull `default` when the hub answers;
    otherwise say in one line how to get one, and start with what there is."""
    if not default or _has_clip(models_dir):
        return
    try:
        log.info("no CLIP model in %s: pulling %s (IDIOS_DEFAULT_MODEL; empty = never)", models_dir, default)
        done = pull(default, models_dir)
        log.info("pulled %s@%s into %s", done.repo, done.revision[:12], done.folder)
    except PullError as exc:
        log.warning("no CLIP model in %s, and %s was not pulled (%s): `python -m idios pull vit_b32` gets one; "
                    "serving what there is", models_dir, default, exc)


def _has_clip(models_dir: Path) -> bool:
    if not models_dir.is_dir():
        return False
    for manifest in models_dir.glob(f"[!.]*/{MANIFEST}"):
        try:
            if orjson.loads(manifest.read_bytes()).get("text"):
                return True
        except (OSError, orjson.JSONDecodeError, AttributeError):
            continue
    return False
