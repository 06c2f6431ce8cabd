"""``pissa compress [MODEL] --reduction F --out DIR``: WeLore's non-uniform low-rank compression of a checkpoint."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from pissa.checkpoints.compress import compress_checkpoint
from pissa.checkpoints.config import CompressConfig
from pissa.cli.parser import add_options, resolve
from pissa.runtime.devices import resolve_device


def command_compress(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Compress a safetensors checkpoint, streamed: low-rank factors where they save parameters, the rest dense."""
    add_options(parser, CompressConfig)

    def run(args: argparse.Namespace) -> int:
        cfg, _ = resolve(CompressConfig, args)
        record = compress_checkpoint(cfg.model, cfg.out, cfg.reduction, cfg.targets, uniform=cfg.uniform,
                                     progress=cfg.progress, device=resolve_device(cfg.device))
        low = sum(r is not None for *_, r in record.layers.values())
        print(f"wrote {cfg.out}: {low} of {len(record.layers)} matrices low-rank, parameters "
              f"{record.dense_params:,} -> {record.stored_params:,} (reduction {record.reached:.4f}, asked "
              f"{record.requested}; threshold {record.threshold:.4f})")
        return 0

    return run
