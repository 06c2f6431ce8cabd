"""`pissa init`: streaming a sharded checkpoint gives what attach + save_adapter give in memory."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import pissa
from conftest import relative_error, tiny_gpt2, tiny_llama
from pissa import cli, model as pmodel, stream
from pissa.model import find_targets
from test_attach import logits

CFG = pissa.AdapterConfig(rank=4, alpha=8.0, seed=3)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint in 3 shards plus an index and a tokenizer-like file."""
    path = tmp_path_factory.mktemp("ckpt") / "llama"
    tiny_llama().save_pretrained(path, max_shard_size="40KB")
    (path / "tokenizer_config.json").write_text("{}")
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text("{}")
    (path / "1_Pooling" / "weights.bin").write_bytes(b"not copied")
    assert len(list(path.glob("*.safetensors"))) == 3
    return path


def adapter_of(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((path / "adapter_config.json").read_text()), load_file(str(path / "adapter.safetensors"))


def in_memory(base, tmp_path: Path, monkeypatch, single: bool):
    """attach + save_adapter on a copy of base; ``single`` decomposes one layer per batch (as streaming does)."""
    if single:
        monkeypatch.setattr(pmodel, "BATCH_BYTES", 1)
    model = pissa.attach(copy.deepcopy(base), CFG)
    pissa.save_adapter(model, tmp_path / "ref")
    return model


def residual_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in path.glob("*.safetensors"):
        out.update(load_file(str(shard)))
    return out


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama-sharded", "gpt2-conv1d-single-file"])
def test_stream_equals_in_memory_attach_exactly(tmp_path, monkeypatch, llama_dir, make) -> None:
    base = make()
    src = llama_dir if make is tiny_llama else tmp_path / "gpt2"
    if make is tiny_gpt2:
        base.save_pretrained(src)
    out = stream.init_checkpoint(src, tmp_path / "out", CFG, progress=False)
    model = in_memory(base, tmp_path, monkeypatch, single=True)
    (doc, tensors), (ref_doc, ref_tensors) = adapter_of(out / "adapter"), adapter_of(tmp_path / "ref")
    assert doc == ref_doc  # same layers, digests of base and residual, config
    assert tensors.keys() == ref_tensors.keys() and all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)
    stored = residual_tensors(out / "residual")
    for name, layer in pissa.adapted_layers(model):
        assert torch.equal(stored[f"{name}.weight"], layer.residual.weight)
    originals = residual_tensors(src)
    assert stored.keys() == originals.keys()
    untouched = set(originals) - {f"{n}.weight" for n in doc["layers"]}
    assert untouched and all(torch.equal(stored[k], originals[k]) for k in untouched)


def test_stream_close_to_batched_attach(tmp_path, monkeypatch, llama_dir) -> None:
    """In memory, equal shapes are decomposed as one batch: the factors agree up to matmul rounding."""
    out = stream.init_checkpoint(llama_dir, tmp_path / "out", CFG, progress=False)
    in_memory(tiny_llama(), tmp_path, monkeypatch, single=False)
    (_, tensors), (_, ref) = adapter_of(out / "adapter"), adapter_of(tmp_path / "ref")
    for k in tensors:
        assert relative_error(tensors[k], ref[k]) <= 1e-4, k


def test_residual_model_and_base_both_load_the_adapter(tmp_path, llama_dir) -> None:
    from transformers import LlamaForCausalLM

    out = stream.init_checkpoint(llama_dir, tmp_path / "out", CFG, progress=False)
    base_logits = logits(tiny_llama())
    from_residual = pissa.load_adapter(LlamaForCausalLM.from_pretrained(out / "residual"), out / "adapter")
    from_base = pissa.load_adapter(LlamaForCausalLM.from_pretrained(llama_dir), out / "adapter")
    assert relative_error(logits(from_residual), base_logits) <= 1e-5
    for (n1, a), (n2, b) in zip(pissa.adapted_layers(from_residual), pissa.adapted_layers(from_base)):
        assert n1 == n2 and torch.equal(a.residual.weight, b.residual.weight)
    assert (out / "residual" / "tokenizer_config.json").is_file() and (out / "residual" / "1_Pooling" / "config.json").is_file()
    assert not (out / "residual" / "1_Pooling" / "weights.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_killed_init_resumes_and_verifies(tmp_path, monkeypatch, llama_dir) -> None:
    reference = stream.init_checkpoint(llama_dir, tmp_path / "ref", CFG, progress=False)
    real, calls = stream._do_target, []

    def dies_after_5(*args):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(args[1].name)
        real(*args)

    monkeypatch.setattr(stream, "_do_target", dies_after_5)
    with pytest.raises(KeyboardInterrupt):
        stream.init_checkpoint(llama_dir, tmp_path / "out", CFG, progress=False)
    assert not (tmp_path / "out").exists()
    work = tmp_path / ".out.tmp-init"
    # damage one finished target's residual bytes: the rerun must notice and redo it
    first = stream.resolve_targets(stream.open_checkpoint(llama_dir), CFG.targets)[0]
    entry = stream.open_checkpoint(llama_dir).entries[first.key]
    stream._write_at(work / "residual" / entry.shard, entry.start, torch.zeros(4, dtype=torch.uint8))
    calls.clear()
    monkeypatch.setattr(stream, "_do_target", lambda *a: (calls.append(a[1].name), real(*a)))
    out = stream.init_checkpoint(llama_dir, tmp_path / "out", CFG, progress=False)
    assert len(calls) == 14 - 5 + 1 and first.name in calls
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (reference / rel).read_bytes(), rel
    assert not work.exists()


ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 32, "n_layer": 1, "n_head": 4, "n_positions": 16}),
    "bert": ("BertConfig", "BertForMaskedLM", {"max_position_embeddings": 16}),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_targets_from_architecture_are_all_linear(tmp_path, arch) -> None:
    import transformers

    config_cls, model_cls, extra = ARCHS[arch]
    sizes = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 64} if arch not in ("gpt2",) else {"vocab_size": 64}
    config = getattr(transformers, config_cls)(**sizes, **extra)
    model = getattr(transformers, model_cls)(config)
    model.save_pretrained(tmp_path)
    targets = stream.resolve_targets(stream.open_checkpoint(tmp_path), "all-linear")
    assert [t.name for t in targets] == find_targets(model, "all-linear")
    assert all(t.conv1d == (arch == "gpt2") for t in targets)


