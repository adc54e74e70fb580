"""What the supervisor does once, before it forks the pipeline: allocator, kernels, privileges.

Children are forked from a supervisor that has already paid every start-up
cost a child would otherwise pay again (DESIGN.md "Data plane"): the heavy
modules are imported, every numba kernel version a child will call is
loaded (compiled, the first time on a machine), and glibc keeps freed batch
buffers for reuse. Root is given up here too, after the capture sockets are
open and before any child exists, so no child ever runs as root.
"""
from __future__ import annotations

import os

import numpy as np

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt(3) parameters
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value
TRIM_THRESHOLD = 512 << 20


def tune_allocator() -> None:
    """Keep freed batch buffers in the process for the next batch (glibc malloc).

    Every batch allocates a few arrays of megabytes (decoded packets, a
    worker's share, records). By default glibc serves those with a fresh
    ``mmap`` and unmaps them when freed, so each batch pays page faults and
    the kernel's zeroing of every page again: measured, that was three
    quarters of the time of walking a 5M-packet capture. Served from the
    heap and kept there, the same pages are reused warm. Children inherit
    the setting through fork. A libc without ``mallopt`` is left as it is.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):
        pass


def load_kernels(source_kinds: frozenset[str] | set[str] = frozenset()) -> None:
    """Load (or compile once) every numba kernel version the children will call, before forking.

    The capture path (file walks, decoding, routing), the flow table and
    the template split always; the ring walk of ``afpacket`` and the
    netlink walk of ``nflog`` when such a source is metered. The exporter
    runs no kernel, but its modules are imported here too.
    """
    from exporter import process  # noqa: F401  (imported before forking)
    from flowmeter.capture import decode, shard
    from workers import flowtable, records

    decode.warm_up()
    shard.warm_up()
    flowtable.load_kernels()
    records.to_template_batches(np.zeros(1, records.FLOW_RECORD_DTYPE))
    if "afpacket" in source_kinds:
        from flowmeter.capture.sources import afpacket

        afpacket.warm_up()
    if "nflog" in source_kinds:
        from flowmeter.capture.sources import nflog

        nflog.warm_up()


def drop_privileges(user: str, rundir: str) -> None:
    """Started as root with ``User`` set: become that user (its groups only); the runtime
    directory becomes its own, still closed to everyone else."""
    import pwd

    entry = pwd.getpwnam(user)
    os.chown(rundir, entry.pw_uid, entry.pw_gid)
    os.chmod(rundir, 0o700)
    os.initgroups(user, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = entry.pw_dir
