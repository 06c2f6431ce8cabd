"""pissa finetune --objective dpo: preference rows detected by their keys, DPO's loss with the initial factors as the
reference, reward metrics in metrics.json, one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pissa
from helpers import finetune, tiny_llama
from pissa.data.batches import collate
from pissa.data.encoding import Encoded
from pissa.training.preference import dpo_terms, pair_batch, sequence_logps


def preference_file(tiny: Path, path: Path, n: int = 80) -> Path:
    """The right label chosen, the wrong one rejected (from the tiny folder's reviews)."""
    rows = [json.loads(line) for line in (tiny / "data.jsonl").read_text().splitlines()[:n]]
    other = {"positive": "negative", "negative": "positive"}
    lines = [json.dumps({"prompt": f"Q: {r['text']}\nA:", "chosen": f" {r['label']}",
                         "rejected": f" {other[r['label']]}"}) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sequence_log_probs_sum_the_answer_tokens() -> None:
    model = tiny_llama()
    items = [Encoded((5, 6, 7, 8, 9), 3, None), Encoded((1, 2, 3), 1, None)]
    batch = collate(items, 0, "causal-lm")
    got = sequence_logps(model, batch)
    for i, e in enumerate(items):
        logp = F.log_softmax(model(input_ids=torch.tensor([e.ids])).logits[0].float(), -1)
        want = sum(logp[t - 1, e.ids[t]] for t in range(e.n_prompt, len(e.ids)))
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_dpo_starts_at_log_2_and_its_reference_stays_the_base() -> None:
    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(method="pissa", rank=4))
    pairs = pair_batch([Encoded((5, 6, 7, 8), 2, None)], [Encoded((5, 6, 9, 10, 11), 2, None)], 0)
    loss, good, bad = dpo_terms(model, pairs, beta=0.5)
    torch.testing.assert_close(loss, torch.tensor([math.log(2)]), atol=1e-5, rtol=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        dpo_terms(model, pairs, 0.5)[0].sum().backward()
        opt.step()
    after, good, bad = dpo_terms(model, pairs, 0.5)
    assert after.item() < math.log(2) and (good - bad).item() > 0
    with torch.no_grad(), pissa.reference(model):
        torch.testing.assert_close(sequence_logps(model, pairs.rows), sequence_logps(tiny_llama(), pairs.rows),
                                   atol=1e-5, rtol=1e-5)


def test_finetune_dpo_writes_reward_metrics_and_an_adapter(tiny: Path, tmp_path: Path) -> None:
    data = preference_file(tiny, tmp_path / "pref.jsonl")
    out = tmp_path / "run"
    # scored on pairs it trains on (--eval-data: the same file), the check that DPO optimizes its objective
    assert finetune(tiny, out, "--data", str(data), "--eval-data", str(data), "--objective", "dpo", "--beta", "0.5",
                    "--steps", "20", "--lr", "1e-2") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["eval_before"], metrics["eval_after"]
    assert metrics["objective"] == "dpo" and metrics["accuracy_kind"] == "reward"
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-5) and before["reward_margin"] == pytest.approx(0, abs=1e-5)
    assert after["loss"] < before["loss"] and after["reward_margin"] > 0 and after["accuracy"] > 0.5
    assert metrics["train_loss"][0][1] == pytest.approx(math.log(2), abs=1e-5)
    assert (out / "adapter" / "adapter.safetensors").is_file()


@pytest.mark.parametrize(("extra", "message"), [
    ((), "has prompt,chosen,rejected rows .*: add --objective dpo"),
    (("--objective", "dpo", "--pack"), "--pack joins examples"),
    (("--objective", "dpo", "--beta", "0"), "--beta must be a positive number"),
])
def test_bad_preference_runs_are_refused_in_one_line(tiny: Path, tmp_path: Path, capsys, extra, message) -> None:
    data = preference_file(tiny, tmp_path / "pref.jsonl")
    assert finetune(tiny, tmp_path / "run", "--data", str(data), *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_dpo_on_other_data_and_equal_answers_are_refused(tiny: Path, tmp_path: Path, capsys) -> None:
    assert finetune(tiny, tmp_path / "run", "--objective", "dpo") == 2
    assert "--objective dpo trains on prompt,chosen,rejected rows" in capsys.readouterr().err
    same = tmp_path / "same.jsonl"
    same.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b", "rejected": "b"}\n')
    assert finetune(tiny, tmp_path / "run", "--data", str(same), "--objective", "dpo") == 2
    assert "line 2 of" in capsys.readouterr().err
