"""``pissa pretrain``: Llama-shaped models from scratch, full vs low-rank vs LOST, side by side."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from pissa.cli.parser import add_options, resolve
from pissa.training.config import Launch
from pissa.training.pretrain import pretrain
from pissa.training.pretrain_config import PretrainConfig


def command_pretrain(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``pissa pretrain --architecture full,low-rank,lost``: OUT/<architecture>/ per architecture plus OUT/report.md,
    OUT/loss.png and OUT/config.yaml."""
    add_options(parser, PretrainConfig)
    add_options(parser, Launch, skip=frozenset({"nproc", "fsdp"}))

    def run(args: argparse.Namespace) -> int:
        launch, _ = resolve(Launch, args)
        cfg, explicit = resolve(PretrainConfig, args, launch.config)
        result = pretrain(cfg, launch.out, resume=launch.resume, explicit=explicit)
        print(result.report)
        print(f"wrote {result.out}/report.md, loss.png, config.yaml and one folder per architecture "
              "(model.safetensors, metrics.json)")
        return 0

    return run
