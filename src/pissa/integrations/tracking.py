"""Experiment trackers (``--report-to tensorboard,mlflow,trackio``): a run's metrics and config, each written with
the tracker library's own writer.

    tracker = open_tracker(cfg.tracking, folder, run_name="pissa", experiment="finetune-pissa", store=folder,
                           config=options.flatten(cfg))
    tracker.log_metrics(step, {"train/loss": 2.1, "train/lr": 3e-5, "train/grad_norm": 0.8})
    tracker.close()

Every tracker receives the same metric names (:data:`TRAIN_METRICS`, ``eval/loss``, ``eval/accuracy``) and the
flat resolved config. Where each one writes:

- ``tensorboard``: event files in ``folder/tensorboard`` (``torch.utils.tensorboard.SummaryWriter``); the scalars,
  and the config as a text summary and as hyper-parameters.
- ``mlflow``: the tracking URI in ``MLFLOW_TRACKING_URI``, else a SQLite store ``store/mlflow.db`` (MLflow 3 refuses
  its old file store); one experiment (``experiment``) holding one run per ``run_name``, the config as params.
- ``trackio``: trackio's own local store (``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``, which trackio
  reads when it is imported); project ``experiment``, run ``run_name``, the config as the run's config. Offline:
  no Space or server is named, and CPU/GPU system metrics are off.

The libraries are the ``track`` extra; none is imported unless asked for. Under torchrun only rank 0 opens a
tracker (the others get a no-op), so a multi-process run logs once. A resumed run (``resume``) continues the same
runs: TensorBoard purges events after the checkpoint's step, MLflow reopens the run id kept in
``folder/tracking.json`` and trackio resumes the latest run of that name; the config is logged once, when a
tracker's run starts.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pissa.errors import PissaError
from pissa.files.atomic import atomic_write_text
from pissa.options import resume_safe_field
from pissa.runtime import distributed

TRACKERS: tuple[str, ...] = ("none", "tensorboard", "mlflow", "trackio")
TRAIN_METRICS = ("train/loss", "train/lr", "train/grad_norm")
"""What the training loop logs every step: the step's mean loss, its learning rate, the gradient norm before clipping."""
STATE_FILE = "tracking.json"
"""``folder/tracking.json``: what a resumed run needs to continue its tracker runs (the trackers it started,
MLflow's run id)."""
EXTRA = 'pip install "pissa[track]"'


@dataclass
class TrackingConfig:
    """Where a run's metrics and config go besides ``OUT/metrics.json``."""

    report_to: list[str] = resume_safe_field(default_factory=lambda: ["none"])
    """Experiment trackers, comma-separated: none, tensorboard (event files in OUT/tensorboard), mlflow
    (MLFLOW_TRACKING_URI, else OUT/mlflow.db), trackio (trackio's local store, TRACKIO_DIR); the track extra."""
    experiment: str | None = resume_safe_field(default=None)
    """MLflow experiment and trackio project the runs go to; default: the output folder's name."""

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):
            self.report_to = [t.strip() for t in self.report_to.split(",") if t.strip()]
        bad = [t for t in self.report_to if t not in TRACKERS]
        if bad or not self.report_to or len(set(self.report_to)) != len(self.report_to):
            raise PissaError(f"`report_to` takes distinct names among {', '.join(TRACKERS)}, got {','.join(self.report_to)!r}")
        if "none" in self.report_to and len(self.report_to) > 1:
            raise PissaError(f"`report_to` none cannot be combined with {','.join(t for t in self.report_to if t != 'none')}")
        if self.experiment is not None and not self.experiment.strip():
            raise PissaError("`experiment` must be a non-empty name")
        for name in self.trackers:  # found without importing it, so a run stops before it loads anything
            if importlib.util.find_spec(name) is None:
                raise PissaError(_missing(name))

    @property
    def trackers(self) -> list[str]:
        """The trackers asked for (``none`` removed)."""
        return [t for t in self.report_to if t != "none"]


class Tracker(Protocol):
    """What a training loop calls: the resolved config once, scalars by step, and close at the end."""

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self, ok: bool = True) -> None:
        """End the run; ``ok`` False: it failed or was interrupted (MLflow marks it so)."""


def _missing(tracker: str) -> str:
    return f"`report_to` {tracker} needs the {tracker} package: {EXTRA}"


