"""Diagnostics: spectra, quantization error, intruder dimensions; tables and PNG plots.

``pissa analyze <analysis>``: each analysis is registered in ``ANALYSES`` as
``name -> (module, help)``; the module exposes ``analysis_<name_with_underscores>(parser) -> run``.
"""

from __future__ import annotations

import argparse
import importlib

ANALYSES: dict[str, tuple[str, str]] = {
    "spectrum": ("pissa.intruders", "singular values of adapted layers before and after fine-tuning (table + PNG)"),
    "intruders": ("pissa.intruders", "intruder dimensions per layer of a fine-tuned adapter (table + PNG)"),
    "quant-error": ("pissa.quant_error", "NF4 quantization error reduction of QPiSSA vs LoftQ vs QLoRA per projection (table + PNG)"),
}


def command_analyze(parser: argparse.ArgumentParser):
    sub = parser.add_subparsers(dest="analysis", required=True, parser_class=type(parser))
    for name, (module, help_text) in ANALYSES.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(run=getattr(importlib.import_module(module), "analysis_" + name.replace("-", "_"))(p))
    return None
