"""Offline tiny random-weight models: `synthray tiny-models --out DIR`.

Each builder makes a Hugging Face-format checkpoint from a config (no download) so actors load it through
the same `from_pretrained` path they use for real hub ids. Names here are the directory names the tiny
configs point at.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

from engine.tiny.clip import build_clip
from engine.tiny.llm import build_llm
from engine.tiny.sd15 import build_sd15
from engine.tiny.sdxl import build_sdxl
from engine.tiny.segmentation import build_grounding_dino, build_sam, build_sam_checkpoint
from engine.tiny.vlm import build_vlm

# name -> builder(out_path) -> path written. Order is build order.
TINY_MODELS: dict[str, Callable[[Path], Path]] = {
    "grounding-dino": build_grounding_dino,
    "sam": build_sam,
    "sam-tiny.safetensors": build_sam_checkpoint,
    "sdxl": build_sdxl,
    "sd15": build_sd15,
    "llm": build_llm,
    "vlm": build_vlm,
    "clip": build_clip,
}

DEFAULT_DIR = Path(".cache/tiny-models")


def build_tiny_models(
    out_dir: Path = DEFAULT_DIR, force: bool = False, names: Collection[str] | None = None
) -> dict[str, Path]:
    """Build every tiny model missing under `out_dir` (all of them with `force`; only `names` if given)."""
    unknown = sorted(set(names or ()) - set(TINY_MODELS))
    if unknown:
        raise ValueError(f"unknown tiny models {unknown}; available: {', '.join(TINY_MODELS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    built = {}
    for name, builder in TINY_MODELS.items():
        if names is not None and name not in names:
            continue
        target = out_dir / name
        if force or not target.exists():
            # Build into a temporary sibling and rename, so an interrupted build never looks complete.
            tmp = out_dir / f".{name}.partial"
            if tmp.exists():
                _remove(tmp)
            builder(tmp)
            if target.exists():
                _remove(target)
            tmp.rename(target)
        built[name] = target
    return built


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
