"""Image captions from a vision-language model, behind a class prefix (MVC: "This is an image of <class>. ...").

Reads:  image (HxWx3 uint8), class_name; seed (int64) only when sampling (temperature > 0).
Writes: caption (str): `prefix` with the row's class filled in, then the model's first line of answer.

Two backends, switched by one config key (`caption.backend`), writing the same column:
- transformers: `Captioner`, a callable class for an actor pool (processor + `generate`);
- vllm: `CaptionRequests`, the task of an `engine.stages.llm` vLLM stage: ray.data.llm applies the chat
  template and runs vLLM, the image going in as the engine's `multimodal_data`.
Both send the same chat turn (the image, then `instruction`) through the model's own chat template.

`caption.model_type: blip2` (transformers backend only) runs BLIP-2 instead, as MVC captions: no chat
template and no text prompt, the image alone (`Blip2Processor` + `Blip2ForConditionalGeneration`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine import schema
from engine.config import CaptionConfig
from engine.models.references import pretrained_kwargs, resolve_device, resolve_model, torch_dtype
from engine.stages.batch import Batch
from engine.stages.llm import image_part, sampling_params, text_part, vllm_stage
from engine.stages.loop import Stage

CAPTION = schema.CAPTION
READS = (schema.IMAGE, schema.CLASS_NAME)
WRITES = (CAPTION,)


def caption_text(prefix: str, class_name: str, generated: str | None) -> str:
    """The prefix for the class, then the first non-empty line of the answer (whitespace collapsed)."""
    lines = [" ".join(line.split()) for line in (generated or "").splitlines()]
    answer = next((line for line in lines if line), "")
    return (prefix.format(class_name=class_name) + answer).strip()


def row_seeds(batch: Batch, temperature: float) -> list[int]:
    """Sampling needs each row's seed (reproducible captions); greedy decoding does not."""
    n = len(batch[schema.IMAGE])
    if temperature > 0:
        schema.require_columns(batch, [schema.SEED], "caption (temperature > 0 samples with the row's seed)")
    if schema.SEED in batch:
        return [int(s) for s in batch[schema.SEED]]
    return [0] * n


def png_bytes(image: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR))
    assert ok, "cv2.imencode failed on a valid uint8 image"
    return buf.tobytes()


