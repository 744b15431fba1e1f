"""Label-fidelity filter: CLIP zero-shot scores of each synthetic image against every class prompt and the
negative prompts; the rules of `engine.methods.fidelity` decide which rows to drop.

Reads: image (HxWx3 uint8), label. Writes: fidelity_prob (float32), fidelity_top (the best prompt: a class
name or a negative prompt), and `drop` (the rule that fired, "" to keep): the stage loop moves dropped rows
into `filtered.parquet` with these scores.
"""

from __future__ import annotations

import numpy as np

from engine import schema
from engine.config import FilterConfig
from engine.methods.fidelity import FIDELITY_PROB, FIDELITY_TOP, class_prompts, judge
from engine.models.references import (
    clip_features,
    pretrained_kwargs,
    resolve_device,
    resolve_model,
    torch_dtype,
)

STAGE = "filter"


class FidelityFilter:
    """Callable class for `map_batches(batch_format="numpy")`: CLIP loaded once, text embeddings cached."""

    def __init__(self, config: FilterConfig, class_names: list[str]):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.config = config
        self.class_names = list(class_names)
        path, revision = resolve_model(config.model, STAGE)
        self.device = resolve_device(config.device)
        self.model = (
            CLIPModel.from_pretrained(
                path,
                dtype=torch_dtype(config.dtype, self.device),
                **pretrained_kwargs(config.model, revision),
            )
            .to(self.device)
            .eval()
        )
        self.processor = CLIPProcessor.from_pretrained(
            path, **pretrained_kwargs(config.model, revision, False)
        )
        self.prompts = class_prompts(config, self.class_names) + list(config.negative_prompts)
        self._torch = torch
        with torch.inference_mode():
            text = self.processor(text=self.prompts, padding=True, truncation=True, return_tensors="pt")
            features = self.model.get_text_features(**text.to(self.device))
            self.text = torch.nn.functional.normalize(clip_features(features).float(), dim=-1)
            self.scale = float(self.model.logit_scale.exp())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        schema.require_columns(batch, [schema.IMAGE, schema.LABEL], STAGE)
        torch = self._torch
        with torch.inference_mode():
            pixels = self.processor(images=list(batch[schema.IMAGE]), return_tensors="pt").pixel_values
            features = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
            images = torch.nn.functional.normalize(clip_features(features).float(), dim=-1)
            logits = (self.scale * images @ self.text.T).cpu().numpy()
        verdict = judge(logits, batch[schema.LABEL], len(self.class_names), self.config)
        out = dict(batch)
        out[FIDELITY_PROB] = verdict.prob
        out[FIDELITY_TOP] = np.array([self.prompt_name(i) for i in verdict.top], dtype=object)
        out[schema.DROP] = verdict.rule
        return out

    def prompt_name(self, index: int) -> str:
        return self.class_names[index] if index < len(self.class_names) else self.prompts[index]
