"""Ray Train end to end on CPU: a 2-worker run, resume from a checkpoint, the sweep; plus the model and the
decode/augment step. The shards are toy-dataset rows written by tests/test_mixing.py's `write_toy_shards`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_mixing import soft_label_of, with_soft_rows, write_toy_shards

from engine import schema
from engine.config import load_config
from engine.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# One image per class x unseen background in test_ood (15): evaluated where a test names data.extra_test_splits.
TINY = {
    "num_classes": 3,
    "train_per_class": 8,
    "val_per_class": 3,
    "test_per_class": 3,
    "size": 32,
    "ood_per_group": 1,
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # Several files, as generation writes them: Ray Data reads them in parallel tasks.
    return write_toy_shards(tmp_path_factory.mktemp("train-shards"), num_variants=2, num_files=6, **TINY)


@pytest.fixture(scope="module")
def local_ray(ray4):
    """The shared local Ray (tests/conftest.py): 4 logical CPUs, two workers plus Ray Data tasks."""


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
        "import sys, engine.train, engine.train.config, engine.train.sources, engine.train.mixing, engine.train.data, "
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
    # AutoAugment (MVC's baseline): seeded like the rest, and it changes the images.
    auto = {**kwargs, "augment": AugmentConfig(auto_augment="cifar10").model_dump()}
    augmented = decode_and_transform(batch, train=True, **auto)["image"]
    assert np.array_equal(augmented, decode_and_transform(batch, train=True, **auto)["image"])
    plain = {**kwargs, "augment": AugmentConfig().model_dump()}
    assert not np.array_equal(augmented, decode_and_transform(batch, train=True, **plain)["image"])


def bad_shards(shards: Path, folder: Path) -> dict[str, str]:
    """Unusable shards next to a good one: file name -> what the error must say."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    # Other rows than the good file's: each bad file alone would pass the row-level checks.
    good, other, third = (pq.read_table(f) for f in sorted(shards.glob("*.parquet"))[:3])
    pq.write_table(good, folder / "good.parquet")
    (folder / "garbage.parquet").write_bytes(b"these bytes are not a Parquet file " * 8)
    labels = other.schema.get_field_index(schema.LABEL)
    pq.write_table(
        other.set_column(labels, schema.LABEL, other[schema.LABEL].cast(pa.string())),
        folder / "str-label.parquet",
    )
    pq.write_table(third.drop_columns([schema.IMAGE]), folder / "no-image.parquet")
    return {
        "garbage.parquet": "not a readable Parquet file",
        "str-label.parquet": "column 'label' is string, expected integer",
        "no-image.parquet": "no 'image' column",
    }


@pytest.mark.parametrize("bad", ["garbage.parquet", "str-label.parquet", "no-image.parquet", "all"])
def test_bad_shards_are_named_before_anything_runs(shards, tmp_path, capsys, bad):
    from jobs.train import main

    expected = bad_shards(shards, tmp_path / "shards")
    if bad != "all":
        for name in set(expected) - {bad}:
            (tmp_path / "shards" / name).unlink()
        expected = {bad: expected[bad]}
    out = tmp_path / "out"
    args = overrides(tmp_path / "shards", out)
    status = main(["--config", str(ROOT / "configs" / "train_toy_cpu.yaml"), *(f"--set={a}" for a in args)])
    error = capsys.readouterr().err
    assert status == 2, error
    for name, why in expected.items():
        assert f"{tmp_path / 'shards' / name}: {why}" in error
    assert "good.parquet" not in error
    assert not out.exists(), "nothing written, no Ray started"


