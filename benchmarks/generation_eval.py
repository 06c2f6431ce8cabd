"""Time of the generation evaluation: pissa's one-pass scorer vs a loss pass + transformers' ``generate``.

SmolLM2-135M-Instruct in float32, PiSSA rank 16 on every projection with B perturbed (so that the
adapted model is not the base and merging is not trivial), the first ``--n`` problems of the
embedded ``arithmetic`` test split, greedy decoding for at most ``--max-new-tokens`` tokens.

- ``anchor``: what a user writes with transformers: a teacher-forced loss pass over each batch
  (right-padded prompt + reference answer, loss on the answer tokens), then
  ``model.generate(do_sample=False)`` on the left-padded prompts, adapted layers unmerged.
- ``pissa``: :func:`pissa.training.evaluation.evaluate_generation` (one forward gives the loss and the prompts'
  KV cache, finished rows leave the batch, float32 adapted layers merged while it runs), at each
  of ``--batch-sizes``.

Every variant sees the same problems in the same batches (sorted by prompt length); the script
checks that all produce the same accuracy and loss (to float rounding). Variants run one after the other in one process,
``--rounds`` times in alternating order; times are medians.

    .venv/bin/python benchmarks/generation_eval.py --update-results
    .venv/bin/python benchmarks/generation_eval.py --n 8 --batch-sizes 4,8 --max-new-tokens 8   # quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from _results import Results, add_results_options
from pissa.adapter.attach import attach
from pissa.adapter.config import AdapterConfig
from pissa.data.answers import answers_match
from pissa.data.batches import collate
from pissa.data.datasets import load_data
from pissa.data.encoding import Encoded, encode_all
from pissa.inference.decoding import end_tokens, left_padded
from pissa.runtime import hub
from pissa.training.evaluation import evaluate_generation


def anchor(model, tokenizer, items: Sequence[Encoded], references: Sequence[str], *, pad_id: int,
           max_new_tokens: int, batch_size: int) -> dict[str, float]:
    """Loss pass + ``model.generate`` per batch (batches by prompt length): ``{"loss", "accuracy"}``."""
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
    accuracy = sum(answers_match(t, ref) for t, ref in zip(texts, references)) / len(items)
    return {"loss": total / count, "accuracy": accuracy}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="test problems scored")
    p.add_argument("--batch-sizes", default="16,64", help="pissa's batch sizes (comma-separated)")
    p.add_argument("--anchor-batch", type=int, default=16, help="the anchor's batch size")
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_results_options(p, "generation_eval")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    title = "Generation evaluation: pissa's one-pass scorer vs loss pass + transformers generate (SmolLM2, arithmetic)"
    with Results.from_args(args, title) as res:
        model, tokenizer = hub.load_model("smollm2", kind="causal-lm", dtype=torch.float32)
        attach(model, AdapterConfig(method="pissa", rank=args.rank), progress=False)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".B"):
                    param.add_(0.02 * param.abs().mean() * torch.randn(param.shape, generator=generator))
        model.eval()
        dataset = load_data("arithmetic")
        examples = dataset.test[: args.n]
        items = encode_all(tokenizer, examples, None, "causal-lm", 160)
        references = [e.completion for e in examples]
        pad = int(tokenizer.pad_token_id)
        variants = [("anchor", args.anchor_batch)] + [("pissa", b) for b in sizes]
        times: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
        metrics: dict[tuple[str, int], dict[str, float]] = {}
        for round_ in range(args.rounds):
            for variant in variants if round_ % 2 == 0 else variants[::-1]:
                start = time.perf_counter()
                if variant[0] == "anchor":
                    metrics[variant] = anchor(model, tokenizer, items, references, pad_id=pad,
                                              max_new_tokens=args.max_new_tokens, batch_size=variant[1])
                else:
                    metrics[variant] = evaluate_generation(model, tokenizer, items, references, pad_id=pad,
                                                           max_new_tokens=args.max_new_tokens, batch_size=variant[1])
                times[variant].append(time.perf_counter() - start)
                print(f"round {round_} {variant[0]} batch {variant[1]}: {times[variant][-1]:.1f} s {metrics[variant]}",
                      flush=True)
        base = statistics.median(times[variants[0]])
        rows = []
        for v in variants:
            t = statistics.median(times[v])
            rows.append([v[0], v[1], f"{t:.1f}", " ".join(f"{x:.1f}" for x in times[v]), f"{base / t:.2f}x",
                         f"{metrics[v]['accuracy']:.3f}", f"{metrics[v]['loss']:.6f}"])
        losses = [m["loss"] for m in metrics.values()]
        accuracies = {m["accuracy"] for m in metrics.values()}
        if max(losses) - min(losses) > 1e-4 * abs(losses[0]) or len(accuracies) != 1:
            raise SystemExit(f"variants disagree: {metrics}")
        res.add(f"SmolLM2-135M-Instruct float32, PiSSA rank {args.rank} on every projection (B perturbed), the first "
                f"{args.n} problems of the arithmetic test split, greedy, at most {args.max_new_tokens} new tokens, "
                f"torch threads {args.threads}, {args.rounds} round(s) (times: median, then each round). "
                "Speed-up: anchor time / variant time. All variants gave the same accuracy and loss "
                "(checked by the script, loss to 1e-4 relative).")
        res.table(["variant", "batch", "time (s)", "per round", "speed-up", "accuracy", "loss"], rows)


if __name__ == "__main__":
    main()