class Captioner:
    """Callable class for `map_batches`: loads the VLM once, writes one caption per row (transformers)."""

    def __init__(self, config: CaptionConfig) -> None:
        if config.backend != "transformers":
            raise ValueError(
                f"Captioner runs the 'transformers' backend; backend {config.backend!r} is served by the "
                "vLLM caption stage (actors.captioner.caption_stage)"
            )
        self.config = config
        self.device = resolve_device(config.device)
        if config.model_type == "blip2":
            self._load_blip2()
        else:
            self._load_chat_vlm()

    def _load_chat_vlm(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

        config = self.config
        path, revision = resolve_model(config.model, "caption VLM")
        self.processor = AutoProcessor.from_pretrained(
            path, **pretrained_kwargs(config.model, revision, False)
        )
        tokenizer = self.processor.tokenizer
        if not (self.processor.chat_template or tokenizer.chat_template):
            raise ValueError(
                f"caption VLM {config.model.id!r} has no chat_template: use an instruction VLM, or set "
                "caption.model_type: blip2 for a BLIP-2 checkpoint"
            )
        # Decoder-only batches pad on the left so every row's last position is its real last token.
        tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch_dtype(config.dtype, self.device), **pretrained_kwargs(config.model, revision)
        )
        self.model.to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.generation_config = GenerationConfig(
            max_new_tokens=config.max_new_tokens,
            do_sample=False,  # sampling, when asked for, is RowSeededSampler's (per-row generators)
            num_beams=1,
            eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        )
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": config.instruction}]}
        ]
        self.text = self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def _load_blip2(self) -> None:
        from transformers import Blip2ForConditionalGeneration, Blip2Processor, GenerationConfig

        config = self.config
        path, revision = resolve_model(config.model, "caption BLIP-2")
        self.processor = Blip2Processor.from_pretrained(
            path, **pretrained_kwargs(config.model, revision, False)
        )
        self.model = Blip2ForConditionalGeneration.from_pretrained(
            path, dtype=torch_dtype(config.dtype, self.device), **pretrained_kwargs(config.model, revision)
        )
        if self.model.config.image_token_index is None or self.processor.num_query_tokens is None:
            # Checkpoints saved before transformers 4.47 lack them, and this transformers needs both.
            raise ValueError(
                f"caption BLIP-2 {config.model.id!r} has no image_token_index / num_query_tokens in its config "
                "(saved by an old transformers): pin a newer revision of the checkpoint"
            )
        self.model.to(self.device).eval()
        tokenizer = self.processor.tokenizer
        lm_config = self.model.config.text_config
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else lm_config.eos_token_id
        self.generation_config = GenerationConfig(
            max_new_tokens=config.max_new_tokens,
            do_sample=False,  # sampling, when asked for, is RowSeededSampler's (per-row generators)
            num_beams=1,
            eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from PIL import Image
        from transformers import LogitsProcessorList

        from actors.prompt_writer import RowSeededSampler

        schema.require_columns(batch, READS, "caption")
        n = len(batch[schema.IMAGE])
        seeds = row_seeds(batch, self.config.temperature)
        processors = LogitsProcessorList()
        if self.config.temperature > 0:
            processors.append(RowSeededSampler(seeds, self.config.temperature, self.config.top_p))
        pil_images = [Image.fromarray(np.asarray(image, dtype=np.uint8)) for image in batch[schema.IMAGE]]
        if self.config.model_type == "blip2":
            # BLIP-2 captions the image alone, as MVC does. `generate` starts each row from the query (image)
            # tokens and BOS, all special tokens, so decoding the whole output with skip_special_tokens
            # leaves exactly the answer (for OPT and encoder-decoder Flan-T5 language models alike).
            inputs = self.processor(images=pil_images, return_tensors="pt").to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.inference_mode():
                new_tokens = self.model.generate(
                    **inputs, generation_config=self.generation_config, logits_processor=processors
                )
        else:
            images = [[image] for image in pil_images]
            inputs = self.processor(text=[self.text] * n, images=images, return_tensors="pt", padding=True)
            inputs = inputs.to(self.device)
            with torch.inference_mode():
                output = self.model.generate(
                    **inputs, generation_config=self.generation_config, logits_processor=processors
                )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        out = dict(batch)
        out[CAPTION] = np.array(
            [
                caption_text(self.config.prefix, str(c), t)
                for c, t in zip(batch[schema.CLASS_NAME], texts, strict=True)
            ],
            dtype=object,
        )
        return out


class CaptionRequests:
    """The vLLM stage's task (`engine.stages.llm.LLMTask`) for captions: the image travels as PNG bytes."""

    multimodal = True

    def __init__(self, config: CaptionConfig) -> None:
        self.config = config

    def requests(self, live: Batch) -> list[dict[str, Any]]:
        seeds = row_seeds(live, self.config.temperature)
        return [
            {
                "messages": [{"role": "user", "content": [image_part(), text_part(self.config.instruction)]}],
                "sampling_params": sampling_params(
                    self.config.max_new_tokens, self.config.temperature, self.config.top_p, seed
                ),
                "image": png_bytes(np.asarray(image, dtype=np.uint8)),
            }
            for image, seed in zip(live[schema.IMAGE], seeds, strict=True)
        ]

    def results(self, live: Batch, texts: list[str]) -> dict[str, np.ndarray]:
        captions = [
            caption_text(self.config.prefix, str(c), t)
            for c, t in zip(live[schema.CLASS_NAME], texts, strict=True)
        ]
        return {CAPTION: np.array(captions, dtype=object)}


class FileCaptioner:
    """Callable class for `map_batches`: the captions a dataset already has (`caption.captions_file`), behind
    the same prefix; no model. Reads `source_id` and `class_name`."""

    def __init__(self, config: CaptionConfig) -> None:
        from engine.readers.captions import read_captions_file

        self.config = config
        self.captions = read_captions_file(config.captions_file, "caption.captions_file")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        schema.require_columns(batch, (schema.SOURCE_ID, schema.CLASS_NAME), "caption")
        out = dict(batch)
        out[CAPTION] = np.array(
            [
                caption_text(self.config.prefix, str(c), self.captions.get(str(s)))
                for s, c in zip(batch[schema.SOURCE_ID], batch[schema.CLASS_NAME], strict=True)
            ],
            dtype=object,
        )
        return out


def caption_stage(
    config: CaptionConfig, *, only_synthetic: bool = False, only_splits: tuple[str, ...] | None = None
) -> Stage:
    """The caption stage for a recipe, on the configured backend (or from the dataset's captions file)."""
    if config.captions_file is not None:
        return Stage(
            "caption",
            FileCaptioner,
            config.stage,
            {"config": config},
            reads=(schema.SOURCE_ID, schema.CLASS_NAME),
            writes=WRITES,
            only_synthetic=only_synthetic,
            only_splits=only_splits,
        )
    if config.backend == "vllm":
        return vllm_stage(
            "caption",
            CaptionRequests(config),
            config,
            reads=READS,
            writes=WRITES,
            only_synthetic=only_synthetic,
            only_splits=only_splits,
        )
    return Stage(
        "caption",
        Captioner,
        config.stage,
        {"config": config},
        reads=READS,
        writes=WRITES,
        only_synthetic=only_synthetic,
        only_splits=only_splits,
    )
