"""Utilization strategies: which train rows an epoch sees, as pure seedable functions over a row index.

Every strategy maps (index of the train split's rows, a numpy Generator, its knobs) to an array of positions
into that index, one per sample the epoch trains on (a position may repeat). No Ray, no images: the training
job computes each epoch's positions on the driver and turns them into Ray Datasets (engine.train.data), and
the tests check the sampling rules here directly.

Validation and test rows never come through here: they are always the real rows of their split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from engine import schema
from engine.train.config import MixConfig


@dataclass(frozen=True)
class RowIndex:
    """Metadata of the candidate train rows (real and synthetic); array position = row position."""

    ids: np.ndarray  # str
    labels: np.ndarray  # int64
    source_ids: np.ndarray  # str: a synthetic row's real image; a real row's own source
    synthetic: np.ndarray  # bool
    parts: np.ndarray | None = None  # str (schema.PART; "whole" where null); None: all whole images

    @classmethod
    def from_table(cls, table: pa.Table) -> RowIndex:
        """From a table with the schema's id, label, source_id and recipe columns (and part, if any)."""
        missing = [
            c
            for c in (schema.ID, schema.LABEL, schema.SOURCE_ID, schema.RECIPE)
            if c not in table.schema.names
        ]
        if missing:
            raise ValueError(f"the row index needs columns {missing}; the table has {table.schema.names}")
        return cls(
            ids=np.asarray(table[schema.ID].to_pylist(), dtype=object),
            labels=table[schema.LABEL].to_numpy().astype(np.int64),
            source_ids=np.asarray(table[schema.SOURCE_ID].to_pylist(), dtype=object),
            synthetic=np.asarray(table[schema.RECIPE].to_pylist(), dtype=object) != schema.RECIPE_REAL,
            parts=np.asarray([p or schema.PART_WHOLE for p in table[schema.PART].to_pylist()], dtype=object)
            if schema.PART in table.schema.names
            else None,
        )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def real_positions(self) -> np.ndarray:
        return np.flatnonzero(~self.synthetic)

    @property
    def whole(self) -> np.ndarray:
        """bool: rows that are whole images (not De-DA's CDPs and CIPs)."""
        return np.ones(len(self), bool) if self.parts is None else self.parts == schema.PART_WHOLE

    @property
    def synthetic_positions(self) -> np.ndarray:
        """Synthetic whole images: De-DA's parts are no samples on their own, only `deda` composes them."""
        return np.flatnonzero(self.synthetic & self.whole)

    def part_positions(self, part: str) -> np.ndarray:
        return np.flatnonzero(self.parts == part) if self.parts is not None else np.zeros(0, np.int64)


def count_rows(index: RowIndex, positions: np.ndarray) -> dict[str, int]:
    """Real and synthetic samples among `positions` (repeats count each time)."""
    num_synthetic = int(index.synthetic[positions].sum())
    return {"real": len(positions) - num_synthetic, "synthetic": num_synthetic}


# ---------------------------------------------------------------- the strategies


def select_real(index: RowIndex) -> np.ndarray:
    """`real`: the real rows only, the baseline every paper reports against."""
    return index.real_positions


def select_concat(
    index: RowIndex, rng: np.random.Generator, synthetic_ratio: float | None = None
) -> np.ndarray:
    """`concat`: real rows plus synthetic rows in one training set.

    "Combined" in MVC and "FC" (full combination) in UniDiffDA (Li et al. 2026, "Diffusion-Based Data
    Augmentation for Image Recognition: A Systematic Analysis and Evaluation"). With `synthetic_ratio` r, each
    class keeps at most round(r * its real count) synthetic rows, drawn once without replacement, so the
    real-to-synthetic balance is set per class and class priors stay those of the real data. The set is
    static: the caller passes the same generator state every epoch.
    """
    real = index.real_positions
    synthetic = index.synthetic_positions
    if synthetic_ratio is not None:
        kept = []
        for label in np.unique(index.labels[synthetic]):
            of_class = synthetic[index.labels[synthetic] == label]
            cap = round(synthetic_ratio * int((index.labels[real] == label).sum()))
            kept.append(rng.choice(of_class, size=min(cap, len(of_class)), replace=False))
        synthetic = np.sort(np.concatenate(kept)) if kept else synthetic[:0]
    return np.concatenate([real, synthetic])


