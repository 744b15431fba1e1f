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

    results = efficacy_proxy.main(
        ["--out", str(tmp_path / "toy"), "--size", "16", "--num-classes", "2", "--train-per-class", "4"]
        + ["--eval-per-group", "2", "--k", "0", "2", "--budget", "16", "--threads", "1"]
    )
    assert [r["k"] for r in results] == [0, 2]
    for r in results:
        assert len(r["groups"]) == 4 and r["test_worst_group"] == min(r["groups"])
        assert 0 <= r["test_top1"] <= 1
