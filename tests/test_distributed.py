"""torch.distributed: work split across ranks gives exactly the single-process result (2 CPU processes, gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pissa
from conftest import tiny_llama
from pissa import distributed, stream

CFG = dict(rank=4, alpha=8.0, seed=3)


@pytest.fixture
def one_thread():
    """The workers run with one thread each; the single-process reference must round the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchrun(script: str, tmp_path: Path, *args: str, nproc: int = 2) -> None:
    """Run ``script`` under ``torchrun --standalone --nproc_per_node nproc`` with the tests folder importable."""
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(script))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(path), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_assign_balances_and_covers_every_item(world_size) -> None:
    costs = [9.0, 1.0, 4.0, 4.0, 2.0, 8.0, 1.0]
    owners = distributed.assign(costs, world_size)
    assert sorted(set(owners)) == list(range(world_size))
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(world_size)]
    assert max(loads) <= sum(costs) / world_size * 4 / 3 + max(costs) / 3


def test_single_process_helpers_are_no_ops() -> None:
    assert distributed.world() == (0, 1) and distributed.is_main()
    distributed.barrier()
    assert list(distributed.shared_map([1, 2], lambda x: x * 10, [1.0, 1.0])) == [(1, 10), (2, 20)]


def test_attach_under_torchrun_gives_every_rank_the_single_process_factors(tmp_path, one_thread) -> None:
    torchrun(
        """
        import sys
        from safetensors.torch import save_file
        import pissa
        from pissa import distributed
        from conftest import tiny_llama
        assert distributed.init_from_env()
        rank, size = distributed.world()
        model = pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=4, alpha=8.0, seed=3))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{sys.argv[1]}/rank{rank}.safetensors")
        """,
        tmp_path,
        str(tmp_path),
    )
    single = pissa.attach(tiny_llama(), pissa.AdapterConfig(**CFG)).state_dict()
    for rank in range(2):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert got.keys() == single.keys()
        assert all(torch.equal(got[k], single[k]) for k in single), rank


def test_stream_init_under_torchrun_equals_single_process(tmp_path, one_thread) -> None:
    src = tmp_path / "ckpt"
    tiny_llama().save_pretrained(src, max_shard_size="40KB")
    torchrun(
        """
        import sys
        import pissa
        from pissa import distributed, stream
        assert distributed.init_from_env()
        stream.init_checkpoint(sys.argv[1], sys.argv[2], pissa.AdapterConfig(rank=4, alpha=8.0, seed=3), progress=False)
        """,
        tmp_path,
        str(src),
        str(tmp_path / "dist"),
    )
    single = stream.init_checkpoint(src, tmp_path / "single", pissa.AdapterConfig(**CFG), progress=False)
    files = sorted(p.relative_to(single) for p in single.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "dist") for p in (tmp_path / "dist").rglob("*") if p.is_file())
    for rel in files:
        assert (tmp_path / "dist" / rel).read_bytes() == (single / rel).read_bytes(), rel
    assert len(load_file(str(single / "adapter" / "adapter.safetensors"))) == 14 * 4
