"""torch.distributed: work split across ranks gives exactly the single-process result (2 CPU processes, gloo)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pissa
from helpers import IDS, fsdp_steps, tiny_llama, torchrun
from pissa.checkpoints.init import init_checkpoint
from pissa.runtime import distributed

CFG = dict(rank=4, alpha=8.0, seed=3)


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
from pissa.runtime import distributed

def check():  # registered first, so it runs after init_from_env's teardown (atexit is last-in, first-out)
    threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    with open(f"{sys.argv[1]}/rank{os.environ['RANK']}.txt", "w") as f:
        f.write(f"{dist.is_initialized()} {sorted(t for t in threads if 'gloo' in t)}")

def train_sharded():  # FSDP2 leaves the group in DTensor's caches after the model is gone
    import torch
    from torch.distributed.fsdp import fully_shard

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    model(torch.randn(2, 8)).sum().backward()

atexit.register(check)
assert distributed.init_from_env()
assert distributed.all_sum([1.0]) == [2.0]
if sys.argv[2] == "fsdp":
    train_sharded()
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists the process's threads in /proc")
@pytest.mark.parametrize("work", ["collective", "fsdp"])
def test_init_from_env_tears_the_group_down_before_the_interpreter_finalizes(tmp_path, work) -> None:
    """Workers that never call shutdown: the registered teardown destroys the group and gloo's C++
    threads are joined while Python is whole, also after FSDP2 training. (Left to garbage collection,
    the group is destroyed during finalization, and a worker could abort: "terminate called without
    an active exception".)"""
    torchrun(TEARDOWN, tmp_path, str(tmp_path), work)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["False []"] * 2


def test_attach_under_torchrun_gives_every_rank_the_single_process_factors(tmp_path, one_thread) -> None:
    torchrun(
        """
        import sys
        from safetensors.torch import save_file
        import pissa
        from pissa.runtime import distributed
        from helpers import tiny_llama
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
        from pissa.checkpoints.init import init_checkpoint
        from pissa.runtime import distributed
        assert distributed.init_from_env()
        init_checkpoint(sys.argv[1], sys.argv[2], pissa.AdapterConfig(rank=4, alpha=8.0, seed=3), progress=False)
        """,
        tmp_path,
        str(src),
        str(tmp_path / "dist"),
    )
    single = init_checkpoint(src, tmp_path / "single", pissa.AdapterConfig(**CFG), progress=False)
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
from pissa.cli import main
from pissa.runtime import distributed
from pissa.training import run
models = []
real = run.train
def spy(session, *args, **kwargs):
    models.append(session.model)
    return real(session, *args, **kwargs)
run.train = spy
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
    # `pissa finetune --nproc 2` relaunches itself under torchrun: the same run as above, logged by rank 0 only
    assert main([*args, "--out", str(tmp_path / "nproc"), "--nproc", "2", "--report-to", "tensorboard"]) == 0
    nproc_adapter = load_file(str(tmp_path / "nproc" / "adapter" / "adapter.safetensors"))
    assert all(torch.equal(nproc_adapter[k], dist_adapter[k]) for k in dist_adapter)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((tmp_path / "nproc" / "tensorboard").iterdir())) == 1  # one event file: one writer
    board = EventAccumulator(str(tmp_path / "nproc" / "tensorboard"))
    board.Reload()
    m_nproc = json.loads((tmp_path / "nproc" / "metrics.json").read_text())
    logged = board.Scalars("train/loss")
    assert [e.step for e in logged] == [s for s, _ in m_nproc["train_loss"]]
    assert [e.value for e in logged] == pytest.approx([v for _, v in m_nproc["train_loss"]], rel=1e-6)


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
from pissa.runtime import distributed
from helpers import tiny_llama
from helpers import fsdp_steps

