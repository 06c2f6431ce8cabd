"""Exactness at init in each base dtype: how far the adapted model's outputs are from its base's.

For each ``--dtypes`` entry the embedded model is loaded in that dtype, its logits on a few
reviews are recorded, ``pissa.attach`` (PiSSA, ``--rank``) adapts it, and the logits are compared:
``||adapted - base|| / ||base||`` over all positions. The residual is computed in float32 and
rounded once to the base dtype, so this is that rounding's effect; for scale, the same-dtype base's
own distance from the float32 base is listed too.

    .venv/bin/python benchmarks/init_exactness.py

Writes ``bench_out/init_exactness.md`` (``--update-results``: ``benchmarks/results/init_exactness.md``).
"""

from __future__ import annotations

import argparse

import torch

import pissa
from _results import Results, add_results_options
from pissa.data.datasets import load_dataset
from pissa.runtime.hub import load_model


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--examples", type=int, default=8)
    add_results_options(p, "init_exactness")
    args = p.parse_args()
    with Results.from_args(args, "Exactness at init per base dtype") as res:
        data = load_dataset("rotten_tomatoes", test_size=0)
        texts = [e.prompt + e.completion for e in data.train[: args.examples]]
        rows, reference = [], None
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            model, tok = load_model(args.model, dtype=dtype)
            batch = tok(texts, return_tensors="pt", padding=True)
            base = logits(model, batch)
            if reference is None:
                reference = base if dtype == torch.float32 else logits(load_model(args.model)[0], batch)
            pissa.attach(model, pissa.AdapterConfig(rank=args.rank))
            adapted = logits(model, batch)
            rows.append([name, f"{rel(adapted, base):.2e}", f"{rel(base, reference):.2e}"])
        res.add(f"Model {args.model}, PiSSA rank {args.rank} on every projection, {len(texts)} reviews "
                f"({int(batch['attention_mask'].sum())} tokens); factors float32, residual computed in float32 and cast once.")
        res.table(["base dtype", "adapted vs same-dtype base (relative logit error)", "same-dtype base vs float32 base"], rows)


if __name__ == "__main__":
    main()
