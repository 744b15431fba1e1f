"""The fine-tuning worker's sample buffer (engine.finetune.stream), on a fake epoch reader: what it holds,
how much it reads, and that a resumed worker's buffer is the one an uninterrupted worker had."""

from __future__ import annotations

import numpy as np
import pytest

from engine.finetune.stream import SampleBuffer, epoch_shuffle_seed

ROWS = 10
COLUMNS = [("pixels", np.uint8, (2, 2, 3)), ("label", np.int64, ()), ("caption", object, ())]


def epoch_rows(epoch: int, rows: int = ROWS) -> np.ndarray:
    """The row numbers of one epoch, in that epoch's (seeded) order."""
    return np.random.default_rng(epoch_shuffle_seed(0, 0, epoch)).permutation(rows)


def reader(rows: int = ROWS, chunk: int = 3, reads: list | None = None):
    """Epochs of `rows` rows in chunks of `chunk`: pixels all equal to the row number, label row % 3."""

    def read_epoch(epoch: int):
        if reads is not None:
            reads.append(epoch)
        order = epoch_rows(epoch, rows)
        for start in range(0, rows, chunk):
            part = order[start : start + chunk]
            yield {
                "pixels": np.broadcast_to(part[:, None, None, None], (len(part), 2, 2, 3)).astype(np.uint8),
                "label": part % 3,
                "caption": np.array([f"row {r}" for r in part], dtype=object),
            }

    return read_epoch


def held(buffer: SampleBuffer) -> list[int]:
    """The row number in each slot."""
    return buffer.data["pixels"][:, 0, 0, 0].astype(int).tolist()


def stream(length: int) -> np.ndarray:
    """The stream: the epochs end to end."""
    return np.concatenate([epoch_rows(e) for e in range(length // ROWS + 1)])[:length]


def test_rows_that_fit_are_read_once_and_all_held():
    reads = []
    buffer = SampleBuffer(reader(reads=reads), ROWS, capacity=16, refresh=4, columns=COLUMNS)
    buffer.seek(0)
    for _ in range(25):
        buffer.advance()
    assert sorted(held(buffer)) == list(range(ROWS)) and reads == [0]
    assert buffer.data["label"].tolist() == [r % 3 for r in held(buffer)]
    assert buffer.data["caption"].tolist() == [f"row {r}" for r in held(buffer)]


@pytest.mark.parametrize(("capacity", "refresh"), [(4, 3), (6, 4), (9, 1)])
def test_a_buffer_holds_the_latest_stream_rows_in_fixed_slots(capacity, refresh):
    buffer = SampleBuffer(reader(), ROWS, capacity=capacity, refresh=refresh, columns=COLUMNS)
    buffer.seek(0)
    for step in range(12):
        end = capacity + step * refresh
        expected = stream(end)
        # stream row j lives in slot j mod capacity
        assert held(buffer) == [
            int(expected[j]) for j in sorted(range(end - capacity, end), key=lambda j: j % capacity)
        ]
        buffer.advance()


def test_a_resumed_buffer_is_the_uninterrupted_one_and_reads_from_its_epoch_only():
    uninterrupted = SampleBuffer(reader(), ROWS, capacity=4, refresh=3, columns=COLUMNS)
    uninterrupted.seek(0)
    for step in range(1, 15):
        uninterrupted.advance()
        reads = []
        resumed = SampleBuffer(reader(reads=reads), ROWS, capacity=4, refresh=3, columns=COLUMNS)
        resumed.seek(step)
        assert held(resumed) == held(uninterrupted), step
        first = (step * 3) // ROWS  # the epoch of the buffer's oldest row
        assert reads[0] == first and len(reads) <= 2
        # and both go on alike
        resumed.advance()
        uninterrupted_next = SampleBuffer(reader(), ROWS, capacity=4, refresh=3, columns=COLUMNS)
        uninterrupted_next.seek(step + 1)
        assert held(resumed) == held(uninterrupted_next)


def test_every_row_is_streamed_once_per_epoch():
    buffer = SampleBuffer(reader(), ROWS, capacity=4, refresh=2, columns=COLUMNS)
    buffer.seek(0)
    seen = list(held(buffer))
    for _ in range(13):  # 4 + 13 * 2 = 30 rows: three epochs
        buffer.advance()
        seen += [held(buffer)[(buffer.position - 2 + k) % 4] for k in range(2)]
    for epoch in range(3):
        assert sorted(seen[epoch * ROWS : (epoch + 1) * ROWS]) == list(range(ROWS))


def test_an_epoch_of_another_length_is_an_error():
    buffer = SampleBuffer(reader(rows=ROWS - 1), ROWS, capacity=4, refresh=4, columns=COLUMNS)
    buffer.seek(0)
    with pytest.raises(RuntimeError, match="had 9 rows, 10 were counted before training"):
        for _ in range(5):
            buffer.advance()


def test_a_worker_without_rows_is_refused():
    with pytest.raises(ValueError, match="at least one usable row"):
        SampleBuffer(reader(), 0, capacity=4, refresh=1, columns=COLUMNS)
