"""QPiSSA: NF4 residuals (bitsandbytes on the CPU), the iterations, the error metric, 4-bit training and files."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn

import pissa
from helpers import DEVICES, TOKENS, lm_loss, logits, mlp, relative_error, tiny_gpt2, tiny_llama, train_steps
from pissa.adapter.quantized import NF4Linear, _DequantMatMul
from pissa.analysis.quant_error import nuclear_norm, reduction_ratio
from pissa.methods.factors import residual_of
from pissa.methods.inits import pissa_init
from pissa.methods.inputs import InitOptions
from pissa.methods.nf4 import nf4, nf4_quantize
from pissa.methods.qpissa import loftq_iterates, qpissa_iterates

MAKERS = {"gpt2-conv1d": tiny_gpt2, "llama-linear": tiny_llama}
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230850219727, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])  # QLoRA's NF4 code book


def nf4_reference(X: torch.Tensor) -> torch.Tensor:
    """Round each block of 64 row-major values to the nearest NF4 level times the block's absmax (pure torch)."""
    flat = X.reshape(-1).float()
    pad = (-flat.numel()) % 64
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    nearest = ((blocks / absmax).unsqueeze(-1) - NF4_LEVELS).abs().argmin(-1)
    return (NF4_LEVELS[nearest] * absmax).reshape(-1)[: flat.numel()].view(X.shape)


