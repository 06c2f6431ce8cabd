"""``pissa eval [--tasks T,...] [--model M] [--adapter DIR] [--limit N] --out OUT``: lm-evaluation-harness scores."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from pissa.cli.parser import add_options, resolve
from pissa.files.atomic import atomic_dir
from pissa.inference.chat import load_causal_lm
from pissa.integrations.harness import EvalConfig, harness, lm_eval_module, results_json, table


def command_eval(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """The harness on a base or base + adapter (no merge): prints its table, writes OUT/eval.json."""
    add_options(parser, EvalConfig)

    def run(args: argparse.Namespace) -> int:
        cfg, _ = resolve(EvalConfig, args)
        lm_eval_module()  # missing: one line before the model loads
        torch.set_num_threads(cfg.threads)
        model, tokenizer = load_causal_lm(cfg.model, cfg.adapter, cfg.device, cfg.dtype, "pissa eval")
        results = harness(model, tokenizer, cfg)
        print(table(results))
        with atomic_dir(cfg.out) as tmp:
            (tmp / "eval.json").write_text(results_json(results, cfg))
        print(f"wrote {Path(cfg.out) / 'eval.json'}")
        return 0

    return run
