"""The diffusion generator of the UniDiffDA recipe: one actor, six modes (`GenerationConfig.mode`).

Reads `image` (HxWx3 uint8; not for txt2img), `class_name`, `label`, `source_id`, `seed`. Writes `image`
(the generated picture: height x width, or the input's own size under input_size pad), `prompt`, `generation`
(JSON: mode, strength, instruction, partner, interpolation weight, prompt switch, DiffuseMix blend, target
class, adapters), `soft_label` (Diff-Mix rows; None otherwise), and clears `mask`/`bbox` (they described the
real image) unless keep_mask, where the output has the input's size and keeps them. Error reasons: `no_partner`
(ddim_interp, a class pool without a second image of the class), `input_size` (input_size: refuse),
`generation_nonfinite`. Rows dropped to filtered.parquet (engine.stages.output_checks): `blank_output`, and
`nsfw_flagged` when the config loads the safety checker.

Every random choice of a row (strength, instruction, target class, partner, weight, noise) is drawn from
generators seeded by the row's seed, so a row is the same in any batch, on any worker, in a resumed run.
"""

from __future__ import annotations

import json

import cv2
import numpy as np

from engine import schema
from engine.config import GenerationConfig
from engine.methods import diffusemix
from engine.models.diffusion import load_pipeline, textual_inversion_classes
from engine.models.references import resolve_device
from engine.stages.batch import object_array
from engine.stages.decode import RowError, decode_image
from engine.stages.output_checks import drop_rules

STAGE = "generate"
PARAMS = "generation"
NO_PARTNER = "no_partner"
NONFINITE = "generation_nonfinite"
# Draw streams of a row's seed: independent choices that do not shift when another mode draws more.
(_STRENGTH, _INSTRUCTION, _TARGET, _PARTNER, _WEIGHT, _SUFFIX, _BLEND, _FRACTAL, _GIF_PROMPT,
 _GIF_NOISE) = range(10)  # fmt: skip


