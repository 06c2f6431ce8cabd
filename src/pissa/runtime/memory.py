"""Giving back the memory of weights a model no longer uses.

A checkpoint loaded by ``from_pretrained`` (safetensors) is memory-mapped: each weight reads its values
straight from the file's pages, and every page the model touched counts in the process's resident memory.
When attach replaces a weight ``W`` by its residual ``W - B0 A0`` (a new tensor), freeing ``W`` frees no
memory: the mapping stays open for the weights still in use, and so do the pages ``W`` read. On Linux
:func:`release_file_pages` takes those pages out of the process (``madvise(MADV_DONTNEED)``).

Only provably unmodified pages are released: ``/proc/self/pagemap`` says, per page, whether it is present
and whether it is still the file's page (bit 61) or a private copy (a page written to since the mapping was
made, copy-on-write). Dropping a file page changes no value: if anything reads it again it is mapped back
from the unchanged file. A private copy is never dropped (that would lose what was written). So it is safe
even if some other tensor still viewed those pages; it only costs a re-read then. Unlike asking the kernel
to reclaim the pages (``MADV_PAGEOUT``), this works while other processes map the same file. Elsewhere
(macOS, Windows, a tensor not in a file mapping, a GPU tensor) it does nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import sys
from bisect import bisect_right
from collections.abc import Callable
from functools import cache

from torch import Tensor

MADV_DONTNEED = 4
"""Linux's ``madvise`` advice that unmaps the given pages from this process (a file page is mapped back on access)."""
PRESENT, FILE_PAGE = 1 << 63, 1 << 61
"""Bits of a ``/proc/self/pagemap`` entry: the page is in memory; it is a file page (or shared), not a private copy."""


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


def unmodified_runs(entries: bytes, address: int, page: int = mmap.PAGESIZE) -> list[tuple[int, int]]:
    """``(address, length)`` runs of the pages, from ``address`` on, whose 8-byte ``/proc/self/pagemap`` ``entries``
    say they hold the file's own contents: not in memory, or present as the file's page (not a private copy)."""
    runs: list[tuple[int, int]] = []
    for i, (entry,) in enumerate(struct.iter_unpack("<Q", entries)):
        if entry & PRESENT and not entry & FILE_PAGE:  # a private copy: written to, keep it
            continue
        at = address + i * page
        if runs and runs[-1][0] + runs[-1][1] == at:
            runs[-1] = (runs[-1][0], runs[-1][1] + page)
        else:
            runs.append((at, page))
    return runs


def spans_of(tensors: list[Tensor]) -> list[tuple[int, int]]:
    """``[start, end)`` byte addresses of the contiguous CPU ``tensors`` (their own bytes, not the rest of a storage
    they may share); others have none."""
    return [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors
            if t.device.type == "cpu" and t.is_contiguous() and t.numel()]


def release_file_pages(tensors: list[Tensor]) -> int:
    """Take out of this process the unmodified pages that the contiguous CPU ``tensors`` occupy in file mappings;
    the number of bytes released (:func:`release_spans`)."""
    return release_spans(spans_of(tensors))


def release_spans(spans: list[tuple[int, int]]) -> int:
    """Take out of this process the unmodified pages of the byte ranges ``spans`` that lie in file mappings, reading
    ``/proc/self/maps`` once for all; the number of bytes released (0 where nothing applies, or where the kernel
    refuses, which changes nothing). A range whose tensor was freed since is safe too: only pages that are still
    some file's own contents are dropped, and those read back unchanged."""
    madvise = _madvise()
    if madvise is None or not spans:
        return 0
    page = mmap.PAGESIZE
    done = 0
    try:
        with open("/proc/self/maps") as f:
            mappings = file_mappings(f.read())
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            for start, end in spans:
                for address, length in pages_in_files(start, end, mappings):
                    pagemap.seek(address // page * 8)
                    for run, size in unmodified_runs(pagemap.read(length // page * 8), address, page):
                        if madvise(run, size, MADV_DONTNEED) == 0:
                            done += size
    except OSError:  # no /proc (a sandbox): nothing released, nothing changed
        return done
    return done


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim  # glibc's; absent from musl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim_heap() -> bool:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim(0)``); True if any were returned.

    Freed memory of allocations below glibc's mmap threshold stays in the heap, counted in the process's RSS:
    attach frees one weight per layer (a bfloat16 base's converted weights are heap memory) and its SVD
    workspace, so a PiSSA run otherwise carries them through training. A no-op (False) without glibc."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter: the size from which an allocation gets its own ``mmap`` (unmapped when freed)."""
MMAP_THRESHOLD = 128 * 1024
"""glibc's initial threshold, which :func:`return_freed_blocks` keeps fixed."""


@cache
def _mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).mallopt  # glibc's; absent from musl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def return_freed_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """From now on, serve every allocation of ``threshold`` bytes or more from its own memory mapping, given back
    to the system the moment it is freed (glibc's ``mallopt(M_MMAP_THRESHOLD)``); True if set, False without glibc.

    glibc starts at 128 KiB but raises the threshold to the size of each mapped block freed (up to 32 MiB), so
    once a large tensor is freed, the activations below that size come from the heap, whose freed holes stay in the
    process's RSS. An FSDP rank frees each decoder block's all-gathered weights after every use, so its threshold
    soon sits above every activation: profiled on SmolLM2-135M with 2 processes, a rank's peak RSS was 2.0 GiB
    with the moving threshold and 1.2 GiB with it fixed, nothing else changed. A fixed threshold costs a fresh
    mapping (its pages zeroed on first touch) per large allocation."""
    mallopt = _mallopt()
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) if mallopt is not None else False
