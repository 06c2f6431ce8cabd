"""`pissa init` on a checkpoint on disk vs PEFT's in-memory route: wall time and peak memory.

A Llama-shaped random float32 checkpoint of about ``--size-gb`` is written shard by shard into a
temporary folder (one tensor in memory at a time; deleted at the end). Then, each as its own
subprocess whose peak RSS comes from ``os.wait4``:

- ``pissa init --model CKPT --out OUT --rank r`` (one process; with ``--nproc N`` also one process
  with one thread and N processes under torchrun with one thread each, as torchrun sets it);
- PEFT: ``from_pretrained``, ``get_peft_model(init_lora_weights="pissa_niter_4")``, save the
  adapter and the residual model (``unload()`` + ``save_pretrained``), its documented PiSSA recipe.

Then (``--verify``) the residual checkpoint plus the adapter is checked to reproduce the base
model's logits. Prints a markdown table with ratios and writes it to ``--out``.

    .venv/bin/python benchmarks/stream_init.py                       # ~2.5 GB, the done-criterion
    .venv/bin/python benchmarks/stream_init.py --size-gb 0.3 --hidden 1024 --intermediate 2816 --vocab 16000
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

PEFT_ROUTE = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM
src, out, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", init_lora_weights="pissa_niter_4")
peft_model = get_peft_model(model, cfg)
peft_model.peft_config["default"].init_lora_weights = True
peft_model.save_pretrained(out + "/adapter")
peft_model.unload().save_pretrained(out + "/residual")
"""

VERIFY = """
import sys, torch, pissa
from transformers import LlamaForCausalLM
src, out = sys.argv[1], sys.argv[2]
ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model = pissa.load_adapter(LlamaForCausalLM.from_pretrained(out + "/residual", dtype=torch.float32), out + "/adapter")
    adapted = model(input_ids=ids).logits.double()
    del model
    base = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)(input_ids=ids).logits.double()
print(((adapted - base).norm() / base.norm()).item())
"""


def llama_tensors(hidden: int, intermediate: int, vocab: int, heads: int, kv_heads: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of an untied LlamaForCausalLM, in model order."""
    kv = hidden // heads * kv_heads
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
        ]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def write_shard(path: Path, specs: list[tuple[str, tuple[int, ...]]], gen: torch.Generator) -> None:
    """A float32 safetensors file of random tensors, written one tensor at a time (header first)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        size = 4 * torch.Size(shape).numel()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in specs:
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
            f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))


def make_checkpoint(root: Path, args: argparse.Namespace) -> int:
    """Write config.json, the shards and the index; returns the checkpoint size in bytes."""
    from transformers import LlamaConfig

    per_layer = 4 * (2 * args.hidden**2 + 2 * args.hidden * (args.hidden // args.heads * args.kv_heads) + 3 * args.hidden * args.intermediate)
    layers = max(1, round((args.size_gb * 1e9 - 8 * args.vocab * args.hidden) / per_layer))
    LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, tie_word_embeddings=False, dtype="float32", architectures=["LlamaForCausalLM"],
    ).save_pretrained(root)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in llama_tensors(args.hidden, args.intermediate, args.vocab, args.heads, args.kv_heads, layers):
        nbytes = 4 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > args.shard_gb * 1e9:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, specs in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(root / name, specs, gen)
        weight_map.update({n: name for n, _ in specs})
    total = sum(4 * torch.Size(s).numel() for specs in shards for _, s in specs)
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    print(f"checkpoint: {layers} layers, {len(shards)} shards, {total / 1e9:.2f} GB", flush=True)
    return total


MEASURE = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
json.dump([time.perf_counter() - t0, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)], open(sys.argv[1], "w"))
"""


def measure(cmd: list[str], threads: int | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes of the largest process in the tree) of a subprocess.

    A child's peak RSS counts the memory of the process it was forked from (Linux keeps the
    high-water mark across fork + exec), so the command is started from a small wrapper
    interpreter that imports nothing heavy, and the wrapper reports ``os.wait4``'s numbers.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, "-c", MEASURE, f.name, *cmd], env=env, check=True)
        seconds, rss, code = json.loads(Path(f.name).read_text())
    if code != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return seconds, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.5, help="approximate checkpoint size")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--shard-gb", type=float, default=1.0, help="shard size of the generated checkpoint")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--nproc", type=int, default=1, help="also time `pissa init` under torchrun with this many processes")
    ap.add_argument("--no-peft", action="store_true", help="skip PEFT's route")
    ap.add_argument("--no-verify", action="store_true", help="skip the output check")
    ap.add_argument("--tmp", default=None, help="parent folder of the temporary checkpoint (default: system temp)")
    ap.add_argument("--out", default="benchmarks/results/stream_init.md")
    args = ap.parse_args()

    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="stream-init-", dir=args.tmp) as tmp:
        root = Path(tmp)
        size = make_checkpoint(root / "ckpt", args)
        rows: list[tuple[str, float, int]] = []
        init = ["-m", "pissa", "init", "--model", str(root / "ckpt"), "--rank", str(args.rank)]
        rows.append(("`pissa init` (1 process)", *measure([py, *init, "--out", str(root / "pissa")])))
        if args.nproc > 1:
            rows.append(("`pissa init` (1 process, 1 thread)", *measure([py, *init, "--out", str(root / "pissa-1t")], threads=1)))
            run = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
            label = f"`pissa init` (torchrun, {args.nproc} processes x 1 thread; RSS per process)"
            rows.append((label, *measure([*run, *init, "--out", str(root / "pissa-dist"), "--no-progress"], threads=1)))
        if not args.no_peft:
            script = root / "peft_route.py"
            script.write_text(textwrap.dedent(PEFT_ROUTE))
            rows.append(("PEFT: load, get_peft_model(pissa_niter_4), save", *measure([py, str(script), str(root / "ckpt"), str(root / "peft"), str(args.rank)])))
        check = ""
        if not args.no_verify:
            script = root / "verify.py"
            script.write_text(textwrap.dedent(VERIFY))
            err = subprocess.run([py, script, str(root / "ckpt"), str(root / "pissa")], capture_output=True, text=True, check=True)
            check = f"Residual checkpoint + adapter vs base logits: relative error {float(err.stdout.split()[-1]):.1e}.\n"

    ref_time, ref_rss = rows[-1][1], rows[-1][2]
    lines = [
        f"Checkpoint: Llama-shaped, float32, {size / 1e9:.2f} GB, rank {args.rank}. "
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs (timings measured under load).\n",
        "| route | time (s) | peak RSS (GB) | RSS / checkpoint | time vs last row | RSS vs last row |",
        "|---|---|---|---|---|---|",
    ]
    for label, seconds, rss in rows:
        lines.append(f"| {label} | {seconds:.1f} | {rss / 1e9:.2f} | {rss / size:.0%} | {seconds / ref_time:.2f}x | {rss / ref_rss:.2f}x |")
    text = "\n".join(lines) + "\n\n" + check + "\nCommand: `" + " ".join(["python benchmarks/stream_init.py", *sys.argv[1:]]) + "`\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("# `pissa init` vs PEFT: time and peak memory\n\n" + text)


if __name__ == "__main__":
    main()