class DiffusionGenerator:
    """Callable class for `map_batches(batch_format="numpy")`: loads the pipeline once per actor."""

    def __init__(self, config: GenerationConfig, class_names: list[str], pool=None):
        import torch

        if config.mode == "ddim_interp" and pool is None:
            raise ValueError(
                "generation.mode ddim_interp needs a class pool (the unidiffda recipe builds it)"
            )
        self.config, self.class_names, self.pool = config, list(class_names), pool
        self.device = resolve_device(config.device)
        self._torch = torch
        self.pipe = load_pipeline(
            config.model,
            role=STAGE,
            device=self.device,
            dtype=config.dtype,
            adapters=config.adapters,
            scheduler="DDIMScheduler" if config.mode == "ddim_interp" else config.scheduler,
            unet=config.unet,
            pipeline_class=_pipeline_class(config.mode),
            safety_checker=bool(config.safety_checker),
        )
        self.pipe.set_progress_bar_config(disable=True)  # Ray Data reports progress
        self.gif = None
        if config.gif is not None:
            from engine.models.gif_guide import GifGuide

            if getattr(self.pipe, "vae", None) is None:
                raise ValueError(
                    f"generation.mode gif needs a pipeline with a VAE; {config.model.id} has none"
                )
            self.gif = GifGuide(config.gif, self.class_names, self.device)
        if config.mode == "ddim_interp" and getattr(self.pipe, "text_encoder_2", None) is not None:
            raise ValueError("generation.mode ddim_interp supports SD1.x/2.x pipelines (one text encoder)")
        multiple = self.pipe.vae_scale_factor
        if config.height % multiple or config.width % multiple:
            raise ValueError(
                f"generation height/width ({config.height}x{config.width}) must be multiples of {multiple} "
                f"(the VAE scale factor of {config.model.id})"
            )
        tokens = {}
        if config.adapters is not None and config.adapters.textual_inversion is not None:
            tokens = textual_inversion_classes(config.adapters.textual_inversion, STAGE)
        self.tokens = {name: tokens.get(name, name) for name in self.class_names}
        self.fractals: dict[str, np.ndarray] | None = None  # name -> image, in name order
        if config.diffusemix is not None and config.diffusemix.fractals is not None:
            self.fractals = diffusemix.load_fractals(config.diffusemix.fractals, config.height, config.width)
        self.adapter_tags = {
            kind: ref.tag()
            for kind, ref in (
                ("textual_inversion", getattr(config.adapters, "textual_inversion", None)),
                ("lora", getattr(config.adapters, "lora", None)),
            )
            if ref is not None
        }

    # ------------------------------------------------------------------ per row

    def class_prompt(self, class_name: str) -> str:
        superclass = self.config.superclasses.get(class_name, self.config.superclass or "")
        prompt = self.config.prompt.format(
            token=self.tokens.get(class_name, class_name), superclass=superclass
        )
        return " ".join(prompt.split())  # an empty {superclass} leaves no double or trailing space

    def plan_row(self, class_name: str, label: int, source_id: str, seed: int) -> dict:
        """The row's choices (no pixels): prompt, strength, instruction, target, partner, weight."""
        config, mode = self.config, self.config.mode
        plan: dict = {"mode": mode, "prompt": self.class_prompt(class_name)}
        if mode in ("sdedit", "diffmix", "gif"):
            plan["strength"] = float(_draw(seed, _STRENGTH).choice(config.strengths()))
        if mode == "gif":  # the reference's "<domain> <adjective> <class>"
            rng = _draw(seed, _GIF_PROMPT)
            words = (rng.choice(config.gif.domains), rng.choice(config.gif.adjectives), plan["prompt"])
            plan["prompt"] = " ".join(" ".join(words).split())
        if mode == "instruct_pix2pix":
            plan["prompt"] = str(_draw(seed, _INSTRUCTION).choice(config.instruction_list()))
        if mode == "diffmix":
            others = [i for i in range(len(self.class_names)) if i != label]
            target = int(_draw(seed, _TARGET).choice(others)) if others else label
            weight = plan["strength"] ** config.diffmix_gamma if target != label else 0.0
            plan.update(
                target_class=self.class_names[target],
                prompt=self.class_prompt(self.class_names[target]),
                soft_label=[
                    {"label": int(label), "weight": 1.0 - weight},
                    {"label": target, "weight": weight},
                ],
            )
        if mode == "ddim_interp":
            plan["partner"] = self.pool.partner(
                class_name, source_id, int(_draw(seed, _PARTNER).integers(2**31))
            )
            if config.interpolation == "circle":  # the angle from the real image's latent, on the circle
                plan["angle"] = float(_draw(seed, _WEIGHT).uniform(0.0, 2 * np.pi))
            else:
                low, high = config.interpolation
                plan["weight"] = float(_draw(seed, _WEIGHT).uniform(low, high))
            if config.split_ratio is not None:
                suffix = str(_draw(seed, _SUFFIX).choice(config.suffixes))
                plan["switch"] = {"step": self.switch_step(), "prompt": plan["prompt"] + suffix}
        if mode == "instruct_pix2pix" and config.diffusemix is not None:
            rng = _draw(seed, _BLEND)
            half = str(rng.choice(diffusemix.HALVES))
            names = ["julia"] if self.fractals is None else list(self.fractals)
            fractal = names[rng.integers(len(names))]
            plan["diffusemix"] = {
                "half": half,
                "fractal": fractal,
                "weight": config.diffusemix.fractal_weight,
            }
        if self.adapter_tags:
            plan["adapters"] = self.adapter_tags
        return plan

    def switch_step(self) -> int:
        """Diff-II: denoising steps run with the suffixed prompt before the class prompt takes over."""
        steps = self.config.num_inference_steps
        return min(max(1, round(self.config.split_ratio * steps)), steps)

    def blend_diffusemix(self, real: np.ndarray, edited: np.ndarray, plan: dict, seed: int) -> np.ndarray:
        """DiffuseMix's hybrid of the real and the edited image, blended with the row's fractal."""
        blend = plan["diffusemix"]
        if self.fractals is None:
            fractal = diffusemix.julia(*real.shape[:2], _draw(seed, _FRACTAL))
        else:
            fractal = self.fractals[blend["fractal"]]
        return diffusemix.blend(diffusemix.hybrid(real, edited, blend["half"]), fractal, blend["weight"])

    def fit_input(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
        """The real image at the generated size, and under input_size pad the box (top, left, height, width)
        that `crop_back` cuts out of the output; None: the output stays at the generated size. A RowError
        under input_size: refuse."""
        height, width = self.config.height, self.config.width
        if image.shape[:2] == (height, width):
            return image, None
        if self.config.input_size == "refuse":
            raise RowError(
                "input_size", f"image is {image.shape[1]}x{image.shape[0]}, generation needs {width}x{height}"
            )
        if self.config.input_size == "pad":
            return pad_to_fit(image, height, width)
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA), None

    # ------------------------------------------------------------------ batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        reads = [schema.CLASS_NAME, schema.LABEL, schema.SOURCE_ID, schema.SEED]
        schema.require_columns(
            batch, reads + ([] if self.config.mode == "txt2img" else [schema.IMAGE]), STAGE
        )
        n = len(batch[schema.SEED])
        errors = _column(batch, schema.ERROR, n)
        messages = _column(batch, schema.ERROR_MESSAGE, n)
        plans, inputs, partners, boxes = [], [None] * n, [None] * n, [None] * n
        for i in range(n):
            plan = self.plan_row(
                str(batch[schema.CLASS_NAME][i]),
                int(batch[schema.LABEL][i]),
                str(batch[schema.SOURCE_ID][i]),
                int(batch[schema.SEED][i]),
            )
            plans.append(plan)
            try:
                if self.config.mode != "txt2img":
                    inputs[i], boxes[i] = self.fit_input(batch[schema.IMAGE][i])
                if self.config.mode == "ddim_interp":
                    if plan["partner"] is None:
                        raise RowError(NO_PARTNER, f"class pool holds no other image of {plan['prompt']!r}")
                    partner = self.pool.row(plan["partner"])[schema.IMAGE_BYTES]
                    # The same fit as the row's image; its box is not needed: the output follows the row's.
                    partners[i], _ = self.fit_input(decode_image(partner, max_pixels=1 << 30, min_side=1))
            except RowError as err:
                errors[i], messages[i] = err.reason, str(err)

        images = np.empty(n, dtype=object)
        flagged = np.zeros(n, dtype=bool)
        live = [i for i in range(n) if errors[i] == ""]
        for group in _groups(live, plans):
            pixels, nsfw = self.generate(
                group, plans, inputs, partners, [int(batch[schema.SEED][i]) for i in group]
            )
            flagged[group] = nsfw
            for i, image in zip(group, pixels, strict=True):
                if not np.isfinite(image).all():
                    errors[i] = NONFINITE
                    messages[i] = f"{STAGE}: the pipeline produced NaN/inf pixels (dtype {self.config.dtype})"
                images[i] = (np.nan_to_num(image).clip(0, 1) * 255).round().astype(np.uint8)
                if "diffusemix" in plans[i]:
                    images[i] = self.blend_diffusemix(
                        inputs[i], images[i], plans[i], int(batch[schema.SEED][i])
                    )
                if boxes[i] is not None:  # input_size pad: back to the input's own region and size
                    images[i] = crop_back(images[i], boxes[i], batch[schema.IMAGE][i].shape[:2])
        rules = drop_rules([images[i] if errors[i] == "" else None for i in range(n)], flagged)
        for i in range(n):  # rows that failed before generating keep their input (they leave the stream)
            if images[i] is None:
                images[i] = batch[schema.IMAGE][i] if schema.IMAGE in batch else np.zeros((1, 1, 3), np.uint8)

        out = dict(batch)
        out[schema.IMAGE] = images
        out[schema.HEIGHT] = np.array([im.shape[0] for im in images], dtype=np.int32)
        out[schema.WIDTH] = np.array([im.shape[1] for im in images], dtype=np.int32)
        # keep_mask: the output has the input's size (the config refuses it with input_size resize), so the
        # input's mask and bbox still describe it. Otherwise they described the real image only.
        for column in (schema.MASK, schema.BBOX):
            kept = self.config.keep_mask and column in batch
            out[column] = batch[column] if kept else np.full(n, None, dtype=object)
        out[schema.PROMPT] = np.array([p["prompt"] for p in plans], dtype=object)
        out[schema.SOFT_LABEL] = object_array([p.pop("soft_label", None) for p in plans])
        out[PARAMS] = np.array([json.dumps(p, sort_keys=True) for p in plans], dtype=object)
        out[schema.ERROR], out[schema.ERROR_MESSAGE] = errors, messages
        out[schema.DROP] = rules
        return out

    def generate(self, rows: list[int], plans, inputs, partners, seeds: list[int]):
        """Pixels (N, H, W, 3) float in [0, 1] for rows that share their pipeline arguments, and whether the
        safety checker (when loaded) flagged each."""
        config, mode = self.config, self.config.mode
        generators = [self._torch.Generator("cpu").manual_seed(s) for s in seeds]
        common = {
            "prompt": [plans[i]["prompt"] for i in rows],
            "negative_prompt": [config.negative_prompt] * len(rows) if config.negative_prompt else None,
            "num_inference_steps": config.num_inference_steps,
            "guidance_scale": config.guidance_scale,
            "generator": generators,
            "output_type": "np",
        }
        if mode == "txt2img":
            output = self.pipe(height=config.height, width=config.width, **common)
        elif mode in ("sdedit", "diffmix"):
            strength = plans[rows[0]]["strength"]
            output = self.pipe(image=[_pil(inputs[i]) for i in rows], strength=strength, **common)
        elif mode == "gif":
            images = [_pil(inputs[i]) for i in rows]
            common["output_type"] = "latent"
            latents = self.pipe(image=images, strength=plans[rows[0]]["strength"], **common).images
            rngs = [_draw(seed, _GIF_NOISE) for seed in seeds]
            return self.gif.decode(self.pipe, latents, rngs, [inputs[i] for i in rows])
        elif mode == "instruct_pix2pix":
            images = [_pil(inputs[i]) for i in rows]
            output = self.pipe(image=images, image_guidance_scale=config.image_guidance_scale, **common)
        else:
            # Inverted with the class prompt (the reference's); then Diff-II's two stages: the suffixed
            # prompt leads the high-noise steps, the class prompt takes over for the rest.
            latents = self.interpolated_latents(
                [inputs[i] for i in rows], [partners[i] for i in rows], [plans[i] for i in rows], common
            )
            if "switch" in plans[rows[0]]:
                class_prompts = common["prompt"]
                common["prompt"] = [plans[i]["switch"]["prompt"] for i in rows]
                common["callback_on_step_end"] = self.prompt_switch(
                    plans[rows[0]]["switch"]["step"], class_prompts
                )
                common["callback_on_step_end_tensor_inputs"] = ["prompt_embeds"]
            output = self.pipe(latents=latents, **common)
        flagged = getattr(output, "nsfw_content_detected", None) or [False] * len(rows)
        return output.images, [bool(f) for f in flagged]

    def prompt_switch(self, step: int, prompts: list[str]):
        """A step-end callback that hands the pipeline the class prompts' embeddings after `step` steps
        (diffusers reads `prompt_embeds` back from the callback; with guidance they are [negative, positive])."""
        negative = self.config.negative_prompt or None

        def callback(pipe, index: int, timestep, tensors: dict) -> dict:
            if index != step - 1:
                return {}
            guided = pipe.do_classifier_free_guidance
            positive, unconditional = pipe.encode_prompt(
                prompts,
                self.device,
                1,
                guided,
                negative_prompt=[negative] * len(prompts) if negative else None,
            )
            return {"prompt_embeds": self._torch.cat([unconditional, positive]) if guided else positive}

        return callback

    # ------------------------------------------------------------------ ddim_interp (Diff-II)

    def interpolated_latents(self, images, partners, points: list[dict], common) -> object:
        """DDIM-invert both images of every row with its prompt, then take the row's point between the two
        noise latents: `{"angle": a}` on the circle through them, `{"weight": w}` on the arc (slerp)."""
        torch = self._torch
        embeds = self.prompt_embeds(common["prompt"])
        with torch.no_grad():
            first = self.ddim_invert(self.encode(images), embeds)
            second = self.ddim_invert(self.encode(partners), embeds)
        return torch.stack(
            [
                circle_point(a, b, p["angle"]) if "angle" in p else slerp(a, b, p["weight"])
                for a, b, p in zip(first, second, points, strict=True)
            ]
        )

    def prompt_embeds(self, prompts: list[str]):
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, do_classifier_free_guidance=False)
        return embeds

    def encode(self, images: list[np.ndarray]):
        """Images -> the VAE's scaled latent means (no sampling: inversion must be deterministic)."""
        torch, vae = self._torch, self.pipe.vae
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        pixels = pixels.to(self.device, vae.dtype)
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor

    def ddim_invert(self, latents, embeds):
        """Deterministic DDIM inversion (no guidance) from clean latents to the starting noise."""
        from diffusers import DDIMInverseScheduler

        inverse = DDIMInverseScheduler.from_config(self.pipe.scheduler.config)
        inverse.set_timesteps(
            self.config.inversion_steps or self.config.num_inference_steps, device=self.device
        )
        for t in inverse.timesteps:
            noise = self.pipe.unet(latents, t, encoder_hidden_states=embeds).sample
            latents = inverse.step(noise, t, latents).prev_sample
        return latents


