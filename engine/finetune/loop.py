"""What runs in each Ray Train worker of `synthray finetune`: load the base pipeline through engine.models.diffusion,
set up the method (textual inversion, DreamBooth-LoRA, full, MVC), resume from Ray Train's latest checkpoint, then
take optimizer steps of the denoising loss, averaging gradients across ranks (MVC's UNet: through DDP),
checkpointing every N steps.

Every draw of a step (images, flips, templates, VAE sample, noise, timesteps) comes from a generator seeded by
(seed, step, rank, micro-batch), so a resumed run takes the steps an uninterrupted one would. The loop reads
one plain dict (`loop_config`) and its own dataset (`engine.finetune.data.rank_key(rank)`), streamed through a
bounded buffer the draws sample from (engine.finetune.stream).
torch and diffusers are imported inside the functions: the driver imports this module without them.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from engine.finetune.config import FinetuneConfig
from engine.finetune.data import CAPTION, IMAGENET_TEMPLATES_SMALL, PIXELS, rank_key

STATE_FILE = "state.json"  # step, loss history, timing: the driver reads it from the last checkpoint
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCALER_FILE = "grad_scaler.pt"  # fp16 runs only: the loss scale and its growth tracker


def learning_rate(config: FinetuneConfig) -> float:
    base = {
        "textual_inversion": config.textual_inversion.learning_rate,
        "dreambooth_lora": config.lora.learning_rate,
        "full": config.full.learning_rate,
        "mvc": config.mvc.learning_rate,
    }[config.method]
    if config.scale_lr:
        base *= config.batch_size * config.gradient_accumulation_steps * config.scaling.num_workers
    return base


def _absolute(ref) -> dict | None:
    """A model reference as plain values, local paths made absolute (Ray Train workers run elsewhere)."""
    if ref is None:
        return None
    if ref.is_local():
        ref = ref.model_copy(update={"id": str(Path(ref.id).expanduser().resolve())})
    return ref.model_dump(mode="json")


def loop_config(config: FinetuneConfig, class_names: list[str], rank_rows: list[int] | None = None) -> dict:
    """What each worker needs, as plain values (it crosses process boundaries). `rank_rows`: how many usable
    rows each worker's dataset holds (engine.finetune.data.TrainingRows.rank_ids)."""
    lora = config.lora.model_dump(mode="json")
    lora["textual_inversion"] = _absolute(config.lora.textual_inversion)
    return {
        "method": config.method,
        "model": _absolute(config.model),
        "class_names": class_names,
        "seed": config.seed,
        "resolution": config.resolution,
        "hflip": config.hflip,
        "max_steps": config.max_steps,
        "buffer_rows": config.buffer_rows,
        "rank_rows": rank_rows,
        "batch_size": config.batch_size,
        "accumulation": config.gradient_accumulation_steps,
        "learning_rate": learning_rate(config),
        "weight_decay": config.weight_decay,
        "timestep_range": list(config.timestep_range) if config.timestep_range else None,
        "textual_inversion": config.textual_inversion.model_dump(mode="json"),
        "lora": lora,
        "full": config.full.model_dump(mode="json", exclude={"captions_file"}),
        "mvc": config.mvc.model_dump(mode="json"),
        "precision": config.scaling.precision,
        "torch_threads": max(1, math.floor(config.scaling.resources_per_worker.get("CPU", 1.0))),
        "checkpoint_every": config.checkpoint.every_steps,
        "log_every": config.log_every,
    }


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    return int(np.random.SeedSequence([seed, 7, step, rank, micro]).generate_state(1, np.uint64)[0] >> 1)


def encode_prompts(pipe, prompts: list[str], resolution: int, device):
    """(encoder_hidden_states, added_cond_kwargs or None) as the pipeline's UNet expects them: SD1.5 the
    text encoder's last hidden state; SDXL both encoders' penultimate states, the pooled projection and
    the micro-conditioning time ids (original = target = training size, no crop)."""
    import torch

    def ids(tokenizer):
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)

    if getattr(pipe, "text_encoder_2", None) is None:
        return pipe.text_encoder(ids(pipe.tokenizer))[0], None
    first = pipe.text_encoder(ids(pipe.tokenizer), output_hidden_states=True)
    second = pipe.text_encoder_2(ids(pipe.tokenizer_2), output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device)
    added = {"text_embeds": second[0], "time_ids": time_ids.repeat(len(prompts), 1).to(hidden.dtype)}
    return hidden, added


