"""SoKA (arXiv 2506.15251): the Kronecker SVD, the term rule, the Kronecker shape in every path (attach, forward,
save / load, merge, streamed merge), its errors, and the real SmolLM2 (slow)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pissa
from helpers import TOKENS, lm_loss, logits, relative_error, tiny_gpt2, tiny_llama, train_steps
from pissa.adapter.base_layers import dense_weight
from pissa.checkpoints.init import init_checkpoint
from pissa.checkpoints.merge import merge_checkpoint, merge_state_dict
from pissa.methods.kronecker import balanced_split, factor_shape, kron_sum, kron_svd, rearrange, term_count, unrearrange

SHAPES = [(4, 3, 5, 2), (6, 8, 2, 3), (1, 7, 9, 1), (3, 3, 3, 3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_rearrangement_maps_a_kronecker_product_to_an_outer_product(shape) -> None:
    m, n, p, q = shape
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(m, n, generator=g, dtype=torch.float64), torch.randn(p, q, generator=g, dtype=torch.float64)
    R = rearrange(torch.kron(U, V), shape)
    torch.testing.assert_close(R, torch.outer(U.flatten(), V.flatten()), rtol=0, atol=1e-14)
    W = torch.randn(2, m * p, n * q, generator=g, dtype=torch.float64)
    assert torch.equal(unrearrange(rearrange(W, shape), shape), W)


@pytest.mark.parametrize("shape", SHAPES)
def test_all_terms_rebuild_w_and_the_tail_is_the_truncation_error(shape) -> None:
    m, n, p, q = shape
    W = torch.randn(1, m * p, n * q, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    U, S, V = kron_svd(W, shape)
    K = min(m * n, p * q)
    assert U.shape == (1, K, m, n) and V.shape == (1, K, p, q) and S.shape == (1, K)
    torch.testing.assert_close(kron_sum(U[0] * S[0, :, None, None], V[0]), W[0], rtol=0, atol=1e-12)
    for r in range(K + 1):
        top = kron_sum(U[0, :r] * S[0, :r, None, None], V[0, :r]) if r else torch.zeros_like(W[0])
        err = torch.linalg.matrix_norm(W[0] - top).square()
        torch.testing.assert_close(err, S[0, r:].square().sum(), rtol=1e-10, atol=1e-12)


def test_balanced_split_is_peft_lokr_factorization() -> None:
    from peft.tuners.lokr.layer import factorization

    for dim in [*range(1, 200), 576, 1536, 49152, 97]:
        assert balanced_split(dim) == factorization(dim), dim
    assert factor_shape(192, 576) == (12, 24, 16, 24)


def test_term_count_energy_and_elbow() -> None:
    S = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.1]).sqrt()  # squared: 10, 5, 1, 0.5, 0.1 (share 0.602, 0.904, 0.964, ...)
    assert term_count(S, 5, "energy", 0.6) == 1
    assert term_count(S, 5, "energy", 0.61) == 2
    assert term_count(S, 5, "energy", 0.9) == 2
    assert term_count(S, 5, "energy", 0.95) == 3
    assert term_count(S, 1, "energy", 0.95) == 1  # capped by rank
    assert term_count(S, 5, "energy", 1.0) == 5
    knee = torch.tensor([9.0, 8.8, 8.6, 1.0, 0.9, 0.8, 0.7])  # the drop after the third value
    assert term_count(knee, 7, "elbow") == 3
    assert term_count(knee, 2, "elbow") == 2
    assert term_count(torch.tensor([5.0, 0.0, 0.0, 0.0]), 4, "elbow") == 1  # one Kronecker product


def two_layers() -> nn.Module:
    """Two equal-shape layers (one batch at attach): an exact Kronecker product and a random matrix."""
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    with torch.no_grad():
        model[0].weight.copy_(torch.kron(torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)))
        model[2].weight.copy_(torch.randn(16, 16, generator=g))
    return model


@pytest.mark.parametrize("rule", ["energy", "elbow"])
def test_each_layer_keeps_its_own_terms_and_only_those_train(rule) -> None:
    model = two_layers()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    before = model(x)
    pissa.attach(model, pissa.AdapterConfig(method="soka", rank=8, kron_rule=rule, targets=["0", "2"]))
    terms = {n: layer.kron_U.shape[0] for n, layer in pissa.adapted_layers(model)}
    assert terms["0"] == 1 and terms["2"] > 1  # an exact Kronecker product needs one term
    assert all(layer.rank == 8 for _, layer in pissa.adapted_layers(model))  # the scaling's rank: the cap
    assert pissa.trainable_parameters(model) == sum(r * (4 * 4 + 4 * 4) for r in terms.values())
    assert relative_error(model(x), before) <= 1e-6
    assert torch.linalg.matrix_norm(dense_weight(model[0].residual)) <= 1e-5  # the whole weight trains


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_forward_save_load_merge_and_streamed_merge(tmp_path, make) -> None:
    base = make()
    before = logits(base)
    cfg = pissa.AdapterConfig(method="soka", rank=3, alpha=6.0, kron_tau=1.0)
    model = pissa.attach(copy.deepcopy(base), cfg)
    assert relative_error(logits(model), before) <= 1e-5
    train_steps(model, [TOKENS], lm_loss, steps=3, lr=1e-2)
    trained = logits(model)
    assert relative_error(trained, before) > 1e-4
    for _, layer in pissa.adapted_layers(model):
        x = torch.randn(2, 3, layer.in_features)
        torch.testing.assert_close(layer.shape.forward(x, layer.tensors(), layer.scaling), F.linear(x, layer.delta()),
                                   rtol=1e-5, atol=1e-6)
    pissa.save_adapter(model, tmp_path / "a")
    loaded = pissa.load_adapter(copy.deepcopy(base), tmp_path / "a")
    for (_, a), (_, b) in zip(pissa.adapted_layers(loaded), pissa.adapted_layers(model)):
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in b.tensor_names)
        assert torch.equal(dense_weight(a.residual), dense_weight(b.residual)) and a.facts == b.facts
    assert relative_error(logits(loaded), trained) <= 1e-6
    streamed = merge_state_dict(base.state_dict(), tmp_path / "a")
    merged = pissa.merge(model)
    assert relative_error(logits(merged), trained) <= 1e-5
    state = merged.state_dict()
    assert all(torch.equal(streamed[k], state[k]) for k in state), "streamed merge differs from pissa.merge"


def test_pissa_init_and_merge_checkpoint_equal_the_in_memory_paths(tmp_path, monkeypatch) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    cfg = pissa.AdapterConfig(method="soka", rank=3, alpha=6.0, targets=["q_proj", "down_proj"])
    out = init_checkpoint(tmp_path / "base", tmp_path / "init", cfg, progress=False)
    monkeypatch.setattr("pissa.adapter.attach.BATCH_BYTES", 1)  # one layer per batch, as `pissa init` decomposes
    model = pissa.attach(copy.deepcopy(base), cfg)
    pissa.save_adapter(model, tmp_path / "ref")
    streamed = load_file(str(out / "adapter" / "adapter.safetensors"))
    ref = load_file(str(tmp_path / "ref" / "adapter.safetensors"))
    assert streamed.keys() == ref.keys() and all(torch.equal(streamed[k], ref[k]) for k in ref)
    train_steps(model, [TOKENS], lm_loss, steps=3, lr=1e-2)
    pissa.save_adapter(model, tmp_path / "trained")
    merged = AutoModelForCausalLM.from_pretrained(merge_checkpoint(out / "residual", tmp_path / "trained", tmp_path / "m",
                                                                   progress=False))
    assert relative_error(logits(merged), logits(model)) <= 1e-5


def test_bad_factor_shape_and_peft_export_are_refused_in_one_line(tmp_path) -> None:
    model = tiny_llama()
    with pytest.raises(pissa.PissaError, match=r"kron_shape \(4, 4, 4, 4\) does not divide layer "
                       r"'model.layers.0.self_attn.q_proj' of shape \(32, 32\).*m\*p = 32 and n\*q = 32") as err:
        pissa.attach(model, pissa.AdapterConfig(method="soka", rank=2, kron_shape=(4, 4, 4, 4)))
    assert "\n" not in str(err.value) and not list(pissa.adapted_layers(model))
    for bad, message in [((2, 2, 2), "kron_shape must be four integers"), ((0, 1, 1, 1), "kron_shape must be four")]:
        with pytest.raises(pissa.PissaError, match=message):
            pissa.AdapterConfig(method="soka", kron_shape=bad)  # type: ignore[arg-type]
    with pytest.raises(pissa.PissaError, match="kron_tau must be in"):
        pissa.AdapterConfig(method="soka", kron_tau=0.0)
    with pytest.raises(pissa.PissaError, match="unknown kron_rule"):
        pissa.AdapterConfig(method="soka", kron_rule="knee")  # type: ignore[arg-type]
    pissa.attach(model, pissa.AdapterConfig(method="soka", rank=2, kron_shape=(4, 8, 8, 4), targets=["q_proj"]))
    assert {tuple(layer.kron_U.shape[1:]) for _, layer in pissa.adapted_layers(model)} == {(4, 8)}
    with pytest.raises(pissa.PissaError, match=r"kronecker adapter has no LoRA form.*--merged") as err:
        pissa.export_peft(model, tmp_path / "peft")
    assert "\n" not in str(err.value) and not (tmp_path / "peft").exists()
    with pytest.raises(pissa.PissaError, match="not factors B @ A; use pissa.attach"):
        pissa.decompose(torch.randn(8, 8), 2, method="soka")


@pytest.mark.slow
def test_smollm2_exact_at_init_and_save_reload_merge(tmp_path) -> None:
    from pissa.runtime.hub import load_model

    base, tok = load_model("smollm2")
    ids = tok(["The movie was a delight from start to finish.", "Dull, slow and far too long."], return_tensors="pt",
              padding=True)
    with torch.no_grad():
        before = base(**ids).logits
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(method="soka", rank=4, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        assert relative_error(model(**ids).logits, before) <= 1e-5
        for _, layer in pissa.adapted_layers(model):  # a trained-looking update, so that reload and merge are tested
            layer.kron_U.add_(1e-2 * torch.randn_like(layer.kron_U))
        after = model(**ids).logits
        assert relative_error(after, before) > 1e-4
        pissa.save_adapter(model, tmp_path / "a")
        loaded = pissa.load_adapter(copy.deepcopy(base), tmp_path / "a")
        assert relative_error(loaded(**ids).logits, after) <= 1e-6
        assert relative_error(pissa.merge(model)(**ids).logits, after) <= 1e-5
