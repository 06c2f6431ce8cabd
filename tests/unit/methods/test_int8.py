"""quantize="int8": LLM.int8 residuals (8-bit rows, 16-bit outlier columns; bitsandbytes on the CPU) for QPiSSA and
QLoRA: the codec, attach, training, files, merge, decompose and the error analysis."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

import pissa
from helpers import TOKENS, lm_loss, logits, mlp, relative_error, tiny_gpt2, tiny_llama, train_steps
from pissa.adapter.quantized import Int8Linear, dense_copy, dense_shape, is_quantized
from pissa.analysis.quant_error import layer_ratios, reduction_ratio
from pissa.methods.factors import residual_of
from pissa.methods.inits import pissa_init
from pissa.methods.inputs import InitOptions
from pissa.methods.int8 import OUTLIER_SIGMAS, int8, int8_quantize
from pissa.methods.nf4 import nf4
from pissa.methods.qpissa import qpissa_iterates

MAKERS = {"gpt2-conv1d": tiny_gpt2, "llama-linear": tiny_llama}


def int8_reference(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 of a weight in pure torch: the outlier columns (an entry >= 6 rms) in float16, the other entries
    rounded to 127ths of their row's absmax (outliers left out of the absmax). Returns (round trip, outlier columns)."""
    X16 = X.half().float()
    big = X16.abs() >= OUTLIER_SIGMAS * X.double().square().mean().sqrt().item()
    cols = big.any(0).nonzero().flatten()
    rest = X16.masked_fill(big, 0)
    scale = rest.abs().amax(1, keepdim=True)
    out = torch.round(rest * (127.0 / scale)).nan_to_num(0) * scale / 127
    out[:, cols] = X16[:, cols]
    return out, cols


