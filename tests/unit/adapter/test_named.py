"""Several named adapters on one base: switching gives a model that holds that adapter alone; pissa.reference is the base."""

from __future__ import annotations

import copy

import pytest
import torch

import pissa
from helpers import TOKENS, lm_loss, logits, tiny_gpt2, tiny_llama, train_steps

PISSA = pissa.AdapterConfig(method="pissa", rank=4, alpha=8.0)
LORA = pissa.AdapterConfig(method="lora", rank=2, seed=5)


def saved(tmp_path, make, cfg, name: str, lr: float = 1e-2):
    """(the trained model holding this adapter alone, its folder)."""
    model = pissa.attach(make(), cfg)
    train_steps(model, [TOKENS], lm_loss, steps=3, lr=lr)
    return model, pissa.save_adapter(model, tmp_path / name)


def two(tmp_path, make=tiny_llama):
    alone_a, a = saved(tmp_path, make, PISSA, "a")
    alone_b, b = saved(tmp_path, make, LORA, "b")
    model = pissa.load_adapter(make(), a, name="a")
    pissa.load_adapter(model, b, name="b")
    return model, alone_a, alone_b, a, b


def buffer_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_switching_gives_the_logits_of_a_model_holding_that_adapter_alone(tmp_path, make) -> None:
    model, alone_a, alone_b, _, _ = two(tmp_path, make)
    assert pissa.list_adapters(model) == ["a", "b"] and pissa.active_adapter(model) == "a"
    base = {id(layer.residual.weight) for _, layer in pissa.adapted_layers(model)}
    assert torch.equal(logits(model), logits(alone_a))  # the held adapter computes exactly as alone
    pissa.set_adapter(model, "b")
    assert pissa.active_adapter(model) == "b" and pissa.list_adapters(model) == ["b", "a"]
    torch.testing.assert_close(logits(model), logits(alone_b), atol=1e-6, rtol=1e-6)
    pissa.set_adapter(model, "a")
    assert torch.equal(logits(model), logits(alone_a))
    # the base was never reloaded or copied: the same residual tensors throughout
    assert base == {id(layer.residual.weight) for _, layer in pissa.adapted_layers(model)}


def test_extra_adapters_cost_their_factors_only_and_one_adapter_costs_what_it_did(tmp_path) -> None:
    model, alone_a, alone_b, _, b = two(tmp_path)
    single = pissa.load_adapter(tiny_llama(), tmp_path / "a")
    assert buffer_bytes(single) == buffer_bytes(alone_a)  # the single-adapter path is as small as before
    assert set(single.state_dict()) == set(alone_a.state_dict())
    factors_b = sum(t.numel() * t.element_size() for _, layer in pissa.adapted_layers(alone_b)
                    for t in layer.tensors().values())
    assert buffer_bytes(model) == buffer_bytes(alone_a) + factors_b  # no dense weight per adapter
    pissa.unload_adapter(model, "b")  # back to one adapter: as small as a model that never held two
    assert buffer_bytes(model) == buffer_bytes(alone_a) and torch.equal(logits(model), logits(alone_a))
    # and a training step touches the same tensors: the adapter's trainable factors, nothing else
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n, p in alone_a.named_parameters() if p.requires_grad]


def test_only_the_active_adapter_trains_and_saves(tmp_path) -> None:
    model, _, alone_b, _, _ = two(tmp_path)
    pissa.set_adapter(model, "b")
    assert pissa.trainable_parameters(model) == pissa.trainable_parameters(alone_b)
    train_steps(model, [TOKENS], lm_loss, steps=2)
    train_steps(alone_b, [TOKENS], lm_loss, steps=2)
    torch.testing.assert_close(logits(model), logits(alone_b), atol=1e-5, rtol=1e-5)
    pissa.set_adapter(model, "a")
    reloaded = pissa.load_adapter(tiny_llama(), pissa.save_adapter(model, tmp_path / "b2", name="b"))
    assert pissa.active_adapter(model) == "a"
    torch.testing.assert_close(logits(reloaded), logits(alone_b), atol=1e-5, rtol=1e-5)
    merged = pissa.merge(copy.deepcopy(pissa.set_adapter(model, "b")))
    torch.testing.assert_close(logits(merged), logits(alone_b), atol=1e-5, rtol=1e-5)


def test_unloading_the_held_adapter_keeps_the_others_exact(tmp_path) -> None:
    model, _, alone_b, _, _ = two(tmp_path)
    with pytest.raises(pissa.PissaError, match="`name` 'a' is the active adapter"):
        pissa.unload_adapter(model, "a")
    pissa.set_adapter(model, "b")
    pissa.unload_adapter(model, "a")
    assert pissa.list_adapters(model) == ["b"]
    torch.testing.assert_close(logits(model), logits(alone_b), atol=1e-6, rtol=1e-6)
    with pytest.raises(pissa.PissaError, match="`name` 'a' is not an adapter of this model"):
        pissa.set_adapter(model, "a")


def test_bad_second_adapters_are_refused_before_anything_changes(tmp_path) -> None:
    model, _, _, a, _ = two(tmp_path)
    before = logits(model)
    with pytest.raises(pissa.PissaError, match="pass name= to load another"):
        pissa.load_adapter(model, a)
    with pytest.raises(pissa.PissaError, match="`name` 'b' is already an adapter"):
        pissa.load_adapter(model, a, name="b")
    with pytest.raises(pissa.PissaError, match="`name` must be"):
        pissa.load_adapter(model, a, name="x.y")
    other = pissa.attach(tiny_llama(), pissa.AdapterConfig(method="lora", rank=2, targets=["q_proj"]))
    with pytest.raises(pissa.PissaError, match="adapts other layers"):
        pissa.load_adapter(model, pissa.save_adapter(other, tmp_path / "q"), name="q")
    changed = tiny_llama()
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    wrong = pissa.save_adapter(pissa.attach(changed, LORA), tmp_path / "wrong")
    with pytest.raises(pissa.PissaError, match="different base model"):
        pissa.load_adapter(model, wrong, name="w")
    quantized = pissa.attach(tiny_llama(), pissa.AdapterConfig(method="pissa", rank=4, quantize="int8"))
    with pytest.raises(pissa.PissaError, match="quantized residual"):
        pissa.load_adapter(model, pissa.save_adapter(quantized, tmp_path / "int8"), name="int8")
    assert pissa.list_adapters(model) == ["a", "b"] and torch.equal(logits(model), before)


@pytest.mark.parametrize("cfg", [PISSA, LORA, pissa.AdapterConfig(method="olora", rank=3)])
def test_reference_is_the_base_model(cfg) -> None:
    base = tiny_llama()
    model = pissa.attach(copy.deepcopy(base), cfg)
    train_steps(model, [TOKENS], lm_loss, steps=3)
    trained = logits(model)
    assert not torch.allclose(trained, logits(base), atol=1e-3)
    with pissa.reference(model):
        torch.testing.assert_close(logits(model), logits(base), atol=1e-5, rtol=1e-5)
    assert torch.equal(logits(model), trained)


def test_reference_of_a_second_adapter_is_the_base_too(tmp_path) -> None:
    model, _, _, _, _ = two(tmp_path)
    pissa.set_adapter(model, "b")
    with pissa.reference(model):
        torch.testing.assert_close(logits(model), logits(tiny_llama()), atol=1e-5, rtol=1e-5)
