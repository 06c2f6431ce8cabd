"""``--report-to``: each tracker's run, read back with that library's own reader, holds metrics.json's values."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import finetune
from pissa.cli import main
from pissa.errors import PissaError
from pissa.integrations import tracking
from pissa.integrations.tracking import TrackingConfig, open_tracker
from pissa.options import build, read_config_file
from pissa.training.config import RunConfig
from pissa.training.loop import train_step
from pissa.training.schedule import lr_at


@pytest.fixture(scope="module")
def trackio_store(tmp_path_factory: pytest.TempPathFactory):
    """trackio's store for these tests (trackio reads TRACKIO_DIR once, when it is imported); yields its reader."""
    if "trackio" not in sys.modules:
        os.environ["TRACKIO_DIR"] = str(tmp_path_factory.mktemp("trackio"))
    from trackio.sqlite_storage import SQLiteStorage

    yield SQLiteStorage


@pytest.fixture(autouse=True)
def _local_mlflow(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def mlflow_runs(out: Path, experiment: str) -> tuple[MlflowClient, list]:
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    return client, client.search_runs([found.experiment_id])


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def expected(out: Path) -> dict[str, list[tuple[int, float]]]:
    """What every tracker must hold, from metrics.json (and the learning rate schedule of config.yaml)."""
    m = json.loads((out / "metrics.json").read_text())
    cfg = build(RunConfig, read_config_file(out / "config.yaml"))
    return {
        "train/loss": [(s, v) for s, v in m["train_loss"]],
        "train/grad_norm": [(s, v) for s, v in m["grad_norm"]],
        "train/lr": [(s, lr_at(s - 1, cfg)) for s, _ in m["train_loss"]],
        "eval/loss": [(0, m["eval_before"]["loss"]), (m["steps"], m["eval_after"]["loss"])],
        "eval/accuracy": [(0, m["eval_before"]["accuracy"]), (m["steps"], m["eval_after"]["accuracy"])],
    }


def test_finetune_logs_the_same_values_to_tensorboard_mlflow_and_trackio(tiny: Path, tmp_path: Path, trackio_store) -> None:
    out = tmp_path / "run"
    assert finetune(tiny, out, "--report-to", "tensorboard,mlflow,trackio", "--experiment", "tiny-all") == 0
    want = expected(out)
    assert len(want["train/loss"]) == 8
    for tag, values in want.items():  # TensorBoard stores float32 scalars
        got = scalars(out / "tensorboard", tag)
        assert [s for s, _ in got] == [s for s, _ in values], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in values], rel=1e-6), tag
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    text = board.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| rank | 4 |" in text and "| method | pissa |" in text and "| alpha | null |" in text

    client, runs = mlflow_runs(out, "tiny-all")
    assert [(r.info.run_name, r.info.status) for r in runs] == [("pissa", "FINISHED")]
    for tag, values in want.items():
        assert history(client, runs[0].info.run_id, tag) == values, tag
    params = runs[0].data.params
    assert (params["rank"], params["steps"], params["method"], params["report_to"]) == (
        "4", "8", "pissa", '["tensorboard", "mlflow", "trackio"]')

    assert trackio_store.get_runs("tiny-all") == ["pissa"]
    logs = trackio_store.get_logs("tiny-all", "pissa")
    for tag, values in want.items():
        assert [(row["step"], row[tag]) for row in logs if tag in row] == values, tag
    config = trackio_store.get_run_config("tiny-all", "pissa")
    assert (config["rank"], config["lr"], config["targets"]) == (4, 0.01, "all-linear")


