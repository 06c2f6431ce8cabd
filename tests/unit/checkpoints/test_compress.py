"""WeLore compression: the compressed model in memory, ``pissa compress`` on disk and back, WeLore-COFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pissa
from helpers import finetune, interrupt_after, tiny_llama
from pissa.adapter.compressed import LowRankLinear, factorize
from pissa.cli import main

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_compressed_model_is_the_dense_model_with_truncated_lrcm_weights() -> None:
    """Each LRCM becomes LowRankLinear with B A = its best rank-r approximation; the others are untouched."""
    model, dense = tiny_llama(), tiny_llama()
    record = pissa.compress(model, 0.3)
    assert record.reached >= 0.3
    with torch.no_grad():
        for name, (out, inp, rank) in record.layers.items():
            layer = model.get_submodule(name)
            if rank is None:
                assert type(layer) is torch.nn.Linear
                continue
            assert isinstance(layer, LowRankLinear) and layer.A.shape == (rank, inp) and layer.B.shape == (out, rank)
            U, S, Vh = torch.linalg.svd(dense.get_submodule(name).weight, full_matrices=False)
            dense.get_submodule(name).weight.copy_((U[:, :rank] * S[:rank]) @ Vh[:rank])
    params = sum(p.numel() for n, p in model.named_parameters() if "layers" in n and "norm" not in n)
    assert params == record.stored_params < record.dense_params
    assert torch.allclose(_logits(model), _logits(dense), atol=1e-5)


def test_full_rank_factors_reproduce_the_dense_logits() -> None:
    """LowRankLinear at rank min(out, in) is the Linear it replaces, to float32 rounding."""
    model, dense = tiny_llama(), tiny_llama()
    for name in pissa.adapter.targets.find_targets(model, "all-linear"):
        lin = model.get_submodule(name)
        A, B = factorize(lin.weight.detach(), min(lin.weight.shape))
        pissa.adapter.attach.set_module(model, name, LowRankLinear(A, B, lin.bias))
    assert torch.allclose(_logits(model), _logits(dense), atol=1e-5)


def test_pissa_compress_round_trip_gives_the_in_memory_compressed_model(tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "small"
    assert main(["compress", str(tiny / "llama"), "--reduction", "0.3", "--out", str(out)]) == 0
    loaded, tokenizer = pissa.load_compressed(out)
    memory = AutoModelForCausalLM.from_pretrained(tiny / "llama")
    record = pissa.compress(memory, 0.3)
    doc = json.loads((out / "welore.json").read_text())
    assert doc["requested"] == 0.3 and doc["reached"] == record.reached and doc["plan"] == "welore"
    assert {n: tuple(v) for n, v in doc["layers"].items()} == record.layers
    assert tokenizer.pad_token is not None and sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == [
        "model.safetensors"]
    stored = load_file(str(out / "model.safetensors"))
    assert sum(t.numel() for k, t in stored.items() if "layers" in k and "norm" not in k) == record.stored_params
    assert torch.equal(_logits(loaded), _logits(memory))


@pytest.mark.parametrize(("args", "message"), [
    (["--reduction", "1.5"], "must be a fraction in (0, 1)"),
    (["--reduction", "0.999"], "out of reach: rank 1 everywhere saves at most"),
    (["--reduction", "0.5", "--uniform", "--targets", "embed_tokens"], "matched no Linear"),
])
def test_bad_requests_exit_2_with_one_line_and_write_nothing(tiny: Path, tmp_path: Path, capsys, args, message) -> None:
    assert main(["compress", str(tiny / "llama"), "--out", str(tmp_path / "small"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert list(tmp_path.iterdir()) == []


def test_welore_on_an_uncompressed_model_exits_2_and_writes_nothing(tiny: Path, tmp_path: Path, capsys) -> None:
    assert finetune(tiny, tmp_path / "run", "--method", "welore") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run pissa compress first, then pissa finetune --model DIR --method welore" in err
    assert list(tmp_path.iterdir()) == []


def test_welore_coft_trains_only_the_factors_saves_and_resumes(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    small = tmp_path / "small"
    assert main(["compress", str(tiny / "llama"), "--reduction", "0.3", "--out", str(small)]) == 0
    args = ("--model", str(small), "--method", "welore", "--lr", "1e-3")
    assert finetune(tiny, tmp_path / "whole", *args, "--save-every", "0") == 0
    interrupt_after(monkeypatch, 5)
    assert finetune(tiny, tmp_path / "split", *args, "--save-every", "4") == 130
    monkeypatch.undo()
    assert finetune(tiny, tmp_path / "split", *args, "--save-every", "4", "--resume") == 0
    base = load_file(str(small / "model.safetensors"))
    whole = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    factors = [k for k in base if k.endswith((".A", ".B"))]
    assert factors and all(not torch.equal(whole[k], base[k]) for k in factors)
    assert all(torch.equal(whole[k], base[k]) for k in base if k not in factors)  # only the factors moved
    assert max((whole[k] - split[k]).abs().max().item() for k in whole) <= 1e-6
    m = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert m["method"] == "welore" and m["trainable_params"] == sum(base[k].numel() for k in factors)
    reloaded, _ = pissa.load_compressed(tmp_path / "whole" / "model")  # the trained folder is a compressed folder
    assert all(torch.equal(reloaded.state_dict()[k], whole[k]) for k in factors)


@pytest.mark.slow
def test_smollm2_at_30_percent_welore_keeps_a_lower_perplexity_than_the_uniform_cut() -> None:
    """The paper's claim on the real model, at one reduction, on a short held-out text (Rotten Tomatoes test reviews)."""
    from pissa.data.datasets import load_data

    base, tokenizer = pissa.hub.load_model("smollm2")
    text = " ".join(e.prompt + e.completion for e in load_data("rotten_tomatoes").test[:40])
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :512]

    def perplexity(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return torch.exp(model(input_ids=ids, labels=ids).loss).item()

    dense = perplexity(base)
    ppl = {}
    for uniform in (False, True):
        model, _ = pissa.hub.load_model("smollm2")
        assert pissa.compress(model, 0.3, uniform=uniform).reached >= 0.3
        ppl[uniform] = perplexity(model)
    assert dense < ppl[False] < ppl[True] < float("inf")


def test_an_interrupted_compress_leaves_no_output_and_resumes_to_the_same_checkpoint(tiny: Path, tmp_path: Path,
                                                                                   monkeypatch) -> None:
    import pissa.checkpoints.compress as streamed

    assert main(["compress", str(tiny / "llama"), "--reduction", "0.3", "--out", str(tmp_path / "whole")]) == 0
    real, calls = streamed.factorize, [0]

    def interrupted(W: torch.Tensor, rank: int):
        calls[0] += 1
        if calls[0] > 3:
            raise KeyboardInterrupt
        return real(W, rank)

    monkeypatch.setattr(streamed, "factorize", interrupted)
    assert main(["compress", str(tiny / "llama"), "--reduction", "0.3", "--out", str(tmp_path / "split")]) == 130
    assert not (tmp_path / "split").exists() and len(list((tmp_path / ".split.tmp-compress" / "state").iterdir())) == 3
    monkeypatch.setattr(streamed, "factorize", lambda W, rank: calls.append(rank) or real(W, rank))
    assert main(["compress", str(tiny / "llama"), "--reduction", "0.3", "--out", str(tmp_path / "split")]) == 0
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)
    assert len(calls) - 1 == len([k for k in whole if k.endswith(".A")]) - 3  # the 3 finished layers were not redone
    assert not (tmp_path / ".split.tmp-compress").exists()
    with pytest.raises(pissa.PissaError, match="compressed model's own low-rank factors and makes no adapter"):
        pissa.attach(tiny_llama(), pissa.AdapterConfig(method="welore"))
