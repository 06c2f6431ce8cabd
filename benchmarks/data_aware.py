"""Data-aware initialization on SmolLM2: pissa's calibration pass + init vs PEFT 0.21's EVA, CorDA and LoRA-GA
preprocessing (time and peak memory, same samples), and the activation-weighted quantization error.

Each variant runs in a child process of its own (fresh interpreter, the model loaded, then timed), so its
peak RSS (``ru_maxrss``) is its own; "added" is the peak minus the RSS right after loading the model
and tokenizing the samples. Pairs use the same reviews (the first N of the Rotten Tomatoes training
split, 64 tokens at most), rank 16, every projection (210 layers):

    pissa eva    = pissa.calibrate (batches of 8) + attach(method="eva")      vs  PEFT get_eva_state_dict
                   (same batches, rho 2, tau 0.99: it cycles them until converged) + initialize_lora_eva_weights
    pissa corda  = calibrate + attach(method="corda")                        vs  PEFT preprocess_corda (one
                   sequence per forward: its hook cannot take batches) + get_peft_model
    pissa lora-ga = calibrate(gradients=True, covariance=False) + attach(method="lora-ga")  vs  PEFT
                   preprocess_loraga (the same batches, forward + backward) + get_peft_model

Then ``pissa analyze quant-error``'s plain (nuclear) and activation-weighted (Frobenius, ``X^T X / n`` of 64
reviews) reductions at rank 16 and 64 on both embedded models (``--sample`` layers per projection type).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_aware.py --threads 1            # bench_out/data_aware.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import Results, add_results_options

VARIANTS = ("pissa-eva", "peft-eva", "pissa-corda", "peft-corda", "pissa-lora-ga", "peft-lora-ga")
SAMPLES = {"eva": 256, "corda": 32, "lora-ga": 32}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""PEFT's CorDA and LoRA-GA preprocessing do not resolve "all-linear": SmolLM2's 210 projections by name."""


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def child(variant: str, rank: int, threads: int) -> dict:
    """Run one variant in this process; returns its times and memory."""
    import torch

    import pissa
    from pissa.calibration.batches import calibration_batches
    from pissa.data.loss import loss_sum
    from pissa.runtime.hub import load_model

    torch.set_num_threads(threads)
    tool, method = variant.split("-", 1)
    model, tok = load_model("smollm2")
    model.eval()
    batches = calibration_batches(tok, "rotten_tomatoes", "causal-lm", SAMPLES[method], 8, 64)
    base = _rss_mb()
    out: dict = {"variant": variant, "samples": SAMPLES[method]}
    start = time.perf_counter()
    if tool == "pissa":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "stats.safetensors"
            grad = method == "lora-ga"  # LoRA-GA reads the gradients alone, as PEFT collects them
            pissa.calibrate(model, batches, gradients=grad, covariance=not grad, out=path)
            out["calibrate_s"] = time.perf_counter() - start
            mid = time.perf_counter()
            pissa.attach(model, pissa.AdapterConfig(method=method, rank=rank, calibration=str(path)))
            out["init_s"] = time.perf_counter() - mid
            out["stats_mb"] = path.stat().st_size / 2**20
    else:
        from peft import EvaConfig, LoraConfig, get_peft_model

        if method == "eva":
            from peft import initialize_lora_eva_weights
            from peft.tuners.lora.eva import get_eva_state_dict

            config = LoraConfig(r=rank, target_modules=PROJECTIONS, init_lora_weights="eva", eva_config=EvaConfig())
            loader = [{"input_ids": b.input_ids, "attention_mask": b.attention_mask} for b in batches]
            state = get_eva_state_dict(model, loader, config, show_progress_bar=False)
            out["calibrate_s"] = time.perf_counter() - start
            mid = time.perf_counter()
            peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
            initialize_lora_eva_weights(peft_model, eva_state_dict=state)
        elif method == "corda":
            from peft.tuners.lora.config import CordaConfig
            from peft.tuners.lora.corda import preprocess_corda

            config = LoraConfig(r=rank, target_modules=PROJECTIONS, init_lora_weights="corda",
                                corda_config=CordaConfig(corda_method="ipm"))

            @torch.no_grad()
            def run() -> None:
                for b in batches:
                    for ids, mask in zip(b.input_ids, b.attention_mask):
                        model(input_ids=ids[mask.bool()][None])

            preprocess_corda(model, config, run_model=run)
            out["calibrate_s"] = time.perf_counter() - start
            mid = time.perf_counter()
            get_peft_model(model, config)
        else:
            from peft.tuners.lora.config import LoraGAConfig
            from peft.tuners.lora.loraga import preprocess_loraga

            config = LoraConfig(r=rank, target_modules=PROJECTIONS, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

            def step() -> None:
                for b in batches:
                    (loss_sum(model, b, "causal-lm") / max(1, b.targets)).backward()

            preprocess_loraga(model, config, step)
            out["calibrate_s"] = time.perf_counter() - start
            mid = time.perf_counter()
            get_peft_model(model, config)
        out["init_s"] = time.perf_counter() - mid
    out["total_s"] = time.perf_counter() - start
    out["peak_mb"] = _rss_mb()
    out["added_mb"] = out["peak_mb"] - base
    return out


def quant_tables(models: list[str], ranks: list[int], sample: int, threads: int) -> list[tuple[str, str]]:
    """(title, markdown) of the plain and the activation-weighted quant-error summaries per model and rank."""
    import torch

    import pissa
    from pissa.analysis.quant_error import (
        layer_ratios,
        markdown_table,
        method_names,
        model_weights,
        summarize,
        weighted_method_names,
    )
    from pissa.calibration.batches import calibration_batches
    from pissa.files.statistics import open_calibration
    from pissa.runtime import hub

    torch.set_num_threads(threads)
    iters = [1, 5]
    out = []
    for name in models:
        kind = hub.resolve_kind(name, "auto")
        model, tok = hub.load_model(name, kind=kind)
        model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "stats.safetensors"
            pissa.calibrate(model, calibration_batches(tok, "rotten_tomatoes", kind, 64, 8, 64), kind=kind, out=path)
            weights = model_weights(name, kind, sample)
            calib = open_calibration(path)
            covs = {n: calib.layer_stats(n, ["covariance"]).cov for n in weights}
            for rank in ranks:
                start = time.perf_counter()
                rows = layer_ratios(weights, rank, iters, covariances=covs)  # type: ignore[arg-type]
                seconds = time.perf_counter() - start
                plain = markdown_table(summarize(rows, method_names(iters)), method_names(iters))
                wm = weighted_method_names(iters)
                weighted = markdown_table(summarize(rows, wm, weighted=True), wm)
                out.append((f"{name}, rank {rank}: nuclear-norm reduction (%) ({len(rows)} layers, {seconds:.0f} s)", plain))
                out.append((f"{name}, rank {rank}: activation-weighted reduction (%)", weighted))
                print(out[-1][0], "\n", weighted, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quant-models", nargs="*", default=["smollm2", "minilm"])
    parser.add_argument("--quant-ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--sample", type=int, default=2, help="layers per projection type in the quant-error tables")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_results_options(parser, "data_aware")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.rank, args.threads)), flush=True)
        return
    title = "Data-aware initialization: pissa vs PEFT 0.21 preprocessing, weighted quantization error"
    with Results.from_args(args, title) as res:
        rows, results = [], {}
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--child", variant, "--rank", str(args.rank), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                err = (done.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append([variant, "-", "-", "-", "-", "-", f"failed: {err[:120]}"])
                print(variant, "failed:", err, flush=True)
                continue
            r = json.loads(line[len("RESULT "):])
            results[variant] = r
            rows.append([variant, str(r["samples"]), f"{r['calibrate_s']:.1f}", f"{r['init_s']:.1f}", f"{r['total_s']:.1f}",
                         f"{r['peak_mb']:.0f}", f"{r['added_mb']:.0f}"])
            print(" | ".join(rows[-1]), flush=True)
        res.add(f"SmolLM2-135M-Instruct, rank {args.rank}, all 210 projections, Rotten Tomatoes reviews (max 64 tokens), "
                f"torch threads {args.threads}; each variant in a fresh child process. 'calibration': pissa.calibrate or "
                "PEFT's preprocessing (data passes); 'init': attach / get_peft_model (+ EVA's weight loading); "
                "'added MB': peak RSS minus the RSS after loading the model. pissa-lora-ga collects the gradients alone "
                "(calibrate(covariance=False)), as PEFT does.")
        res.table(["variant", "samples", "calibration (s)", "init (s)", "total (s)", "peak RSS (MB)", "added (MB)"], rows)
        ratios = []
        for method in ("eva", "corda", "lora-ga"):
            ours, theirs = results.get(f"pissa-{method}"), results.get(f"peft-{method}")
            if ours and theirs:
                memory = theirs["added_mb"] / max(ours["added_mb"], 1)
                ratios.append([method, f"{theirs['total_s'] / ours['total_s']:.1f}x", f"{memory:.1f}x"])
        if ratios:
            res.table(["method", "PEFT time / pissa time", "PEFT added memory / pissa's"], ratios)
        if args.quant_models:
            res.add("Quantization error (NF4, exact rank-r SVDs, at most "
                    f"{args.sample} layers per projection type): the paper's nuclear-norm reduction, then the "
                    "activation-weighted one 1 - ||(W - Q - BA) X^T||_F / ||(W - nf4(W)) X^T||_F with X^T X / n from 64 "
                    "reviews (EoRA: nf4(W) + its weighted compensation; QPiSSA+EoRA-T: QPiSSA's Q_T with the weighted "
                    "last step).")
            for title, table in quant_tables(args.quant_models, args.quant_ranks, args.sample, args.threads):
                res.add(f"**{title}**\n\n{table}")


if __name__ == "__main__":
    main()
