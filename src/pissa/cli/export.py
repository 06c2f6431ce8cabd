"""``pissa export ADAPTER --out OUT [--format peft|gguf] [--merged] [--max-rank K]``."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from pissa.checkpoints.config import ExportConfig
from pissa.checkpoints.export import export
from pissa.cli.parser import add_options, resolve


def command_export(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """A PEFT LoRA folder, a llama.cpp GGUF LoRA file (``--format gguf``), or (``--merged``) a merged checkpoint
    streamed shard by shard."""
    add_options(parser, ExportConfig)

    def run(args: argparse.Namespace) -> int:
        cfg, _ = resolve(ExportConfig, args)
        report = export(cfg)
        if report is not None:
            if report.rank < report.full_rank:
                print(f"truncated the rank-{report.full_rank} update to rank {report.rank}: relative error "
                      f"{report.relative_error:.3e} over all layers (worst layer {report.worst_layer_error:.3e})")
            server = f"; serve with max_lora_rank >= {report.max_lora_rank}" if report.max_lora_rank else ""
            head = f"; modules_to_save: {', '.join(report.modules_to_save)}" if report.modules_to_save else ""
            what = "GGUF LoRA (llama.cpp)" if cfg.format == "gguf" else "PEFT LoRA"
            print(f"{what} of rank {report.rank}{server}{head}")
        print(f"wrote {cfg.out}")
        return 0

    return run
