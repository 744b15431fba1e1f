"""Offline tiny random-weight models: `synthray tiny-models --out DIR`.

Each builder makes a Hugging Face-format checkpoint from a config (no download) so actors load it through
the same `from_pretrained` path they use for real hub ids. Names here are the directory names the tiny
configs point at.

A built model is keyed by a fingerprint of its builder: the source of the builder's module, of the
`engine.tiny` modules it imports (transitively) and of the other project modules those import (e.g. the word
lists the tiny LLM's vocabulary comes from). The key is stored beside the model (`.<name>.build`); a model
whose key differs, or that has none, is rebuilt, so a changed builder is never tested against a stale cache.
Library versions are not part of the key: the main and the vLLM environments share one cache.
"""

from __future__ import annotations

import ast
import hashlib
import os
from collections.abc import Callable, Collection
from pathlib import Path

from engine.tiny.blip2 import build_blip2
from engine.tiny.clip import build_clip
from engine.tiny.ip2p import build_ip2p
from engine.tiny.llm import build_llm
from engine.tiny.sd15 import build_sd15, build_sd15_domain
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
    "sd15-domain": build_sd15_domain,
    "ip2p": build_ip2p,
    "llm": build_llm,
    "vlm": build_vlm,
    "blip2": build_blip2,
    "clip": build_clip,
}

DEFAULT_DIR = Path(".cache/tiny-models")


PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("engine", "actors")


def build_tiny_models(
    out_dir: Path = DEFAULT_DIR, force: bool = False, names: Collection[str] | None = None
) -> dict[str, Path]:
    """Build every tiny model under `out_dir` that is missing or was built by another version of its builder
    (all of them with `force`; only `names` if given)."""
    import fcntl

    unknown = sorted(set(names or ()) - set(TINY_MODELS))
    if unknown:
        raise ValueError(f"unknown tiny models {unknown}; available: {', '.join(TINY_MODELS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    built = {}
    # One builder at a time per cache (test sessions in two environments may start together); the others
    # wait, then find the models fresh.
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name, builder in TINY_MODELS.items():
            if names is not None and name not in names:
                continue
            target, stamp = out_dir / name, out_dir / f".{name}.build"
            key = builder_fingerprint(builder)
            fresh = target.exists() and stamp.exists() and stamp.read_text().strip() == key
            if force or not fresh:
                # Build into a temporary sibling and rename, so an interrupted build never looks complete;
                # the old model is moved aside before the swap and removed after it.
                tmp = out_dir / f".{name}.partial-{os.getpid()}"
                if tmp.exists():
                    _remove(tmp)
                builder(tmp)
                old = out_dir / f".{name}.old-{os.getpid()}"
                if target.exists():
                    target.rename(old)
                tmp.rename(target)
                if old.exists():
                    _remove(old)
                stamp.write_text(key + "\n")
            built[name] = target
    return built


def builder_fingerprint(builder: Callable) -> str:
    """sha256 (16 hex digits) of the builder's name and the sources it depends on (see the module docstring)."""
    digest = hashlib.sha256(f"{builder.__module__}.{builder.__qualname__}".encode())
    for module in sorted(builder_modules(builder.__module__)):
        digest.update(module.encode() + b"\0" + _module_path(module).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def builder_modules(module: str) -> set[str]:
    """`module` and the project modules it imports anywhere in its source (function-level imports too),
    following imports through `engine.tiny` modules only."""
    seen: set[str] = set()
    stack = [module]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name != module and not name.startswith("engine.tiny"):
            continue  # a dependency outside the tiny builders: its own source counts, not its imports
        tree = ast.parse(_module_path(name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported = [node.module]
            elif isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            else:
                continue
            stack += [m for m in imported if m.split(".")[0] in PROJECT_PACKAGES and _module_path(m).exists()]
    return seen


def _module_path(module: str) -> Path:
    base = PROJECT_ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
