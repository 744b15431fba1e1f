"""Resume at scale's mechanisms: the manifest's layouts, and a run of a few thousand sources killed halfway
(SIGKILL of its process group) with the scale benchmark's pass-through recipe, resumed to every row exactly
once. (4000 sources at K=2 rather than the issue's 10^4 at K=10: the same path in a fraction of the time;
`python -m benchmarks.scale` runs the sizes.)"""

import json
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.output.shards import MANIFEST_VERSION, read_manifest, write_manifest


def test_manifest_is_small_and_older_layouts_are_migrated_or_refused(tmp_path):
    write_manifest(str(tmp_path), {"config_hash": "abc", "complete": False})
    assert read_manifest(str(tmp_path)) == {
        "config_hash": "abc",
        "complete": False,
        "manifest_version": MANIFEST_VERSION,
    }
    # Layout 1 listed every shard: read without the list (the shards are found by listing data/).
    old = {"config_hash": "abc", "content": {"seed": 0}, "complete": True, "shards": ["part-a.parquet"] * 3}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    migrated = read_manifest(str(tmp_path))
    assert migrated == {
        "config_hash": "abc",
        "content": {"seed": 0},
        "complete": True,
        "num_shards": 3,
        "manifest_version": MANIFEST_VERSION,
    }
    # A newer layout: refused, saying what to do.
    (tmp_path / "manifest.json").write_text(json.dumps({**old, "manifest_version": MANIFEST_VERSION + 1}))
    with pytest.raises(ValueError, match="newer than this synthray's .* another output.path"):
        read_manifest(str(tmp_path))
    assert read_manifest(str(tmp_path / "nothing")) is None


@pytest.mark.slow
def test_run_killed_halfway_resumes_every_row_exactly_once(tmp_path):
    from benchmarks.scale import make_config, make_source, run_child
    from engine.output.written_ids import _sorted_ids
    from engine.stages.expand import Expansion

    num_sources, k = 4000, 2
    source = make_source(num_sources, cache=tmp_path / "source")
    out = tmp_path / "out"
    args = SimpleNamespace(
        format="image_folder", num_variants=k, rows_per_block=100, rows_per_shard=100, num_cpus=2
    )
    config = make_config(source, out, args)
    expected = num_sources * (k + 1)

    killed = run_child(config, tmp_path, kill_at_rows=expected // 2)["killed_at_rows"]
    assert 0 < killed < expected, "the kill landed mid-run"
    resumed = run_child(config, tmp_path)
    assert resumed["rows_written_this_run"] == expected - killed, "exactly the missing rows"
    assert resumed["sources_already_done"] > 0 and resumed["duplicate_ids"] == 0
    assert resumed["files_read"] == num_sources - resumed["sources_already_done"], "done sources not read"
    assert len(resumed["driver_rss_mib_over_time"]) >= 2, "the driver's memory sampled over the run"

    # Every expected id, once: the ids the sources owe, from the run's own config hash.
    digest = json.loads((out / "manifest.json").read_text())["config_hash"]
    expansion = Expansion("scale_pass_through", k, 0, digest, include_real=True, expand_splits=None)
    owed = [
        expansion.row_id(f"train/c{i // 1000:04d}/{i:07d}.png", v)
        for i in range(num_sources)
        for v in range(k + 1)
    ]
    written, count = _sorted_ids(str(out / "data"))
    assert count == expected
    # Every stage is a CPU task, fused with the listing: the writer cuts each slice's rows into shards.
    assert max(pq.ParquetFile(p).metadata.num_rows for p in (out / "data").glob("part-*")) == 100
    assert np.array_equal(written, np.sort(np.array(owed, dtype=f"S{len(owed[0])}")))
    run = json.loads((out / "run.json").read_text())
    assert run["rows"]["real_written"] == num_sources and run["rows"]["duplicate_ids"] == 0


def test_parquet_source_reads_as_a_hub_dataset(tmp_path):
    """The benchmark's Parquet source is what `datasets` writes: Hub file names, ClassLabel metadata, Image
    structs whose paths become the source ids; one read task per row group."""
    from benchmarks.scale import make_parquet_source
    from engine.config import DataConfig
    from engine.readers import inspect_source, parquet_pieces, source_rows

    root = make_parquet_source(2500, cache=tmp_path)
    info = inspect_source(DataConfig(format="parquet", path=str(root)))
    assert info.counts == {"train": 2500} and info.class_names == ["c0000", "c0001", "c0002"]
    rows = source_rows(info)
    assert [r["source_id"] for r in rows[999:1001]] == ["c0000/0000999.png", "c0001/0001000.png"]
    assert [r["class_name"] for r in rows[999:1001]] == ["c0000", "c0001"]
    assert [len(rows) for rows in parquet_pieces(info)["rows"].to_pylist()] == [1000, 1000, 500]
