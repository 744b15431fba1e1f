"""Expansion (a stateless CPU stage): each real row -> its real row (variant 0) + K synthetic rows.

Reads: source_id, split. Writes: id, recipe, variant, seed. Synthetic rows share the real row's image and mask
arrays (the recipe's stages replace them); ids and seeds are derived, so a re-run makes the same rows.
"""

from __future__ import annotations

import numpy as np

from engine import schema
from engine.batch import Batch, object_array


def expand_variants(
    batch: Batch,
    recipe: str,
    num_variants: int,
    base_seed: int,
    config_hash: str,
    include_real: bool,
    expand_splits: list[str] | None,
) -> Batch:
    """Rows of splits outside `expand_splits` (e.g. val/test) pass as real rows only, never expanded."""
    index, variants = [], []
    for i, split in enumerate(batch[schema.SPLIT]):
        expand = expand_splits is None or str(split) in expand_splits
        first = 0 if (include_real or not expand) else 1
        last = num_variants if expand else 0
        index += [i] * (last + 1 - first)
        variants += list(range(first, last + 1))
    index, variants = np.array(index, dtype=np.int64), np.array(variants, dtype=np.int64)
    out = {
        name: (object_array([column[i] for i in index]) if column.dtype == object else column[index])
        for name, column in batch.items()
    }
    sources = out[schema.SOURCE_ID]
    recipes = [schema.RECIPE_REAL if v == 0 else recipe for v in variants]
    out[schema.VARIANT] = variants.astype(np.int64)
    out[schema.RECIPE] = np.array(recipes, dtype=object)
    out[schema.ID] = np.array(
        [
            schema.row_id(str(s), r, int(v), config_hash)
            for s, r, v in zip(sources, recipes, variants, strict=True)
        ],
        dtype=object,
    )
    out[schema.SEED] = np.array(
        [schema.row_seed(base_seed, str(s), int(v)) for s, v in zip(sources, variants, strict=True)],
        dtype=np.int64,
    )
    return out