def spectral_matrix(out_f: int = 64, in_f: int = 128, seed: int = 0) -> torch.Tensor:
    """A weight-like matrix: a decaying spectrum (s_i = 1 / sqrt(i + 1)) on random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out_f, out_f, generator=g)).Q
    V = torch.linalg.qr(torch.randn(in_f, out_f, generator=g)).Q
    s = 1 / torch.arange(1, out_f + 1).float().sqrt()
    return (U * s) @ V.T


@pytest.mark.parametrize("shape", [(64, 96), (32, 32), (5, 40), (48, 24)])
def test_nf4_round_trip_matches_the_code_book(shape) -> None:
    """Including the shapes whose rows are not multiples of 64 (bitsandbytes' 2-D CPU dequantize gets those wrong)."""
    X = torch.randn(shape)
    assert torch.equal(nf4(X), nf4_reference(X))
    codes, absmax = nf4_quantize(X)
    assert codes.dtype == torch.uint8 and codes.numel() == (X.numel() + 1) // 2 and absmax.numel() == -(-X.numel() // 64)
    batch = torch.randn(3, *shape)
    assert torch.equal(nf4(batch), torch.stack([nf4_reference(b) for b in batch]))


def test_decompose_quantized_is_the_dequantized_residual_plus_ba() -> None:
    W = spectral_matrix()
    d = pissa.decompose(W, 8, quantize="nf4", svd="exact")
    opt = InitOptions(svd="exact")
    steps = qpissa_iterates(W.unsqueeze(0), *pissa_init(W.unsqueeze(0), 8, opt), opt)
    for _ in range(5):  # the default iterations: residual Q_5, factors A_5, B_5
        Q, A, B = next(steps)
    assert torch.equal(d.A, A[0]) and torch.equal(d.B, B[0])
    assert relative_error(d.residual, Q[0]) < 1e-3  # the same NF4 codes up to a rare rounding tie
    error = relative_error(d.residual + d.B @ d.A, W)
    assert 0 < error < relative_error(nf4(W), W)  # better than quantizing W itself (QLoRA)
    plain = pissa.decompose(W, 8)
    assert relative_error(d.B @ d.A, plain.B @ plain.A) < 0.1  # the iterations move the factors only a little


def test_nuclear_norm_matches_svdvals() -> None:
    E = torch.randn(3, 20, 50)
    expected = torch.linalg.svdvals(E.double()).sum(-1)
    assert torch.allclose(nuclear_norm(E), expected, rtol=1e-10)
    assert torch.allclose(nuclear_norm(E.mT), expected, rtol=1e-10)


def test_reduction_ratio_is_zero_for_qlora_positive_and_grows_with_rank() -> None:
    W = spectral_matrix().unsqueeze(0)
    assert reduction_ratio(W, nf4(W), torch.zeros(1, 1, 128), torch.zeros(1, 64, 1)).item() == 0.0
    ratios = []
    for r in (2, 8, 24):
        opt = InitOptions(svd="exact")
        A, B = pissa_init(W, r, opt)
        steps = qpissa_iterates(W, A, B, opt)
        one = reduction_ratio(W, *next(steps))
        for _ in range(3):
            next(steps)
        five = reduction_ratio(W, *next(steps))
        loftq = loftq_iterates(W, r, opt)
        loftq_one = reduction_ratio(W, *next(loftq))
        assert 0 <= one.item() < five.item() and loftq_one.item() >= 0
        ratios.append(five.item())
    assert ratios[0] < ratios[1] < ratios[2]


def test_qpissa_iterates_end_on_the_svd_step() -> None:
    """(Q_t, A_t, B_t): Q_t quantizes W - B_{t-1} A_{t-1}, B_t A_t is the best rank-r fit of W - Q_t."""
    W = spectral_matrix().unsqueeze(0)
    opt = InitOptions(svd="exact")
    A0, B0 = pissa_init(W, 6, opt)
    steps = qpissa_iterates(W, A0, B0, opt)
    Q1, A1, B1 = next(steps)
    Q2, A2, B2 = next(steps)
    assert torch.equal(Q1, nf4(W - B0 @ A0)) and torch.equal(Q2, nf4(W - B1 @ A1))
    fit, _ = pissa_init(W - Q2, 6, opt)
    assert torch.equal(A2, fit)
    # the SVD step is optimal for its Q: never worse (Frobenius) than keeping the previous factors
    assert torch.linalg.matrix_norm(W - Q2 - B2 @ A2) <= torch.linalg.matrix_norm(W - Q2 - B1 @ A1)


def test_attach_holds_a_4bit_residual_and_stays_close_to_the_base() -> None:
    model = tiny_llama()
    before = logits(model)
    pissa.attach(model, pissa.AdapterConfig(rank=4, quantize="nf4"))
    for _, layer in pissa.adapted_layers(model):
        res = layer.residual
        assert isinstance(res, NF4Linear) and layer.weight.dtype == torch.uint8
        stored = sum(b.numel() * b.element_size() for b in res.buffers())
        assert stored == pytest.approx(0.5625 * layer.in_features * layer.out_features, rel=0.02)
    assert relative_error(logits(model), before) < 0.1


def test_refinement_lowers_the_layer_error_and_leaves_lora_alone() -> None:
    W = spectral_matrix(48, 80)

    def error(cfg):
        model = nn.Sequential(nn.Linear(80, 48, bias=False))
        model[0].weight.data.copy_(W)
        layer = pissa.attach(model, cfg)[0]
        return relative_error(layer.residual.dequantized() + layer.scaling * layer.B0 @ layer.A0, W), layer

    one, _ = error(pissa.AdapterConfig(rank=6, quantize="nf4", quant_iters=1))
    five, layer = error(pissa.AdapterConfig(rank=6, quantize="nf4", quant_iters=5, alpha=12.0, svd="exact"))
    assert five < one
    # the residual is nf4(W - s Br Ar) with the previous iteration's factors; A0, B0 are refit to it, so the
    # init is better than re-quantizing after the last SVD step (the former behaviour: nf4(W - s B0 A0) + s B0 A0)
    assert torch.equal(layer.residual.dequantized(), nf4(residual_of(W, layer.Ar, layer.Br, layer.scaling)))
    requantized = nf4(residual_of(W, layer.A0, layer.B0, layer.scaling)) + layer.scaling * layer.B0 @ layer.A0
    assert five < relative_error(requantized, W)
    _, qlora = error(pissa.AdapterConfig(method="lora", rank=6, quantize="nf4"))
    assert not qlora.B0.any() and torch.equal(qlora.residual.dequantized(), nf4(W)) and not hasattr(qlora, "Ar")


def test_attach_output_is_qt_plus_bt_at() -> None:
    """After T iterations the layer computes x (Q_T + B_T A_T)^T, the T-th iterate of qpissa_iterates."""
    W = spectral_matrix(48, 80)
    model = nn.Sequential(nn.Linear(80, 48, bias=False))
    model[0].weight.data.copy_(W)
    layer = pissa.attach(model, pissa.AdapterConfig(rank=6, quantize="nf4", quant_iters=3, svd="exact"))[0]
    opt = InitOptions(svd="exact")
    steps = qpissa_iterates(W.unsqueeze(0), *pissa_init(W.unsqueeze(0), 6, opt), opt)
    for _ in range(3):
        Q, A, B = next(steps)
    assert torch.equal(layer.residual.dequantized(), Q[0])  # s = 1: the same residual, bit for bit
    assert torch.equal(layer.A0, A[0]) and torch.equal(layer.B0, B[0])
    x = torch.randn(5, 80)
    assert torch.allclose(model(x), x @ (Q[0] + B[0] @ A[0]).T, atol=1e-5)


def test_4bit_backward_matches_the_dense_dequantized_layer() -> None:
    layer = NF4Linear(torch.randn(40, 48), torch.randn(40))
    dense = layer.to_dense()
    assert isinstance(dense, nn.Linear) and torch.equal(dense.weight, layer.dequantized())
    x1 = torch.randn(5, 48, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    layer(x1).square().sum().backward()
    dense(x2).square().sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)


def test_4bit_model_trains_and_only_the_factors_change() -> None:
    model = tiny_llama()
    pissa.attach(model, pissa.AdapterConfig(rank=4, quantize="nf4"))
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("codes", "absmax"))}
    losses = train_steps(model, [TOKENS], lm_loss, steps=15, lr=1e-2)
    assert losses[-1] < losses[0]
    assert frozen and all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n in frozen)


