"""`pissa init` and the streaming merge on a checkpoint on disk: peak memory whatever the page cache
holds, wall time, and PEFT's in-memory route for comparison.

A Llama-shaped random float32 checkpoint of about ``--size-gb`` is written shard by shard into a
temporary folder (one tensor in memory at a time; deleted at the end). Then, each as its own
process started from a small wrapper interpreter (peak RSS from ``os.wait4``; RssAnon / RssFile,
the anonymous and the file-backed part of the RSS, sampled from ``/proc`` every 5 ms):

1. ``pissa init`` right after the checkpoint was written (its pages in the page cache, dirty);
2. ``pissa init`` again after the checkpoint was written back and dropped from the page cache
   (``fsync`` + ``posix_fadvise(POSIX_FADV_DONTNEED)``);
3. the streaming merge (``pissa.merge_checkpoint``) of the residual checkpoint that run 2
   has just written plus its adapter, and 4. the same after dropping that checkpoint;
5. (``--nproc N``) ``pissa init`` with one thread, and N processes under torchrun;
6. the floor under those runs (the interpreter with torch and pissa imported), and the short-lived
   child they start to read config.json (transformers and the model skeleton on the meta device);
7. PEFT: ``from_pretrained``, ``get_peft_model(init_lora_weights="pissa_niter_4")``, save the
   adapter and the residual model, its documented PiSSA recipe (``--no-peft`` skips it).

The share of each input checkpoint resident in the page cache when a run starts is measured with
``mincore(2)``. Then (unless ``--no-verify``) the residual checkpoint plus adapter and the merged
checkpoint are checked against the base model's logits. Writes ``bench_out/stream_init.md``
(``--update-results``: ``benchmarks/results/stream_init.md``).

    .venv/bin/python benchmarks/stream_init.py --update-results           # ~2.5 GB checkpoint
    .venv/bin/python benchmarks/stream_init.py --size 0.3 --no-peft       # a quick run
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

from _common import measure as measure_run
from _results import Results, add_results_options

LIMIT = 0.20
"""Peak RSS / checkpoint size that `pissa init` and the merge must stay under."""

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

MERGE = """
import sys
from pissa.checkpoints.merge import merge_checkpoint
merge_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
"""

FLOOR = "import pissa.cli"

ARCHITECTURE = """
import sys
from pathlib import Path
from pissa.checkpoints.architecture import describe
describe(Path(sys.argv[1]), "all-linear")
"""

VERIFY = """
import sys, torch, pissa
from transformers import LlamaForCausalLM
src, out, merged = sys.argv[1], sys.argv[2], sys.argv[3]
ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model = pissa.load_adapter(LlamaForCausalLM.from_pretrained(out + "/residual", dtype=torch.float32), out + "/adapter")
    adapted = model(input_ids=ids).logits.double()
    del model
    remerged = LlamaForCausalLM.from_pretrained(merged, dtype=torch.float32)(input_ids=ids).logits.double()
    base = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)(input_ids=ids).logits.double()
