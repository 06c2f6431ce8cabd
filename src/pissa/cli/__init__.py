"""The ``pissa`` command line: one sub-command per job, each defined next to the code it drives.

A command module exposes ``command_<name>(parser) -> run``: it adds its options to ``parser``
(generated from its config dataclass, :mod:`pissa.options`) and returns ``run(args) -> int``.
Every :class:`~pissa.errors.PissaError` ends as one line on stderr and exit code 2; Ctrl-C exits
130 (after the command saved what it could).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from pissa import options
from pissa.calibration import collect as calibration
from pissa.checkpoints import init as stream
from pissa.cli import analyze
from pissa.errors import PissaError
from pissa.files import adapter_dir as io
from pissa.inference import chat
from pissa.runtime import hub
from pissa.training import run as train
from pissa.training.config import ExportConfig

Command = Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int] | None]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]  # argparse's usage errors: one line, exit 2
        raise PissaError(f"{self.prog}: {message} (see --help)")


def command_export(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``pissa export ADAPTER --out OUT [--merged]``: a PEFT LoRA folder, or a merged checkpoint streamed shard by shard."""
    options.add_options(parser, ExportConfig)

    def run(args: argparse.Namespace) -> int:
        cfg, _ = options.resolve(ExportConfig, args)
        model_name, kind, num_labels, dtype = io.recorded_base(cfg.adapter, cfg.model, cfg.kind)
        if cfg.merged:
            stream.merge_checkpoint(hub.resolve_model(model_name), cfg.adapter, cfg.out)
        else:
            kind = hub.resolve_kind(model_name, kind)
            model, _ = hub.load_model(model_name, kind=kind, num_labels=num_labels if kind == "seq-cls" else None, dtype=dtype)
            io.load_adapter(model, cfg.adapter)
            report = io.export_peft(model, cfg.out, cfg.max_rank)
            if report.rank < report.full_rank:
                print(f"truncated the rank-{report.full_rank} update to rank {report.rank}: relative error "
                      f"{report.relative_error:.3e} over all layers (worst layer {report.worst_layer_error:.3e})")
            server = f"; serve with max_lora_rank >= {report.max_lora_rank}" if report.max_lora_rank else ""
            head = f"; modules_to_save: {', '.join(report.modules_to_save)}" if report.modules_to_save else ""
            print(f"PEFT LoRA of rank {report.rank}{server}{head}")
        print(f"wrote {cfg.out}")
        return 0

    return run


COMMANDS: dict[str, tuple[Command, str]] = {
    "finetune": (train.command_finetune, "fine-tune a model with an adapter (no arguments: the embedded default)"),
    "compare": (train.command_compare, "several methods on the same data and seed, side by side"),
    "init": (stream.command_init, "decompose a safetensors checkpoint into a residual checkpoint plus an adapter"),
    "export": (command_export, "a trained adapter to a PEFT LoRA folder or a merged checkpoint"),
    "analyze": (analyze.command_analyze, "spectra, quantization error, intruder dimensions"),
    "calibrate": (calibration.command_calibrate, "per-layer activation statistics (and gradients) for data-aware methods"),
    "generate": (chat.command_generate, "talk to a model, with or without an adapter (--chat: a conversation), streamed"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pissa", description="PiSSA: train the principal singular components, freeze the residual.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (command, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(run=command(p))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        return int(args.run(args) or 0)
    except PissaError as e:
        print(f"pissa: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pissa: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
