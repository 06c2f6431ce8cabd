"""The one writer of benchmark results files.

Every script in ``benchmarks/`` records its run through :class:`Results`, created first thing
after the options are parsed and used as a context manager::

    parser = argparse.ArgumentParser(...)
    add_results_options(parser, "init_speed")       # --update-results, --name
    args = parser.parse_args()
    with Results.from_args(args, "Init speed and exactness") as res:
        ...                                         # load models, measure
        res.add("Model smollm2, rank 16, ...")
        res.table(["init", "time (s)"], rows)
    # the file appears here, whole, or not at all

What the file records, measured and never typed by hand: the exact command line (shell-quoted,
with the thread-count environment variables that were set), the git commit (``+dirty`` when the
working tree differs from it), the versions of python / torch / transformers / peft /
bitsandbytes / pissa, the machine (CPU model, logical CPUs, the CPUs this process may use, a
cgroup CPU quota if any, torch threads, memory, GPUs), the load average when the run started and
when it ended, and the wall time; then the sections the script added, in order.

Where: ``bench_out/NAME.md`` at the repository root (scratch, git-ignored) unless the script runs
with ``--update-results``, which writes the committed ``benchmarks/results/NAME.md``. ``NAME``
is the script's name unless ``--name`` says otherwise (e.g. ``init_speed_r64``). The file is
written through a temporary sibling and a rename when the ``with`` block ends without an
exception; if the script raises, nothing is written and an existing file stays as it was.
Extra files (plots) come from :meth:`Results.artifact` and are moved next to the markdown file
in the same step.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
"""The committed results, written only with ``--update-results``."""
SCRATCH_DIR = REPO / "bench_out"
"""Default destination (git-ignored)."""

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "pissa")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
"""Environment variables that change what a benchmark measures; the command line shows those that are set."""


# --- options ---------------------------------------------------------------------------------


def add_results_options(parser: argparse.ArgumentParser, name: str) -> None:
    """``--update-results`` and ``--name`` (default ``name``, the script's results file stem)."""
    group = parser.add_argument_group("results file")
    group.add_argument("--update-results", action="store_true",
                       help=f"write the committed {RESULTS_DIR.relative_to(REPO)}/NAME.md "
                            f"(default: the scratch folder {SCRATCH_DIR.relative_to(REPO)}/)")
    group.add_argument("--name", default=name, help=f"results file stem NAME (default: {name})")


def results_path(name: str, update: bool) -> Path:
    """``benchmarks/results/NAME.md`` with ``update``, else ``bench_out/NAME.md``."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"--name must be a plain file stem, got {name!r}")
    return (RESULTS_DIR if update else SCRATCH_DIR) / f"{name}.md"


# --- markdown --------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return str(value).replace("\n", " ").replace("|", "\\|")


def md_table(header: Sequence[Any], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one letter per column, ``l`` / ``r`` / ``c`` (default: none)."""
    header = [_cell(h) for h in header]
    rows = [[_cell(c) for c in row] for row in rows]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row has {len(row)} cells, the header {len(header)}: {row}")
    if align is not None and len(align) != len(header):
        raise ValueError(f"align {align!r} needs one letter per column ({len(header)})")
    rule = {"l": ":---", "r": "---:", "c": ":---:", "-": "---"}
    seps = [rule[a] for a in align] if align else ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(seps) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


PAIRED_HEADER = ("comparison (A / B)", "rounds", "median paired ratio", "min", "max", "rounds A faster")
"""Columns of :func:`paired_row`."""


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-round ratios ``a[i] / b[i]`` of two timings taken in the same round."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired timings need the same, nonzero number of rounds ({len(a)} vs {len(b)})")
    return [x / y for x, y in zip(a, b)]


def paired_row(label: str, a: Sequence[float], b: Sequence[float]) -> list[str]:
    """A :data:`PAIRED_HEADER` row: the spread of the per-round ratios A / B and how often A won."""
    r = paired_ratios(a, b)
    return [label, str(len(r)), f"{statistics.median(r):.2f}x", f"{min(r):.2f}x", f"{max(r):.2f}x",
            f"{sum(x < y for x, y in zip(a, b))} of {len(r)}"]


# --- the run's record --------------------------------------------------------------------------


