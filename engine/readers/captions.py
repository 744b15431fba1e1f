"""Captions a dataset already has: a CSV of source_id -> caption (pyarrow's reader: quoting, large files)."""

from __future__ import annotations

from engine import schema


def read_captions_file(path: str, key: str) -> dict[str, str]:
    """source_id -> caption (stripped; "" where empty). `key` names the config key in errors."""
    import pyarrow.csv as pcsv

    table = pcsv.read_csv(path)
    missing = [c for c in (schema.SOURCE_ID, schema.CAPTION) if c not in table.column_names]
    if missing:
        raise ValueError(f"{key} {path} has no column(s) {missing} (columns: {table.column_names})")
    return {
        str(i): (c or "").strip()
        for i, c in zip(table[schema.SOURCE_ID].to_pylist(), table[schema.CAPTION].to_pylist(), strict=True)
    }