def pad_to_fit(image: np.ndarray, height: int, width: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """`image` scaled to fit inside height x width with its aspect ratio, centred, the rest filled by
    replicating its edge pixels; and the box (top, left, box_height, box_width) it occupies there.
    Replicated edges, not a flat colour: SDEdit keeps the input's colours, and a flat pad would pull the
    subject's towards the pad's."""
    scale = min(height / image.shape[0], width / image.shape[1])
    box_height = min(height, max(1, round(image.shape[0] * scale)))
    box_width = min(width, max(1, round(image.shape[1] * scale)))
    if (box_height, box_width) != image.shape[:2]:
        shrink = box_height < image.shape[0] or box_width < image.shape[1]
        image = cv2.resize(
            image, (box_width, box_height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        )
    top, left = (height - box_height) // 2, (width - box_width) // 2
    padded = cv2.copyMakeBorder(
        image,
        top,
        height - box_height - top,
        left,
        width - box_width - left,
        cv2.BORDER_REPLICATE,
    )
    return padded, (top, left, box_height, box_width)


def crop_back(image: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """The inverse of `pad_to_fit`: the box's region of `image`, resized to `size` (height, width)."""
    top, left, box_height, box_width = box
    region = image[top : top + box_height, left : left + box_width]
    if region.shape[:2] == tuple(size):
        return np.ascontiguousarray(region)
    shrink = region.shape[0] > size[0] or region.shape[1] > size[1]
    return cv2.resize(
        region, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    )


def slerp(a, b, weight: float, eps: float = 1e-7):
    """Spherical interpolation of two noise tensors (weight 0 -> a, 1 -> b); linear when nearly parallel."""
    import torch

    theta = _angle(a, b, eps)
    if theta.abs() < 1e-4:
        return ((1 - weight) * a.double() + weight * b.double()).to(a.dtype)
    out = (torch.sin((1 - weight) * theta) * a.double() + torch.sin(weight * theta) * b.double()) / torch.sin(
        theta
    )
    return out.to(a.dtype)


def circle_point(a, b, angle: float, eps: float = 1e-6):
    """Diff-II's inversion circle interpolation: the point `angle` radians from `a` on the great circle
    through `a` and `b` (the reference's rand_slerp with alpha * theta = angle:
    (sin(theta + angle) a - sin(angle) b) / sin(theta)). Angle 0 gives `a`, -theta gives `b`; for unit
    latents every point has norm 1. Nearly parallel latents span no circle: `a` itself, as the reference."""
    import torch

    theta = _angle(a, b, 1e-12)
    if theta.abs() < eps:
        return a.clone()
    angle = torch.tensor(angle, dtype=torch.float64)
    out = (torch.sin(theta + angle) * a.double() - torch.sin(angle) * b.double()) / torch.sin(theta)
    return out.to(a.dtype)


def _angle(a, b, eps: float):
    """The angle between two tensors as flat vectors, in float64 (`eps` bounds the norms' product)."""
    import torch

    flat_a, flat_b = a.flatten().double(), b.flatten().double()
    cos = torch.dot(flat_a, flat_b) / (flat_a.norm() * flat_b.norm()).clamp_min(eps)
    return torch.arccos(cos.clamp(-1.0, 1.0))


def _pipeline_class(mode: str):
    import diffusers

    return {
        "txt2img": diffusers.AutoPipelineForText2Image,
        "sdedit": diffusers.AutoPipelineForImage2Image,
        "diffmix": diffusers.AutoPipelineForImage2Image,
        "gif": diffusers.AutoPipelineForImage2Image,
        "instruct_pix2pix": None,  # the checkpoint's model_index names its (SD or SDXL) InstructPix2Pix class
        "ddim_interp": diffusers.StableDiffusionPipeline,
    }[mode]


def _groups(rows: list[int], plans: list[dict]) -> list[list[int]]:
    """Rows that one pipeline call can take together: one strength per call (SDEdit's noise level)."""
    groups: dict = {}
    for i in rows:
        groups.setdefault(plans[i].get("strength"), []).append(i)
    return list(groups.values())


def _draw(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image)


def _column(batch: dict[str, np.ndarray], name: str, num_rows: int) -> np.ndarray:
    if name in batch:
        return np.asarray(batch[name], dtype=object).copy()
    return np.full(num_rows, "", dtype=object)