def _import(module: str, tracker: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise PissaError(_missing(tracker)) from None


def _text(value: Any) -> str:
    """A config value as a tracker's text: a string as it is, anything else as JSON (``4``, ``null``, ``["q_proj"]``)."""
    return value if isinstance(value, str) else json.dumps(value)


def _scalar(value: Any) -> str | float:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else _text(value)


class TensorBoardTracker:
    """Event files in ``logdir`` (torch's ``SummaryWriter``); ``purge_step``: a resumed run's first step, after which
    TensorBoard discards the events of the interrupted session."""

    def __init__(self, logdir: Path, purge_step: int | None = None) -> None:
        _import("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=purge_step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        table = "\n".join(f"| {k} | {_text(v)} |" for k, v in config.items())
        self.writer.add_text("config", "| option | value |\n|---|---|\n" + table, global_step=0)
        from torch.utils.tensorboard.summary import hparams

        events = self.writer.file_writer
        assert events is not None  # SummaryWriter opens it in __init__
        for event in hparams({k: _scalar(v) for k, v in config.items()}, {}):  # the HPARAMS tab
            events.add_summary(event)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)

    def close(self, ok: bool = True) -> None:
        self.writer.close()


def mlflow_uri(store: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite store ``store/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(store / 'mlflow.db').resolve()}"


class MlflowTracker:
    """One MLflow run ``run_name`` in experiment ``experiment`` (created when missing) at ``uri``, through
    ``MlflowClient``; ``run_id``: reopen that run (a resumed run)."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None) -> None:
        tracking = _import("mlflow.tracking", "mlflow")
        self.entities = _import("mlflow.entities", "mlflow")
        self.client = tracking.MlflowClient(tracking_uri=uri)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags={"pissa.run": run_name}).info.run_id

    def log_config(self, config: Mapping[str, Any]) -> None:
        params = [self.entities.Param(k, _text(v)[:6000]) for k, v in config.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.entities.Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


class TrackioTracker:
    """A trackio run ``run_name`` of project ``project`` in trackio's local store, started on the first call
    (trackio takes the config when a run starts); ``resume``: continue the run of that name."""

    def __init__(self, project: str, run_name: str, resume: bool = False) -> None:
        self.trackio = _import("trackio", "trackio")
        self.project, self.run_name, self.resume = project, run_name, resume
        self.run: Any = None

    def _start(self, config: Mapping[str, Any] | None) -> Any:
        if self.run is None:
            with contextlib.redirect_stdout(io.StringIO()):  # trackio prints its dashboard hints
                self.run = self.trackio.init(project=self.project, name=self.run_name, config=dict(config or {}),
                                             resume="allow" if self.resume else "never", embed=False,
                                             auto_log_cpu=False, auto_log_gpu=False)
        return self.run

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._start(config)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self._start(None).log(dict(metrics), step=step)

    def close(self, ok: bool = True) -> None:
        if self.run is not None:
            with contextlib.redirect_stdout(io.StringIO()):
                self.trackio.finish()  # the current run (this one), which trackio would otherwise finish again at exit
            self.run = None


@dataclass
class Trackers:
    """Every tracker of a run behind the one :class:`Tracker` protocol (none: every call does nothing)."""

    members: list[Any] = field(default_factory=list)

    def log_config(self, config: Mapping[str, Any]) -> None:
        for t in self.members:
            t.log_config(config)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for t in self.members:
            t.log_metrics(step, metrics)

    def close(self, ok: bool = True) -> None:
        for t in self.members:
            t.close(ok)
        self.members = []


def open_tracker(cfg: TrackingConfig, folder: Path, run_name: str, *, experiment: str, store: Path | None = None,
                 config: Mapping[str, Any] | None = None, resume_step: int | None = None) -> Trackers:
    """The trackers ``cfg.report_to`` names for one run working in ``folder`` (TensorBoard's events go to
    ``folder/tensorboard``, MLflow's default store is ``store/mlflow.db``, ``store`` defaulting to ``folder``).

    ``experiment``: the MLflow experiment and trackio project unless ``cfg.experiment`` names one. ``config``: logged
    now to each new tracker run. ``resume_step``: the step a resumed run continues from: the trackers that
    ``folder/tracking.json`` says this run started continue their runs (and log no config again); a tracker added on
    resume (``report_to`` may change) starts a run. On any rank but 0 of a torchrun, or with ``report_to`` none, the
    result does nothing.
    """
    names = cfg.trackers if distributed.is_main() else []
    if not names:
        return Trackers()
    project = cfg.experiment or experiment
    state_path = folder / STATE_FILE
    state = json.loads(state_path.read_text()) if resume_step is not None and state_path.is_file() else {}
    started = set(state.get("started", []))
    members: list[Any] = []
    try:
        for name in names:
            again = name in started
            if name == "tensorboard":
                members.append(TensorBoardTracker(folder / "tensorboard", resume_step + 1 if again and resume_step else None))
            elif name == "mlflow":
                members.append(MlflowTracker(mlflow_uri(store or folder), project, run_name,
                                             state.get("mlflow_run_id") if again else None))
                state["mlflow_run_id"] = members[-1].run_id
            else:
                members.append(TrackioTracker(project, run_name, resume=again))
            if config is not None and not again:
                members[-1].log_config(config)
        state["started"] = sorted(started | set(names))
        atomic_write_text(state_path, json.dumps(state))
    except BaseException:
        Trackers(members).close(ok=False)
        raise
    return Trackers(members)


def prefixed(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
    """``{"loss": 1.2}`` as ``{"eval/loss": 1.2}`` (``prefix`` "eval")."""
    return {f"{prefix}/{k}": float(v) for k, v in values.items()}
