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

The rest of what a decomposition leaves behind, so that a PiSSA run holds no more than a LoRA run at the same
rank: the file pages it brought in once (LAPACK's code in libtorch: :func:`resident_file_pages` before,
:func:`release_paged_in` after), MKL's cached LAPACK workspace (:func:`free_blas_buffers`), the C heap's free
pages (:func:`trim_heap`); and :func:`mapped_copy` keeps a long-lived residual out of the heap, where a
checkpoint's own weights never are.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import sys
from bisect import bisect_right
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO

import torch
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


def resident_file_pages() -> dict[tuple[int, int], bytes]:
    """Which pages of each file mapping ``(start, end)`` are in this process's memory now: one byte per page, 1 for
    present; ``{}`` without ``/proc``. The snapshot :func:`release_paged_in` compares with."""
    out = {}
    try:
        with open("/proc/self/maps") as f:
            mappings = file_mappings(f.read())
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            for start, end in mappings:
                out[start, end] = _present(pagemap, start, end)
    except OSError:
        return {}
    return out


def _present(pagemap: BinaryIO, start: int, end: int) -> bytes:
    """One byte per page of ``[start, end)``: 1 where the page is in memory (its pagemap entry's PRESENT bit)."""
    pagemap.seek(start // mmap.PAGESIZE * 8)
    entries = pagemap.read((end - start) // mmap.PAGESIZE * 8)
    return bytes(entry >> 63 for (entry,) in struct.iter_unpack("<Q", entries))


def paged_in(before: dict[tuple[int, int], bytes], now: dict[tuple[int, int], bytes]) -> list[tuple[int, int]]:
    """``[start, end)`` runs of the file-mapped pages present in the snapshot ``now`` but not in ``before``
    (:func:`resident_file_pages`; a mapping new since ``before`` counts as all absent then)."""
    spans: list[tuple[int, int]] = []
    page = mmap.PAGESIZE
    for (start, end), present in now.items():
        was = before.get((start, end), bytes(len(present)))
        for i, (p, w) in enumerate(zip(present, was)):
            if p and not w:
                at = start + i * page
                if spans and spans[-1][1] == at:
                    spans[-1] = (spans[-1][0], at + page)
                else:
                    spans.append((at, at + page))
    return spans


def release_paged_in(before: dict[tuple[int, int], bytes]) -> int:
    """Take out of this process the unmodified file pages brought into memory since the snapshot ``before``
    (:func:`resident_file_pages`): code and data that some one-off work (a decomposition's LAPACK kernels) read
    once. Safe as :func:`release_spans` is: what is read again maps back unchanged. The bytes released."""
    return release_spans(paged_in(before, resident_file_pages())) if before else 0


@cache
def _glibc(name: str, *argtypes: Any) -> Callable[..., int] | None:
    """glibc's function ``name`` (returning a C int) with ``argtypes``; None off Linux or without it (musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


def _malloc_trim() -> Callable[[int], int] | None:
    return _glibc("malloc_trim", ctypes.c_size_t)


def mapped_copy(t: Tensor) -> Tensor:
    """A copy of the CPU tensor ``t`` in memory of its own (an anonymous ``mmap``), outside the C heap.

    A long-lived tensor (a frozen residual weight) in the heap pins the heap around it: the transient tensors of
    training fill the gaps between such blocks and what they free there stays in the process, while the heap
    of a model whose weights live in a checkpoint's mapping has no such blocks. In a mapping of its own the
    memory goes back to the system when the tensor is freed. Elsewhere (a GPU tensor, no bytes) ``t`` itself."""
    if t.device.type != "cpu" or not t.numel():
        return t
    buffer = mmap.mmap(-1, t.numel() * t.element_size(), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    out = torch.frombuffer(buffer, dtype=t.dtype, count=t.numel()).view(t.shape)
    return out.copy_(t)


@cache
def _mkl_free_buffers() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux") or not torch.backends.mkl.is_available():
        return None
    for lib in (None, str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")):  # MKL linked in statically
        for name in ("mkl_free_buffers", "mkl_serv_free_buffers"):
            try:
                fn = getattr(ctypes.CDLL(lib), name)
            except (OSError, AttributeError):
                continue
            fn.argtypes, fn.restype = [], None
            return fn
    return None


def free_blas_buffers() -> bool:
    """Give back the workspace that MKL's memory manager caches after LAPACK calls (``mkl_free_buffers``; on
    SmolLM2 about 8 MB after its SVDs, which training never uses); True if there was such a function to call.
    Without MKL (another BLAS, macOS, an ARM build) a no-op (False)."""
    fn = _mkl_free_buffers()
    if fn is None:
        return False
    fn()
    return True


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


def _mallopt() -> Callable[[int, int], int] | None:
    return _glibc("mallopt", ctypes.c_int, ctypes.c_int)


def return_freed_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """From now on, serve every allocation of ``threshold`` bytes or more from its own memory mapping, given back
    to the system the moment it is freed (glibc's ``mallopt(M_MMAP_THRESHOLD)``); True if set, False without glibc.

    glibc starts at 128 KiB but raises the threshold to the size of each mapped block freed (up to 32 MiB), so
    once a large tensor is freed, the activations below that size come from the heap, whose freed holes stay in the
    process's RSS. An FSDP rank frees each decoder block's all-gathered weights after every use, so its threshold
    soon sits above every activation: profiled on SmolLM2-135M with 2 processes, a rank's peak RSS was 2.0 GiB
    with the moving threshold and 1.2 GiB with it fixed, nothing else changed. A fixed threshold costs a fresh
    mapping (its pages zeroed on first touch) per large allocation, which is why only FSDP ranks set it: a
    single-process SmolLM2 float32 run of 6 steps of batch 4 peaked about 135 MiB lower with it fixed (1416 vs
    1551 MiB, PiSSA and LoRA alike), but each step took about 30% longer (every activation of 0.5-1.5 MiB its own
    mapping; fixed at 1-16 MiB instead, the peak did not come down)."""
    mallopt = _mallopt()
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) if mallopt is not None else False
