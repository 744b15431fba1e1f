"""Run options the demo path never takes, each on a small run of the toy dataset (one Ray session):
`output.include_real: false` with `data.expand_splits: null`; `output.overwrite: true` on an output that
holds another config's shards (with groups from a configured `data.groups_file`); a rerun after a run that
failed.
"""

import json

import pyarrow.parquet as pq
import pytest

from engine import schema
from engine.config import GenerateConfig, load_config

pytestmark = pytest.mark.slow


def overrides(toy, tiny, out, *extra) -> list[str]:
    return [
        f"data.path={toy}",
        f"data.masks_path={toy / 'masks'}",
        "data.splits=[train]",
        f"output.path={out}",
        "output.gallery_classes=0",
        "ray.progress_bars=false",
        f"prompt.model.id={tiny / 'llm'}",
        f"background.model.id={tiny / 'sdxl'}",
        "background.height=32",
        "background.width=32",
        "background.num_inference_steps=1",
        *extra,
    ]


def config(toy, tiny, out, *extra) -> GenerateConfig:
    from tests.conftest import ROOT

    return load_config(
        GenerateConfig, ROOT / "configs" / "aga_tiny_cpu.yaml", overrides(toy, tiny, out, *extra)
    )


def read_rows(out) -> list[dict]:
    columns = [schema.ID, schema.SOURCE_ID, schema.SPLIT, schema.RECIPE, schema.GROUP, schema.SEED]
    return pq.read_table(out / "data", columns=columns).to_pylist()


def write_groups(toy, tiny, path, *extra) -> dict[str, int]:
    """A groups file with a group per source unlike the dataset's own groups.csv."""
    from engine.readers import inspect_source, source_rows

    sources = source_rows(inspect_source(config(toy, tiny, path.parent / "x", *extra).data))
    groups = {r[schema.SOURCE_ID]: 500 + i for i, r in enumerate(sources)}
    path.write_text("source_id,group\n" + "".join(f"{s},{g}\n" for s, g in groups.items()))
    return groups


def test_synthetic_only_on_every_split(ray_local, toy, tiny_models_dir, tmp_path):
    """include_real: false and expand_splits: null: every read split gets K synthetic rows per source and
    no real row (a synthetic row's group is -1: groups describe the real image's background)."""
    from engine.pipeline import run_generate
    from engine.readers import inspect_source, source_rows

    splits = "data.splits=[train,val]"
    sources = {
        r[schema.SOURCE_ID]
        for r in source_rows(inspect_source(config(toy, tiny_models_dir, tmp_path, splits).data))
    }
    out = tmp_path / "out"
    cfg = config(toy, tiny_models_dir, out, splits, "data.expand_splits=null", "output.include_real=false")
    assert cfg.data.expand_splits is None and cfg.num_variants == 2
    report = run_generate(cfg)
    rows = read_rows(out)
    assert report.data["errors"]["total"] == 0
    assert [r for r in rows if r[schema.RECIPE] == schema.RECIPE_REAL] == []
    per_source = {s: 0 for s in sources}
    for r in rows:
        per_source[r[schema.SOURCE_ID]] += 1
    assert set(per_source.values()) == {2}, "K=2 synthetic rows for every source of every split"
    assert {r[schema.SPLIT] for r in rows} == {"train", "val"}
    assert {r[schema.GROUP] for r in rows} == {-1}


def test_overwrite_replaces_another_configs_shards(ray_local, toy, tiny_models_dir, tmp_path):
    from engine.pipeline import run_generate

    out = tmp_path / "out"
    run_generate(config(toy, tiny_models_dir, out, "seed=0"))
    first = read_rows(out)
    # Another seed is another config: refused without overwrite, a clean replacement with it.
    with pytest.raises(ValueError, match="seed"):
        run_generate(config(toy, tiny_models_dir, out, "seed=1", "output.overwrite=false"))
    # The replacing run also takes its groups from a configured file: real rows carry them into the shards.
    groups = write_groups(toy, tiny_models_dir, tmp_path / "my_groups.csv")
    report = run_generate(
        config(
            toy,
            tiny_models_dir,
            out,
            "seed=1",
            "output.overwrite=true",
            f"data.groups_file={tmp_path / 'my_groups.csv'}",
        )
    )
    second = read_rows(out)
    for r in second:
        expected = groups[r[schema.SOURCE_ID]] if r[schema.RECIPE] == schema.RECIPE_REAL else -1
        assert r[schema.GROUP] == expected, r
    assert len(second) == len(first) == report.data["rows"]["real_in"] * 3  # real + K=2, nothing left over
    assert not {r[schema.ID] for r in first} & {r[schema.ID] for r in second}
    assert {r[schema.SEED] for r in first if r[schema.RECIPE] != schema.RECIPE_REAL}.isdisjoint(
        {r[schema.SEED] for r in second if r[schema.RECIPE] != schema.RECIPE_REAL}
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True


def test_rerun_after_a_failed_run_completes(ray_local, toy, tiny_models_dir, tmp_path):
    """A run whose background stage cannot start (height not a multiple of 8) exits 2; the same command with
    the height fixed then runs to completion on the same output."""
    from jobs import generate

    out = tmp_path / "out"

    def args(*extra):
        return [a for s in overrides(toy, tiny_models_dir, out, *extra) for a in ("--set", s)]

    from engine.readers import inspect_source, source_rows

    num_sources = len(source_rows(inspect_source(config(toy, tiny_models_dir, out).data)))
    assert generate.main(args("background.height=60")) == 2
    assert generate.main(args()) == 0
    run = json.loads((out / "run.json").read_text())
    rows = read_rows(out)
    assert run["errors"]["total"] == 0 and len(rows) == 3 * num_sources  # real + K=2 each
    assert len({r[schema.ID] for r in rows}) == len(rows)
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
