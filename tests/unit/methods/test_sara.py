"""SaRA (the sparse shape): exact start, training only inside the mask, the nuclear-norm penalty, the progressive step
(mask, moments, output, resume), optimizer state of the values alone, save/load/merge, errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import pissa
from helpers import TOKENS, finetune, lm_loss, relative_error, tiny_gpt2, tiny_llama
from pissa.adapter.base_layers import dense_weight
from pissa.adapter.progressive import shrink
from pissa.checkpoints.merge import merge_state_dict
from pissa.methods.sparse import sparse_mask


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def trained(base: nn.Module, steps: int = 3, reg: float = 0.0, lr: float = 1e-2, **cfg):
    """``base`` adapted by sara and trained ``steps`` AdamW steps (loss + reg * regularization); with its optimizer."""
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(method="sara", **cfg))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = lm_loss(model, TOKENS)
        if reg:
            loss = loss + reg * pissa.regularization(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def merged_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: dense_weight(layer.merged()) for n, layer in pissa.adapted_layers(model)}


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_the_adapted_model_starts_where_the_base_is(make) -> None:
    base = make()
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(method="sara"))
    assert relative_error(logits(model), logits(base)) <= 1e-6
    for name, W in merged_weights(model).items():
        assert torch.equal(W, dense_weight(base.get_submodule(name)))  # bit for bit
    for _, layer in pissa.adapted_layers(model):
        k = layer.sparse_values.numel()
        assert k == round(0.1 * layer.out_features * layer.in_features)
        assert (dense_weight(layer.residual).flatten()[layer.sparse_index] == 0).all()  # exact zeros on the mask


def test_the_mask_holds_the_smallest_magnitudes_and_the_threshold_rule() -> None:
    W = torch.randn(2, 8, 10, generator=torch.Generator().manual_seed(0))
    index, tau = sparse_mask(W, 0.25)
    flat = W.flatten(1).abs()
    for i in range(2):
        inside = torch.zeros(80, dtype=torch.bool)
        inside[index[i]] = True
        assert flat[i][inside].max() <= tau[i] <= flat[i][~inside].min()
    index, tau = sparse_mask(W[:1], 0.1, threshold=0.3)
    assert torch.equal(index[0], torch.nonzero(flat[0] < 0.3)[:, 0]) and tau.item() == pytest.approx(0.3)
    # a threshold gives each layer its own count: attach makes them one by one
    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(method="sara", sparse_threshold=0.01))
    counts = {layer.sparse_values.numel() for _, layer in pissa.adapted_layers(model)}
    assert len(counts) > 2
    for _, layer in pissa.adapted_layers(model):
        assert (layer.sparse_values.abs() < 0.01).all()


def test_the_sparse_forward_has_the_gradients_of_the_dense_product() -> None:
    from pissa.adapter.shapes.sparse import SparseLinear, scatter

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, dtype=torch.float64, generator=g, requires_grad=True)
    values = torch.randn(20, dtype=torch.float64, generator=g, requires_grad=True)
    index, size = torch.randperm(96, generator=g)[:20], torch.tensor([8, 12])
    assert torch.autograd.gradcheck(lambda a, b: SparseLinear.apply(a, b, index, size), (x, values))
    dense = torch.nn.functional.linear(x, scatter(index, values, size))
    torch.testing.assert_close(SparseLinear.apply(x, values, index, size), dense)


def test_training_changes_only_the_masked_entries_and_the_optimizer_holds_only_the_values() -> None:
    base = tiny_llama()
    model, opt = trained(base)
    for name, W in merged_weights(model).items():
        layer = model.get_submodule(name)
        change = (W - dense_weight(base.get_submodule(name))).flatten()
        outside = torch.ones_like(change, dtype=torch.bool)
        outside[layer.sparse_index] = False
        assert (change[outside] == 0).all() and (change[~outside] != 0).any()
    values = sum(layer.sparse_values.numel() for _, layer in pissa.adapted_layers(model))
    assert pissa.trainable_parameters(model) == values
    moments = sum(v.numel() for s in opt.state.values() for k, v in s.items() if k != "step")
    assert moments == 2 * values  # exp_avg and exp_avg_sq of the values: no dense (out, in) state


def test_the_nuclear_norm_penalty_trains_the_values() -> None:
    base = tiny_llama()
    plain, _ = trained(base, reg=0.0)
    penalized, _ = trained(base, reg=1.0)
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(method="sara"))
    assert pissa.regularization(model).item() == 0  # no update yet
    reg = pissa.regularization(penalized)
    assert reg.requires_grad and reg.item() > 0
    reg.backward()
    assert all(layer.sparse_values.grad is not None and layer.sparse_values.grad.abs().sum() > 0
               for _, layer in pissa.adapted_layers(penalized))
    a = torch.cat([layer.sparse_values.detach() for _, layer in pissa.adapted_layers(plain)])
    b = torch.cat([layer.sparse_values.detach() for _, layer in pissa.adapted_layers(penalized)])
    assert (a - b).abs().max() > 1e-4


def test_the_progressive_step_shrinks_the_mask_keeps_moments_and_output() -> None:
    base = tiny_llama()
    model, opt = trained(base, lr=2e-3)
    layers = dict(pissa.adapted_layers(model))
    before = {n: (layer.sparse_index.clone(), layer.sparse_values.detach().clone(), layer.sparse_threshold.clone(),
                  opt.state[layer.sparse_values]) for n, layer in layers.items()}
    out = logits(model)
    weights = merged_weights(model)
    dropped = shrink(model, opt)
    assert dropped > 0
    assert relative_error(logits(model), out) <= 1e-6
    for name, W in merged_weights(model).items():
        torch.testing.assert_close(W, weights[name], rtol=0, atol=1e-7)
    params = [p for g in opt.param_groups for p in g["params"]]
    for name, layer in pissa.adapted_layers(model):
        index, values, tau, state = before[name]
        keep = values.abs() < tau
        assert torch.equal(layer.sparse_index, index[keep])  # old mask AND |w_t| < threshold
        new_state = opt.state[layer.sparse_values]
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(new_state[k], state[k][keep])
        assert any(p is layer.sparse_values for p in params) and layer.sparse_values.requires_grad
    # training goes on from the shrunk state and still changes only the (new) mask
    frozen = merged_weights(model)
    loss = lm_loss(model, TOKENS)
    loss.backward()
    opt.step()
    for name, W in merged_weights(model).items():
        layer = model.get_submodule(name)
        change = (W - frozen[name]).flatten()
        outside = torch.ones_like(change, dtype=torch.bool)
        outside[layer.sparse_index] = False
        assert (change[outside] == 0).all()


def test_save_load_merge_and_streamed_merge_agree_after_a_progressive_step(tmp_path: Path) -> None:
    base = tiny_gpt2()
    model, opt = trained(base, lr=2e-3)
    shrink(model, opt)
    loss = lm_loss(model, TOKENS)
    loss.backward()
    opt.step()
    out = logits(model)
    pissa.save_adapter(model, tmp_path / "a")
    loaded = pissa.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert torch.equal(logits(loaded), out)
    assert relative_error(logits(pissa.merge(loaded)), out) <= 1e-6
    save_file({k: v.contiguous() for k, v in base.state_dict().items() if k != "lm_head.weight"}, tmp_path / "m.st")
    state = merge_state_dict(load_file(tmp_path / "m.st"), tmp_path / "a")
    streamed = copy.deepcopy(base)
    streamed.load_state_dict(state, strict=False)
    assert relative_error(logits(streamed), out) <= 1e-6


def test_bad_fractions_thresholds_and_the_peft_export_are_refused_in_one_line(tmp_path: Path) -> None:
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(pissa.PissaError, match=r"sparse_fraction must be in \(0, 1\)") as e:
            pissa.AdapterConfig(method="sara", sparse_fraction=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(pissa.PissaError, match="sparse_threshold must be > 0"):
        pissa.AdapterConfig(method="sara", sparse_threshold=0.0)
    with pytest.raises(pissa.PissaError, match="selects no entry"):
        pissa.attach(tiny_llama(), pissa.AdapterConfig(method="sara", sparse_threshold=1e-12))
    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(method="sara"))
    with pytest.raises(pissa.PissaError, match="no LoRA form.*merge") as e:
        pissa.export_peft(model, tmp_path / "peft")
    assert "\n" not in str(e.value) and not (tmp_path / "peft").exists()


def test_finetune_with_a_progressive_step_resumes_after_it_exactly(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    """A run that shrinks at step 3 and crashes at step 7 (after the step-4 checkpoint: the shorter index) resumes
    to the same adapter and losses as an uninterrupted run."""
    from pissa.training import loop

    args = ("--method", "sara", "--lr", "1e-3", "--progressive-step", "3", "--save-every", "4")
    assert finetune(tiny, tmp_path / "whole", *args) == 0
    real, calls = loop.train_step, [0]

    def crashing(*a, **kw):
        calls[0] += 1
        if calls[0] == 7:
            raise RuntimeError("killed")
        return real(*a, **kw)

    monkeypatch.setattr(loop, "train_step", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        finetune(tiny, tmp_path / "split", *args)
    monkeypatch.setattr(loop, "train_step", real)
    assert finetune(tiny, tmp_path / "split", *args, "--resume") == 0
    ta, tb = (load_file(str(p / "adapter" / "adapter.safetensors")) for p in (tmp_path / "whole", tmp_path / "split"))
    assert ta.keys() == tb.keys() and any(k.endswith("sparse_fixed_index") for k in ta)
    assert all(torch.equal(ta[k], tb[k]) if not ta[k].is_floating_point() else (ta[k] - tb[k]).abs().max() <= 1e-6
               for k in ta)
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (tmp_path / "whole", tmp_path / "split"))
    assert [x for _, x in ma["train_loss"]] == pytest.approx([x for _, x in mb["train_loss"]], abs=1e-6)


@pytest.mark.slow
def test_smollm2_starts_exactly_and_saves_loads_and_merges(tmp_path: Path) -> None:
    from pissa.runtime.hub import load_model

    base, tok = load_model("smollm2")
    base.eval()
    ids = tok(["The movie was a delight from start to finish.", "Dull, slow and far too long."], return_tensors="pt",
              padding=True)

    def out(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(**ids).logits

    before = out(base)
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(method="sara", targets=["q_proj", "v_proj", "down_proj"]))
    assert relative_error(out(model), before) <= 1e-5
    with torch.no_grad():
        for _, layer in pissa.adapted_layers(model):
            layer.sparse_values.mul_(3.0)
    trained_out = out(model)
    assert relative_error(trained_out, before) > 1e-4
    pissa.save_adapter(model, tmp_path / "a")
    loaded = pissa.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert relative_error(out(loaded), trained_out) <= 1e-6
    assert relative_error(out(pissa.merge(loaded)), trained_out) <= 1e-5
