"""``pissa finetune --objective dpo`` on the embedded SmolLM2 with preference pairs derived from the embedded Rotten
Tomatoes reviews (chosen: the review's label, rejected: the other label); pissa.reference of the trained adapter is
the base model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

import pissa
from pissa.cli import main
from pissa.data.datasets import load_data
from pissa.runtime.hub import load_model


def rotten_tomatoes_pairs(path: Path, n: int = 40) -> Path:
    data = load_data("rotten_tomatoes")
    assert data.labels is not None
    rows = [{"prompt": e.prompt, "chosen": e.completion, "rejected": next(x for x in data.labels if x != e.completion)}
            for e in data.train[:n]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_smollm2_dpo_run_starts_at_log_2_and_its_reference_is_the_base(tmp_path: Path) -> None:
    data, out = rotten_tomatoes_pairs(tmp_path / "pref.jsonl"), tmp_path / "run"
    assert main(["finetune", "--data", str(data), "--objective", "dpo", "--beta", "0.1", "--rank", "4", "--steps", "2",
                 "--batch-size", "2", "--eval-size", "6", "--max-length", "48", "--lr", "1e-4", "--threads", "1",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "smollm2" and metrics["objective"] == "dpo"
    assert abs(metrics["eval_before"]["loss"] - math.log(2)) < 1e-5  # the policy starts as its reference
    assert abs(metrics["train_loss"][0][1] - math.log(2)) < 1e-5
    assert metrics["eval_after"]["reward_margin"] != 0.0
    base, tok = load_model("smollm2")
    ids = torch.tensor([tok("The movie was a delight from start to finish.")["input_ids"]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
        model = pissa.load_adapter(base, out / "adapter")
        trained = model(input_ids=ids).logits
        with pissa.reference(model):
            got = model(input_ids=ids).logits
    assert not torch.allclose(trained, want, atol=1e-6)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
