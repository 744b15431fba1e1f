"""The UniDiffDA recipe through the engine on a local Ray: class pools, shards per mode, a rerun with the same
seed, and the training job on the modes' outputs. Each shipped preset also runs in
tests/test_shipped_configs_e2e.py; the generator's per-mode contract is tests/test_generator.py."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine import schema
from engine.config import GenerateConfig, load_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def generate_config(toy: Path, models: Path, out: Path, mode: str, *extra: str) -> GenerateConfig:
    preset = {
        "txt2img": "real_guidance",
        "sdedit": "real_guidance",
        "ddim_interp": "diff_ii",
        "diffmix": "diff_mix",
        "instruct_pix2pix": "diffusemix",
    }[mode]
    model = "ip2p" if mode == "instruct_pix2pix" else "sd15"
    return load_config(
        GenerateConfig,
        ROOT / "configs" / f"unidiffda_{preset}_tiny_cpu.yaml",
        [
            f"data.path={toy}",
            f"output.path={out}",
            f"generation.mode={mode}",
            f"generation.model.id={models / model}",
            "generation.num_inference_steps=2",
            "ray.progress_bars=false",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def runs(ray4, toy, tiny_models_dir, tmp_path_factory) -> dict[str, Path]:
    """One run per mode the training test reads (txt2img draws no real image, ddim_interp reads the class
    pool, diffmix writes soft labels)."""
    from engine.pipeline import run_generate

    out = {}
    for mode in ("txt2img", "ddim_interp", "diffmix"):
        path = tmp_path_factory.mktemp(mode)
        report = run_generate(generate_config(toy, tiny_models_dir, path, mode)).data
        assert report["errors"]["total"] == 0, report["errors"]
        out[mode] = path
    return out


def rows(out: Path) -> list[dict]:
    return sorted(pq.read_table(out / "data").to_pylist(), key=lambda r: r[schema.ID])


def test_each_mode_writes_its_rows_with_their_parameters(runs):
    for mode, out in runs.items():
        synthetic = [r for r in rows(out) if r[schema.RECIPE] == "unidiffda"]
        assert len(synthetic) == 12 * 2, mode  # 4 train images x 3 classes, K=2
        params = [json.loads(r[schema.PARAMS])["generation"] for r in synthetic]
        assert {p["mode"] for p in params} == {mode}
        assert all(r[schema.WIDTH] == r[schema.HEIGHT] == 32 for r in synthetic)
        soft = [r[schema.SOFT_LABEL] for r in synthetic]
        if mode == "diffmix":
            assert all(abs(sum(e["weight"] for e in s) - 1) < 1e-6 for s in soft)
            assert all(s[0]["label"] == r[schema.LABEL] for s, r in zip(soft, synthetic, strict=True))
        else:
            assert all(s is None for s in soft)
        if mode == "ddim_interp":
            for p, r in zip(params, synthetic, strict=True):
                partner = p["partner"]
                assert partner != r[schema.SOURCE_ID] and partner.split("/")[1] == r[schema.CLASS_NAME]


def test_the_same_seed_gives_byte_identical_shards(runs, toy, tiny_models_dir, tmp_path):
    """ddim_interp: the class pool is rebuilt and every row draws the same partner, weight and noise."""
    from engine.pipeline import run_generate

    config = generate_config(toy, tiny_models_dir, tmp_path, "ddim_interp")
    run_generate(config)
    again, first = rows(tmp_path), rows(runs["ddim_interp"])
    assert [r[schema.ID] for r in again] == [r[schema.ID] for r in first]
    assert all(a[schema.IMAGE] == b[schema.IMAGE] for a, b in zip(again, first, strict=True))
    assert [r[schema.PARAMS] for r in again] == [r[schema.PARAMS] for r in first]


def test_class_pools_hold_at_most_m_rows_per_class_whatever_the_order(ray4, toy):
    import ray.data

    from engine.config import DataConfig
    from engine.readers import read_file_bytes, read_source
    from engine.stages.class_pools import PoolSpec, build_class_pool

    data = DataConfig(path=str(toy), splits=["train", "val", "test"])
    ds, _ = read_source(data, ray.data)
    spec = PoolSpec(max_per_class=3, splits=("train",))
    pool = build_class_pool(ds, spec, seed=7)
    assert pool.sizes == {"circle": 3, "cross": 3, "diamond": 3}
    assert all(s.startswith(f"train/{name}/") for name, ids in pool.members.items() for s in ids)
    first = pool.members["cross"][0]
    assert pool.row(first)[schema.IMAGE_BYTES][:4] == b"\x89PNG"
    shuffled = build_class_pool(ds.random_shuffle(seed=1).repartition(3), spec, seed=7)
    assert shuffled.members == pool.members, "the sample is a function of the seed and the ids only"
    assert build_class_pool(ds, spec, seed=8).members != pool.members
    # From the folder listing (as the generation job builds it): only the members' files are read.
    listing, _ = read_source(data, ray.data, with_bytes=False)
    from_paths = build_class_pool(listing, spec, seed=7, read_bytes=read_file_bytes)
    assert from_paths.members == pool.members
    assert from_paths.row(first) == pool.row(first)
    partners = {pool.partner("cross", first, seed) for seed in range(30)}
    assert first not in partners and partners == set(pool.members["cross"]) - {first}


def test_a_pool_member_alone_in_its_class_gets_no_partner(ray4, toy, tiny_models_dir, tmp_path):
    """pool_size=1: each class's one member has no other image to pair with (an error row, never a
    self-pair); every other row of the class pairs with that member."""
    from engine.pipeline import run_generate

    config = generate_config(toy, tiny_models_dir, tmp_path, "ddim_interp", "generation.pool_size=1")
    report = run_generate(config).data
    assert report["errors"]["by_reason"] == {"no_partner": 6}  # 3 members x K=2
    errors = pq.read_table(tmp_path / "errors.parquet").to_pylist()
    alone = {e[schema.SOURCE_ID] for e in errors}
    assert len(alone) == 3 and {s.split("/")[1] for s in alone} == {"circle", "cross", "diamond"}
    written = [r for r in rows(tmp_path) if r[schema.RECIPE] == "unidiffda"]
    assert len(written) == 18
    assert {json.loads(r[schema.PARAMS])["generation"]["partner"] for r in written} == alone


@pytest.mark.parametrize("strategy", ["two_phase", "replace", "rsp"])
def test_the_training_job_trains_on_every_modes_rows(runs, tmp_path, strategy):
    """Ray Train over the three modes' outputs (their real rows are one dataset's), soft rows included, with
    each strategy that draws synthetic rows (two_phase's first phase is concat, its second real). Which rows
    each strategy picks, soft ones included, is tests/test_mixing.py's."""
    from engine.train.config import TrainConfig
    from jobs.train import run_training

    paths = [str(out / "data") for out in runs.values()]
    config = load_config(
        TrainConfig,
        ROOT / "configs" / "train_toy_cpu.yaml",
        [
            f"data.paths={json.dumps(paths)}",
            "data.image_size=32",
            f"output.path={tmp_path}",
            "epochs=2",
            "batch_size=16",
            f"mix.strategy={strategy}",
            "mix.phase2_epochs=1",
            "scaling.num_workers=1",
            "scaling.resources_per_worker={CPU: 1}",
        ],
    )
    metrics = run_training(config)
    assert metrics["data"]["train_soft_label"] == 24
    history = metrics["history"]
    assert all(np.isfinite(h["train_loss"]) for h in history)
    rows = [h["train_rows"] for h in history]
    if strategy == "two_phase":
        assert rows == [{"real": 12, "synthetic": 72}, {"real": 12, "synthetic": 0}]
    elif strategy == "replace":  # each real row or, with p = 0.5, one of its own variants
        assert all(r["real"] + r["synthetic"] == 12 and 0 < r["synthetic"] < 12 for r in rows), rows
    else:  # rsp: every real row, each synthetic row with p = 0.5
        assert all(r["real"] == 12 and 0 < r["synthetic"] < 72 for r in rows), rows
    assert metrics["test"]["num_rows"] == 6