def test_a_resumed_run_continues_its_tracker_runs_and_starts_an_added_one(tiny: Path, tmp_path: Path, monkeypatch,
                                                                        trackio_store) -> None:
    real_step, calls = train_step, [0]

    def crashing_step(*a, **kw):
        calls[0] += 1
        if calls[0] == 7:
            raise RuntimeError("killed")
        return real_step(*a, **kw)

    monkeypatch.setattr("pissa.training.loop.train_step", crashing_step)
    out = tmp_path / "split"
    with pytest.raises(RuntimeError, match="killed"):
        finetune(tiny, out, "--save-every", "4", "--report-to", "tensorboard,mlflow")
    client, runs = mlflow_runs(tmp_path / "split.partial", "split")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert [s for s, _ in history(client, runs[0].info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    monkeypatch.setattr("pissa.training.loop.train_step", real_step)
    assert finetune(tiny, out, "--save-every", "4", "--resume", "--report-to", "tensorboard,mlflow,trackio") == 0

    want = expected(out)
    board = scalars(out / "tensorboard", "train/loss")
    assert [s for s, _ in board] == list(range(1, 9))  # the first session's 5, 6 purged, logged again
    assert [v for _, v in board] == pytest.approx([v for _, v in want["train/loss"]], rel=1e-6)
    client, runs = mlflow_runs(out, "split")
    assert [(r.info.run_name, r.info.status) for r in runs] == [("pissa", "FINISHED")]  # the same run, reopened
    logged = history(client, runs[0].info.run_id, "train/loss")
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]  # MLflow keeps both sessions' steps 5, 6
    assert dict(logged) == dict(want["train/loss"])  # the resumed steps equal the interrupted ones
    assert history(client, runs[0].info.run_id, "eval/loss") == want["eval/loss"]
    assert runs[0].data.params["report_to"] == '["tensorboard", "mlflow"]'  # logged once, when the run started
    logs = trackio_store.get_logs("split", "pissa")  # added on resume: a run from the checkpoint's step on, with the config
    assert [(row["step"], row["train/loss"]) for row in logs if "train/loss" in row] == want["train/loss"][4:]
    assert trackio_store.get_run_config("split", "pissa")["report_to"] == ["tensorboard", "mlflow", "trackio"]


def test_compare_puts_one_run_per_method_in_one_experiment(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "pissa,lora", "--model", str(tiny / "llama"), "--data", str(tiny / "data.jsonl"),
            "--rank", "4", "--lr", "1e-2", "--steps", "3", "--batch-size", "4", "--eval-size", "8", "--warmup", "1",
            "--threads", "1", "--out", str(out), "--report-to", "mlflow,tensorboard"]
    assert main(args) == 0
    client, runs = mlflow_runs(out, "cmp")
    assert sorted(r.info.run_name for r in runs) == ["lora", "pissa"]
    for r in runs:
        method = r.info.run_name
        metrics = json.loads((out / method / "metrics.json").read_text())
        assert history(client, r.info.run_id, "train/loss") == [(s, v) for s, v in metrics["train_loss"]]
        assert r.data.params["method"] == method
        assert [s for s, _ in scalars(out / method / "tensorboard", "train/grad_norm")] == [1, 2, 3]


def test_only_rank_0_opens_a_tracker(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tracking.distributed, "is_main", lambda: False)
    t = open_tracker(TrackingConfig(["tensorboard", "mlflow"]), tmp_path, "pissa", experiment="x", config={"rank": 4})
    t.log_metrics(1, {"train/loss": 1.0})
    t.close()
    assert t.members == [] and list(tmp_path.iterdir()) == []


def test_a_missing_tracker_package_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    real = tracking.importlib.import_module

    def no_mlflow(name: str, *a):
        if name.startswith("mlflow"):
            raise ImportError(name)
        return real(name, *a)

    monkeypatch.setattr(tracking.importlib, "import_module", no_mlflow)
    with pytest.raises(PissaError, match=r"`report_to` mlflow needs the mlflow package: pip install \"pissa\[track\]\""):
        open_tracker(TrackingConfig(["tensorboard", "mlflow"]), tmp_path, "pissa", experiment="x")
    assert not (tmp_path / "tracking.json").exists()


def test_a_missing_tracker_package_stops_the_command_before_it_writes(tiny: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    monkeypatch.setattr("pissa.training.run.prepare", lambda *a, **kw: pytest.fail("the model was loaded"))
    assert finetune(tiny, tmp_path / "run", "--report-to", "tensorboard,trackio") == 2
    assert capsys.readouterr().err == 'pissa: error: --report-to trackio needs the trackio package: pip install "pissa[track]"\n'
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value, message", [
    ("wandb", "takes distinct names among none, tensorboard, mlflow, trackio, got 'wandb'"),
    ("mlflow,mlflow", "takes distinct names"),
    ("none,mlflow", "none cannot be combined with mlflow"),
])
def test_bad_report_to_is_a_one_line_error_before_anything_is_written(tiny: Path, tmp_path: Path, capsys, value, message) -> None:
    assert finetune(tiny, tmp_path / "run", "--report-to", value) == 2
    err = capsys.readouterr().err
    assert err.startswith("pissa: error: --report-to ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
