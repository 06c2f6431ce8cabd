"""``pissa eval --limit 20`` on the embedded SmolLM2 with an adapter: the harness's accuracy is pissa's own."""

from __future__ import annotations

import json

import pissa
from helpers import pissa_accuracy
from pissa.cli import main
from pissa.runtime import hub


def test_eval_on_the_embedded_model(tmp_path, capsys) -> None:
    model, tok = hub.load_model("smollm2")
    pissa.save_adapter(pissa.attach(model, pissa.AdapterConfig(rank=4, targets=["q_proj", "v_proj"])), tmp_path / "a")
    assert main(["eval", "--adapter", str(tmp_path / "a"), "--limit", "20", "--batch-size", "8",
                 "--out", str(tmp_path / "out")]) == 0
    assert "pissa_rotten_tomatoes" in capsys.readouterr().out
    doc = json.loads((tmp_path / "out" / "eval.json").read_text())
    score = doc["results"]["pissa_rotten_tomatoes"]["acc,none"]
    assert doc["n-samples"]["pissa_rotten_tomatoes"]["effective"] == 20 and 0.5 < score <= 1.0
    assert score == pissa_accuracy(model.eval(), tok, 20, 8192)