def test_bf16_base_keeps_its_dtype() -> None:
    model = mlp(torch.bfloat16)
    pissa.attach(model, pissa.AdapterConfig(rank=4, quantize="nf4"))
    assert model[0].residual.dequantized().dtype == torch.bfloat16
    assert model(torch.randn(3, 24, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("arch", MAKERS)
def test_save_load_round_trip_rebuilds_identical_4bit_residuals(tmp_path, arch) -> None:
    base = MAKERS[arch]()
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(rank=4, alpha=8.0, quantize="nf4", quant_iters=3))
    train_steps(model, [TOKENS], lm_loss, steps=3)
    pissa.save_adapter(model, tmp_path / "a")
    loaded = pissa.load_adapter(copy.deepcopy(base), tmp_path / "a")
    for (n1, a), (n2, b) in zip(pissa.adapted_layers(loaded), pissa.adapted_layers(model)):
        assert n1 == n2 and isinstance(a.residual, NF4Linear)
        assert torch.equal(a.residual.codes, b.residual.codes) and torch.equal(a.residual.absmax, b.residual.absmax)
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
        assert hasattr(b, "Ar") and torch.equal(a.Ar, b.Ar) and torch.equal(a.Br, b.Br)
        assert torch.equal(a.A0, b.A0) and torch.equal(a.B0, b.B0)
    assert relative_error(logits(loaded), logits(model)) <= 1e-6  # same weights; kernels may sum in another order
    # a dense residual checkpoint (what `pissa init --quantize nf4` writes) loads into the same 4-bit model
    residual_model = copy.deepcopy(base)
    for name, layer in pissa.adapted_layers(model):
        module = residual_model.get_submodule(name)
        W = module.weight.T if arch == "gpt2-conv1d" else module.weight
        dense = residual_of(W.detach(), layer.Ar, layer.Br, layer.scaling)
        module.weight.data.copy_(dense.T if arch == "gpt2-conv1d" else dense)
    from_residual = pissa.load_adapter(residual_model, tmp_path / "a")
    for (_, a), (_, b) in zip(pissa.adapted_layers(from_residual), pissa.adapted_layers(model)):
        assert torch.equal(a.residual.codes, b.residual.codes) and torch.equal(a.residual.absmax, b.residual.absmax)
    assert relative_error(logits(from_residual), logits(model)) <= 1e-6


def test_merge_gives_dense_layers_with_the_same_outputs() -> None:
    for make in MAKERS.values():
        model = pissa.attach(make(), pissa.AdapterConfig(rank=4, quantize="nf4"))
        train_steps(model, [TOKENS], lm_loss, steps=2)
        trained = logits(model)
        pissa.merge(model)
        assert not any(isinstance(m, (pissa.PissaLinear, NF4Linear)) for m in model.modules())
        assert relative_error(logits(model), trained) <= 1e-5


def test_adapter_without_residual_factors_still_loads(tmp_path) -> None:
    """Files written before residual factors existed: the residual is nf4(W - s B0 A0), as then."""
    from safetensors.torch import load_file, save_file

    base = tiny_llama()
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(rank=4, quantize="nf4", quant_iters=2))
    pissa.save_adapter(model, tmp_path / "a")
    file = tmp_path / "a" / "adapter.safetensors"
    tensors = {k: v for k, v in load_file(str(file)).items() if not k.endswith((".Ar", ".Br"))}
    save_file(tensors, str(file), metadata={"format": "pissa-adapter"})
    config = tmp_path / "a" / "adapter_config.json"  # such files also predate the "integrity" digests
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "integrity"}))
    loaded = pissa.load_adapter(copy.deepcopy(base), tmp_path / "a")
    for name, layer in pissa.adapted_layers(loaded):
        W = base.get_submodule(name).weight.detach()
        assert not hasattr(layer, "Ar")
        assert torch.equal(layer.residual.dequantized(), nf4(residual_of(W, layer.A0, layer.B0, layer.scaling)))


def test_export_peft_warns_that_the_lora_applies_to_the_unquantized_base(tmp_path) -> None:
    from pissa.adapter.export import peft_factors

    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=4, quantize="nf4"))
    train_steps(model, [TOKENS], lm_loss, steps=2)
    with pytest.warns(UserWarning, match="unquantized base weights"):
        pissa.export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 8
    for _, layer in pissa.adapted_layers(model):  # the update relative to W: s (B A - Br Ar)
        A, B = peft_factors(layer, "2r")
        assert torch.allclose(B @ A, (layer.lora_B @ layer.lora_A - layer.Br @ layer.Ar).detach(), atol=1e-6)


