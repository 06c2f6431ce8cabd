"""``pissa merge-adapters ADAPTER... --out DIR [--p P] [--method rmm|linear|ties|dare]`` and
``pissa merge-adapters MERGED --task NAME --out ADAPTER``."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from pissa.checkpoints.config import MergeAdaptersConfig
from pissa.checkpoints.merge_adapters import merge_adapters, merge_single, rebuild_task
from pissa.cli.parser import add_options, resolve


def command_merge_adapters(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """RMM's reversible basis of several adapters (every task recoverable), one classic merge, or one task back."""
    add_options(parser, MergeAdaptersConfig)

    def run(args: argparse.Namespace) -> int:
        cfg, _ = resolve(MergeAdaptersConfig, args)
        if cfg.task is not None:
            rebuild_task(cfg.adapters[0], cfg.task, cfg.out)
            print(f"wrote {cfg.out}: the adapter of task {cfg.task}")
        elif cfg.method == "rmm":
            merged = merge_adapters(cfg.adapters, cfg.out, cfg.p, cfg.names, progress=cfg.progress)
            s = merged.storage
            errors = ", ".join(f"{t} {e:.2e}" for t, e in merged.errors.items())
            print(f"wrote {cfg.out}: {len(merged.tasks)} tasks, {merged.components} components per position; storage "
                  f"{s.merged_bytes:,} bytes vs {s.adapters_bytes:,} for the adapters (ratio {s.ratio:.3f}; factors "
                  f"{s.values_ratio:.3f}); relative factor error {errors}")
        else:
            merge_single(cfg.adapters, cfg.out, cfg.method, density=cfg.density, drop=cfg.drop, seed=cfg.seed,
                         progress=cfg.progress)
            print(f"wrote {cfg.out}: one {cfg.method} merge of {len(cfg.adapters)} adapters")
        return 0

    return run