def main():  # the sharded model lives in a function: a module global would hold the group until finalization
    rank = distributed.world()[0]
    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=4, alpha=8.0, seed=3))
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    fsdp_steps(model, rows=slice(2 * rank, 2 * rank + 2))
    full = {n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    save_file({n: t.contiguous() for n, t in full.items()}, f"{sys.argv[1]}/fsdp{rank}.safetensors")

assert distributed.init_from_env()
main()
"""


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


INTERRUPT = """
import signal, sys
from pissa.cli import main
from pissa.runtime import hub
from pissa.training import loop
real, calls = loop.train_step, []
def step_then_ctrl_c(*args, **kwargs):  # Ctrl-C arrives during step 2 on every rank
    calls.append(1)
    if len(calls) == 2:
        signal.raise_signal(signal.SIGINT)
    return real(*args, **kwargs)
loop.train_step = step_then_ctrl_c
def whole_model(*args, **kwargs):  # the float32 FSDP route decomposes streamed and loads shards only
    raise AssertionError("a rank loaded the whole model")
hub.load_model = whole_model
sys.exit(0 if main(sys.argv[1:]) == 130 else 1)
"""


def test_fsdp_finetune_equals_one_process_and_resumes_after_ctrl_c(tmp_path, tiny, one_thread) -> None:
    """`--nproc 2 --fsdp`: the model sharded over 2 CPU processes trains the adapter one process
    trains (same global batches); interrupted by Ctrl-C at step 2, `--resume` finishes the same run.
    No rank loads the whole model: the checkpoint is decomposed streamed into the run's folder (kept
    for the resumed run, deleted at the end) and each rank loads its shard."""
    import json

    from pissa.cli import main

    # evaluation batches of 2: the ranks' shares of the 9 test examples take 3 and 2 forwards (in lockstep)
    args = ["finetune", "--model", str(tiny / "llama"), "--data", str(tiny / "data.jsonl"), *FINETUNE,
            "--eval-batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    torchrun(INTERRUPT, tmp_path, *args, "--out", str(tmp_path / "fsdp"), "--fsdp")
    assert (tmp_path / "fsdp.partial" / "sharded-init" / "adapter").is_dir()
    state = json.loads((tmp_path / "fsdp.partial" / "checkpoint" / "state.json").read_text())
    assert state["progress"]["step"] == 2 and not (tmp_path / "fsdp").exists()
    assert main([*args, "--out", str(tmp_path / "fsdp"), "--fsdp", "--nproc", "2", "--resume"]) == 0
    single = load_file(str(tmp_path / "single" / "adapter" / "adapter.safetensors"))
    sharded = load_file(str(tmp_path / "fsdp" / "adapter" / "adapter.safetensors"))
    assert sharded.keys() == single.keys()
    for k in single:
        assert torch.allclose(sharded[k], single[k], rtol=1e-4, atol=1e-6), k
    m_single, m_fsdp = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("single", "fsdp"))
    assert m_fsdp["fsdp"] and m_fsdp["processes"] == 2 and not m_single["fsdp"]
    assert [s for s, _ in m_fsdp["train_loss"]] == [1, 2, 3, 4]
    assert all(abs(a[1] - b[1]) <= 1e-5 for a, b in zip(m_fsdp["train_loss"], m_single["train_loss"]))
    for key in ("eval_before", "eval_after"):
        assert abs(m_fsdp[key]["loss"] - m_single[key]["loss"]) <= 1e-5, key
    assert not (tmp_path / "fsdp" / "sharded-init").exists()
    assert pissa.load_adapter(tiny_llama_from(tiny), tmp_path / "fsdp" / "adapter") is not None  # the base's adapter


def tiny_llama_from(tiny: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny / "llama")


def test_fsdp_finetune_in_bfloat16_with_gradient_checkpointing_matches_one_process(tmp_path, tiny, one_thread) -> None:
    """A bfloat16 base sharded with float32 factors (FSDP2's mixed-precision policy keeps each dtype)
    and activation checkpointing: the adapter one bfloat16 process trains, within bfloat16 rounding."""
    import json

    from pissa.cli import main

    args = ["finetune", "--model", str(tiny / "llama"), "--data", str(tiny / "data.jsonl"), *FINETUNE,
            "--dtype", "bfloat16", "--gradient-checkpointing"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    assert main([*args, "--out", str(tmp_path / "fsdp"), "--fsdp", "--nproc", "2"]) == 0
    single = load_file(str(tmp_path / "single" / "adapter" / "adapter.safetensors"))
    sharded = load_file(str(tmp_path / "fsdp" / "adapter" / "adapter.safetensors"))
    trained = [k for k in single if k.endswith((".lora_A", ".lora_B"))]
    assert trained and all(sharded[k].dtype == torch.float32 for k in trained)
    # bfloat16 rounds the activations of the two half-batches differently than of the whole batch,
    # and AdamW's first steps amplify small gradients: compare the whole trained update
    difference = sum((sharded[k] - single[k]).norm() ** 2 for k in trained) ** 0.5
    update = sum((single[k] - single[k.replace("lora_", "") + "0"]).norm() ** 2 for k in trained) ** 0.5
    assert difference <= 0.05 * update, (difference, update)
    m_single, m_fsdp = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("single", "fsdp"))
    assert abs(m_fsdp["eval_after"]["loss"] - m_single["eval_after"]["loss"]) <= 2e-3


def test_fsdp_needs_several_processes(tmp_path, tiny, capsys) -> None:
    from pissa.cli import main

    args = ["finetune", "--model", str(tiny / "llama"), "--data", str(tiny / "data.jsonl"), "--fsdp"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "--fsdp shards the model over processes: add --nproc N" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def llama_checkpoint(root: Path) -> Path:
    """A Llama-shaped safetensors checkpoint in several shards (untied head, rotary tables, GQA) under ``root/base``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))
    model.save_pretrained(root / "base", max_shard_size="60KB")
    assert len(list((root / "base").glob("*.safetensors"))) > 2
    return root / "base"


