"""Batch ring: shared memory that carries a capture process's packet batches to its workers.

A ``packets`` message over ZeroMQ copies its payload twice (into the
socket, out of it) and makes the receiver allocate it again: on a 5M-packet
replay about 300 MB each way, a third of a core-second. With a ring, the
capture's routing kernel writes each worker's share of a batch straight
into shared memory and the ZeroMQ message carries only the header, which
names the slot (``PacketsHeader.slot``); the worker meters the rows where
they lie and then releases the slot.

Layout: one anonymous shared mapping per capture process, made by the
supervisor before it forks the capture and the workers (so both map the
same pages, and no file or name outlives the run):

    octets 0..4087           ``released``: int64 per worker, batches it is done with
    octets 4088..4095        ``written``: int64, batches the capture has written
    then                     ``slots`` x ``workers`` x ``rows`` of ``PACKET_DTYPE``

Batch ``seq`` of the capture uses slot ``seq % slots`` for every worker
(each batch is sent to every worker, with zero rows where it has none for
it, so the workers' counts move in step). Before writing batch ``seq`` the
capture waits until every worker has released batch ``seq - slots``: the
ring is the bounded queue between them, as the socket's high-water mark
was. A worker releases a batch by storing ``seq + 1`` in its counter (an
aligned 8-octet store: atomic on the CPUs flowmeter runs on); the capture
only reads them.

A worker that dies never releases again, and the batches on their way to
it (in its socket, in its queue) die with it. When the supervisor starts
its successor it gives up those batches for it (``give_up``): the dead
worker's counter jumps to ``written``, so the capture never waits for
them, and the new worker drops any older batch still reaching it
(``given_up``), whose slot the capture may already be writing again. The
packets of batches given up are lost, and counted as such (metered by the
capture, never by a worker).

Pages are touched only as rows are written, so a ring sized for whole
batches costs memory for the rows actually sent.
"""
from __future__ import annotations

import mmap
import time

import numpy as np
import numpy.typing as npt

from flowmeter.ipc.packets import PACKET_DTYPE

SLOTS = 8  # batches in flight between a capture process and its workers
HEADER = 4096  # octets before the slots: the release counters
WRITTEN = HEADER // 8 - 1  # int64 index of the ``written`` counter
MAX_WORKERS = WRITTEN
STALL_S = 5.0  # after a stop, a ring whose workers release nothing for this long is given up
WAIT_MIN_S = 0.00005  # a full ring is looked at again after this, doubling up to WAIT_MAX_S
WAIT_MAX_S = 0.002


class RingStalled(RuntimeError):
    """The workers stopped releasing slots while the capture was stopping (a worker is gone)."""


class BatchRing:
    """One capture process's slots for its ``workers`` (see the module notes)."""

    def __init__(self, workers: int, rows: int, slots: int = SLOTS) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers: {workers} is not between 1 and {MAX_WORKERS}")
        if rows < 1 or slots < 1:
            raise ValueError(f"rows {rows} and slots {slots} must be at least 1")
        self.workers, self.rows, self.nslots = workers, rows, slots
        self._map = mmap.mmap(-1, self.size(workers, rows, slots))  # MAP_SHARED | MAP_ANONYMOUS
        self.released = np.frombuffer(self._map, np.int64, count=workers)
        self._header = np.frombuffer(self._map, np.int64, count=HEADER // 8)
        self.slots = np.frombuffer(self._map, PACKET_DTYPE, offset=HEADER).reshape(slots, workers, rows)

    @staticmethod
    def size(workers: int, rows: int, slots: int = SLOTS) -> int:
        """Octets of the mapping (address space: pages are only used once rows are written to them)."""
        return HEADER + slots * workers * rows * PACKET_DTYPE.itemsize

    # -- the capture's side

    def slot(self, seq: int) -> npt.NDArray:
        """Batch ``seq``'s slot, ``(workers, rows)`` rows: call ``wait_free(seq)`` first."""
        return self.slots[seq % self.nslots]

    def wait_free(self, seq: int, stop=lambda: False, at_once=lambda: False, beat=lambda: None) -> float:
        """Wait until every worker has released batch ``seq - slots``; return the seconds waited.

        A worker that is merely slow (held back by the exporter) is waited
        for: that is how a replay's pace follows the slowest stage. One that
        is stuck is the supervisor's to find (it reports nothing) and
        replace, giving its batches up (``give_up``). ``stop()`` true and no release for
        ``STALL_S``, or ``at_once()`` true: ``RingStalled`` (a worker that
        stopped early never releases; one that is draining does; a stop at
        once does not wait for either). ``beat()`` is called while it waits
        (the process is alive, not hung).
        """
        need = seq - self.nslots + 1
        if need <= 0 or int(self.released.min()) >= need:
            return 0.0
        start = last_move = time.monotonic()
        seen = int(self.released.min())
        pause = WAIT_MIN_S
        while int(self.released.min()) < need:
            time.sleep(pause)
            beat()
            pause = min(2 * pause, WAIT_MAX_S)
            now = time.monotonic()
            low = int(self.released.min())
            if low != seen:
                seen, last_move = low, now
            elif at_once():
                raise RingStalled("stopped at once while waiting for the workers")
            elif stop() and now - last_move >= STALL_S:
                late = [w for w in range(self.workers) if self.released[w] < need]
                raise RingStalled(f"worker-{late[0]} took no batch for {STALL_S:.0f} s while stopping")
        return time.monotonic() - start

    @property
    def written(self) -> int:
        """Batches written so far: a capture process started again numbers its batches on from here."""
        return int(self._header[WRITTEN])

    def wrote(self, seq: int) -> None:
        """Batch ``seq`` is in its slot (before its messages are sent)."""
        self._header[WRITTEN] = seq + 1

    # -- the supervisor's side

    def give_up(self, worker: int) -> None:
        """``worker`` died: every batch written so far is given up for it (its counter jumps to ``written``)."""
        self.release(worker, self.written - 1)

    # -- a worker's side

    def rows_of(self, slot: int, worker: int, count: int) -> npt.NDArray:
        """The ``count`` rows a header names (``ValueError`` if they are not inside the ring)."""
        if not (0 <= slot < self.nslots and 0 <= worker < self.workers and 0 <= count <= self.rows):
            raise ValueError(f"slot {slot}, worker {worker}, {count} rows: not in a ring of {self.nslots} "
                             f"slots, {self.workers} workers, {self.rows} rows")
        return self.slots[slot, worker, :count]

    def given_up(self, worker: int, seq: int) -> bool:
        """Whether batch ``seq`` was given up for ``worker`` (``give_up``): its slot may be written
        again already, so the worker must not read it. (A worker releases in order, so no batch it
        has yet to take is below its own counter otherwise.)"""
        return seq < int(self.released[worker])

    def release(self, worker: int, seq: int) -> None:
        """``worker`` is done with batch ``seq`` and every one before it."""
        if self.released[worker] < seq + 1:
            self.released[worker] = seq + 1
