"""Ray Train end to end on CPU: a 2-worker run, resume from a checkpoint, the sweep; plus the model and the
decode/augment step. The shards are toy-dataset rows written by tests/test_mixing.py's `write_toy_shards`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_mixing import write_toy_shards

from engine import schema
from engine.config import load_config
from engine.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = {"num_classes": 3, "train_per_class": 8, "val_per_class": 3, "test_per_class": 3, "size": 32}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_toy_shards(tmp_path_factory.mktemp("train-shards"), num_variants=2, **TINY)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    # 4 logical CPUs on 2 cores: two workers plus Ray Data tasks schedule without waiting on each other.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    """The toy config made small: 32 px, one worker unless a test asks for two."""
    return [
        f"data.paths={json.dumps([str(shards)])}",
        "data.image_size=32",
        f"output.path={out}",
        "batch_size=8",
        "scaling.num_workers=1",
        "scaling.resources_per_worker={CPU: 1}",
        *extra,
    ]


def make_config(shards: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, ROOT / "configs" / "train_toy_cpu.yaml", overrides(shards, out, *extra))


def test_driver_modules_do_not_import_torch():
    code = (
        "import sys, engine.train, engine.train.config, engine.train.mixing, engine.train.data, "
        "engine.train.evaluation, engine.train.loop, engine.train.runner, jobs.train, jobs.sweep\n"
        "heavy = [m for m in ('torch', 'torchvision', 'timm', 'transformers') if m in sys.modules]\n"
        "print(heavy)\nsys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_model_loads_local_pretrained_weights(tmp_path):
    import torch
    from safetensors.torch import save_file

    from engine.train.loop import build_model

    source = build_model({"name": "test_resnet"}, num_classes=10)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, weights)
    loaded = build_model({"name": "test_resnet", "pretrained": {"id": str(weights)}}, num_classes=3)
    assert loaded.get_classifier().out_features == 3, "a new head for the run's classes"
    assert torch.equal(loaded.conv1[0].weight, source.conv1[0].weight), "the backbone comes from the file"
    fresh = build_model({"name": "test_resnet"}, num_classes=3)
    assert not torch.equal(fresh.conv1[0].weight, source.conv1[0].weight)
    pickled = tmp_path / "weights.pth"
    torch.save(source.state_dict(), pickled)
    with pytest.raises(ValueError, match="allow_pickle"):
        build_model({"name": "test_resnet", "pretrained": {"id": str(pickled)}}, 3)
    allowed = build_model(
        {"name": "test_resnet", "pretrained": {"id": str(pickled), "allow_pickle": True}}, 3
    )
    assert torch.equal(allowed.conv1[0].weight, source.conv1[0].weight)
    with pytest.raises(ValueError, match="must be a local weights file"):
        build_model({"name": "test_resnet", "pretrained": {"id": "org/model", "revision": "abc"}}, 3)


def test_decode_and_transform_makes_normalized_tensors(shards):
    import pyarrow.parquet as pq

    from engine.train.config import AugmentConfig
    from engine.train.data import POOL_COLUMNS, decode_and_transform

    batch = pq.read_table(next(shards.glob("*.parquet")), columns=[*POOL_COLUMNS]).slice(0, 6)
    batch = {name: batch[name].to_numpy(zero_copy_only=False) for name in batch.column_names}
    kwargs = {
        "image_size": 24,
        "augment": AugmentConfig(rand_augment=True).model_dump(),
        "seed": 0,
        "epoch": 0,
    }
    train = decode_and_transform(batch, train=True, **kwargs)
    assert train["image"].shape == (6, 3, 24, 24) and train["image"].dtype == np.float32
    assert np.array_equal(train["image"], decode_and_transform(batch, train=True, **kwargs)["image"]), (
        "seeded"
    )
    other_epoch = decode_and_transform(batch, train=True, **{**kwargs, "epoch": 1})
    assert not np.array_equal(train["image"], other_epoch["image"])
    evaluation = decode_and_transform(batch, train=False, **kwargs)
    assert -3 < evaluation["image"].mean() < 3
    assert train["synthetic"].tolist() == [int(r != schema.RECIPE_REAL) for r in batch[schema.RECIPE]]


def test_two_worker_run_follows_the_plan_and_writes_its_outputs(shards, tmp_path, local_ray):
    from jobs.train import run_training

    config = make_config(
        shards,
        tmp_path,
        "epochs=3",
        "mix.strategy=two_phase",
        "mix.phase2_epochs=1",
        "scaling.num_workers=2",
    )
    metrics = run_training(config)

    run_dir = tmp_path / "two_phase-seed0"
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["test"] == metrics["test"]
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert (
        Path(metrics["checkpoint"]).parent == run_dir and (Path(metrics["checkpoint"]) / "state.pt").exists()
    )
    history = metrics["history"]
    assert [h["phase"] for h in history] == [1, 1, 2]
    # What the workers counted is what the plan dealt: phase 1 = 24 real + 48 synthetic, phase 2 real only.
    assert [h["train_rows"] for h in history] == [
        {"real": p["real"], "synthetic": p["synthetic"]} for p in metrics["plan"]
    ]
    assert [h["train_rows"]["synthetic"] for h in history] == [48, 48, 0]
    assert all(h["train_rows"]["real"] == 24 for h in history)
    assert all(h["val_synthetic_rows"] == 0 for h in history), "validation never sees a synthetic row"
    assert history[2]["lr"] <= config.optim.lr * config.mix.phase2_lr_scale
    test = metrics["test"]
    assert test["num_rows"] == 9 and test["synthetic_rows"] == 0
    assert np.array(test["confusion_matrix"]).sum() == 9 and len(test["confusion_matrix"]) == 3
    assert set(test["per_class"]) == {"circle", "cross", "diamond"}
    assert test["worst_group"] is not None and test["worst_group"] <= test["top1"]


def test_a_second_run_resumes_from_the_latest_checkpoint(shards, tmp_path, local_ray):
    from engine.train.runner import prepare_run_dir
    from jobs.train import main, run_training

    first = run_training(make_config(shards, tmp_path, "epochs=1", "mix.strategy=replace"))
    assert first["resumed_from_epoch"] is None and len(first["history"]) == 1

    # The second run goes through the command line, as a user resuming would.
    args = overrides(shards, tmp_path, "epochs=2", "mix.strategy=replace")
    assert (
        main(["--config", str(ROOT / "configs" / "train_toy_cpu.yaml"), *(f"--set={a}" for a in args)]) == 0
    )
    second = json.loads((tmp_path / "replace-seed0" / "metrics.json").read_text())
    assert second["resumed_from_epoch"] == 0
    assert len(second["history"]) == 2 and second["history"][0] == first["history"][0]
    # The resumed epoch used the plan an uninterrupted run would have: epoch 1's own replacement draw.
    assert second["history"][1]["train_rows"]["synthetic"] == second["plan"][1]["synthetic"]

    with pytest.raises(ValueError, match=r"different \['mix'\]"):
        prepare_run_dir(
            make_config(shards, tmp_path, "epochs=2", "mix.strategy=replace", "mix.replace_prob=0.9")
        )


def test_sweep_runs_a_variant_and_prints_the_table(shards, tmp_path, local_ray, capsys):
    from jobs.sweep import compare_strategies, print_table

    overrides = ("data.image_size=32", "epochs=1", "batch_size=8", "scaling.num_workers=1")
    rows = compare_strategies([str(shards)], str(tmp_path), strategies=("concat",), overrides=overrides)
    assert [(r["variant"], r["seed"], r["synthetic_per_epoch"]) for r in rows] == [("concat", 0, 48)]
    assert 0 <= rows[0]["test_top1"] <= 1
    assert Path(rows[0]["run_dir"]) == tmp_path / "runs" / "concat-seed0"
    summary = json.loads((tmp_path / "sweep.json").read_text())["summary"]
    assert [s["variant"] for s in summary] == ["concat"]
    assert "| concat | concat | 1 |" in (tmp_path / "sweep.md").read_text()
    print_table(rows)
    assert "concat" in capsys.readouterr().out


def test_sweep_summary_is_mean_and_std_over_seeds():
    from jobs.sweep import format_markdown, summarize

    def row(variant, seed, top1, worst):
        return {
            "variant": variant,
            "strategy": variant,
            "seed": seed,
            "test_top1": top1,
            "test_worst_group": worst,
            "val_top1": None,
            "synthetic_per_epoch": 10.0 * seed,
        }

    rows = [
        row("real", 0, 0.5, 0.0),
        row("concat", 0, 0.6, 0.2),
        row("real", 1, 0.7, 0.1),
        row("concat", 1, 0.8, 0.4),
    ]
    summary = summarize(rows)
    assert [s["variant"] for s in summary] == ["real", "concat"]
    assert summary[0]["test_top1"]["mean"] == pytest.approx(0.6)
    assert summary[0]["test_top1"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert summary[1]["test_worst_group"]["mean"] == pytest.approx(0.3)
    assert summary[0]["val_top1"]["mean"] is None
    assert "| real | real | 2 | 60.0 ± 14.1 | 5.0 ± 7.1 | n/a | 5 |" in format_markdown(rows)
