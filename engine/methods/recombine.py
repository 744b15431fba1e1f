"""De-DA's online recombination: a CDP pasted onto a CIP of another class, made in the data pipeline each epoch
and never stored.

Which samples become composites, and with which CDP, is the driver's plan (engine.train.mixing.select_deda);
the training data pipeline (engine.train.data) and the gallery (engine.run.gallery) call `compose`.
Which CIP a composite gets, and the paste's flip / scale / position, the decode task draws from the row's own
seed (engine.train.data.row_seed of seed, epoch, row id and draw), so an epoch's composites are the same on
any number of workers.

The CIPs reach the workers as one `CipBank` in the object store (an Arrow table: ids, labels and encoded
images, read zero-copy by every decode task), rather than as (CDP, CIP) pairs joined per epoch: a pair join
would shuffle every CIP through the pipeline each epoch, while the bank is read once per run. Its cost is
the CIPs' encoded bytes in the object store (the toy's 400 CIPs: under 1 MB; ImageNet's 1.28 M would be about
140 GB, where a per-class sample of the CIPs would be the next step).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import schema
from engine.config import PasteConfig
from engine.methods.paste import CompositeRowError, composite_one

COMPOSITE_PARTS = (schema.PART_CDP, schema.PART_CDP_EDITED)  # rows the pipeline turns into composites


@dataclass(frozen=True)
class CipBank:
    """Every CIP of the train split: `table` holds id, label and image (encoded), sorted by id."""

    table: pa.Table

    @classmethod
    def read(cls, files: list[str], ids: np.ndarray) -> CipBank:
        """The rows of `files` whose id is in `ids` (the CIP rows the driver's index selected)."""
        wanted = pa.array(sorted(str(i) for i in ids), pa.string())
        tables = [
            pq.read_table(
                file,
                columns=[schema.ID, schema.LABEL, schema.IMAGE],
                filters=pc.is_in(pc.field(schema.ID), wanted),
            )
            for file in files
        ]
        table = pa.concat_tables(tables).sort_by(schema.ID)
        return cls(table.set_column(1, schema.LABEL, table[schema.LABEL].cast(pa.int64())))

    def __len__(self) -> int:
        return len(self.table)

    @cached_property
    def labels(self) -> np.ndarray:
        # Once per bank object (a decode task's batch), not once per composite.
        return self.table[schema.LABEL].to_numpy()

    def draw(self, label: int, rng: np.random.Generator) -> int:
        """A CIP of a class other than `label`, uniform over them; -1 when there is none."""
        others = np.flatnonzero(self.labels != label)
        return int(others[rng.integers(len(others))]) if len(others) else -1

    def image(self, position: int) -> np.ndarray:
        data = np.frombuffer(self.table[schema.IMAGE][position].as_py(), np.uint8)
        return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def place_on_canvas(
    cdp: np.ndarray, mask: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """The CDP and its mask centred on a height x width canvas (shrunk to fit when larger), which the
    compositor then moves, flips and scales."""
    h, w = cdp.shape[:2]
    scale = min(1.0, height / h, width / w)
    if scale < 1.0:
        size = (max(1, int(w * scale)), max(1, int(h * scale)))
        cdp = cv2.resize(cdp, size, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
        h, w = cdp.shape[:2]
    y, x = (height - h) // 2, (width - w) // 2
    image = np.zeros((height, width, 3), np.uint8)
    canvas = np.zeros((height, width), np.uint8)
    image[y : y + h, x : x + w] = cdp
    canvas[y : y + h, x : x + w] = mask
    return image, canvas


def compose(
    cdp: np.ndarray, mask: np.ndarray, label: int, bank: CipBank, rng: np.random.Generator, paste: PasteConfig
) -> tuple[np.ndarray, int]:
    """The CDP (HxWx3 uint8, its mask HxW 0/255) pasted onto a CIP of another class drawn from `rng`, at the
    CIP's size; returns the composite and the CIP's position in the bank (-1, and the CDP unchanged, when the
    bank holds no other class's CIP)."""
    position = bank.draw(label, rng)
    if position < 0:
        return cdp, -1
    cip = bank.image(position)
    image, canvas = place_on_canvas(cdp, mask, *cip.shape[:2])
    seed = int(rng.integers(2**31))
    try:
        composite, _, _, _ = composite_one(image, canvas, cip, seed, paste)
    except CompositeRowError:  # the subject vanished at the drawn scale: paste it as placed, unscaled
        composite = np.where(canvas[..., None] > 127, image, cip)
    return composite, position
