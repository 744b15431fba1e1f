"""Resolving model references for actors: local paths must exist, hub ids carry a pinned revision.

Imports nothing heavy: actors call `resolve_model` inside `__init__` before touching torch.
"""

from __future__ import annotations

from pathlib import Path

from engine.config import TINY_MODELS_HINT, ModelRef


def resolve_model(ref: ModelRef, role: str) -> tuple[str, str | None]:
    """Return (path_or_id, revision) for `from_pretrained`; a missing local path is a clear error."""
    if ref.is_local():
        path = Path(ref.id).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(
                f"{role} model not found at {path} (config id {ref.id!r}); {TINY_MODELS_HINT}, "
                "or point the config at a real checkpoint"
            )
        return str(path), None
    return ref.id, ref.revision


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
        if config.is_local() or config.id.startswith((".", "/", "~")):
            resolve_model(config, role)
        return
    if isinstance(config, BaseModel):
        for name in type(config).model_fields:
            check_local_models(getattr(config, name), f"{role}.{name}".lstrip("."))
