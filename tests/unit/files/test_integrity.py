"""What pissa writes records digests of itself: a changed byte or an edited config is refused in one line, by every
reader (load_adapter, merge_state_dict, merge_checkpoint, load_sharded, a --resume), naming the file; unchanged
folders load bit-exactly, and folders written before the digests existed load as before."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pissa
from helpers import TOKENS, finetune, interrupt_after, lm_loss, mlp, tiny_llama, train_steps
from pissa.checkpoints.init import init_checkpoint
from pissa.checkpoints.merge import merge_checkpoint, merge_state_dict
from pissa.files.adapter_dir import CONFIG_FILE, INTEGRITY, TENSORS_FILE
from pissa.files.digests import SHARD_DIGESTS
from pissa.files.safetensors import shard_entries

CFG = pissa.AdapterConfig(rank=4, alpha=8.0, seed=3)


@pytest.fixture(scope="module")
def initialized(tmp_path_factory) -> Path:
    """``llama/`` (a tiny Llama checkpoint in 3 shards) and ``out/`` (its `pissa init`: residual/, adapter/)."""
    root = tmp_path_factory.mktemp("integrity")
    tiny_llama().save_pretrained(root / "llama", max_shard_size="40KB")
    init_checkpoint(root / "llama", root / "out", CFG, progress=False)
    return root


def flip_byte(path: Path, offset: int = -1) -> None:
    """XOR one bit of the byte at ``offset`` (default: the last, inside the last tensor's data)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def meta_model(residual: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(residual))


def readers(root: Path, adapter: Path, tmp_path: Path) -> dict:
    """Every reader of an adapter directory, as a call on ``adapter``."""
    from transformers import LlamaForCausalLM

    llama, residual = root / "llama", root / "out" / "residual"
    return {
        "load_adapter": lambda: pissa.load_adapter(LlamaForCausalLM.from_pretrained(llama), adapter),
        "merge_state_dict": lambda: merge_state_dict(LlamaForCausalLM.from_pretrained(llama).state_dict(), adapter),
        "merge_checkpoint": lambda: merge_checkpoint(llama, adapter, tmp_path / "merged", progress=False),
        "load_sharded": lambda: pissa.load_sharded(meta_model(residual), residual, adapter, device="cpu"),
    }


READERS = ["load_adapter", "merge_state_dict", "merge_checkpoint", "load_sharded"]


def refusal(call) -> str:
    with pytest.raises(pissa.PissaError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("reader", READERS)
def test_a_flipped_byte_in_the_adapter_tensors_is_refused(initialized, tmp_path, reader) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(initialized / "out" / "adapter", adapter)
    flip_byte(adapter / TENSORS_FILE)
    message = refusal(readers(initialized, adapter, tmp_path)[reader])
    assert f"{TENSORS_FILE} in {adapter} does not match the digest its {CONFIG_FILE} records" in message
    assert "re-save the adapter or restore the file" in message
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("reader", READERS)
def test_an_edited_config_is_refused(initialized, tmp_path, reader) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(initialized / "out" / "adapter", adapter)
    doc = json.loads((adapter / CONFIG_FILE).read_text())
    assert doc["config"]["rank"] == 4
    doc["config"]["rank"] = 8
    (adapter / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    message = refusal(readers(initialized, adapter, tmp_path)[reader])
    assert f"{CONFIG_FILE} in {adapter} does not match the digest it records" in message
    assert not (tmp_path / "merged").exists()


def test_a_damaged_head_file_is_refused(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, num_labels=2, pad_token_id=0)
    base = LlamaForSequenceClassification(config)
    model = pissa.attach(copy.deepcopy(base), CFG)
    model.score.weight.requires_grad_(True)  # a trained classifier head: head.safetensors
    pissa.save_adapter(model, tmp_path / "a")
    flip_byte(tmp_path / "a" / "head.safetensors")
    for call in (lambda: merge_state_dict(base.state_dict(), tmp_path / "a"),
                 lambda: pissa.load_adapter(copy.deepcopy(base), tmp_path / "a")):
        assert f"head.safetensors in {tmp_path / 'a'} does not match the digest" in refusal(call)


def test_an_unchanged_adapter_loads_bit_exactly_whatever_its_json_layout(tmp_path) -> None:
    base = tiny_llama()
    model = pissa.attach(tiny_llama(), CFG)
    train_steps(model, [TOKENS], lm_loss, steps=2, lr=1e-2)
    path = pissa.save_adapter(model, tmp_path / "a")
    doc = json.loads((path / CONFIG_FILE).read_text())
    assert doc[INTEGRITY]["algorithm"] == "xxh3-128" and set(doc[INTEGRITY]["tensors"]) == {TENSORS_FILE}
    (path / CONFIG_FILE).write_text(json.dumps(doc))  # the same document, other whitespace
    loaded = pissa.load_adapter(base, path)
    saved = load_file(str(path / TENSORS_FILE))
    for (name, a), (_, b) in zip(pissa.adapted_layers(loaded), pissa.adapted_layers(model)):
        assert torch.equal(a.residual.weight, b.residual.weight) and torch.equal(a.lora_A, b.lora_A)
        assert torch.equal(a.lora_B, saved[f"{name}.lora_B"])


def test_an_adapter_written_before_digests_loads_with_the_old_checks(tmp_path) -> None:
    """No "integrity" entry (pissa before this change): accepted, its tensors unverified."""
    model = pissa.attach(tiny_llama(), CFG)
    path = pissa.save_adapter(model, tmp_path / "a")
    doc = json.loads((path / CONFIG_FILE).read_text())
    del doc[INTEGRITY]
    (path / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    loaded = pissa.load_adapter(tiny_llama(), path)
    for (_, a), (_, b) in zip(pissa.adapted_layers(loaded), pissa.adapted_layers(model)):
        assert torch.equal(a.residual.weight, b.residual.weight) and torch.equal(a.lora_A, b.lora_A)


def test_a_changed_embedding_in_the_residual_checkpoint_is_refused(initialized, tmp_path) -> None:
    residual = tmp_path / "residual"
    shutil.copytree(initialized / "out" / "residual", residual)
    adapter = initialized / "out" / "adapter"
    shard = next(p for p in sorted(residual.glob("*.safetensors")) if "model.embed_tokens.weight" in shard_entries(p))
    entry = shard_entries(shard)["model.embed_tokens.weight"]
    flip_byte(shard, entry.start + 5)
    for call in (lambda: pissa.load_sharded(meta_model(residual), residual, adapter, device="cpu"),
                 lambda: merge_checkpoint(residual, adapter, tmp_path / "merged", progress=False)):
        message = refusal(call)
        assert f"shard {shard.name} in {residual} does not match the digest its {SHARD_DIGESTS} records" in message
    assert not (tmp_path / "merged").exists()


def test_an_unchanged_residual_checkpoint_loads_and_merges(initialized, tmp_path) -> None:
    residual, adapter = initialized / "out" / "residual", initialized / "out" / "adapter"
    assert set(json.loads((residual / SHARD_DIGESTS).read_text())["shards"]) == {p.name for p in residual.glob("*.safetensors")}
    pissa.load_sharded(meta_model(residual), residual, adapter, device="cpu")
    out = merge_checkpoint(residual, adapter, tmp_path / "merged", progress=False)
    assert not (out / SHARD_DIGESTS).exists()  # the merged shards are not the residual's


def test_resume_refuses_a_damaged_checkpoint_in_one_line(tiny: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    interrupt_after(monkeypatch, 2)
    assert finetune(tiny, out, "--save-every", "1") == 130
    monkeypatch.undo()
    checkpoint = tmp_path / "run.partial" / "checkpoint"
    assert json.loads((checkpoint / "state.json").read_text())[INTEGRITY]["files"].keys() == {"state.safetensors"}
    flip_byte(checkpoint / "state.safetensors")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert finetune(tiny, out, "--resume") == 2
    *before_error, error = capsys.readouterr().err.splitlines()  # the base model's loading bar, then the error
    assert f"state.safetensors in {checkpoint} does not match the digest" in error and "--resume" in error
    assert not any("state.safetensors" in line for line in before_error)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before and not out.exists()


@pytest.mark.parametrize("damage", ["state.json", "state.safetensors", "adapter"])
def test_a_changed_run_checkpoint_is_refused_and_an_old_one_accepted(tmp_path, damage) -> None:
    from pissa.training.checkpoint import Progress, load_checkpoint, restore_trained, save_checkpoint, verify_checkpoint

    model = pissa.attach(mlp(), pissa.AdapterConfig(rank=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(3, 24)).square().mean().backward()
    optimizer.step()  # moments to save
    save_checkpoint(tmp_path / "ckpt", model, optimizer, Progress(step=3))
    ckpt = tmp_path / "ckpt"
    if damage == "state.json":
        doc = json.loads((ckpt / "state.json").read_text())
        doc["progress"]["step"] = 4
        (ckpt / "state.json").write_text(json.dumps(doc))
        expected = f"state.json in {ckpt} does not match the digest it records"
    elif damage == "state.safetensors":
        flip_byte(ckpt / "state.safetensors")
        expected = f"state.safetensors in {ckpt} does not match the digest its state.json records"
    else:
        flip_byte(ckpt / "adapter" / TENSORS_FILE)
        expected = f"{TENSORS_FILE} in {ckpt / 'adapter'} does not match the digest"
    assert expected in refusal(lambda: restore_trained(pissa.attach(mlp(), pissa.AdapterConfig(rank=4)), ckpt))
    if damage != "adapter":
        assert expected in refusal(lambda: load_checkpoint(ckpt, optimizer))
        doc = json.loads((ckpt / "state.json").read_text())
        del doc[INTEGRITY]  # a checkpoint written before the digests: resumed unchecked
        (ckpt / "state.json").write_text(json.dumps(doc))
        assert verify_checkpoint(ckpt)["progress"]["step"] == (4 if damage == "state.json" else 3)
