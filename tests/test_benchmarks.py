"""The benchmarks run end to end in their smoke sizes and report what `make bench` prints (no timing checks)."""

import json

import numpy as np
import pytest


def test_compositor_benchmark_smoke(tmp_path):
    from benchmarks import compositor

    data = compositor.run(sizes=(64, 96), num_images=2, repeats=1, out_dir=tmp_path)

    assert json.loads((tmp_path / "compositor.json").read_text()) == data
    assert "vs PIL" in (tmp_path / "compositor.md").read_text()
    assert {"machine", "versions", "settings", "results"} <= set(data)
    results = data["results"]
    assert {r["size"] for r in results} == {64, 96}
    for size in (64, 96):
        kinds = {(r["implementation"], r["cv2_threads"]) for r in results if r["size"] == size}
        assert {("pil", 1), ("composite_one", 1), ("compositor_batch", 1)} <= kinds
    for r in results:
        assert r["images_per_s"] > 0 and r["images_per_s_median"] > 0 and r["speedup_vs_pil"] > 0
        assert r["images"] == 2
    assert all(r["speedup_vs_pil"] == 1.0 for r in results if r["implementation"] == "pil")


def test_pil_baseline_pastes_the_subject():
    """The baseline does the same job: the subject lands whole, with the drawn scale, on the background."""
    import numpy as np

    from benchmarks.compositor import composite_one_pil, make_rows
    from engine.config import CompositeConfig

    config = CompositeConfig(rotation_deg=(0.0, 0.0), scale=(1.0, 1.0), flip_prob=0.0, feather_px=0.0)
    image, mask, background, seed = make_rows(128, 1)[0]
    out, out_mask, bbox = composite_one_pil(image, mask, background, seed, config)
    assert out.shape == image.shape and out_mask.shape == mask.shape
    assert abs(int((out_mask > 0).sum()) - int((mask > 0).sum())) <= 2
    # Unrotated, unscaled: the pasted pixels are the subject's pixels.
    ys, xs = np.nonzero(mask > 0)
    oy, ox = np.nonzero(out_mask > 0)
    shift = (oy.min() - ys.min(), ox.min() - xs.min())
    assert np.array_equal(out[ys + shift[0], xs + shift[1]], image[ys, xs])
    assert bbox.tolist() == [ox.min(), oy.min(), ox.max() + 1, oy.max() + 1]


@pytest.mark.slow
def test_engine_overhead_benchmark_smoke(tmp_path, tiny_models_dir):
    from benchmarks import engine_overhead

    data = engine_overhead.run(engine_overhead.SMOKE, out_dir=tmp_path)

    assert json.loads((tmp_path / "engine_overhead.json").read_text()) == data
    assert "whole pipeline" in (tmp_path / "engine_overhead.md").read_text()
    settings = engine_overhead.SMOKE
    n, big = settings.num_images, settings.num_images * settings.memory_scale
    assert set(data["end_to_end"]) == {str(n), str(big)}
    for images, run in ((n, data["end_to_end"][str(n)]), (big, data["end_to_end"][str(big)])):
        # Every source expanded into K synthetic rows, all written and timed.
        assert run["synthetic_rows"] == images * settings.num_variants
        assert run["wall_rows_per_s"] > 0 and run["first_output_s"] > 0
        assert run["memory"]["peak_driver_rss_mib"] > 0 and run["memory"]["samples"] >= 2
        assert run["memory"]["peak_object_store_mib"] >= 0
        assert {"decode", "prompt", "background", "composite"} <= set(run["busy_s"])

    stages = [s["stage"] for s in data["stages_alone"]]
    assert stages == [
        "read",
        "skip_done",
        "read_bytes",
        "decode",
        "expand",
        "write_real",
        "prompt",
        "background",
        "composite",
        "write",
    ]
    for s in data["stages_alone"]:
        assert s["synthetic_rows"] == big * settings.num_variants, s
        assert s["wall_rows_per_s"] > 0 and s["outputs"] >= 1
    actors = {s["stage"]: s for s in data["stages_alone"] if s["kind"] == "actor"}
    assert set(actors) == {"prompt", "background", "composite"}
    assert actors["background"]["batch_size"] == 8 and actors["background"]["num_cpus"] == 0.25
    assert data["ratio"]["wall"] > 0 and data["ratio"]["slowest_stage_wall"] in stages


