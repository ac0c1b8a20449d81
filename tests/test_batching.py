"""Size-or-wait batching and per-video accumulation (no threads, controlled clock)."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest

from worker.engine.buffers import SizeOrWaitBuffer, VideoAccumulator


class Owner:
    def __init__(self, name: str) -> None:
        self.name = name


def frames(n: int, value: int) -> np.ndarray:
    return np.full((n, 2, 2, 3), value, np.uint8)


def test_due_when_full_before_the_wait_runs_out():
    buf: SizeOrWaitBuffer[Owner] = SizeOrWaitBuffer("image", max_size=4, max_wait=10.0)
    a = Owner("a")
    buf.add(a, frames(3, 1), now=100.0)
    assert not buf.due(100.0)
    assert buf.time_left(100.0) == pytest.approx(10.0)
    buf.add(a, frames(1, 2), now=100.5)
    assert buf.due(100.5)  # size reached: due immediately, long before 110
    assert buf.time_left(100.5) == 0.0


def test_due_after_max_wait_counted_from_the_oldest_item():
    buf: SizeOrWaitBuffer[Owner] = SizeOrWaitBuffer("image", max_size=64, max_wait=0.5)
    assert buf.time_left(0.0) is None and not buf.due(0.0)
    buf.add(Owner("a"), frames(1, 1), now=10.0)
    buf.add(Owner("b"), frames(1, 1), now=10.4)  # a newer item does not restart the clock
    assert not buf.due(10.49)
    assert buf.time_left(10.2) == pytest.approx(0.3)
    assert buf.due(10.5)
    batch = buf.take()
    assert len(batch) == 2 and len(buf) == 0
    assert buf.time_left(11.0) is None


def test_take_splits_segments_and_keeps_owner_order_across_videos():
    buf: SizeOrWaitBuffer[Owner] = SizeOrWaitBuffer("image", max_size=4, max_wait=1.0)
    a, b = Owner("a"), Owner("b")
    buf.add(a, frames(3, 10), now=0.0)
    buf.add(b, frames(3, 20), now=0.0)
    first = buf.take()
    assert first.items.shape == (4, 2, 2, 3)
    assert [(o.name, s, e) for o, s, e in first.parts] == [("a", 0, 3), ("b", 3, 4)]
    assert first.items[:3].max() == 10 and first.items[3].min() == 20
    assert len(buf) == 2
    # the rest of b's segment keeps its arrival time: it is already overdue at t=1
    assert buf.due(1.0)
    second = buf.take()
    assert [(o.name, s, e) for o, s, e in second.parts] == [("b", 0, 2)]
    assert second.owners() == [b]
    items, n = first.subset(b)
    assert n == 1 and items.min() == 20


def test_list_items_and_discard():
    buf: SizeOrWaitBuffer[Owner] = SizeOrWaitBuffer("text", max_size=8, max_wait=0.0)
    a, b, c = Owner("a"), Owner("b"), Owner("c")
    buf.add(a, ["title a"], now=0.0)
    buf.add(b, ["title b"], now=0.0)
    buf.add(c, [], now=0.0)  # nothing to add: no segment
    buf.add(a, ["again a"], now=0.0)
    assert buf.discard(a) == 2
    assert len(buf) == 1
    assert buf.due(0.0)  # max_wait 0: anything pending is due
    batch = buf.take()
    assert batch.items == ["title b"] and batch.owners() == [b]


def test_batches_are_assembled_in_the_allocators_memory():
    """On CUDA the pipeline passes a pinned-memory allocator: every array batch, one segment or several,
    is one copy into memory the allocator gave, with the items in order."""
    given: list[np.ndarray] = []

    def allocate(shape, dtype):
        given.append(np.full(shape, 255, dtype))
        return given[-1]

    buf: SizeOrWaitBuffer[Owner] = SizeOrWaitBuffer("image", max_size=5, max_wait=0.0, allocate=allocate)
    a, b = Owner("a"), Owner("b")
    frames_a = np.arange(3 * 2 * 2 * 3, dtype=np.uint8).reshape(3, 2, 2, 3)
    buf.add(a, frames_a, now=0.0)
    buf.add(b, frames_a[:1] + 100, now=0.0)
    batch = buf.take()
    assert len(given) == 1 and batch.items is given[0] and given[0].shape == (4, 2, 2, 3)
    assert np.array_equal(batch.items, np.concatenate([frames_a, frames_a[:1] + 100]))
    buf.add(a, frames_a[:2], now=0.0)
    single = buf.take()
    assert single.items is given[1] and not np.shares_memory(single.items, frames_a)
    assert np.array_equal(single.items, frames_a[:2])


def test_max_size_must_be_positive():
    with pytest.raises(ValueError):
        SizeOrWaitBuffer("x", max_size=0, max_wait=0.1)


def test_accumulator_concepts_average_the_softmax_over_frames():
    acc = VideoAccumulator(request=None, future=Future(), submitted_at=0.0)
    acc.expect("image", 3)
    acc.decode_done = True
    assert not acc.complete()
    # frame 0 and 1 strongly class 2, frame 2 strongly class 0: mean softmax ranks 2 before 0
    logits = np.full((3, 4), -20.0)
    logits[0, 2] = logits[1, 2] = logits[2, 0] = 20.0
    acc.add_image(np.ones((2, 5)), logits[:2])
    assert not acc.complete()
    acc.add_image(np.ones((1, 5)), logits[2:])
    assert acc.complete()
    concepts = acc.concepts(["c0", "c1", "c2", "c3"], top_k=2)
    assert [c["label"] for c in concepts] == ["c2", "c0"]
    assert concepts[0]["score"] == pytest.approx(2 / 3, abs=1e-6)
    assert concepts[1]["score"] == pytest.approx(1 / 3, abs=1e-6)
    image, times, audio, text = acc.stacked(5, 128, 384)
    assert image.shape == (3, 5) and audio.shape == (0, 128) and text.shape == (0, 384)


def test_accumulator_waits_for_every_modality_and_the_decode():
    acc = VideoAccumulator(request=None, future=Future(), submitted_at=0.0)
    acc.expect("audio", 2)
    acc.expect("text", 1)
    acc.add_audio(np.zeros((2, 128)))
    acc.set_text(np.zeros((4, 384)))
    assert not acc.complete()  # decode not finished yet
    acc.decode_done = True
    assert acc.complete()
    acc.finished = True
    assert not acc.complete()  # resolved videos are never fused again
