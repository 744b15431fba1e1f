"""Expansion (a stateless CPU stage): each real row -> its real row (variant 0) + K synthetic rows.

Reads: source_id, split. Writes: id, recipe, variant, seed. Synthetic rows share the real row's image and
mask arrays (the recipe's stages replace them); ids and seeds are derived, so a re-run makes the same rows
and a resumed run can drop the ones already written (`done_ids`: an `engine.output.written_ids.WrittenIds`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from engine import schema
from engine.output.written_ids import done_mask
from engine.stages.batch import Batch, object_array, take


@dataclass(frozen=True)
class Expansion:
    """Which rows each source owes: the identity of every output row."""

    recipe: str
    num_variants: int
    base_seed: int
    config_hash: str
    include_real: bool
    expand_splits: tuple[str, ...] | None  # None: every split; others (e.g. val/test) stay real-only

    @classmethod
    def from_config(cls, config, config_hash: str) -> Expansion:
        """The expansion a generation config (engine.config.GenerateConfig) asks for."""
        splits = config.data.expand_splits
        return cls(
            recipe=config.recipe,
            num_variants=config.num_variants,
            base_seed=config.seed,
            config_hash=config_hash,
            include_real=config.output.include_real,
            expand_splits=tuple(splits) if splits is not None else None,
        )

    def variants(self, split: str) -> list[int]:
        expand = self.expand_splits is None or split in self.expand_splits
        if not expand:
            return [0]
        return list(range(0 if self.include_real else 1, self.num_variants + 1))

    def recipe_of(self, variant: int) -> str:
        return schema.RECIPE_REAL if variant == 0 else self.recipe

    def row_id(self, source_id: str, variant: int) -> str:
        return schema.row_id(source_id, self.recipe_of(variant), variant, self.config_hash)

    def expected_ids(self, source_id: str, split: str) -> list[str]:
        return [self.row_id(source_id, v) for v in self.variants(split)]


def expand_variants(batch: Batch, expansion: Expansion, done_ids: Collection[str] = frozenset()) -> Batch:
    index, variants = [], []
    for i, split in enumerate(batch[schema.SPLIT]):
        for v in expansion.variants(str(split)):
            index.append(i)
            variants.append(v)
    out = {
        name: (object_array([column[i] for i in index]) if column.dtype == object else column[index])
        for name, column in batch.items()
    }
    sources = [str(s) for s in out[schema.SOURCE_ID]]
    out[schema.VARIANT] = np.array(variants, dtype=np.int64)
    out[schema.RECIPE] = np.array([expansion.recipe_of(v) for v in variants], dtype=object)
    out[schema.ID] = np.array(
        [expansion.row_id(s, v) for s, v in zip(sources, variants, strict=True)], dtype=object
    )
    out[schema.SEED] = np.array(
        [schema.row_seed(expansion.base_seed, s, v) for s, v in zip(sources, variants, strict=True)],
        dtype=np.int64,
    )
    if schema.GROUP in out:
        # Group labels describe the real image (e.g. its background); a synthetic variant's is unknown.
        out[schema.GROUP] = np.where(np.array(variants) == 0, out[schema.GROUP], -1).astype(np.int64)
    if len(done_ids):
        out = take(out, ~done_mask(done_ids, [str(i) for i in out[schema.ID]]))
    return out


def skip_completed_sources(batch: Batch, expansion: Expansion, done_ids: Collection[str]) -> Batch:
    """Before decoding: drop sources whose every output row is already written (a resumed run)."""
    if not len(done_ids):
        return batch
    expected = [
        expansion.expected_ids(str(s), str(sp))
        for s, sp in zip(batch[schema.SOURCE_ID], batch[schema.SPLIT], strict=True)
    ]
    done = done_mask(done_ids, [i for ids in expected for i in ids])  # one lookup for the whole batch
    bounds = np.cumsum([0] + [len(ids) for ids in expected])
    keep = [not done[a:b].all() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return take(batch, np.array(keep, dtype=bool))
