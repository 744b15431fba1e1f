"""Textual inversion (Gal et al. 2022, as in diffusers' textual_inversion examples): one new token per class,
all classes trained jointly; only the new rows of each text encoder's token embedding change (SD1.5: one
encoder; SDXL: both). Writes `textual_inversion.safetensors` (clip_l [+ clip_g], tokens and classes in its
metadata), which engine.models.diffusion.load_textual_inversion loads through `pipe.load_textual_inversion`.

torch is imported inside the functions: the driver imports this module without it.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.models.diffusion import TEXT_ENCODERS, TEXTUAL_INVERSION_FILE


def placeholder_tokens(class_names: list[str], placeholder: str) -> list[str]:
    """The token of each class (`placeholder` with {class_name}; spaces become '_': CLIP splits on them)."""
    tokens = [placeholder.format(class_name=name.replace(" ", "_")) for name in class_names]
    repeated = sorted({t for t in tokens if tokens.count(t) > 1})
    if repeated:
        raise ValueError(
            f"textual_inversion.placeholder {placeholder!r} gives several classes the token(s) {repeated}: "
            "include {class_name}"
        )
    return tokens


def check_new_tokens(tokenizer, tokens: list[str], where: str = "tokenizer") -> None:
    """A placeholder must be new: one the tokenizer already has (as a word or an added token) would train
    the embedding every prompt with that word uses."""
    vocab = tokenizer.get_vocab()
    taken = [t for t in tokens if t in vocab or f"{t}</w>" in vocab]
    if taken:
        raise ValueError(
            f"placeholder token(s) {taken} already exist in the {where}: choose another "
            "textual_inversion.placeholder (e.g. '<{class_name}>')"
        )


def check_tokenizers(pipe_path: str, ref, tokens: list[str]) -> None:
    """Driver preflight: the placeholders are new to every tokenizer of the checkpoint (loads tokenizers only)."""
    from transformers import AutoTokenizer

    from engine.models.references import pretrained_kwargs

    local = Path(pipe_path).exists()
    for _, tokenizer_name, _ in TEXT_ENCODERS:
        if local and not (Path(pipe_path) / tokenizer_name).is_dir():
            continue
        if not local and tokenizer_name != "tokenizer":
            continue  # a hub checkpoint's second tokenizer is checked by the workers
        tokenizer = AutoTokenizer.from_pretrained(
            pipe_path, subfolder=tokenizer_name, **pretrained_kwargs(ref, ref.revision, weights=False)
        )
        check_new_tokens(tokenizer, tokens, f"{tokenizer_name} of {ref.id}")


class TextualInversion:
    """The method's trainable state on one worker: new rows in each text encoder's embedding matrix."""

    def __init__(self, pipe, class_names: list[str], spec: dict):
        import torch

        self.pipe = pipe
        self.class_names = class_names
        self.tokens = placeholder_tokens(class_names, spec["placeholder"])
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).requires_grad_(False)  # only the embedding rows train
        self.encoders = []  # (key, embedding weight, new token ids, frozen copy of the rows that must not change)
        extended = set()  # a pipeline may share one tokenizer object between its two encoders
        for encoder_name, tokenizer_name, key in TEXT_ENCODERS:
            encoder, tokenizer = getattr(pipe, encoder_name, None), getattr(pipe, tokenizer_name, None)
            if encoder is None:
                continue
            if id(tokenizer) not in extended:
                check_new_tokens(tokenizer, self.tokens, tokenizer_name)
            init_ids = []
            for name in class_names:
                word = spec["initializers"].get(name, spec["initializer"])
                ids = tokenizer(word, add_special_tokens=False).input_ids
                if not ids:
                    raise ValueError(f"initializer word {word!r} of class {name!r} has no tokens")
                init_ids.append(ids)
            if id(tokenizer) not in extended:
                tokenizer.add_tokens(self.tokens)
                extended.add(id(tokenizer))
            token_ids = tokenizer.convert_tokens_to_ids(self.tokens)
            for token, token_id in zip(self.tokens, token_ids, strict=True):
                encoded = tokenizer(token, add_special_tokens=False).input_ids
                assert encoded == [token_id], f"{token!r} must encode to its one new id, got {encoded}"
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set below
            weight = encoder.get_input_embeddings().weight
            with torch.no_grad():
                for token_id, ids in zip(token_ids, init_ids, strict=True):
                    weight[token_id] = weight[ids].mean(0)
            encoder.requires_grad_(False)
            weight.requires_grad_(True)
            encoder.train()  # CLIP has no dropout by default; as the diffusers example does
            ids = torch.tensor(token_ids, dtype=torch.long, device=weight.device)
            frozen = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
            frozen[ids] = False
            self.encoders.append((key, weight, ids, frozen, weight.detach().clone()))

    def parameters(self) -> list:
        return [weight for _, weight, _, _, _ in self.encoders]

    def prompt_word(self, label: int) -> str:
        return self.tokens[label]

    def after_backward(self) -> None:
        """Only the placeholder rows get a gradient (and only they are averaged across ranks)."""
        for _, weight, _, frozen, _ in self.encoders:
            if weight.grad is not None:
                weight.grad[frozen] = 0

    def after_step(self) -> None:
        """Every other row back to its original value, bit for bit (AdamW's weight decay touches them all)."""
        import torch

        with torch.no_grad():
            for _, weight, _, frozen, original in self.encoders:
                weight[frozen] = original[frozen]

    def state_tensors(self) -> dict:
        return {
            key: weight.detach()[ids].float().cpu().contiguous() for key, weight, ids, _, _ in self.encoders
        }

    def load_state_tensors(self, tensors: dict) -> None:
        import torch

        with torch.no_grad():
            for key, weight, ids, _, _ in self.encoders:
                weight[ids] = tensors[key].to(weight.device, weight.dtype)

    def export(self, folder: Path) -> list[Path]:
        from safetensors.torch import save_file

        path = Path(folder) / TEXTUAL_INVERSION_FILE
        metadata = {"tokens": json.dumps(self.tokens), "classes": json.dumps(self.class_names)}
        save_file(self.state_tensors(), str(path), metadata=metadata)
        return [path]
