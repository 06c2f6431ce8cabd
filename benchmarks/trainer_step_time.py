"""Step time of a pissa-attached model under transformers' Trainer and TRL's SFTTrainer, against pissa's own step.

One process, one model (the embedded SmolLM2, PiSSA ``--rank`` on every projection), the same
Rotten Tomatoes examples (prompt + completion, padded to the longest in the batch), batch 8. For
each torch thread count in ``--threads``, every setting runs ``--steps`` training steps; settings
are interleaved over ``--rounds`` rounds in rotating order (the machine's load changes), and the
first step of each run is left out (warm-up). Settings:

- pissa's step: AdamW, clipping, the completion-only loss with logits at completion positions only
  (``pissa.data.loss.loss_sum``, what ``pissa finetune`` runs);
- the same step with the model's own loss (logits at every position);
- ``transformers.Trainer`` with ``TrainingArguments`` defaults (float32);
- ``trl.SFTTrainer`` with ``SFTConfig`` defaults (bf16 autocast and activation checkpointing on);
- ``trl.SFTTrainer`` with ``bf16=False, activation_checkpointing=False``.

    .venv/bin/python benchmarks/trainer_step_time.py

Writes ``bench_out/trainer_step_time.md`` (``--update-results``: ``benchmarks/results/trainer_step_time.md``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

import pissa
from _results import Results, add_results_options
from pissa.data.batches import collate
from pissa.data.datasets import load_dataset
from pissa.data.encoding import encode
from pissa.data.loss import loss_sum
from pissa.runtime.hub import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="steps per run (the first is not counted)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    add_results_options(p, "trainer_step_time")
    args = p.parse_args()
    with Results.from_args(args, "Step time under transformers' Trainer and TRL's SFTTrainer") as res:
        from datasets import Dataset
        from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments
        from transformers.utils import logging as hf_logging
        from trl import SFTConfig, SFTTrainer

        scratch_dir = tempfile.TemporaryDirectory(prefix="trainer_step_time-")  # removed at exit
        scratch = scratch_dir.name  # the trainers' output_dir (they save nothing)
        hf_logging.set_verbosity_error()
        warnings.filterwarnings("ignore")
        model, tok = load_model(args.model)
        pissa.attach(model, pissa.AdapterConfig(method="pissa", rank=args.rank))
        data = load_dataset("rotten_tomatoes", test_size=200)
        examples = data.train[: args.batch_size * args.steps]
        encoded = [encode(tok, e, data.labels, "causal-lm", 64) for e in examples]
        rows = Dataset.from_list([{"prompt": e.prompt, "completion": e.completion} for e in examples])
        texts = Dataset.from_list([dict(tok(e.prompt + e.completion)) for e in examples])
        trainable = [q for q in model.parameters() if q.requires_grad]

        def pissa_step(full_logits: bool) -> list[float]:
            opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0)
            times = []
            for s in range(args.steps):
                batch = collate(encoded[s * args.batch_size:(s + 1) * args.batch_size], tok.pad_token_id, "causal-lm")
                t = time.perf_counter()
                if full_logits:
                    labels = batch.input_ids.masked_fill(~batch.target_mask, -100)
                    loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
                else:
                    loss = loss_sum(model, batch, "causal-lm") / batch.target_mask.sum()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                opt.step()
                opt.zero_grad()
                times.append(time.perf_counter() - t)
            return times

        class Timer(TrainerCallback):
            def __init__(self) -> None:
                self.times: list[float] = []
                self.t0 = 0.0

            def on_step_begin(self, *a, **kw) -> None:
                self.t0 = time.perf_counter()

            def on_step_end(self, *a, **kw) -> None:
                self.times.append(time.perf_counter() - self.t0)

        def trainer_steps(sft: bool, **overrides) -> list[float]:
            timer = Timer()
            common = dict(output_dir=scratch, max_steps=args.steps,
                          per_device_train_batch_size=args.batch_size, learning_rate=1e-5, save_strategy="no",
                          report_to=[], disable_tqdm=True, use_cpu=True, logging_steps=1)
            if sft:
                trainer = SFTTrainer(model=model, args=SFTConfig(**common, **overrides), train_dataset=rows,
                                     processing_class=tok, callbacks=[timer])
            else:
                trainer = Trainer(model=model, args=TrainingArguments(**common, **overrides), train_dataset=texts,
                                  data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[timer])
            trainer.train()
            model.activation_checkpointing_disable()  # SFTConfig's default turned it on for this model
            return timer.times

        settings: dict[str, Callable[[], list[float]]] = {
            "pissa's step (logits at completion positions only)": lambda: pissa_step(False),
            "the same step, the model's own loss (logits at every position)": lambda: pissa_step(True),
            "Trainer, TrainingArguments defaults (float32)": lambda: trainer_steps(False),
            "SFTTrainer, SFTConfig defaults (bf16 autocast, activation checkpointing)": lambda: trainer_steps(True),
            "SFTTrainer, bf16=False, activation_checkpointing=False": lambda: trainer_steps(
                True, bf16=False, activation_checkpointing=False),
        }
        threads = [int(t) for t in args.threads.split(",")]
        times: dict[tuple[str, int], list[float]] = {}
        names = list(settings)
        for r in range(args.rounds):
            for n in threads:
                torch.set_num_threads(n)
                for name in names[r % len(names):] + names[: r % len(names)]:
                    times.setdefault((name, n), []).extend(settings[name]()[1:])
        reference = statistics.median(times[(names[0], threads[0])])
        table = []
        for (name, n), ts in times.items():
            med = statistics.median(ts)
            table.append([name, n, f"{med:.2f}", f"{min(ts):.2f}", f"{max(ts):.2f}", len(ts), f"{med / reference:.1f}x"])
        res.add(f"Model {args.model}, PiSSA rank {args.rank} on every projection, batch {args.batch_size} Rotten Tomatoes "
                f"examples ({sum(len(e.ids) for e in encoded) // len(encoded)} tokens on average), "
                f"{args.rounds} rounds x {args.steps} steps per setting and thread count, first step of each run left out.")
        table.sort(key=lambda row: (row[1], names.index(row[0])))
        res.table(["setting", "torch threads", "median step (s)", "min", "max", "steps",
                   f"median / pissa's step at {threads[0]} thread(s)"], table)


if __name__ == "__main__":
    main()