def test_two_worker_run_follows_the_plan_and_writes_its_outputs(shards, tmp_path, local_ray):
    from jobs.train import run_training

    config = make_config(
        shards,
        tmp_path,
        "epochs=3",
        "mix.strategy=two_phase",
        "mix.phase2_epochs=1",
        "scaling.num_workers=2",
        "data.extra_test_splits=[test_ood]",
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
    # Groups flow from the shards into the report: every test group gets its accuracy, the worst is their min.
    import pyarrow.parquet as pq

    rows = pq.read_table(shards, columns=[schema.SPLIT, schema.GROUP]).to_pylist()
    test_groups = {str(r[schema.GROUP]) for r in rows if r[schema.SPLIT] == "test" and r[schema.GROUP] >= 0}
    assert set(test["group_accuracy"]) == test_groups and len(test_groups) > 1
    assert test["worst_group"] == min(test["group_accuracy"].values())
    assert test["top1"] == pytest.approx(np.trace(test["confusion_matrix"]) / 9)
    # The extra test split: its own rows and groups, evaluated with the last weights beside test.
    ood = saved["extra_tests"]["test_ood"]
    assert ood["num_rows"] == 15 and ood["synthetic_rows"] == 0
    ood_groups = {str(r[schema.GROUP]) for r in rows if r[schema.SPLIT] == "test_ood"}
    assert set(ood["group_accuracy"]) == ood_groups and len(ood_groups) == 15
    assert ood["worst_group"] == min(ood["group_accuracy"].values())
    assert metrics["data"]["test_ood"] == 15


def test_sweep_runs_a_variant_and_prints_the_table(shards, tmp_path, local_ray, capsys, monkeypatch):
    from engine.train.sweep_report import print_table
    from jobs.sweep import compare_strategies

    overrides = ("data.image_size=32", "epochs=1", "batch_size=8", "scaling.num_workers=1")
    rows = compare_strategies([str(shards)], str(tmp_path), strategies=("concat",), overrides=overrides)
    assert [(r["variant"], r["seed"], r["synthetic_per_epoch"]) for r in rows] == [("concat", 0, 48)]
    saved = json.loads((tmp_path / "runs" / "concat-seed0" / "metrics.json").read_text())
    assert rows[0]["test_top1"] == saved["test"]["top1"], "the table reports the run's own test metric"
    assert Path(rows[0]["run_dir"]) == tmp_path / "runs" / "concat-seed0"
    summary = json.loads((tmp_path / "sweep.json").read_text())["summary"]
    assert [s["variant"] for s in summary] == ["concat"]
    assert "| concat | concat | 1 |" in (tmp_path / "sweep.md").read_text()
    print_table(rows)
    assert "concat" in capsys.readouterr().out

    # Run again over the same output: the finished run is reused from its metrics.json, in one line.
    import jobs.train
    from engine.train.config import SweepConfig, SweepVariant
    from jobs.sweep import run_sweep

    def retrain(config):
        raise AssertionError(f"{config.run_name()} trained again")

    monkeypatch.setattr(jobs.train, "run_training", retrain)
    again = SweepConfig(
        train_config=str(ROOT / "configs" / "train_toy_cpu.yaml"),
        overrides=[f"data.paths={json.dumps([str(shards)])}", *overrides],
        variants=[SweepVariant(name="concat", set=["mix.strategy=concat"])],
        seeds=[0],
        output=str(tmp_path),
    )
    assert run_sweep(again) == rows
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"sweep: concat seed 0 (1/1): finished earlier, reusing {tmp_path}/runs/concat-seed0/metrics.json"
    ]


def test_sweep_summary_is_mean_and_std_over_seeds():
    from engine.train.sweep_report import format_markdown, summarize

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


# ---------------------------------------------------------------- determinism

# Everything random at once: per-epoch replacement draws, crops + flips + RandAugment, dropout, 2 ranks.
RANDOM_RUN = (
    "epochs=2",
    "mix.strategy=replace",
    "augment.rand_augment=true",
    "model.drop_rate=0.2",
    "scaling.num_workers=2",
    "output.name=random",
)


def comparable(metrics: dict) -> dict:
    """A run's per-epoch history and final metrics without wall times."""
    return {
        "history": [{k: v for k, v in h.items() if k != "epoch_s"} for h in metrics["history"]],
        "val": metrics["val"],
        "test": metrics["test"],
    }


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory, local_ray) -> dict:
    from jobs.train import run_training

    return run_training(make_config(shards, tmp_path_factory.mktemp("uninterrupted"), *RANDOM_RUN))


def test_an_epoch_reaches_a_rank_in_one_order_with_the_same_crops(shards, tmp_path, local_ray):
    from engine.train.data import build_datasets, load_training_data, plan_epochs, summarize_plan, train_key
    from engine.train.loop import loop_config, train_batches

    config = make_config(shards, tmp_path, *RANDOM_RUN, "data.decode_batch_size=8")
    data = load_training_data(config.data)
    plan = plan_epochs(data, config)
    loop = loop_config(config, data.class_names, summarize_plan(data, plan, config), sorted(data.eval))

    def epoch_one_rank_one() -> list:
        # A fresh pool each time, as a second run (or a resumed one) builds it.
        dataset = build_datasets(data, plan, config)[train_key(1, 1)]
        return [
            (b["label"].tolist(), b["image"].numpy()) for b in train_batches(dataset, loop, epoch=1, rank=1)
        ]

    first, second = epoch_one_rank_one(), epoch_one_rank_one()
    assert [labels for labels, _ in first] == [labels for labels, _ in second], "same rows, same order"
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(first, second, strict=True)), (
        "same augmentation"
    )


