"""``pissa init --model DIR --out OUT [adapter options]``: OUT/residual and OUT/adapter."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from pissa.checkpoints.config import InitConfig
from pissa.checkpoints.init import init_checkpoint
from pissa.cli.parser import add_options, resolve
from pissa.runtime import distributed
from pissa.runtime.devices import resolve_device


def command_init(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Decompose a safetensors checkpoint shard by shard (under torchrun, the ranks share the work)."""
    add_options(parser, InitConfig)

    def run(args: argparse.Namespace) -> int:
        cfg, _ = resolve(InitConfig, args)
        distributed.init_from_env()
        out = init_checkpoint(cfg.model, cfg.out, cfg.adapter, progress=cfg.progress, device=resolve_device(cfg.device))
        if distributed.is_main():
            print(f"wrote {out}/residual and {out}/adapter")
        return 0

    return run
