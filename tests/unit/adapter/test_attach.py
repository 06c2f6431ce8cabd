"""attach / merge on tiny random models: exact at init, only the factors train, bad input refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pissa
from helpers import TOKENS, WEIGHT_ONLY, lm_loss, logits, mlp, relative_error, tiny_gpt2, tiny_llama, train_steps


@pytest.mark.parametrize("method", WEIGHT_ONLY)
@pytest.mark.parametrize("alpha", [None, 32.0])
def test_mlp_outputs_unchanged_at_init(method, alpha) -> None:
    model = mlp()
    x = torch.randn(16, 24)
    before = model(x).detach()
    pissa.attach(model, pissa.AdapterConfig(method=method, rank=4, alpha=alpha))
    assert relative_error(model(x).detach(), before) <= 1e-5


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2-conv1d", "llama-linear"])
def test_transformer_outputs_unchanged_at_init(make) -> None:
    model = make()
    before = logits(model)
    pissa.attach(model, pissa.AdapterConfig(rank=4))
    assert relative_error(logits(model), before) <= 1e-5


@pytest.mark.parametrize("dtype, bound", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_half_precision_init_error_is_bounded(dtype, bound) -> None:
    """bf16/fp16 bases: the only error is rounding the residual to the base dtype (benchmarks/results/init_exactness.md)."""
    model = mlp(dtype)
    x = torch.randn(16, 24).to(dtype)
    before = model(x).detach()
    pissa.attach(model, pissa.AdapterConfig(rank=4))
    assert model[0].residual.weight.dtype == dtype and model[0].lora_A.dtype == torch.float32
    out = model(x).detach()
    assert out.dtype == dtype
    assert relative_error(out, before) <= bound


def test_all_linear_skips_heads_and_tied_layers() -> None:
    gpt2 = pissa.attach(tiny_gpt2(), pissa.AdapterConfig(rank=2))
    names = [n for n, _ in pissa.adapted_layers(gpt2)]
    assert len(names) == 2 * 4 and not any("lm_head" in n for n in names)
    llama = pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=2))
    names = [n for n, _ in pissa.adapted_layers(llama)]
    assert len(names) == 2 * 7 and "lm_head" not in names


def test_trainable_parameters_are_exactly_the_factors() -> None:
    model = tiny_llama()
    pissa.attach(model, pissa.AdapterConfig(rank=4))
    expected = sum(4 * (layer.in_features + layer.out_features) for _, layer in pissa.adapted_layers(model))
    assert pissa.trainable_parameters(model) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_training_changes_only_the_factors_and_lowers_loss() -> None:
    model = tiny_llama()
    pissa.attach(model, pissa.AdapterConfig(rank=4))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_steps(model, [TOKENS], lm_loss, steps=15, lr=1e-2)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2-conv1d", "llama-linear"])
def test_merge_gives_plain_layers_with_same_outputs(make) -> None:
    model = make()
    pissa.attach(model, pissa.AdapterConfig(rank=4, alpha=8))
    train_steps(model, [TOKENS], lm_loss, steps=3)
    trained = logits(model)
    pissa.merge(model)
    assert not any(isinstance(m, pissa.PissaLinear) for m in model.modules())
    assert relative_error(logits(model), trained) <= 1e-5


def test_targets_by_suffix_and_regex() -> None:
    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=2, targets=["q_proj", r".*mlp\.down_proj"]))
    names = sorted(n for n, _ in pissa.adapted_layers(model))
    assert names == sorted(f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj"))


def test_dropout_only_acts_in_training() -> None:
    model = mlp()
    pissa.attach(model, pissa.AdapterConfig(rank=4, dropout=0.5))
    x = torch.randn(8, 24)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_bf16_factors_option() -> None:
    model = pissa.attach(mlp(), pissa.AdapterConfig(rank=4, factor_dtype="bfloat16"))
    assert model[0].lora_A.dtype == torch.bfloat16
    assert model(torch.randn(2, 24)).dtype == torch.float32


def test_no_match_lists_available_names() -> None:
    with pytest.raises(pissa.PissaError, match="matched no Linear/Conv1D/Conv2d layer; available names end in: .*q_proj"):
        pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=2, targets=["query"]))


def test_attaching_twice_is_refused() -> None:
    model = pissa.attach(mlp(), pissa.AdapterConfig(rank=2))
    with pytest.raises(pissa.PissaError, match="already has pissa adapters"):
        pissa.attach(model, pissa.AdapterConfig(rank=2))


def test_rank_above_layer_size_is_refused_and_model_untouched() -> None:
    model = mlp()
    with pytest.raises(pissa.PissaError, match=r"rank 13 does not fit layer '4'.*choose 1 <= rank <= 12"):
        pissa.attach(model, pissa.AdapterConfig(rank=13))
    assert not list(pissa.adapted_layers(model))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"method": "nope"}, "unknown method 'nope'"),
        ({"quantize": "int3"}, "unsupported quantize"),
        ({"dropout": 1.5}, "dropout must be in"),
        ({"factor_dtype": "int8"}, "factor_dtype must be one of"),
        ({"niter": 0}, r"niter must be an integer >= 1 \(or None"),
        ({"block": 0}, "block must be an integer >= 1"),
    ],
)
def test_bad_config_is_refused(kwargs, message) -> None:
    with pytest.raises(pissa.PissaError, match=message):
        pissa.AdapterConfig(**kwargs)


def test_nan_weight_and_int_weight_are_refused() -> None:
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(pissa.PissaError, match="layer '2' contains NaN or Inf"):
        pissa.attach(model, pissa.AdapterConfig(rank=2))
    model = mlp()
    model[0].weight = nn.Parameter(torch.ones(48, 24, dtype=torch.int8), requires_grad=False)
    with pytest.raises(pissa.PissaError, match="dtype torch.int8, which cannot be decomposed"):
        pissa.attach(model, pissa.AdapterConfig(rank=2))


def test_merge_without_adapters_is_refused() -> None:
    with pytest.raises(pissa.PissaError, match="no pissa adapters to merge"):
        pissa.merge(mlp())


@pytest.mark.parametrize("quantize", [None, "nf4", "int8"])
def test_merged_returns_a_new_layer_and_leaves_the_adapted_one_unchanged(quantize) -> None:
    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=4, quantize=quantize))
    train_steps(model, [TOKENS], lm_loss, steps=2)
    name, layer = next(iter(pissa.adapted_layers(model)))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        y = layer(x)
        first, second = layer.merged(), layer.merged()
        assert first is not layer.residual and first.weight is not second.weight
        assert torch.equal(first.weight, second.weight)  # calling it twice counts the update once
        assert torch.allclose(first(x), y, atol=1e-5)
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.get_submodule(name) is layer


@pytest.mark.parametrize("method", ["lora", "lora-xs"])
def test_a_zero_initial_product_keeps_the_base_weight_itself(method: str) -> None:
    """LoRA (B0 = 0) and LoRA-XS (core0 = 0) leave W - 0 = W: the layer keeps the base tensor (no
    copy, so no second copy of the weights in memory), and its residual digest is the base's."""
    model = tiny_llama()
    before = {n: m.weight for n, m in model.named_modules() if n.endswith("q_proj")}
    pissa.attach(model, pissa.AdapterConfig(method=method, rank=4))
    for name, layer in pissa.adapted_layers(model):
        if name in before:
            assert layer.residual.weight.data_ptr() == before[name].data_ptr()
        assert layer.residual_digest == layer.base_digest
    other = pissa.attach(tiny_llama(), pissa.AdapterConfig(method="pissa", rank=4))
    assert all(layer.residual_digest != layer.base_digest for _, layer in pissa.adapted_layers(other))
