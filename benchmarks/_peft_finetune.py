"""The PEFT equivalent of ``pissa finetune``, for the memory benchmarks: same options, model, data,
batches, training loop (``pissa.training.loop.train``) and evaluations; only the adapter is PEFT's LoRA,
set up as a PEFT user does (``get_peft_model``; with ``--gradient-checkpointing``,
Hugging Face's checkpointing plus ``enable_input_require_grads``, :func:`_common.peft_checkpointing`).

``--method lora`` is PEFT's default LoRA init, ``--method pissa`` its ``pissa_niter_4``; every
other option means what it means to ``pissa finetune`` (causal LMs only). Writes
``OUT/{metrics.json, loss.png, adapter/}`` (PEFT's adapter folder).

    python benchmarks/_peft_finetune.py --method pissa --dtype bfloat16 --steps 6 --batch-size 4 --out runs/peft
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, get_peft_model
from torch import nn

from _common import PEFT_INIT, PEFT_LORA, PEFT_PISSA, peft_checkpointing
from pissa.cli import parser as cli_parser
from pissa.data.datasets import load_data
from pissa.data.encoding import encode_all
from pissa.runtime import hub
from pissa.runtime.devices import grad_scaler, resolve_device, torch_dtype
from pissa.training.checkpoint import Progress
from pissa.training.config import RunConfig
from pissa.training.evaluation import choose_eval
from pissa.training.loop import make_optimizer, train
from pissa.training.report import plot_losses
from pissa.training.session import Session

INIT = {"lora": PEFT_INIT[PEFT_LORA], "pissa": PEFT_INIT[PEFT_PISSA]}


def peft_session(cfg: RunConfig, adapter: PeftConfig | None = None) -> Session:
    """:func:`pissa.training.session.prepare`'s session, with PEFT's ``adapter`` (default: its LoRA with the init of
    ``cfg.method``) in place of ``pissa.attach``."""
    if adapter is None and cfg.method not in INIT:
        raise SystemExit(f"--method must be lora or pissa, got {cfg.method}")
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    kind = hub.resolve_kind(cfg.model, cfg.kind)
    if kind != "causal-lm":
        raise SystemExit("causal LMs only")
    dataset = load_data(cfg.data, cfg.val_size, cfg.eval_data)
    torch.manual_seed(cfg.seed)
    model, tokenizer = hub.load_model(cfg.model, dtype=torch_dtype(cfg.dtype))
    nn.Module.to(model, device)
    train = encode_all(tokenizer, dataset.train, dataset.labels, kind, cfg.max_length)
    test = encode_all(tokenizer, dataset.test[: cfg.eval_size], dataset.labels, kind, cfg.max_length)
    references = [e.completion for e in dataset.test[: cfg.eval_size]]
    eval_kind = choose_eval(cfg.eval, kind, dataset.labels, references, cfg.eval_data or cfg.data)
    label_ids = None
    if dataset.labels is not None:
        label_ids = [list(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in dataset.labels]
    if adapter is None:
        rank = cfg.adapter.rank
        adapter = LoraConfig(r=rank, lora_alpha=cfg.adapter.alpha or rank, target_modules="all-linear",
                             lora_dropout=cfg.adapter.dropout, init_lora_weights=INIT[cfg.method])  # type: ignore[arg-type]
    peft_model = get_peft_model(model, adapter)
    if cfg.gradient_checkpointing:
        peft_checkpointing(peft_model)
    peft_model.train()
    return Session(cfg, kind, peft_model, tokenizer, dataset, train, test, label_ids, device, eval_kind, references)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli_parser.add_options(parser, RunConfig)
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args()
    cfg, _ = cli_parser.resolve(RunConfig, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    session = peft_session(cfg)
    optimizer = make_optimizer(session.model, cfg)
    progress = Progress()
    progress.eval_before = session.evaluate()
    train(session, out, progress, optimizer, grad_scaler(session.device, session.dtype), show=False)
    eval_after = session.evaluate()
    session.model.save_pretrained(str(out / "adapter"))
    plot_losses({f"peft {cfg.method}": progress.train_loss}, out / "loss.png", title=f"{cfg.model} on {cfg.data}")
    metrics = {"method": f"peft {cfg.method}", "train_loss": progress.train_loss, "eval_before": progress.eval_before,
               "eval_after": eval_after, "dtype": cfg.dtype, "gradient_checkpointing": cfg.gradient_checkpointing}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"peft {cfg.method}: {eval_after}")


if __name__ == "__main__":
    main()
