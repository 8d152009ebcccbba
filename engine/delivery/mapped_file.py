"""A small file every worker maps to share counters (shared_limits.py, warmup_table.py):
created once with its header, rebuilt when its layout is another's, mapped shared.

The file's first 8 bytes are its magic (the layout's name and version); a file of
another magic or size is emptied and laid out anew under an fcntl lock on the header,
so two workers starting together agree on one layout. `MappedTable` is what every such
table holds: its descriptor (-1 for a private table, mapped anonymously) and its map.
"""

from __future__ import annotations

import fcntl
import mmap
import os


def map_shared(path: str, size: int, magic: bytes, header: bytes) -> tuple[int, mmap.mmap]:
    """(fd, read-write shared map) of the file at `path`, creating it (mode 0600) or
    laying it out anew (zeros after `header`) when its size or magic differ.

    Raises OSError when the file cannot be created or mapped.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, len(header), 0)
        try:
            if os.fstat(fd).st_size < size or os.pread(fd, len(magic), 0) != magic:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
                os.pwrite(fd, header, 0)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, len(header), 0)
        return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise


def map_readonly(path: str, size: int, magic: bytes) -> tuple[int, mmap.mmap] | None:
    """(fd, read-only map) of the file, or None when it is absent or of another layout
    (no worker has made it yet)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if os.fstat(fd).st_size < size or os.pread(fd, len(magic), 0) != magic:
            os.close(fd)
            return None
        return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise


class MappedTable:
    """The map (and descriptor, -1 when private) one table of this process holds."""

    def __init__(self, fd: int, mm: mmap.mmap) -> None:
        self._fd = fd
        self._mm = mm

    @property
    def closed(self) -> bool:
        return self._mm.closed

    def close(self) -> None:
        """Unmap and close; a table closed twice stays closed."""
        if not self._mm.closed:
            self._mm.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
