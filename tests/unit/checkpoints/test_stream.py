"""`pissa init`: streaming a sharded checkpoint gives what attach + save_adapter give in memory."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import pissa
from helpers import DEVICES, TOKENS, lm_loss, logits, relative_error, tiny_gpt2, tiny_llama, train_steps
from pissa import cli
from pissa.adapter.targets import find_targets
from pissa.checkpoints.architecture import describe, describe_in_child
from pissa.checkpoints.folder import INDEX, open_checkpoint
from pissa.checkpoints.init import do_target, init_checkpoint, resolve_targets
from pissa.checkpoints.merge import merge_checkpoint, merge_state_dict
from pissa.files.digests import SHARD_DIGESTS
from pissa.files.safetensors import write_at

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
        monkeypatch.setattr("pissa.adapter.attach.BATCH_BYTES", 1)
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
    out = init_checkpoint(src, tmp_path / "out", CFG, progress=False)
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
    out = init_checkpoint(llama_dir, tmp_path / "out", CFG, progress=False)
    in_memory(tiny_llama(), tmp_path, monkeypatch, single=False)
    (_, tensors), (_, ref) = adapter_of(out / "adapter"), adapter_of(tmp_path / "ref")
    for k in tensors:
        assert relative_error(tensors[k], ref[k]) <= 1e-4, k


def test_residual_model_and_base_both_load_the_adapter(tmp_path, llama_dir) -> None:
    from transformers import LlamaForCausalLM

    out = init_checkpoint(llama_dir, tmp_path / "out", CFG, progress=False)
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
    reference = init_checkpoint(llama_dir, tmp_path / "ref", CFG, progress=False)
    real, calls = do_target, []

    def dies_after_5(*args):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(args[1].name)
        real(*args)

    monkeypatch.setattr("pissa.checkpoints.init.do_target", dies_after_5)
    with pytest.raises(KeyboardInterrupt):
        init_checkpoint(llama_dir, tmp_path / "out", CFG, progress=False)
    assert not (tmp_path / "out").exists()
    work = tmp_path / ".out.tmp-init"
    # damage one finished target's residual bytes: the rerun must notice and redo it
    first = resolve_targets(open_checkpoint(llama_dir), CFG.targets)[0]
    entry = open_checkpoint(llama_dir).entries[first.key]
    write_at(work / "residual" / entry.shard, entry.start, torch.zeros(4, dtype=torch.uint8))
    calls.clear()
    monkeypatch.setattr("pissa.checkpoints.init.do_target", lambda *a: (calls.append(a[1].name), real(*a)))
    out = init_checkpoint(llama_dir, tmp_path / "out", CFG, progress=False)
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
    targets = resolve_targets(open_checkpoint(tmp_path), "all-linear")
    assert [t.name for t in targets] == find_targets(model, "all-linear")
    assert all(t.conv1d == (arch == "gpt2") for t in targets)


def run_cli(*args: str) -> int:
    return cli.main(["init", "--no-progress", *args])


@pytest.mark.parametrize("device", DEVICES)
def test_init_decomposes_on_the_device_and_writes_the_same_checkpoint(tmp_path, llama_dir, device) -> None:
    """`--device D` sends each streamed weight to D and writes its residual back: the same
    checkpoint as on the CPU (bit for bit on the CPU, to float32 rounding on an accelerator)."""
    assert run_cli("--model", str(llama_dir), "--out", str(tmp_path / "cpu"), "--rank", "4", "--device", "cpu") == 0
    assert run_cli("--model", str(llama_dir), "--out", str(tmp_path / "dev"), "--rank", "4", "--device", device) == 0
    ref, got = residual_tensors(tmp_path / "cpu" / "residual"), residual_tensors(tmp_path / "dev" / "residual")
    assert ref.keys() == got.keys()
    for k in ref:
        assert got[k].device.type == "cpu" and torch.allclose(got[k], ref[k], rtol=1e-5, atol=1e-6), k
    if device == "cpu":
        assert adapter_of(tmp_path / "dev" / "adapter")[0]["layers"] == adapter_of(tmp_path / "cpu" / "adapter")[0]["layers"]


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
        target = resolve_targets(open_checkpoint(src), "all-linear")[5]
        entry = open_checkpoint(src).entries[target.key]
        write_at(src / entry.shard, entry.start, torch.tensor([float("nan")]))
    else:
        rank = "999"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run_cli("--model", str(src), "--out", str(tmp_path / "out"), "--rank", rank) == 2
    err = capsys.readouterr().err
    assert err.startswith("pissa: error:") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_init_loads_to_the_in_memory_qpissa_model(tmp_path, monkeypatch, llama_dir, quantize) -> None:
    """--quantize nf4|int8: the checkpoint holds the dense residual; load_adapter quantizes it to the same layer."""
    from transformers import LlamaForCausalLM

    cfg = pissa.AdapterConfig(rank=4, quantize=quantize, quant_iters=2, seed=3)
    out = init_checkpoint(llama_dir, tmp_path / "out", cfg, progress=False)
    monkeypatch.setattr("pissa.adapter.attach.BATCH_BYTES", 1)
    model = pissa.attach(tiny_llama(), cfg)
    pissa.save_adapter(model, tmp_path / "ref")
    (doc, tensors), (ref_doc, ref_tensors) = adapter_of(out / "adapter"), adapter_of(tmp_path / "ref")
    assert doc == ref_doc and all(torch.equal(tensors[k], ref_tensors[k]) for k in ref_tensors)
    loaded = pissa.load_adapter(LlamaForCausalLM.from_pretrained(out / "residual"), out / "adapter")
    for (n1, a), (n2, b) in zip(pissa.adapted_layers(loaded), pissa.adapted_layers(model)):
        assert n1 == n2 and a.residual.state_dict().keys() == b.residual.state_dict().keys()
        assert all(torch.equal(t, b.residual.state_dict()[k]) for k, t in a.residual.state_dict().items())
    assert relative_error(logits(loaded), logits(model)) <= 1e-6


# --- merging a trained adapter into a checkpoint on disk, shard by shard -----------------------


def trained(model, cfg: pissa.AdapterConfig = CFG, steps: int = 3):
    """``model`` attached and trained a few AdamW steps, so that the trainable factors moved (B != B0...)."""
    pissa.attach(model, cfg)
    train_steps(model, [TOKENS], lm_loss, steps=steps, lr=1e-2)
    layer = next(layer for _, layer in pissa.adapted_layers(model))
    t = layer.tensors()
    assert all(not torch.equal(t[p], t[layer.shape.variables[p]]) for p in layer.train_parts)
    return model


def merged_state(model) -> dict[str, torch.Tensor]:
    """The in-memory ``pissa.merge`` of a copy of ``model``, as a state dict."""
    return {k: v.detach() for k, v in pissa.merge(copy.deepcopy(model)).state_dict().items()}


def assert_same_tensors(stored: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert stored.keys() <= ref.keys()
    for k, t in stored.items():
        assert t.dtype == ref[k].dtype and torch.equal(t, ref[k]), k


@pytest.mark.parametrize("case", ["llama-sharded-base", "llama-sharded-residual", "gpt2-conv1d-single-file"])
def test_merged_checkpoint_equals_in_memory_merge(tmp_path, monkeypatch, llama_dir, case) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr("pissa.adapter.attach.BATCH_BYTES", 1)  # one layer per batch, as `pissa init` decomposes
    if case.startswith("gpt2"):
        src = tmp_path / "gpt2"
        tiny_gpt2().save_pretrained(src)
        model = trained(tiny_gpt2())
    else:
        src = llama_dir
        if case.endswith("residual"):  # the residual checkpoint of `pissa init`, then the same adapter trained in memory
            src = init_checkpoint(llama_dir, tmp_path / "init", CFG, progress=False) / "residual"
        model = trained(tiny_llama())
    pissa.save_adapter(model, tmp_path / "adapter")
    out = merge_checkpoint(src, tmp_path / "adapter", tmp_path / "merged", progress=False)
    ref = merged_state(model)
    stored = residual_tensors(out)
    assert stored.keys() == residual_tensors(src).keys()
    assert_same_tensors(stored, ref)
    # same layout: shard names, index, config and other files (not the residual's shard digests); nothing left behind
    # (plus the merged model's card)
    assert sorted(p.name for p in out.iterdir()) == sorted({p.name for p in src.iterdir() if p.name != SHARD_DIGESTS}
                                                          | {"README.md"})
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f, safe_open(str(src / shard.name), framework="pt") as g:
            assert f.metadata() == g.metadata() and sorted(f.keys()) == sorted(g.keys())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert relative_error(logits(reloaded), logits(model)) <= 1e-5


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_merge_state_dict_equals_merge_and_leaves_its_input(tmp_path, make) -> None:
    base = {k: v.clone() for k, v in make().state_dict().items()}
    model = trained(make())
    pissa.save_adapter(model, tmp_path / "adapter")
    before = {k: v.clone() for k, v in base.items()}
    merged = merge_state_dict(base, tmp_path / "adapter")
    assert merged.keys() == base.keys()
    assert_same_tensors(merged, merged_state(model))
    assert all(torch.equal(base[k], before[k]) for k in base)  # pure
    layers = {f"{n}.weight" for n, _ in pissa.adapted_layers(model)}
    assert all(merged[k] is base[k] for k in base if k not in layers)  # untouched tensors are not copied
    # the identity it implements: W + s (B A - B0 A0)
    name, layer = next(iter(pissa.adapted_layers(model)))
    W = base[f"{name}.weight"].double()
    W = W.T if make is tiny_gpt2 else W
    delta = layer.scaling * (layer.lora_B.double() @ layer.lora_A.double() - layer.B0.double() @ layer.A0.double())
    got = merged[f"{name}.weight"].double()
    assert relative_error(got.T if make is tiny_gpt2 else got, W + delta) <= 1e-6


@pytest.mark.parametrize("method", ["svfit", "lora-xs", "sorsa", "lora"])
def test_merge_state_dict_with_a_core_or_zero_b0_equals_merge(tmp_path, method) -> None:
    """Methods with a core (B C A, diagonal or full) fold it as pissa.merge does; LoRA's B0 = 0."""
    model = trained(tiny_llama(), pissa.AdapterConfig(method=method, rank=4, alpha=8.0, seed=3))
    pissa.save_adapter(model, tmp_path / "adapter")
    assert_same_tensors(merge_state_dict(tiny_llama().state_dict(), tmp_path / "adapter"), merged_state(model))


