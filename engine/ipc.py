"""Single-producer single-consumer shared-memory queue of msgspec messages (Linux).

A segment is a header of four uint64 words, each on its own cache line so that the two ends never write
the same line, followed by a ring of `capacity` bytes:

    head               bytes ever written; written only by the producer
    tail               bytes ever consumed; written only by the consumer
    consumer_sleeping  1 while the consumer waits for data; written only by the consumer
    producer_sleeping  1 while the producer waits for room; written only by the producer

Both counters only grow, so `head - tail` is the fill level and there is no full/empty ambiguity. A record
is a uint32 payload length, the msgpack payload and padding to 8 bytes. Records start 8-aligned and the
capacity is a multiple of 8, so a length prefix never straddles the end of the ring; a payload that does
simply continues at offset 0. Hence any message whose record fits the capacity fits an empty ring.

Memory ordering. Each word has a single writer and is read/written as one aligned 8-byte memoryview item
(a single mov), so a reader sees either the old or the new value, never a mix. x86 (TSO) keeps stores in
program order and loads in program order, which is all publishing needs: the producer writes the payload,
then stores head, so a consumer that loads the new head and then reads the payload sees all of it; the
consumer reads a payload before it stores tail, so the producer never overwrites unread bytes. (A weakly
ordered CPU such as ARM would need barriers here; this module assumes x86-64.)

Wake-ups, without a syscall per message: each direction has an eventfd and a sleeping flag.
  sleeper: set flag=1; full fence; re-check the condition; only if still unmet, wait on the eventfd.
  waker:   publish head (or tail); full fence; if the peer's flag is 1, write the eventfd.
Either the sleeper's re-check sees the new counter or the waker sees flag=1 (the fences forbid both reading
the old value), so no wake-up is lost. The eventfd counter is sticky, so a signal sent before the sleeper
actually blocks still wakes it; spurious wake-ups only cost one re-check.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import queue
import secrets
import select
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.reduction import DupFd
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Callable

import msgspec

_HEAD, _TAIL, _CONSUMER_SLEEPING, _PRODUCER_SLEEPING = 0, 8, 16, 24  # uint64 indices, 64 bytes apart
_HEADER_BYTES = 256
_LEN_BYTES = 4
# Segment names carry the creating process's pid, so that segments orphaned by a SIGKILL of the whole
# process group (which takes the resource tracker with it) can be recognised and removed later.
SEGMENT_PREFIX = "halffull_"

# x86 may let a load pass an earlier store (the store buffer), and the sleep/wake handshake above needs
# exactly that store->load order. Every locked instruction is a full barrier on x86, and taking and
# releasing an uncontended lock is one (a compare-and-swap), so this is the cheapest full fence Python has.
_FENCE_LOCK = threading.Lock()


def _full_fence() -> None:
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()


@dataclass
class QueueSpec:
    """What another process needs to attach to a queue. Picklable; the eventfds travel as fds."""

    name: str
    capacity: int
    data_fd: int  # signalled by the producer: data is available
    space_fd: int  # signalled by the consumer: room was freed
    # True when the fds arrived by unpickling, so they belong to this spec: the first attach takes them over.
    _adopt: bool = field(default=False, repr=False, compare=False)

    def __reduce__(self):
        # With a spawn/forkserver Process, DupFd adds the fds to those the child inherits; otherwise (e.g.
        # sent over a multiprocessing Pipe) resource_sharer passes them over a unix socket.
        return _rebuild_spec, (self.name, self.capacity, DupFd(self.data_fd), DupFd(self.space_fd))


def _rebuild_spec(name: str, capacity: int, data_fd, space_fd) -> QueueSpec:
    return QueueSpec(name, capacity, data_fd.detach(), space_fd.detach(), _adopt=True)


class ShmQueue:
    """One end of an SPSC queue. Make it with `create` (owner) or `attach` (any other end).

    One producer (put, put_async) and one consumer (get*, drain); each end is used by one thread or task
    at a time. Do not decode into msgspec.Raw or memoryview fields: they would point into the ring.
    """

    def __init__(self, spec: QueueSpec, msg_type: Any, buf: memoryview, fds: tuple[int, int],
                 shm: SharedMemory | None = None, mm: mmap.mmap | None = None):
        self.spec = spec
        self.capacity = spec.capacity
        self._shm, self._mm, self._buf = shm, mm, buf
        self._hdr = buf[:_HEADER_BYTES].cast("Q")
        self._ring = buf[_HEADER_BYTES:_HEADER_BYTES + spec.capacity]
        self._lens = self._ring.cast("I")
        self._data_fd, self._space_fd = fds
        self._data_poll, self._space_poll = select.poll(), select.poll()
        self._data_poll.register(self._data_fd, select.POLLIN)
        self._space_poll.register(self._space_fd, select.POLLIN)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(msg_type)
        self._closed = False

    @classmethod
    def create(cls, capacity_bytes: int = 1 << 20, msg_type: Any = Any) -> ShmQueue:
        capacity = (capacity_bytes + 7) & ~7
        if not 8 <= capacity < 1 << 32:
            raise ValueError(f"capacity_bytes must be in [8, 2**32), got {capacity_bytes}")
        # shm_open with mode 0600, zero-filled; the owner stays registered with the resource tracker, which
        # unlinks the segment if this process dies without unlink().
        shm = SharedMemory(f"{SEGMENT_PREFIX}{os.getpid()}_{secrets.token_hex(8)}", create=True,
                           size=_HEADER_BYTES + capacity)
        flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
        spec = QueueSpec(shm.name, capacity, os.eventfd(0, flags), os.eventfd(0, flags))
        return cls(spec, msg_type, shm.buf, (spec.data_fd, spec.space_fd), shm=shm)

    @classmethod
    def attach(cls, spec: QueueSpec, msg_type: Any = Any) -> ShmQueue:
        if spec._adopt:
            spec._adopt = False
            fds = (spec.data_fd, spec.space_fd)
        else:  # the fds belong to someone else in this process (e.g. the owner): each end closes its own
            fds = (os.dup(spec.data_fd), os.dup(spec.space_fd))
        # Map the file directly rather than through SharedMemory(name): on Python < 3.13 that registers
        # the segment with the resource tracker, and unregistering it again would also cancel the owner's
        # registration whenever both share one tracker (always so for spawn children: the tracker keeps
        # a set of names).
        fd = os.open(f"/dev/shm/{spec.name}", os.O_RDWR | os.O_NOFOLLOW)
        try:
            mm = mmap.mmap(fd, _HEADER_BYTES + spec.capacity)
        finally:
            os.close(fd)
        return cls(spec, msg_type, memoryview(mm), fds, mm=mm)

    # ---- producer ----

    def put(self, msg: Any, timeout: float | None = None) -> None:
        """Append `msg`, waiting up to `timeout` seconds (None: forever) for room; raise queue.Full."""
        data = self._encoder.encode(msg)
        record = self._record_size(len(data))
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._try_write(data, record):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if remaining == 0.0:
                raise queue.Full
            self._wait(_PRODUCER_SLEEPING, self._space_poll, self._space_fd,
                       lambda: self._free() >= record, remaining)

    async def put_async(self, msg: Any) -> None:
        data = self._encoder.encode(msg)
        record = self._record_size(len(data))
        while not self._try_write(data, record):
            await self._wait_async(_PRODUCER_SLEEPING, self._space_fd, lambda: self._free() >= record)

    def _record_size(self, n: int) -> int:
        record = (_LEN_BYTES + n + 7) & ~7
        if record > self.capacity:
            raise ValueError(f"message of {n} bytes does not fit a queue of {self.capacity} bytes")
        return record

    def _free(self) -> int:
        return self.capacity - (self._hdr[_HEAD] - self._hdr[_TAIL])

    def _try_write(self, data: bytes, record: int) -> bool:
        hdr, cap, ring = self._hdr, self.capacity, self._ring
        head = hdr[_HEAD]
        if cap - (head - hdr[_TAIL]) < record:
            return False
        pos = head % cap
        n = len(data)
        self._lens[pos >> 2] = n
        start = pos + _LEN_BYTES
        if start + n <= cap:
            ring[start:start + n] = data
        else:  # the payload straddles the end of the ring and continues at offset 0
            first = cap - start
            view = memoryview(data)
            ring[start:] = view[:first]
            ring[:n - first] = view[first:]
        hdr[_HEAD] = head + record
        _full_fence()
        if hdr[_CONSUMER_SLEEPING]:
            os.eventfd_write(self._data_fd, 1)
        return True

    # ---- consumer ----

    def get(self, timeout: float | None = None) -> Any:
        """Next message, waiting up to `timeout` seconds (None: forever); raise queue.Empty."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (msgs := self._read(1)):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if remaining == 0.0:
                raise queue.Empty
            self._wait(_CONSUMER_SLEEPING, self._data_poll, self._data_fd, self._readable, remaining)
        return msgs[0]

    def get_nowait(self) -> Any:
        return self.get(timeout=0)

    def drain(self) -> list[Any]:
        """All messages available now, possibly none."""
        return self._read(None)

    async def get_async(self) -> Any:
        while not (msgs := self._read(1)):
            await self._wait_async(_CONSUMER_SLEEPING, self._data_fd, self._readable)
        return msgs[0]

    async def get_many_async(self) -> list[Any]:
        """All messages available, waiting until there is at least one."""
        while not (msgs := self._read(None)):
            await self._wait_async(_CONSUMER_SLEEPING, self._data_fd, self._readable)
        return msgs

    def _readable(self) -> bool:
        return self._hdr[_HEAD] != self._hdr[_TAIL]

    def _read(self, limit: int | None) -> list[Any]:
        hdr, cap = self._hdr, self.capacity
        tail = start_tail = hdr[_TAIL]
        head = hdr[_HEAD]
        msgs: list[Any] = []
        try:
            while tail != head and (limit is None or len(msgs) < limit):
                pos = tail % cap
                n = self._lens[pos >> 2]
                record = (_LEN_BYTES + n + 7) & ~7
                try:
                    msg = self._decode_at(pos + _LEN_BYTES, n)
                except msgspec.DecodeError:
                    if msgs:  # hand out the good ones; the bad record raises on the next call
                        break
                    tail += record  # skip it so that one bad record cannot wedge the queue
                    raise
                msgs.append(msg)
                tail += record
        finally:
            if tail != start_tail:
                hdr[_TAIL] = tail
                _full_fence()
                if hdr[_PRODUCER_SLEEPING]:
                    os.eventfd_write(self._space_fd, 1)
        return msgs

    def _decode_at(self, start: int, n: int) -> Any:
        ring, cap = self._ring, self.capacity
        if start + n > cap:  # a payload that wraps is joined into one copy
            return self._decoder.decode(bytes(ring[start:]) + bytes(ring[:start + n - cap]))
        # Decode in place; the view is released even if decoding fails, so that a traceback kept by the
        # caller cannot pin the mapping and make close() fail.
        with ring[start:start + n] as payload:
            return self._decoder.decode(payload)

    # ---- waiting (protocol in the module docstring) ----

    def _wait(self, flag: int, poll: select.poll, fd: int, ready: Callable[[], bool],
              timeout: float | None) -> None:
        self._hdr[flag] = 1
        _full_fence()
        try:
            if not ready() and poll.poll(None if timeout is None else timeout * 1000):
                _clear(fd)
        finally:
            self._hdr[flag] = 0

    async def _wait_async(self, flag: int, fd: int, ready: Callable[[], bool]) -> None:
        self._hdr[flag] = 1
        _full_fence()
        try:
            if ready():
                return
            loop = asyncio.get_running_loop()
            woken = loop.create_future()
            loop.add_reader(fd, _resolve, woken)
            try:
                await woken
            finally:
                loop.remove_reader(fd)
            _clear(fd)
        finally:
            self._hdr[flag] = 0

    # ---- lifecycle ----

    def close(self) -> None:
        """Release this end's mapping and fds. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for view in (self._lens, self._ring, self._hdr):
            view.release()
        if self._shm is not None:
            self._shm.close()
        else:
            self._buf.release()
            self._mm.close()
        os.close(self._data_fd)
        os.close(self._space_fd)

    def unlink(self) -> None:
        """Remove the segment's name (owner only); mappings stay valid until closed."""
        if self._shm is None:
            raise RuntimeError("only the end that created the queue unlinks it")
        self._shm.unlink()


def remove_orphaned_segments() -> list[str]:
    """Unlink this user's queue segments whose creating process is gone; returns their names.
    Liveness is judged in this process's pid namespace, so processes that share a /dev/shm must share
    that too (as they do unless /dev/shm is mounted into several containers)."""
    removed = []
    for entry in os.scandir("/dev/shm"):
        name = entry.name
        if not name.startswith(SEGMENT_PREFIX):
            continue
        pid = name[len(SEGMENT_PREFIX):].split("_", 1)[0]
        try:
            if not pid.isdigit() or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)  # raises if no such process; a live one (or a reused pid) keeps its segments
        except ProcessLookupError:
            try:
                os.unlink(entry.path)
                removed.append(name)
            except FileNotFoundError:
                pass  # another server swept it first
        except OSError:
            continue  # alive but someone else's (EPERM), or the entry vanished
    return removed


def _clear(fd: int) -> None:
    try:
        os.eventfd_read(fd)  # resets the counter
    except BlockingIOError:
        pass


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
