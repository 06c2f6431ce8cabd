"""The SVD-adapter family (MiLoRA, OLoRA, SVFit, LoRA-XS, SORSA next to PiSSA and LoRA).

For every method: outputs unchanged at init, the trainable-parameter formula, training moves
only the method's trainable parts, a bad rank is refused; save/load and the PEFT export of every
method are covered by tests/unit/adapter/test_save_load.py (parametrized over the registry). Then each method's
init formula, the scaling rule with a core, and SORSA's regularizer.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pissa
from helpers import TOKENS, WEIGHT_ONLY, decaying, lm_loss, logits, mlp, relative_error, tiny_gpt2, tiny_llama, train_steps
from pissa.methods.inputs import InitOptions
from pissa.methods.kronecker import factor_shape
from pissa.methods.registry import METHODS, init_structured

FAMILY = WEIGHT_ONLY
TRAINS = {"svfit": ("core",), "lora-xs": ("core",), "sorsa": ("A", "B", "core"), "loldu": ("core",), "clip-svd": ("core",),
          "soka": ("kron_U", "kron_V"), "sara": ("sparse_values",)}


def expected_params(method: str, r: int, n_in: int, n_out: int) -> int:
    """Trainable parameters of one layer: r (in + out) for two full factors, r for SVFit, r^2 for LoRA-XS,
    min(in, out) for CLIP-SVD (full rank whatever r), a tenth of in * out for SaRA (its default fraction),
    r (m n + p q) for SoKA's balanced factors (when r terms are kept)."""
    m, n, p, q = factor_shape(n_out, n_in)
    return {"soka": r * (m * n + p * q), "svfit": r, "lora-xs": r * r, "sorsa": r * (n_in + n_out) + r, "loldu": r,
            "clip-svd": min(n_in, n_out), "sara": round(0.1 * n_in * n_out)}.get(method, r * (n_in + n_out))


def init(W: torch.Tensor, r: int, method: str):
    return init_structured(W[None], r, method, InitOptions(seeds=[0], svd="exact")).layer(0)


@pytest.mark.parametrize("method", FAMILY)
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2-conv1d", "llama-linear"])
def test_outputs_unchanged_at_init(make, method) -> None:
    model = make()
    before = logits(model)
    pissa.attach(model, pissa.AdapterConfig(method=method, rank=4, alpha=8.0))
    assert relative_error(logits(model), before) <= 1e-5


@pytest.mark.parametrize("method", FAMILY)
def test_trainable_parameters_match_the_formula(method) -> None:
    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(method=method, rank=4))
    layers = list(pissa.adapted_layers(model))
    expected = sum(expected_params(method, 4, layer.in_features, layer.out_features) for _, layer in layers)
    assert pissa.trainable_parameters(model) == expected
    parts = TRAINS.get(method, ("A", "B"))
    suffixes = {"A": "lora_A", "B": "lora_B", "core": "lora_core"}
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {suffixes.get(p, p) for p in parts}


@pytest.mark.parametrize("method", FAMILY)
def test_training_changes_output_and_only_trainable_parts(method) -> None:
    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(method=method, rank=4, alpha=8.0))
    before = logits(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_steps(model, [TOKENS], lm_loss, steps=3, lr=1e-2)
    assert relative_error(logits(model), before) > 1e-4
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("method", [m for m in FAMILY if not METHODS[m].full_rank])  # full rank: test_clip_svd.py
def test_bad_rank_is_refused(method) -> None:
    model = mlp()
    with pytest.raises(pissa.PissaError, match=r"rank 13 does not fit layer '4'.*choose 1 <= rank <= 12"):
        pissa.attach(model, pissa.AdapterConfig(method=method, rank=13))
    assert not list(pissa.adapted_layers(model))
    with pytest.raises(pissa.PissaError, match="rank must be an integer >= 1"):
        pissa.AdapterConfig(method=method, rank=0)


@pytest.mark.parametrize("method", ["svfit", "lora-xs", "sorsa"])
def test_core_methods_save_load_and_merge(tmp_path, method) -> None:
    base = tiny_llama()
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(method=method, rank=4, alpha=8.0))
    train_steps(model, [TOKENS], lm_loss, steps=3, lr=1e-2)
    pissa.save_adapter(model, tmp_path / "a")
    loaded = pissa.load_adapter(copy.deepcopy(base), tmp_path / "a")
    for (_, a), (_, b) in zip(pissa.adapted_layers(loaded), pissa.adapted_layers(model)):
        assert torch.equal(a.lora_core, b.lora_core) and torch.equal(a.core0, b.core0)
        assert torch.equal(a.residual.weight, b.residual.weight)
        assert a.train_parts == b.train_parts and a.facts == b.facts
    assert pissa.trainable_parameters(loaded) == pissa.trainable_parameters(model)
    trained = logits(model)
    assert relative_error(logits(loaded), trained) <= 1e-6
    assert relative_error(logits(pissa.merge(model)), trained) <= 1e-5


def test_milora_trains_the_minor_components() -> None:
    W = decaying(40, 30, 0.9, 0)
    f = init(W, 5, "milora")
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert torch.allclose(f.B @ f.A, (U[:, -5:] * S[-5:]) @ Vh[-5:], atol=1e-10)
    d = pissa.decompose(W, 5, method="milora")
    assert torch.allclose(d.residual, (U[:, :25] * S[:25]) @ Vh[:25], atol=1e-10)  # the principal part


