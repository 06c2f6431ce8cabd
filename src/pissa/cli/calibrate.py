"""``pissa calibrate --model M --data D --samples N --out STATS [--gradients] [--val-size V]``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from pissa.calibration.collect import calibrate_model
from pissa.calibration.config import CalibrateConfig
from pissa.cli.parser import add_options, resolve
from pissa.runtime import distributed


def command_calibrate(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Per-layer activation statistics (and gradients) into a safetensors file; a file of the same model and data is reused."""
    add_options(parser, CalibrateConfig)

    def run(args: argparse.Namespace) -> int:
        cfg, _ = resolve(CalibrateConfig, args)
        distributed.init_from_env()
        start = time.perf_counter()
        stats = calibrate_model(cfg)
        if distributed.is_main():
            inputs = len({e["input"] for e in stats.layers.values()})
            what = "reused" if stats.reused else f"wrote in {time.perf_counter() - start:.1f} s"
            print(f"{what} {cfg.out}: {len(stats.layers)} layers, {inputs} distinct inputs, {stats.info['tokens']} tokens"
                  + (", gradients" if stats.has_gradients else ""))
        return 0

    return run