def run_cli(*args: str) -> int:
    return cli.main(["init", "--no-progress", *args])


def test_cli_explicit_targets_and_unknown_architecture(tmp_path, llama_dir, capsys) -> None:
    assert run_cli("--model", str(llama_dir), "--out", str(tmp_path / "qv"), "--rank", "2", "--targets", "q_proj,v_proj") == 0
    doc, _ = adapter_of(tmp_path / "qv" / "adapter")
    assert sorted(doc["layers"]) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    unknown = Path(shutil.copytree(llama_dir, tmp_path / "unknown"))
    (unknown / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo"}))
    assert run_cli("--model", str(unknown), "--out", str(tmp_path / "u1")) == 2
    assert "unknown architecture 'FooForCausalLM'" in capsys.readouterr().err
    assert run_cli("--model", str(unknown), "--out", str(tmp_path / "u2"), "--rank", "2", "--targets", r".*\.mlp\.down_proj") == 0
    doc, _ = adapter_of(tmp_path / "u2" / "adapter")
    assert sorted(doc["layers"]) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    with safe_open(str(next((tmp_path / "u2" / "residual").glob("*.safetensors"))), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("damage", ["no-safetensors", "truncated", "no-config", "rank-too-big", "nan-weight"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, llama_dir, capsys, damage) -> None:
    src = Path(shutil.copytree(llama_dir, tmp_path / "src"))
    rank = "4"
    if damage == "no-safetensors":
        for f in src.glob("*.safetensors*"):
            f.unlink()
    elif damage == "truncated":
        shard = sorted(src.glob("*.safetensors"))[1]
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "no-config":
        (src / "config.json").unlink()
    elif damage == "nan-weight":  # found only when that tensor is read, after other targets are done
        target = stream.resolve_targets(stream.open_checkpoint(src), "all-linear")[5]
        entry = stream.open_checkpoint(src).entries[target.key]
        stream._write_at(src / entry.shard, entry.start, torch.tensor([float("nan")]))
    else:
        rank = "999"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run_cli("--model", str(src), "--out", str(tmp_path / "out"), "--rank", rank) == 2
    err = capsys.readouterr().err
    assert err.startswith("pissa: error:") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_quantized_init_loads_to_the_in_memory_qpissa_model(tmp_path, monkeypatch, llama_dir) -> None:
    """--quantize nf4: the checkpoint holds the dense residual; load_adapter quantizes it to the same 4-bit layer."""
    from transformers import LlamaForCausalLM

    cfg = pissa.AdapterConfig(rank=4, quantize="nf4", quant_iters=2, seed=3)
    out = stream.init_checkpoint(llama_dir, tmp_path / "out", cfg, progress=False)
    monkeypatch.setattr(pmodel, "BATCH_BYTES", 1)
    model = pissa.attach(tiny_llama(), cfg)
    pissa.save_adapter(model, tmp_path / "ref")
    (doc, tensors), (ref_doc, ref_tensors) = adapter_of(out / "adapter"), adapter_of(tmp_path / "ref")
    assert doc == ref_doc and all(torch.equal(tensors[k], ref_tensors[k]) for k in ref_tensors)
    loaded = pissa.load_adapter(LlamaForCausalLM.from_pretrained(out / "residual"), out / "adapter")
    for (n1, a), (n2, b) in zip(pissa.adapted_layers(loaded), pissa.adapted_layers(model)):
        assert n1 == n2 and torch.equal(a.residual.codes, b.residual.codes)
    assert relative_error(logits(loaded), logits(model)) <= 1e-6
