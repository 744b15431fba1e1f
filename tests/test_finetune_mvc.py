"""MVC's generator fine-tuning (`method: mvc`, engine.finetune.mvc) on the tiny offline SD1.5 pipeline, CPU only.

Without Ray: the conv_in widening, the pair sampler, the conditioning dropout, the mixed text conditioning, and a
step taken after a checkpoint round trip (it must equal the uninterrupted step). With Ray: the job as a user runs
it, on a caption run's shards written here, on two workers, SIGKILLed once Ray Train has recorded a checkpoint and
run again: it resumes at the recorded step, both workers end with identical weights, and the pipeline folder
loads as a StableDiffusionInstructPix2PixPipeline with an 8-channel UNet and generates.
"""

import copy
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.config import ModelRef, load_config
from engine.finetune.config import FinetuneConfig
from tests.test_finetune import png_bytes
from tests.test_finetune_resume import kill_job, recorded_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "finetune_mvc_tiny_cpu.yaml"
PREFIX = "This is an image of {class_name}. "
SPEC = {
    "coarse_steps": 1,
    "fine_steps": 2,
    "conditioning_dropout_prob": 0.05,
    "prefix": PREFIX,
    "learning_rate": 1e-3,
    "max_grad_norm": 1.0,
}
UNCAPTIONED = "train/circle/circle_0001.png"  # a real row the captioner left without a caption
SINGLE = "diamond"  # the class with one training image: paired with itself


# --------------------------------------------------------------------------- a caption run's shards


def write_caption_shards(toy: Path, out: Path, with_captions: bool = True) -> Path:
    """A caption run's `<out>/data` in engine.schema's output schema: the toy's real train rows (all circles and
    crosses, one diamond) with captions "This is an image of <class>. <the toy's caption>" (none for
    UNCAPTIONED), plus rows that must never be read: a synthetic row and a val row, captioned "NOT READ".
    `with_captions=False`: the same rows in shards without a caption column (a run without the caption stage,
    or written before schema 3)."""
    import pyarrow as pa
    from PIL import Image

    from engine import schema
    from engine.output.shards import write_shard

    with open(toy / "captions.csv") as f:
        toy_captions = {row["source_id"]: row["caption"] for row in csv.DictReader(f)}
    class_names = sorted(p.name for p in (toy / "train").iterdir())
    rows = []
    for split in ("train", "val"):
        for label, name in enumerate(class_names):
            paths = sorted((toy / split / name).glob("*.png"))
            paths = paths[:1] if name == SINGLE or split == "val" else paths
            for path in paths:
                source_id = f"{split}/{name}/{path.name}"
                width, height = Image.open(path).size
                caption = PREFIX.format(class_name=name) + toy_captions[source_id]
                row = {
                    schema.ID: f"{source_id}#real",
                    schema.IMAGE: path.read_bytes(),
                    schema.WIDTH: width,
                    schema.HEIGHT: height,
                    schema.LABEL: label,
                    schema.CLASS_NAME: name,
                    schema.SPLIT: split,
                    schema.SOURCE_ID: source_id,
                    schema.RECIPE: schema.RECIPE_REAL,
                    schema.CAPTION: None if source_id == UNCAPTIONED else caption,
                    schema.SCHEMA_VERSION_COLUMN: schema.SCHEMA_VERSION,
                }
                if split == "val":
                    row[schema.CAPTION] = "NOT READ"
                rows.append(row)
                if split == "train" and name == SINGLE:  # a synthetic diamond: never a training image
                    red = np.zeros((height, width, 3), np.uint8)
                    red[..., 0] = 255
                    synthetic = {schema.ID: f"{source_id}#aga1", schema.IMAGE: png_bytes(red)}
                    rows.append({**row, **synthetic, schema.RECIPE: "aga", schema.CAPTION: "NOT READ"})
    table_schema = schema.output_schema(class_names)
    if not with_captions:
        table_schema = table_schema.remove(table_schema.get_field_index(schema.CAPTION))
        rows = [{k: v for k, v in row.items() if k != schema.CAPTION} for row in rows]
    table = pa.Table.from_pylist(rows, schema=table_schema)
    data = out / "data"
    data.mkdir(parents=True)
    half = len(rows) // 2
    write_shard(table.slice(0, half), str(data))
    write_shard(table.slice(half), str(data))
    return data


