"""Model cards (pissa.files.card): every adapter folder gets README.md with Hub metadata; it reads back, and it
sits outside the folder's integrity digests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pissa
from helpers import mlp, tiny_llama
from pissa.errors import PissaError
from pissa.files.adapter_dir import CONFIG_FILE
from pissa.files.card import CARD_FILE, adapter_card, read_card, training_record


def _adapted(base_folder: Path | None = None) -> torch.nn.Module:
    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(method="pissa", rank=2, alpha=4, targets=["q_proj", "v_proj"]))
    if base_folder is not None:
        model.pissa_base = {"model": str(base_folder), "kind": "causal-lm"}  # as pissa.hub.load_model records it
    return model


def test_a_saved_adapter_has_a_card_that_reads_back(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / CARD_FILE).write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# the base\n")
    run = training_record("data.jsonl", 12, 3e-4, {"loss": 2.5, "accuracy": 0.25}, {"loss": 1.25, "accuracy": 0.5},
                          "pissa finetune --data data.jsonl")
    model = _adapted(base)
    pissa.save_adapter(model, tmp_path / "adapter", training=run)
    meta, body = read_card(tmp_path / "adapter")
    assert meta == {"base_model": str(base), "library_name": "pissa", "pipeline_tag": "text-generation",
                    "license": "apache-2.0", "tags": ["pissa", f"base_model:adapter:{base}"]}  # method pissa: one tag
    doc = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    assert doc["training"] == run
    layers = len(list(pissa.adapted_layers(model)))
    for line in ("| method | pissa |", "| rank | 2 |", "| alpha | 4 (scaling 2) |",
                 f"| targets | q_proj, v_proj ({layers} layers) |",
                 "- data: `data.jsonl`", "- steps: 12", "- learning rate: 0.0003", "| before training | 0.2500 | 2.5000 |",
                 "| after training | 0.5000 | 1.2500 |", "pissa finetune --data data.jsonl",
                 "model = pissa.load_adapter(model, \"path/to/this/folder\")", f"base fingerprint | `{doc['base_fingerprint']}`"):
        assert line in body, line
    # the card is outside the digests: editing it (as the Hub's editor does) leaves the adapter loadable
    (tmp_path / "adapter" / CARD_FILE).write_text("edited")
    loaded = pissa.load_adapter(tiny_llama(), tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert "no YAML front matter" in str(pytest.raises(PissaError, read_card, tmp_path / "adapter").value)


def test_without_a_run_or_a_known_base_the_card_says_less(tmp_path: Path) -> None:
    model = pissa.attach(mlp(), pissa.AdapterConfig(method="lora", rank=2))
    pissa.save_adapter(model, tmp_path / "adapter")
    meta, body = read_card(tmp_path / "adapter")
    assert meta == {"library_name": "pissa", "tags": ["pissa", "lora"]}  # no base recorded, no license known
    assert "## Training" not in body and "| method | lora |" in body and "| alpha | 2 (scaling 1) |" in body
    unlicensed = tmp_path / "plain"
    unlicensed.mkdir()
    pissa.save_adapter(_adapted(unlicensed), tmp_path / "a2")
    assert "license" not in read_card(tmp_path / "a2")[0]
    assert "missing" in str(pytest.raises(PissaError, read_card, tmp_path).value)


def test_an_embedded_base_is_named_by_its_hub_id() -> None:
    doc = {"config": {"method": "pissa", "rank": 4, "alpha": None, "targets": "all-linear"}, "layers": {"a": {}},
           "base_fingerprint": "f", "base_model": {"model": "smollm2", "kind": "seq-cls"}}
    meta = read_card_text(adapter_card(doc))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["pipeline_tag"] == "text-classification"
    assert meta["tags"] == ["pissa", "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct"]
    doc["base_model"] = {"model": "minilm", "kind": "seq-cls"}  # its package folder's README.md states the license
    assert read_card_text(adapter_card(doc))["license"] == "apache-2.0"


def read_card_text(text: str) -> dict:
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])
