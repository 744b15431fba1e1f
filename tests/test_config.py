import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.config import GenerateConfig, ModelRef, config_hash, content_changes, content_of, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate_and_say_how_to_run(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#"), "each YAML starts with a comment saying what runs it"
    raw = yaml.safe_load(path.read_text())
    if "data" in raw and "output" in raw and "recipe" in raw:
        load_config(GenerateConfig, path)


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="unknown key 'background.num_stepz'"):
        load_config(GenerateConfig, ROOT / "configs" / "aga_tiny_cpu.yaml", ["background.num_stepz=3"])


def test_unknown_top_level_key_is_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("recipe: aga\ndata: {path: x}\noutput: {path: y}\nnum_variantz: 3\n")
    with pytest.raises(ValueError, match="unknown key 'num_variantz'"):
        load_config(GenerateConfig, cfg)


def test_overrides_are_typed_and_applied():
    cfg = load_config(
        GenerateConfig,
        ROOT / "configs" / "aga_tiny_cpu.yaml",
        ["num_variants=5", "background.guidance_scale=7.5", "composite.rotation_deg=[-5, 5]"],
    )
    assert cfg.num_variants == 5
    assert cfg.background.guidance_scale == 7.5
    assert cfg.composite.rotation_deg == (-5.0, 5.0)


def test_bad_value_names_key():
    with pytest.raises(ValueError, match="num_variants"):
        load_config(GenerateConfig, ROOT / "configs" / "aga_tiny_cpu.yaml", ["num_variants=0"])


def test_hub_ids_must_be_pinned():
    with pytest.raises(ValueError, match="pin it with `revision:`"):
        ModelRef(id="stabilityai/stable-diffusion-xl-base-1.0")
    assert ModelRef(id="org/model", revision="abc123").tag() == "org/model@abc123"


# Knobs a user changes when resuming on another cluster: none of them may change a row id.
SCHEDULING_OVERRIDES = [
    "output.path=/tmp/elsewhere",
    "output.rows_per_shard=7",
    "output.image_format=jpeg",
    "data.rows_per_block=3",
    "max_error_fraction=0.1",
    "background.stage.batch_size=2",
    "segment.stage.concurrency=4",
    "prompt.stage.num_gpus=1",
    "composite.stage.num_cpus=2",
    "background.device=cuda",
    "background.channels_last=true",
    "background.fuse_qkv=true",
    "background.compile_mode=max-autotune",
    "prompt.vllm.max_num_seqs=8",
    "prompt.vllm.tensor_parallel_size=2",
    "prompt.vllm.gpu_memory_utilization=0.5",
    "ray.num_cpus=64",
    "ray.address=auto",
    "ray.preserve_order=false",
    "ray.task_num_cpus=2",
]


@pytest.mark.parametrize("override", SCHEDULING_OVERRIDES)
def test_config_hash_ignores_scheduling_and_io(override):
    base = load_config(GenerateConfig, ROOT / "configs" / "aga_tiny_cpu.yaml")
    knob = load_config(GenerateConfig, ROOT / "configs" / "aga_tiny_cpu.yaml", [override])
    assert config_hash(base) == config_hash(knob)


@pytest.mark.parametrize(
    "override",
    [
        "seed=7",
        "num_variants=3",
        "data.max_images=5",
        "prompt.temperature=0.3",
        "background.height=32",
        "segment.box_threshold=0.5",
        "composite.flip_prob=0.1",
        "prompt.model.id=/elsewhere/llm",
    ],
)
def test_config_hash_follows_what_determines_the_rows(override):
    base = load_config(GenerateConfig, ROOT / "configs" / "aga_tiny_cpu.yaml")
    changed = load_config(GenerateConfig, ROOT / "configs" / "aga_tiny_cpu.yaml", [override])
    assert config_hash(base) != config_hash(changed)
    key = override.split("=")[0]
    assert [c.split(":")[0] for c in content_changes(content_of(base), content_of(changed))] == [key]


def test_driver_modules_do_not_import_the_gpu_stack():
    code = (
        "import sys, engine, engine.pipeline, engine.recipes, engine.tiny.registry, jobs.cli, jobs.generate, "
        "jobs.demo, jobs.runner, jobs.tiny_models\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'vllm', 'timm') if m in sys.modules]\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_secrets_never_go_into_configs():
    with pytest.raises(ValueError, match="look like secrets"):
        load_config(
            GenerateConfig, ROOT / "configs" / "aga_tiny_cpu.yaml", ["ray.env_vars={HF_TOKEN: hf_abc}"]
        )


def test_a_config_saved_before_a_key_existed_reads_with_that_keys_default():
    """Finished runs are reused and checkpoints resumed only for the same config: a key added since (whose
    default keeps the old behaviour) must not make an old run look different, a key since removed must."""
    from engine.config import with_defaults
    from engine.train.config import TrainConfig

    config = load_config(TrainConfig, ROOT / "configs" / "train_toy_cpu.yaml", [])
    saved = config.model_dump(mode="json")
    del saved["mix"]["deda_prob"], saved["mix"]["deda_paste"]
    assert saved != config.model_dump(mode="json")
    assert with_defaults(TrainConfig, saved) == config.model_dump(mode="json")
    saved["mix"]["a_removed_key"] = 1
    assert with_defaults(TrainConfig, saved) is None