print(((adapted - base).norm() / base.norm()).item(), ((remerged - base).norm() / base.norm()).item())
"""

def llama_tensors(
    hidden: int, intermediate: int, vocab: int, heads: int, kv_heads: int, layers: int
) -> list[tuple[str, tuple[int, ...]]]:
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
        for _, shape in specs:
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen).mul_(0.02)
            f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))


def make_checkpoint(root: Path, args: argparse.Namespace) -> int:
    """Write config.json, the shards and the index; returns the checkpoint size in bytes."""
    from transformers import LlamaConfig

    kv = args.hidden // args.heads * args.kv_heads
    per_layer = 4 * (2 * args.hidden**2 + 2 * args.hidden * kv + 3 * args.hidden * args.intermediate)
    layers = max(1, round((args.size_gb * 1e9 - 8 * args.vocab * args.hidden) / per_layer))
    LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, tie_word_embeddings=False, dtype="float32",
        architectures=["LlamaForCausalLM"],
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
    with open(root / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    print(f"checkpoint: {layers} layers, {len(shards)} shards, {total / 1e9:.2f} GB", flush=True)
    return total


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def drop_from_page_cache(folder: Path) -> None:
    """Write the checkpoint's dirty pages back, then evict all its pages from the page cache."""
    for path in shards(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def page_cache_share(folder: Path) -> float | None:
    """The share of the checkpoint's bytes resident in the page cache (``mincore``); None where unavailable.

    Maps each file without touching it (mincore faults nothing in) in this process, not the measured one.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    except (OSError, AttributeError):
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = 0
    for path in shards(folder):
        size = path.stat().st_size
        pages = -(-size // page)
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            vec = (ctypes.c_ubyte * pages)()
            ok = libc.mincore(addr, size, vec) == 0
            libc.munmap(addr, size)
        finally:
            os.close(fd)
        if not ok:
            return None
        resident += sum(1 for b in bytes(vec) if b & 1)
        total += pages
    return resident / total if total else None


def measure(cmd: list[str], threads: int | None = None) -> dict[str, float]:
    """Wall seconds, peak RSS (bytes) of the largest process in the tree, and the sampled peaks of the
    command's own RssAnon and RssFile (:func:`_common.measure`: the command starts from a small wrapper
    interpreter, so its peak is not this process's, which wrote the checkpoint)."""
    m = measure_run(cmd, env=None if threads is None else {"OMP_NUM_THREADS": str(threads)})
    if not m.ok:
        raise SystemExit(f"failed: {' '.join(cmd)}: {m.failure}")
    return {"seconds": m.seconds, "rss": m.rss, "anon": m.anon, "file": m.file}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", "--size", type=float, default=2.5,
                    help="approximate checkpoint size in GB (e.g. 0.3 for a quick run)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--shard-gb", type=float, default=1.0, help="shard size of the generated checkpoint")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--nproc", type=int, default=1, help="also time `pissa init` under torchrun with this many processes")
    ap.add_argument("--no-peft", action="store_true", help="skip PEFT's route")
    ap.add_argument("--no-verify", action="store_true", help="skip the output checks")
    ap.add_argument("--tmp", default=None, help="parent folder of the temporary checkpoint (default: system temp)")
    add_results_options(ap, "stream_init")
    args = ap.parse_args()

    with Results.from_args(args, "`pissa init` and the streaming merge: peak memory whatever the page cache holds") as res:
        py = sys.executable
        rows: list[tuple[str, str, dict[str, float]]] = []
        with tempfile.TemporaryDirectory(prefix="stream-init-", dir=args.tmp) as tmp:
            root = Path(tmp)
            ckpt = root / "ckpt"
            size = make_checkpoint(ckpt, args)

            def run(label: str, src: Path | None, cmd: list[str], threads: int | None = None) -> None:
                share = None if src is None else page_cache_share(src)
                cached = "-" if src is None else "n/a" if share is None else f"{share:.0%}"
                rows.append((label, cached, measure(cmd, threads)))
                print(f"{label}: {rows[-1][2]}", flush=True)

            def init(out: str) -> list[str]:
                return [py, "-m", "pissa", "init", "--model", str(ckpt), "--rank", str(args.rank), "--out", str(root / out),
                        "--no-progress"]

            run("`pissa init`, checkpoint just written", ckpt, init("init-fresh"))
            drop_from_page_cache(ckpt)
            run("`pissa init`, checkpoint dropped from the page cache", ckpt, init("init"))
            residual, adapter = root / "init" / "residual", root / "init" / "adapter"
            merge = [py, "-c", MERGE, str(residual), str(adapter)]
            run("merge, residual checkpoint just written by `pissa init`", residual, [*merge, str(root / "merged-fresh")])
            drop_from_page_cache(residual)
            run("merge, checkpoint dropped from the page cache", residual, [*merge, str(root / "merged")])
            if args.nproc > 1:
                run("`pissa init`, 1 thread", ckpt, init("init-1t"), threads=1)
                torchrun = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
                label = f"`pissa init`, torchrun {args.nproc} processes x 1 thread (RSS per process)"
                run(label, ckpt, [*torchrun, *init("init-dist")[1:]], threads=1)
            run("floor of the runs above: interpreter, torch, pissa", None, [py, "-c", FLOOR])
            run("their child that reads config.json: + transformers, model skeleton", None, [py, "-c", ARCHITECTURE, str(ckpt)])
            if not args.no_peft:
                script = root / "peft_route.py"
                script.write_bytes(textwrap.dedent(PEFT_ROUTE).encode())
                peft = [py, str(script), str(ckpt), str(root / "peft"), str(args.rank)]
                run("PEFT: load, get_peft_model(pissa_niter_4), save", ckpt, peft)
            checks = ""
            if not args.no_verify:
                script = root / "verify.py"
                script.write_bytes(textwrap.dedent(VERIFY).encode())
                cmd = [py, str(script), str(ckpt), str(root / "init"), str(root / "merged")]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                adapted, merged = (float(x) for x in out.stdout.split()[-2:])
                checks = (f"Relative error of the logits vs the base model: residual checkpoint + adapter {adapted:.1e}; "
                          f"merged checkpoint (residual + untrained adapter) {merged:.1e}.")

        gb = lambda x: "n/a" if x is None else f"{x / 1e9:.2f}"
        streamed = [r for r in rows if r[0].startswith(("`pissa init`", "merge"))]
        worst = max(r[2]["rss"] for r in streamed) / size
        res.add(
            f"Checkpoint: Llama-shaped, float32, {size / 1e9:.2f} GB in {args.shard_gb:g} GB shards, rank {args.rank}. "
            f"Peak RSS from `os.wait4`: exact, the largest process of the run's tree (so it covers the child that "
            f"reads config.json, which exits before the first tensor is read, while its parent holds only the floor). "
            f"RssAnon / RssFile (anonymous / file-backed pages, the latter mostly shared libraries) are peaks of samples "
            f"taken every 5 ms of the command's own process. \"Page cache\": the share of "
            f"the input checkpoint resident in the page cache when the run started (`mincore`). Limit: peak RSS under "
            f"{LIMIT:.0%} of the checkpoint; the largest streamed run: {worst:.1%}, "
            f"{'under' if worst < LIMIT else 'OVER'} the limit."
        )
        res.table(
            ["run", "page cache", "time (s)", "peak RSS (GB)", "peak RSS / checkpoint", "RssAnon (GB)", "RssFile (GB)"],
            [[label, cached, f"{m['seconds']:.1f}", gb(m["rss"]), f"{m['rss'] / size:.1%}", gb(m["anon"]), gb(m["file"])]
             for label, cached, m in rows],
        )
        if checks:
            res.add(checks)


if __name__ == "__main__":
    main()
