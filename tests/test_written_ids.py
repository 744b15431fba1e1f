"""Resume's written ids: one sorted array in the object store, looked up by binary search in any task."""

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import schema
from engine.output.written_ids import WrittenIds, written_ids
from engine.stages.expand import Expansion, expand_variants, skip_completed_sources


@pytest.fixture(scope="module")
def ray_one_cpu():
    import ray

    ray.init(num_cpus=1, include_dashboard=False)
    yield ray
    ray.shutdown()


def write_ids(data_dir, name: str, ids: list[str]) -> None:
    data_dir.mkdir(exist_ok=True)
    pq.write_table(pa.table({schema.ID: ids}), data_dir / f"part-{name}.parquet")


def test_ids_are_found_in_the_driver_and_in_tasks_and_only_a_reference_travels(ray_one_cpu, tmp_path):
    ray = ray_one_cpu
    rng = np.random.default_rng(0)
    ids = [f"{x:020x}" for x in rng.integers(0, 2**63, 5000)]
    write_ids(tmp_path / "data", "a", ids[:3000])
    write_ids(tmp_path / "data", "b", ids[3000:])
    written = written_ids(str(tmp_path / "data"))
    assert len(written) == 5000
    assert len(pickle.dumps(written)) < 1000, "tasks get a reference, not the ids"
    absent = [f"{x:020x}" for x in rng.integers(0, 2**63, 200)]
    assert written.contains(ids[::7]).all() and not written.contains(absent).any()
    assert ids[0] in written and absent[0] not in written

    @ray.remote(num_cpus=0)
    def lookup(handle: WrittenIds, query: list[str]) -> list[bool]:
        return handle.contains(query).tolist()

    assert ray.get(lookup.remote(written, [ids[10], absent[3], ids[4999]])) == [True, False, True]
    empty = written_ids(str(tmp_path / "nothing-here"))
    assert len(empty) == 0 and not empty.contains(ids[:3]).any()


def test_resume_skips_done_sources_and_rows_with_a_handle(ray_one_cpu, tmp_path):
    expansion = Expansion("aga", 2, 0, "cfg", include_real=True, expand_splits=None)
    batch = {
        schema.SOURCE_ID: np.array(["s0", "s1", "s2"], dtype=object),
        schema.SPLIT: np.array(["train"] * 3, dtype=object),
    }
    # s0: all three rows written; s1: its real row only; s2: nothing.
    done = expansion.expected_ids("s0", "train") + [expansion.row_id("s1", 0)]
    write_ids(tmp_path / "data", "x", done)
    written = written_ids(str(tmp_path / "data"))
    kept = skip_completed_sources(dict(batch), expansion, written)
    assert list(kept[schema.SOURCE_ID]) == ["s1", "s2"]
    rows = expand_variants(kept, expansion, written)
    assert sorted(zip(rows[schema.SOURCE_ID], rows[schema.VARIANT], strict=True)) == [
        ("s1", 1),
        ("s1", 2),
        ("s2", 0),
        ("s2", 1),
        ("s2", 2),
    ]


def test_rows_are_counted_in_a_task(ray_one_cpu, tmp_path):
    from engine.output.written_ids import count_rows_in_task

    data = tmp_path / "data"
    data.mkdir()
    for name, ids, recipes in (("a", ["x", "y"], ["real", "aga"]), ("b", ["y", "z"], ["aga", "aga"])):
        pq.write_table(pa.table({schema.ID: ids, schema.RECIPE: recipes}), data / f"part-{name}.parquet")
    assert count_rows_in_task(str(data)) == ({"real": 1, "aga": 3}, 1)  # "y" written twice
    assert count_rows_in_task(str(tmp_path / "none")) == ({}, 0)