def test_two_runs_with_one_seed_give_the_same_model(shards, tmp_path, uninterrupted, local_ray):
    from jobs.train import run_training

    again = run_training(make_config(shards, tmp_path, *RANDOM_RUN))
    assert comparable(again) == comparable(uninterrupted)
    losses = [h["train_loss"] for h in again["history"]]
    print(f"per-epoch train loss, both runs: {losses}")
    assert len(set(losses)) == 2, "the epochs differ from each other"


def test_a_killed_run_resumes_to_the_same_model(shards, tmp_path, uninterrupted, local_ray):
    import ray

    from engine.train.runner import prepare_run_dir
    from jobs.train import PLAN, main

    # The job as a user runs it (a driver on this module's Ray, as `ray job submit` would run it), SIGKILLed
    # once Ray Train has registered its first checkpoint; then the same command again, which resumes.
    args = overrides(shards, tmp_path, *RANDOM_RUN)
    command = ["--config", str(ROOT / "configs" / "train_toy_cpu.yaml"), *(f"--set={a}" for a in args)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.train", *command],
        cwd=ROOT,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    run_dir = tmp_path / "random"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (
            list(run_dir.glob("checkpoint_*/state.pt"))
            and (run_dir / "checkpoint_manager_snapshot.json").exists()
        ):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    assert main(command) == 0
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["resumed_from_epoch"] == 0, "killed after its first epoch"
    assert comparable(resumed) == comparable(uninterrupted)
    # Resuming with another sampling rule would mix two runs in one folder.
    with pytest.raises(ValueError, match=r"different \['mix'\]"):
        prepare_run_dir(make_config(shards, tmp_path, *RANDOM_RUN, "mix.replace_prob=0.9"))
    # `epochs` is resumable, but not below what the folder has trained (both epochs of this run).
    with pytest.raises(ValueError, match=r"already trained 2 of epochs, more than epochs=1"):
        prepare_run_dir(make_config(shards, tmp_path, *RANDOM_RUN, "epochs=1"), plan=PLAN)
    prepare_run_dir(make_config(shards, tmp_path, *RANDOM_RUN, "epochs=3"), plan=PLAN)  # longer: resumes


def write_separable_shards(
    out: Path, per_split: dict[str, int], num_classes: int = 3, size: int = 32
) -> Path:
    """Shards where the class is the image's colour (plus pixel noise): any classifier that learns at all
    separates them."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 230]])[:num_classes]
    rows = []
    for split, count in per_split.items():
        for label in range(num_classes):
            for i in range(count):
                pixels = np.clip(colours[label] + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="PNG")
                source = f"{split}/c{label}/{i}.png"
                rows.append(
                    {
                        schema.ID: f"sep-{source}",
                        schema.IMAGE: buf.getvalue(),
                        schema.WIDTH: size,
                        schema.HEIGHT: size,
                        schema.LABEL: label,
                        schema.CLASS_NAME: f"c{label}",
                        schema.SPLIT: split,
                        schema.SOURCE_ID: source,
                        schema.RECIPE: schema.RECIPE_REAL,
                        schema.GROUP: label,
                        schema.SCHEMA_VERSION_COLUMN: schema.SCHEMA_VERSION,
                    }
                )
    data = out / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.OUTPUT_SCHEMA), data / "part-0.parquet")
    return data


def test_training_learns_separable_classes(tmp_path, local_ray):
    """Not a range check: on data a classifier can separate, test top-1 beats chance by three binomial
    standard deviations of the test split's size (a model that learned nothing scores chance)."""
    from jobs.train import run_training

    num_classes, test_per_class = 3, 10
    shards = write_separable_shards(tmp_path, {"train": 16, "val": 4, "test": test_per_class}, num_classes)
    metrics = run_training(make_config(shards, tmp_path / "out", "epochs=4", "mix.strategy=real"))
    n, chance = num_classes * test_per_class, 1 / num_classes
    margin = 3 * (chance * (1 - chance) / n) ** 0.5
    assert metrics["test"]["num_rows"] == n
    assert metrics["test"]["top1"] >= chance + margin, metrics["test"]


# ---------------------------------------------------------------- soft labels


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_probability_targets_give_the_class_index_loss_for_one_hot_rows(label_smoothing):
    import torch

    from engine.train.data import soft_targets

    torch.manual_seed(0)
    logits = torch.randn(6, 4, dtype=torch.float32) * 3
    labels = np.array([0, 1, 2, 3, 1, 2])
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    one_hot = torch.from_numpy(soft_targets(labels, None, 4))
    torch.testing.assert_close(criterion(logits, one_hot), criterion(logits, torch.from_numpy(labels)))
    # A soft row's loss is the cross-entropy with its mix (smoothed as a one-hot row is).
    mix = torch.from_numpy(soft_targets(labels[:1], np.array([soft_label_of(0, 4)], dtype=object), 4))
    smoothed = mix * (1 - label_smoothing) + label_smoothing / 4
    expected = -(smoothed * torch.log_softmax(logits[:1], 1)).sum()
    torch.testing.assert_close(criterion(logits[:1], mix), expected)
    assert not torch.allclose(criterion(logits[:1], mix), criterion(logits[:1], one_hot[:1]))


@pytest.fixture(scope="module")
def soft_shards(shards, tmp_path_factory) -> Path:
    """The train shards with soft labels on every synthetic variant 0; two of the six files are schema
    version 1 (no soft_label column), as a run resumed across the upgrade or two runs' outputs would be."""
    return with_soft_rows(shards, tmp_path_factory.mktemp("soft") / "data", num_classes=3, v1_files=2)


def test_train_batches_carry_each_rows_soft_target(soft_shards, tmp_path, local_ray):
    from engine.stages.batch import object_array
    from engine.train.data import (
        TARGET,
        build_datasets,
        load_training_data,
        plan_epochs,
        soft_targets,
        summarize_plan,
        train_key,
    )
    from engine.train.loop import loop_config, train_batches

    config = make_config(soft_shards, tmp_path, "epochs=1", "mix.strategy=concat")
    data = load_training_data(config.data, seed=config.seed)
    assert 0 < data.num_soft_rows < 24, "the version 1 files' variants stay one-hot"
    plan = plan_epochs(data, config)
    loop = loop_config(config, data.class_names, summarize_plan(data, plan, config), sorted(data.eval))
    batches = list(train_batches(build_datasets(data, plan, config)[train_key(0, 0)], loop, epoch=0, rank=0))
    targets = np.concatenate([b[TARGET].numpy() for b in batches])
    labels = np.concatenate([b["label"].numpy() for b in batches])
    assert targets.shape == (72, 3) and np.allclose(targets.sum(1), 1.0)
    soft = targets.max(1) < 1
    assert soft.sum() == data.num_soft_rows, "every soft row of the plan, no other"
    expected = soft_targets(labels[soft], object_array([soft_label_of(int(x), 3) for x in labels[soft]]), 3)
    assert np.array_equal(targets[soft], expected)
    assert (targets[soft].argmax(1) == labels[soft]).all(), "the dominant class is the row's label"
    assert (targets[~soft].argmax(1) == labels[~soft]).all()


def test_a_low_data_run_trains_on_soft_rows(soft_shards, tmp_path, local_ray, capsys):
    """One Ray Train run for both features (a run costs tens of seconds): two_phase trains on real and soft
    synthetic rows, then real only; data.shots_per_class=10 is above the toy's 8 rows per class. Every
    strategy's selection of soft rows is tests/test_mixing.py's."""
    from jobs.train import run_training

    config = make_config(
        soft_shards,
        tmp_path,
        "epochs=2",
        "mix.strategy=two_phase",
        "mix.phase2_epochs=1",
        "optim.label_smoothing=0.1",
        "data.shots_per_class=10",
    )
    metrics = run_training(config)
    assert 0 < metrics["data"]["train_soft_label"] < 24
    assert [h["train_rows"] for h in metrics["history"]] == [
        {"real": 24, "synthetic": 48},
        {"real": 24, "synthetic": 0},
    ]
    assert all(np.isfinite(h["train_loss"]) for h in metrics["history"])
    assert metrics["test"]["num_rows"] == 9
    # All 8 real rows of each class kept, and the run says so for each class.
    notes = metrics["data"]["notes"]
    assert len(notes) == 3 and all("has 8 real train rows, all kept" in note for note in notes)
    assert notes[0] in capsys.readouterr().err
    assert metrics["data"]["excluded"]["few_shot_real_rows"] == 0


def test_extra_test_splits_must_exist_and_be_new(shards, tmp_path):
    from engine.train.data import load_training_data

    config = make_config(shards, tmp_path, "data.extra_test_splits=[sketch]")
    with pytest.raises(ValueError, match=r"extra_test_splits names \['sketch'\].*'test_ood'"):
        load_training_data(config.data, seed=0)
    with pytest.raises(ValueError, match=r"cannot name \['val'\]"):
        make_config(shards, tmp_path, "data.extra_test_splits=[val]")
    data = load_training_data(make_config(shards, tmp_path, "data.extra_test_splits=[test_ood]").data)
    assert sorted(data.eval) == ["test", "test_ood", "val"] and len(data.eval["test_ood"]) == 15
    assert sorted(load_training_data(make_config(shards, tmp_path).data).eval) == ["test", "val"]
