"""The model side of the generator's `gif` mode: CLIP loaded once per actor, its class-prompt features, and the
guided decode of a batch of SDEdit latents (the math is engine/methods/gif.py)."""

from __future__ import annotations

import numpy as np

from engine.config import GifSpec
from engine.methods import gif
from engine.models.references import clip_features, pretrained_kwargs, resolve_model

ROLE = "generate (gif CLIP)"


class GifGuide:
    def __init__(self, spec: GifSpec, class_names: list[str], device: str):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        path, revision = resolve_model(spec.clip, ROLE)
        # float32: the guidance step takes a gradient through CLIP and the VAE decoder.
        self.model = (
            CLIPModel.from_pretrained(path, **pretrained_kwargs(spec.clip, revision)).to(device).eval()
        )
        self.model.requires_grad_(False)
        processor = CLIPProcessor.from_pretrained(path, **pretrained_kwargs(spec.clip, revision, False))
        size = processor.image_processor.crop_size
        self.size = (size["height"], size["width"])
        self.mean = torch.tensor(processor.image_processor.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_processor.image_std, device=device).view(1, 3, 1, 1)
        self.spec, self.device, self._torch = spec, device, torch
        with torch.no_grad():
            prompts = [spec.clip_prompt.format(class_name=name) for name in class_names]
            text = processor(text=prompts, padding=True, truncation=True, return_tensors="pt").to(device)
            self.text = torch.nn.functional.normalize(
                clip_features(self.model.get_text_features(**text)), dim=-1
            )
            self.scale = float(self.model.logit_scale.exp())

    def embed(self, images):
        """Normalized CLIP image features of images (N x 3 x H x W in [0, 1]), differentiable: the whole image
        resized to CLIP's input (no crop: the generated image is the row), then CLIP's normalization."""
        torch = self._torch
        pixels = torch.nn.functional.interpolate(
            images.float(), size=self.size, mode="bicubic", antialias=True
        )
        pixels = (pixels - self.mean) / self.std
        return torch.nn.functional.normalize(
            clip_features(self.model.get_image_features(pixel_values=pixels)), dim=-1
        )

    def probs(self, images: list[np.ndarray]):
        """CLIP class probabilities of uint8 images (the sources)."""
        torch = self._torch
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().to(self.device) / 255.0
        with torch.no_grad():
            return (self.scale * self.embed(pixels) @ self.text.T).softmax(-1)

    def decode(self, pipe, latents, rngs: list[np.random.Generator], sources: list[np.ndarray]):
        """The guided images (N x H x W x 3 float in [0, 1]) of SDEdit `latents` (the pipeline's scaled ones)
        and the safety checker's flags when the pipeline loaded one. Each row's noise and bias are drawn from
        its own generator (`rngs`, seeded by the row), so a row is the same in any batch."""
        torch, vae = self._torch, pipe.vae

        def to_pixels(z):
            decoded = vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample
            return (decoded.float() / 2 + 0.5).clamp(0, 1)

        channels = latents.shape[1]
        # DiffDA-Eval augmentation/gif.py: channel noise ~ U(0, 1), channel bias ~ N(0, 1).
        noise = torch.tensor(np.stack([r.uniform(0, 1, (channels, 1, 1)) for r in rngs]), dtype=torch.float32)
        bias = torch.tensor(np.stack([r.normal(0, 1, (channels, 1, 1)) for r in rngs]), dtype=torch.float32)
        guided = gif.guide_latents(
            latents.float(),
            noise.to(self.device),
            bias.to(self.device),
            to_pixels,
            self.embed,
            self.probs(sources),
            self.text,
            self.scale,
            step_size=self.spec.step_size,
            constraint=self.spec.constraint,
        )
        with torch.no_grad():
            pixels = to_pixels(guided)
            flagged = [False] * len(rngs)
            if getattr(pipe, "safety_checker", None) is not None:
                _, nsfw = pipe.run_safety_checker(pixels * 2 - 1, self.device, vae.dtype)
                flagged = [bool(f) for f in nsfw]
        return pixels.permute(0, 2, 3, 1).cpu().numpy(), flagged
