"""``pissa eval``: lm-evaluation-harness on a pissa model in memory, cross-checked against pissa's own likelihood
accuracy on the same examples, and its one-line errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import pissa
from helpers import pissa_accuracy
from pissa.cli import main
from pissa.integrations.harness import EvalConfig, harness

N = 24


def test_harness_accuracy_is_pissas_on_the_same_examples(tiny) -> None:
    model, tok = pissa.hub.load_model(str(tiny / "llama"))
    model.config.max_position_embeddings = 4096  # RoPE: no truncation on either side
    pissa.attach(model, pissa.AdapterConfig(rank=4))
    with torch.no_grad():  # a "trained" adapter, so that the harness must run the adapted layers
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    model.eval()
    results = harness(model, tok, EvalConfig(tasks=["rotten_tomatoes"], limit=N, batch_size=8))
    score = results["results"]["pissa_rotten_tomatoes"]["acc,none"]
    assert results["n-samples"]["pissa_rotten_tomatoes"]["effective"] == N
    assert 0.0 <= score <= 1.0
    assert score == pytest.approx(pissa_accuracy(model, tok, N, 4096), abs=1e-12)


def test_user_task_yaml_and_the_cli(tiny, tmp_path, capsys) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"q": f"Is {i} even?", "a": int(i % 2 == 0)}) + "\n" for i in range(6)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "even.yaml").write_text(
        f"task: my_even\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {rows}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\ndoc_to_choice: ['no', 'yes']\n"
        "metric_list:\n  - metric: acc\n")
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tiny / "llama"), "--tasks", f"rotten_tomatoes,{tmp_path / 'tasks'}",
                 "--limit", "3", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pissa_rotten_tomatoes" in printed and "my_even" in printed and "acc" in printed
    doc = json.loads((out / "eval.json").read_text())
    assert doc["limit"] == 3 and set(doc["results"]) == {"pissa_rotten_tomatoes", "my_even"}
    assert all(0.0 <= r["acc,none"] <= 1.0 for r in doc["results"].values())


def test_errors(tiny, tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tiny / "llama"), "--tasks", "nosuchtask", "--out", str(out)]) == 2
    assert "--tasks: unknown task 'nosuchtask'" in capsys.readouterr().err.replace("`", "")
    other, _ = pissa.hub.load_model(str(tiny / "llama"))
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.add_(1.0)  # another base
    pissa.save_adapter(pissa.attach(other, pissa.AdapterConfig(rank=2)), tmp_path / "adapter")
    assert main(["eval", "--model", str(tiny / "llama"), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 2
    assert "fingerprint" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed
    assert main(["eval", "--model", str(tiny / "llama"), "--out", str(out)]) == 2
    assert "pip install 'pissa[eval]'" in capsys.readouterr().err
    assert not out.exists()