def spiky(out_f: int = 48, in_f: int = 80, seed: int = 0) -> torch.Tensor:
    """A weight-like matrix with two outlier columns (3 and 17) and an all-zero row (5)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    W[2, 3], W[40 % out_f, 17] = 3.0, -2.5
    W[5] = 0
    return W


@pytest.mark.parametrize("shape", [(48, 80), (1, 40), (7, 5), (64, 64)])
def test_int8_round_trip_matches_the_reference(shape) -> None:
    W = spiky(*shape) if shape[0] > 5 and shape[1] > 17 else torch.randn(shape)
    codes, scales, cols, outliers = int8_quantize(W)
    ref, ref_cols = int8_reference(W)
    assert codes.dtype == torch.int8 and codes.shape == W.shape and scales.dtype == torch.float32 and scales.shape == (shape[0],)
    assert torch.equal(cols, ref_cols) and outliers.dtype == torch.float16
    assert torch.equal(outliers.float(), W.half().float()[:, cols])
    assert torch.allclose(int8(W), ref, rtol=1e-6, atol=1e-9)
    assert (codes[:, cols] == 0).all()
    batch = torch.stack([W, 2 * W, -W])
    assert torch.equal(int8(batch), torch.stack([int8(b) for b in batch]))  # each matrix its own scales and outliers


def test_outlier_columns_are_kept_in_16_bits_and_lower_the_error() -> None:
    import bitsandbytes.functional as F

    W = spiky()
    codes, scales, cols, _ = int8_quantize(W)
    assert cols.tolist() == [3, 17] and scales[5] == 0 and not codes[5].any()
    plain = F.int8_vectorwise_dequant(*F.int8_vectorwise_quant(W.half())[:2])  # one absmax per row, no outliers
    assert relative_error(int8(W), W) < 0.5 * relative_error(plain, W)
    assert torch.equal(int8(W)[:, cols], W.half().float()[:, cols])


def test_int8_is_finer_than_nf4_and_deterministic() -> None:
    W = torch.randn(64, 96)
    assert relative_error(int8(W), W) < 0.2 * relative_error(nf4(W), W)
    assert all(torch.equal(a, b) for a, b in zip(int8_quantize(W), int8_quantize(W.clone())))


def test_decompose_int8_is_the_qpissa_iterate() -> None:
    W = spiky(64, 128, seed=1)
    d = pissa.decompose(W, 8, quantize="int8", svd="exact")
    opt = InitOptions(svd="exact")
    steps = qpissa_iterates(W.unsqueeze(0), *pissa_init(W.unsqueeze(0), 8, opt), opt, int8)
    for _ in range(5):
        Q, A, B = next(steps)
    assert torch.equal(d.A, A[0]) and torch.equal(d.B, B[0])
    assert relative_error(d.residual, Q[0]) < 1e-3  # the same codes up to a rare rounding tie
    assert 0 < relative_error(d.residual + d.B @ d.A, W) < relative_error(int8(W), W)


def test_attach_holds_an_8bit_residual() -> None:
    model = tiny_llama()
    before = logits(model)
    pissa.attach(model, pissa.AdapterConfig(rank=4, quantize="int8"))
    for _, layer in pissa.adapted_layers(model):
        res = layer.residual
        assert isinstance(res, Int8Linear) and is_quantized(res) and layer.weight.dtype == torch.int8
        assert dense_shape(res) == (layer.out_features, layer.in_features)
        stored = sum(b.numel() * b.element_size() for b in res.buffers())
        n = layer.in_features * layer.out_features
        assert stored == n + 4 * layer.out_features + res.outlier_cols.numel() * (8 + 2 * layer.out_features)
        assert isinstance(dense_copy(res), nn.Linear)
    assert relative_error(logits(model), before) < 0.02


def test_refinement_against_int8_and_qlora_int8() -> None:
    W = spiky()

    def layer_of(cfg):
        model = nn.Sequential(nn.Linear(80, 48, bias=False))
        model[0].weight.data.copy_(W)
        layer = pissa.attach(model, cfg)[0]
        return relative_error(layer.residual.dequantized() + layer.scaling * layer.B0 @ layer.A0, W), layer

    one, _ = layer_of(pissa.AdapterConfig(rank=6, quantize="int8", quant_iters=1, svd="exact"))
    five, layer = layer_of(pissa.AdapterConfig(rank=6, quantize="int8", quant_iters=5, alpha=12.0, svd="exact"))
    assert five <= one < relative_error(int8(W), W)
    assert torch.equal(layer.residual.dequantized(), int8(residual_of(W, layer.Ar, layer.Br, layer.scaling)))
    _, qlora = layer_of(pissa.AdapterConfig(method="lora", rank=6, quantize="int8"))
    assert not qlora.B0.any() and torch.equal(qlora.residual.dequantized(), int8(W)) and not hasattr(qlora, "Ar")


def test_8bit_backward_matches_the_dense_layer_and_only_factors_train() -> None:
    layer = Int8Linear(spiky(), torch.randn(48))
    dense = layer.to_dense()
    x1 = torch.randn(5, 80, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    layer(x1).square().sum().backward()
    dense(x2).square().sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=4, quantize="int8"))
    frozen = {n: b.clone() for n, b in model.named_buffers() if ".residual." in n}
    losses = train_steps(model, [TOKENS], lm_loss, steps=15, lr=1e-2)
    assert losses[-1] < losses[0]
    assert frozen and all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n in frozen)


def test_bf16_base_keeps_its_dtype() -> None:
    model = mlp(torch.bfloat16)
    pissa.attach(model, pissa.AdapterConfig(rank=4, quantize="int8"))
    assert model[0].residual.dequantized().dtype == torch.bfloat16
    assert model(torch.randn(3, 24, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["pissa", "lora"])
@pytest.mark.parametrize("arch", MAKERS)
def test_save_load_rebuilds_identical_int8_residuals_and_merge_keeps_outputs(tmp_path, arch, method) -> None:
    base = MAKERS[arch]()
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(method=method, rank=4, alpha=8.0, quantize="int8",
                                                                   quant_iters=3))
    train_steps(model, [TOKENS], lm_loss, steps=3)
    pissa.save_adapter(model, tmp_path / "a")
    loaded = pissa.load_adapter(copy.deepcopy(base), tmp_path / "a")
    for (n1, a), (n2, b) in zip(pissa.adapted_layers(loaded), pissa.adapted_layers(model)):
        assert n1 == n2 and isinstance(a.residual, Int8Linear)
        sa, sb = a.residual.state_dict(), b.residual.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sb)  # codes, scales, outliers
    trained = logits(model)
    assert relative_error(logits(loaded), trained) <= 1e-6
    pissa.merge(loaded)
    assert not any(isinstance(m, (pissa.PissaLinear, Int8Linear)) for m in loaded.modules())
    assert relative_error(logits(loaded), trained) <= 1e-5


def test_bad_int8_input_is_refused(monkeypatch) -> None:
    with pytest.raises(pissa.PissaError, match="exceeds float16's range"):
        pissa.decompose(1e6 * torch.randn(8, 8), 2, method="lora", quantize="int8")
    import bitsandbytes.functional as F

    monkeypatch.delattr(F, "int8_vectorwise_quant")  # an older bitsandbytes
    model = mlp()
    with pytest.raises(pissa.PissaError, match=r"quantize='int8' needs bitsandbytes >= 0.45"):
        pissa.attach(model, pissa.AdapterConfig(rank=2, quantize="int8"))
    assert not list(pissa.adapted_layers(model))
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)  # not installed
    with pytest.raises(pissa.PissaError, match="needs bitsandbytes; run: pip install"):
        pissa.attach(model, pissa.AdapterConfig(rank=2, quantize="int8"))


def test_quant_error_ratios_against_int8() -> None:
    W = torch.stack([spiky(48, 80, seed=i) for i in range(2)])
    zero = reduction_ratio(W, int8(W), torch.zeros(2, 1, 80), torch.zeros(2, 48, 1), quantize=int8)
    assert torch.equal(zero, torch.zeros(2, dtype=torch.float64))
    rows = layer_ratios({f"layers.{i}.q": W[i] for i in range(2)}, 4, [1, 5], quantize=int8)
    assert all(r.ratios["QLoRA"] == 0 and 0 < r.ratios["QPiSSA-1"] <= r.ratios["QPiSSA-5"] for r in rows)
    nf4_rows = layer_ratios({"layers.0.q": W[0]}, 4, [5])
    assert rows[0].ratios["QPiSSA-5"] != nf4_rows[0].ratios["QPiSSA-5"]


def test_analyze_quant_error_int8_command(tmp_path, monkeypatch, capsys) -> None:
    from pissa import cli

    weights = {f"model.layers.{i}.mlp.up_proj": spiky(32, 64, seed=i) for i in range(2)}
    monkeypatch.setattr("pissa.analysis.quant_error.model_weights", lambda *a: weights)
    out = tmp_path / "qe"
    args = ["analyze", "quant-error", "--model", "tiny", "--rank", "4", "--iters", "1", "--quantize", "int8"]
    assert cli.main([*args, "--out", str(out)]) == 0
    assert "INT8 error reduction" in (out / "quant_error.md").read_text()
    assert cli.main([*args[:-1], "int4", "--out", str(tmp_path / "bad")]) == 2
    assert "int4" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_finetune_and_compare_with_int8_residuals(tiny, tmp_path) -> None:
    import json

    from helpers import finetune
    from pissa.cli import main

    assert finetune(tiny, tmp_path / "ft", "--quantize", "int8", "--steps", "2") == 0
    assert json.loads((tmp_path / "ft" / "adapter" / "adapter_config.json").read_text())["config"]["quantize"] == "int8"
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "pissa,lora", "--quantize", "int8", "--model", str(tiny / "llama"),
                 "--data", str(tiny / "data.jsonl"), "--rank", "4", "--steps", "2", "--batch-size", "4", "--eval-size", "4",
                 "--warmup", "1", "--threads", "1", "--out", str(out)]) == 0
    assert (out / "report.md").is_file() and all((out / m / "adapter").is_dir() for m in ("pissa", "lora"))