def test_olora_is_the_thin_qr() -> None:
    W = decaying(40, 30, 0.9, 1)
    f = init(W, 6, "olora")
    assert torch.allclose(f.B.T @ f.B, torch.eye(6, dtype=W.dtype), atol=1e-12)
    # B A is W projected on the span of its first 6 columns
    Q = torch.linalg.qr(W[:, :6]).Q
    assert torch.allclose(f.B @ f.A, Q @ Q.T @ W, atol=1e-10)
    assert torch.allclose(f.A[:, :6], torch.triu(f.A[:, :6]))


@pytest.mark.parametrize("method", ["svfit", "sorsa"])
def test_svfit_and_sorsa_keep_singular_vectors_and_values(method) -> None:
    W = decaying(40, 30, 0.9, 2)
    f = init(W, 5, method)
    S = torch.linalg.svdvals(W)
    eye = torch.eye(5, dtype=W.dtype)
    assert torch.allclose(f.core, S[:5], atol=1e-10)
    assert torch.allclose(f.B.T @ f.B, eye, atol=1e-10) and torch.allclose(f.A @ f.A.T, eye, atol=1e-10)
    assert f.train == TRAINS[method] and f.orthonormal == (method == "sorsa")
    d, principal = pissa.decompose(W, 5, method=method, svd="exact"), pissa.decompose(W, 5, svd="exact")
    assert torch.allclose(d.B @ d.A, principal.B @ principal.A, atol=1e-10)


def test_lora_xs_has_a_zero_core_between_balanced_factors() -> None:
    W = decaying(40, 30, 0.9, 3)
    f = init(W, 5, "lora-xs")
    S = torch.linalg.svdvals(W)[:5]
    assert f.core.shape == (5, 5) and torch.count_nonzero(f.core) == 0
    assert torch.allclose(f.B.T @ f.B, torch.diag(S), atol=1e-10) and torch.allclose(f.A @ f.A.T, torch.diag(S), atol=1e-10)
    assert torch.equal(pissa.decompose(W, 5, method="lora-xs").residual, W)


def test_scaling_divides_the_core_and_keeps_factors_orthonormal() -> None:
    """With s = alpha / r, a core method stores core0 = core / s (A, B untouched); others store A / sqrt(s), B / sqrt(s)."""
    W = decaying(48, 24, 0.9, 4).float()
    s = 8.0 / 4
    f = init(W, 4, "sorsa")
    model = torch.nn.Sequential(torch.nn.Linear(24, 48, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(W)
    pissa.attach(model, pissa.AdapterConfig(method="sorsa", rank=4, alpha=8.0, svd="exact"))
    layer = model[0]
    assert torch.allclose(layer.core0, f.core / s, rtol=1e-5)
    assert torch.allclose(layer.B0.T @ layer.B0, torch.eye(4), atol=1e-5)
    assert torch.allclose(layer.delta(), (f.B * f.core) @ f.A, atol=1e-5)


def test_regularization_is_zero_without_sorsa_and_penalizes_drift() -> None:
    plain = pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=4))
    r = pissa.regularization(plain)
    assert r.dim() == 0 and r.item() == 0.0 and not r.requires_grad
    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(method="sorsa", rank=4, alpha=8.0))
    at_init = pissa.regularization(model)
    assert at_init.item() < 1e-4
    at_init.backward()
    assert all(torch.isfinite(layer.lora_B.grad).all() for _, layer in pissa.adapted_layers(model))
    layers = list(pissa.adapted_layers(model))
    with torch.no_grad():
        layers[0][1].lora_B.mul_(1.5)  # columns of norm 1.5: ||B^T B - I||_F = 1.25 * sqrt(r) = 2.5
    assert pissa.regularization(model).item() == pytest.approx(at_init.item() + 2.5, abs=1e-3)


def test_regularized_training_keeps_sorsa_factors_nearly_orthonormal() -> None:
    def loss_fn(weight):
        return lambda m, ids: lm_loss(m, ids) + weight * pissa.regularization(m)

    drift = {}
    for weight in (0.0, 1.0):
        model = pissa.attach(tiny_llama(), pissa.AdapterConfig(method="sorsa", rank=4))
        train_steps(model, [TOKENS], loss_fn(weight), steps=8, lr=3e-2)
        drift[weight] = pissa.regularization(model).item()
    assert drift[1.0] < drift[0.0]


@pytest.mark.slow
@pytest.mark.parametrize("method", FAMILY)
def test_smollm2_outputs_unchanged_at_init(smollm2_q, method) -> None:
    base, ids, before = smollm2_q
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(method=method, rank=16, alpha=32.0, targets=["q_proj"]))
    with torch.no_grad():
        after = model(**ids).logits
    assert relative_error(after, before) <= 1e-5
    assert pissa.trainable_parameters(model) == sum(
        expected_params(method, 16, layer.in_features, layer.out_features) for _, layer in pissa.adapted_layers(model)
    )


@pytest.fixture(scope="module")
def smollm2_q():
    from pissa.runtime.hub import load_model

    model, tok = load_model("smollm2")
    texts = ["The movie was a delight from start to finish.", "Dull, slow and far too long."]
    ids = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**ids).logits
    return model.eval(), ids, before
