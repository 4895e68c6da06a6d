"""SSE stream slots: bounded per job and in total; a slot given back twice is given back once."""

from __future__ import annotations

from imagegen.api.deps import StreamSlots


def test_slots_are_bounded_per_job_and_in_total() -> None:
    slots = StreamSlots(total=3, per_job=2)
    a1, a2 = slots.acquire("a"), slots.acquire("a")
    assert a1 and a2 and slots.acquire("a") is None  # per job
    b1 = slots.acquire("b")
    assert b1 and slots.acquire("c") is None  # in total
    a1()
    a1()  # a stream that ends twice (its generator and its response both say so) frees one slot
    assert slots.acquire("c") is not None and slots.acquire("d") is None
