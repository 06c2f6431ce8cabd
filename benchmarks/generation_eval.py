"""Time of the generation evaluation: pissa's one-pass scorer (float32, bfloat16) vs a loss pass + transformers' ``generate``.

SmolLM2-135M-Instruct in float32, PiSSA rank 16 on every projection with B perturbed (so that the
adapted model is not the base and merging is not trivial), the first ``--n`` problems of the
embedded ``arithmetic`` test split, greedy decoding for at most ``--max-new-tokens`` tokens.

- ``anchor``: what a user writes with transformers: a teacher-forced loss pass over each batch
  (right-padded prompt + reference answer, loss on the answer tokens), then
  ``model.generate(do_sample=False)`` on the left-padded prompts, adapted layers unmerged, float32.
- ``pissa float32``: :func:`pissa.training.evaluation.evaluate_generation` (one forward gives the loss and
  the prompts' KV cache, finished rows leave the batch, the adapted layers merged while it runs).
- ``pissa bfloat16``: the same with ``--eval-dtype bfloat16``: the merged layers and the head multiply in
  bfloat16 (:func:`pissa.inference.decoding.merged_for_inference`), the rest stays float32.

All variants see the same problems, batched by prompt length. The script fails unless pissa float32
gives the anchor's loss (to 1e-4 relative) and, problem by problem, the anchor's extracted answer; it
reports how many whole generated texts are identical too. bfloat16 may change answers where logits
nearly tie: the script reports its accuracy, the answers equal to float32's, the accuracy difference
with its paired standard error (sd of the per-problem differences of correctness / sqrt(n)) and the
loss difference, and fails only if the accuracies differ by more than 2 paired standard errors.
Variants run one after the other in one process, ``--rounds`` times in alternating order; times are
medians; speed-up = anchor time / variant time.

    .venv/bin/python benchmarks/generation_eval.py --update-results                          # both cores
    .venv/bin/python benchmarks/generation_eval.py --n 8 --batch-size 8 --max-new-tokens 8   # quick
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from _results import Results, add_results_options
from pissa.adapter.attach import attach
from pissa.adapter.config import AdapterConfig
from pissa.data.answers import answers_match, extract_answer
from pissa.data.batches import collate
from pissa.data.datasets import load_data
from pissa.data.encoding import Encoded, encode_all
from pissa.inference.decoding import end_tokens, left_padded
from pissa.runtime import hub
from pissa.runtime.devices import torch_dtype
from pissa.training.evaluation import generated_texts


def anchor(model, tokenizer, items: Sequence[Encoded], *, pad_id: int, max_new_tokens: int,
           batch_size: int) -> tuple[float, list[str]]:
    """Loss pass + ``model.generate`` per batch (batches by prompt length): ``(loss, generated texts)``."""
    order = sorted(range(len(items)), key=lambda i: (items[i].n_prompt, len(items[i].ids)))
    texts: list[str] = [""] * len(items)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = collate([items[i] for i in chunk], pad_id, "causal-lm")  # right-padded prompt + answer
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
            mask = batch.target_mask[:, 1:]
            total += F.cross_entropy(logits[mask].float(), batch.input_ids[:, 1:][mask], reduction="sum").item()
            count += int(mask.sum())
            del logits
            width = max(items[i].n_prompt for i in chunk)
            prompts, attention = left_padded([items[i].ids[: items[i].n_prompt] for i in chunk], pad_id, width)
            new = model.generate(input_ids=prompts, attention_mask=attention, do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                 eos_token_id=end_tokens(tokenizer, model))[:, width:]
            for r, i in enumerate(chunk):
                texts[i] = tokenizer.decode(new[r], skip_special_tokens=True)
    return total / count, texts


def paired_difference(a: Sequence[bool], b: Sequence[bool]) -> tuple[float, float]:
    """``(mean(a - b), sd(a - b) / sqrt(n))``: the accuracy difference of two scorings of the same n problems and
    its paired standard error (sample sd; 0 for one problem)."""
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return statistics.fmean(diffs), sd / math.sqrt(len(diffs))


def same(texts: Sequence[str], other: Sequence[str]) -> tuple[int, int]:
    """(problems whose extracted answer is the same, problems whose whole text is the same)."""
    return (sum(extract_answer(x) == extract_answer(y) for x, y in zip(texts, other)),
            sum(x == y for x, y in zip(texts, other)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="test problems scored")
    p.add_argument("--batch-size", type=int, default=64, help="pissa's batch size: rows decoded at once")
    p.add_argument("--anchor-batch", type=int, default=64, help="the anchor's batch size (64: its fastest here)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="pissa's --eval-dtype variants (comma-separated)")
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2: both cores of the dev machine)")
    add_results_options(p, "generation_eval")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtypes = args.dtypes.split(",")
    if "float32" not in dtypes or any(d not in ("float32", "bfloat16") for d in dtypes):
        p.error("--dtypes: float32 (checked against the anchor) and optionally bfloat16")
    title = ("Generation evaluation: pissa's one-pass scorer (float32, bfloat16) vs loss pass + transformers generate "
             "(SmolLM2, arithmetic)")
    with Results.from_args(args, title) as res:
        model, tokenizer = hub.load_model("smollm2", kind="causal-lm", dtype=torch.float32)
        attach(model, AdapterConfig(method="pissa", rank=args.rank), progress=False)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".B"):
                    param.add_(0.02 * param.abs().mean() * torch.randn(param.shape, generator=generator))
        model.eval()
        examples = load_data("arithmetic").test[: args.n]
        items = encode_all(tokenizer, examples, None, "causal-lm", 160)
        references = [e.completion for e in examples]
        pad = int(tokenizer.pad_token_id)
        variants = [("anchor", "float32", args.anchor_batch)] + [("pissa", d, args.batch_size) for d in dtypes]
        times: dict[tuple[str, str, int], list[float]] = {v: [] for v in variants}
        outputs: dict[tuple[str, str, int], tuple[float, list[str]]] = {}
        correct: dict[tuple[str, str, int], list[bool]] = {}
        for round_ in range(args.rounds):
            for v in variants if round_ % 2 == 0 else variants[::-1]:
                start = time.perf_counter()
                if v[0] == "anchor":
                    outputs[v] = anchor(model, tokenizer, items, pad_id=pad, max_new_tokens=args.max_new_tokens,
                                        batch_size=v[2])
                else:  # what evaluate_generation runs, with its texts kept for the checks
                    outputs[v] = generated_texts(model, tokenizer, items, pad_id=pad, max_new_tokens=args.max_new_tokens,
                                                 batch_size=v[2], dtype=torch_dtype(v[1]))
                times[v].append(time.perf_counter() - start)
                correct[v] = [answers_match(t, r) for t, r in zip(outputs[v][1], references)]
                print(f"round {round_} {v[0]} {v[1]} batch {v[2]}: {times[v][-1]:.1f} s, loss {outputs[v][0]:.6f}, "
                      f"accuracy {statistics.fmean(correct[v]):.3f}", flush=True)
        base = statistics.median(times[variants[0]])
        base_loss, base_texts = outputs[variants[0]]
        fp32 = ("pissa", "float32", args.batch_size)
        rows = []
        for v in variants:
            t = statistics.median(times[v])
            loss, texts = outputs[v]
            answers, whole = same(texts, base_texts)
            rows.append([v[0], v[1], v[2], f"{t:.1f}", " ".join(f"{x:.1f}" for x in times[v]), f"{base / t:.2f}x",
                         f"{statistics.fmean(correct[v]):.3f}", f"{loss:.6f}", f"{answers}/{len(items)}",
                         f"{whole}/{len(items)}"])
        loss, texts = outputs[fp32]
        answers = same(texts, base_texts)[0]
        if abs(loss - base_loss) > 1e-4 * abs(base_loss) or answers != len(items):
            raise SystemExit(f"pissa float32 disagrees with the anchor: loss {loss} vs {base_loss}, "
                             f"{len(items) - answers} of {len(items)} answers differ")
        res.add(f"SmolLM2-135M-Instruct float32, PiSSA rank {args.rank} on every projection (B perturbed), the first "
                f"{args.n} problems of the arithmetic test split, greedy, at most {args.max_new_tokens} new tokens, "
                f"torch threads {args.threads}, {args.rounds} round(s) (times: median, then each round). "
                "Speed-up: anchor time / variant time. Same answers / texts: problems whose extracted answer / "
                "whole generated text equals the anchor's (the script fails unless pissa float32 gives every "
                "answer and the loss, to 1e-4 relative, of the anchor).")
        res.table(["variant", "eval dtype", "batch", "time (s)", "per round", "speed-up", "accuracy", "loss",
                   "same answers", "same texts"], rows)
        if "bfloat16" in dtypes:
            bf16 = ("pissa", "bfloat16", args.batch_size)
            diff, se = paired_difference(correct[bf16], correct[fp32])
            answers, whole = same(outputs[bf16][1], outputs[fp32][1])
            res.heading("bfloat16 vs float32 (pissa, same problems)")
            res.add("Accuracy difference bfloat16 - float32 with its paired standard error (sd of the per-problem "
                    "differences of correctness / sqrt(n)); the script fails if it exceeds 2 standard errors.")
            res.table(["accuracy bf16", "accuracy fp32", "difference", "paired SE", "same answers as fp32",
                       "same texts as fp32", "loss bf16 - fp32", "time fp32 / bf16"],
                      [[f"{statistics.fmean(correct[bf16]):.3f}", f"{statistics.fmean(correct[fp32]):.3f}",
                        f"{diff:+.3f}", f"{se:.3f}", f"{answers}/{len(items)}", f"{whole}/{len(items)}",
                        f"{outputs[bf16][0] - outputs[fp32][0]:+.6f}",
                        f"{statistics.median(times[fp32]) / statistics.median(times[bf16]):.2f}x"]])
            if abs(diff) > 2 * se + 1e-12:
                raise SystemExit(f"bfloat16 accuracy differs from float32's by {diff:+.3f}, more than 2 paired "
                                 f"standard errors ({se:.3f})")


if __name__ == "__main__":
    main()
