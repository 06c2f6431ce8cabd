"""Giving back a memory-mapped checkpoint's pages of the weights attach replaced (pissa.runtime.memory)."""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import pytest
import torch

import pissa
from pissa.runtime.memory import file_mappings, pages_in_files, release_file_pages

PAGE = mmap.PAGESIZE
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_PAGEOUT) and /proc are Linux's")

MAPS = """\
55d0c0000000-55d0c0021000 r--p 00000000 08:01 1234   /usr/bin/python3.11
55d0c1000000-55d0c1400000 rw-p 00000000 00:00 0      [heap]
7f0000000000-7f0000100000 r--p 00000000 00:2a 98765  /tmp/model.safetensors
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0      [stack]
"""


def test_file_mappings_keeps_the_file_backed_ranges_only() -> None:
    assert file_mappings(MAPS) == [(0x55D0C0000000, 0x55D0C0021000), (0x7F0000000000, 0x7F0000100000)]


def test_pages_in_files_takes_whole_pages_inside_the_mappings() -> None:
    maps = [(0, 10 * PAGE), (20 * PAGE, 30 * PAGE)]
    assert pages_in_files(PAGE // 2, 3 * PAGE + 5, maps) == [(PAGE, 2 * PAGE)]  # partial pages at both ends stay
    assert pages_in_files(8 * PAGE, 22 * PAGE, maps) == [(8 * PAGE, 2 * PAGE), (20 * PAGE, 2 * PAGE)]  # the gap is skipped
    assert pages_in_files(12 * PAGE, 18 * PAGE, maps) == []  # anonymous memory
    assert pages_in_files(PAGE + 1, 2 * PAGE - 1, maps) == []  # no whole page


def resident_file_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            inside = len(fields) >= 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def mapped_llama(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """A 2-layer Llama with 256 KiB projections, saved and loaded back by from_pretrained (memory-mapped)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    file = (tmp_path / "m" / "model.safetensors").resolve()
    with open(file, "rb+") as f:  # written back to disk: the kernel reclaims clean page-cache pages only
        os.fsync(f.fileno())
    model = LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    return model, file


@linux_only
def test_release_reclaims_a_mapped_weights_pages_and_changes_no_value(tmp_path) -> None:
    model, file = mapped_llama(tmp_path)
    W = model.model.layers[0].mlp.up_proj.weight  # (512, 256) float32: 512 KiB
    before = W.detach().clone()
    assert W.sum().item() == before.sum().item()  # every page of W is resident now
    resident = resident_file_bytes(file)
    done = release_file_pages([W.detach()])
    assert done >= W.numel() * 4 - 2 * PAGE
    assert resident_file_bytes(file) <= resident - done + 4 * PAGE  # ... and gone from this process's memory
    assert torch.equal(W.detach(), before)  # read again: faulted back from the file, unchanged
    assert release_file_pages([torch.randn(512, 256)]) == 0  # anonymous memory is left alone


@linux_only
@pytest.mark.parametrize("method", ["pissa", "lora"])
def test_attach_gives_back_the_pages_of_the_weights_it_replaced(tmp_path, method) -> None:
    """PiSSA replaces every target weight by its residual, so the checkpoint's pages of those weights leave the
    process's memory; LoRA keeps W itself as its frozen weight, so its pages stay."""
    model, file = mapped_llama(tmp_path)
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        model(input_ids=ids)  # touches every weight
    targets = sum(m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    resident = resident_file_bytes(file)
    pissa.attach(model, pissa.AdapterConfig(method=method, rank=4))
    dropped = resident - resident_file_bytes(file)
    if method == "pissa":
        assert dropped >= targets - 14 * 2 * PAGE  # 14 projections, a partial page at either end of each
    else:
        assert dropped <= 4 * PAGE


def test_unmodified_runs_skips_private_copies_and_joins_neighbours() -> None:
    from pissa.runtime.memory import FILE_PAGE, PRESENT, unmodified_runs

    entries = [PRESENT | FILE_PAGE, 0, PRESENT, PRESENT | FILE_PAGE, PRESENT | FILE_PAGE]  # file, absent, copy, file, file
    packed = b"".join(e.to_bytes(8, "little") for e in entries)
    assert unmodified_runs(packed, 10 * PAGE, PAGE) == [(10 * PAGE, 2 * PAGE), (13 * PAGE, 2 * PAGE)]


@linux_only
def test_a_written_page_is_never_released(tmp_path) -> None:
    """A weight changed in place (its pages now private copies) keeps its values: those pages stay."""
    model, _ = mapped_llama(tmp_path)
    W = model.model.layers[0].mlp.up_proj.weight.detach()
    with torch.no_grad():
        W.mul_(2.0)  # copy-on-write: every page of W is private now
    expected = W.clone()
    assert release_file_pages([W]) == 0
    assert torch.equal(W, expected)


def anonymous_rss() -> int:
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("RssAnon:"))


@linux_only
def test_trim_heap_returns_freed_heap_pages() -> None:
    """64 KiB blocks (below glibc's mmap threshold) live in the heap; every other one freed leaves holes between
    blocks still in use, which free() never returns (they cannot merge into the heap's top): only trimming does."""
    from pissa.runtime.memory import trim_heap

    blocks = [torch.ones(16 * 1024) for _ in range(4000)]  # 4000 x 64 KiB = 250 MiB, touched
    kept = blocks[1::2]
    del blocks  # the even ones: 125 MiB of holes between the kept ones
    before = anonymous_rss()
    assert trim_heap()
    assert anonymous_rss() <= before - 40 * 2**20  # measured: about 70 of the 125 MiB come back
    assert all(b[0].item() == 1.0 for b in kept)


def test_paged_in_finds_the_pages_present_now_and_not_before() -> None:
    from pissa.runtime.memory import paged_in

    before = {(0, 4 * PAGE): bytes([1, 0, 0, 1])}
    now = {(0, 4 * PAGE): bytes([1, 1, 1, 0]), (10 * PAGE, 12 * PAGE): bytes([0, 1])}  # the second mapping is new
    assert paged_in(before, now) == [(PAGE, 3 * PAGE), (11 * PAGE, 12 * PAGE)]
    assert paged_in(now, now) == []


@linux_only
def test_release_paged_in_drops_what_was_read_since_the_snapshot_and_keeps_the_rest(tmp_path) -> None:
    from pissa.runtime.memory import release_paged_in, resident_file_pages

    file = tmp_path / "data.bin"
    file.write_bytes(bytes(range(256)) * (64 * PAGE // 256))
    with open(file, "rb+") as f:
        os.fsync(f.fileno())
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        first = m[: 8 * PAGE]  # read before the snapshot: stays (with its neighbours, the kernel's fault-around)
        kept = resident_file_bytes(file)
        snapshot = resident_file_pages()
        later = m[8 * PAGE :]  # read after it: released
        assert kept <= 32 * PAGE and resident_file_bytes(file) == 64 * PAGE
        assert release_paged_in(snapshot) >= 64 * PAGE - kept
        assert resident_file_bytes(file) == kept
        assert m[: 8 * PAGE] == first and m[8 * PAGE :] == later  # read back from the file, unchanged
    assert release_paged_in({}) == 0  # no snapshot (no /proc): nothing to compare with


@linux_only
def test_free_blas_buffers_finds_mkl_where_torch_uses_it_and_changes_no_result() -> None:
    from pissa.runtime.memory import free_blas_buffers

    W = torch.randn(200, 120, generator=torch.Generator().manual_seed(0))
    before = torch.linalg.svd(W, full_matrices=False)
    assert free_blas_buffers() == torch.backends.mkl.is_available()
    after = torch.linalg.svd(W, full_matrices=False)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("give_back_bytes", [1, 1 << 26])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attach_keeps_no_reference_to_the_weights_it_replaced(monkeypatch, give_back_bytes, dtype) -> None:
    """After PiSSA's attach no parameter or buffer of the model shares memory with a replaced weight (so freeing
    it frees its memory), and what was replaced is given back as soon as GIVE_BACK_BYTES of it piled up."""
    import pissa.adapter.attach as attach_module
    from helpers import tiny_llama

    given: list[int] = []
    release = attach_module.release_spans
    monkeypatch.setattr(attach_module, "CPU_BATCH_BYTES", 1)  # one layer per batch
    monkeypatch.setattr(attach_module, "GIVE_BACK_BYTES", give_back_bytes)
    monkeypatch.setattr(attach_module, "release_spans", lambda spans: given.append(len(spans)) or release(spans))
    model = tiny_llama(dtype)
    originals = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    held = [(w.untyped_storage().data_ptr(), w.untyped_storage().nbytes()) for w in originals]  # alive: no reuse
    pissa.attach(model, pissa.AdapterConfig(method="pissa", rank=4))
    for t in [*model.parameters(), *model.buffers()]:
        at = t.untyped_storage().data_ptr()
        assert not any(lo <= at < lo + n for lo, n in held)
    # after every layer (and once more at the end, with nothing left), or once at the end of a tiny model
    assert len(given) == (len(originals) + 1 if give_back_bytes == 1 else 1)
    assert sum(given) == len(originals)  # each replaced weight's range given back once


FREED_BLOCKS = """
import sys, torch
from pissa.runtime.memory import return_freed_blocks
def anonymous_rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon"))
if sys.argv[1] == "fixed":
    assert return_freed_blocks()
big = torch.ones(2 * 2**20)  # 8 MiB, freed: glibc's moving threshold rises to 8 MiB
del big
blocks = [torch.ones(64 * 1024) for _ in range(400)]  # 400 x 256 KiB = 100 MiB, touched
kept = blocks[1::2]
before = anonymous_rss()
del blocks  # every other block: 50 MiB between blocks still in use
print(before - anonymous_rss())
"""


@linux_only
def test_return_freed_blocks_gives_freed_activations_back_at_once(tmp_path) -> None:
    """Once a large block is freed, glibc serves smaller ones from the heap, whose holes stay in the RSS;
    with the threshold fixed (:func:`~pissa.runtime.memory.return_freed_blocks`) each freed block leaves the process."""
    import subprocess

    script = tmp_path / "blocks.py"
    script.write_text(FREED_BLOCKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    given_back = {mode: int(subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True, text=True,
                                           check=True).stdout) for mode in ("moving", "fixed")}
    assert given_back["moving"] <= 10 * 2**20 and given_back["fixed"] >= 45 * 2**20, given_back
