"""Resume's cost per task: the written ids as one sorted array in the object store vs a pickled Python set.

    python -m benchmarks.written_ids [--num-ids 1000000]

Writes N random 20-character ids into 10 shards (only the `id` column), builds the handle the pipeline
uses (`engine.output.written_ids.written_ids`), and times, inside a Ray task, the first lookup of a 192-id batch
(which maps the array from the object store) and the next one; against it, the size of the pickled set that
every `skip_done` / `expand` task used to receive and the time to unpickle it.
"""

from __future__ import annotations

import argparse
import json
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def measure(num_ids: int, work: Path) -> dict:
    import ray

    from engine.output.written_ids import written_ids

    rng = np.random.default_rng(0)
    ids = np.char.mod("%020x", rng.integers(0, 2**63, num_ids)).astype(object)
    data = work / "data"
    data.mkdir()
    for k in range(10):
        pq.write_table(pa.table({"id": pa.array(ids[k::10].tolist())}), data / f"part-{k}.parquet")
    start = time.perf_counter()
    handle = written_ids(str(data))
    build_s = time.perf_counter() - start
    blob = pickle.dumps(frozenset(ids.tolist()))
    start = time.perf_counter()
    pickle.loads(blob)
    unpickle_s = time.perf_counter() - start

    @ray.remote
    def lookup(handle, query):
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            assert handle.contains(query).all()
            times.append(time.perf_counter() - t0)
        return times

    first, again = ray.get(lookup.remote(handle, ids[:192].tolist()))
    return {
        "num_ids": num_ids,
        "build_s": round(build_s, 2),
        "handle_bytes": len(pickle.dumps(handle)),
        "set_pickle_mib": round(len(blob) / 2**20, 1),
        "set_unpickle_s": round(unpickle_s, 3),
        "task_first_lookup_ms": round(first * 1e3, 2),
        "task_next_lookup_ms": round(again * 1e3, 3),
    }


def main(argv: list[str] | None = None) -> int:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-ids", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="synthray-ids-") as work:
            print(json.dumps(measure(args.num_ids, Path(work)), indent=2))
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