def training_step(
    pipe,
    noise_scheduler,
    method,
    optimizer,
    pixels,
    labels,
    loop: dict,
    *,
    captions: list[str] | None = None,
    step: int,
    rank: int,
    device,
    autocast=None,
    all_mean_=None,
    scaler=None,
) -> tuple[float, tuple[int, int] | None]:
    """One optimizer step of the denoising loss over `loop["accumulation"]` micro-batches; returns (the
    step's loss, (lowest, highest) timestep drawn). `pixels`: N x 3 x H x W uint8 tensor, `labels`: N ints,
    `captions`: N strings ("" where a row has none: the method's prompt for its class). A full fine-tune's
    first `vae_steps` steps take the autoencoder loss instead (engine.finetune.full); MVC's micro-batches are
    its own (engine.finetune.mvc: image pairs, mixed captions), and it clips the averaged gradients.
    `all_mean_` averages the gradients (and loss) across ranks in place; None for one process. `scaler`: a
    `torch.amp.GradScaler` (fp16); the gradients are averaged while still scaled, so every rank sees the
    same inf/NaN and skips (or takes) the same steps."""
    import contextlib

    import torch

    autocast = autocast or contextlib.nullcontext
    t_min, t_max = loop["timestep_range"] or (0, noise_scheduler.config.num_train_timesteps - 1)
    scaling_factor = pipe.vae.config.scaling_factor
    optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), device=device)
    low, high = t_max, t_min
    for micro in range(loop["accumulation"]):
        # Every draw from one generator seeded by (seed, step, rank, micro): resumable, rank-distinct.
        g = torch.Generator("cpu").manual_seed(step_seed(loop["seed"], step, rank, micro))
        if loop["method"] == "mvc":
            with method.no_sync(accumulating=micro < loop["accumulation"] - 1):
                loss, timesteps = method.micro_batch_loss(
                    pixels, labels, captions, g, noise_scheduler, (t_min, t_max), loop, device, autocast
                )
                loss = loss / loop["accumulation"]
                (loss if scaler is None else scaler.scale(loss)).backward()
            step_loss += loss.detach()
            low, high = min(low, int(timesteps.min())), max(high, int(timesteps.max()))
            continue
        index = torch.randint(len(labels), (loop["batch_size"],), generator=g)
        images = pixels[index].float() / 127.5 - 1.0
        if loop["hflip"]:
            flip = torch.rand(len(index), generator=g) < 0.5
            images[flip] = images[flip].flip(-1)
        if loop["method"] == "full" and method.trains_vae(step):
            with autocast():
                loss = method.autoencoder_loss(images.to(device)) / loop["accumulation"]
            (loss if scaler is None else scaler.scale(loss)).backward()
            step_loss += loss.detach()
            continue
        if loop["method"] == "textual_inversion":
            picks = torch.randint(len(IMAGENET_TEMPLATES_SMALL), (len(index),), generator=g).tolist()
            prompts = [
                IMAGENET_TEMPLATES_SMALL[p].format(method.prompt_word(int(labels[i])))
                for p, i in zip(picks, index.tolist(), strict=True)
            ]
        else:
            prompts = [
                (captions[i] if captions else "") or method.instance_prompt(int(labels[i]))
                for i in index.tolist()
            ]
            if loop["method"] == "full" and loop["full"]["empty_prompt_prob"] > 0:
                empty = (torch.rand(len(index), generator=g) < loop["full"]["empty_prompt_prob"]).tolist()
                prompts = ["" if drop else prompt for prompt, drop in zip(prompts, empty, strict=True)]
        timesteps = torch.randint(t_min, t_max + 1, (len(index),), generator=g)
        with torch.no_grad(), autocast():
            latent_dist = pipe.vae.encode(images.to(device)).latent_dist
            sample = torch.randn(latent_dist.mean.shape, generator=g).to(device, latent_dist.mean.dtype)
            latents = ((latent_dist.mean + latent_dist.std * sample) * scaling_factor).float()
        noise = torch.randn(latents.shape, generator=g).to(device)
        timesteps = timesteps.to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with autocast():
            hidden, added = encode_prompts(pipe, prompts, loop["resolution"], device)
            prediction = pipe.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float()) / loop["accumulation"]
        (loss if scaler is None else scaler.scale(loss)).backward()
        step_loss += loss.detach()
        low, high = min(low, int(timesteps.min())), max(high, int(timesteps.max()))
    method.after_backward()
    if all_mean_ is not None:
        # Under DDP (MVC's UNet, several ranks) the last backward pass has averaged the gradients already.
        synced = getattr(method, "ddp", None) is not None
        all_mean_(
            ([] if synced else [p.grad for p in method.parameters() if p.grad is not None]) + [step_loss]
        )
    if loop["method"] == "mvc" and loop["mvc"]["max_grad_norm"] is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients; scaler.step then knows they are unscaled
        torch.nn.utils.clip_grad_norm_(method.parameters(), loop["mvc"]["max_grad_norm"])
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # unscales; skips the step when a gradient is inf/NaN
        scaler.update()
    method.after_step()
    # None: no denoising micro-batch this step (a full fine-tune's VAE phase), so no timestep drawn.
    return float(step_loss), ((low, high) if low <= high else None)