def test_wrong_base_is_refused_and_nothing_is_written(tmp_path, llama_dir, capsys) -> None:
    model = trained(tiny_llama())
    pissa.save_adapter(model, tmp_path / "adapter")
    other = tiny_llama()
    with torch.no_grad():  # same architecture and shapes, one layer of the last shard differs
        other.model.layers[1].mlp.down_proj.weight.add_(0.01)
    other.save_pretrained(tmp_path / "other", max_shard_size="40KB")
    with pytest.raises(pissa.PissaError, match=r"different base model \(weights of 'model.layers.1.mlp.down_proj' differ") as e:
        merge_checkpoint(tmp_path / "other", tmp_path / "adapter", tmp_path / "merged", progress=False)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "other"]  # no output, no work folder
    with pytest.raises(pissa.PissaError, match="different base model"):
        merge_state_dict(other.state_dict(), tmp_path / "adapter")
    with pytest.raises(pissa.PissaError, match="made for another model"):
        merge_state_dict({k: v for k, v in other.state_dict().items() if "q_proj" not in k}, tmp_path / "adapter")
    capsys.readouterr()
    export = ["export", str(tmp_path / "adapter"), "--model", str(tmp_path / "other"), "--out", str(tmp_path / "m"), "--merged"]
    assert cli.main(export) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar, if any
    assert last.startswith("pissa: error:") and "different base model" in last
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_qpissa_merge_is_the_unquantized_merge(tmp_path, monkeypatch, llama_dir, quantize) -> None:
    """W + s (B A - Br Ar), from the base or from the dense residual `pissa init --quantize nf4|int8` wrote."""
    cfg = pissa.AdapterConfig(rank=4, quantize=quantize, quant_iters=2, seed=3)
    init = init_checkpoint(llama_dir, tmp_path / "init", cfg, progress=False)
    monkeypatch.setattr("pissa.adapter.attach.BATCH_BYTES", 1)
    model = trained(tiny_llama(), cfg)
    pissa.save_adapter(model, tmp_path / "adapter")
    from_base = merge_state_dict(residual_tensors(llama_dir), tmp_path / "adapter")
    from_residual = merge_state_dict(residual_tensors(init / "residual"), tmp_path / "adapter")
    quantized = merged_state(model)
    base = tiny_llama().state_dict()
    for name, layer in pissa.adapted_layers(model):
        k = f"{name}.weight"
        assert torch.equal(from_base[k], from_residual[k])
        update = layer.lora_B.double() @ layer.lora_A.double() - layer.Br.double() @ layer.Ar.double()
        assert relative_error(from_base[k], base[k].double() + layer.scaling * update) <= 1e-6
        assert not torch.equal(from_base[k], quantized[k])  # the quantized merge differs by the quantization error
        assert relative_error(from_base[k], quantized[k]) <= 0.2


