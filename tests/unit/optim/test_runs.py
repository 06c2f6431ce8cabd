"""`pissa finetune --method full --optimizer galore|dct-adamw`: a run killed after a checkpoint resumes to the
same model as an uninterrupted one (the projected state is in the checkpoint), and the slow real-model run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import finetune
from pissa.cli import main
from pissa.training import loop


@pytest.mark.parametrize("optimizer", ["galore", "dct-adamw"])
def test_a_killed_projected_run_resumes_to_the_uninterrupted_one(tiny: Path, tmp_path: Path, monkeypatch,
                                                                  optimizer: str) -> None:
    args = ("--method", "full", "--lr", "1e-3", "--optimizer", optimizer, "--proj-rank", "8", "--proj-every", "3")
    assert finetune(tiny, tmp_path / "whole", *args, "--save-every", "0") == 0
    real, calls = loop.train_step, [0]

    def killed_at_7(*a, **kw):  # as a kill -9 during step 7: the last checkpoint is step 4's
        calls[0] += 1
        if calls[0] == 7:
            raise RuntimeError("killed")
        return real(*a, **kw)

    monkeypatch.setattr(loop, "train_step", killed_at_7)
    with pytest.raises(RuntimeError, match="killed"):
        finetune(tiny, tmp_path / "split", *args, "--save-every", "4")
    state = load_file(str(tmp_path / "split.partial/checkpoint/state.safetensors"))
    assert any(k.endswith(".index" if optimizer == "dct-adamw" else ".basis") for k in state)
    monkeypatch.setattr(loop, "train_step", real)
    assert finetune(tiny, tmp_path / "split", *args, "--save-every", "4", "--resume") == 0
    whole = load_file(str(tmp_path / "whole/model/model.safetensors"))
    split = load_file(str(tmp_path / "split/model/model.safetensors"))
    assert max((whole[k] - split[k]).abs().max().item() for k in whole) <= 1e-6
    losses = [[loss for _, loss in json.loads((tmp_path / d / "metrics.json").read_text())["train_loss"]]
              for d in ("whole", "split")]
    assert len(losses[1]) == 8 and losses[0] == pytest.approx(losses[1], abs=1e-6)


@pytest.mark.slow
def test_dct_adamw_fine_tunes_smollm2_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["finetune", "--method", "full", "--optimizer", "dct-adamw", "--steps", "3", "--batch-size", "2",
                 "--eval-size", "8", "--warmup", "1", "--threads", "1", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and all(torch.isfinite(torch.tensor(loss)) for _, loss in metrics["train_loss"])
    assert (out / "model").is_dir() and not (out / "checkpoint").exists()