def reference_logits(checkpoint: Path, adapter: Path) -> torch.Tensor:
    """Logits of the base loaded whole (from_pretrained) with the adapter loaded in memory."""
    from transformers import LlamaForCausalLM

    model = pissa.load_adapter(LlamaForCausalLM.from_pretrained(checkpoint), adapter)
    with torch.no_grad():
        return model(input_ids=IDS).logits


SHARDED = """
import gc, sys, torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
import pissa
from pissa.runtime import distributed
from helpers import IDS

def largest_tensor():  # bytes of the largest tensor storage this process holds (a DTensor: its local shard)
    gc.collect()
    tensors = [getattr(o, "_local_tensor", o) for o in gc.get_objects() if isinstance(o, torch.Tensor) and not o.is_meta]
    return max(t.untyped_storage().nbytes() for t in tensors)

def main(out):  # the sharded model lives in a function: a module global would hold the group until finalization
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(f"{out}/residual"))
    pissa.load_sharded(model, f"{out}/residual", f"{out}/adapter", device="cpu")
    local = sum(p.to_local().numel() for p in model.parameters())
    loaded = largest_tensor()
    rank = distributed.world()[0]
    with torch.no_grad(), distributed.lockstep(model, torch.device("cpu")):  # rank 0: a row a forward; rank 1: both at once
        rows = [model(input_ids=IDS[i : i + 1]).logits for i in range(len(IDS))] if rank == 0 else [model(input_ids=IDS).logits]
    logits = torch.cat(rows)
    save_file({"logits": logits, "local": torch.tensor(local), "loaded": torch.tensor(loaded),
               "after_lockstep": torch.tensor(largest_tensor())}, f"{out}/rank{rank}.safetensors")

assert distributed.init_from_env()
main(sys.argv[1])
"""


def test_load_sharded_builds_a_pissa_init_checkpoint_on_two_processes_from_the_meta_device(tmp_path, one_thread) -> None:
    """`pissa init` output loaded onto a meta-device Llama by 2 FSDP2 processes: each rank holds
    half of every weight (no rank holds a whole embedding, after loading nor after forwards in lockstep)
    and the sharded model computes the logits of the whole base plus adapter, also when the ranks run
    different numbers of forwards (:func:`~pissa.runtime.distributed.lockstep`)."""
    base = llama_checkpoint(tmp_path)
    init_checkpoint(base, tmp_path / "out", pissa.AdapterConfig(**CFG), progress=False)
    torchrun(SHARDED, tmp_path, str(tmp_path / "out"))
    expected = reference_logits(base, tmp_path / "out" / "adapter")
    ranks = [load_file(str(tmp_path / "out" / f"rank{r}.safetensors")) for r in range(2)]
    whole = pissa.load_adapter(llama_checkpoint_model(base), tmp_path / "out" / "adapter")
    total = sum(p.numel() for p in whole.parameters())
    assert sum(int(r["local"]) for r in ranks) == total
    assert all(0.45 * total <= int(r["local"]) <= 0.55 * total for r in ranks)  # no rank holds the whole base
    embedding = whole.get_input_embeddings().weight
    half = embedding.numel() * embedding.element_size() // 2
    for r in ranks:
        assert int(r["loaded"]) <= half and int(r["after_lockstep"]) <= half, (int(r["loaded"]), int(r["after_lockstep"]))
        assert torch.allclose(r["logits"], expected, rtol=1e-4, atol=1e-5)


def llama_checkpoint_model(base: Path) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(base)


def test_load_sharded_in_one_process_equals_from_pretrained_and_checks_the_checkpoint(tmp_path) -> None:
    """Without torchrun the meta model is filled whole; another checkpoint or a real model is refused."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = llama_checkpoint(tmp_path)
    out = tmp_path / "out"
    init_checkpoint(base, out, pissa.AdapterConfig(**CFG), progress=False)

    def meta_model() -> torch.nn.Module:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out / "residual"))

    model = pissa.load_sharded(meta_model(), out / "residual", out / "adapter", device="cpu")
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits, reference_logits(base, out / "adapter"), rtol=1e-5, atol=1e-6)
    assert len(list(pissa.adapted_layers(model))) == 14
    with pytest.raises(pissa.PissaError, match="is not the residual checkpoint of this adapter"):
        pissa.load_sharded(meta_model(), base, out / "adapter", device="cpu")  # the original weights, not the residual
    with pytest.raises(pissa.PissaError, match="needs a model built on the meta device"):
        pissa.load_sharded(llama_checkpoint_model(base), out / "residual", out / "adapter", device="cpu")
