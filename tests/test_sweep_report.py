"""The benchmark side of jobs.sweep without training: deltas with a paired test over seeds, the report files,
the budget in rows, the toy dataset and generation runs reused only when they are the config's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.config import load_config
from engine.train.config import SweepConfig, SweepVariant
from engine.train.sweep_report import compare_with_baseline, report_table, write_report
from jobs.sweep import (
    finished_generation,
    fresh_if_inputs_changed,
    generation_config,
    prepare_toy_dataset,
)

ROOT = Path(__file__).resolve().parents[1]


def _row(variant, seed, top1, worst, attention=None):
    return {
        "variant": variant,
        "strategy": "real" if variant == "real" else "concat",
        "seed": seed,
        "test_top1": top1,
        "test_worst_group": worst,
        "val_top1": top1,
        "subject_attention": attention,
        "synthetic_per_epoch": 0.0 if variant == "real" else 800.0,
        "epochs": 30 if variant == "real" else 10,
    }


ROWS = [
    _row("real", 0, 0.50, 0.10, 0.30),
    _row("real", 1, 0.55, 0.05, 0.32),
    _row("real", 2, 0.52, 0.08, 0.31),
    # A consistent gain in top-1 (significant), a noisy one in worst group (not).
    _row("aga", 0, 0.60, 0.30, 0.50),
    _row("aga", 1, 0.66, 0.00, 0.52),
    _row("aga", 2, 0.61, 0.20, 0.51),
]


def test_deltas_are_paired_by_seed_and_tested():
    deltas = compare_with_baseline(ROWS, "real")
    top1 = deltas["aga"]["test_top1"]
    assert top1["mean"] == pytest.approx(np.mean([0.10, 0.11, 0.09]))
    from scipy.stats import ttest_rel  # inside: the vLLM environment collects this file without scipy

    assert top1["p_value"] == pytest.approx(ttest_rel([0.60, 0.66, 0.61], [0.50, 0.55, 0.52]).pvalue)
    assert top1["significant"] and top1["num_pairs"] == 3
    worst = deltas["aga"]["test_worst_group"]
    assert worst["p_value"] > 0.05 and not worst["significant"]
    # The baseline against itself: every difference 0, the test is undefined, not "significant".
    assert deltas["real"]["test_top1"]["p_value"] is None and not deltas["real"]["test_top1"]["significant"]
    # A seed the baseline lacks is not paired.
    partial = compare_with_baseline([*ROWS, _row("aga", 3, 0.9, 0.9)], "real")
    assert partial["aga"]["test_top1"]["num_pairs"] == 3


def test_report_table_marks_significant_deltas():
    header, body = report_table(ROWS, "real")
    assert header[:5] == ["variant", "seeds", "epochs", "test top-1", "Δ test top-1 vs real"]
    real, aga = body
    assert real[4] == "—" and aga[3] == "62.3 ± 3.2"
    assert aga[4].startswith("+10.0 * (p=")
    assert aga[6].startswith("+9.0 (p=") and "*" not in aga[6]
    assert aga[2] == "10" and aga[-1] == "800"


def test_write_report_files(tmp_path):
    config = SweepConfig(
        train_config="configs/train_toy_cpu.yaml",
        variants=[SweepVariant(name="real"), SweepVariant(name="aga")],
        baseline="real",
        results=str(tmp_path / "results" / "efficacy"),
        notes=["a note"],
    )
    write_report(
        config, ROWS, command="synthray sweep --config x.yaml", load_at_start=(1.0, 2.0, 3.0), wall_s=90
    )
    saved = json.loads((tmp_path / "results" / "efficacy.json").read_text())
    assert saved["command"] == "synthray sweep --config x.yaml" and saved["wall_s"] == 90
    assert saved["loadavg_at_start"] == [1.0, 2.0, 3.0] and saved["machine"]["cpu_count"] >= 1
    assert saved["deltas"]["aga"]["test_top1"]["significant"] and len(saved["runs"]) == 6
    text = (tmp_path / "results" / "efficacy.md").read_text()
    assert "`synthray sweep --config x.yaml`" in text and "- a note" in text and "1.5 min" in text
    assert "| aga | 3 | 10 | 62.3 ± 3.2 | +10.0 * (p=" in text
    assert (tmp_path / "results" / "efficacy.png").read_bytes()[:4] == b"\x89PNG"


def test_baseline_must_be_a_variant():
    with pytest.raises(ValueError, match="baseline 'nope'"):
        SweepConfig(train_config="x.yaml", variants=[SweepVariant(name="real")], baseline="nope")


def test_toy_dataset_is_rebuilt_only_for_other_arguments(tmp_path):
    from engine.train.config import ToyDatasetSpec

    spec = ToyDatasetSpec(
        out=str(tmp_path / "toy"), num_classes=2, train_per_class=2, eval_per_group=1, size=16
    )
    assert prepare_toy_dataset(spec) is True
    assert prepare_toy_dataset(spec) is False
    assert prepare_toy_dataset(spec.model_copy(update={"train_per_class": 3})) is True
    assert len(list((tmp_path / "toy" / "train" / "circle").iterdir())) == 3


def test_a_generation_run_is_reused_only_with_the_same_config_hash(tmp_path):
    from engine.config import config_hash

    config = load_config(SweepConfig, ROOT / "configs" / "bench_efficacy_random_weights.yaml")

    def generation(name: str):
        (variant,) = [v for v in config.variants if v.name == name]
        generate = generation_config(config, variant.generate)
        return generate.model_copy(
            update={"output": generate.output.model_copy(update={"path": str(tmp_path)})}
        )

    generate = generation("aga-k5-filter")
    assert generate.filter is not None and generate.num_variants == 5
    assert not finished_generation(generate)
    run = {"config_hash": config_hash(generate), "failed_attempts": [], "rows": {"synthetic_written": 10}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert finished_generation(generate)
    assert not finished_generation(generation("aga-k5"))  # without the filter: another hash


def test_a_finished_run_is_trained_again_when_its_shards_changed_under_the_same_path(tmp_path):
    """A rebuilt toy dataset regenerates the runs into the same folders: the train config is unchanged, the
    shard names (content hashes) are not."""
    from engine.train.config import TrainConfig

    data = tmp_path / "gen" / "data"
    data.mkdir(parents=True)
    (data / "part-aaa.parquet").write_bytes(b"")
    config = load_config(
        TrainConfig,
        ROOT / "configs" / "train_toy_cpu.yaml",
        [
            f"data.paths={json.dumps([str(data)])}",
            f"output.path={tmp_path / 'runs'}",
            "output.name=real-seed0",
        ],
    )
    sweep_out = tmp_path / "sweep"
    first = fresh_if_inputs_changed(config, sweep_out, "run")
    assert first.output.overwrite, "no record yet: start clean"
    first.run_dir().mkdir(parents=True)  # the run trained
    assert fresh_if_inputs_changed(config, sweep_out, "run") == config, "same shards: reuse or resume"

    (data / "part-aaa.parquet").unlink()
    (data / "part-bbb.parquet").write_bytes(b"")
    again = fresh_if_inputs_changed(config, sweep_out, "run")
    assert again.output.overwrite and again.model_copy(update={"output": config.output}) == config
    assert fresh_if_inputs_changed(config, sweep_out, "run") == config


def test_demo_closing_line_separates_only_beyond_the_test_split_noise(tmp_path):
    from jobs.demo import closing_line

    (tmp_path / "metrics.json").write_text(json.dumps({"test": {"num_rows": 48}}))

    def rows(real, concat):
        return [
            {"variant": "real", "test_top1": real, "run_dir": str(tmp_path)},
            {"variant": "concat", "test_top1": concat, "run_dir": str(tmp_path)},
        ]

    # The demo's "real 25.0 vs concat 25.0": one line pointing to the benchmark instead of a verdict.
    line = closing_line(rows(0.25, 0.25))
    assert line.startswith("The toy demo is too small") and "benchmarks/results/efficacy.md" in line
    assert closing_line(rows(0.25, 0.35)).startswith("The toy demo is too small")  # 48 images: noise ±18
    assert closing_line(rows(0.25, 0.55)).startswith("concat beats real by 30.0 points")


def test_a_local_ray_start_that_times_out_is_retried(monkeypatch, capsys):
    import ray

    import jobs.sweep

    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) < 3:
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = load_config(SweepConfig, ROOT / "configs" / "bench_efficacy.yaml")
    jobs.sweep.start_local_ray(config)
    assert len(calls) == 3 and calls[0]["num_cpus"] == 4
    assert calls[0]["runtime_env"]["env_vars"]["TRANSFORMERS_OFFLINE"] == "1"  # the generation config's
    assert capsys.readouterr().out.count("timed out (attempt") == 2
    # Another error, or the last attempt's timeout, is raised.
    calls.clear()
    monkeypatch.setattr(ray, "init", lambda **kwargs: (_ for _ in ()).throw(Exception("other")))
    with pytest.raises(Exception, match="other"):
        jobs.sweep.start_local_ray(config)


def test_extra_test_splits_get_their_own_columns_and_deltas():
    rows = [
        {**row, "test_ood_top1": row["test_top1"] - 0.2, "test_ood_worst_group": row["test_worst_group"] / 2}
        for row in ROWS
    ]
    header, body = report_table(rows, "real")
    assert header[3:9] == [
        "test top-1", "Δ test top-1 vs real", "test worst-group", "Δ test worst-group vs real",
        "test_ood top-1", "Δ test_ood top-1 vs real",
    ]  # fmt: skip
    assert body[1][7] == "42.3 ± 3.2" and body[1][8].startswith("+10.0 * (p=")
    assert compare_with_baseline(rows, "real")["aga"]["test_ood_worst_group"]["num_pairs"] == 3
    # Runs without the split keep the table they had.
    assert report_table(ROWS, "real")[0][7] == "subject attention"


def test_run_row_reads_the_extra_tests_of_metrics_json():
    from engine.train.sweep_report import run_row

    metrics = {
        "strategy": "real", "seed": 0, "history": [{"val_top1": 0.5}], "rows_seen": {"real": 10, "synthetic": 0},
        "wall_s": 1.0, "run_dir": "x", "test": {"top1": 0.5, "worst_group": 0.1},
        "extra_tests": {"test_ood": {"top1": 0.4, "worst_group": 0.05}},
    }  # fmt: skip
    row = run_row("real", metrics)
    assert (row["test_ood_top1"], row["test_ood_worst_group"]) == (0.4, 0.05)


def test_a_variants_prepare_command_runs_when_its_output_is_missing_or_a_generation_ran(tmp_path):
    from engine.train.config import PrepareSpec
    from jobs.sweep import run_preparations

    made = tmp_path / "oracle" / "count.txt"
    script = f"import pathlib; p = pathlib.Path({str(made)!r}); p.parent.mkdir(exist_ok=True); p.write_text(p.read_text() + 'x' if p.exists() else 'x')"
    config = SweepConfig(
        train_config="x.yaml",
        variants=[
            SweepVariant(name="real"),
            SweepVariant(
                name="oracle", prepare=PrepareSpec(command=["python", "-c", script], creates=str(made))
            ),
        ],
    )
    run_preparations(config, generated=False)
    assert made.read_text() == "x"
    run_preparations(config, generated=False)
    assert made.read_text() == "x", "what it creates is there and nothing was generated: not run again"
    run_preparations(config, generated=True)
    assert made.read_text() == "xx"
    broken = config.model_copy(
        update={
            "variants": [
                SweepVariant(
                    name="bad",
                    prepare=PrepareSpec(command=["python", "-c", "pass"], creates=str(tmp_path / "never")),
                )
            ]
        }
    )
    with pytest.raises(ValueError, match="variant 'bad': its prepare command failed .* did not create"):
        run_preparations(broken, generated=False)


def test_the_efficacy_sweep_generates_with_the_domain_generator_and_tests_out_of_distribution():
    config = load_config(SweepConfig, ROOT / "configs" / "bench_efficacy.yaml")
    domain = "./outputs/bench/domain-generator/runs/full-toy/pipeline"
    generations = {v.name: generation_config(config, v.generate) for v in config.variants if v.generate}
    mvc = {f"mvc-{g}-two-phase" for g in ("pretrained", "finetuned", "both")} | {
        "mvc-both-concat",
        "mvc-both-rsp",
    }
    assert set(generations) == {
        "real", "aga-k2", "aga-k5", "deda", "deda-edit", "unidiffda-txt2img", "unidiffda-sdedit",
        "unidiffda-diff-ii", "unidiffda-diffmix", *mvc,
    }  # fmt: skip
    for name, generate in generations.items():
        if (
            generate.recipe == "deda"
        ):  # the toy's masks cut the subjects; the edit runs on the domain generator
            assert generate.segment.use_dataset_masks and (name == "deda") == (generate.generation is None)
            models = [generate.generation.model] if generate.generation else []
        elif generate.recipe == "mvc":  # the pre-trained share is the domain generator itself
            models = [generate.mvc.pretrained] if generate.mvc.pretrained else []
        else:
            models = [generate.background.model if generate.background else generate.generation.model]
        assert all(model.id == domain for model in models), name
    assert generations["aga-k5"].prompt.backend == "template" and generations["aga-k5"].num_variants == 5
    assert config.toy_dataset.ood_per_group > 0 and "data.extra_test_splits=[test_ood]" in config.overrides
    (oracle,) = [v for v in config.variants if v.prepare]
    assert oracle.prepare.command[2] == "benchmarks.oracle"


def test_only_runs_the_named_variants_and_names_a_wrong_one():
    config = load_config(SweepConfig, ROOT / "configs" / "bench_efficacy.yaml", ["only=[real, oracle-k2]"])
    assert [v.name for v in config.selected().variants] == ["real", "oracle-k2"]
    assert len(config.variants) > 2, "the config keeps every variant; selected() narrows"
    with pytest.raises(ValueError, match=r"only names no variant \['aga-k9'\]"):
        load_config(SweepConfig, ROOT / "configs" / "bench_efficacy.yaml", ["only=[real, aga-k9]"])
    with pytest.raises(ValueError, match="baseline 'real' is not a variant"):
        load_config(SweepConfig, ROOT / "configs" / "bench_efficacy.yaml", ["only=[aga-k2]"])
