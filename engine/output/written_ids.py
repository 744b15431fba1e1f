"""The ids a resumed run must not write again, held once in Ray's object store instead of in every task.

Resume used to read every written id into a Python set on the driver and ship that set inside the arguments
of every `skip_done` / `expand` task: at ImageNet x 10 (about 14 M ids) some 270 MB to unpickle per task and
gigabytes on the driver. Here a Ray task reads the shards' `id` column and returns one sorted array of
fixed-width ids (20 bytes each); the driver holds only its reference. A task's lookup is a binary search in
the array, mapped zero-copy from the node's object store and fetched once per worker process, so its cost
grows with log(rows written), not with the rows written.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

ID_WIDTH = 20  # schema.row_id: the first 20 hex digits of a sha1
_FETCHED: dict[str, np.ndarray] = {}  # per worker process: object ref -> the sorted ids


class WrittenIds:
    """A picklable handle to the sorted ids (the reference travels, the array stays in the object store)."""

    def __init__(self, ref=None, count: int = 0) -> None:
        self.ref, self.count = ref, count

    def __len__(self) -> int:
        return self.count

    def __contains__(self, row_id: str) -> bool:
        return bool(self.contains([row_id])[0])

    def contains(self, ids: Sequence[str]) -> np.ndarray:
        """One bool per id: is it already written?"""
        keys = np.array([str(i).encode() for i in ids], dtype=f"S{ID_WIDTH}")
        if not self.count or not len(keys):
            return np.zeros(len(keys), dtype=bool)
        written = self._array()
        at = np.minimum(np.searchsorted(written, keys), len(written) - 1)
        return written[at] == keys

    def _array(self) -> np.ndarray:
        key = self.ref.hex()
        if key not in _FETCHED:
            import ray

            _FETCHED.clear()  # one run's ids at a time per process
            _FETCHED[key] = ray.get(self.ref)
        return _FETCHED[key]


def written_ids(data_uri: str) -> WrittenIds:
    """The ids in the shards under `data_uri`, sorted by a Ray task into the object store (Ray must be up)."""
    import ray

    # num_cpus=0: a short read that must never wait behind the stages' reservations.
    sort_task = ray.remote(num_cpus=0, num_returns=2)(_sorted_ids)
    array_ref, count_ref = sort_task.remote(data_uri)
    return WrittenIds(array_ref, int(ray.get(count_ref)))


def done_mask(done: WrittenIds | Collection[str], ids: Sequence[str]) -> np.ndarray:
    """`contains` for a WrittenIds, membership for a plain collection (tests, an empty frozenset)."""
    if isinstance(done, WrittenIds):
        return done.contains(ids)
    return np.array([i in done for i in ids], dtype=bool)


def _sorted_ids(data_uri: str) -> tuple[np.ndarray, int]:
    import pyarrow as pa

    from engine import schema
    from engine.output.shards import read_column

    column = read_column(data_uri, [schema.ID]).column(schema.ID).combine_chunks()
    try:
        # Arrow checks every id is ID_WIDTH bytes; its buffer is then the fixed-width array, no copy per id.
        fixed = column.cast(pa.binary(ID_WIDTH))
    except pa.ArrowInvalid:
        raise ValueError(f"{data_uri} holds row ids that are not {ID_WIDTH} characters long") from None
    ids = np.frombuffer(
        fixed.buffers()[1], dtype=f"S{ID_WIDTH}", count=len(fixed), offset=fixed.offset * ID_WIDTH
    )
    return np.sort(ids), len(ids)


def count_rows_in_task(data_uri: str) -> tuple[dict[str, int], int]:
    """`engine.output.shards.count_rows` (rows per recipe, duplicate ids) in a Ray task: it reads every id of the
    shards (about 590 MiB of a driver's RSS at 1.1 M rows), which the driver must not hold at 10^7 rows."""
    import ray

    from engine.output.shards import count_rows

    # max_calls=1: the worker exits afterwards, handing back what the read took.
    task = ray.remote(num_cpus=0, max_calls=1)(count_rows)
    return ray.get(task.remote(data_uri))
