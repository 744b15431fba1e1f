"""MVC's embedding mixing (Algorithm 1 of "Dataset Augmentation by Mixing Visual Concepts"): a new prompt
embedding for a class is made from the CLIP text embeddings (m x d each) of that class's captions. Start
from one of them, e (`base`); P coarse steps each copy the rows r:s (token positions) of another caption's
embedding (a donor); Q fine steps each copy the columns u:v of one row w from a donor. A donor is never e.

Two pure pieces, so a seed means one mixed embedding: `plan_mix` draws the indices (numpy only; the row
records `MixPlan.to_dict()` in its params), `apply_mix` copies the slices (numpy arrays or torch tensors:
only slicing and copying, so this module never imports torch). `needed` names the captions a plan reads,
so a caller encodes only those.

Classifier-free guidance pairs the mixed embedding with the null (empty-prompt) embedding, as the paper
does; there is nothing to mix in the null embedding, so it is encoded as usual and never passed here.

SDXL: its prompt embedding is the two text encoders' hidden states concatenated along d (768 + 1280 = 2048),
plus a pooled embedding from the second encoder. The mix applies to the concatenated (m, 2048) matrix; the
pooled embedding is the base caption's, unmixed (our choice: it is one vector per caption, with no token
rows to mix, and the base is the caption the mixed rows mostly come from).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MixPlan:
    """How one embedding is mixed. `coarse` holds (donor, r, s): rows r:s (s exclusive) come from the
    donor; `fine` holds (donor, w, u, v): columns u:v (v exclusive) of row w come from the donor."""

    base: int
    coarse: tuple[tuple[int, int, int], ...] = ()
    fine: tuple[tuple[int, int, int, int], ...] = ()

    @property
    def mixed(self) -> bool:
        return bool(self.coarse or self.fine)

    def to_dict(self) -> dict:
        """JSON-ready, for the row's params."""
        return {
            "mixed": self.mixed,
            "base": self.base,
            "coarse": [list(step) for step in self.coarse],
            "fine": [list(step) for step in self.fine],
        }


def _cut(rng: np.random.Generator, size: int) -> tuple[int, int]:
    # Two distinct cut points among the size + 1 slice boundaries, sorted: a uniform pair a < b, so the slice
    # a:b is never empty and may be the whole axis.
    a, b = sorted(int(x) for x in rng.choice(size + 1, size=2, replace=False))
    return a, b


def _donor(rng: np.random.Generator, num_embeddings: int, base: int) -> int:
    # Uniform over the indices other than base: draw among num_embeddings - 1 and skip base.
    k = int(rng.integers(num_embeddings - 1))
    return k if k < base else k + 1


def plan_mix(
    rng: np.random.Generator, num_embeddings: int, m: int, d: int, coarse_steps: int, fine_steps: int
) -> MixPlan:
    """Draws a plan, always in the same order (base; per coarse step donor, r, s; per fine step donor, w,
    u, v), so one generator state gives one plan. A class with a single caption gets a plan with no steps:
    its rows use that embedding unmixed (`plan.mixed` is False)."""
    if num_embeddings < 1 or m < 1 or d < 1 or coarse_steps < 0 or fine_steps < 0:
        raise ValueError(
            f"plan_mix needs num_embeddings, m, d >= 1 and step counts >= 0; got {num_embeddings=}, "
            f"{m=}, {d=}, {coarse_steps=}, {fine_steps=}"
        )
    if num_embeddings < 2:
        return MixPlan(base=0)
    base = int(rng.integers(num_embeddings))
    coarse = tuple((_donor(rng, num_embeddings, base), *_cut(rng, m)) for _ in range(coarse_steps))
    fine = tuple(
        (_donor(rng, num_embeddings, base), int(rng.integers(m)), *_cut(rng, d)) for _ in range(fine_steps)
    )
    return MixPlan(base=base, coarse=coarse, fine=fine)


def needed(plan: MixPlan) -> list[int]:
    """The caption indices the plan reads: base first, then donors in step order, each once."""
    indices = [plan.base] + [step[0] for step in plan.coarse] + [step[0] for step in plan.fine]
    return list(dict.fromkeys(indices))


def apply_mix(embeddings: Mapping | Sequence, plan: MixPlan):
    """The mixed (m, d) embedding: a new array or tensor (the type of embeddings[base]); the inputs are not
    modified. `embeddings` is indexed by caption index (a dict holding only `needed(plan)` is enough).
    Steps apply in order, coarse then fine, so a later step overwrites what an earlier one copied where
    they overlap, as in Algorithm 1's sequence of in-place copies."""
    base = embeddings[plan.base]
    for index in needed(plan):
        if tuple(embeddings[index].shape) != tuple(base.shape):
            shape = tuple(embeddings[index].shape)
            raise ValueError(f"embedding {index} has shape {shape}, base {plan.base} has {tuple(base.shape)}")
    m, d = base.shape
    if any(s > m for _, _, s in plan.coarse) or any(w >= m or v > d for _, w, _, v in plan.fine):
        raise ValueError(f"the plan's slices do not fit embeddings of shape {(m, d)}: {plan.to_dict()}")
    out = base.clone() if hasattr(base, "clone") else base.copy()  # torch tensor or numpy array
    for donor, r, s in plan.coarse:
        out[r:s] = embeddings[donor][r:s]
    for donor, w, u, v in plan.fine:
        out[w, u:v] = embeddings[donor][w, u:v]
    return out