def mixed_precision(precision: str, device):
    """(autocast dtype or None, whether it needs fp16 loss scaling). Mixed precision on CUDA only: "auto" is
    bf16 where the GPU has it, else fp16 (with a GradScaler); on CPU everything runs in fp32 ("fp16" never
    gets here on CPU: the config refuses it without GPU workers)."""
    import torch

    if device.type != "cuda" or precision == "fp32":
        if precision == "fp16":
            raise ValueError("scaling.precision fp16 needs a CUDA device (fp16 autocast is CUDA only here)")
        return None, False
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "bf16":
        if not torch.cuda.is_bf16_supported():
            raise ValueError("scaling.precision bf16, but this GPU has no bf16: use fp16, fp32 or auto")
        return torch.bfloat16, False
    return torch.float16, True


def finetune_loop_per_worker(loop: dict) -> None:
    """One rank: pipeline + method, resume, then optimizer steps until `max_steps`; checkpoints every N."""
    import contextlib

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from diffusers import DDPMScheduler

    from engine.config import AdapterConfig, ModelRef
    from engine.finetune.full import FullFinetune
    from engine.finetune.lora import DreamBoothLora
    from engine.finetune.mvc import MvcFinetune
    from engine.finetune.stream import SampleBuffer, epoch_shuffle_seed
    from engine.finetune.textual_inversion import TextualInversion
    from engine.models.diffusion import load_pipeline, read_textual_inversion
    from engine.train.loop import _quiet_report_logs

    _quiet_report_logs()  # Ray Train's per-report INFO lines; the progress line says the same
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(loop["torch_threads"])
    device = ray.train.torch.get_device()
    class_names = loop["class_names"]

    # 1. The base pipeline (fp32 weights; autocast below on GPU), through the generators' own loader.
    ti_ref = loop["lora"]["textual_inversion"] if loop["method"] == "dreambooth_lora" else None
    adapters = AdapterConfig(textual_inversion=ti_ref) if ti_ref else None
    pipe = load_pipeline(
        ModelRef(**loop["model"]), role="finetune", device=str(device), dtype="float32", adapters=adapters
    )
    pipe.set_progress_bar_config(disable=True)
    for name in ("vae", "unet", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False)
    pipe.vae.eval()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    if loop["timestep_range"] and loop["timestep_range"][1] >= num_train_timesteps:
        raise ValueError(
            f"timestep_range {loop['timestep_range']} is beyond the scheduler's {num_train_timesteps}"
        )

    # 2. The method; the seed makes every rank start from the same weights (LoRA init).
    torch.manual_seed(loop["seed"])
    if loop["method"] == "textual_inversion":
        method = TextualInversion(pipe, class_names, loop["textual_inversion"])
    elif loop["method"] == "full":
        method = FullFinetune(pipe, class_names, loop["full"])
    elif loop["method"] == "mvc":
        method = MvcFinetune(pipe, class_names, loop["mvc"])
        if world_size > 1:
            method.distribute(device)
    else:
        tokens = None
        if ti_ref:
            path = Path(ModelRef(**ti_ref).id).expanduser()
            tokens, _ = read_textual_inversion(
                path if path.is_file() else path / "textual_inversion.safetensors"
            )
            if len(tokens) != len(class_names):
                raise ValueError(
                    f"textual inversion {path} has {len(tokens)} tokens for {len(class_names)} classes"
                )
        method = DreamBoothLora(pipe, class_names, loop["lora"], tokens)
    optimizer = torch.optim.AdamW(
        method.parameters(), lr=loop["learning_rate"], weight_decay=loop["weight_decay"]
    )
    amp_dtype, needs_scaler = mixed_precision(loop["precision"], device)
    scaler = torch.amp.GradScaler("cuda") if needs_scaler else None

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    # 3. This rank's rows, streamed through a bounded buffer (engine.finetune.stream).
    shard = ray.train.get_dataset_shard(rank_key(rank))
    rows = loop["rank_rows"][rank]

    def read_epoch(epoch: int):
        return shard.iter_batches(
            batch_size=64,
            batch_format="numpy",
            local_shuffle_buffer_size=min(rows, loop["buffer_rows"]),
            local_shuffle_seed=epoch_shuffle_seed(loop["seed"], rank, epoch),
        )

    side = loop["resolution"]
    buffer = SampleBuffer(
        read_epoch,
        rows,
        capacity=loop["buffer_rows"],
        refresh=loop["batch_size"] * loop["accumulation"],
        columns=[(PIXELS, np.uint8, (side, side, 3)), ("label", np.int64, ()), (CAPTION, object, ())],
    )

    # 4. Resume.
    start_step, history, segments, resumed_from = 0, [], [], None
    timesteps_seen = [None, None]
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        from safetensors.torch import load_file

        with checkpoint.as_directory() as folder:
            state = json.loads((Path(folder) / STATE_FILE).read_text())
            method.load_state_tensors(load_file(str(Path(folder) / TRAINABLE_FILE)))
            optimizer.load_state_dict(
                torch.load(Path(folder) / OPTIMIZER_FILE, map_location=device, weights_only=True)
            )
            if scaler is not None and (Path(folder) / SCALER_FILE).exists():
                scaler.load_state_dict(torch.load(Path(folder) / SCALER_FILE, weights_only=True))
        start_step, history, segments = state["step"], state["loss_history"], state["segments"]
        timesteps_seen, resumed_from = state["timesteps_seen"], state["step"]

    def all_mean_(tensors: list) -> None:
        if world_size > 1:
            for tensor in tensors:
                dist.all_reduce(tensor)
                tensor /= world_size

    # 5. Steps.
    started = time.perf_counter()
    if start_step < loop["max_steps"]:
        buffer.seek(start_step)
    # N, 3, H, W uint8 view of the buffer: refilled in place, so it needs making only once.
    pixels = torch.from_numpy(buffer.data[PIXELS]).permute(0, 3, 1, 2)
    for step in range(start_step, loop["max_steps"]):
        if step > start_step:
            buffer.advance()
        step_loss, drawn = training_step(
            pipe,
            noise_scheduler,
            method,
            optimizer,
            pixels,
            buffer.data["label"],
            loop,
            captions=[str(c) for c in buffer.data[CAPTION]],
            step=step,
            rank=rank,
            device=device,
            autocast=autocast,
            all_mean_=all_mean_,
            scaler=scaler,
        )
        if drawn is not None:
            low, high = drawn
            timesteps_seen = [
                low if timesteps_seen[0] is None else min(timesteps_seen[0], low),
                high if timesteps_seen[1] is None else max(timesteps_seen[1], high),
            ]
        history.append(step_loss)
        done = step + 1
        if rank == 0 and (done % loop["log_every"] == 0 or done == loop["max_steps"]):
            rate = (done - start_step) / max(time.perf_counter() - started, 1e-9)
            print(
                f"finetune step {done}/{loop['max_steps']}  loss {history[-1]:.4f}  {rate:.2f} steps/s",
                flush=True,
            )
        if done % loop["checkpoint_every"] == 0 or done == loop["max_steps"]:
            segment = {
                "from_step": start_step,
                "to_step": done,
                "train_s": round(time.perf_counter() - started, 3),
            }
            state = {
                "step": done,
                "loss_history": history,
                "segments": [*segments, segment],
                "timesteps_seen": timesteps_seen,
                "resumed_from_step": resumed_from,
                "tokens": getattr(method, "tokens", None),
            }
            _report(state, method, optimizer, scaler, rank, world_size)

    # 6. A run resumed at its last step still ends on a checkpoint carrying its state and adapter files.
    if start_step >= loop["max_steps"]:
        state = {
            "step": start_step,
            "loss_history": history,
            "segments": segments,
            "timesteps_seen": timesteps_seen,
            "resumed_from_step": resumed_from,
            "tokens": getattr(method, "tokens", None),
        }
        _report(state, method, optimizer, scaler, rank, world_size)


def weights_digest(tensors: dict) -> str:
    """sha1 of the trainable tensors (name order): equal on every rank when the ranks stayed in sync."""
    import hashlib

    digest = hashlib.sha1()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].numpy().tobytes())
    return digest.hexdigest()


def _report(state: dict, method, optimizer, scaler, rank: int, world_size: int) -> None:
    """Every rank reports; rank 0 attaches the checkpoint: trainable tensors, optimizer (and fp16 loss
    scaler), state (with every rank's weights digest) and the exported adapter files (what the driver copies
    out as the run's result)."""
    import tempfile

    import ray.train
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    digests = [weights_digest(method.state_tensors())]
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, digests[0])
        digests = gathered
    state = {**state, "rank_weight_digests": digests}

    metrics = {"step": state["step"], "loss": state["loss_history"][-1] if state["loss_history"] else None}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_file(method.state_tensors(), str(Path(folder) / TRAINABLE_FILE))
        torch.save(optimizer.state_dict(), Path(folder) / OPTIMIZER_FILE)
        if scaler is not None:
            torch.save(scaler.state_dict(), Path(folder) / SCALER_FILE)
        (Path(folder) / STATE_FILE).write_text(json.dumps(state))
        method.export(Path(folder))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
