"""The ``pissa`` command line: one module per command, the only part of pissa that knows argparse,
prints, or speaks of flags.

A command module exposes ``command_<name>(parser) -> run``: it adds its options to ``parser``
(generated from the command's config dataclass, :mod:`pissa.cli.parser`) and returns
``run(args) -> int``, which calls the library and prints what it returns. The library reports
progress through the ``pissa`` logger, which :func:`main` prints; a :class:`~pissa.errors.PissaError`
names config fields as ```field```, which :func:`main` renders as the command's flag (``--field``),
and ends as one line on stderr with exit code 2. Ctrl-C exits 130 (after the command saved what it could).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence
from functools import cache

from pissa.cli.analyze import command_analyze
from pissa.cli.calibrate import command_calibrate
from pissa.cli.compare import command_compare
from pissa.cli.compress import command_compress
from pissa.cli.eval import command_eval
from pissa.cli.export import command_export
from pissa.cli.federate import command_federate
from pissa.cli.finetune import command_finetune
from pissa.cli.generate import command_generate
from pissa.cli.init import command_init
from pissa.cli.merge_adapters import command_merge_adapters
from pissa.cli.parser import Parser, flag
from pissa.cli.pretrain import command_pretrain
from pissa.errors import PissaError

Command = Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int] | None]

COMMANDS: dict[str, tuple[Command, str]] = {
    "finetune": (command_finetune, "fine-tune a model with an adapter (no arguments: the embedded default)"),
    "compare": (command_compare, "several methods on the same data and seed, side by side"),
    "init": (command_init, "decompose a safetensors checkpoint into a residual checkpoint plus an adapter"),
    "export": (command_export, "a trained adapter to a PEFT LoRA folder or a merged checkpoint"),
    "analyze": (command_analyze, "spectra, quantization error, intruder dimensions"),
    "calibrate": (command_calibrate, "per-layer activation statistics (and gradients) for data-aware methods"),
    "generate": (command_generate, "talk to a model, with or without an adapter (--chat: a conversation), streamed"),
    "eval": (command_eval, "lm-evaluation-harness on a base or base + adapter (built-in tasks over pissa's data)"),
    "pretrain": (command_pretrain, "Llama-shaped models from scratch: full vs low-rank vs LOST (low-rank plus sparse)"),
    "federate": (command_federate, "federated fine-tuning on Flower (FedSVD, FFA-LoRA, FedAvg-LoRA), optionally DP-SGD"),
    "compress": (command_compress, "WeLore: low-rank factors where they save parameters (non-uniform ranks), the rest dense"),
    "merge-adapters": (command_merge_adapters, "several adapters into RMM's reversible basis (--task: one back) or one "
                       "linear / TIES / DARE merge"),
}


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: ``pissa COMMAND [options]``."""
    parser = Parser(prog="pissa", description="PiSSA: train the principal singular components, freeze the residual.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (command, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(run=command(p))
    return parser


FIELD = re.compile(r"`([a-z][a-z0-9_]*)`")


@cache
def _option_names() -> frozenset[str]:
    """Every option's field name, over all commands."""
    names: set[str] = set()
    parsers = [build_parser()]
    while parsers:
        p = parsers.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
            elif action.option_strings:
                names.add(action.dest)
    return frozenset(names)


def render(message: str) -> str:
    """A library message for the command line: each ```field``` that names an option becomes its flag ``--field``."""
    return FIELD.sub(lambda m: flag(m.group(1)) if m.group(1) in _option_names() else m.group(0), message)


class _Lines(logging.Handler):
    """The ``pissa`` logger's records as plain lines: info on stdout, warnings on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        stream.write(render(record.getMessage()) + "\n")
        stream.flush()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    log = logging.getLogger("pissa")
    handler, level = _Lines(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        return int(args.run(args) or 0)
    except PissaError as e:
        print(f"pissa: error: {render(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pissa: interrupted", file=sys.stderr)
        return 130
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
