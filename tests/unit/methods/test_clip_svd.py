"""CLIP-SVD: every singular value of every targeted matrix trains, U and V stay frozen, at each layer's full rank."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn

import pissa
from helpers import TOKENS, lm_loss, logits, mlp, relative_error, tiny_gpt2, tiny_llama, train_steps
from pissa.optim import OptimizerConfig, build_optimizer

CFG = dict(method="clip-svd")


def full_ranks(model: nn.Module) -> list[int]:
    return [min(layer.in_features, layer.out_features) for _, layer in pissa.adapted_layers(model)]


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2-conv1d", "llama-linear"])
@pytest.mark.parametrize("alpha", [None, 8.0])
def test_output_unchanged_at_init_and_the_residual_is_rounding(make, alpha) -> None:
    base = make()
    before = logits(base)
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(rank=4, alpha=alpha, **CFG))
    assert relative_error(logits(model), before) <= 1e-6
    for name, layer in pissa.adapted_layers(model):
        k = min(layer.in_features, layer.out_features)
        assert layer.rank == k and layer.lora_core.shape == (k,) and layer.scaling == (1.0 if alpha is None else alpha / k)
        W = base.get_submodule(name).weight.detach()
        W = W.T if make is tiny_gpt2 else W
        assert relative_error(layer.scaling * (layer.lora_B * layer.lora_core) @ layer.lora_A, W) <= 1e-5
        assert layer.weight.norm() <= 1e-5 * W.norm()  # W - U S V^T: only W's rounding is left


def test_trainable_count_is_the_sum_of_full_ranks_whatever_rank_says() -> None:
    counts = set()
    for rank in (1, 4, 13):  # 13 exceeds the smallest layer of mlp(): the rank is not read
        model = pissa.attach(mlp(), pissa.AdapterConfig(rank=rank, **CFG))
        assert pissa.trainable_parameters(model) == sum(full_ranks(model))
        counts.add(pissa.trainable_parameters(model))
    assert counts == {24 + 40 + 12}  # mlp(): Linear 24->48, 48->40, 40->12
    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=4, rank_pattern={"q_proj": 0}, **CFG))
    assert not any(n.endswith("q_proj") for n, _ in pissa.adapted_layers(model))  # rank 0 still leaves a layer out
    assert pissa.trainable_parameters(model) == sum(full_ranks(model))
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_core"}


def test_decompose_is_the_full_svd() -> None:
    W = torch.randn(20, 30, dtype=torch.float64)
    d = pissa.decompose(W, 3, method="clip-svd")  # rank 3 is not read: all 20 triplets
    assert d.A.shape == (20, 30) and d.B.shape == (20, 20)
    assert torch.allclose(d.A @ d.A.T, torch.eye(20, dtype=W.dtype), atol=1e-12)
    assert torch.allclose(d.B @ d.A, W, atol=1e-12) and d.residual.abs().max() < 1e-12


@pytest.mark.parametrize("alpha", [None, 5.0])
def test_singular_value_gradient_is_u_dense_gradient_v(alpha) -> None:
    """dL/ds_i = s u_i^T (dL/dW) v_i with the dense gradient of the unadapted model (s = alpha / k)."""
    torch.manual_seed(0)
    base = mlp(torch.float64)
    x = torch.randn(6, 24, dtype=torch.float64)

    def loss(model: nn.Module) -> torch.Tensor:
        return model(x).sin().sum()

    dense = copy.deepcopy(base)
    loss(dense).backward()
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(rank=2, alpha=alpha, factor_dtype="float64", **CFG))
    loss(model).backward()
    for name, layer in pissa.adapted_layers(model):
        G = dense.get_submodule(name).weight.grad
        U, V = layer.lora_B.detach(), layer.lora_A.detach().T
        expected = layer.scaling * torch.einsum("oi,ok,ik->k", G, U, V)
        assert torch.allclose(layer.lora_core.grad, expected, rtol=1e-10, atol=1e-12)
        assert layer.lora_A.grad is None and layer.lora_B.grad is None


@pytest.mark.parametrize("factor_dtype", ["float32", "bfloat16", "float16"])
def test_training_moves_only_the_singular_values_in_any_factor_dtype(factor_dtype) -> None:
    """No autocast: the factors are held in ``factor_dtype`` (the optimizer steps float32 masters of half ones)."""
    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=4, factor_dtype=factor_dtype, **CFG))
    frozen = {n: t.clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())
              if not n.endswith("lora_core")}
    cores = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lora_core")}
    assert all(c.dtype == getattr(torch, factor_dtype) for c in cores.values())
    # the run's optimizer: half-precision factors step through float32 masters (torch's AdamW in float16 NaNs)
    opt = build_optimizer(model, OptimizerConfig(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(6):
        loss = lm_loss(model, TOKENS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    named = dict(list(model.named_parameters()) + list(model.named_buffers()))
    assert all(torch.equal(named[n], t) for n, t in frozen.items())  # U, V (lora_B, lora_A, B0, A0), residuals: bitwise
    assert all(not torch.equal(named[n], c) for n, c in cores.items())


def tiny_clip(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                max_position_embeddings=16)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=24,
                  patch_size=8)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


def clip_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 64, (4, 7), generator=g), "pixel_values": torch.randn(4, 3, 24, 24, generator=g)}


def clip_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**clip_batch()).logits_per_image


@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj", "out_proj"], "all-linear"])
def test_clip_model_trains_saves_loads_and_merges(tmp_path, targets) -> None:
    base = tiny_clip()
    before = clip_logits(base)
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(rank=4, targets=targets, **CFG))
    names = [n for n, _ in pissa.adapted_layers(model)]
    assert any(n.startswith("text_model.") for n in names) and any(n.startswith("vision_model.") for n in names)
    assert relative_error(clip_logits(model), before) <= 1e-5
    assert pissa.trainable_parameters(model) == sum(full_ranks(model))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(**clip_batch(), return_loss=True).loss  # CLIP's symmetric contrastive loss
    loss.backward()
    opt.step()
    model.eval()
    trained = clip_logits(model)
    assert relative_error(trained, before) > 1e-4
    pissa.save_adapter(model, tmp_path / "a")
    loaded = pissa.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert torch.equal(clip_logits(loaded), trained)
    merged = pissa.merge(loaded)
    assert not list(pissa.adapted_layers(merged))
    assert relative_error(clip_logits(merged), trained) <= 1e-5


def test_peft_export_is_rank_k_and_reproduces_outputs(tmp_path) -> None:
    from peft import PeftModel

    base = tiny_llama()
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(rank=4, alpha=16.0, **CFG))
    train_steps(model, [TOKENS], lm_loss, steps=3, lr=1e-2)
    pissa.export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ranks = {n: k for (n, _), k in zip(pissa.adapted_layers(model), full_ranks(model))}
    assert all(cfg["rank_pattern"].get(re.escape(n), cfg["r"]) == k for n, k in ranks.items())  # (B C - B0 C0) A: rank k, not 2k
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert relative_error(logits(peft_model), logits(model)) <= 1e-5


def test_pissa_init_stream_equals_attach(tmp_path, monkeypatch) -> None:
    """pissa init gives each stored weight its full rank as attach does (ranks from the checkpoint's shapes)."""
    from safetensors.torch import load_file

    from pissa.checkpoints.init import init_checkpoint

    base = tiny_llama()
    base.save_pretrained(tmp_path / "llama")
    cfg = pissa.AdapterConfig(rank=4, alpha=8.0, **CFG)
    init_checkpoint(tmp_path / "llama", tmp_path / "out", cfg, progress=False)
    monkeypatch.setattr("pissa.adapter.attach.BATCH_BYTES", 1)  # one layer per batch, as streaming decomposes
    model = pissa.attach(copy.deepcopy(base), cfg)
    pissa.save_adapter(model, tmp_path / "ref")
    doc, ref_doc = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("out/adapter", "ref"))
    assert doc == ref_doc
    tensors, ref = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in ("out/adapter", "ref"))
    assert tensors.keys() == ref.keys() and all(torch.equal(tensors[k], ref[k]) for k in ref)
    assert {v["rank"] for v in doc["layers"].values()} == set(full_ranks(model))


