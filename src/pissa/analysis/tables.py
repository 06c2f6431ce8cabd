"""Tables of the analyses: markdown and CSV from one list of rows, and the one writer of md, csv and png."""

from __future__ import annotations

import csv
import io as _io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pissa.files.atomic import atomic_dir


def to_markdown(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats with 4 significant digits."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], rows: list[list]) -> str:
    """The rows as CSV text with a header line."""
    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


@dataclass
class Report:
    """An analysis's result: a markdown table (with its explanation), the same rows as CSV, and a figure."""

    stem: str
    """File stem: ``STEM.md``, ``STEM.csv``, ``STEM.png``."""
    markdown: str
    csv: str
    figure: Any
    """A matplotlib figure (closed once written)."""

    def write(self, out: str | Path) -> list[Path]:
        """Write the three files into folder ``out`` (replaced atomically), close the figure; returns the paths."""
        import matplotlib.pyplot as plt

        with atomic_dir(out) as tmp:
            (tmp / f"{self.stem}.md").write_text(self.markdown)
            (tmp / f"{self.stem}.csv").write_text(self.csv)
            self.figure.savefig(tmp / f"{self.stem}.png", dpi=120, bbox_inches="tight")
        plt.close(self.figure)
        return [Path(out) / f"{self.stem}.{ext}" for ext in ("md", "csv", "png")]