def select_replace(index: RowIndex, rng: np.random.Generator, p: float, scope: str = "local") -> np.ndarray:
    """`replace`: each real sample is swapped, with probability p, for a synthetic one; redrawn every epoch.

    DA-Fusion (Trabucco et al. 2024, "Effective Data Augmentation With Diffusion Models": a real image is
    replaced by one of its own synthetic variants with probability alpha) and UniDiffDA's "LRR"/"GRR"
    (local/global random replacement). Scopes of the draw, uniform within it:
    - `local` (LRR): the variants whose source_id is the real row's (a real row with none stays real);
    - `global` (GRR, as UniDiffDA's reference code draws it): the whole synthetic pool, whatever its label;
      the slot then holds the drawn row, so it trains on that row's label (and soft label);
    - `class`: the synthetic rows of the real row's label (a third scope, between the two; a class with
      none stays real).
    Output slot i holds real row `real_positions[i]` or its replacement, so the epoch size equals the real
    count.
    """
    if scope not in ("local", "class", "global"):
        raise ValueError(f"replace scope must be 'local', 'class' or 'global', got {scope!r}")
    real = index.real_positions
    synthetic = index.synthetic_positions
    keys = {
        "local": index.source_ids,
        "class": index.labels,
        "global": np.zeros(len(index), dtype=np.int64),  # one pool
    }[scope]
    candidates: dict[object, list[int]] = {}
    for position in synthetic.tolist():
        candidates.setdefault(keys[position], []).append(position)
    out = real.copy()
    swap = rng.random(len(real)) < p
    for slot in np.flatnonzero(swap).tolist():
        pool = candidates.get(keys[real[slot]])
        if pool:
            out[slot] = pool[int(rng.integers(len(pool)))]
    return out


def select_rsp(index: RowIndex, rng: np.random.Generator, p: float) -> np.ndarray:
    """`rsp`: random selection with probability, MVC's strategy; redrawn every epoch.

    Every real row is used; each synthetic row joins the epoch independently with probability p, so the
    batches mix real and synthetic samples at an expected p * num_synthetic synthetic rows per epoch and
    the model sees a different synthetic subset each epoch.
    """
    synthetic = index.synthetic_positions
    return np.concatenate([index.real_positions, synthetic[rng.random(len(synthetic)) < p]])


def select_two_phase(
    index: RowIndex,
    rng: np.random.Generator,
    *,
    epoch: int,
    phase1_epochs: int,
    synthetic_ratio: float | None = None,
) -> np.ndarray:
    """`two_phase`: MVC's strategy: phase 1 trains on real + synthetic (as `concat`), phase 2 on real only.

    Epochs [0, phase1_epochs) are phase 1, later ones phase 2; the training loop lowers the learning rate in
    phase 2 (mix.phase2_lr_scale) so that it fine-tunes on the real distribution.
    """
    if epoch < phase1_epochs:
        return select_concat(index, rng, synthetic_ratio)
    return select_real(index)


def select_deda(
    index: RowIndex, rng: np.random.Generator, p: float, edited_share: float
) -> tuple[np.ndarray, dict[str, int]]:
    """`deda`: De-DA's online recombination; redrawn every epoch.

    Each real sample is replaced, with probability p, by a CDP of its class (an edited one with probability
    `edited_share` where the class has edited CDPs, else a real CDP), which the data pipeline pastes onto a
    CIP of another class (engine.methods.recombine: composites are made per epoch and never stored). A class
    with no CDP, or with no CIP of any other class, keeps its samples real; the second value counts those
    slots (`stayed_real`). Output slot i holds real row `real_positions[i]` or its CDP, so the epoch size is
    the real count, as in `replace`.
    """
    real = index.real_positions
    labels = index.labels
    cdps = index.part_positions(schema.PART_CDP)
    edited = index.part_positions(schema.PART_CDP_EDITED)
    cip_labels = set(labels[index.part_positions(schema.PART_CIP)].tolist())
    # Every draw is made for every slot, so one slot's outcome never shifts another's.
    swap = rng.random(len(real)) < p
    use_edited = rng.random(len(real)) < edited_share
    pick = rng.random(len(real))
    by_class = {
        label: (cdps[labels[cdps] == label], edited[labels[edited] == label])
        for label in np.unique(labels[real]).tolist()
    }
    out = real.copy()
    stayed_real = 0
    for slot in np.flatnonzero(swap).tolist():
        label = int(labels[real[slot]])
        plain, edits = by_class[label]
        pool = edits if (use_edited[slot] and len(edits)) or not len(plain) else plain
        if not len(pool) or not (cip_labels - {label}):
            stayed_real += 1
            continue
        out[slot] = pool[int(pick[slot] * len(pool))]
    return out, {"stayed_real": stayed_real}


