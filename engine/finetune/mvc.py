"""MVC's generator (`method: mvc`; Al Rahat and Venkateswara, "Dataset Augmentation by Mixing Visual Concepts",
2024): the whole Stable Diffusion UNet fine-tuned to take a real image of the class as extra input channels, as
InstructPix2Pix does (Brooks et al. 2023), with a mix of the class's caption embeddings as its text (MVC's
Algorithm 1, engine.methods.mvc_mix). A generating stage then runs it as an InstructPix2Pix pipeline: a real
image in, another image of its class out.

Each sample of a micro-batch, every draw from the step's seeded generator (engine.finetune.loop), so a resumed
run draws what an uninterrupted one would:
1. an image x of class c and another image x' of c, the condition (`draw_pairs`), both from the worker's buffer
   (engine.finetune.stream: all of its rows when they fit, else the `buffer_rows` most recently streamed); a
   class with a single image there pairs it with itself (the job counts the classes with one image in all);
2. the text: a mixed embedding of c's captions (`plan_mix`; only the captions the plan reads go through the
   frozen text encoder; a row without a caption reads as the class prefix alone);
3. conditioning dropout (`conditioning_dropout`: diffusers' train_instruct_pix2pix scheme);
4. the UNet's input: the noisy latent of x beside the VAE latent of x' as the reference takes it,
   `latent_dist.mode()` unscaled (StableDiffusionInstructPix2PixPipeline encodes its input image the same way
   when it generates); the loss is the usual denoising MSE.

The UNet's conv_in is widened from 4 to 8 input channels as the reference does (`widen_conv_in`). With more than
one worker the UNet runs under DDP (bucketed all-reduce overlapping the backward pass): the loop's tensor-by-tensor
averaging is slow for a whole UNet. Saved as a `StableDiffusionInstructPix2PixPipeline` folder (`pipeline/`):
the base pipeline's VAE, text encoder, tokenizer and scheduler with the trained UNet.

torch and diffusers are imported inside the functions: the driver imports this module without them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from engine.methods.mvc_mix import apply_mix, needed, plan_mix

PIPELINE_DIR = "pipeline"


def widen_conv_in(unet, latent_channels: int) -> bool:
    """Let `unet` read the noisy latent and a condition latent side by side: conv_in widened from
    `latent_channels` to twice that, the new input channels' weights zero and the old ones (and the bias)
    copied, so at step 0 the UNet computes exactly what the base computes on the noisy latent alone. Returns
    False, changing nothing, for a UNet that already reads both (an InstructPix2Pix checkpoint).

    diffusers' train_instruct_pix2pix widens it the same way, but leaves the new conv's bias at its random
    initialisation; we copy the base's bias too, so that the base's function is kept exactly."""
    import torch

    channels = unet.config.in_channels
    if channels == 2 * latent_channels:
        return False
    if channels != latent_channels:
        raise ValueError(
            f"method mvc: the base UNet reads {channels} input channels; it must read the VAE's "
            f"{latent_channels} latent channels (a text-to-image UNet, widened here) or "
            f"{2 * latent_channels} (an InstructPix2Pix UNet, kept as it is)"
        )
    old = unet.conv_in
    new = torch.nn.Conv2d(
        2 * latent_channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :latent_channels].copy_(old.weight)
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=2 * latent_channels)
    return True


def draw_pairs(labels: np.ndarray, batch_size: int, generator) -> tuple[np.ndarray, np.ndarray]:
    """(x rows, x' rows): each x uniform over all rows, its x' uniform over the other rows of x's class, or x
    itself when that class has one row. Every draw from `generator` (a torch.Generator), in a fixed order,
    so the pairs are a function of its seed."""
    import torch

    index = torch.randint(len(labels), (batch_size,), generator=generator).numpy()
    partner = index.copy()
    for k, i in enumerate(index):
        others = np.flatnonzero(labels == labels[i])
        others = others[others != i]
        if len(others):
            partner[k] = others[int(torch.randint(len(others), (1,), generator=generator))]
    return index, partner


def conditioning_dropout(uniform, prob: float):
    """(drop text, drop image) from one uniform draw per sample, as diffusers' train_instruct_pix2pix does it
    (InstructPix2Pix section 3.2.1): u < p drops the text, p <= u < 2p both, 2p <= u < 3p the image. So with p
    = 0.05, 5% of the samples train image-only, 5% text-only, 5% unconditioned: what the pipeline's two
    guidance scales push against. Works on numpy arrays and torch tensors alike."""
    return uniform < 2 * prob, (uniform >= prob) & (uniform < 3 * prob)


class MvcFinetune:
    """The method's trainable state on one worker: the whole (widened) UNet."""

    def __init__(self, pipe, class_names: list[str], spec: dict):
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise ValueError(
                "method mvc trains an SD1.x/2.x-layout pipeline (one text encoder, "
                "StableDiffusionInstructPix2PixPipeline); this base has two text encoders (SDXL)"
            )
        self.pipe = pipe
        self.class_names = class_names
        self.prefix = spec["prefix"]
        self.coarse_steps, self.fine_steps = spec["coarse_steps"], spec["fine_steps"]
        self.dropout = spec["conditioning_dropout_prob"]
        self.latent_channels = pipe.vae.config.latent_channels
        self.widened = widen_conv_in(pipe.unet, self.latent_channels)
        pipe.unet.requires_grad_(True)
        pipe.unet.train()
        self.ddp = None  # set by `distribute` when there are several ranks

    def distribute(self, device) -> None:
        """Wrap the UNet in DistributedDataParallel (the process group is Ray Train's); it broadcasts rank 0's
        weights now and averages the gradients during every synchronised backward pass."""
        import torch

        self.ddp = torch.nn.parallel.DistributedDataParallel(
            self.pipe.unet, device_ids=[device] if device.type == "cuda" else None
        )

    def no_sync(self, accumulating: bool):
        """DDP's no_sync for the micro-batches before the last of a step: their gradients stay local and are
        averaged, summed with the last one's, by the last backward pass."""
        if self.ddp is None or not accumulating:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def parameters(self) -> list:
        return list(self.pipe.unet.parameters())

    def class_captions(self, label: int, labels: np.ndarray, captions: list[str]) -> list[str]:
        """The captions of a class, one per row in row order (a row without one: the class prefix alone)."""
        prefix = self.prefix.format(class_name=self.class_names[label])
        return [captions[j] or prefix for j in np.flatnonzero(labels == label)]

    def encode(self, texts: list[str], device):
        """The frozen text encoder's last hidden states, N x m x d (the UNet's encoder_hidden_states)."""
        import torch

        ids = self.pipe.tokenizer(
            texts,
            padding="max_length",
            max_length=self.pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        with torch.no_grad():
            return self.pipe.text_encoder(ids)[0]

    def mixed_embeddings(self, classes: list[int], labels: np.ndarray, captions: list[str], rng, device):
        """One mixed embedding per sample (N x m x d): Algorithm 1 over the captions of its class, planned
        from `rng`; the captions the plans read are encoded once, together."""
        import torch

        m, d = self.pipe.tokenizer.model_max_length, self.pipe.text_encoder.config.hidden_size
        pools = {c: self.class_captions(c, labels, captions) for c in sorted(set(classes))}
        plans = [plan_mix(rng, len(pools[c]), m, d, self.coarse_steps, self.fine_steps) for c in classes]
        wanted = list(
            dict.fromkeys((c, i) for c, plan in zip(classes, plans, strict=True) for i in needed(plan))
        )
        encoded = dict(zip(wanted, self.encode([pools[c][i] for c, i in wanted], device), strict=True))
        return torch.stack(
            [
                apply_mix({i: encoded[(c, i)] for i in needed(plan)}, plan)
                for c, plan in zip(classes, plans, strict=True)
            ]
        )

    def micro_batch_loss(
        self, pixels, labels, captions, generator, noise_scheduler, timestep_range, loop, device, autocast
    ):
        """(denoising loss, timesteps drawn) of one micro-batch of `loop["batch_size"]` samples; `pixels`: N x 3
        x H x W uint8 tensor, `labels`: N ints, `captions`: N strings ("" for none)."""
        import torch

        n = loop["batch_size"]
        # 1. Draws, in a fixed order from the step's generator.
        index, partner = draw_pairs(labels, n, generator)
        images = _images(pixels, index, generator, loop["hflip"])
        # x' flips on its own draw: it is another image, not aligned with x as InstructPix2Pix's pairs are.
        conditions = _images(pixels, partner, generator, loop["hflip"])
        timesteps = torch.randint(timestep_range[0], timestep_range[1] + 1, (n,), generator=generator)
        uniform = torch.rand(n, generator=generator)
        mix_rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
        classes = [int(labels[i]) for i in index]
        with torch.no_grad(), autocast():
            # 2. x's latent: a posterior sample, scaled (as the loop does for every method).
            latent_dist = self.pipe.vae.encode(images.to(device)).latent_dist
            sample = torch.randn(latent_dist.mean.shape, generator=generator).to(
                device, latent_dist.mean.dtype
            )
            latents = (
                (latent_dist.mean + latent_dist.std * sample) * self.pipe.vae.config.scaling_factor
            ).float()
            # 3. x' as the reference and the pipeline encode the condition: the posterior's mode, unscaled.
            condition = self.pipe.vae.encode(conditions.to(device)).latent_dist.mode().float()
            hidden = self.mixed_embeddings(classes, labels, captions, mix_rng, device)
            # 4. Conditioning dropout: the empty prompt's embedding for the text, zeros for the image (what the
            # pipeline feeds its unconditional branches).
            drop_text, drop_image = conditioning_dropout(uniform, self.dropout)
            if bool(drop_text.any()):
                null = self.encode([""], device)
                hidden = torch.where(drop_text.to(device).reshape(-1, 1, 1), null, hidden)
            condition = condition * (~drop_image).to(device, condition.dtype).reshape(-1, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = timesteps.to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        unet = self.ddp if self.ddp is not None else self.pipe.unet
        with autocast():
            prediction = unet(torch.cat([noisy, condition], dim=1), timesteps, hidden).sample
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        return torch.nn.functional.mse_loss(prediction.float(), target.float()), timesteps

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def state_tensors(self) -> dict:
        return {k: v.detach().float().cpu().contiguous() for k, v in self.pipe.unet.state_dict().items()}

    def load_state_tensors(self, tensors: dict) -> None:
        self.pipe.unet.load_state_dict(tensors, strict=True)

    def export(self, folder: Path) -> list[Path]:
        from diffusers import StableDiffusionInstructPix2PixPipeline

        pipe = self.pipe
        ip2p = StableDiffusionInstructPix2PixPipeline(
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            unet=pipe.unet,
            scheduler=pipe.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        out = Path(folder) / PIPELINE_DIR
        ip2p.save_pretrained(out, safe_serialization=True)
        return [out]


def _images(pixels, rows: np.ndarray, generator, hflip: bool):
    """The rows' images in [-1, 1], N x 3 x H x W float, each flipped on a draw when `hflip`."""
    import torch

    images = pixels[torch.from_numpy(rows)].float() / 127.5 - 1.0
    if hflip:
        flip = torch.rand(len(rows), generator=generator) < 0.5
        images[flip] = images[flip].flip(-1)
    return images