def command_line(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> str:
    """``[VAR=value ...] python benchmarks/X.py ARGS``, shell-quoted; the script path relative to the repo."""
    argv = list(sys.argv if argv is None else argv)
    env = os.environ if env is None else env
    script = argv[0] if argv else "?"
    with contextlib.suppress(ValueError):  # outside the repository: as given
        script = str(Path(script).resolve().relative_to(REPO))
    prefix = [f"{k}={shlex.quote(env[k])}" for k in THREAD_ENV if k in env]
    return " ".join([*prefix, "python", shlex.join([script, *argv[1:]])])


def git_commit(repo: Path = REPO) -> str:
    """``HEAD``'s hash, with ``+dirty`` when tracked or untracked (not ignored) files differ from it.

    Read-only: ``--no-optional-locks`` keeps ``git status`` from refreshing the index.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=repo, capture_output=True, text=True,
                              check=True, timeout=60).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout)"
    if changed:
        return f"{head}+dirty ({len(changed.splitlines())} paths differ from the commit)"
    return head


def versions() -> str:
    parts = [f"python {platform.python_version()}"]
    for pkg in PACKAGES:
        try:
            parts.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{pkg} not installed")
    return ", ".join(parts)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_quota() -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` quota, None without one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine() -> str:
    import torch

    parts = [f"{platform.system()} {platform.release()} {platform.machine()}", cpu_model(),
             f"{os.cpu_count()} logical CPUs, {usable_cpus()} usable by this process"]
    quota = cpu_quota()
    if quota is not None:
        parts.append(f"cgroup CPU quota {quota:g}")
    parts.append(f"torch threads {torch.get_num_threads()}")
    mem = memory_gib()
    if mem is not None:
        parts.append(f"{mem:.1f} GiB RAM")
    if torch.cuda.is_available():
        parts.append("GPU: " + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
    else:
        parts.append("no GPU used")
    return ", ".join(parts)


def load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unavailable"


def _utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class Results:
    """One benchmark run's results file: the record of the run, then the sections the script adds."""

    def __init__(self, name: str, title: str, *, update: bool = False, dest: str | os.PathLike | None = None,
                 argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.title = title
        self.path = Path(dest) if dest is not None else results_path(name, update)
        self.command = command_line(argv, env)
        self.commit = git_commit()
        self.versions = versions()
        self.load_start = load_average()
        self.started = _utc()
        self._t0 = time.perf_counter()
        self._body: list[str] = []
        self._stage: Path | None = None
        self._artifacts: list[str] = []
        self.written = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, title: str, **kwargs: Any) -> Results:
        """From :func:`add_results_options`'s ``--name`` / ``--update-results``."""
        return cls(args.name, title, update=args.update_results, **kwargs)

    # -- content --

    def add(self, text: str) -> None:
        """A paragraph (or any markdown block)."""
        self._body.append(text.strip("\n"))

    def heading(self, text: str, level: int = 2) -> None:
        self._body.append("#" * level + " " + text)

    def table(self, header: Sequence[Any], rows: Iterable[Sequence[Any]], align: str | None = None) -> None:
        self._body.append(md_table(header, rows, align))

    def artifact(self, filename: str) -> Path:
        """A path to write an extra file to (a plot); it lands next to the markdown file when the run ends well."""
        if "/" in filename or filename.startswith("."):
            raise ValueError(f"artifact names are plain file names, got {filename!r}")
        if self._stage is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._stage = Path(tempfile.mkdtemp(prefix=f".{self.name}.tmp-", dir=self.path.parent))
        self._artifacts.append(filename)
        return self._stage / filename

    # -- output --

    def header(self, load_end: str, finished: str, seconds: float) -> str:
        return "\n".join([
            f"# {self.title}",
            "",
            f"- Command: `{self.command}`",
            f"- Commit: {self.commit}",
            f"- Versions: {self.versions}",
            f"- Machine: {machine()}",
            f"- Load average (1, 5, 15 min): {self.load_start} at the start; {load_end} at the end",
            f"- Started {self.started}, finished {finished}, wall time {seconds:.0f} s",
        ])

    def render(self) -> str:
        seconds = time.perf_counter() - self._t0
        return "\n\n".join([self.header(load_average(), _utc(), seconds), *self._body]) + "\n"

    def write(self) -> Path:
        """Write the whole file (artifacts first, then the markdown file, each by rename); returns its path."""
        text = self.render()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._stage is not None:
            for filename in self._artifacts:
                staged = self._stage / filename
                if staged.exists():
                    os.replace(staged, self.path.parent / filename)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            self._discard_stage()
        self.written = True
        print(text)
        print(f"wrote {self.path}", file=sys.stderr)
        return self.path

    def _discard_stage(self) -> None:
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None

    def __enter__(self) -> Results:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.write()
        else:
            self._discard_stage()
            print(f"{self.name}: failed, no results file written", file=sys.stderr)
