"""Merging three PiSSA adapters of SmolLM2-135M-Instruct trained on different tasks: RMM vs linear / TIES / DARE.

Tasks, all from data pissa ships: ``sentiment`` (the embedded Rotten Tomatoes reviews, label scored by
likelihood: accuracy), ``arithmetic`` (the embedded chat word problems, max length 128: exact match of greedy
generations) and ``chat`` (chatterbot-corpus's English conversations as prompt/completion, the first line asks
and the second answers: teacher-forced answer loss, lower is better).

1. Sweep: each task at each of its ``--lrs-*`` rates, seed 0, ``--steps`` steps, trained on its training split
   minus a validation split of ``--val-size`` (``RunConfig.val_size``), scored on that validation split
   (sentiment: accuracy, before and after; the others: answer loss). The test split is not read.
2. The adapter of each task's chosen rate (trained on the reduced training split) is kept; the variants are the
   originals, the RMM reconstructions at ``--ps`` (``pissa merge-adapters --p``, then ``--task``), and one
   linear / TIES (``--density``) / DARE (``--drop``) merge; each variant is scored on every task's test split
   (the first ``--test-size`` examples; arithmetic: ``--gen-size`` problems, loss and generation).

    .venv/bin/python benchmarks/merge_adapters.py --update-results
    .venv/bin/python benchmarks/merge_adapters.py --steps 2 --val-size 8 --test-size 8 --gen-size 4 --lrs-sentiment 1e-4 \\
        --lrs-arithmetic 1e-4 --lrs-chat 1e-4       # quick

Finished sweep runs are kept in ``--work`` and reused when they ran with the same config.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from _results import Results, add_results_options
from _validation import run_cached

TASKS = ("sentiment", "arithmetic", "chat")
HIGHER_IS_BETTER = {"sentiment": True, "arithmetic": True, "chat": False}


def chat_jsonl(path: Path) -> int:
    """chatterbot-corpus's English conversations as prompt/completion rows (first line asks, second answers)."""
    import chatterbot_corpus  # a declared test dependency (pyproject's test extra)
    import yaml

    rows = []
    for f in sorted((Path(chatterbot_corpus.__file__).parent / "data" / "english").glob("*.yml")):
        for talk in yaml.safe_load(f.read_text()).get("conversations", []):
            if len(talk) >= 2 and all(isinstance(x, str) and x.strip() for x in talk[:2]):
                rows.append({"prompt": talk[0].strip(), "completion": " " + talk[1].strip()})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def task_config(args: argparse.Namespace, task: str, lr: float, data: dict[str, str]):
    from pissa.adapter.config import AdapterConfig
    from pissa.training.config import RunConfig

    return RunConfig(adapter=AdapterConfig(method="pissa", rank=args.rank), data=data[task], lr=lr, steps=args.steps,
                     batch_size=args.batch_size, max_length=128 if task == "arithmetic" else 64, warmup=args.warmup,
                     threads=args.threads, save_every=0, eval="likelihood",
                     eval_size=args.gen_size if task == "arithmetic" else args.test_size,
                     max_new_tokens=args.max_new_tokens)


def score(session, task: str, gen_size: int, max_new_tokens: int) -> dict[str, float]:
    """The task's test score of ``session.model``: sentiment accuracy, arithmetic exact match (generation on the
    first ``gen_size`` problems), chat answer loss; plus the test loss."""
    import torch

    from pissa.training.evaluation import evaluate_generation

    ev = session.evaluate()
    out = {"loss": ev["loss"], "accuracy": ev["accuracy"]}
    if task == "arithmetic":
        with torch.no_grad():
            gen = evaluate_generation(session.model, session.tokenizer, session.test[:gen_size],
                                      session.references[:gen_size], pad_id=session.pad_id,
                                      max_new_tokens=max_new_tokens, batch_size=gen_size)
        out["accuracy"] = gen["accuracy"]
    out["score"] = out["loss"] if task == "chat" else out["accuracy"]
    return out