# --------------------------------------------------------------------------- in process, no Ray


def tiny_pipe(models: Path, name: str = "sd15"):
    from engine.models.diffusion import load_pipeline

    pipe = load_pipeline(ModelRef(id=str(models / name)), role="test", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_widened_conv_in_reads_the_condition_as_zeros_and_keeps_the_base_at_step_0(tiny_models_dir):
    import torch
    from diffusers import UNet2DConditionModel

    from engine.finetune.mvc import widen_conv_in

    unet = UNet2DConditionModel.from_pretrained(tiny_models_dir / "sd15" / "unet")
    base = copy.deepcopy(unet)
    assert widen_conv_in(unet, latent_channels=4) is True
    weight, old = unet.conv_in.weight.detach(), base.conv_in.weight.detach()
    assert unet.config.in_channels == 8 and weight.shape == (old.shape[0], 8, *old.shape[2:])
    assert torch.equal(weight[:, :4], old) and torch.equal(unet.conv_in.bias, base.conv_in.bias)
    assert not weight[:, 4:].any(), "the new input channels must start at zero"
    # So the widened UNet computes the base's function whatever the condition holds.
    g = torch.Generator().manual_seed(0)
    z, condition = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    hidden, t = torch.randn(2, 77, 32, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        torch.testing.assert_close(
            unet(torch.cat([z, condition], 1), t, hidden).sample, base(z, t, hidden).sample
        )

    # An InstructPix2Pix UNet already reads 8 channels: kept as it is; any other width is refused.
    ip2p = UNet2DConditionModel.from_pretrained(tiny_models_dir / "ip2p" / "unet")
    conv = ip2p.conv_in
    assert widen_conv_in(ip2p, latent_channels=4) is False and ip2p.conv_in is conv
    inpainting = UNet2DConditionModel.from_config({**base.config, "in_channels": 9})
    with pytest.raises(ValueError, match="reads 9 input channels"):
        widen_conv_in(inpainting, latent_channels=4)


def step_generator(seed: int, step: int, rank: int = 0, micro: int = 0):
    import torch

    from engine.finetune.loop import step_seed

    return torch.Generator("cpu").manual_seed(step_seed(seed, step, rank, micro))


def test_pairs_never_cross_classes_and_are_a_function_of_seed_and_step():
    from engine.finetune.mvc import draw_pairs

    labels = np.array([0, 0, 0, 1, 1, 2, 0, 1])  # class 2 has one row
    draws = {}
    for step in range(40):
        index, partner = draw_pairs(labels, 16, step_generator(0, step))
        assert (labels[index] == labels[partner]).all(), "a pair crosses classes"
        single = labels[index] == 2
        assert (partner[single] == index[single]).all() and (partner[~single] != index[~single]).all()
        again = draw_pairs(labels, 16, step_generator(0, step))
        assert all(np.array_equal(a, b) for a, b in zip((index, partner), again, strict=True))
        draws[step] = (tuple(index), tuple(partner))
    assert len(set(draws.values())) == 40, "different steps must draw different pairs"
    assert tuple(draw_pairs(labels, 16, step_generator(1, 3))[0]) != draws[3][0], "another seed, other pairs"
    # Every other row of a class is a partner, over enough draws (uniform over the class, not its first row).
    seen = {(i, p) for index, partner in draws.values() for i, p in zip(index, partner, strict=True)}
    assert {p for i, p in seen if i == 0} == {1, 2, 6}


def test_conditioning_dropout_frequencies_follow_the_reference_scheme():
    import torch

    from engine.finetune.mvc import conditioning_dropout

    # The reference's bands of one uniform draw: [0, p) text, [p, 2p) both, [2p, 3p) image, [3p, 1) neither.
    u = torch.tensor([0.0, 0.049, 0.05, 0.099, 0.1, 0.149, 0.15, 0.9])
    text, image = conditioning_dropout(u, 0.05)
    assert text.tolist() == [True, True, True, True, False, False, False, False]
    assert image.tolist() == [False, False, True, True, True, True, False, False]
    assert not any(t.any() for t in conditioning_dropout(np.random.default_rng(0).random(1000), 0.0))

    n, p = 200_000, 0.05
    text, image = conditioning_dropout(torch.rand(n, generator=torch.Generator().manual_seed(0)), p)
    counts = {
        "text only": int((text & ~image).sum()),
        "both": int((text & image).sum()),
        "image only": int((~text & image).sum()),
        "neither": int((~text & ~image).sum()),
    }
    for name, share in {"text only": p, "both": p, "image only": p, "neither": 1 - 3 * p}.items():
        sd = (n * share * (1 - share)) ** 0.5
        assert abs(counts[name] - n * share) < 3 * sd, (name, counts)


def test_text_is_algorithm_1_over_the_class_captions_encoding_only_what_the_plans_read(tiny_models_dir):
    import torch

    from engine.finetune.mvc import MvcFinetune
    from engine.methods.mvc_mix import apply_mix, needed, plan_mix

    method = MvcFinetune(tiny_pipe(tiny_models_dir), ["circle", "cross", "ring"], SPEC)
    labels = np.array([0, 1, 0, 0, 1, 2])
    captions = ["circle one", "cross one", "", "circle three", "cross two", "ring one"]
    assert method.class_captions(0, labels, captions) == [
        "circle one",
        "This is an image of circle. ",  # no caption: the prefix alone
        "circle three",
    ]
    encoded = []
    encode = method.encode
    method.encode = lambda texts, device: encoded.append(list(texts)) or encode(texts, device)
    classes = [0, 1, 0, 2]
    hidden = method.mixed_embeddings(classes, labels, captions, np.random.default_rng(7), "cpu")
    assert hidden.shape == (4, 77, 32) and len(encoded) == 1, "one text-encoder call per micro-batch"

    rng = np.random.default_rng(7)  # the same plans, drawn again
    expected_texts = []
    for k, c in enumerate(classes):
        pool = method.class_captions(c, labels, captions)
        plan = plan_mix(rng, len(pool), 77, 32, SPEC["coarse_steps"], SPEC["fine_steps"])
        embeddings = {i: encode([pool[i]], "cpu")[0] for i in needed(plan)}
        torch.testing.assert_close(hidden[k], apply_mix(embeddings, plan))
        expected_texts += [pool[i] for i in needed(plan)]
    assert encoded[0] == list(dict.fromkeys(expected_texts)), "encode exactly the captions the plans read"
    torch.testing.assert_close(hidden[3], encode(["ring one"], "cpu")[0])  # one caption: nothing to mix


def mvc_loop(**changes) -> dict:
    loop = {
        "method": "mvc",
        "seed": 0,
        "resolution": 32,
        "hflip": True,
        "batch_size": 2,
        "accumulation": 2,
        "timestep_range": None,
        "mvc": SPEC,
    }
    return {**loop, **changes}


def test_steps_train_the_unet_only_and_a_checkpoint_round_trip_takes_the_same_step(tiny_models_dir):
    """Two steps, against one step + state_tensors / optimizer state into fresh objects + the second step: the
    same loss and bit-identical weights (every draw of a step comes from its seeded generator)."""
    import torch
    from diffusers import DDPMScheduler

    from engine.finetune.loop import training_step
    from engine.finetune.mvc import MvcFinetune

    pixels = torch.randint(
        0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    labels, captions = np.array([0, 0, 1, 1, 2]), ["a circle", "", "a cross", "a cross on grass", "a ring"]

    def fresh():
        pipe = tiny_pipe(tiny_models_dir)
        method = MvcFinetune(pipe, ["circle", "cross", "ring"], SPEC)
        return pipe, method, torch.optim.AdamW(method.parameters(), lr=1e-3, weight_decay=0.0)

    def step(pipe, method, optimizer, number):
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        return training_step(pipe, scheduler, method, optimizer, pixels, labels, mvc_loop(), captions=captions,
                             step=number, rank=0, device=torch.device("cpu"))  # fmt: skip

    pipe, method, optimizer = fresh()
    before = {
        name: copy.deepcopy(getattr(pipe, name).state_dict()) for name in ("unet", "vae", "text_encoder")
    }
    losses = [step(pipe, method, optimizer, n)[0] for n in range(2)]
    for name in ("vae", "text_encoder"):
        after = getattr(pipe, name).state_dict()
        assert all(torch.equal(before[name][k], after[k]) for k in after), f"{name} must stay frozen"
    assert pipe.unet.conv_in.weight[:, 4:].abs().sum() > 0, "the condition's channels never trained"

    first_pipe, first, first_optimizer = fresh()
    assert step(first_pipe, first, first_optimizer, 0)[0] == losses[0]
    resumed_pipe, resumed, resumed_optimizer = fresh()
    resumed.load_state_tensors(first.state_tensors())
    resumed_optimizer.load_state_dict(first_optimizer.state_dict())
    assert step(resumed_pipe, resumed, resumed_optimizer, 1)[0] == losses[1]
    final, expected = resumed.state_tensors(), method.state_tensors()
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_mvc_config_needs_a_caption_run_and_keeps_mvc_mix_defaults():
    from engine.config import mvc as mvc_defaults

    config = load_config(FinetuneConfig, CONFIG)
    default = FinetuneConfig(method="mvc", model={"id": "/m"}, data={"format": "shards", "path": "/d"})
    assert (default.mvc.coarse_steps, default.mvc.fine_steps) == (
        mvc_defaults.DEFAULT_COARSE_STEPS,
        mvc_defaults.DEFAULT_FINE_STEPS,
    )
    assert default.mvc.conditioning_dropout_prob == 0.05 and config.scaling.num_workers == 2
    with pytest.raises(ValueError, match="data.format: shards"):
        FinetuneConfig(method="mvc", model={"id": "/m"}, data={"path": "/d"})
    with pytest.raises(ValueError, match="less than or equal to 0.333"):
        load_config(FinetuneConfig, CONFIG, ["mvc.conditioning_dropout_prob=0.4"])


def test_driver_imports_the_mvc_method_without_the_gpu_stack():
    code = (
        "import sys, engine.finetune.mvc, engine.finetune.config, engine.finetune.loop, jobs.finetune\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_shards_without_a_caption_column_are_refused_before_ray_starts(toy, tiny_models_dir, tmp_path):
    import ray

    from jobs.finetune import run_finetune

    data = write_caption_shards(toy, tmp_path / "no-captions", with_captions=False)
    config = load_config(
        FinetuneConfig,
        CONFIG,
        [f"data.path={data}", f"model.id={tiny_models_dir / 'sd15'}", f"output.path={tmp_path}"],
    )
    with pytest.raises(ValueError, match=r"2 of 2 shard files .* have no `caption` column"):
        run_finetune(config)
    assert not ray.is_initialized()


# --------------------------------------------------------------------------- the job on Ray: killed, rerun

MAX_STEPS = 24
EVERY_STEPS = 4
RUN_TIMEOUT_S = 300
# The job's own main(), behind a local Ray started as the test fixtures start it (no dashboard): the job
# attaches to it (engine.train.runner.init_ray) as it would to any running Ray.
DRIVER = (
    "import sys, ray\n"
    "ray.init(num_cpus=4, include_dashboard=False, runtime_env={'env_vars': {'HF_HUB_OFFLINE': '1'}})\n"
    "from jobs.finetune import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.fixture(scope="module")
def mvc_run(toy, tiny_models_dir, tmp_path_factory):
    """configs/finetune_mvc_tiny_cpu.yaml on the shards above (32 px, two workers), SIGKILLed once Ray Train has
    recorded a checkpoint, then the same command again. Returns (recorded step, its state, rerun, run dir)."""
    tmp = tmp_path_factory.mktemp("mvc")
    data = write_caption_shards(toy, tmp / "captions")
    out = tmp / "out"
    run_dir = out / "mvc-tiny"
    settings = [
        f"data.path={data}",
        f"model.id={tiny_models_dir / 'sd15'}",
        f"output.path={out}",
        "resolution=32",
        f"max_steps={MAX_STEPS}",
        f"checkpoint.every_steps={EVERY_STEPS}",
        "checkpoint.num_to_keep=100",  # keep the one the rerun resumes from, to compare with
        "log_every=1",
        "scaling.resources_per_worker={CPU: 0.5}",
        "scaling.controller_poll_s=0.2",  # Ray Train records a checkpoint at its next poll
    ]
    command = [sys.executable, "-c", DRIVER, "--config", str(CONFIG), *(f"--set={s}" for s in settings)]

    with open(tmp / "killed.log", "w") as log:
        job = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while recorded_checkpoint(run_dir) is None:
            assert job.poll() is None, (
                f"the job ended before a checkpoint:\n{(tmp / 'killed.log').read_text()}"
            )
            assert time.monotonic() < deadline, "no checkpoint recorded in time"
            time.sleep(0.05)
        kill_job(job)
    latest = recorded_checkpoint(run_dir)  # it may have moved on between the poll and the kill
    assert not (run_dir / "finetune.json").exists(), "the job finished before it was killed"
    step = latest["metrics"]["step"]
    killed_state = json.loads((run_dir / latest["checkpoint_dir_name"] / "state.json").read_text())

    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    return step, killed_state, rerun, run_dir


@pytest.mark.slow  # a job on a Ray of its own: slow as the shared Ray's tests are (SHARED_RAY_FIXTURES, conftest)
def test_killed_run_resumes_at_the_recorded_step(mvc_run):
    step, killed_state, rerun, run_dir = mvc_run
    report = json.loads((run_dir / "finetune.json").read_text())
    assert 0 < step < MAX_STEPS and step % EVERY_STEPS == 0 and killed_state["step"] == step
    assert report["resumed_from_step"] == step and report["steps"] == MAX_STEPS
    assert [(s["from_step"], s["to_step"]) for s in report["segments"]] == [(0, step), (step, MAX_STEPS)]
    assert report["loss_history"][:step] == killed_state["loss_history"]
    logged = [int(n) for n in re.findall(r"finetune step (\d+)/", rerun.stdout + rerun.stderr)]
    assert logged and logged[0] == step + 1 and logged[-1] == MAX_STEPS, logged


@pytest.mark.slow  # a job on a Ray of its own: slow as the shared Ray's tests are (SHARED_RAY_FIXTURES, conftest)
def test_both_workers_end_with_identical_weights_and_the_report_counts(mvc_run):
    _, killed_state, _, run_dir = mvc_run
    report = json.loads((run_dir / "finetune.json").read_text())
    for digests in (killed_state["rank_weight_digests"], report["rank_weight_digests"]):
        assert len(digests) == 2 and digests[0] == digests[1]
    # Real train rows only (no synthetic or val row), the uncaptioned row and the single diamond counted.
    assert report["images_per_class"] == {"circle": 4, "cross": 4, "diamond": 1}
    assert report["rows_without_caption"] == 1 and report["single_image_classes"] == [SINGLE]
    assert report["outputs"] == ["pipeline"] and report["method"] == "mvc"


@pytest.mark.slow  # a job on a Ray of its own: slow as the shared Ray's tests are (SHARED_RAY_FIXTURES, conftest)
def test_pipeline_folder_is_an_instruct_pix2pix_pipeline_that_generates(mvc_run, toy, tiny_models_dir):
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from PIL import Image

    from engine.models.diffusion import load_pipeline

    _, _, _, run_dir = mvc_run
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(run_dir / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == 8 and pipe.unet.conv_in.weight.shape[1] == 8
    assert pipe.unet.conv_in.weight[:, 4:].abs().sum() > 0, "the condition's channels never trained"
    base = tiny_pipe(tiny_models_dir)
    assert torch.equal(pipe.vae.encoder.conv_in.weight, base.vae.encoder.conv_in.weight)  # the base's VAE
    real = Image.open(toy / "train" / "circle" / "circle_0000.png").convert("RGB").resize((32, 32))
    image = pipe(
        "This is an image of circle. a circle on sand",
        image=real,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    # The generators' loader (instruct_pix2pix mode names no class: the folder's model_index does).
    loaded = load_pipeline(ModelRef(id=str(run_dir / "pipeline")), role="generator", device="cpu")
    assert isinstance(loaded, StableDiffusionInstructPix2PixPipeline)
