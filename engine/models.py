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

        return str(fetch(ref.id)), None
    if ref.is_local():
        path = Path(ref.id).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(
                f"{role} model not found at {path} (config id {ref.id!r}); {TINY_MODELS_HINT}, "
                "or point the config at a real checkpoint"
            )
        return str(path), None
    return ref.id, ref.revision


def pretrained_kwargs(ref: ModelRef, revision: str | None, weights: bool = True) -> dict:
    """Keyword arguments for every `from_pretrained`: pinned revision, no remote code, safetensors only.

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
