"""``pissa analyze <analysis>``: diagnostics (spectra, quantization error, intruder dimensions), tables and PNG plots.

Each analysis is a ``(run, config class, help)`` entry of :data:`ANALYSES`; its options are
generated from the config class (:mod:`pissa.options`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from pissa import options
from pissa.analysis import quant_error
from pissa.analysis import spectra as intruders
from pissa.training.config import IntrudersConfig, QuantErrorConfig, SpectrumConfig

ANALYSES: dict[str, tuple[Callable[[Any], int], type, str]] = {
    "spectrum": (intruders.spectrum, SpectrumConfig,
                 "singular values of adapted layers before and after fine-tuning (table + PNG)"),
    "intruders": (intruders.intruders, IntrudersConfig, "intruder dimensions per layer of a fine-tuned adapter (table + PNG)"),
    "quant-error": (quant_error.quant_error, QuantErrorConfig,
                    "NF4 quantization error reduction of QPiSSA vs LoftQ vs QLoRA per projection (table + PNG)"),
}


def command_analyze(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="analysis", required=True, parser_class=type(parser))
    for name, (run, cls, help_text) in ANALYSES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        options.add_options(p, cls)
        p.set_defaults(run=lambda args, run=run, cls=cls: run(options.resolve(cls, args)[0]))