def test_classifier_head_is_written_into_the_merged_checkpoint(tmp_path, llama_dir) -> None:
    from transformers import LlamaForSequenceClassification

    def classifier(path):
        m = LlamaForSequenceClassification.from_pretrained(path, num_labels=3)
        m.config.pad_token_id = 0
        return m.eval()

    torch.manual_seed(5)
    model = classifier(llama_dir)
    pissa.attach(model, CFG)
    model.score.weight.requires_grad_(True)
    labels = torch.tensor([0, 1, 2])
    train_steps(model, [TOKENS], lambda m, ids: torch.nn.functional.cross_entropy(m(input_ids=ids).logits, labels), steps=3)
    pissa.save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["head"] == ["score.weight"]
    ref = merged_state(model)
    # a causal-LM checkpoint has no score.weight: it is appended to the last shard and indexed
    out = merge_checkpoint(llama_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
    stored = residual_tensors(out)
    assert set(stored) - set(residual_tensors(llama_dir)) == {"score.weight"}
    assert_same_tensors({k: v for k, v in stored.items() if k in ref}, ref)
    index = json.loads((out / INDEX).read_text())
    assert index["weight_map"]["score.weight"] == sorted(out.glob("*.safetensors"))[-1].name
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    with torch.no_grad():
        expected = pissa.merge(copy.deepcopy(model))(input_ids=TOKENS).logits
        assert torch.equal(classifier(out)(input_ids=TOKENS).logits, expected)
    # a checkpoint that has the (untrained) head: it is replaced
    with torch.no_grad():
        classifier(llama_dir).save_pretrained(tmp_path / "cls", max_shard_size="40KB")
    out = merge_checkpoint(tmp_path / "cls", tmp_path / "adapter", tmp_path / "merged-cls", progress=False)
    assert torch.equal(residual_tensors(out)["score.weight"], ref["score.weight"])


MEASURE = """
import json, os, sys
from pathlib import Path
import pissa
from pissa.checkpoints.init import init_checkpoint
from pissa.checkpoints.merge import merge_checkpoint

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

what, src, out = sys.argv[1:4]
if sys.argv[4] == "dropped":                         # the checkpoint out of the page cache (written back first)
    for p in Path(src).glob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
Path("/proc/self/clear_refs").write_text("5")        # reset this process's peak RSS (VmHWM)
before = status("VmRSS")
if what == "init":
    init_checkpoint(src, out, pissa.AdapterConfig(rank=4), progress=False)
else:
    merge_checkpoint(src, sys.argv[5], out, progress=False)
print(json.dumps({"before": before, "peak": status("VmHWM"), "transformers": "transformers" in sys.modules}))
"""


def peak_growth(tmp_path: Path, what: str, src: Path, cache: str, adapter: Path | None = None) -> int:
    """Bytes the peak RSS of a fresh process grows by while it runs ``pissa init`` or the merge on ``src``."""
    out = tmp_path / f"{what}-{cache}"
    cmd = [sys.executable, "-c", MEASURE, what, str(src), str(out), cache] + ([str(adapter)] if adapter else [])
    result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert out.is_dir()
    assert not result["transformers"]  # the architecture was read by a child process that has exited
    return result["peak"] - result["before"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists() or not hasattr(os, "posix_fadvise"), reason="Linux only")
@pytest.mark.slow
def test_peak_memory_is_bounded_whatever_the_page_cache_holds(tmp_path) -> None:
    """Shards of 100+ MB, mostly tensors that are never adapted: `pissa init` and the merge hold a few
    tensors and a 16 MiB copy buffer, right after the checkpoint was written and once it is out of the page
    cache. The growth is measured from the process's RSS with torch and pissa imported (VmHWM reset by
    /proc/self/clear_refs: a child's ru_maxrss starts from its parent's peak)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=131072, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    src = tmp_path / "ckpt"
    model.save_pretrained(src, max_shard_size="150MB")
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    smallest = min(p.stat().st_size for p in src.glob("*.safetensors"))
    assert len(list(src.glob("*.safetensors"))) == 2 and smallest > 100e6
    pissa.attach(model, pissa.AdapterConfig(rank=4, targets=["q_proj", "down_proj"]))
    with torch.no_grad():
        for _, layer in pissa.adapted_layers(model):
            layer.lora_B.add_(0.01)
    pissa.save_adapter(model, tmp_path / "adapter")
    del model
    budget = min(0.2 * size, 0.4 * smallest)
    for cache in ("fresh", "dropped"):
        if cache == "fresh":  # rewrite the files so that their pages are freshly written (dirty) ones
            for p in src.glob("*.safetensors"):
                data = p.read_bytes()
                p.write_bytes(data)
                del data
        assert peak_growth(tmp_path, "init", src, cache) <= budget, cache
        assert peak_growth(tmp_path, "merge", src, cache, tmp_path / "adapter") <= budget, cache


@pytest.mark.parametrize(
    "make, targets", [(tiny_gpt2, "all-linear"), (tiny_llama, ["no_such_layer"])], ids=["gpt2-conv1d", "no-match"]
)
def test_architecture_read_in_a_child_process_is_the_same(tmp_path, make, targets) -> None:
    make().save_pretrained(tmp_path)
    found = describe_in_child(tmp_path, targets)
    assert found == describe(tmp_path, targets)
    assert ("error" in found) == (make is tiny_llama) and any(found["conv1d"].values()) == (make is tiny_gpt2)
