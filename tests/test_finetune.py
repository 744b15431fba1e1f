"""Fine-tuning (engine.finetune, jobs/finetune.py) and the adapter loader (engine.models.diffusion), on the tiny
offline SD1.5 pipeline and the toy dataset, CPU only.

The in-process tests drive `training_step` (the step every Ray Train worker takes) directly; the job tests run
`run_finetune` on a local Ray: one textual-inversion run, its resumption, and a LoRA run on its tokens.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from engine.config import AdapterConfig, ModelRef, load_config
from engine.finetune.config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
FINETUNE_CONFIGS = sorted((ROOT / "configs").glob("finetune_*.yaml"))
PROMPT = "a photo of a <circle>"


@pytest.mark.parametrize("path", FINETUNE_CONFIGS, ids=lambda p: p.name)
def test_shipped_finetune_configs_validate(path):
    assert path.read_text().splitlines()[0].startswith("# Run: ")
    raw = yaml.safe_load(path.read_text())
    assert "method" in raw
    config = load_config(FinetuneConfig, path)
    if "gpu" in path.name:
        assert config.model.revision and config.scaling.use_gpu


def test_there_are_tiny_and_gpu_finetune_configs():
    names = {p.name for p in FINETUNE_CONFIGS}
    assert {"finetune_ti_tiny_cpu.yaml", "finetune_lora_tiny_cpu.yaml"} <= names
    assert any("gpu" in n for n in names)


# --------------------------------------------------------------------------- in process, no Ray


def tiny_pipe(models: Path, adapters: AdapterConfig | None = None):
    from engine.models.diffusion import load_pipeline

    pipe = load_pipeline(ModelRef(id=str(models / "sd15")), role="test", device="cpu", adapters=adapters)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str = PROMPT) -> np.ndarray:
    import torch

    return pipe(
        prompt,
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=1.0,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]


def ti_loop(**changes) -> dict:
    loop = {
        "method": "textual_inversion",
        "seed": 0,
        "resolution": 64,
        "hflip": True,
        "batch_size": 2,
        "accumulation": 1,
        "timestep_range": None,
        "textual_inversion": {"placeholder": "<{class_name}>", "initializer": "the", "initializers": {}},
    }
    return {**loop, **changes}


def run_steps(pipe, method, loop: dict, num_steps: int, weight_decay: float = 0.01):
    import torch
    from diffusers import DDPMScheduler

    from engine.finetune.loop import training_step

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(method.parameters(), lr=0.05, weight_decay=weight_decay)
    pixels = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    labels = np.array([0, 1, 0, 1])
    seen = []
    for step in range(num_steps):
        _, span = training_step(
            pipe, scheduler, method, optimizer, pixels, labels, loop, step=step, rank=0, device="cpu"
        )
        seen.append(span)
    return seen


def test_only_the_placeholder_rows_change(tiny_models_dir):
    from engine.finetune.textual_inversion import TextualInversion

    pipe = tiny_pipe(tiny_models_dir)
    method = TextualInversion(pipe, ["circle", "square"], ti_loop()["textual_inversion"])
    weight = pipe.text_encoder.get_input_embeddings().weight
    before = weight.detach().clone()
    ids = pipe.tokenizer.convert_tokens_to_ids(method.tokens)
    # Weight decay touches every row of the matrix: only restoring the others keeps them bit-identical.
    run_steps(pipe, method, ti_loop(), num_steps=3, weight_decay=0.01)
    after = weight.detach()
    others = np.setdiff1d(np.arange(after.shape[0]), ids)
    assert (after[others] == before[others]).all(), "rows other than the placeholders changed"
    for token_id in ids:
        assert not (after[token_id] == before[token_id]).all(), "a placeholder row did not train"
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_timestep_range_is_honoured(tiny_models_dir):
    from engine.finetune.textual_inversion import TextualInversion

    pipe = tiny_pipe(tiny_models_dir)
    method = TextualInversion(pipe, ["circle", "square"], ti_loop()["textual_inversion"])
    spans = run_steps(pipe, method, ti_loop(timestep_range=[100, 130], batch_size=4), num_steps=4)
    assert all(100 <= low <= high <= 130 for low, high in spans), spans


def test_a_token_already_in_the_tokenizer_is_refused_by_name(tiny_models_dir):
    from engine.finetune.textual_inversion import TextualInversion

    pipe = tiny_pipe(tiny_models_dir)
    # "grass" is a word of the tiny vocabulary: training it would change every prompt that says grass.
    with pytest.raises(ValueError, match=r"\['grass'\] already exist"):
        TextualInversion(
            pipe, ["grass", "circle"], {**ti_loop()["textual_inversion"], "placeholder": "{class_name}"}
        )


def test_embedding_file_of_another_width_is_refused_with_both_shapes(tiny_models_dir, tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "textual_inversion.safetensors"
    save_file({"clip_l": torch.zeros(2, 16)}, str(path), metadata={"tokens": json.dumps(["<a>", "<b>"])})
    with pytest.raises(ValueError, match=r"shape \(2, 16\).*needs \(2, 32\)"):
        tiny_pipe(tiny_models_dir, AdapterConfig(textual_inversion=str(tmp_path)))


def test_pickled_adapter_needs_allow_pickle(tiny_models_dir, tmp_path):
    import torch

    path = tmp_path / "embeds.bin"
    torch.save({"clip_l": torch.zeros(1, 32)}, path)
    with pytest.raises(ValueError, match="safetensors only"):
        tiny_pipe(tiny_models_dir, AdapterConfig(textual_inversion=str(path)))


# --------------------------------------------------------------------------- the job on a local Ray


def job_config(config: str, toy: Path, models: Path, out: Path, *extra: str) -> FinetuneConfig:
    return load_config(
        FinetuneConfig,
        ROOT / "configs" / config,
        [
            f"data.path={toy}",
            f"model.id={models / 'sd15'}",
            f"output.path={out}",
            "batch_size=2",
            "checkpoint.every_steps=3",
            "ray.progress_bars=false",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def ti_run(toy, tiny_models_dir, tmp_path_factory, ray_local):
    """A textual-inversion run of 6 steps on two workers, then the same run again with max_steps=8 on one
    (rerun = resume; the worker count may change between the two)."""
    from jobs.finetune import run_finetune

    out = tmp_path_factory.mktemp("finetune")
    two_workers = ("scaling.num_workers=2", "scaling.resources_per_worker={CPU: 0.5}")
    # buffer_rows=4, below each worker's share: the rows stream through the buffer (engine.finetune.stream).
    first = run_finetune(
        job_config(
            "finetune_ti_tiny_cpu.yaml",
            toy,
            tiny_models_dir,
            out,
            "max_steps=6",
            "buffer_rows=4",
            *two_workers,
        )
    )
    second = run_finetune(
        job_config("finetune_ti_tiny_cpu.yaml", toy, tiny_models_dir, out, "max_steps=8", "buffer_rows=4")
    )
    return first, second, Path(second["run_dir"])


def test_two_workers_end_with_identical_weights(ti_run):
    first, _, _ = ti_run
    digests = first["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_textual_inversion_job_writes_its_outputs(ti_run):
    first, _, run_dir = ti_run
    assert first["steps"] == 6 and first["resumed_from_step"] is None
    assert len(first["loss_history"]) == 6 and first["steps_per_s"] > 0
    assert first["tokens"] == ["<circle>", "<cross>", "<diamond>"]
    # Every usable row dealt to one of the two workers, and each worker's share streamed.
    assert sorted(first["rows_per_worker"]) == [6, 6] and first["streamed"]
    assert sum(first["rows_per_worker"]) == sum(first["images_per_class"].values())
    for name in ("textual_inversion.safetensors", "finetune.json", "loss.png", "train_config.yaml"):
        assert (run_dir / name).exists(), name


def test_rerun_resumes_from_the_last_checkpoint(ti_run):
    first, second, run_dir = ti_run
    assert second["resumed_from_step"] == 6 and second["steps"] == 8
    assert second["loss_history"][:6] == first["loss_history"]
    assert [s["from_step"] for s in second["segments"]] == [0, 6]
    assert json.loads((run_dir / "finetune.json").read_text())["steps"] == 8


def test_a_rerun_with_fewer_steps_than_trained_is_refused(ti_run, toy, tiny_models_dir):
    from engine.finetune.config import RESUMABLE_KEYS
    from engine.train.runner import prepare_run_dir
    from jobs.finetune import PLAN

    _, _, run_dir = ti_run
    config = job_config(
        "finetune_ti_tiny_cpu.yaml", toy, tiny_models_dir, run_dir.parent, "max_steps=5", "buffer_rows=4"
    )
    assert config.run_dir() == run_dir
    with pytest.raises(ValueError, match=r"already trained 8 of max_steps, more than max_steps=5"):
        prepare_run_dir(config, RESUMABLE_KEYS, plan=PLAN)


def test_tokens_load_with_load_textual_inversion_and_change_the_image(ti_run, tiny_models_dir):
    from engine.models.diffusion import read_textual_inversion

    _, _, run_dir = ti_run
    base = generate(tiny_pipe(tiny_models_dir))
    # diffusers' own loader, given the file's tensor and tokens.
    pipe = tiny_pipe(tiny_models_dir)
    tokens, tensors = read_textual_inversion(run_dir / "textual_inversion.safetensors")
    pipe.load_textual_inversion(tensors["clip_l"], token=tokens)
    assert pipe.tokenizer("<circle>", add_special_tokens=False).input_ids == [
        pipe.tokenizer.convert_tokens_to_ids("<circle>")
    ]
    with_tokens = generate(pipe)
    assert not np.array_equal(with_tokens, base)
    # Through the generators' loader (adapters by config): the same image.
    loaded = generate(tiny_pipe(tiny_models_dir, AdapterConfig(textual_inversion=str(run_dir))))
    np.testing.assert_array_equal(loaded, with_tokens)


def test_lora_job_saves_weights_that_load_and_change_the_image(ti_run, toy, tiny_models_dir, tmp_path):
    from jobs.finetune import run_finetune

    _, _, ti_dir = ti_run
    report = run_finetune(
        job_config(
            "finetune_lora_tiny_cpu.yaml",
            toy,
            tiny_models_dir,
            tmp_path,
            "max_steps=3",
            f"lora.textual_inversion={ti_dir}",
            "lora.learning_rate=0.01",
        )
    )
    lora_dir = Path(report["run_dir"]) / "lora"
    assert report["outputs"] == ["lora"] and (lora_dir / "pytorch_lora_weights.safetensors").exists()

    tokens_only = generate(tiny_pipe(tiny_models_dir, AdapterConfig(textual_inversion=str(ti_dir))))
    # diffusers' own loader.
    pipe = tiny_pipe(tiny_models_dir, AdapterConfig(textual_inversion=str(ti_dir)))
    pipe.load_lora_weights(str(lora_dir))
    assert not np.array_equal(generate(pipe), tokens_only)
    # By config, at scale 1 and at scale 0 (the base image back).
    with_lora = AdapterConfig(textual_inversion=str(ti_dir), lora=str(lora_dir), lora_scale=1.0)
    assert not np.array_equal(generate(tiny_pipe(tiny_models_dir, with_lora)), tokens_only)
    off = with_lora.model_copy(update={"lora_scale": 0.0})
    np.testing.assert_array_equal(generate(tiny_pipe(tiny_models_dir, off)), tokens_only)

    # A LoRA for another UNet (a matrix of another width) is refused with both shapes.
    from safetensors.torch import load_file, save_file

    state = load_file(str(lora_dir / "pytorch_lora_weights.safetensors"))
    key = next(k for k in state if "lora" in k and ("lora_A" in k or "lora.down" in k))
    state[key] = state[key][:, :-1].contiguous()
    bad = tmp_path / "bad-lora"
    bad.mkdir()
    save_file(state, str(bad / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ValueError, match=r"has shape .* needs"):
        tiny_pipe(tiny_models_dir, AdapterConfig(lora=str(bad)))


def test_a_class_without_usable_images_is_named(toy, tiny_models_dir, tmp_path, ray_local):
    import shutil

    from jobs.finetune import run_finetune

    data = tmp_path / "toy"
    shutil.copytree(toy, data)
    for image in (data / "train" / "cross").iterdir():
        image.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"\['cross'\] have no usable images"):
        run_finetune(job_config("finetune_ti_tiny_cpu.yaml", data, tiny_models_dir, tmp_path / "out"))


def test_driver_side_of_finetuning_does_not_import_the_gpu_stack():
    import subprocess
    import sys

    code = (
        "import sys, jobs.finetune, jobs.cli, engine.models.diffusion, engine.finetune.loop, engine.finetune.data, "
        "engine.finetune.lora, engine.finetune.textual_inversion\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_sdxl_tokens_go_into_both_encoders_and_the_background_stage_loads_them(tiny_models_dir, tmp_path):
    from actors.background import BackgroundGenerator
    from engine import schema
    from engine.config import BackgroundConfig
    from engine.finetune.textual_inversion import TextualInversion

    pipe = tiny_pipe_of(tiny_models_dir / "sdxl")
    method = TextualInversion(pipe, ["circle", "square"], ti_loop()["textual_inversion"])
    run_steps(pipe, method, ti_loop(), num_steps=1)
    (path,) = method.export(tmp_path)
    from engine.models.diffusion import read_textual_inversion

    tokens, tensors = read_textual_inversion(path)
    assert tokens == ["<circle>", "<square>"] and sorted(tensors) == ["clip_g", "clip_l"]

    def backgrounds(adapters):
        config = BackgroundConfig(
            model=ModelRef(id=str(tiny_models_dir / "sdxl")),
            adapters=adapters,
            height=64,
            width=64,
            num_inference_steps=2,
            device="cpu",
            dtype="float32",
        )
        batch = {schema.PROMPT: np.array(["a <circle> on grass"], dtype=object), schema.SEED: np.array([3])}
        return BackgroundGenerator(config)(batch)[schema.BACKGROUND][0]

    assert not np.array_equal(backgrounds(AdapterConfig(textual_inversion=str(tmp_path))), backgrounds(None))


def tiny_pipe_of(path: Path):
    from engine.models.diffusion import load_pipeline

    pipe = load_pipeline(ModelRef(id=str(path)), role="test", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_gpu_finetune_benchmark_smoke_run(tmp_path):
    from benchmarks import gpu_finetune

    data = gpu_finetune.main(
        ["--tiny", "--device", "cpu", "--only", "sd15", "--batches", "1", "--out-dir", str(tmp_path)]
    )
    assert [(r["method"], "steps_per_s" in r) for r in data["results"]] == [
        ("textual_inversion", True),
        ("dreambooth_lora", True),
    ]
    assert "TINY smoke run" in (tmp_path / "gpu_finetune.md").read_text()


def test_gpu_finetune_benchmark_sd15_has_the_published_sizes():
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from benchmarks.gpu_finetune import SD15_UNET, SD15_VAE

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 859.5
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 1) == 83.7


def test_subject_only_cuts_to_the_mask_and_greys_the_rest():
    import io

    from PIL import Image

    from engine import schema
    from engine.finetune.data import PIXELS, SKIP, SUBJECT_FILL, decode_for_training

    def png(array) -> bytes:
        out = io.BytesIO()
        Image.fromarray(array).save(out, format="PNG")
        return out.getvalue()

    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[:, :, 0] = 200  # red everywhere; the subject is the blue square
    image[10:20, 30:50] = (0, 0, 255)
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[10:20, 30:50] = 255  # 10 x 20: padded to 20 x 20 with gray bands above and below
    batch = {
        schema.IMAGE_BYTES: np.array([png(image), png(image)], dtype=object),
        schema.MASK_BYTES: np.array([png(mask), None], dtype=object),
        schema.LABEL: np.array([0, 1]),
    }
    out = decode_for_training(batch, resolution=16, max_pixels=10**6, min_side=8, subject_only=True)
    assert out[SKIP].tolist() == ["", "no_mask"]  # no mask: not a subject
    subject = out[PIXELS][0].astype(int)
    assert np.abs(subject[6:10] - (0, 0, 255)).max() <= 2  # the subject, centred
    assert np.abs(subject[:2] - SUBJECT_FILL).max() <= 2 and np.abs(subject[-2:] - SUBJECT_FILL).max() <= 2
    assert not (subject[:, :, 0] > 150).any()  # nothing of the red background is left
    plain = decode_for_training(batch, resolution=16, max_pixels=10**6, min_side=8)
    assert plain[SKIP].tolist() == ["", ""] and (plain[PIXELS][:, :, :, 0] > 150).any()
    with pytest.raises(ValueError, match="data.masks_path"):
        load_config(FinetuneConfig, ROOT / "configs" / "finetune_ti_tiny_cpu.yaml", ["subject_only=true"])


def test_a_mistake_found_by_a_worker_is_reported_as_itself(
    toy, tiny_models_dir, tmp_path, ray_local, capsys, monkeypatch
):
    from ray.train import WorkerGroupError

    import jobs.finetune

    def failing_fit(*args, **kwargs):
        raise WorkerGroupError(
            "rank 0 failed", {0: ValueError("initializer word '' of class 'circle' has no tokens")}
        )

    monkeypatch.setattr(jobs.finetune, "fit", failing_fit)
    args = [
        f"data.path={toy}",
        f"model.id={tiny_models_dir / 'sd15'}",
        f"output.path={tmp_path}",
        "ray.progress_bars=false",
    ]
    status = jobs.finetune.main(
        ["--config", str(ROOT / "configs" / "finetune_ti_tiny_cpu.yaml"), *(f"--set={a}" for a in args)]
    )
    assert status == 2
    assert (
        "fine-tuning worker: initializer word '' of class 'circle' has no tokens" in capsys.readouterr().err
    )


# --------------------------------------------------------------------------- a generation run's shards


def png_bytes(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def write_run_shards(toy: Path, out: Path, no_mask: set[str] = frozenset()) -> Path:
    """A generation run's `<out>/data` in the output schema (engine.schema), written by engine.output.shards as a
    run writes it: per toy train image a real row with the toy's mask (none for the source ids in `no_mask`,
    as for an image the segmenter found nothing in) and a synthetic `aga` row (all red, full mask: never a
    training image), plus the real val rows without masks (another split: never read). Two shards."""
    import pyarrow as pa
    from PIL import Image

    from engine import schema
    from engine.output.shards import write_shard

    class_names = sorted(p.name for p in (toy / "train").iterdir())
    rows = []
    for split in ("train", "val"):
        for label, name in enumerate(class_names):
            for path in sorted((toy / split / name).glob("*.png")):
                source_id = f"{split}/{name}/{path.name}"
                width, height = Image.open(path).size
                row = {
                    schema.WIDTH: width,
                    schema.HEIGHT: height,
                    schema.LABEL: label,
                    schema.CLASS_NAME: name,
                    schema.SPLIT: split,
                    schema.SOURCE_ID: source_id,
                    schema.SCHEMA_VERSION_COLUMN: schema.SCHEMA_VERSION,
                }
                masked = split == "train" and source_id not in no_mask
                mask = (toy / "masks" / split / name / f"{path.stem}.png").read_bytes() if masked else None
                real = {schema.ID: f"{source_id}#real", schema.IMAGE: path.read_bytes(), schema.MASK: mask}
                rows.append({**row, **real, schema.RECIPE: schema.RECIPE_REAL})
                if split == "train":
                    red = np.zeros((height, width, 3), np.uint8)
                    red[..., 0] = 255
                    full = png_bytes(np.full((height, width), 255, np.uint8))
                    synthetic = {
                        schema.ID: f"{source_id}#aga1",
                        schema.IMAGE: png_bytes(red),
                        schema.MASK: full,
                    }
                    rows.append({**row, **synthetic, schema.RECIPE: "aga"})
    table = pa.Table.from_pylist(rows, schema=schema.output_schema(class_names))
    data = out / "data"
    data.mkdir(parents=True)
    half = len(rows) // 2
    write_shard(table.slice(0, half), str(data))
    write_shard(table.slice(half), str(data))
    return data


def test_subject_crops_from_a_generation_runs_real_rows(toy, tiny_models_dir, tmp_path, ray_local):
    import hashlib

    import ray

    from engine import schema
    from engine.finetune.data import PIXELS, decode_for_training, load_training_rows, rank_datasets, rank_key

    no_mask = "train/circle/circle_0001.png"
    data = write_run_shards(toy, tmp_path / "gen", no_mask={no_mask})
    config = job_config(
        "finetune_ti_tiny_cpu.yaml",
        toy,
        tiny_models_dir,
        tmp_path / "out",
        "subject_only=true",
        f"data={{format: shards, path: {data}}}",
    )
    rows = load_training_rows(config, ray.data)
    assert rows.class_names == ["circle", "cross", "diamond"]
    assert rows.images_per_class == {"circle": 3, "cross": 4, "diamond": 4}
    assert rows.skipped == {"no_mask": 1}  # val rows (no masks either) and synthetic rows are not read

    # Exactly the subject crops of the real train images with masks (no synthetic red square among them).
    expected = set()
    for label, name in enumerate(rows.class_names):
        for path in sorted((toy / "train" / name).glob("*.png")):
            if f"train/{name}/{path.name}" == no_mask:
                continue
            batch = {
                schema.IMAGE_BYTES: np.array([path.read_bytes()], dtype=object),
                schema.MASK_BYTES: np.array(
                    [(toy / "masks/train" / name / path.name).read_bytes()], dtype=object
                ),
                schema.LABEL: np.array([label]),
            }
            crop = decode_for_training(batch, 64, 10**7, 8, subject_only=True)[PIXELS][0]
            expected.add((label, hashlib.sha1(crop.tobytes()).hexdigest()))
    # Dealt to two workers: each streams its own rows, together every usable row once.
    two = rows.__class__(**{**rows.__dict__, "rank_ids": [rows.rank_ids[0][0::2], rows.rank_ids[0][1::2]]})
    datasets = rank_datasets(two, config.ray.task_num_cpus)
    assert list(datasets) == [rank_key(0), rank_key(1)]
    got = [ds.take_batch(100) for ds in datasets.values()]
    assert [len(batch["label"]) for batch in got] == [6, 5]
    assert {
        (int(label), hashlib.sha1(p.tobytes()).hexdigest())
        for batch in got
        for label, p in zip(batch["label"], batch[PIXELS], strict=True)
    } == expected

    # A class whose real rows all lack masks has no usable image: the job's error names it.
    crosses = {f"train/cross/{p.name}" for p in (toy / "train" / "cross").glob("*.png")}
    data = write_run_shards(toy, tmp_path / "gen-no-cross-masks", no_mask=crosses)
    config = config.model_copy(update={"data": config.data.model_copy(update={"path": str(data)})})
    with pytest.raises(ValueError, match=r"\['cross'\] have no usable images .*real rows.*'no_mask': 4"):
        load_training_rows(config, ray.data)


# --------------------------------------------------------------------------- mixed precision


def test_fp16_needs_gpu_workers():
    import torch

    from engine.finetune.loop import mixed_precision

    path = ROOT / "configs" / "finetune_ti_tiny_cpu.yaml"
    with pytest.raises(ValueError, match="fp16 needs GPU workers"):
        load_config(FinetuneConfig, path, ["scaling.precision=fp16"])
    config = load_config(FinetuneConfig, path, ["scaling.precision=fp16", "scaling.use_gpu=true"])
    assert config.scaling.precision == "fp16"
    # A worker that gets fp16 on a CPU anyway refuses it too; other settings run fp32 on CPU.
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        mixed_precision("fp16", torch.device("cpu"))
    assert [mixed_precision(p, torch.device("cpu")) for p in ("auto", "bf16", "fp32")] == [(None, False)] * 3


def scaled_steps(models: Path, num_steps: int, scaler=None, overflow: bool = False):
    """The embedding matrix before and after `num_steps` textual-inversion steps taken with `scaler` (if
    any), and the losses; `overflow` puts an inf into a placeholder row's gradient, as an fp16 overflow would."""
    import torch
    from diffusers import DDPMScheduler

    from engine.finetune.loop import training_step
    from engine.finetune.textual_inversion import TextualInversion

    pipe = tiny_pipe(models)
    method = TextualInversion(pipe, ["circle", "square"], ti_loop()["textual_inversion"])
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    if overflow:
        (_, weight, ids, _, _) = method.encoders[0]
        masked = method.after_backward
        method.after_backward = lambda: (masked(), weight.grad[ids[0], 0].fill_(float("inf")))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(method.parameters(), lr=0.05)
    pixels = torch.randint(
        0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    losses = []
    for step in range(num_steps):
        loss, _ = training_step(
            pipe,
            scheduler,
            method,
            optimizer,
            pixels,
            np.array([0, 1, 0, 1]),
            ti_loop(),
            step=step,
            rank=0,
            device="cpu",
            scaler=scaler,
        )
        losses.append(loss)
    return before, pipe.text_encoder.get_input_embeddings().weight.detach().clone(), losses


def test_loss_scaling_changes_nothing_but_skips_an_overflowing_step(tiny_models_dir):
    """The fp16 path's GradScaler, on CPU (torch.amp.GradScaler("cpu"), fp32 model): scaling by a power of
    two is exact, so the steps match unscaled ones bit for bit; a step with an inf gradient is skipped
    (weights unchanged) and halves the scale, as an fp16 overflow on a GPU does."""
    import torch

    initial, plain, plain_losses = scaled_steps(tiny_models_dir, 2)
    assert not torch.equal(plain, initial)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    _, scaled, scaled_losses = scaled_steps(tiny_models_dir, 2, scaler)
    assert torch.equal(scaled, plain) and scaled_losses == plain_losses  # losses are reported unscaled
    assert scaler.get_scale() == 2.0**16  # no overflow, no growth yet (growth_interval 2000)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before, after, losses = scaled_steps(tiny_models_dir, 1, scaler, overflow=True)
    assert torch.equal(after, before), "a step with an inf gradient changed the weights"
    assert scaler.get_scale() == 2.0**15 and np.isfinite(losses[0])


@pytest.mark.gpu
def test_fp16_autocast_with_loss_scaling_on_cuda(tiny_models_dir):
    """On a GPU: fp16 autocast + GradScaler train the placeholder rows (finite loss) and nothing else."""
    import torch
    from diffusers import DDPMScheduler

    from engine.finetune.loop import mixed_precision, training_step
    from engine.finetune.textual_inversion import TextualInversion
    from engine.models.diffusion import load_pipeline

    device = torch.device("cuda")
    amp_dtype, needs_scaler = mixed_precision("fp16", device)
    assert amp_dtype == torch.float16 and needs_scaler
    pipe = load_pipeline(ModelRef(id=str(tiny_models_dir / "sd15")), role="test", device="cuda")
    method = TextualInversion(pipe, ["circle", "square"], ti_loop()["textual_inversion"])
    weight = pipe.text_encoder.get_input_embeddings().weight
    before = weight.detach().clone()
    scaler = torch.amp.GradScaler("cuda")
    optimizer = torch.optim.AdamW(method.parameters(), lr=0.05)
    pixels = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    losses = [
        training_step(
            pipe,
            DDPMScheduler.from_config(pipe.scheduler.config),
            method,
            optimizer,
            pixels,
            np.array([0, 1, 0, 1]),
            ti_loop(),
            step=step,
            rank=0,
            device=device,
            autocast=lambda: torch.autocast("cuda", dtype=amp_dtype),
            scaler=scaler,
        )[0]
        for step in range(8)
    ]
    assert all(np.isfinite(losses))
    ids = pipe.tokenizer.convert_tokens_to_ids(method.tokens)
    others = np.setdiff1d(np.arange(weight.shape[0]), ids)
    assert torch.equal(weight.detach()[others], before[others])
    assert not torch.equal(weight.detach()[ids], before[ids]), "fp16 steps never updated the placeholders"


# --------------------------------------------------------------------------- full fine-tuning


def full_loop(**full) -> dict:
    spec = {
        "train_text_encoder": False,
        "vae_steps": 0,
        "empty_prompt_prob": 0.0,
        "kl_weight": 1e-6,
        "prompt": "a photo of a {class_name}",
    }
    return ti_loop(method="full", full={**spec, **full})


def module_weights(pipe) -> dict:
    return {
        name: {k: v.detach().clone() for k, v in getattr(pipe, name).state_dict().items()}
        for name in ("unet", "vae", "text_encoder")
    }


def changed(before: dict, after: dict) -> set[str]:
    import torch

    return {
        name for name in before if any(not torch.equal(before[name][k], after[name][k]) for k in before[name])
    }


@pytest.mark.parametrize(
    ("full", "expected"),
    [({}, {"unet"}), ({"train_text_encoder": True}, {"unet", "text_encoder"})],
    ids=["unet", "unet+text_encoder"],
)
def test_full_method_trains_the_unet_and_by_config_the_text_encoder_only(tiny_models_dir, full, expected):
    from engine.finetune.full import FullFinetune

    pipe = tiny_pipe(tiny_models_dir)
    before = module_weights(pipe)
    loop = full_loop(**full)
    method = FullFinetune(pipe, ["circle", "square"], loop["full"])
    run_steps(pipe, method, loop, 2, weight_decay=0.0)
    assert changed(before, module_weights(pipe)) == expected


def test_full_method_trains_the_vae_alone_first_then_the_unet(tiny_models_dir):
    import torch
    from diffusers import DDPMScheduler

    from engine.finetune.full import FullFinetune
    from engine.finetune.loop import training_step

    pipe = tiny_pipe(tiny_models_dir)
    loop = full_loop(vae_steps=2)
    method = FullFinetune(pipe, ["circle", "square"], loop["full"])
    optimizer = torch.optim.AdamW(method.parameters(), lr=0.01, weight_decay=0.0)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    # Two flat colours: a reconstruction the tiny VAE can learn in a few steps.
    pixels = torch.zeros(4, 3, 64, 64, dtype=torch.uint8)
    pixels[:, 0], pixels[2:, 2] = 200, 90
    labels, spans, losses = np.array([0, 1, 0, 1]), [], []
    for step in range(3):
        before = module_weights(pipe)
        loss, span = training_step(pipe, scheduler, method, optimizer, pixels, labels, loop, step=step, rank=0,
                                   device="cpu", captions=["a circle on sand", "", "", ""])  # fmt: skip
        losses.append(loss)
        spans.append(span)
        assert changed(before, module_weights(pipe)) == ({"vae"} if step < 2 else {"unet"}), step
    assert spans[:2] == [None, None] and spans[2] is not None, "the VAE's steps draw no timestep"
    assert losses[1] < losses[0], "the autoencoder loss went down"


def test_full_method_checkpoint_tensors_round_trip_and_name_their_module(tiny_models_dir):
    import torch

    from engine.finetune.full import FullFinetune

    pipe = tiny_pipe(tiny_models_dir)
    method = FullFinetune(pipe, ["circle"], full_loop(train_text_encoder=True)["full"])
    tensors = method.state_tensors()
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder"}
    key = next(k for k in tensors if k.startswith("unet."))
    edited = {**tensors, key: tensors[key] + 1}
    method.load_state_tensors(edited)
    assert torch.equal(method.state_tensors()[key], edited[key])
    with pytest.raises(AssertionError, match="does not train"):
        method.load_state_tensors({**tensors, "vae.decoder.conv_in.weight": torch.zeros(1)})


def test_captions_file_needs_its_columns(tmp_path):
    from engine.readers.captions import read_captions_file

    def read_captions(path: str) -> dict[str, str]:
        return read_captions_file(path, "full.captions_file")

    good = tmp_path / "captions.csv"
    good.write_text('source_id,caption\ntrain/a/1.png,"a circle, on sand"\ntrain/a/2.png,\n')
    assert read_captions(str(good)) == {"train/a/1.png": "a circle, on sand", "train/a/2.png": ""}
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\nx,y\n")
    with pytest.raises(ValueError, match=r"full.captions_file .* no column\(s\) \['source_id', 'caption'\]"):
        read_captions(str(bad))


def test_full_vae_phase_must_leave_unet_steps():
    with pytest.raises(ValueError, match=r"full.vae_steps \(5\) must be below max_steps \(5\)"):
        FinetuneConfig(
            method="full", model={"id": "/m"}, data={"path": "/d"}, max_steps=5, full={"vae_steps": 5}
        )


@pytest.fixture(scope="module")
def full_run(toy, tiny_models_dir, tmp_path_factory, ray_local):
    """configs/finetune_full_toy_cpu.yaml made small: 1 VAE step then 2 UNet steps on two workers, with the
    toy's captions (one row's caption removed), then rerun to 4 steps on one worker (resume)."""
    import csv

    from jobs.finetune import run_finetune

    out = tmp_path_factory.mktemp("full")
    with open(toy / "captions.csv") as f:
        rows = list(csv.DictReader(f))
    rows[0]["caption"] = ""
    captions = out / "captions.csv"
    with open(captions, "w", newline="") as f:
        writer = csv.DictWriter(f, ["source_id", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    # The model the config names (the 2x-VAE tiny layout), not job_config's sd15.
    small = (
        f"model.id={tiny_models_dir / 'sd15-domain'}",
        "full.vae_steps=1",
        f"full.captions_file={captions}",
        "scaling.resources_per_worker={CPU: 1}",
    )
    two_workers = ("scaling.num_workers=2", "scaling.resources_per_worker={CPU: 0.5}")
    first = run_finetune(
        job_config(
            "finetune_full_toy_cpu.yaml", toy, tiny_models_dir, out, "max_steps=3", *small, *two_workers
        )
    )
    second = run_finetune(
        job_config("finetune_full_toy_cpu.yaml", toy, tiny_models_dir, out, "max_steps=4", *small)
    )
    return first, second, Path(second["run_dir"])


def test_full_job_ends_identical_on_two_workers_and_resumes(full_run):
    first, second, run_dir = full_run
    digests = first["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert first["outputs"] == ["pipeline"] and first["rows_without_caption"] == 1
    assert second["resumed_from_step"] == 3 and second["loss_history"][:3] == first["loss_history"]
    assert (run_dir / "pipeline" / "model_index.json").is_file()


def test_full_job_pipeline_loads_in_the_generator_and_draws_otherwise(full_run, tiny_models_dir):
    from engine.models.diffusion import load_pipeline

    _, _, run_dir = full_run
    trained = load_pipeline(ModelRef(id=str(run_dir / "pipeline")), role="generator", device="cpu")
    trained.set_progress_bar_config(disable=True)
    base = tiny_pipe_of(tiny_models_dir / "sd15-domain")
    assert type(trained) is type(base)
    assert not np.array_equal(generate(trained, "a circle on grass"), generate(base, "a circle on grass"))
    # AGA's background stage loads it the same way (its model id is the folder).
    from actors.background import BackgroundGenerator
    from engine.config import BackgroundConfig

    background = BackgroundGenerator(
        BackgroundConfig(
            model=ModelRef(id=str(run_dir / "pipeline")),
            height=32,
            width=32,
            num_inference_steps=2,
            device="cpu",
            dtype="float32",
        )  # fmt: skip
    )
    rows = {
        "id": np.array(["a", "b"]),
        "prompt": np.array(["grass", "sand"], dtype=object),
        "seed": np.array([1, 2], dtype=np.int64),
    }
    assert [b.shape for b in background(rows)["background"]] == [(32, 32, 3)] * 2


def test_empty_prompt_prob_trains_that_share_of_rows_on_the_empty_prompt(tiny_models_dir, monkeypatch):
    import engine.finetune.loop as loop_module
    from engine.finetune.full import FullFinetune

    seen = []
    real_encode = loop_module.encode_prompts
    monkeypatch.setattr(
        loop_module,
        "encode_prompts",
        lambda pipe, prompts, *a: seen.extend(prompts) or real_encode(pipe, prompts, *a),
    )
    pipe = tiny_pipe(tiny_models_dir)
    loop = {**full_loop(empty_prompt_prob=0.5), "batch_size": 8}
    method = FullFinetune(pipe, ["circle", "square"], loop["full"])
    run_steps(pipe, method, loop, 6)
    empty = sum(p == "" for p in seen)
    assert len(seen) == 48 and 12 <= empty <= 36, empty  # 24 expected, binomial sd 3.5
    assert set(seen) - {""} <= {"a photo of a circle", "a photo of a square"}
