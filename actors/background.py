"""Background generation: one SDXL text-to-image call per batch, one reproducible image per row.

Reads `prompt` (str) and `seed` (int64); writes `background` (object array of HxWx3 uint8 arrays, H and W
from `BackgroundConfig`), `prompt_tokens_trimmed` (int64: tokens cut from a prompt longer than the text
encoder reads; `prompt` is then the text that was read) plus `error` / `error_message` (a row whose pixels
come out non-finite, e.g. from an fp16 overflow, is marked `background_nonfinite` instead of carrying garbage
downstream). A blank background (one colour) is dropped to filtered.parquet as `blank_output`
(engine.stages.output_checks).
"""

from __future__ import annotations

import numpy as np

from engine import schema
from engine.config import BackgroundConfig
from engine.models.diffusion import load_pipeline
from engine.models.references import resolve_device
from engine.stages.output_checks import drop_rules

STAGE = "background"
NONFINITE = "background_nonfinite"
PROMPT_TRIMMED = "prompt_tokens_trimmed"


class BackgroundGenerator:
    """Callable class for `map_batches(batch_format="numpy")`: loads the pipeline once per actor."""

    def __init__(self, config: BackgroundConfig):
        import torch

        self.config = config
        self.device = resolve_device(config.device)
        # The one loader of every generating actor: loading policy, dtype/device, then TI tokens and LoRA.
        self.pipe = load_pipeline(
            config.model,
            role=STAGE,
            device=self.device,
            dtype=config.dtype,
            adapters=config.adapters,
            scheduler=config.scheduler,
            unet=config.unet,
        )
        # Ray Data reports progress; a tqdm bar per batch per actor would only flood the logs.
        self.pipe.set_progress_bar_config(disable=True)
        if self.device.startswith("cuda"):
            # Decoding a batch of 1024 px latents at once is the memory peak; one at a time costs little.
            self.pipe.vae.enable_slicing()
        self._apply_tunings(torch)

        multiple = self.pipe.vae_scale_factor
        if config.height % multiple or config.width % multiple:
            raise ValueError(
                f"background height/width ({config.height}x{config.width}) must be multiples of {multiple} "
                f"(the VAE scale factor of {config.model.id})"
            )
        # An empty negative prompt means None, so pipelines with `force_zeros_for_empty_prompt` (SDXL base)
        # use zero embeddings as they were trained to, rather than the embedding of "".
        self.negative_prompt = config.negative_prompt or None
        self._torch = torch

    def _apply_tunings(self, torch) -> None:
        """The GPU options of `BackgroundConfig`, measured one by one in benchmarks/gpu_stages.py."""
        if self.config.fuse_qkv:
            # Same math: q/k/v weights concatenated, so attention does one wide matmul instead of three.
            self.pipe.fuse_qkv_projections(unet=True, vae=True)
        if self.config.channels_last:
            # cuDNN's fastest convolution kernels for fp16/bf16 are NHWC; NCHW inputs pay a transpose each time.
            self.pipe.unet.to(memory_format=torch.channels_last)
            self.pipe.vae.to(memory_format=torch.channels_last)
        if self.config.compile_mode is not None:
            # In place, so `pipe.unet` keeps its class and config (the pipeline reads both).
            self.pipe.unet.compile(mode=self.config.compile_mode, fullgraph=True)

    def _fit_prompts(self, prompts: list[str]) -> tuple[list[str], np.ndarray]:
        # Every text encoder of the pipeline reads the prompt (SDXL: CLIP-L and OpenCLIP-G, two tokenizers).
        tokenizers = [
            tok
            for tok in (getattr(self.pipe, "tokenizer", None), getattr(self.pipe, "tokenizer_2", None))
            if tok
        ]
        if not tokenizers or not prompts:
            return prompts, np.zeros(len(prompts), dtype=np.int64)
        return fit_prompts(tokenizers, prompts)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        schema.require_columns(batch, [schema.PROMPT, schema.SEED], STAGE)
        prompts, trimmed = self._fit_prompts([str(p) for p in batch[schema.PROMPT]])
        num_rows = len(prompts)
        out = dict(batch)
        out[schema.PROMPT] = np.array(prompts, dtype=object)
        out[PROMPT_TRIMMED] = trimmed
        # Object dtype: assigning into a fixed-width '<U' array would silently truncate the reason.
        errors = _column(batch, schema.ERROR, num_rows)
        messages = _column(batch, schema.ERROR_MESSAGE, num_rows)
        out[schema.ERROR], out[schema.ERROR_MESSAGE] = errors, messages
        if num_rows == 0:
            out[schema.BACKGROUND] = np.empty(0, dtype=object)
            return out

        # One generator per row, so a row's noise depends on its seed only, never on its batch neighbours.
        # CPU generators: the same seed then gives the same starting noise on CPU and GPU workers alike.
        generators = [self._torch.Generator("cpu").manual_seed(int(s)) for s in batch[schema.SEED]]
        images = self.pipe(
            prompt=prompts,
            # One per prompt: SD1.5's pipeline refuses a string beside a list of prompts (SDXL's accepts it).
            negative_prompt=[self.negative_prompt] * num_rows if self.negative_prompt else None,
            height=self.config.height,
            width=self.config.width,
            num_inference_steps=self.config.num_inference_steps,
            guidance_scale=self.config.guidance_scale,
            generator=generators,
            output_type="np",
        ).images  # (N, H, W, 3) float32 in [0, 1]

        finite = np.isfinite(images).all(axis=(1, 2, 3))
        pixels = (np.nan_to_num(images, nan=0.0).clip(0.0, 1.0) * 255.0).round().astype(np.uint8)
        backgrounds = np.empty(num_rows, dtype=object)
        for i in range(num_rows):
            backgrounds[i] = pixels[i]
        out[schema.BACKGROUND] = backgrounds
        errors[~finite] = NONFINITE
        messages[~finite] = (
            f"{STAGE}: the pipeline produced NaN/inf pixels (dtype {self.config.dtype}); "
            "try float32 or bfloat16, or a VAE that is stable in float16"
        )
        out[schema.DROP] = drop_rules([b if ok else None for b, ok in zip(backgrounds, finite, strict=True)])
        return out


