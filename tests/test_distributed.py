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
    distributed.shutdown()
    distributed._at_exit()


def test_exit_teardown_skips_the_barrier_when_an_exception_ends_the_program(monkeypatch) -> None:
    """A rank that dies of an exception must not wait at a barrier its peers may never reach."""
    calls: list[bool] = []
    monkeypatch.setattr(distributed, "shutdown", lambda wait=True: calls.append(wait))
    for name in ("last_value", "last_exc"):  # pytest records failed tests there too
        monkeypatch.delattr(sys, name, raising=False)
    distributed._at_exit()
    monkeypatch.setattr(sys, "last_value", RuntimeError("rank failed"), raising=False)
    distributed._at_exit()
    assert calls == [True, False]


TEARDOWN = """
import atexit, os, sys
import torch.distributed as dist
from pissa import distributed

def check():  # registered first, so it runs after init_from_env's teardown (atexit is last-in, first-out)
    threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    with open(f"{sys.argv[1]}/rank{os.environ['RANK']}.txt", "w") as f:
        f.write(f"{dist.is_initialized()} {sorted(t for t in threads if 'gloo' in t)}")

atexit.register(check)
assert distributed.init_from_env()
assert distributed.all_sum([1.0]) == [2.0]
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists the process's threads in /proc")
def test_init_from_env_tears_the_group_down_before_the_interpreter_finalizes(tmp_path) -> None:
    """Workers that never call shutdown: the registered teardown destroys the group and gloo's C++
    threads are joined while Python is whole. (Left to garbage collection, the group is destroyed
    during finalization, and a worker could abort: "terminate called without an active exception".)"""
    torchrun(TEARDOWN, tmp_path, str(tmp_path))
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["False []"] * 2


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


FINETUNE = ["--rank", "4", "--lr", "1e-2", "--steps", "4", "--batch-size", "4", "--grad-accum", "2",
            "--eval-size", "9", "--warmup", "1", "--threads", "1", "--save-every", "2"]

SPY = """
import sys
from safetensors.torch import save_file
from pissa import distributed, train
from pissa.cli import main
models = []
real = train.train
def spy(session, *args, **kwargs):
    models.append(session.model)
    return real(session, *args, **kwargs)
train.train = spy
code = main(sys.argv[2:])
rank = distributed.world()[0]
params = {n: p.detach().contiguous() for n, p in models[0].named_parameters() if p.requires_grad}
save_file(params, f"{sys.argv[1]}/rank{rank}.safetensors")
sys.exit(code)
"""


def test_finetune_under_torchrun_equals_one_process_on_the_same_global_batches(tmp_path, tiny, one_thread) -> None:
    """2 ranks x half of every micro-batch == 1 process x whole micro-batches: same adapters, metrics and outputs."""
    import json

    from pissa.cli import main

    args = ["finetune", "--model", str(tiny / "llama"), "--data", str(tiny / "data.jsonl"), *FINETUNE]
    torchrun(SPY, tmp_path, str(tmp_path), *args, "--out", str(tmp_path / "dist"))
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    dist_adapter = load_file(str(tmp_path / "dist" / "adapter" / "adapter.safetensors"))
    single_adapter = load_file(str(tmp_path / "single" / "adapter" / "adapter.safetensors"))
    assert dist_adapter.keys() == single_adapter.keys()
    for k in single_adapter:
        assert torch.allclose(dist_adapter[k], single_adapter[k], rtol=1e-4, atol=1e-6), k
    trained = [k for k in single_adapter if k.endswith(".lora_A")]
    assert trained and all(not torch.equal(single_adapter[k], single_adapter[k.replace(".lora_A", ".A0")]) for k in trained)
    m_dist, m_single = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("dist", "single"))
    for key in ("eval_before", "eval_after"):
        for metric in ("loss", "accuracy"):
            assert abs(m_dist[key][metric] - m_single[key][metric]) <= 1e-5, (key, metric)
    assert [s for s, _ in m_dist["train_loss"]] == [1, 2, 3, 4]
    assert all(abs(a[1] - b[1]) <= 1e-5 for a, b in zip(m_dist["train_loss"], m_single["train_loss"]))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("dist")) == ["dist"]  # rank 0 only, no leftovers
    # `pissa finetune --nproc 2` relaunches itself under torchrun: the same run as above
    assert main([*args, "--out", str(tmp_path / "nproc"), "--nproc", "2"]) == 0
    nproc_adapter = load_file(str(tmp_path / "nproc" / "adapter" / "adapter.safetensors"))
    assert all(torch.equal(nproc_adapter[k], dist_adapter[k]) for k in dist_adapter)


def test_nproc_larger_than_the_batch_is_refused(tmp_path, tiny, capsys) -> None:
    from pissa.cli import main

    args = ["finetune", "--model", str(tiny / "llama"), "--data", str(tiny / "data.jsonl"), "--batch-size", "1"]
    assert main([*args, "--nproc", "2", "--out", str(tmp_path / "out")]) == 2
    assert "--batch-size 1 is smaller than --nproc 2" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


FSDP = """
import sys, torch
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
import pissa
from pissa import distributed
from conftest import tiny_llama
from test_distributed import fsdp_steps
assert distributed.init_from_env()
rank = distributed.world()[0]
model = pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=4, alpha=8.0, seed=3))
for block in model.model.layers:
    fully_shard(block)
fully_shard(model)
fsdp_steps(model, rows=slice(2 * rank, 2 * rank + 2))
full = {n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
save_file({n: t.contiguous() for n, t in full.items()}, f"{sys.argv[1]}/fsdp{rank}.safetensors")
"""


def fsdp_steps(model, rows: slice, steps: int = 3) -> None:
    """AdamW steps on ``rows`` of a fixed (4, 10) batch (no padding: every row has 9 targets)."""
    ids = torch.randint(0, 96, (4, 10), generator=torch.Generator().manual_seed(0))[rows]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_fsdp2_fully_shard_trains_a_pissa_model_on_cpu_with_gloo(tmp_path, one_thread) -> None:
    """FSDP2 shards the adapted model over 2 CPU processes; each trains on half the batch and the
    gathered adapters equal one process training on the whole batch (gradients are averaged)."""
    torchrun(FSDP, tmp_path, str(tmp_path))
    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(**CFG))
    fsdp_steps(model, rows=slice(0, 4))
    single = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for rank in range(2):
        got = load_file(str(tmp_path / f"fsdp{rank}.safetensors"))
        assert got.keys() == single.keys()
        for k in single:
            assert torch.allclose(got[k], single[k], rtol=1e-4, atol=1e-6), (rank, k)
    assert any(not torch.equal(single[k], pissa.attach(tiny_llama(), pissa.AdapterConfig(**CFG)).state_dict()[k]) for k in single)
