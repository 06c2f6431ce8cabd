"""``pissa compare``: several methods on the same data and seed, side by side."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from pissa.cli.finetune import relaunch, start
from pissa.cli.parser import add_options
from pissa.runtime import distributed
from pissa.training.compare import compare
from pissa.training.config import CompareConfig, Launch


def command_compare(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``pissa compare --methods pissa,lora``: OUT/<method>/ per method plus OUT/report.md and OUT/loss.png."""
    add_options(parser, CompareConfig, skip=frozenset({"method"}))
    add_options(parser, Launch)

    def run(args: argparse.Namespace) -> int:
        cfg, launch, explicit = start(CompareConfig, args)
        if launch.nproc > 1:
            return relaunch(args.argv, launch.nproc, "threads" in explicit, cfg.threads)
        distributed.init_from_env()
        assert isinstance(cfg, CompareConfig)
        result = compare(cfg, launch.out, resume=launch.resume, explicit=explicit, sharded=launch.fsdp)
        if distributed.is_main():
            print(result.report)
            print(f"wrote {result.out}/report.md, loss.png, config.yaml and one folder per method")
        return 0

    return run
