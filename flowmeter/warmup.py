"""What the supervisor does once, before it forks the pipeline: allocator, kernels, privileges.

Children are forked from a supervisor that has already paid every start-up
cost a child would otherwise pay again (DESIGN.md "Data plane"): the heavy
modules are imported, every numba kernel version a child will call is
loaded (compiled, the first time on a machine), and glibc keeps freed batch
buffers for reuse. LLVM's own code, which loading the kernels touched and
nothing calls afterwards, is unmapped once the children are started
(``release_compiler_pages``), so no process holds it at rest. Root is given up here too, after the capture sockets are
open and before any child exists, so no child ever runs as root; and so is
every capability (``drop_capabilities``): an open packet or netlink socket
keeps working without the capability that opened it, so nothing after the
opening needs one.
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


COMPILER_LIBRARY = "libllvmlite"  # LLVM, as numba's llvmlite ships it (one shared library)


def _read_only_file_mappings(name: str) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of a file whose name starts with ``name`` that are
    not writable and hold no page of their own (``Anonymous: 0``: nothing was relocated or written
    in them): their pages are the file's, as read from the page cache."""
    out, current = [], None
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 5)  # the path, the last field, may hold spaces
                if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):  # a mapping's first line
                    current = None
                    path = head[5].strip() if len(head) > 5 else ""
                    if os.path.basename(path).startswith(name) and "w" not in head[1]:
                        start, end = head[0].split("-")
                        current = (int(start, 16), int(end, 16))
                elif current is not None and head[0] == "Anonymous:":
                    if int(head[1]) == 0:
                        out.append(current)
                    current = None
    except OSError:
        return []
    return out


def release_compiler_pages() -> int:
    """Unmap LLVM's code and read-only data from this process once the kernels are loaded; the octets
    of mappings released.

    Starting LLVM runs its static initializers, spread over its 80 MB of
    machine code: about 50-70 MB of it end up mapped in the process that
    loaded the kernels, and stay mapped (and counted in its PSS, the
    supervisor's) although a loaded kernel is machine code of its own and
    never calls into LLVM again. ``MADV_DONTNEED`` drops these mappings'
    page-table entries only: the pages stay in the page cache, and a later
    compile (a kernel version not loaded here) maps what it needs again.
    Only mappings that hold none of the process's own pages are released
    (see ``_read_only_file_mappings``), so nothing written is lost. A fork
    copies no page-table entry of such a mapping (a child maps what it
    touches itself), so the supervisor releases them after starting its
    children, off the start-up's path: reading ``/proc/self/smaps`` and the
    release take a few milliseconds.
    """
    import ctypes
    import mmap

    ranges = _read_only_file_mappings(COMPILER_LIBRARY)
    if not ranges:
        return 0
    try:
        libc = _libc()
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    released = 0
    for start, end in ranges:
        if madvise(start, end - start, mmap.MADV_DONTNEED) == 0:
            released += end - start
    return released


PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 24, 47, 4  # prctl(2)
_LINUX_CAPABILITY_VERSION_3 = 0x20080522  # capget(2): two 32-bit words per set
_CAP_LAST_CAP = "/proc/sys/kernel/cap_last_cap"


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def drop_bounding_set() -> None:
    """As root, before becoming ``User``: no capability can come back later, not even through
    a program run with file capabilities (PR_CAPBSET_DROP needs CAP_SETPCAP, which only root
    holds here; without it ``PR_SET_NO_NEW_PRIVS`` alone closes that door)."""
    libc = _libc()
    try:
        with open(_CAP_LAST_CAP) as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            import ctypes

            if ctypes.get_errno() != 22:  # EINVAL: a number this kernel does not know
                _check(-1, f"prctl(PR_CAPBSET_DROP, {cap})")


def drop_capabilities() -> None:
    """Keep no capability and let no exec give one back: ambient, inheritable, permitted and
    effective sets emptied, and ``PR_SET_NO_NEW_PRIVS`` set (inherited by every child).

    Called once the sources that need a capability are open and before any
    child is forked. A unit started with ambient CAP_NET_RAW/CAP_NET_ADMIN
    (deploy/systemd) needs them only for ``socket(AF_PACKET)`` and for
    binding an NFLOG group; a capture process started again after a crash
    reuses the sockets this process opened, and a feed needs none. Emptying
    a set is always allowed, so this works for any user.
    """
    import ctypes

    libc = _libc()
    _check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)  # version, pid 0: this thread
    data = (ctypes.c_uint32 * 6)()  # {effective, permitted, inheritable} x 2, all zero
    _check(libc.capset(header, data), "capset")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def drop_privileges(user: str, rundir: str, groups: tuple[str, ...] = ()) -> None:
    """Started as root with ``User`` set: become that user, with its own group and, as supplementary
    groups, only ``groups`` (the profile's ``Groups``; not the user's memberships in /etc/group); the
    runtime directory becomes its own, still closed to everyone else. The bounding set goes first,
    while root may still drop it; the caller then drops every capability (``drop_capabilities``)."""
    import grp
    import pwd

    entry = pwd.getpwnam(user)
    gids = sorted({grp.getgrnam(name).gr_gid for name in groups})
    drop_bounding_set()
    os.chown(rundir, entry.pw_uid, entry.pw_gid)
    os.chmod(rundir, 0o700)
    os.setgroups(gids)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = entry.pw_dir
