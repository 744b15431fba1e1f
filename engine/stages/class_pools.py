"""Class pools: a bounded, deterministic sample of each class's source rows that later stages read.

A recipe declares a pool (`PoolSpec`) when a row needs other rows of its class: UniDiffDA's `ddim_interp`
draws a second same-class image; MVC and De-DA will draw captions or subjects from other rows. The engine
builds the pool once per run attempt, before the recipe's stages, from the same source dataset.

Bounds. At most `max_per_class` rows per class. The driver holds references only: per class a list of
source ids, and per sampled row (block number, row number) into Arrow blocks that Ray Data materialized
in the object store (encoded image bytes plus the spec's extra columns). An actor fetches a block the first
time it needs one of its rows and keeps the few it has fetched.

Determinism. A row's place in the sample is a hash of (seed, source_id), so the pool is the same whatever
the file order, the number of blocks or the cluster; a partner is drawn from the pool with the drawing row's
own seed. A resumed run rebuilds the same pool and draws the same partners.

Cost. Choosing the sample reads the source's (source_id, class, split) once, streamed through the driver
with one bounded heap per class; a second pass keeps the chosen rows' bytes.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine import schema
from engine.stages.batch import Batch, take

_BLOCKS_KEPT = 8  # blocks an actor keeps fetched (a block holds whole classes' samples)


@dataclass(frozen=True)
class PoolSpec:
    """What a recipe asks the engine to sample before its stages run."""

    max_per_class: int
    splits: tuple[str, ...] = ("train",)
    columns: tuple[str, ...] = ()  # small per-row features kept beside the image bytes (e.g. a caption)

    def __post_init__(self) -> None:
        if self.max_per_class < 1:
            raise ValueError(f"a class pool needs max_per_class >= 1, got {self.max_per_class}")


@dataclass
class ClassPool:
    """At most `max_per_class` references per class; see the module docstring."""

    seed: int
    members: dict[str, list[str]]  # class name -> source ids, in sample order
    blocks: list  # ObjectRefs of Arrow tables: source_id, class_name, image_bytes, *spec.columns
    where: dict[str, tuple[int, int]]  # source id -> (block, row)
    _fetched: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)

    def partner(self, class_name: str, source_id: str, seed: int) -> str | None:
        """Another member of `class_name`, drawn with `seed`; None when the pool has no other member."""
        others = [s for s in self.members.get(class_name, []) if s != source_id]
        if not others:
            return None
        return others[int(np.random.default_rng(seed).integers(len(others)))]

    def row(self, source_id: str) -> dict:
        """The pooled columns of one member (image bytes included), fetched from the object store."""
        block, index = self.where[source_id]
        return self._block(block).slice(index, 1).to_pylist()[0]

    def _block(self, block: int):
        import ray

        if block not in self._fetched:
            self._fetched[block] = ray.get(self.blocks[block])
            while len(self._fetched) > _BLOCKS_KEPT:
                self._fetched.popitem(last=False)
        self._fetched.move_to_end(block)
        return self._fetched[block]

    def __getstate__(self) -> dict:
        # Each actor fetches its own blocks; what was fetched here never travels with the pool.
        return {**self.__dict__, "_fetched": OrderedDict()}

    @property
    def sizes(self) -> dict[str, int]:
        return {name: len(ids) for name, ids in self.members.items()}


def pool_rank(seed: int, source_id: str) -> int:
    """A row's place in its class's sample: smaller is sampled first."""
    return int.from_bytes(hashlib.sha1(f"pool\x1f{seed}\x1f{source_id}".encode()).digest()[:8], "big")


def choose_members(ds, spec: PoolSpec, seed: int) -> dict[str, list[str]]:
    """Class name -> the `max_per_class` source ids of the pool splits with the smallest ranks."""
    heaps: dict[str, list[tuple[int, str]]] = {}  # max-heaps by rank (negated), at most M entries
    columns = [schema.SOURCE_ID, schema.CLASS_NAME, schema.SPLIT]
    for batch in ds.select_columns(columns).iter_batches(batch_format="numpy", batch_size=4096):
        for source_id, class_name, split in zip(*(batch[c] for c in columns), strict=True):
            if str(split) not in spec.splits:
                continue
            heap = heaps.setdefault(str(class_name), [])
            entry = (-pool_rank(seed, str(source_id)), str(source_id))
            if len(heap) < spec.max_per_class:
                heapq.heappush(heap, entry)
            elif entry > heap[0]:
                heapq.heapreplace(heap, entry)
    return {name: [s for _, s in sorted(heap, reverse=True)] for name, heap in sorted(heaps.items())}


def keep_members(
    batch: Batch, chosen: frozenset[str], columns: list[str], read_bytes: Callable | None = None
) -> Batch:
    """Map step of the second pass: the chosen rows (their files read by `read_bytes` when the rows carry
    paths), only the pooled columns. One step, so that a block with no member still has every column."""
    keep = np.array([str(s) in chosen for s in batch[schema.SOURCE_ID]], dtype=bool)
    members = take(batch, np.flatnonzero(keep))
    if read_bytes is not None:
        members = read_bytes(members)
    return {name: members[name] for name in columns}


def build_class_pool(
    ds, spec: PoolSpec, seed: int, num_cpus: float = 0.25, read_bytes: Callable | None = None
) -> ClassPool:
    """Sample `ds` (the run's source dataset) into a ClassPool held in the object store. `read_bytes`: for
    a source whose rows carry file paths instead of bytes (engine.readers.read_file_bytes), so that only
    the members' files are read."""
    import ray

    members = choose_members(ds, spec, seed)
    chosen = frozenset(s for ids in members.values() for s in ids)
    columns = [schema.SOURCE_ID, schema.CLASS_NAME, schema.IMAGE_BYTES, *spec.columns]
    sample = ds.map_batches(
        keep_members,
        fn_kwargs={"chosen": chosen, "columns": columns, "read_bytes": read_bytes},
        batch_format="numpy",
        num_cpus=num_cpus,
    ).materialize()
    blocks = sample.to_arrow_refs()
    source_ids = ray.remote(num_cpus=0)(_source_ids)  # a task per block: the bytes stay in the store
    where: dict[str, tuple[int, int]] = {}
    for b, ids in enumerate(ray.get([source_ids.remote(ref) for ref in blocks])):
        for r, source_id in enumerate(ids):
            where[source_id] = (b, r)
    missing = chosen - where.keys()
    assert not missing, f"class pool lost rows between its two passes: {sorted(missing)[:3]}"
    return ClassPool(seed=seed, members=members, blocks=blocks, where=where)


def _source_ids(table) -> list[str]:
    return [str(s) for s in table.column(schema.SOURCE_ID).to_pylist()]
