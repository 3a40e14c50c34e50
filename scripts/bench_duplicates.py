#!/usr/bin/env python3
"""A duplicates job at scale, through the API: planted groups found again, time and memory, on Milvus Lite and
on a Milvus server.

    python scripts/bench_duplicates.py [--rows 100000] [--min-similarity 95] [--skip lite|server] [--json F]

Restores `--rows` unit vectors of 512 values (the toy thumb model widened to 512, as scripts/bench_milvus.py
does) in base64: clustered as embeddings are (bench_milvus.clustered_rows: about 0.64 alike within a cluster),
with PLANTED groups of 2-5 near copies (`--planted` of the rows; every two members about 98.3 alike or more).
Nothing else is close: every pair within a cluster is measured (the only place a close pair could be), and
SAMPLE rows against every row of the other clusters (about 0 alike); the run stops unless `--min-similarity`
lies between the closest unplanted pair and the least alike planted one. Then one duplicates job over HTTP at
`--min-similarity`, measuring its wall time (and where it went: the scan of the rows, then the description of
the groups), rows/s, the API process's RSS before the job and its peak during it (VmHWM reset at the start
through /proc/PID/clear_refs, and sampled), Milvus's RSS (the server, or Milvus Lite's own process, a child of
`serve`), the CPU each used, how well the groups found match the planted ones (exact groups, pair recall, pair
precision), and the latency of GET /jobs/{id} and of GET /jobs/{id}/groups?limit=1000.
On the embedded deployment (`serve`, Milvus Lite, FLAT) and on the distributed one (`api` + one `worker` over
the local RabbitMQ) on a Milvus 2.3.5 standalone server (scripts/milvus_standalone.py; HNSW, after the index
has caught up): one server per machine. On Milvus Lite the job's time grows with the square of the rows (FLAT:
every range search reads every row; measured here 2 s at 5,000 rows, 36 s at 20,000, 19 min at 100,000).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_deploy as deploy  # noqa: E402
import make_thumb_model  # noqa: E402
from bench_milvus import DIM, MODEL, restore, unit_rows, url, wait_indexed  # noqa: E402
from benchmark import note, post_ok, quantiles_ms  # noqa: E402
from milvus_standalone import MILVUS_VERSION, MilvusStandalone  # noqa: E402

from idios.models import discover  # noqa: E402

Figures = dict[str, Any]
PLANTED_COSINE = 0.98  # every two members of a planted group are at least this alike
SAMPLE = 500  # rows whose similarity to every row of other clusters is measured (the rest are ~0 alike)
READS = 20  # timed GET /jobs/{id} and GET /jobs/{id}/groups?limit=1000


# ---- the rows --------------------------------------------------------------------------------------------------

def clustered(rows: int, per_cluster: int = 50, spread: float = 0.75, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """bench_milvus.clustered_rows (the same rows for the same seed), with each row's cluster."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(max(1, rows // per_cluster), seed + 1000)
    noise = rng.standard_normal((rows, DIM), dtype=np.float32) * (spread / np.sqrt(DIM))
    labels = rng.integers(0, len(centres), rows)
    vecs = centres[labels] + noise
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs, labels


