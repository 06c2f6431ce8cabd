"""``pissa compare``: several methods on the same data and seed, side by side."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from pissa.cli.finetune import training_command
from pissa.runtime import distributed
from pissa.training.compare import compare
from pissa.training.config import CompareConfig, Launch, RunConfig


def command_compare(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``pissa compare --methods pissa,lora``: OUT/<method>/ per method plus OUT/report.md and OUT/loss.png."""

    def body(cfg: RunConfig, launch: Launch, explicit: dict[str, Any], command: str) -> None:
        assert isinstance(cfg, CompareConfig)
        result = compare(cfg, launch.out, resume=launch.resume, explicit=explicit, sharded=launch.fsdp, command=command)
        if distributed.is_main():
            print(result.report)
            print(f"wrote {result.out}/report.md, loss.png, config.yaml and one folder per method")

    return training_command(parser, CompareConfig, body, skip=frozenset({"method"}))
