#!/usr/bin/env python3
"""What a negated range costs on Milvus Lite, which has no `not` (README "Filters"): Idios looks up the rows the
range matches and leaves them out by url (`url not in [...]`, idios/store.py CollectionStore.where). Measured
here against the same answer written as the opposite range, on one Milvus Lite file of ROWS 512-d rows with
IIIF-length urls; each search is the best of 5.

    python scripts/bench_filters.py                  # 100,000 rows
    python scripts/bench_filters.py --rows 20000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pymilvus import DataType, MilvusClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from idios.filters import url_not_in  # noqa: E402
from idios.limits import PAGE_MAX  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        client = MilvusClient(str(Path(tmp) / "bench.db"))
        schema = client.create_schema(auto_id=False)
        schema.add_field("url", DataType.VARCHAR, is_primary=True, max_length=2048)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=512)
        schema.add_field("metadata", DataType.JSON)
        client.create_collection("bench", schema=schema)
        index = client.prepare_index_params()
        index.add_index("embedding", index_type="FLAT", metric_type="IP")
        client.create_index("bench", index)
        client.load_collection("bench")
        rng = np.random.default_rng(1)
        span = args.rows // 2  # metadata.year runs 0..span-1 twice
        for start in range(0, args.rows, 5000):
            n = min(5000, args.rows - start)
            vectors = rng.standard_normal((n, 512)).astype("float32")
            client.insert("bench", [{"url": f"https://images.example.org/iiif/object-{i:08d}/full/max/0/default.jpg",
                                     "embedding": vectors[j].tolist(), "metadata": {"year": i % span}}
                                    for j, i in enumerate(range(start, start + n))])
        query = [rng.standard_normal(512).astype("float32").tolist()]

        def best(expr: str) -> float:
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                client.search("bench", query, limit=10, filter=expr)
                times.append(time.perf_counter() - t0)
            return min(times) * 1000

        print(f"Milvus Lite, {args.rows} rows: not {{year < k}}, top-10")
        for left_out in (100, 4096, PAGE_MAX):
            k = left_out // 2
            t0 = time.perf_counter()
            rows = client.query("bench", filter=f'metadata["year"] < {k}', output_fields=["url"], limit=PAGE_MAX)
            expr = url_not_in(r["url"] for r in rows)
            lookup = (time.perf_counter() - t0) * 1000
            opposite = best(f'metadata["year"] >= {k}')
            print(f"  {len(rows):>6} rows left out: lookup {lookup:5.0f} ms + search {best(expr):5.0f} ms "
                  f"(expression {len(expr) / 1e6:.2f} MB); the opposite range: search {opposite:5.0f} ms")
        client.close()


if __name__ == "__main__":
    main()
