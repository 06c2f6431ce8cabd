"""Giving back the memory of weights a model no longer uses.

A checkpoint loaded by ``from_pretrained`` (safetensors) is memory-mapped: each weight reads its values
straight from the file's pages, and every page the model touched counts in the process's resident memory.
When attach replaces a weight ``W`` by its residual ``W - B0 A0`` (a new tensor), freeing ``W`` frees no
memory: the mapping stays open for the weights still in use, and so do the pages ``W`` read. On Linux
:func:`release_file_pages` asks the kernel to reclaim them (``madvise(MADV_PAGEOUT)``, Linux 5.4+).

That advice never changes a value: a clean page of a private file mapping is dropped and, if anything
reads it again, faulted back from the (unchanged) file; a page that was written to (copy-on-write, now
anonymous memory) is only swapped out, never discarded. So it is safe even if some other tensor still
viewed those pages; it only costs a re-read then. Elsewhere (macOS, Windows, a tensor not in a file
mapping, a GPU tensor) it does nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from bisect import bisect_right
from collections.abc import Callable
from functools import cache

from torch import Tensor

MADV_PAGEOUT = 21
"""Linux's ``madvise`` advice that reclaims the given pages now (clean file pages dropped, anonymous ones swapped)."""


def file_mappings(maps: str) -> list[tuple[int, int]]:
    """``(start, end)`` of every file-backed mapping in the text of ``/proc/self/maps``, sorted by start.

    A line is ``start-end perms offset dev inode [path]``; file-backed means a non-zero inode (anonymous memory,
    the heap, the stack and ``[vdso]`` have inode 0)."""
    ranges = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) >= 6 and fields[4] != "0":
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return sorted(ranges)


def pages_in_files(start: int, end: int, mappings: list[tuple[int, int]], page: int = mmap.PAGESIZE) -> list[tuple[int, int]]:
    """The whole pages of the byte range ``[start, end)`` that lie inside the file ``mappings``: ``(address, length)``
    pieces, each page-aligned (a page shared with a neighbouring tensor at either end is left alone)."""
    lo, hi = -(-start // page) * page, end // page * page
    pieces = []
    i = max(0, bisect_right(mappings, (lo, float("inf"))) - 1)
    for m_start, m_end in mappings[i:]:
        if m_start >= hi:
            break
        a, b = max(lo, m_start), min(hi, m_end)
        if b > a:
            pieces.append((a, b - a))
    return pieces


@cache
def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def release_file_pages(tensors: list[Tensor]) -> int:
    """Advise the kernel to reclaim the pages that the contiguous CPU ``tensors`` occupy in file mappings (their own
    bytes, not the rest of a storage they may share); the number of bytes advised (0 where nothing applies, or
    where the kernel refuses the advice, which changes nothing)."""
    madvise = _madvise()
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors
             if t.device.type == "cpu" and t.is_contiguous() and t.numel()]
    if madvise is None or not spans:
        return 0
    try:
        with open("/proc/self/maps") as f:
            mappings = file_mappings(f.read())
    except OSError:
        return 0
    done = 0
    for start, end in spans:
        for address, length in pages_in_files(start, end, mappings):
            if madvise(address, length, MADV_PAGEOUT) == 0:
                done += length
    return done
