"""MVC's generator: images from mixed caption embeddings (Algorithm 1) through the fine-tuned image-conditioned
pipeline, and from captions through the pre-trained text-to-image pipeline.

Reads `class_name`, `source_id`, `seed`. Writes `image` (height x width), `prompt` (the base caption), `mvc`
(JSON: which generator, the caption index, the mix plan, the condition's source_id), `mvc_unmixed` (1 for a
row whose class has a single caption: its embedding is used unmixed) and clears `mask`/`bbox` (they described
the real image). Error reason `no_partner`: the class pool holds no image of the class for the condition.

Each row's choices are drawn from its seed: the generator (pre-trained with probability
`mvc.pretrained_share`), the caption, the mix plan (engine.methods.mvc_mix) and the condition image, a real
image of the class drawn from the class pool (MVC: "a random real image of the same class"). Guidance is
MVC's Eq. 6, one scale w against a null that drops text and image together: the InstructPix2Pix pipeline
combines uncond + s_T (text_img - img) + s_I (img - uncond), which is uncond + w (text_img - uncond) when
s_T = s_I = w (`ip2p_scales`).
"""

from __future__ import annotations

import json

import numpy as np

from engine import schema
from engine.config import MvcConfig
from engine.methods.mvc_mix import apply_mix, needed, plan_mix
from engine.models.diffusion import load_pipeline
from engine.models.references import resolve_device
from engine.stages.batch import error_columns
from engine.stages.decode import decode_image

STAGE = "mvc"
PARAMS = "mvc"
UNMIXED = "mvc_unmixed"
NO_PARTNER = "no_partner"
FINETUNED, PRETRAINED = "finetuned", "pretrained"
(_SOURCE, _CAPTION, _MIX, _PARTNER) = range(4)  # draw streams of a row's seed


def ip2p_scales(w: float) -> dict[str, float]:
    """Eq. 6's single scale as the InstructPix2Pix pipeline's two (see the module docstring)."""
    return {"guidance_scale": w, "image_guidance_scale": w}


