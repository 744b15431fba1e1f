"""One pipeline loader for every generating actor: `from_pretrained` under the project's loading policy,
dtype and device, an optional scheduler swap, then the adapters from config (textual-inversion tokens first,
then a UNet LoRA at `lora_scale`).

Adapters are the files `synthray finetune` writes (engine.finetune):
- textual inversion: `textual_inversion.safetensors` holding `clip_l` ([num_tokens, dim] for the first text
  encoder) and, for SDXL, `clip_g` (the second), with the token strings in the file's metadata (`tokens`, a
  JSON list). This is the layout diffusers documents for SDXL pivotal tuning; each tensor goes through
  `pipe.load_textual_inversion(tensor, token=tokens, text_encoder=..., tokenizer=...)`.
- LoRA: a folder (or file) `pipe.load_lora_weights` reads (`pytorch_lora_weights.safetensors`, diffusers keys).
A file whose shapes do not fit the pipeline is refused with both shapes; pickled files need `allow_pickle`.

torch and diffusers are imported inside the functions: the driver imports this module without them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from engine.config import AdapterConfig, ModelRef, SchedulerConfig
from engine.models.references import pretrained_kwargs, resolve_model, torch_dtype

TEXTUAL_INVERSION_FILE = "textual_inversion.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name for save_lora_weights
LORA_ADAPTER = "synthray"
# (text encoder attribute, tokenizer attribute, key in the embeddings file), in pipeline order.
TEXT_ENCODERS = (("text_encoder", "tokenizer", "clip_l"), ("text_encoder_2", "tokenizer_2", "clip_g"))


def load_pipeline(
    model: ModelRef,
    *,
    role: str,
    device: str,
    dtype: str = "float32",
    adapters: AdapterConfig | None = None,
    scheduler: SchedulerConfig | str | None = None,
    unet: ModelRef | None = None,
    pipeline_class=None,
    safety_checker: bool = False,
):
    """A diffusers pipeline on `device`, adapters applied, without the checkpoint's safety checker unless
    `safety_checker` (SD1.x checkpoints ship one that turns flagged images black: as training data those are
    labelled black frames; every reference codebase loads with safety_checker=None). `scheduler`: a scheduler class (name or
    SchedulerConfig with settings) built from the checkpoint's scheduler config; None keeps the checkpoint's.
    `unet`: a UNet replacing the checkpoint's (few-step distilled UNets). `pipeline_class`: a specific
    pipeline class (default: whatever the checkpoint's model_index.json names)."""
    import diffusers

    path, revision = resolve_model(model, role)
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
        # transformers and the Hub read this switch (engine.config.run.QUIET_LIBRARIES); diffusers' own bars
        # ("Loading pipeline components...") ignore it.
        diffusers.utils.logging.disable_progress_bar()
    cls = pipeline_class or diffusers.DiffusionPipeline
    kwargs = pretrained_kwargs(model, revision)
    has_checker = _has_safety_checker(cls, path, revision)
    if safety_checker and not has_checker:
        raise ValueError(
            f"{role}: safety_checker is true, but {model.id} has no safety checker (model_index.json names "
            "none); remove the key or point the config at a checkpoint that ships one"
        )
    if has_checker and not safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if unet is not None:
        kwargs["unet"] = load_unet(unet, path, revision, model, role, torch_dtype(dtype, device))
    pipe = cls.from_pretrained(path, dtype=torch_dtype(dtype, device), **kwargs).to(device)
    if scheduler is not None:
        pipe.scheduler = build_scheduler(scheduler, pipe.scheduler.config, role)
    if adapters is not None:
        apply_adapters(pipe, adapters, role)
    return pipe


def _has_safety_checker(cls, path: str, revision: str | None) -> bool:
    """Whether the checkpoint's model_index.json names a safety checker component."""
    index = cls.load_config(path, revision=revision)
    component = index.get("safety_checker")
    return isinstance(component, list | tuple) and component[0] is not None


def build_scheduler(scheduler: SchedulerConfig | str, base_config, role: str):
    """A diffusers scheduler of the named class from `base_config` (the checkpoint's), settings overridden."""
    import diffusers

    config = SchedulerConfig(name=scheduler) if isinstance(scheduler, str) else scheduler
    if not hasattr(diffusers, config.name):
        raise ValueError(f"{role}: unknown scheduler {config.name!r} (a diffusers *Scheduler class name)")
    return getattr(diffusers, config.name).from_config(base_config, **config.settings)


def load_unet(ref: ModelRef, base_path: str, base_revision: str | None, base: ModelRef, role: str, dtype):
    """A UNet from a diffusers folder, or a .safetensors state dict (SDXL-Lightning ships one) loaded into
    the base checkpoint's UNet architecture; every key must match (a wrong architecture is refused)."""
    from diffusers import UNet2DConditionModel

    path, revision = resolve_model(ref, role)
    if ref.file is not None:
        if ref.is_local() or ref.is_uri():
            path = str(Path(path) / ref.file)
        else:  # one file of a hub repository, at the pinned revision
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(ref.id, ref.file, revision=revision)
    if not str(path).endswith(".safetensors"):
        return UNet2DConditionModel.from_pretrained(path, dtype=dtype, **pretrained_kwargs(ref, revision))
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(
        base_path, subfolder="unet", dtype=dtype, **pretrained_kwargs(base, base_revision)
    )
    state = load_file(str(path))
    expected = unet.state_dict()
    wrong = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if wrong or missing or unexpected:
        detail = (
            f"{wrong[0]}: {tuple(state[wrong[0]].shape)} vs the base UNet's {tuple(expected[wrong[0]].shape)}"
            if wrong
            else f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
        raise ValueError(f"{role}: UNet weights {path} do not fit {base.id}'s UNet ({detail})")
    unet.load_state_dict(state)
    return unet


def apply_adapters(pipe, adapters: AdapterConfig, role: str) -> None:
    """Textual-inversion tokens first (a LoRA trained on top of them expects them), then the LoRA."""
    if adapters.textual_inversion is not None:
        load_textual_inversion(pipe, adapters.textual_inversion, role)
    if adapters.lora is not None:
        load_lora(pipe, adapters.lora, adapters.lora_scale, role)


def adapter_file(ref: ModelRef, default_name: str, role: str) -> Path:
    """The weights file of an adapter reference (a file, or a folder holding `default_name`), held to the
    loading policy: safetensors unless `allow_pickle`."""
    path = Path(resolve_model(ref, role)[0])
    if path.is_dir():
        path = path / default_name
        if not path.exists():
            raise FileNotFoundError(f"{role}: no {default_name} in {path.parent}")
    if path.suffix != ".safetensors" and not ref.allow_pickle:
        raise ValueError(
            f"{role}: adapter {path} is not a .safetensors file; synthray loads safetensors only unless the "
            "adapter's config says allow_pickle: true"
        )
    return path


def textual_inversion_classes(ref: ModelRef, role: str) -> dict[str, str]:
    """Class name -> its token, from the metadata `synthray finetune` writes (`classes`, `tokens`)."""
    path = adapter_file(ref, TEXTUAL_INVERSION_FILE, role)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "classes" not in metadata or "tokens" not in metadata:
        raise ValueError(f"{role}: {path} does not name its classes (not written by `synthray finetune`)")
    return dict(zip(json.loads(metadata["classes"]), json.loads(metadata["tokens"]), strict=True))


def read_textual_inversion(path: Path) -> tuple[list[str], dict]:
    """(tokens, {"clip_l": tensor, ["clip_g": tensor]}) from a file written by engine.finetune."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        tokens = json.loads(metadata.get("tokens", "null"))
    else:  # allow_pickle: tensors only, never arbitrary objects
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        tokens = state.pop("tokens", None)
        tensors = state
    if not tokens or "clip_l" not in tensors:
        raise ValueError(
            f"{path} is not a synthray textual-inversion file (needs `clip_l` and a `tokens` list in its metadata)"
        )
    return list(tokens), tensors


def load_textual_inversion(pipe, ref: ModelRef, role: str) -> list[str]:
    """Add the file's tokens to every text encoder of `pipe`; returns the tokens."""
    path = adapter_file(ref, TEXTUAL_INVERSION_FILE, role)
    tokens, tensors = read_textual_inversion(path)
    encoders = [(e, t, k) for e, t, k in TEXT_ENCODERS if getattr(pipe, e, None) is not None]
    wanted = sorted(k for _, _, k in encoders)
    if sorted(tensors) != wanted:
        raise ValueError(
            f"{role}: textual inversion {path} has embeddings {sorted(tensors)}, the pipeline's text encoders "
            f"need {wanted} (an SD1.5 file on SDXL or the other way round?)"
        )
    for encoder_name, tokenizer_name, key in encoders:
        encoder, tokenizer = getattr(pipe, encoder_name), getattr(pipe, tokenizer_name)
        expected = (len(tokens), encoder.get_input_embeddings().weight.shape[-1])
        if tuple(tensors[key].shape) != expected:
            raise ValueError(
                f"{role}: textual inversion {path} {key} has shape {tuple(tensors[key].shape)}, "
                f"{encoder_name} of this pipeline needs {expected} ({len(tokens)} tokens)"
            )
        pipe.load_textual_inversion(
            tensors[key].to(encoder.dtype), token=tokens, text_encoder=encoder, tokenizer=tokenizer
        )
    return tokens


def load_lora(pipe, ref: ModelRef, scale: float, role: str) -> None:
    """Load a UNet LoRA with `pipe.load_lora_weights` at `scale`, after checking every LoRA matrix against the
    layer it adapts (diffusers would fail deep inside peft, or not at all for a missing layer)."""
    path = adapter_file(ref, LORA_FILE, role)
    kwargs = {"weight_name": path.name, "use_safetensors": None if ref.allow_pickle else True}
    state_dict, _ = pipe.lora_state_dict(str(path.parent), **kwargs)
    check_lora_shapes(pipe.unet, state_dict, path, role)
    pipe.load_lora_weights(str(path.parent), adapter_name=LORA_ADAPTER, **kwargs)
    pipe.set_adapters([LORA_ADAPTER], adapter_weights=[scale])


def check_lora_shapes(unet, state_dict: dict, path: Path, role: str) -> None:
    """Every `unet.<module>.lora_A/B.weight` names a Linear of `unet` with matching in/out features."""
    import re

    pattern = re.compile(r"^unet\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight$")
    for key, tensor in state_dict.items():
        match = pattern.match(key)
        if match is None:
            continue
        module_name, kind = match.groups()
        try:
            module = unet.get_submodule(module_name)
        except AttributeError:
            raise ValueError(
                f"{role}: LoRA {path} adapts {module_name}, which this pipeline's UNet lacks"
            ) from None
        down = kind in ("lora_A", "lora.down")
        rank = tensor.shape[0] if down else tensor.shape[1]
        expected = (rank, module.weight.shape[1]) if down else (module.weight.shape[0], rank)
        if tuple(tensor.shape[:2]) != expected:
            raise ValueError(
                f"{role}: LoRA {path} {key} has shape {tuple(tensor.shape)}, the UNet's {module_name} "
                f"(weight {tuple(module.weight.shape)}) needs {expected}"
            )