def label_diagnostic(session) -> dict[str, float]:
    """Sentiment test examples: the mean probability the model puts on the two label tokens together, the share it
    predicts positive, and the accuracy (the label scoring of ``pissa.training.evaluation``: the likelier label)."""
    import torch

    from pissa.data.batches import collate
    from pissa.data.loss import completion_logits

    first = [ids[0] for ids in session.label_ids]
    assert all(len(ids) == 1 for ids in session.label_ids), "single-token labels"
    probs = []
    with torch.no_grad():
        for start in range(0, len(session.test), 32):
            chunk = session.test[start : start + 32]
            logits, _ = completion_logits(session.model, collate(chunk, session.pad_id, "causal-lm", session.device))
            probs.append(logits.softmax(-1)[:, first].double())
    p = torch.cat(probs)
    gold = torch.tensor([e.label for e in session.test])
    positive = [label.strip() for label in session.dataset.labels].index("positive")
    return {"mass": p.sum(1).mean().item(), "positive_share": (p.argmax(1) == positive).double().mean().item(),
            "accuracy": (p.argmax(1) == gold).double().mean().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lrs-sentiment", default="5e-5,2e-4")
    p.add_argument("--lrs-arithmetic", default="5e-5,2e-4")
    p.add_argument("--lrs-chat", default="5e-5,2e-4")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--val-size", type=int, default=32, help="validation examples carved from each training split")
    p.add_argument("--test-size", type=int, default=48, help="test examples scored per task")
    p.add_argument("--gen-size", type=int, default=24, help="arithmetic test problems scored by generation")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--ps", default="1,2", help="RMM components kept per position")
    p.add_argument("--density", type=float, default=0.5, help="TIES density")
    p.add_argument("--drop", type=float, default=0.5, help="DARE drop probability")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="folder of the runs (default: a temporary folder); finished runs are reused")
    add_results_options(p, "merge_adapters")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    ps = [int(x) for x in args.ps.split(",")]
    grids = {t: [float(x) for x in getattr(args, f"lrs_{t}").split(",")] for t in TASKS}
    title = "Merging PiSSA adapters of three tasks (SmolLM2-135M-Instruct): RMM reconstructions vs linear / TIES / DARE"
    with Results.from_args(args, title) as res, tempfile.TemporaryDirectory(prefix="merge-adapters-") as tmp:
        from pissa import load_adapter
        from pissa.checkpoints.merge_adapters import merge_adapters, merge_single, rebuild_task
        from pissa.training.session import prepare

        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        dialogs = chat_jsonl(work / "chat.jsonl")
        data = {"sentiment": "rotten_tomatoes", "arithmetic": "arithmetic", "chat": str(work / "chat.jsonl")}
        sweep: dict[tuple[str, float], dict[str, Any]] = {}
        for t in TASKS:
            for lr in grids[t]:
                m = run_cached(task_config(args, t, lr, data), work / f"{t}-lr{lr:g}", val_size=args.val_size)
                sweep[(t, lr)] = m
                print(f"sweep {t} lr {lr:g}: before {m['eval_before']} after {m['eval_after']}", file=sys.stderr, flush=True)

        def val_score(t: str, lr: float) -> float:
            after = sweep[(t, lr)]["eval_after"]
            return -after["accuracy"] if t == "sentiment" else after["loss"]

        best = {t: min(grids[t], key=lambda lr, t=t: val_score(t, lr)) for t in TASKS}
        sources = [work / f"{t}-lr{best[t]:g}" / "adapter" for t in TASKS]
        variants: dict[str, dict[str, Path]] = {"original": dict(zip(TASKS, sources, strict=True))}
        storage: dict[str, str] = {}
        for p_ in ps:
            merged = merge_adapters(sources, work / f"rmm-p{p_}", p_, list(TASKS), progress=False)
            variants[f"rmm p={p_}"] = {t: rebuild_task(work / f"rmm-p{p_}", t, work / f"rmm-p{p_}-{t}") for t in TASKS}
            s = merged.storage
            storage[f"rmm p={p_}"] = (f"{s.merged_bytes / 2**20:.2f} MiB ({s.ratio:.3f}x; factors {s.values_ratio:.3f}x); "
                                      "relative factor error " + ", ".join(f"{t} {e:.3f}" for t, e in merged.errors.items()))
        total = merged.storage.adapters_bytes
        storage["original"] = f"{total / 2**20:.2f} MiB (1x: the three adapter folders)"
        for method, kw in (("linear", {}), ("ties", {"density": args.density}), ("dare", {"drop": args.drop, "seed": 0})):
            out = merge_single(sources, work / method, method, progress=False, **kw)  # type: ignore[arg-type]
            variants[method] = dict.fromkeys(TASKS, out)
            size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
            storage[method] = f"{size / 2**20:.2f} MiB ({size / total:.3f}x; one adapter, no task recoverable)"

        scores: dict[tuple[str, str], dict[str, float]] = {}
        for t in TASKS:
            cfg = dataclasses.replace(task_config(args, t, best[t], data), adapter=dataclasses.replace(
                task_config(args, t, best[t], data).adapter, method="full"))
            session = prepare(cfg)  # the base model and the task's test split; adapters are loaded onto copies
            base = session.model
            scores[("untrained", t)] = score(session, t, args.gen_size, args.max_new_tokens)
            for name, folders in variants.items():
                session.model = load_adapter(copy.deepcopy(base), folders[t]).eval()
                scores[(name, t)] = score(session, t, args.gen_size, args.max_new_tokens)
                print(f"test {name} {t}: {scores[(name, t)]}", file=sys.stderr, flush=True)
            if t == "sentiment":  # why the loss and the accuracy can part: every swept lr's adapter on the test split
                diagnostic = {"untrained": label_diagnostic(session)}
                for lr in grids[t]:
                    session.model = load_adapter(copy.deepcopy(base), work / f"{t}-lr{lr:g}" / "adapter").eval()
                    diagnostic[f"lr {lr:g}"] = label_diagnostic(session) | {"loss": session.evaluate()["loss"]}
                diagnostic["untrained"]["loss"] = scores[("untrained", t)]["loss"]
            session.model = base

        res.add(f"**A small-scale check** on a small CPU: SmolLM2-135M-Instruct, PiSSA rank {args.rank} on every linear "
                f"projection, {args.steps} steps of batch {args.batch_size}, AdamW, {args.warmup} warm-up steps then "
                f"cosine to 0, float32, {args.threads} torch thread(s). Max length 64 (arithmetic 128).")
        res.add(f"Data: `sentiment` = the embedded Rotten Tomatoes reviews (label scored by likelihood); `arithmetic` = "
                "the embedded chat word problems; `chat` = chatterbot-corpus's English conversations, "
                f"{dialogs:,} dialogs as prompt (first line) / completion (second line). Each task trains on its "
                f"training split minus a validation split of {args.val_size} (hash of the prompt) that chooses its lr; "
                f"the kept adapters are those runs'. Test: the first {args.test_size} examples of each test split "
                f"(arithmetic: the first {args.gen_size} problems, scored by greedy generation, at most "
                f"{args.max_new_tokens} new tokens, exact match of the `#### N` answer).")
        res.heading("Learning-rate sweep (validation)")
        res.add("Sentiment is chosen by validation accuracy, the others by validation answer loss (chosen in bold).")
        rows = []
        for t in TASKS:
            for lr in grids[t]:
                m = sweep[(t, lr)]
                mark = "**" if lr == best[t] else ""
                rows.append([t, f"{mark}{lr:g}{mark}", f"{m['eval_before']['loss']:.4f}", f"{m['eval_after']['loss']:.4f}",
                             f"{m['eval_before']['accuracy']:.3f}", f"{m['eval_after']['accuracy']:.3f}",
                             f"{m['train_loss'][0][1]:.4f} -> {m['train_loss'][-1][1]:.4f}"])
        res.table(["task", "lr", "val loss before", "val loss after", "val accuracy before", "val accuracy after",
                   "train loss first -> last step"], rows)
        res.heading("Sentiment: loss against accuracy")
        res.add("On the sentiment test split, each swept adapter: the answer loss (label token NLL), the mean probability "
                "on the two label tokens together, the share of reviews predicted positive, and the accuracy (the likelier "
                "label). The loss falls as the mass moves onto the two labels whether or not the choice between them "
                "improves.")
        res.table(["model", "test loss", "mass on the labels", "predicted positive", "accuracy"],
                  [[k, f"{d['loss']:.4f}", f"{d['mass']:.4f}", f"{d['positive_share']:.3f}", f"{d['accuracy']:.3f}"]
                   for k, d in diagnostic.items()])
        res.heading("Test scores per variant")
        res.add("sentiment: accuracy; arithmetic: exact match by generation; chat: answer loss (lower is better). "
                "Ratios: the variant's score over the original adapter's.")
        rows = []
        for name in ["untrained", *variants]:
            cells = []
            for t in TASKS:
                s, o = scores[(name, t)]["score"], scores[("original", t)]["score"]
                cells.append(f"{s:.4f}" + (f" ({s / o:.3f}x)" if o else ""))
            rows.append([name, *cells, storage.get(name, "-")])
        res.table(["variant", "sentiment accuracy", "arithmetic exact match", "chat answer loss", "storage"], rows)
        res.add("Test losses (teacher-forced, each task's completion tokens): " + "; ".join(
            f"{name}: " + ", ".join(f"{t} {scores[(name, t)]['loss']:.4f}" for t in TASKS) for name in ["untrained", *variants])
            + ".")


if __name__ == "__main__":
    main()