def _draw(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


class MvcGenerator:
    """Callable class for `map_batches(batch_format="numpy")`: loads the pipelines its shares need."""

    def __init__(self, config: MvcConfig, class_names: list[str], pool, captions: dict[str, list[str]]):
        import diffusers
        import torch

        self.config, self.pool, self.captions = config, pool, captions
        self.device = resolve_device(config.device)
        self._torch = torch
        self.finetuned = self.pretrained = None
        if config.pretrained_share < 1:
            self.finetuned = load_pipeline(
                config.model,
                role="MVC image-conditioned pipeline",
                device=self.device,
                dtype=config.dtype,
                pipeline_class=diffusers.StableDiffusionInstructPix2PixPipeline,
            )
            channels = self.finetuned.unet.config.in_channels
            if channels != 8:
                raise ValueError(
                    f"mvc.model {config.model.id}: its UNet takes {channels} input channels, the "
                    "image-conditioned mode needs 8 (fine-tune it with synthray finetune, method mvc)"
                )
            self.finetuned.set_progress_bar_config(disable=True)
            self.null = self.encode([""])  # Eq. 6's null text, the same for every row: encoded once
        if config.pretrained_share > 0:
            self.pretrained = load_pipeline(
                config.pretrained,
                role="MVC pre-trained pipeline",
                device=self.device,
                dtype=config.dtype,
                pipeline_class=diffusers.StableDiffusionPipeline,
            )
            self.pretrained.set_progress_bar_config(disable=True)

    def plan_row(self, class_name: str, source_id: str, seed: int) -> dict:
        """The row's choices (no pixels): generator, caption, mix plan, condition."""
        config, captions = self.config, self.captions[class_name]
        source = PRETRAINED if _draw(seed, _SOURCE).random() < config.pretrained_share else FINETUNED
        # Keys starting with "_" are working state, left out of the row's params.
        plan: dict = {"source": source, "_captions": captions}
        if source == PRETRAINED:
            plan["caption"] = int(_draw(seed, _CAPTION).integers(len(captions)))
        else:
            m, d = self._embedding_shape()
            mix = plan_mix(_draw(seed, _MIX), len(captions), m, d, config.coarse_steps, config.fine_steps)
            plan.update(caption=mix.base, mix=mix.to_dict(), mixed=mix.mixed, _plan=mix)
            # The condition: another real image of the class (the row's own when the pool has no other).
            partner = int(_draw(seed, _PARTNER).integers(2**31))
            plan["partner"] = self.pool.partner(class_name, source_id, partner) or self.pool.partner(
                class_name, "", partner
            )
        plan["prompt"] = captions[plan["caption"]]
        return plan

    def _embedding_shape(self) -> tuple[int, int]:
        pipe = self.finetuned
        return pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        schema.require_columns(batch, (schema.CLASS_NAME, schema.SOURCE_ID, schema.SEED), STAGE)
        n = len(batch[schema.SEED])
        errors, messages = error_columns(batch, n)
        seeds = [int(s) for s in batch[schema.SEED]]
        plans = [
            self.plan_row(str(c), str(s), seed)
            for c, s, seed in zip(batch[schema.CLASS_NAME], batch[schema.SOURCE_ID], seeds, strict=True)
        ]
        for i, plan in enumerate(plans):
            if plan["source"] == FINETUNED and plan["partner"] is None:
                errors[i] = NO_PARTNER
                messages[i] = (
                    f"the class pool holds no image of {batch[schema.CLASS_NAME][i]!r} to condition on"
                )
        images = np.empty(n, dtype=object)
        for source in (FINETUNED, PRETRAINED):
            rows = [i for i in range(n) if plans[i]["source"] == source and not errors[i]]
            if rows:
                pixels = self.generate(source, rows, plans, seeds)
                for i, image in zip(rows, pixels, strict=True):
                    images[i] = (np.nan_to_num(image).clip(0, 1) * 255).round().astype(np.uint8)
        for i in range(n):  # failed rows leave the stream; they keep a placeholder image
            if images[i] is None:
                images[i] = np.zeros((1, 1, 3), np.uint8)
        out = dict(batch)
        out[schema.IMAGE] = images
        out[schema.MASK] = np.full(n, None, dtype=object)
        out[schema.BBOX] = np.full(n, None, dtype=object)
        out[schema.PROMPT] = np.array([p["prompt"] for p in plans], dtype=object)
        out[UNMIXED] = np.array([int(p.get("mixed") is False) for p in plans], dtype=np.int64)
        out[PARAMS] = np.array(
            [
                json.dumps({k: v for k, v in p.items() if not k.startswith("_")}, sort_keys=True)
                for p in plans
            ],
            dtype=object,
        )
        out[schema.ERROR], out[schema.ERROR_MESSAGE] = errors, messages
        return out

    def generate(self, source: str, rows: list[int], plans: list[dict], seeds: list[int]):
        """Pixels (N, H, W, 3) float in [0, 1] for rows of one generator."""
        torch, config = self._torch, self.config
        common = {
            "num_inference_steps": config.num_inference_steps,
            "generator": [torch.Generator("cpu").manual_seed(seeds[i]) for i in rows],
            "output_type": "np",
        }
        if source == PRETRAINED:
            output = self.pretrained(
                prompt=[plans[i]["prompt"] for i in rows],
                height=config.height,
                width=config.width,
                guidance_scale=config.guidance_scale,
                **common,
            )
            return output.images
        embeds = torch.stack([self.mixed_embedding(plans[i]) for i in rows])
        null = self.null.expand_as(embeds)
        conditions = []
        for i in rows:
            data = self.pool.row(plans[i]["partner"])[schema.IMAGE_BYTES]
            image = decode_image(data, max_pixels=1 << 30, min_side=1)
            conditions.append(_pil(image, config.width, config.height))
        output = self.finetuned(
            prompt_embeds=embeds,
            negative_prompt_embeds=null,
            image=conditions,
            **ip2p_scales(config.guidance_scale),
            **common,
        )
        return output.images

    def mixed_embedding(self, plan: dict):
        """Algorithm 1 on the CLIP embeddings of the captions the row's plan reads (only those are encoded)."""
        mix, captions = plan["_plan"], plan["_captions"]
        indices = needed(mix)
        encoded = self.encode([captions[j] for j in indices])
        return apply_mix(dict(zip(indices, encoded, strict=True)), mix)

    def encode(self, texts: list[str]):
        """CLIP last hidden states (N, m, d) of the fine-tuned pipeline's text encoder."""
        # What Stable Diffusion's encode_prompt does (the InstructPix2Pix pipeline keeps it private, and it
        # returns the three guidance branches concatenated): padded to the tokenizer's length, last hidden state.
        pipe = self.finetuned
        tokens = pipe.tokenizer(
            texts,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        with self._torch.no_grad():
            return pipe.text_encoder(tokens.input_ids.to(self.device))[0]


def _pil(image: np.ndarray, width: int, height: int):
    from PIL import Image

    return Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC)