@pytest.mark.slow
def test_smollm2_starts_exactly_and_saves_loads_and_merges(tmp_path) -> None:
    from pissa.runtime.hub import load_model

    base, tok = load_model("smollm2")
    base.eval()
    ids = tok(["The movie was a delight from start to finish.", "Dull, slow and far too long."], return_tensors="pt",
              padding=True)

    def out(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(**ids).logits

    before = out(base)
    cfg = pissa.AdapterConfig(rank=16, targets=["q_proj", "v_proj", "down_proj"], **CFG)
    model = pissa.attach(copy.deepcopy(base), cfg)
    assert relative_error(out(model), before) <= 1e-5
    assert pissa.trainable_parameters(model) == 30 * (576 + 192 + 576)
    with torch.no_grad():
        for _, layer in pissa.adapted_layers(model):
            layer.lora_core.mul_(1.01)
    trained = out(model)
    assert relative_error(trained, before) > 1e-3
    pissa.save_adapter(model, tmp_path / "a")
    loaded = pissa.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert relative_error(out(loaded), trained) <= 1e-6
    assert relative_error(out(pissa.merge(loaded)), trained) <= 1e-5


@pytest.mark.slow
def test_embedded_minilm_starts_exactly_and_saves_loads_and_merges(tmp_path) -> None:
    from transformers import AutoModel

    from pissa.runtime.hub import resolve_model

    base = AutoModel.from_pretrained(resolve_model("minilm"), local_files_only=True).eval()
    ids = {"input_ids": torch.randint(1000, 2000, (2, 12), generator=torch.Generator().manual_seed(0))}

    def out(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(**ids).last_hidden_state

    before = out(base)
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(rank=8, **CFG))
    assert relative_error(out(model), before) <= 1e-5
    assert pissa.trainable_parameters(model) == sum(full_ranks(model)) == 6 * (4 * 384 + 2 * 384) + 384
    with torch.no_grad():
        for _, layer in pissa.adapted_layers(model):
            layer.lora_core.mul_(1.01)
    trained = out(model)
    pissa.save_adapter(model, tmp_path / "a")
    loaded = pissa.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert relative_error(out(loaded), trained) <= 1e-6
    assert relative_error(out(pissa.merge(loaded)), trained) <= 1e-5
