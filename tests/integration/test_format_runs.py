"""`pissa finetune` on Alpaca and ShareGPT files (tiny model with a chat template), the model card of every folder
it and `pissa export` write, and a malformed row refused before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import finetune
from pissa.cli import main
from pissa.files.card import read_card

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def chat_tiny(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny`` with ``chat/`` (its llama with a chat template), ``alpaca.jsonl`` and ``sharegpt.json``."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("chat")
    shutil.copytree(tiny / "llama", root / "chat")
    tok = AutoTokenizer.from_pretrained(root / "chat")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(root / "chat")
    rows = [json.loads(line) for line in (tiny / "data.jsonl").read_text().splitlines()][:40]
    alpaca = [{"instruction": "Label the review.", "input": r["text"], "output": r["label"]} for r in rows]
    (root / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    sharegpt = [{"conversations": [{"from": "human", "value": r["text"]}, {"from": "gpt", "value": r["label"]}]}
                for r in rows]
    (root / "sharegpt.json").write_text(json.dumps(sharegpt))
    return root


@pytest.mark.parametrize("data", ["alpaca.jsonl", "sharegpt.json"])
def test_alpaca_and_sharegpt_files_train_and_their_adapter_has_a_card(chat_tiny: Path, tiny: Path, tmp_path: Path,
                                                                       data: str) -> None:
    out = tmp_path / "run"
    args = ["--model", str(chat_tiny / "chat"), "--data", str(chat_tiny / data), "--steps", "4", "--eval", "likelihood",
            "--max-length", "48"]
    assert finetune(tiny, out, *args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_examples"] == 32 and metrics["eval_split"] == "test"
    meta, body = read_card(out / "adapter")
    base = str((chat_tiny / "chat").resolve())
    assert meta == {"base_model": base, "library_name": "pissa", "pipeline_tag": "text-generation",
                    "tags": ["pissa", f"base_model:adapter:{base}"]}
    doc = json.loads((out / "adapter" / "adapter_config.json").read_text())
    training = doc["training"]
    assert training["data"] == str(chat_tiny / data) and training["steps"] == 4 == metrics["steps"]
    assert training["lr"] == metrics["lr"] == 1e-2
    assert training["eval_before"] == metrics["eval_before"] and training["eval_after"] == metrics["eval_after"]
    assert training["command"].startswith("pissa finetune --model ") and f"--data {chat_tiny / data}" in training["command"]
    assert f"| after training | {metrics['eval_after']['accuracy']:.4f} | {metrics['eval_after']['loss']:.4f} |" in body
    assert main(["export", str(out / "adapter"), "--out", str(tmp_path / "peft")]) == 0
    peft_meta, peft_body = read_card(tmp_path / "peft")
    assert peft_meta["library_name"] == "peft" and peft_meta["base_model"] == base and "lora" in peft_meta["tags"]
    assert "PeftModel.from_pretrained(base" in peft_body and training["command"] in peft_body
    assert main(["export", str(out / "adapter"), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    merged_meta, _ = read_card(tmp_path / "merged")
    assert merged_meta["library_name"] == "transformers" and merged_meta["base_model"] == base
    assert f"base_model:merge:{base}" in merged_meta["tags"]


def test_a_malformed_row_is_refused_before_anything_is_written(chat_tiny: Path, tiny: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    lines = (chat_tiny / "alpaca.jsonl").read_text().splitlines()
    lines[6] = json.dumps({"instruction": "Label the review.", "output": ""})
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert finetune(tiny, out, "--model", str(chat_tiny / "chat"), "--data", str(tmp_path / "bad.jsonl")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "line 7 of" in err and "column 'output' is empty" in err
    assert not out.exists() and not out.with_name("run.partial").exists()
    columns = ["--model", str(chat_tiny / "chat"), "--data", str(chat_tiny / "alpaca.jsonl"), "--columns", "prompt"]
    assert finetune(tiny, out, *columns) == 2
    assert "--columns item 'prompt' must be TARGET=SOURCE" in capsys.readouterr().err
    assert not out.exists() and not out.with_name("run.partial").exists()


def test_calibrate_reads_renamed_columns_as_finetune_does(tiny: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    rows = [json.loads(line) for line in (tiny / "free.jsonl").read_text().splitlines()]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"q": r["prompt"], "a": r["completion"]}) + "\n" for r in rows))
    args = ["calibrate", "--model", str(tiny / "llama"), "--data", str(tmp_path / "qa.jsonl"), "--samples", "8",
            "--threads", "1", "--out", str(tmp_path / "stats.safetensors")]
    assert main(args) == 2 and not (tmp_path / "stats.safetensors").exists()  # no format without the renames
    assert main([*args, "--columns", "prompt=q,completion=a"]) == 0
    with safe_open(str(tmp_path / "stats.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) > 0
