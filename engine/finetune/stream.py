"""The rows a fine-tuning worker draws its micro-batches from: its dataset shard streamed through a bounded
buffer, so a worker holds at most `buffer_rows` decoded images however large the dataset is.

Each rank reads its own part of the usable rows (engine.finetune.data: dealt round-robin by source id), epoch
after epoch, each epoch locally shuffled with a seed of (seed, rank, epoch). Those epochs, end to end, are the
rank's stream; stream row j is row j mod R of epoch j div R (R: the rank's row count). The buffer holds the
`size = min(R, buffer_rows)` most recent stream rows, stream row j in slot j mod size, and moves `refresh`
rows on after every optimizer step (the rows a step draws, so each row is drawn about once per pass). When
the rank's rows fit (R <= buffer_rows) the buffer holds all of them and never reads again: the few-shot case
is one read.

The buffer before step s is a function of s alone (`seek`), which is how a resumed run draws what an
uninterrupted one would: it reads from the start of the epoch the buffer's oldest row is in (at most one
epoch of reading) and refills. Draws from the buffer are the loop's (engine.finetune.loop: seeded by step,
rank and micro-batch); MVC's pairs are two rows of one class in the buffer (engine.finetune.mvc).

Written by hand rather than with a Ray Data local shuffle buffer because the loop samples with replacement
and MVC pairs rows by class, and both need random access to the rows at hand; Ray Data's buffer only yields
batches in order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import numpy as np

# One epoch of a rank: batches of numpy columns (PIXELS, label, caption), `epoch` given.
EpochReader = Callable[[int], Iterator[dict]]


def epoch_shuffle_seed(seed: int, rank: int, epoch: int) -> int:
    digest = hashlib.sha1(f"finetune\x1f{seed}\x1f{rank}\x1f{epoch}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class SampleBuffer:
    """`rows` usable rows on this rank, read by `read_epoch`; holds min(rows, capacity) of them, moves on by
    `refresh` rows per `advance()` when it cannot hold them all. `columns`: (name, dtype, shape per row)."""

    def __init__(self, read_epoch: EpochReader, rows: int, capacity: int, refresh: int, columns: list):
        if rows < 1:
            raise ValueError("a fine-tuning worker needs at least one usable row")
        self.read_epoch, self.rows = read_epoch, rows
        self.size = min(rows, capacity)
        self.refresh = refresh if rows > capacity else 0
        self.data = {name: np.empty((self.size, *shape), dtype) for name, dtype, shape in columns}
        self.position = 0  # stream rows read so far
        self._stream: Iterator[dict] | None = None
        self._pending: dict | None = None
        self.epochs_read = 0  # epochs started (a measure of reading, for the tests and the job's report)

    def seek(self, step: int) -> None:
        """Fill the buffer as it is before optimizer step `step`: it holds stream rows [end - size, end)."""
        end = self.size + step * self.refresh
        self._stream, self._pending = self._rows_from(end - self.size), None
        self.position = end - self.size
        self._take(self.size)

    def advance(self) -> None:
        """After a step: the next `refresh` stream rows replace the oldest."""
        if self.refresh:
            self._take(self.refresh)

    def _take(self, count: int) -> None:
        while count > 0:
            chunk = self._pending or next(self._stream)
            n = min(count, len(chunk["label"]))
            slots = (self.position + np.arange(n)) % self.size
            for name, column in self.data.items():
                column[slots] = chunk[name][:n]
            # The rest of the chunk comes first next time.
            self._pending = (
                {name: values[n:] for name, values in chunk.items()} if n < len(chunk["label"]) else None
            )
            self.position += n
            count -= n

    def _rows_from(self, start: int) -> Iterator[dict]:
        """Stream rows from `start` on, in chunks (numpy columns)."""
        epoch, skip = divmod(start, self.rows)
        while True:
            self.epochs_read += 1
            seen = 0
            for batch in self.read_epoch(epoch):
                n = len(batch["label"])
                seen += n
                if skip >= n:
                    skip -= n
                    continue
                yield {name: np.asarray(values)[skip:] for name, values in batch.items()}
                skip = 0
            if seen != self.rows:
                raise RuntimeError(
                    f"epoch {epoch} of this worker's rows had {seen} rows, {self.rows} were counted before "
                    "training: the dataset changed while the job ran"
                )
            epoch += 1
