"""Integration: the real embedded models start exactly where they were, and the fast SVD is within 0.1%."""

from __future__ import annotations

import copy

import pytest
import torch

import pissa
from helpers import relative_error
from pissa.adapter.base_layers import dense_weight

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from pissa.runtime.hub import load_model

    model, tokenizer = load_model("smollm2")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel

    from pissa.runtime.hub import resolve_model

    return AutoModel.from_pretrained(resolve_model("minilm"), local_files_only=True).eval()


def test_smollm2_outputs_unchanged_and_residual_near_optimal(smollm2) -> None:
    base, tok = smollm2
    texts = ["The movie was a delight from start to finish.", "Dull, slow and far too long."]
    ids = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        before = base(**ids).logits
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(rank=16))
    layers = dict(pissa.adapted_layers(model))
    assert len(layers) == 210  # 30 blocks x (q, k, v, o, gate, up, down); lm_head is tied and skipped
    with torch.no_grad():
        after = model(**ids).logits
    assert relative_error(after, before) <= 1e-5
    # default init: every checked layer's residual within 0.1% of the optimal rank-16 residual
    for name in [n for n in layers if n.startswith(("model.layers.0.", "model.layers.29."))]:
        W = dense_weight(base.get_submodule(name)).detach().double()
        optimal = torch.linalg.svdvals(W)[16:].pow(2).sum().sqrt()
        residual = dense_weight(layers[name].residual).double().norm()
        assert residual <= 1.001 * optimal, name
    expected = sum(16 * (layer.in_features + layer.out_features) for layer in layers.values())
    assert pissa.trainable_parameters(model) == expected


def test_minilm_outputs_unchanged(minilm) -> None:
    ids = torch.randint(1000, 20000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = minilm(input_ids=ids).last_hidden_state
    model = pissa.attach(copy.deepcopy(minilm), pissa.AdapterConfig(rank=16))
    assert len(list(pissa.adapted_layers(model))) == 6 * 6 + 1  # q, k, v, attn out, ffn in/out per block + pooler
    with torch.no_grad():
        after = model(input_ids=ids).last_hidden_state
    assert relative_error(after, before) <= 1e-5


def test_smollm2_bf16_bound(smollm2) -> None:
    """bf16 base: the residual is rounded to bf16. Logits move by <= 5e-2 (measured 2.2% to 3.6%,
    depending on targets and SVD), less than the bf16 model itself differs from the fp32 model (5.7%)."""
    base, tok = smollm2
    model = copy.deepcopy(base).to(torch.bfloat16)
    ids = tok(["A quiet, moving film."], return_tensors="pt")
    with torch.no_grad():
        fp32 = base(**ids).logits
        before = model(**ids).logits.float()
        pissa.attach(model, pissa.AdapterConfig(rank=16))
        after = model(**ids).logits.float()
    assert relative_error(after, before) <= 5e-2
    assert relative_error(after, before) < relative_error(before, fp32)