def check_deda_index(index: RowIndex) -> None:
    """mix.strategy deda needs CDPs and CIPs of at least two classes (a De-DA generation run's shards)."""
    missing = [p for p in (schema.PART_CDP, schema.PART_CIP) if not len(index.part_positions(p))]
    if missing:
        raise ValueError(
            f"mix.strategy deda needs the shards of a De-DA run (recipe deda): no train rows with part {missing}"
        )
    classes = np.unique(index.labels[index.real_positions])
    if len(classes) < 2:
        raise ValueError(
            f"mix.strategy deda pastes a subject onto another class's background: the train split has "
            f"{len(classes)} class"
        )


def parts_notes(index: RowIndex, strategy: str, class_names: list[str]) -> list[str]:
    """What the run report should say about De-DA's parts: unused by other strategies; under `deda`, the
    classes whose samples stay real (no CDP, or no CIP of another class)."""
    num_parts = int((~index.whole).sum())
    if strategy != "deda":
        return (
            [f"{num_parts} train rows are De-DA parts (CDPs, CIPs): only mix.strategy deda uses them"]
            if num_parts
            else []
        )
    cip_labels = set(index.labels[index.part_positions(schema.PART_CIP)].tolist())
    has_cdp = set(index.labels[index.part_positions(schema.PART_CDP)].tolist()) | set(
        index.labels[index.part_positions(schema.PART_CDP_EDITED)].tolist()
    )
    notes = []
    for label in np.unique(index.labels[index.real_positions]).tolist():
        reason = (
            "it has no CDP"
            if label not in has_cdp
            else "no other class has a CIP"
            if not (cip_labels - {label})
            else None
        )
        if reason:
            notes.append(f"mix.strategy deda: class {class_names[label]!r} keeps its samples real: {reason}")
    return notes


# ---------------------------------------------------------------- per epoch


def phase1_epochs(mix: MixConfig, num_epochs: int) -> int:
    """Epochs before two_phase's real-only phase (all epochs for the other strategies)."""
    return num_epochs - mix.phase2_epochs if mix.strategy == "two_phase" else num_epochs


def select_epoch(index: RowIndex, mix: MixConfig, *, seed: int, epoch: int, num_epochs: int) -> np.ndarray:
    """The positions epoch `epoch` trains on under `mix.strategy`, a pure function of (seed, epoch)."""
    # Static selections (concat, its cap) draw from a generator that every epoch rebuilds identically;
    # re-drawn ones (replace, rsp) from one keyed by the epoch.
    static_rng = np.random.default_rng([seed, 0])
    epoch_rng = np.random.default_rng([seed, 1, epoch])
    selectors: dict[str, Callable[[], np.ndarray]] = {
        "real": lambda: select_real(index),
        "concat": lambda: select_concat(index, static_rng, mix.synthetic_ratio),
        "replace": lambda: select_replace(index, epoch_rng, mix.replace_prob, mix.replace_scope),
        "rsp": lambda: select_rsp(index, epoch_rng, mix.rsp_prob),
        "deda": lambda: select_deda(index, epoch_rng, mix.deda_prob, mix.deda_edited_share)[0],
        "two_phase": lambda: select_two_phase(
            index,
            static_rng,
            epoch=epoch,
            phase1_epochs=phase1_epochs(mix, num_epochs),
            synthetic_ratio=mix.synthetic_ratio,
        ),
    }
    if mix.strategy not in selectors:
        raise ValueError(f"unknown mix.strategy {mix.strategy!r}; available: {', '.join(selectors)}")
    positions = selectors[mix.strategy]()
    if len(positions) == 0:
        raise ValueError(f"strategy {mix.strategy!r} selected no train rows for epoch {epoch}")
    return positions


def deal_to_ranks(positions: np.ndarray, *, rng: np.random.Generator, world_size: int) -> list[np.ndarray]:
    """Shuffle an epoch's positions and deal them to `world_size` ranks in equal parts.

    Equal parts keep DDP's ranks in lockstep (same number of steps); the at most world_size - 1 rows left
    over are dropped, different ones each epoch since the shuffle differs.
    """
    if len(positions) < world_size:
        raise ValueError(f"{len(positions)} train rows cannot feed {world_size} workers")
    shuffled = rng.permutation(positions)
    usable = len(shuffled) - len(shuffled) % world_size
    return [shuffled[rank:usable:world_size] for rank in range(world_size)]