def test_efficacy_proxy_pastes_the_subject_on_noise_and_reports_every_group(tmp_path):
    from benchmarks import efficacy_proxy

    rng = np.random.default_rng(0)
    image = np.full((16, 16, 3), 200, np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 255
    image[4:8, 4:8] = (10, 20, 30)
    pasted = efficacy_proxy.paste_on_noise(rng, image, mask)
    assert pasted.shape == image.shape
    assert (np.all(pasted == (10, 20, 30), axis=-1)).sum() >= 4, "the subject's pixels are in the output"
    assert (np.all(pasted == 200, axis=-1)).sum() == 0, "none of the original background is"
    # The oracle's background: one of the named toy types, as the toy draws it (water is mostly blue).
    on_water = efficacy_proxy.paste_on_noise(np.random.default_rng(1), image, mask, ["water"])
    outside = ~np.all(on_water == (10, 20, 30), axis=-1)
    assert on_water[outside][:, 2].mean() > on_water[outside][:, 0].mean() + 40

    results = efficacy_proxy.main(
        ["--out", str(tmp_path / "toy"), "--size", "16", "--num-classes", "2", "--train-per-class", "4"]
        + ["--eval-per-group", "2", "--k", "0", "2", "--budget", "16", "--threads", "1"]
    )
    assert [r["k"] for r in results] == [0, 2]
    for r in results:
        assert len(r["groups"]) == 4 and r["test_worst_group"] == min(r["groups"])
        assert 0 <= r["test_top1"] <= 1


def test_oracle_recomposites_each_synthetic_row_on_a_toy_drawn_background():
    import pyarrow as pa

    from benchmarks.oracle import RECIPE, decode, encode, oracle_rows, real_rows
    from engine import schema
    from engine.config import CompositeConfig
    from engine.tiny.toy_dataset import render_example

    image, mask = render_example(np.random.default_rng(1), "cross", "grass", 32)
    base = {
        schema.LABEL: 1,
        schema.CLASS_NAME: "cross",
        schema.SPLIT: "train",
        schema.SOURCE_ID: "train/cross/0.png",
    }
    real = {**base, schema.ID: "r", schema.RECIPE: "real", schema.IMAGE: encode(image), schema.MASK: encode(mask),
            schema.SEED: 0, schema.GROUP: 4}  # fmt: skip
    noise = np.random.default_rng(0).integers(0, 255, image.shape, dtype=np.uint8)
    synthetic = [
        {
            **base,
            schema.ID: f"s{i}",
            schema.RECIPE: "aga",
            schema.IMAGE: encode(noise),
            schema.MASK: encode(mask),
            schema.SEED: 1000 + i,
            schema.GROUP: 5,
        }  # fmt: skip
        for i in range(12)
    ]
    table = pa.Table.from_pylist([real, *synthetic], schema=schema.OUTPUT_SCHEMA)
    backgrounds = ["grass", "water", "sand", "brick"]
    out = oracle_rows(table, backgrounds, CompositeConfig()).to_pylist()
    assert out[0] == table.to_pylist()[0], "real rows are copied as they are"
    drawn = set()
    for row in out[1:]:
        assert row[schema.RECIPE] == RECIPE and row[schema.PROMPT] in backgrounds
        kind = backgrounds.index(row[schema.PROMPT])
        assert row[schema.GROUP] == 1 * 4 + kind and row[schema.SOURCE_ID] == base[schema.SOURCE_ID]
        composite, new_mask = decode(row[schema.IMAGE]), decode(row[schema.MASK], "L") > 127
        # The subject is the real one (its colour inside its feathered edge), the rest is not the AGA row's
        # noise any more.
        import cv2

        inner = cv2.erode(new_mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        assert np.abs(composite[inner].mean(0) - image[mask > 127].mean(0)).max() < 25
        assert np.abs(composite[~new_mask].astype(int) - noise[~new_mask]).mean() > 30
        drawn.add(kind)
    assert len(drawn) >= 3, "background types are drawn per row"
    # Deterministic: the same rows give the same oracle.
    assert oracle_rows(table, backgrounds, CompositeConfig()).to_pylist() == out
    # A run writes its real rows to shards of their own: the sources come from the whole run.
    shard = table.slice(1)
    with pytest.raises(KeyError):
        oracle_rows(shard, backgrounds, CompositeConfig())
    assert oracle_rows(shard, backgrounds, CompositeConfig(), real_rows(table)).to_pylist() == out[1:]


def test_domain_generator_data_pairs_each_image_with_its_filled_background(tmp_path):
    import csv

    import cv2

    from benchmarks.domain_generator import prepare_data
    from engine.tiny.toy_dataset import make_toy_dataset

    make_toy_dataset(
        tmp_path / "toy", num_classes=2, train_per_class=3, val_per_class=1, test_per_class=1, size=32
    )
    out = prepare_data(tmp_path / "toy", tmp_path / "data")
    with open(out / "captions.csv") as f:
        captions = {row["source_id"]: row["caption"] for row in csv.DictReader(f)}
    assert len(captions) == 12 and not any(k.startswith(("val/", "test/")) for k in captions)
    with open(tmp_path / "toy" / "groups.csv") as f:
        background_of = {row["source_id"]: row["background"] for row in csv.DictReader(f)}
    for source_id, background in background_of.items():
        if not source_id.startswith("train/"):
            continue
        shape = source_id.split("/")[1]
        assert captions[source_id] == f"a {shape} on {background}"
        filled_id = source_id.replace(".png", "_bg.png")
        assert captions[filled_id] == background, "the filled image is captioned by its background alone"
        image, filled = cv2.imread(str(out / source_id)), cv2.imread(str(out / filled_id))
        mask = cv2.imread(str(tmp_path / "toy" / "masks" / source_id), cv2.IMREAD_GRAYSCALE) > 0
        assert np.array_equal(image, cv2.imread(str(tmp_path / "toy" / source_id)))
        assert (
            not np.array_equal(filled[mask], image[mask]) and (filled != image).any(-1).sum() < 3 * mask.sum()
        )


@pytest.mark.slow  # a job on a Ray of its own: slow as the shared Ray's tests are (SHARED_RAY_FIXTURES, conftest)
def test_domain_generator_judges_rank_a_right_image_above_a_wrong_one(tmp_path):
    """The fidelity scorer: judges trained briefly on real toy images read held-out ones far above chance
    (25%), and a constructed image of the prompt's class and background is scored right."""
    import torch

    from benchmarks.domain_generator import judge_images, predict, to_tensor, train_judge
    from engine.tiny.toy_dataset import render_example

    splits, classes, backgrounds = judge_images(4, 32, 200, 0, tmp_path)
    x, y_class, y_background = splits["train"]
    # 200 per class for 10 epochs reads held-out shapes at about 63% (the benchmark's 300 x 20: 89%).
    shape = train_judge(x[y_class >= 0], y_class[y_class >= 0], 4, epochs=10, seed=0)
    background = train_judge(x, y_background, 4, epochs=4, seed=1)
    x, y_class, y_background = splits["test"]
    assert (predict(background, x) == y_background).mean() > 0.9
    assert (predict(shape, x[y_class >= 0]) == y_class[y_class >= 0]).mean() > 0.45
    image, _ = render_example(np.random.default_rng(5), "circle", "sand", 32)
    with torch.no_grad():
        scores = background(to_tensor(image[None]))[0]
    assert scores[backgrounds.index("sand")] > scores[backgrounds.index("grass")]
    assert classes == ["circle", "cross", "diamond", "hexagon"]


def test_test_durations_table_sums_each_module_and_compares_two_runs(tmp_path):
    from benchmarks.test_durations import main, module_times, table

    def junit(path, cases):
        body = "".join(
            f'<testcase classname="tests.{module}" name="{name}" time="{seconds}"/>'
            for module, name, seconds in cases
        )
        path.write_text(
            f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>'
        )
        return str(path)

    def phases(path, cases):  # what tests/conftest.py writes under SYNTHRAY_TEST_PHASES
        lines = [
            json.dumps({"nodeid": f"tests/{module}.py::{name}", "when": when, "s": seconds})
            for module, name, when, seconds in cases
        ]
        path.write_text("\n".join(lines) + "\n")
        return str(path)

    before = junit(
        tmp_path / "before.xml",
        [("test_a", "test_x", 10.0), ("test_a", "test_y", 5.5), ("test_b", "test_z", 2.0)],
    )
    after = phases(
        tmp_path / "after.jsonl",
        [
            ("test_a", "test_x", "setup", 3.0),
            ("test_a", "test_x", "call", 1.0),
            ("test_a", "test_y", "call", 1.0),
            ("test_b", "test_z", "call", 2.5),
            ("test_b", "test_w", "setup", 0.5),
            ("test_b", "test_w", "call", 2.0),
            ("test_b", "test_w", "teardown", 0.5),
        ],
    )
    times = module_times(before)
    assert times["tests/test_a.py"] == {
        "tests": 2, "seconds": 15.5, "setup": None, "call": None, "slowest": (10.0, "test_x")
    }  # fmt: skip
    split = module_times(after)
    assert split["tests/test_b.py"] == {
        "tests": 2, "seconds": 5.5, "setup": 0.5, "call": 4.5, "slowest": (3.0, "test_w")
    }  # fmt: skip
    lines = table(split, times).splitlines()
    assert lines[2].startswith(
        "| tests/test_b.py | 1 | 2 | 2 | 6 | 0 | 4 | +4 | test_w (3) |"
    )  # slowest first
    assert lines[3].startswith("| tests/test_a.py | 2 | 16 | 2 | 5 | 3 | 2 | -10 |")
    assert lines[-1] == "| **total** | 3 | 18 | 4 | 10 | 4 | 6 | -7 | |"
    assert table(times).splitlines()[-1] == "| **total** | 3 | 18 |  |  | |"
    assert main([after]) == 0
