"""save_adapter / load_adapter / export_peft reproduce the trained model; wrong bases are refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import pissa
from conftest import TOKENS, lm_loss, logits, mlp, relative_error, tiny_gpt2, tiny_llama, train_steps

MAKERS = {"gpt2-conv1d": tiny_gpt2, "llama-linear": tiny_llama}


def assert_same_adapters(loaded, model) -> None:
    """Bit-identical residuals and factors, and the same outputs (up to kernel non-determinism)."""
    pairs = list(zip(pissa.adapted_layers(loaded), pissa.adapted_layers(model)))
    assert len(pairs) == len(list(pissa.adapted_layers(model))) > 0
    for (n1, a), (n2, b) in pairs:
        assert n1 == n2
        assert torch.equal(a.residual.weight, b.residual.weight)
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
    assert relative_error(logits(loaded), logits(model)) <= 1e-6


def trained(make, method: str = "pissa", alpha: float | None = 8.0):
    """(untouched base copy, trained adapted model)."""
    base = make()
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(method=method, rank=4, alpha=alpha))
    train_steps(model, [TOKENS], lm_loss, steps=4, lr=1e-2)
    return base, model


@pytest.mark.parametrize("arch", MAKERS)
@pytest.mark.parametrize("method", sorted(pissa.METHODS))
def test_save_load_round_trip_is_exact(tmp_path, arch, method) -> None:
    base, model = trained(MAKERS[arch], method)
    pissa.save_adapter(model, tmp_path / "adapter")
    loaded = pissa.load_adapter(base, tmp_path / "adapter")
    assert_same_adapters(loaded, model)
    assert pissa.trainable_parameters(loaded) == pissa.trainable_parameters(model)
    # and it keeps training from there
    train_steps(loaded, [TOKENS], lm_loss, steps=1)


def test_adapter_dir_has_no_pickle_and_records_fingerprint(tmp_path) -> None:
    _, model = trained(tiny_llama)
    path = pissa.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    doc = json.loads((path / "adapter_config.json").read_text())
    assert doc["config"]["rank"] == 4 and len(doc["base_fingerprint"]) == 32
    assert len(doc["layers"]) == 14


def test_different_base_is_refused(tmp_path) -> None:
    _, model = trained(tiny_llama)
    pissa.save_adapter(model, tmp_path / "a")
    other = tiny_llama()
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight[3, 3] += 1e-3
    with pytest.raises(pissa.PissaError, match="made from a different base model .*mlp.up_proj"):
        pissa.load_adapter(other, tmp_path / "a")
    with pytest.raises(pissa.PissaError, match="made for another model"):
        pissa.load_adapter(tiny_gpt2(), tmp_path / "a")


def test_residual_model_is_accepted_as_base(tmp_path) -> None:
    """A model whose target weights already are the residuals (what `pissa init` writes) loads the same."""
    base, model = trained(tiny_llama)
    pissa.save_adapter(model, tmp_path / "a")
    residual_model = copy.deepcopy(base)
    for name, layer in pissa.adapted_layers(model):
        residual_model.get_submodule(name).weight.data.copy_(layer.residual.weight)
    loaded = pissa.load_adapter(residual_model, tmp_path / "a")
    assert_same_adapters(loaded, model)


def test_save_replaces_atomically_and_leaves_no_temp(tmp_path) -> None:
    _, model = trained(tiny_llama)
    pissa.save_adapter(model, tmp_path / "a")
    pissa.save_adapter(model, tmp_path / "a")
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_failed_save_leaves_previous_adapter(tmp_path, monkeypatch) -> None:
    _, model = trained(tiny_llama)
    pissa.save_adapter(model, tmp_path / "a")
    before = (tmp_path / "a" / "adapter.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pissa.io, "save_file", boom)
    with pytest.raises(OSError):
        pissa.save_adapter(model, tmp_path / "a")
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    assert (tmp_path / "a" / "adapter.safetensors").read_bytes() == before


@pytest.mark.parametrize("content, message", [(None, "not a pissa adapter directory"), ("{oops", "not valid JSON")])
def test_bad_adapter_dir_is_refused(tmp_path, content, message) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    if content is not None:
        (d / "adapter_config.json").write_text(content)
        (d / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(pissa.PissaError, match=message):
        pissa.load_adapter(tiny_llama(), d)


@pytest.mark.parametrize("arch", MAKERS)
@pytest.mark.parametrize("method", sorted(pissa.METHODS))
def test_export_peft_loads_in_peft_and_reproduces_outputs(tmp_path, arch, method) -> None:
    from peft import PeftModel

    base, model = trained(MAKERS[arch], method)
    pissa.export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == (4 if method in ("lora", "lora-xs", "svfit") else 8)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert relative_error(logits(peft_model), logits(model)) <= 1e-5


def test_export_of_unadapted_model_is_refused(tmp_path) -> None:
    with pytest.raises(pissa.PissaError, match="no pissa adapters"):
        pissa.export_peft(mlp(), tmp_path / "x")
    assert not (tmp_path / "x").exists()