def fit_prompts(tokenizers: list, prompts: list[str]) -> tuple[list[str], np.ndarray]:
    """Prompts cut so that every tokenizer reads them whole (CLIP: `model_max_length` with its start and end
    tokens), and the number of tokens cut per row (by the first tokenizer). The pipeline would cut them
    anyway, with a warning per batch; cut here, the stored prompt is the text that drew the image and run.json
    counts it. Decoding cut ids and tokenizing the text again is not always the identity (a word split at the
    cut re-tokenizes longer), so the text is cut until every tokenizer's count of the text itself fits."""

    def excess(tokens: list[int], tokenizer) -> int:
        return len(tokens) - (tokenizer.model_max_length - 2)

    fitted, trimmed = [], []
    for prompt in prompts:
        text, original = prompt, None
        for attempt in range(_MAX_FIT_ROUNDS):
            read = [
                (tok(text, add_special_tokens=False, truncation=False, verbose=False).input_ids, tok)
                for tok in tokenizers
            ]
            original = len(read[0][0]) if original is None else original
            tokens, tokenizer = max(read, key=lambda pair: excess(*pair))
            over = excess(tokens, tokenizer)
            if over <= 0:
                break
            text = tokenizer.decode(tokens[: max(len(tokens) - over - attempt, 0)])
        else:
            raise AssertionError(
                f"prompt not fitted to the tokenizers in {_MAX_FIT_ROUNDS} rounds: {prompt!r}"
            )
        fitted.append(text)
        trimmed.append(max(original - len(read[0][0]), 0))
    return fitted, np.array(trimmed, dtype=np.int64)


_MAX_FIT_ROUNDS = 8  # each round after the first cuts one token more than the count asks


def _column(batch: dict[str, np.ndarray], name: str, num_rows: int) -> np.ndarray:
    if name in batch:
        return np.asarray(batch[name], dtype=object).copy()
    return np.full(num_rows, "", dtype=object)
