"""``pissa analyze <analysis>``: diagnostics (spectra, quantization error, intruder dimensions), tables and PNG plots.

Each analysis is a ``(function, config class, help)`` entry of :data:`ANALYSES`: the function returns a
:class:`~pissa.analysis.tables.Report`, which is printed and written into ``--out``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from pissa.analysis.config import IntrudersConfig, QuantErrorConfig, SpectrumConfig
from pissa.analysis.quant_error import quant_error
from pissa.analysis.spectra import intruders, spectrum
from pissa.analysis.tables import Report
from pissa.cli.parser import add_options, resolve

ANALYSES: dict[str, tuple[Callable[[Any], Report], type, str]] = {
    "spectrum": (spectrum, SpectrumConfig,
                 "singular values of adapted layers before and after fine-tuning (table + PNG)"),
    "intruders": (intruders, IntrudersConfig, "intruder dimensions per layer of a fine-tuned adapter (table + PNG)"),
    "quant-error": (quant_error, QuantErrorConfig,
                    "NF4 (or int8) quantization error reduction of QPiSSA vs LoftQ vs QLoRA per projection (table + PNG)"),
}


def command_analyze(parser: argparse.ArgumentParser) -> None:
    """One sub-command per analysis; each writes OUT/STEM.md, .csv and .png and prints the table."""
    sub = parser.add_subparsers(dest="analysis", required=True, parser_class=type(parser))
    for name, (analysis, cls, help_text) in ANALYSES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_options(p, cls)
        p.set_defaults(run=lambda args, analysis=analysis, cls=cls: _run(analysis, resolve(cls, args)[0]))


def _run(analysis: Callable[[Any], Report], cfg: Any) -> int:
    report = analysis(cfg)
    paths = report.write(cfg.out)
    print(report.markdown, end="" if report.markdown.endswith("\n") else "\n")
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
