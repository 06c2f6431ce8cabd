"""``pissa federate``: federated fine-tuning (FedSVD, FFA-LoRA, FedAvg of LoRA) on Flower, side by side."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from pissa.cli.finetune import training_command
from pissa.errors import PissaError
from pissa.training.config import Launch, RunConfig
from pissa.training.federate import FederateConfig
from pissa.training.flower import federate

SKIPPED = frozenset({"method", "steps", "warmup", "schedule", "grad_accum", "save_every", "progressive_step", "reg_weight",
                     "gradient_checkpointing", "eval", "tracking"})
"""Run options a federated round does not read: the algorithms take the place of ``method``, ``rounds`` x
``local_steps`` of ``steps``; each round's optimizer is fresh at a constant ``lr``; experiment trackers
(``tracking``) are not wired to rounds yet."""


def command_federate(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``pissa federate --algorithms fedsvd,ffa-lora,fedavg-lora``: OUT/ALGO/{adapter/, metrics.json} per algorithm,
    OUT/report.md and OUT/accuracy.png."""

    def body(cfg: RunConfig, launch: Launch, explicit: dict[str, Any], command: str) -> None:
        assert isinstance(cfg, FederateConfig)
        out, report = federate(cfg, launch.out, resume=launch.resume, explicit=explicit)
        print(report)
        print(f"wrote {out}/report.md, accuracy.png, config.yaml and one folder per algorithm")

    run = training_command(parser, FederateConfig, body, skip=SKIPPED)

    def checked(args: argparse.Namespace) -> int:
        if getattr(args, "nproc", 1) > 1 or getattr(args, "fsdp", False):
            raise PissaError("`nproc` and `fsdp` do not apply: Flower runs the clients, each with `threads` cores")
        return run(args)

    return checked
