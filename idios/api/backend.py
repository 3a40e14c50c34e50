"""What the API talks to: the models it serves, the vector store (reads), the writer, the job bus (image work)
and the text towers, which the API runs itself. idios/composition.py builds it for `serve` and `api`."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from idios.api.restore_body import RestoreParser
from idios.bus import JobBus
from idios.embed import TextRuntime
from idios.engines import Tower
from idios.jobs import JobRoom
from idios.metrics import Metrics
from idios.models import ModelSpec
from idios.settings import Settings
from idios.store import CollectionStore
from idios.writer import Writer


@dataclass(frozen=True)
class Backend:
    settings: Settings
    specs: dict[str, ModelSpec]
    store: CollectionStore  # reads
    writer: Writer  # writes, and the urls this process is writing (idios/writer.py)
    bus: JobBus
    metrics: Metrics
    texts: dict[str, TextRuntime]
    jobs: JobRoom  # long jobs (duplicates): started, read and cancelled by any API process, run by one
    restore_bodies: RestoreParser = field(default_factory=RestoreParser)
    # the visual towers this process runs itself (embedded); empty in the distributed API, whose workers run them
    visual: dict[str, Tower] = field(default_factory=dict)

    @property
    def refused(self) -> dict[str, ModelSpec]:
        """Models found in the models folder but not served: their files differ from what filled their
        collection (the reason is store.refused[name]); their routes answer 409 `model_refused`, but count, urls
        and dump still read their collection (to move its rows out)."""
        return self.store.refused_specs()


BACKEND = web.AppKey("backend", Backend)
REQUEST_ID = web.RequestKey("request_id", str)