def plant(vecs: np.ndarray, labels: np.ndarray, fraction: float, seed: int = 7) -> list[list[int]]:
    """Turn `fraction` of the rows, at random places, into groups of 2-5 near copies of the group's first row:
    each copy is a·v + b·u (u a random direction orthogonal to v, a in [0.992, 0.9995]), so a copy is `a` alike
    to v and a² ± b²·|u·u'| (>= 0.984) to another copy. Copies join their original's cluster. Returns the groups."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(vecs))
    target = int(round(fraction * len(vecs)))
    groups: list[list[int]] = []
    at = 0
    while at + 2 <= target:
        size = min(int(rng.integers(2, 6)), target - at)
        groups.append(sorted(int(i) for i in order[at : at + size]))
        at += size
    for group in groups:
        v = vecs[group[0]]
        a = float(rng.uniform(0.992, 0.9995))
        for i in group[1:]:
            u = rng.standard_normal(DIM).astype(np.float32)
            u -= (u @ v) * v
            u /= np.linalg.norm(u)
            vecs[i] = a * v + np.sqrt(1 - a * a) * u
            vecs[i] /= np.linalg.norm(vecs[i])
            labels[i] = labels[group[0]]
    return groups


def check_rows(vecs: np.ndarray, labels: np.ndarray, groups: list[list[int]]) -> Figures:
    """The lowest similarity within a planted group, and the highest of any other pair in a cluster (every one
    measured): the job at a threshold between them must find exactly the planted groups."""
    which = np.arange(len(vecs)) + len(groups)  # a row's planted group, or a number of its own
    for g, members in enumerate(groups):
        which[members] = g
    lowest = min(float((vecs[m] @ vecs[m].T).min()) for m in groups)
    highest = -1.0
    order = np.argsort(labels, kind="stable")
    for cluster in np.split(order, np.flatnonzero(np.diff(labels[order])) + 1):
        sims = vecs[cluster] @ vecs[cluster].T
        sims[which[cluster][:, None] == which[cluster][None, :]] = -1.0  # itself, or a planted copy
        highest = max(highest, float(sims.max()))
    sample = np.random.default_rng(3).choice(len(vecs), min(SAMPLE, len(vecs)), replace=False)
    sims = vecs[sample] @ vecs.T
    sims[labels[sample][:, None] == labels[None, :]] = -1.0  # measured above, every one
    across = float(sims.max())
    return {"planted_groups": len(groups), "planted_rows": sum(map(len, groups)),
            "planted_pairs": sum(len(g) * (len(g) - 1) // 2 for g in groups),
            "lowest_planted_similarity": 100 * lowest, "highest_other_similarity_in_a_cluster": 100 * highest,
            "highest_similarity_across_clusters_sampled": 100 * across, "across_sample_rows": len(sample)}


def score(found: list[dict[str, Any]], groups: list[list[int]]) -> Figures:
    """Found groups against the planted ones: groups equal to a planted group, and pairs (two urls in one
    group) found of those planted (recall) and planted of those found (precision)."""
    planted = {frozenset(url(i) for i in g) for g in groups}
    got = [frozenset(g["urls"]) for g in found]

    def pairs(sets: Any) -> set[tuple[str, str]]:
        return {p for s in sets for p in itertools.combinations(sorted(s), 2)}

    want, have = pairs(planted), pairs(got)
    sims = [g["similarity"] for g in found]
    return {"found_groups": len(got), "exact_groups": sum(g in planted for g in got),
            "pair_recall": len(want & have) / len(want) if want else 1.0,
            "pair_precision": len(want & have) / len(have) if have else 1.0,
            "group_similarity_min_max": [min(sims), max(sims)] if sims else None}


# ---- memory and CPU while the job runs ---------------------------------------------------------------------------

def reset_peak(pid: int) -> bool:
    """Set VmHWM back to the RSS now (Linux >= 4.0), so it then holds the job's peak; False where refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Sampler:
    """RSS of the API process and of Milvus (a process tree), every `every` s in a thread: their peaks."""

    def __init__(self, api: int, milvus: int | None, every: float = 0.2) -> None:
        self.api, self.milvus, self.every = api, milvus, every
        self.peak = {"api": 0.0, "milvus": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def milvus_mb(self) -> float:
        return tree_mb(self.milvus, "VmRSS") if self.milvus else 0.0

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak["api"] = max(self.peak["api"], deploy.status_mb(self.api, "VmRSS"))
            self.peak["milvus"] = max(self.peak["milvus"], self.milvus_mb())
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def tree(pid: int) -> list[int]:
    return [pid, *deploy.children(pid)]


def tree_mb(pid: int, field: str) -> float:
    return sum(deploy.status_mb(p, field) for p in tree(pid))


def tree_cpu(pid: int) -> float:
    return sum(deploy.cpu_seconds(p) for p in tree(pid))


# ---- the job through the API ---------------------------------------------------------------------------------------

async def get_json(http: aiohttp.ClientSession, address: str) -> Any:
    async with http.get(address) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {address} answered {resp.status}: {body[:300]!r}")
        return orjson.loads(body)


async def run_job(base: str, api_pid: int, milvus_pid: int | None, min_similarity: float, timeout: float,
                  poll: float) -> tuple[str, Figures]:
    """Start the job, poll it until done; time, progress, memory and CPU on the way."""
    fig: Figures = {"api_rss_before_mb": deploy.status_mb(api_pid, "VmRSS"),
                    "milvus_rss_before_mb": tree_mb(milvus_pid, "VmRSS") if milvus_pid else 0.0}
    fig["peak_reset"] = reset_peak(api_pid) and all(reset_peak(p) for p in (tree(milvus_pid) if milvus_pid else []))
    cpu_before = deploy.cpu_seconds(api_pid), tree_cpu(milvus_pid) if milvus_pid else 0.0, time.process_time()
    progress: list[tuple[float, int]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        with Sampler(api_pid, milvus_pid) as sampler:
            start = time.perf_counter()
            job = (await post_ok(http, f"{base}/models/{MODEL}/duplicates",
                                 json={"min_similarity": min_similarity}))["job"]
            while True:
                record = await get_json(http, f"{base}/jobs/{job}")
                now = time.perf_counter() - start
                progress.append((now, int(record["done"])))
                if record["state"] != "running":
                    break
                if now > timeout:
                    raise RuntimeError(f"job {job} still running after {timeout} s: {record}")
                await asyncio.sleep(poll)
            wall = time.perf_counter() - start
    if record["state"] != "done":
        raise RuntimeError(f"job {job} ended {record['state']}: {record}")
    used = (deploy.cpu_seconds(api_pid) - cpu_before[0],
            (tree_cpu(milvus_pid) if milvus_pid else 0.0) - cpu_before[1], time.process_time() - cpu_before[2])
    scanned = next((t for t, done in progress if done >= record["total"]), wall)
    fig |= {"wall_s": wall, "rows": record["total"], "rows_per_s": record["total"] / wall,
            "scan_s": scanned, "describe_s": wall - scanned, "groups": record["groups"],
            "api_rss_peak_sampled_mb": sampler.peak["api"], "api_hwm_mb": deploy.peak_rss_mb(api_pid),
            "milvus_rss_peak_sampled_mb": sampler.peak["milvus"],
            "milvus_hwm_mb": tree_mb(milvus_pid, "VmHWM") if milvus_pid else 0.0,
            "api_rss_after_mb": deploy.status_mb(api_pid, "VmRSS"),
            "cpu_s": {"api": used[0], "milvus": used[1], "bench_client": used[2]},
            "progress": [(round(t, 2), d) for t, d in progress[:: max(1, len(progress) // 40)]]}
    return job, fig


async def read_back(base: str, job: str) -> tuple[list[dict[str, Any]], Figures]:
    """Every group (pages of 1,000), then the latency of the record and of one 1,000-group page."""
    groups: list[dict[str, Any]] = []
    cursor: str | None = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        start = time.perf_counter()
        pages = 0
        while True:
            page = await get_json(http, f"{base}/jobs/{job}/groups?limit=1000" + (f"&cursor={cursor}" if cursor else ""))
            pages += 1
            groups += page["groups"]
            if page["next"] is None:
                break
            cursor = page["next"]
        every = time.perf_counter() - start
        times: dict[str, list[float]] = {"record": [], "groups_page": []}
        for _ in range(READS):
            for name, path in (("record", f"/jobs/{job}"), ("groups_page", f"/jobs/{job}/groups?limit=1000")):
                t = time.perf_counter()
                await get_json(http, base + path)
                times[name].append(time.perf_counter() - t)
    return groups, {"all_groups_s": every, "pages": pages, "record": quantiles_ms(times["record"]),
                    "groups_page_1000": quantiles_ms(times["groups_page"])}


async def measure(svc: deploy.Deployment, api_pid: int, milvus_pid: int | None, vecs: np.ndarray,
                  groups: list[list[int]], args: argparse.Namespace, where: str, fig: Figures,
                  before_job: Any = None) -> None:
    note(f"{where}: restore {len(vecs):,} rows through the API, base64 embeddings")
    fig["restore"] = await restore(svc, vecs, "base64", args.restore_clients, milvus_pid)
    if before_job is not None:
        fig["index_wait_s"] = await before_job()
    note(f"{where}: duplicates job at min_similarity {args.min_similarity}")
    job, fig["job"] = await run_job(svc.url, api_pid, milvus_pid, args.min_similarity, args.job_timeout, args.poll)
    note(f"{where}: job done in {fig['job']['wall_s']:.1f} s; reading its groups")
    found, fig["reads"] = await read_back(svc.url, job)
    fig["quality"] = score(found, groups)


async def lite_phase(args: argparse.Namespace, models: Path, tmp: Path, vecs: np.ndarray,
                     groups: list[list[int]]) -> Figures:
    fig: Figures = {"milvus": "Milvus Lite (embedded serve, FLAT)", "rows": len(vecs)}
    async with deploy.embedded(models, tmp) as svc:
        serve = svc.procs["serve"].pid
        kids = deploy.children(serve)
        if len(kids) != 1:
            raise RuntimeError(f"expected one Milvus Lite process under serve, found {kids}")
        await measure(svc, serve, kids[0], vecs, groups, args, "lite", fig)
    return fig


async def server_phase(args: argparse.Namespace, models: Path, tmp: Path, vecs: np.ndarray,
                       groups: list[list[int]]) -> Figures:
    fig: Figures = {"milvus": f"Milvus {MILVUS_VERSION} standalone (api + 1 worker, HNSW)", "rows": len(vecs),
                    "search_ef": args.ef}
    collection = discover(models)[MODEL].collection
    with MilvusStandalone(tmp / "milvus-server") as server:
        assert server.pid is not None
        async with deploy.distributed(models, tmp, server.uri, workers=1, search_ef=args.ef) as svc:
            async def indexed() -> float:
                note("server: waiting for the HNSW index")
                return await asyncio.to_thread(wait_indexed, server.uri, svc.milvus_db, collection, len(vecs))

            await measure(svc, svc.procs["api"].pid, server.pid, vecs, groups, args, "server", fig, indexed)
    return fig


# ---- the report ----------------------------------------------------------------------------------------------------

def table(fig: Figures) -> str:
    lines, row = deploy.figure_table(fig, [k for k in ("lite", "server") if k in fig], 40, 24)

    row("rows", lambda f: f"{f['rows']:,}")
    row("restore rows/s (API, base64)", lambda f: f"{f['restore']['rows_per_s']:,.0f}")
    row("job wall s (scan + describe)", lambda f: "{wall_s:.1f} ({scan_s:.1f} + {describe_s:.1f})".format(**f["job"]))
    row("job rows/s", lambda f: f"{f['job']['rows_per_s']:,.0f}")
    row("job CPU s: api / milvus", lambda f: "{api:.0f} / {milvus:.0f}".format(**f["job"]["cpu_s"]))
    row("API RSS MB: before / peak in job", lambda f: "{:,.0f} / {:,.0f}".format(
        f["job"]["api_rss_before_mb"], max(f["job"]["api_hwm_mb"], f["job"]["api_rss_peak_sampled_mb"])))
    row("Milvus RSS MB: before / peak in job", lambda f: "{:,.0f} / {:,.0f}".format(
        f["job"]["milvus_rss_before_mb"], max(f["job"]["milvus_hwm_mb"], f["job"]["milvus_rss_peak_sampled_mb"])))
    row("groups found / planted", lambda f: f"{f['quality']['found_groups']:,} / {fig['rows_check']['planted_groups']:,}")
    row("groups exactly as planted", lambda f: f"{f['quality']['exact_groups']:,}")
    row("pair recall / precision", lambda f: "{pair_recall:.4f} / {pair_precision:.4f}".format(**f["quality"]))
    row("GET /jobs/{id} p50/p95 ms", lambda f: "{p50_ms:.0f} / {p95_ms:.0f}".format(**f["reads"]["record"]))
    row("GET groups?limit=1000 p50/p95 ms", lambda f: "{p50_ms:.0f} / {p95_ms:.0f}".format(
        **f["reads"]["groups_page_1000"]))
    c = fig["rows_check"]
    lines.append(f"planted: {c['planted_groups']:,} groups, {c['planted_rows']:,} rows, lowest similarity in a group "
                 f"{c['lowest_planted_similarity']:.2f}; highest other pair in a cluster "
                 f"{c['highest_other_similarity_in_a_cluster']:.2f}, across clusters (sampled) "
                 f"{c['highest_similarity_across_clusters_sampled']:.2f}; min_similarity {fig['meta']['min_similarity']}")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> Figures:
    fig: Figures = {"meta": {"when": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "dim": DIM,
                             "loadavg_before": os.getloadavg(), "min_similarity": args.min_similarity,
                             "planted_fraction": args.planted}}
    vecs, labels = clustered(args.rows)
    groups = plant(vecs, labels, args.planted)
    fig["rows_check"] = check = check_rows(vecs, labels, groups)
    closest = max(check["highest_other_similarity_in_a_cluster"], check["highest_similarity_across_clusters_sampled"])
    if not closest < args.min_similarity <= check["lowest_planted_similarity"]:
        raise SystemExit(f"--min-similarity {args.min_similarity} does not separate the planted groups: {check}")
    with tempfile.TemporaryDirectory(prefix="idios-bench-dup-") as name:
        tmp = Path(name)
        make_thumb_model.build(tmp / "models" / MODEL, name=MODEL, text=True, dim=DIM)
        models = tmp / "models"
        if "lite" not in args.skip:
            fig["lite"] = await lite_phase(args, models, tmp, vecs, groups)
        if "server" not in args.skip:
            fig["server"] = await server_phase(args, models, tmp, vecs, groups)
    fig["meta"]["loadavg_after"] = os.getloadavg()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--min-similarity", type=float, default=95.0)
    p.add_argument("--planted", type=float, default=0.02, help="fraction of the rows in planted groups")
    p.add_argument("--ef", type=int, default=128, help="IDIOS_SEARCH_EF of the service on the server")
    p.add_argument("--restore-clients", type=int, default=2, help="restore requests in flight")
    p.add_argument("--job-timeout", type=float, default=3600)
    p.add_argument("--poll", type=float, default=0.2, help="seconds between reads of the job's record")
    p.add_argument("--skip", default="", help="comma-separated: lite, server")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip - {"lite", "server"}:
        p.error(f"unknown --skip {args.skip - {'lite', 'server'}}")
    fig = asyncio.run(run(args))
    print(table(fig))
    if args.json:
        args.json.write_text(orjson.dumps(fig, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
