"""Loading configs (YAML + `--set a.b=c` overrides, errors that name the key), the job arguments, the resolved
config saved beside the outputs, and the content hash that row ids and the resume guard use."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], yaml-parsed c)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.path=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return raw


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  unknown key {key!r}")
        else:
            lines.append(f"  {key}: {item['msg']}")
    return "\n".join(lines)


def load_config(
    cls: type[ConfigT], path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None
) -> ConfigT:
    """Load `cls` from YAML (or `base` when no path), apply overrides; errors name the bad keys."""
    raw: dict = dict(base or {})
    if path is not None:
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
    raw = apply_overrides(raw, overrides or [])
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise ValueError(format_validation_error(err, str(path or "<embedded>"))) from None


def content_of(config: BaseModel) -> dict:
    """What determines the rows: the config as JSON without its scheduling fields (see `scheduling_field`)."""
    out = {}
    for name, field in type(config).model_fields.items():
        if (field.json_schema_extra or {}).get("scheduling"):
            continue
        value = getattr(config, name)
        if value is None and (field.json_schema_extra or {}).get("content_omit_if_none"):
            continue  # an optional section added later: runs without it keep their hash
        if isinstance(value, BaseModel):
            out[name] = content_of(value)
        else:
            out[name] = config.model_dump(mode="json", include={name})[name]
    return out


def config_hash(config: BaseModel) -> str:
    """Hash of what determines the rows (not where they go or how they are scheduled): part of every row id."""
    return content_hash(content_of(config))


def content_hash(content: dict) -> str:
    return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


def content_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two `content_of` dicts, e.g. ["num_variants: 2 -> 3"]."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += content_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return changes


def save_resolved(config: BaseModel, path: str | Path) -> None:
    """Write the resolved config (a local path or a URI, see engine.storage)."""
    from engine.storage import write_text

    write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def with_defaults(config_cls, saved: dict) -> dict | None:
    """A saved config dump as this code reads it: keys added since then take their defaults (which keep the
    old behaviour), so a run saved before a new key existed still counts as the same config. None if it no
    longer validates."""
    try:
        return config_cls.model_validate(saved).model_dump(mode="json")
    except ValueError:
        return None
