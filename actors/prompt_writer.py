"""AGA background prompts: an instruction LLM (transformers) writes one background description per row.

Reads:  seed (int64); class_name (optional, checked against the known classes).
Writes: prompt (str, the cleaned description), prompt_source ("llm", or "template" when the LLM answer was
        unusable and the template fallback was used), instruction (str, the message sent to the LLM).

The question, the cleaning and the fallback come from `engine.methods.background_prompts`, shared with the vLLM
stage. Random-weight tiny LLMs write gibberish that cleaning often rejects: `prompt_source` counts that.
"""

from __future__ import annotations

import numpy as np

from engine import schema
from engine.config import PromptConfig
from engine.methods.background_prompts import BackgroundPromptEngine, ComposedInstruction
from engine.models.references import pretrained_kwargs, resolve_device, resolve_model, torch_dtype

PROMPT_SOURCE = "prompt_source"
INSTRUCTION = "instruction"
SOURCE_LLM = "llm"
SOURCE_TEMPLATE = "template"


class RowSeededSampler:
    """Logits processor that samples each row's next token with that row's own generator.

    Why: a single `torch.manual_seed` for a batched `generate` makes a row's text depend on its batch
    neighbours. Here row i draws exactly one uniform number per step from `Generator(seed_i)`, applies
    temperature and top-p to its own logits, and the processor returns a one-hot mask so that greedy
    decoding takes the sampled token. So one `generate` call serves the whole batch and a row's text
    depends only on its seed and its prompt, not on batch composition.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float) -> None:
        import torch

        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids, scores):
        import torch

        if self.temperature == 0:
            choice = scores.argmax(dim=-1)
        else:
            probs = torch.softmax(scores.float() / self.temperature, dim=-1)
            sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True, stable=True)
            # Nucleus: keep the smallest prefix whose mass reaches top_p (always at least the top token).
            keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < self.top_p
            cdf = (sorted_probs * keep).cumsum(dim=-1)
            # Uniform draws on the CPU generators (cheap, device-independent), inverse-CDF on the device.
            draws = torch.stack([torch.rand((), generator=g) for g in self.generators]).to(scores.device)
            position = torch.searchsorted(cdf, (draws * cdf[:, -1]).unsqueeze(-1), right=True)
            position = position.clamp(max=scores.shape[-1] - 1)
            choice = sorted_ids.gather(-1, position).squeeze(-1)
        masked = torch.full_like(scores, float("-inf"))
        return masked.scatter_(-1, choice.unsqueeze(-1), 0.0)


class PromptWriter:
    """Callable class for `map_batches`: loads the LLM once, writes one background prompt per row."""

    def __init__(
        self, config: PromptConfig, class_names: list[str], superclasses: dict[str, str] | None = None
    ) -> None:
        if config.backend != "transformers":
            raise ValueError(
                f"PromptWriter runs the 'transformers' backend; backend {config.backend!r} is served by "
                "the vLLM prompt stage, not this actor"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.config = config
        self.class_names = set(class_names)
        self.prompts = BackgroundPromptEngine.from_config(config, class_names, superclasses)

        path, revision = resolve_model(config.model, "prompt LLM")
        self.device = resolve_device(config.device)
        self.tokenizer = AutoTokenizer.from_pretrained(
            path, **pretrained_kwargs(config.model, revision, False)
        )
        if not self.tokenizer.chat_template:
            raise ValueError(f"prompt LLM {config.model.id!r} has no chat_template: use an instruction model")
        # Decoder-only batches pad on the left so every row's last position is its real last token.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(config.dtype, self.device), **pretrained_kwargs(config.model, revision)
        )
        self.model.to(self.device).eval()

        # A fresh config (not the checkpoint's sampling defaults): sampling is done by RowSeededSampler.
        eos = self.model.generation_config.eos_token_id
        self.generation_config = GenerationConfig(
            max_new_tokens=config.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos if eos is not None else self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        schema.require_columns(batch, [schema.SEED], "prompt_writer")
        if schema.CLASS_NAME in batch:
            unknown = sorted({str(c) for c in batch[schema.CLASS_NAME]} - self.class_names)
            if unknown:
                raise ValueError(
                    f"classes {unknown} are not among the class_names PromptWriter was built with"
                )

        seeds = [int(s) for s in batch[schema.SEED]]
        composed = [self.prompts.compose(s) for s in seeds]
        raw = self.generate(composed) if composed else []

        prompts, sources = [], []
        for item, text in zip(composed, raw, strict=True):
            cleaned = self.prompts.clean(text)
            prompts.append(cleaned if cleaned is not None else self.prompts.fallback(item.seed))
            sources.append(SOURCE_LLM if cleaned is not None else SOURCE_TEMPLATE)

        out = dict(batch)
        out[schema.PROMPT] = np.array(prompts, dtype=object)
        out[PROMPT_SOURCE] = np.array(sources, dtype=object)
        out[INSTRUCTION] = np.array([c.text for c in composed], dtype=object)
        return out

    def generate(self, composed: list[ComposedInstruction]) -> list[str]:
        """Raw LLM answers (decoded new tokens, special tokens dropped), one `generate` call per batch."""
        import torch
        from transformers import LogitsProcessorList

        texts = [
            self.tokenizer.apply_chat_template(c.messages, tokenize=False, add_generation_prompt=True)
            for c in composed
        ]
        # The chat template already holds the BOS token.
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = inputs.to(self.device)
        sampler = RowSeededSampler([c.seed for c in composed], self.config.temperature, self.config.top_p)
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                generation_config=self.generation_config,
                logits_processor=LogitsProcessorList([sampler]),
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
