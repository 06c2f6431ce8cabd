"""The ``pissa`` command line: one sub-command per job, each defined next to the code it drives.

A command module exposes ``command_<name>(parser) -> run``: it adds its options to ``parser``
and returns ``run(args) -> int``. Every :class:`~pissa.errors.PissaError` ends as one line on
stderr and exit code 2; Ctrl-C exits 130 (after the command saved what it could).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .errors import PissaError

COMMANDS: dict[str, tuple[str, str]] = {
    "finetune": ("pissa.train", "fine-tune a model with an adapter (no arguments: the embedded default)"),
    "compare": ("pissa.train", "several methods on the same data and seed, side by side"),
    "init": ("pissa.stream", "decompose a safetensors checkpoint into a residual checkpoint plus an adapter"),
    "export": ("pissa.cli", "a trained adapter to a PEFT LoRA folder or a merged model"),
    "analyze": ("pissa.analyze", "spectra, quantization error, intruder dimensions"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage errors: one line, exit 2
        raise PissaError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pissa", description="PiSSA: train the principal singular components, freeze the residual.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(run=getattr(importlib.import_module(module), f"command_{name}")(p))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.run(args) or 0)
    except PissaError as e:
        print(f"pissa: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pissa: interrupted", file=sys.stderr)
        return 130


def command_export(parser: argparse.ArgumentParser):
    """``pissa export ADAPTER --model M --out OUT [--merged]``."""
    parser.add_argument("adapter", help="adapter folder written by save_adapter / pissa finetune")
    parser.add_argument("--model", default="smollm2", help="the base model the adapter was made from (folder or embedded name)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--merged", action="store_true", help="write a merged Hugging Face model instead of a PEFT LoRA")
    parser.add_argument("--kind", default="causal-lm", choices=["causal-lm", "seq-cls"], help="model head")

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from . import hub, io
        from .model import merge

        if not Path(args.adapter, io.CONFIG_FILE).is_file():
            raise PissaError(f"{args.adapter} is not a pissa adapter folder; pass the adapter/ folder a run wrote")
        doc, _ = io.read_adapter(args.adapter)
        num_labels = doc.get("num_labels")
        model, tokenizer = hub.load_model(args.model, kind=args.kind, num_labels=num_labels)
        io.load_adapter(model, args.adapter)
        if args.merged:
            merge(model)
            with io.atomic_dir(args.out) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        else:
            io.export_peft(model, args.out)
        print(f"wrote {args.out}")
        return 0

    return run


if __name__ == "__main__":
    sys.exit(main())