def test_already_quantized_base_is_refused() -> None:
    import bitsandbytes as bnb

    model = mlp()
    model[0] = bnb.nn.Linear4bit(24, 48, quant_type="nf4").to("cpu")
    match = "torch.uint8, which cannot be decomposed.*already-quantized model must be loaded unquantized"
    with pytest.raises(pissa.PissaError, match=match):
        pissa.attach(model, pissa.AdapterConfig(rank=2, quantize="nf4"))
    assert not list(pissa.adapted_layers(model))


def test_bad_quantization_input_is_refused(monkeypatch) -> None:
    with pytest.raises(pissa.PissaError, match="unsupported quantize='fp4'"):
        pissa.AdapterConfig(quantize="fp4")
    with pytest.raises(pissa.PissaError, match="quant_iters must be an integer >= 1"):
        pissa.AdapterConfig(quantize="nf4", quant_iters=0)
    with pytest.raises(pissa.PissaError, match="unsupported quantize='int4'; use one of: nf4, int8"):
        pissa.decompose(torch.randn(8, 8), 2, quantize="int4")
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)  # as if bitsandbytes were not installed
    model = mlp()
    with pytest.raises(pissa.PissaError, match="needs bitsandbytes; run: pip install"):
        pissa.attach(model, pissa.AdapterConfig(rank=2, quantize="nf4"))
    assert not list(pissa.adapted_layers(model))


def test_quant_error_table_per_projection_type() -> None:
    from pissa.analysis.quant_error import layer_ratios, markdown_table, method_names, projection_type, summarize

    assert projection_type("model.layers.3.self_attn.q_proj") == "self_attn.q_proj"
    assert projection_type("bert.pooler.dense") == "bert.pooler.dense"
    weights = {f"layers.{i}.{p}": spectral_matrix(32, 64, seed=i) for i in range(2) for p in ("q", "up")}
    methods = method_names([1, 2])
    rows = layer_ratios(weights, 4, [1, 2])
    assert [r.name for r in rows] == list(weights) and all(r.ratios["QLoRA"] == 0.0 for r in rows)
    assert all(r.ratios[m] > 0 for r in rows for m in methods[1:])
    summary = summarize(rows, methods)
    assert [s[0] for s in summary] == ["q", "up", "average"] and summary[-1][2] == 4
    assert summary[-1][3]["QPiSSA-2"] == pytest.approx(sum(r.ratios["QPiSSA-2"] for r in rows) / 4)
    assert "| **average** |  | 4 | 0.00 |" in markdown_table(summary, methods)


def test_analyze_quant_error_command_writes_table_csv_and_plot(tmp_path, monkeypatch, capsys) -> None:
    from pissa import cli

    weights = {f"model.layers.{i}.mlp.up_proj": spectral_matrix(32, 64, seed=i) for i in range(2)}
    monkeypatch.setattr("pissa.analysis.quant_error.model_weights", lambda *a: weights)
    out = tmp_path / "qe"
    assert cli.main(["analyze", "quant-error", "--model", "tiny", "--rank", "4", "--iters", "1,2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["quant_error.csv", "quant_error.md", "quant_error.png"]
    assert "| mlp.up_proj | 32x64 | 2 | 0.00 |" in capsys.readouterr().out
    assert cli.main(["analyze", "quant-error", "--rank", "40", "--out", str(tmp_path / "bad")]) == 2
    assert "rank 40 does not fit" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(128, 64), (96, 192), (40, 48), (96, 80)])
def test_bitsandbytes_4bit_matmul_reads_our_codes(device: str, shape: tuple[int, int]) -> None:
    """The CUDA path (bitsandbytes' matmul_4bit on our codes and QuantState) equals dequantize-then-matmul,
    forward and input gradient, within 1e-5 relative (float32). On the CPU only in_features that are multiples
    of 64 are checked: bitsandbytes 0.50's CPU kernel misreads the others (why the CPU path dequantizes)."""
    out_f, in_f = shape
    layer = NF4Linear(torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0))).to(device)
    x = torch.randn(7, in_f, device=device, requires_grad=True)
    ref = _DequantMatMul.apply(x, layer)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)
    assert layer.quant_state(torch.float32).shape == (out_f, in_f)
    if device == "cpu" and in_f % 64:
        return  # bitsandbytes' CPU kernel is wrong here; the layer never calls it on the CPU
    y = layer.kernel_matmul(x)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    assert relative_error(y, ref) <= 1e-5 and relative_error(grad, ref_grad) <= 1e-5
