"""``pissa finetune`` (and the launch options it shares with ``pissa compare``: ``--nproc``, ``--out``, ``--resume``)."""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Callable, Sequence
from typing import Any

from pissa.cli.parser import add_options, resolve
from pissa.errors import PissaError
from pissa.methods.registry import METHODS
from pissa.runtime import distributed
from pissa.training.config import Launch, RunConfig
from pissa.training.run import finetune


def relaunch(argv: Sequence[str], nproc: int, threads_given: bool, threads: int) -> int:
    """``--nproc N``: rerun the same command line under torchrun with N processes, the cores split between them."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    if not threads_given:
        rest += ["--threads", str(max(1, threads // nproc))]
    return distributed.launch(nproc, rest)


def start(cls: type[RunConfig], args: argparse.Namespace) -> tuple[RunConfig, Launch, dict[str, Any]]:
    """The command's config (defaults < --config < command line), its launch options and the explicit values."""
    launch, _ = resolve(Launch, args)
    if launch.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PissaError(f"already running under torchrun ({os.environ['WORLD_SIZE']} processes): drop --nproc; "
                         "the launched processes are used as they are")
    cfg, explicit = resolve(cls, args, launch.config)
    if cfg.batch_size < launch.nproc:
        raise PissaError(f"--batch-size {cfg.batch_size} is smaller than --nproc {launch.nproc}; "
                         "each process takes a share of every micro-batch")
    return cfg, launch, explicit


def training_command(parser: argparse.ArgumentParser, cls: type[RunConfig],
                     body: Callable[[RunConfig, Launch, dict[str, Any], str], None],
                     skip: frozenset[str] = frozenset()) -> Callable[[argparse.Namespace], int]:
    """A command that trains (finetune, compare): ``cls``'s options and the launch options; ``--nproc N``
    relaunches it under torchrun, otherwise ``body(cfg, launch, explicit, command)`` runs in this process
    (``command``: the command line, ``pissa ...``)."""
    add_options(parser, cls, skip)
    add_options(parser, Launch)

    def run(args: argparse.Namespace) -> int:
        cfg, launch, explicit = start(cls, args)
        if launch.nproc > 1:
            return relaunch(args.argv, launch.nproc, "threads" in explicit, cfg.threads)
        distributed.init_from_env()
        body(cfg, launch, explicit, "pissa " + shlex.join(args.argv))
        return 0

    return run


def command_finetune(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``pissa finetune``: one method; writes OUT/{config.yaml, metrics.json, loss.png, adapter/}."""

    def body(cfg: RunConfig, launch: Launch, explicit: dict[str, Any], command: str) -> None:
        out, metrics = finetune(cfg, launch.out, resume=launch.resume, explicit=explicit, sharded=launch.fsdp,
                                command=command)
        if distributed.is_main():
            saved = "adapter" if METHODS[metrics.method].adapter else "model"
            print(f"wrote {out}/config.yaml, metrics.json, loss.png, {saved}/")

    return training_command(parser, RunConfig, body)
