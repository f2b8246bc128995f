"""Tests for engine/ipc.py: the shared-memory SPSC queue."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue
import random
import subprocess
import sys
import threading
import time

import msgspec
import pytest

from engine.ipc import ShmQueue

SPAWN = mp.get_context("spawn")


class Item(msgspec.Struct, tag=True):
    seq: int
    blob: bytes = b""


class Note(msgspec.Struct, tag=True):
    text: str
    values: list[float] = []


Msg = Item | Note


def _shm_path(q: ShmQueue) -> str:
    return f"/dev/shm/{q.spec.name}"


@pytest.fixture
def make_queue():
    made = []

    def make(capacity: int = 1 << 16, msg_type=Msg) -> ShmQueue:
        q = ShmQueue.create(capacity_bytes=capacity, msg_type=msg_type)
        made.append(q)
        return q

    yield make
    for q in made:
        q.close()
        if os.path.exists(_shm_path(q)):
            q.unlink()


def test_round_trip_typed(make_queue):
    owner = make_queue()
    peer = ShmQueue.attach(owner.spec, Msg)
    try:
        sent = [Item(1, b"\x00\xff"), Note("héllo", [1.5, -2.0]), Item(2)]
        for m in sent:
            owner.put(m)
        assert peer.get(timeout=1) == sent[0]
        rest = peer.drain()
        assert rest == sent[1:] and isinstance(rest[0], Note)
        assert peer.drain() == []
        with pytest.raises(queue.Empty):
            peer.get_nowait()
        with pytest.raises(queue.Empty):
            peer.get(timeout=0.01)
        peer.put(Note("back"))  # either end may be producer or consumer
        assert owner.get_nowait() == Note("back")
    finally:
        peer.close()


def test_decode_error_skips_only_the_bad_record(make_queue):
    q = make_queue(msg_type=Item)
    q.put(Item(1))
    q.put(Note("not an Item"))
    q.put(Item(2))
    assert q.drain() == [Item(1)]
    with pytest.raises(msgspec.ValidationError) as excinfo:
        q.drain()
    assert q.drain() == [Item(2)]
    q.close()  # the kept traceback must not pin the mapping
    assert excinfo.value


def test_wraparound_random_sizes(make_queue):
    q = make_queue(capacity=1000)  # rounded to 1000; not a power of two on purpose
    rng = random.Random(0)
    sent, got = [], []
    for seq in range(5000):
        m = Item(seq, rng.randbytes(rng.randrange(0, 400)))
        while True:
            try:
                q.put(m, timeout=0)
                break
            except queue.Full:
                got.extend(q._read(rng.randrange(1, 4)))  # free a little room at a time
        sent.append(m)
    got.extend(q.drain())
    assert got == sent
    assert q._hdr[0] > 200 * q.capacity  # went around the ring many times


def test_oversize_message(make_queue):
    q = make_queue(capacity=256)
    with pytest.raises(ValueError):
        q.put(Item(0, bytes(300)), timeout=1)  # a bug would show as Full, not as a hang
    # The largest message that fits: 4-byte length + payload == capacity, even from a mid-ring position.
    q.put(Item(0, b"x" * 8))
    q.get_nowait()
    big = Item(1, b"y" * 100)
    while len(msgspec.msgpack.encode(big)) < 252:
        big.blob += b"y"
    assert len(msgspec.msgpack.encode(big)) == 252
    q.put(big, timeout=0)
    assert q.get_nowait() == big
    with pytest.raises(ValueError):
        ShmQueue.create(capacity_bytes=0)


def test_back_pressure_threads(make_queue):
    owner = make_queue(capacity=512)
    producer = ShmQueue.attach(owner.spec, Msg)
    n, progress = 2000, []

    def produce():
        for i in range(n):
            producer.put(Item(i, bytes(i % 50)))
            progress.append(i)

    t = threading.Thread(target=produce)
    t.start()
    try:
        time.sleep(0.3)  # slow consumer: the producer must be stuck on a full ring
        assert 0 < len(progress) < 60 and t.is_alive()
        got = []
        while len(got) < n:
            got.extend(m.seq for m in [owner.get(timeout=5)] + owner.drain())
            time.sleep(0.0001 * (len(got) % 3))
        t.join(5)
        assert got == list(range(n))
        assert owner.drain() == []
    finally:
        t.join(5)
        producer.close()


def test_put_timeout_raises_full(make_queue):
    q = make_queue(capacity=256)
    while True:
        try:
            q.put(Item(0), timeout=0)  # fill to the last byte
        except queue.Full:
            break
    t0 = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(Item(1), timeout=0.05)
    assert time.monotonic() - t0 >= 0.04
    q.get_nowait()
    q.put(Item(1), timeout=0.05)  # room again


def test_asyncio_consumer_and_producer(make_queue):
    to_loop = make_queue(capacity=1024)
    from_loop = make_queue(capacity=1024)
    n = 3000

    def feeder():
        for i in range(n):
            to_loop.put(Item(i))
            if i % 500 == 0:
                time.sleep(0.02)  # let the loop fall asleep now and then

    received = []

    def sink():
        while len(received) < n:
            received.append(from_loop.get(timeout=5).seq)

    async def main():
        got = []
        while len(got) < n:
            batch = await asyncio.wait_for(to_loop.get_many_async(), 5)
            assert batch
            got.extend(m.seq for m in batch)
        assert got == list(range(n))
        for i in range(n):  # small ring: put_async must wait for the sink thread
            await asyncio.wait_for(from_loop.put_async(Item(i)), 5)
        single = asyncio.ensure_future(to_loop.get_async())
        await asyncio.sleep(0.05)
        assert not single.done()
        to_loop.put(Note("late"))
        assert await asyncio.wait_for(single, 5) == Note("late")

    threads = [threading.Thread(target=feeder), threading.Thread(target=sink)]
    for t in threads:
        t.start()
    asyncio.run(main())
    for t in threads:
        t.join(5)
    assert received == list(range(n))


def _child_echo(requests_spec, replies_spec, count):
    """Spawned child: read requests with asyncio, echo each back (blocking put), in order."""
    requests = ShmQueue.attach(requests_spec, Msg)
    replies = ShmQueue.attach(replies_spec, Msg)

    async def run():
        seen = 0
        while seen < count:
            for m in await requests.get_many_async():
                assert m.seq == seen
                replies.put(Item(m.seq * 2))
                seen += 1

    asyncio.run(run())
    replies.put(Note("done"))
    requests.close()
    replies.close()


def test_spawn_child_ordering_100k(make_queue):
    requests = make_queue(capacity=1 << 14)  # small rings: back-pressure across processes both ways
    replies = make_queue(capacity=1 << 14)
    n = 100_000
    child = SPAWN.Process(target=_child_echo, args=(requests.spec, replies.spec, n))
    child.start()

    def send():
        for i in range(n):
            requests.put(Item(i), timeout=20)

    sender = threading.Thread(target=send)
    sender.start()
    got = 0
    try:
        while got < n:
            m = replies.get(timeout=20)
            assert m == Item(got * 2)
            got += 1
        assert replies.get(timeout=20) == Note("done")
    finally:
        sender.join(20)
        child.join(20)
    assert child.exitcode == 0
    # The child attached and exited: the segments must still be there, and still work.
    assert os.path.exists(_shm_path(requests)) and os.path.exists(_shm_path(replies))
    replies.put(Item(7))
    assert replies.get_nowait() == Item(7)


def test_segment_mode_and_unlink():
    q = ShmQueue.create(capacity_bytes=4096, msg_type=Msg)
    path = _shm_path(q)
    assert os.stat(path).st_mode & 0o777 == 0o600
    peer = ShmQueue.attach(q.spec, Msg)
    with pytest.raises(RuntimeError):
        peer.unlink()
    peer.close()
    peer.close()  # idempotent
    assert os.path.exists(path)
    q.close()
    q.unlink()
    assert not os.path.exists(path)


_CRASHING_OWNER = """
import os, sys
from engine.ipc import ShmQueue
q = ShmQueue.create(capacity_bytes=4096)
print(q.spec.name, flush=True)
os._exit(1)
"""


def test_crashed_owner_segment_is_removed():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _CRASHING_OWNER], cwd=root, capture_output=True,
                         text=True, timeout=20)
    path = f"/dev/shm/{out.stdout.strip()}"
    deadline = time.monotonic() + 10  # the resource tracker cleans up once the owner is gone
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.stdout.strip() and not os.path.exists(path)


if __name__ == "__main__":
    q = ShmQueue.create(capacity_bytes=1 << 20, msg_type=Item)
    n, blob = 200_000, bytes(64)
    t0 = time.perf_counter()
    for start in range(0, n, 1000):
        for i in range(start, start + 1000):
            q.put(Item(i, blob))
        q.drain()
    dt = time.perf_counter() - t0
    print(f"in-process put+drain: {n / dt / 1e3:.0f}k msgs/s ({dt / n * 1e6:.2f} us/msg)")
    q.close()
    q.unlink()
