"""``pissa federate`` end to end on Flower's real simulation runtime (Ray workers): 2 clients x 2 rounds on the
tiny model, FedSVD with DP-SGD and FedAvg-LoRA side by side; the outputs, the checks and the privacy record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pissa.adapter.save_load import load_adapter
from pissa.cli import main
from pissa.methods.federated import epsilon
from pissa.runtime import hub


def test_federate_runs_on_the_flower_simulation(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "fed"
    code = main(["federate", "--model", str(tiny / "llama"), "--data", str(tiny / "data.jsonl"), "--rank", "4",
                 "--lr", "1e-2", "--batch-size", "4", "--eval-size", "16", "--threads", "1", "--clients", "2",
                 "--rounds", "2", "--local-steps", "2", "--algorithms", "fedsvd,fedavg-lora",
                 "--noise-multiplier", "1.0", "--delta", "1e-5", "--out", str(out)])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"report.md", "accuracy.png", "config.yaml", "fedsvd", "fedavg-lora"}
    fedsvd = json.loads((out / "fedsvd" / "metrics.json").read_text())
    assert [r["round"] for r in fedsvd["rounds"]] == [1, 2] and all(r["refactored"] for r in fedsvd["rounds"])
    assert max(r["product_error"] for r in fedsvd["rounds"]) < 1e-6
    assert max(r["orthonormality_error"] for r in fedsvd["rounds"]) < 1e-6
    privacy = fedsvd["privacy"]
    assert privacy["delta"] == 1e-5 and len(privacy["clients"]) == 2
    for n, c in zip(fedsvd["examples"], privacy["clients"], strict=True):
        assert c["sample_rate"] == pytest.approx(4 / n) and c["steps"] == 4
        assert c["epsilon"] == pytest.approx(epsilon(1.0, 4 / n, 4, 1e-5))
    model, _ = hub.load_model(str(tiny / "llama"))
    load_adapter(model, out / "fedavg-lora" / "adapter")  # the global adapter loads as any pissa adapter
    assert "| fedsvd |" in (out / "report.md").read_text()
