"""Giving freed heap memory back to the system while ``fireflow serve`` runs.

glibc's malloc keeps memory freed after a big transient allocation (a decoded upload, a parsed
request) in its heap, so a server's RSS stays at its peak. :class:`HeapTrimmer` watches glibc's
count of free heap bytes, and the process's RSS, and calls ``malloc_trim(0)`` when either has grown.
Only ``fireflow serve`` starts one; elsewhere (not glibc, or glibc before 2.33 without
``mallinfo2``) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import Any

#: Bytes of growth since the last trim (or the lowest count seen since) that call for a trim: of
#: free heap bytes, or of RSS while the heap has at least this much free.
TRIM_GROWTH = 32 << 20
#: Seconds between two looks at the heap.
TRIM_EVERY_S = 1.0
#: The name of the thread, so that it can be told apart (and tests can find it).
THREAD_NAME = "fireflow-heap-trim"


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (all ``size_t``); ``fordblks`` is the free bytes in the heap."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def glibc() -> Any | None:
    """This process's C library when it is glibc with ``mallinfo2`` and ``malloc_trim``; None elsewhere."""
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process, the C library's among them
        mallinfo2, malloc_trim = libc.mallinfo2, libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # musl, macOS, Windows (TypeError: no NULL handle)
        return None
    mallinfo2.restype, mallinfo2.argtypes = _MallInfo2, []
    malloc_trim.restype, malloc_trim.argtypes = ctypes.c_int, [ctypes.c_size_t]
    return libc


def rss_bytes() -> int | None:
    """This process's resident set size (None where /proc cannot tell)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """A daemon thread calling ``malloc_trim(0)`` when glibc's free heap bytes grew by more than
    ``growth`` since the last trim (or since the lowest count seen after it: memory reused, then
    freed again, counts as grown), or when RSS did while more than ``growth`` of the heap is free.
    ``with HeapTrimmer(): ...`` runs it for the block's duration.

    The second rule is for memory that a look never sees in use: trimmed free pages reused by a
    request and freed again within a second leave the free count as it was, and RSS higher (a
    4096x4096 mask: 214 MB, measured). ``libc`` (anything with ``mallinfo2()`` and ``malloc_trim(n)``)
    and ``rss`` are for tests; by default this process's glibc and RSS, and where there is no glibc
    :meth:`start` starts nothing.
    """

    def __init__(
        self,
        growth: int = TRIM_GROWTH,
        every: float = TRIM_EVERY_S,
        libc: Any | None = None,
        rss: Callable[[], int | None] = rss_bytes,
    ):
        self.growth, self.every, self.rss = growth, every, rss
        self.libc = libc if libc is not None else glibc()
        self.trims = 0
        self._low: int | None = None  # the lowest free count since the last trim
        self._rss_low: int | None = None  # the lowest RSS since the last trim
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def free_bytes(self) -> int:
        return int(self.libc.mallinfo2().fordblks)

    def check(self) -> bool:
        """One look: trim if the free heap bytes, or RSS over free memory, grew enough. Whether it trimmed."""
        if self.libc is None:
            return False
        free, rss = self.free_bytes(), self.rss()
        if self._low is None:
            self._low, self._rss_low = free, rss
            return False
        self._low = min(self._low, free)
        grew = free - self._low > self.growth
        touched = rss is not None and self._rss_low is not None and rss - self._rss_low > self.growth
        if not (grew or (touched and free > self.growth)):
            if rss is not None:
                self._rss_low = rss if self._rss_low is None else min(self._rss_low, rss)
            return False
        self.libc.malloc_trim(0)
        self.trims += 1
        # Trimmed pages stay counted as free chunks: the counts after the trim are the new bases.
        self._low, self._rss_low = self.free_bytes(), self.rss()
        return True

    def start(self) -> threading.Thread | None:
        """Start the thread (once); None, and nothing started, where there is no glibc to ask."""
        if self.libc is None:
            return None
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
            self._thread.start()
        return self._thread

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.check()

    def __enter__(self) -> HeapTrimmer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
