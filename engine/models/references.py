"""Resolving model references for actors: local paths must exist, hub ids carry a pinned revision.

Imports nothing heavy: actors call `resolve_model` inside `__init__` before touching torch.
"""

from __future__ import annotations

from pathlib import Path

from engine.config import TINY_MODELS_HINT, ModelRef


def resolve_model(ref: ModelRef, role: str) -> tuple[str, str | None]:
    """Return (path_or_id, revision) for `from_pretrained`; a missing local path is a clear error.

    A URI (s3://, gs://, ...) is copied once into this node's model cache and loaded from there.
    """
    if ref.is_uri():
        from engine.storage import fetch

        path = Path(fetch(ref.id))
        check_weight_format(path, ref, role)
        return str(path), None
    if ref.is_local():
        path = Path(ref.id).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(
                f"{role} model not found at {path} (config id {ref.id!r}); {TINY_MODELS_HINT}, "
                "or point the config at a real checkpoint"
            )
        check_weight_format(path, ref, role)
        return str(path), None
    return ref.id, ref.revision


# Weight files `torch.load` would unpickle, and files with those suffixes that are not model weights.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state")


def pickled_weights(path: Path) -> list[Path]:
    """Pickled weight files a loader would read at `path` (a file; a checkpoint folder; for a diffusers
    pipeline also the component folders its model_index.json names) that have no safetensors file beside
    them. Other subfolders are not read by `from_pretrained` (e.g. a hub repo's `original/*.pth`). Empty:
    nothing needs unpickling."""
    import json

    if path.is_file():
        return [path] if path.suffix in PICKLE_SUFFIXES else []
    folders = [path]
    if (path / "model_index.json").is_file():
        components = json.loads((path / "model_index.json").read_text())
        folders += [path / name for name in sorted(components) if (path / name).is_dir()]
    refused = []
    for folder in folders:
        files = [f for f in folder.iterdir() if f.is_file()]
        if any(f.name.endswith(".safetensors") for f in files):
            continue  # use_safetensors / load_format="safetensors" takes these and ignores the pickles
        refused += sorted(
            f for f in files if f.suffix in PICKLE_SUFFIXES and not f.name.startswith(NOT_WEIGHTS)
        )
    return refused


def check_weight_format(path: Path, ref: ModelRef, role: str) -> None:
    """The loading policy for local checkpoints (every loader resolves through here): safetensors only,
    unless the model's config says `allow_pickle: true`. Hub ids are held to it by the loaders' own options
    (`use_safetensors=True`, vLLM's `load_format="safetensors"`), see `pretrained_kwargs`."""
    if ref.allow_pickle:
        return
    pickled = pickled_weights(path)
    if pickled:
        names = ", ".join(str(p.relative_to(path)) if p != path else p.name for p in pickled[:3])
        raise ValueError(
            f"{role} model at {path} has pickled weights only ({names}): synthray loads safetensors only. "
            "Convert the checkpoint to .safetensors, or set allow_pickle: true on this model in the config "
            "(loaded as tensors only)"
        )


def pretrained_kwargs(ref: ModelRef, revision: str | None, weights: bool = True) -> dict:
    """Keyword arguments for every `from_pretrained`: pinned revision, no remote code, safetensors only.

    Remote code and pickled weights are per model (`ModelRef.trust_remote_code`, `ModelRef.allow_pickle`).

    `weights=False` for tokenizers and processors, which have no weights to restrict. Hub tokens are read
    by huggingface_hub from the HF_TOKEN environment variable and never pass through configs.
    """
    kwargs = {"revision": revision, "trust_remote_code": ref.trust_remote_code}
    if weights:
        # True refuses pickled weights outright; None lets the library take either format.
        kwargs["use_safetensors"] = None if ref.allow_pickle else True
    return kwargs


def resolve_device(device: str) -> str:
    """`auto` picks CUDA when this worker has it: the worker, not the driver, decides."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(name: str, device: str):
    """fp16/bf16 only make sense on GPU; on CPU run in float32 rather than emulate half precision."""
    import torch

    if device.startswith("cpu"):
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def check_local_models(config, role: str = "") -> None:
    """Driver-side preflight: every local model path in the config exists (fail before any actor starts)."""
    from pydantic import BaseModel

    if isinstance(config, ModelRef):
        if config.is_uri():
            from engine.storage import exists

            if not exists(config.id):
                raise FileNotFoundError(f"{role} model not found at {config.id}")
        elif config.is_local() or config.id.startswith((".", "/", "~")):
            resolve_model(config, role)
        return
    if isinstance(config, BaseModel):
        for name in type(config).model_fields:
            check_local_models(getattr(config, name), f"{role}.{name}".lstrip("."))


def clip_features(features):
    """The tensor of CLIPModel.get_text_features / get_image_features: transformers 5 may return a model
    output (its pooler_output) rather than a tensor."""
    return getattr(features, "pooler_output", features)
