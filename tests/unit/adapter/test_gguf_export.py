"""The GGUF export read back with gguf's reader against the PEFT export of the same trained model: llama.cpp's
names, metadata, shapes, dtype, and per layer ``(alpha / k) lora_b @ lora_a`` equal to the PEFT delta (the q/k
rows permuted as llama.cpp's converter permutes those weights)."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from safetensors.torch import load_file

import pissa
from helpers import tiny_gpt2, tiny_llama
from pissa.adapter.gguf_export import permute_rows
from pissa.cli import main

PROJECTIONS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def trained(cfg: pissa.AdapterConfig) -> torch.nn.Module:
    """A tiny Llama with ``cfg`` attached and its trainable factors moved off their initial values."""
    model = pissa.attach(tiny_llama(), cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


def read(path) -> tuple[dict[str, object], dict[str, gguf.ReaderTensor]]:
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def peft_deltas(path) -> dict[str, torch.Tensor]:
    """``{layer: (alpha_l / r_l) B @ A}`` of a PEFT export folder."""
    tensors = load_file(path / "adapter_model.safetensors")
    config = json.loads((path / "adapter_config.json").read_text())
    deltas = {}
    for key, A in tensors.items():
        if key.endswith("lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            B = tensors[key.replace("lora_A", "lora_B")]
            pattern = name.replace(".", "\\.")
            alpha = config["alpha_pattern"].get(pattern, config["lora_alpha"])
            r = config["rank_pattern"].get(pattern, config["r"])
            deltas[name] = (alpha / r) * B.double() @ A.double()
    return deltas


@pytest.mark.parametrize("rank_pattern", [None, {"q_proj": 2}])
def test_gguf_reads_back_equal_to_the_peft_export(tmp_path, rank_pattern) -> None:
    model = trained(pissa.AdapterConfig(rank=4, alpha=8, targets="all-linear", rank_pattern=rank_pattern))
    pissa.export_peft(model, tmp_path / "peft")
    report = pissa.export_gguf(model, tmp_path / "a.gguf")
    fields, tensors = read(tmp_path / "a.gguf")
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == pytest.approx(2.0 * 8)
    assert report.rank == 8 and report.path == tmp_path / "a.gguf"
    expected = {f"blk.{i}.{g}.weight.lora_{ab}" for i in range(2) for g in PROJECTIONS.values() for ab in "ab"}
    assert set(tensors) == expected
    deltas = peft_deltas(tmp_path / "peft")
    cfg = model.config
    for name, delta in deltas.items():
        i, proj = name.split(".")[2], ".".join(name.split(".")[3:])
        a, b = tensors[f"blk.{i}.{PROJECTIONS[proj]}.weight.lora_a"], tensors[f"blk.{i}.{PROJECTIONS[proj]}.weight.lora_b"]
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        A, B = torch.from_numpy(a.data.copy()), torch.from_numpy(b.data.copy())
        out, inp = delta.shape
        k = A.shape[0]
        assert A.shape == (k, inp) and B.shape == (out, k) and list(a.shape) == [inp, k] and list(b.shape) == [k, out]
        assert k == (4 if proj == "self_attn.q_proj" and rank_pattern else 8)
        heads = {"self_attn.q_proj": cfg.num_attention_heads, "self_attn.k_proj": cfg.num_key_value_heads}.get(proj)
        want = permute_rows(delta, heads) if heads else delta
        torch.testing.assert_close((16.0 / k) * B.double() @ A.double(), want, rtol=1e-5, atol=1e-6)
        if heads is None and not rank_pattern:  # the factors themselves are the PEFT export's
            torch.testing.assert_close(A, load_file(tmp_path / "peft" / "adapter_model.safetensors")[
                f"base_model.model.{name}.lora_A.weight"])


def test_permute_rows_is_the_converters_rotary_layout() -> None:
    """One head of dim 4 with rotary pairs (0, 1), (2, 3) interleaved becomes halves: rows 0, 2, 1, 3."""
    B = torch.arange(8.0).reshape(8, 1)
    assert permute_rows(B, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_the_embedded_models_names(tmp_path) -> None:
    """SmolLM2's all-linear targets map to blk.N.attn_q/k/v/output and ffn_gate/up/down, 30 blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pissa.adapter.gguf_export import gguf_tensors
    from pissa.runtime.hub import resolve_model

    config = LlamaConfig.from_pretrained(resolve_model("smollm2"))
    config.num_hidden_layers, config.vocab_size = 30, 64  # SmolLM2's shapes, a small vocabulary
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    pissa.attach(model, pissa.AdapterConfig(rank=1, targets="all-linear"))
    arch, alpha, tensors, _ = gguf_tensors(model)
    assert arch == "llama" and alpha == 2.0
    assert set(tensors) == {f"blk.{i}.{g}.weight.lora_{ab}" for i in range(30) for g in PROJECTIONS.values() for ab in "ab"}
    assert tensors["blk.29.ffn_down.weight.lora_a"].shape == (2, config.intermediate_size)
    assert tensors["blk.0.attn_k.weight.lora_b"].shape == (config.num_key_value_heads * config.head_dim, 2)


def test_refusals(tmp_path) -> None:
    with pytest.raises(pissa.PissaError, match="`model`.*GPT2LMHeadModel"):
        pissa.export_gguf(pissa.attach(tiny_gpt2(), pissa.AdapterConfig(rank=2)), tmp_path / "g.gguf")
    model = tiny_llama()
    model.model.layers[0].mlp.extra = torch.nn.Linear(32, 32)  # a layer llama.cpp has no tensor for
    pissa.attach(model, pissa.AdapterConfig(rank=2, targets=["q_proj", "extra"]))
    with pytest.raises(pissa.PissaError, match=r"`targets`: model.layers.0.mlp.extra has no tensor name in llama.cpp's llama"):
        pissa.export_gguf(model, tmp_path / "h.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cli_export_format_gguf(tiny, tmp_path, capsys) -> None:
    base = tiny / "llama"
    model, _ = pissa.hub.load_model(str(base))
    pissa.save_adapter(pissa.attach(model, pissa.AdapterConfig(rank=2, targets=["q_proj", "v_proj"])), tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), "--model", str(base), "--format", "gguf",
                 "--out", str(tmp_path / "a.gguf")]) == 0
    assert "GGUF LoRA (llama.cpp) of rank 4" in capsys.readouterr().out
    _, tensors = read(tmp_path / "a.gguf")
    assert set(tensors) == {f"blk.{i}.attn_{g}.weight.lora_{ab}" for i in range(2) for g in "qv" for ab in "ab"}
    assert main(["export", str(tmp_path / "adapter"), "--model", str(base), "--format", "gguf", "--merged",
                 "--out", str(tmp_path / "m")]) == 2
    assert "--format gguf writes a LoRA adapter" in capsys.readouterr().err and not (tmp_path / "m").exists()
