"""Data-aware methods end to end: on GPT-2's Conv1D layers (weight stored (in, out)), ``pissa compare``
calibrating on its own training split, and ``pissa calibrate --val-size`` reading exactly the examples
``pissa finetune --val-size`` trains on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import pissa
from helpers import attach_train_reload, logits, relative_error, tiny_gpt2, token_batches
from pissa.adapter.base_layers import dense_weight
from pissa.calibration.batches import as_batch, calibration_batches
from pissa.cli import main
from pissa.data.datasets import load_data
from pissa.data.encoding import encode_all
from pissa.files.statistics import open_calibration
from pissa.methods.registry import ADAPTERS
from pissa.training.compare import reads_statistics
from pissa.training.loop import train_step

GPT2_METHODS = ["corda", "eva", "eora", "lora-ga", "lora-sb", "loldu"]
AWARE = [m for m in ADAPTERS if reads_statistics(m)]


@pytest.fixture(scope="module")
def gpt2_stats(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gpt2") / "stats.safetensors"
    pissa.calibrate(tiny_gpt2(), token_batches(n=3), gradients=True, out=path)
    return str(path)


def test_gpt2_conv1d_gradient_is_dl_dw_in_out_in_layout(gpt2_stats) -> None:
    """The statistics' gradient of a Conv1D layer is (out, in): the transpose of its stored weight's gradient."""
    ref = tiny_gpt2()
    ref.requires_grad_(True)
    total = 0
    for b in map(as_batch, token_batches(n=3)):
        out = ref(**b.inputs()).logits[:, :-1]
        target = b.target_mask[:, 1:]
        torch.nn.functional.cross_entropy(out[target], b.input_ids[:, 1:][target], reduction="sum").backward()
        total += int(target.sum())
    stats = open_calibration(gpt2_stats)
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"):
        expected = ref.get_submodule(name).weight.grad.T / total  # Conv1D stores (in, out)
        torch.testing.assert_close(stats.layer_stats(name, ["gradient"]).grad, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", GPT2_METHODS)
def test_gpt2_conv1d_starts_at_the_base_and_saves_and_loads(tmp_path, gpt2_stats, method) -> None:
    base = tiny_gpt2()
    cfg = pissa.AdapterConfig(method=method, rank=4, alpha=8.0, calibration=gpt2_stats)
    model, loaded = attach_train_reload(base, cfg, tmp_path / "a")
    assert relative_error(logits(model), logits(base)) > 1e-4
    assert relative_error(logits(pissa.merge(loaded)), logits(model)) <= 1e-5


def test_gpt2_eva_a_spans_the_top_eigenvectors_of_the_layer_input_covariance(gpt2_stats) -> None:
    """mlp.c_proj reads 128 features and writes 32: A's rows must live in the 128-dim input space."""
    name = "transformer.h.1.mlp.c_proj"
    base = tiny_gpt2()
    rows: list[torch.Tensor] = []
    hook = base.get_submodule(name).register_forward_pre_hook(
        lambda m, args: rows.append(args[0][current[0].bool()].double()))
    current: list[torch.Tensor] = []
    with torch.no_grad():
        for b in token_batches(n=3):
            current[:] = [b["attention_mask"]]
            base(**b)
    hook.remove()
    X = torch.cat(rows)
    C = torch.cov(X.T, correction=0)  # about the mean, (in, in) = (128, 128)
    top = torch.linalg.eigh(C).eigenvectors[:, -4:]
    model = pissa.attach(base, pissa.AdapterConfig(method="eva", rank=4, calibration=gpt2_stats, eva_rho=1.0))
    layer = model.get_submodule(name)
    A = layer.lora_A.detach().double()
    assert A.shape == (4, 128) and dense_weight(tiny_gpt2().get_submodule(name)).shape == (32, 128)
    torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.linalg.svdvals(A @ top).min() > 0.999  # the same 4-dim subspace
    assert not layer.lora_B.detach().any()


# --- the split: one rule for finetune and calibrate ----------------------------------------------


def test_calibrate_val_size_reads_a_subset_of_the_finetune_training_split(tiny: Path) -> None:
    from transformers import AutoTokenizer

    data = str(tiny / "data.jsonl")
    run = load_data(data, val_size=20)  # what pissa finetune --val-size 20 trains on and scores
    test = load_data(data)  # and its test split
    tok = AutoTokenizer.from_pretrained(tiny / "llama")
    batches = calibration_batches(tok, data, "causal-lm", 40, 8, 64, val_size=20)
    read = {tuple(t[m.bool()].tolist()) for b in batches for t, m in zip(b.input_ids, b.attention_mask)}

    def ids(examples) -> set[tuple[int, ...]]:
        return {e.ids for e in encode_all(tok, examples, run.labels, "causal-lm", 64)}

    assert len(read) == 40 and read == ids(run.train[:40]) and read <= ids(run.train)
    assert not read & ids(run.test) and not read & ids(test.test)  # neither validation nor test examples
    assert load_data is load_data  # finetune splits with the very same function


def test_cli_calibrate_val_size_is_an_option(tiny: Path, tmp_path: Path, capsys) -> None:
    args = ["calibrate", "--model", str(tiny / "llama"), "--data", str(tiny / "data.jsonl"), "--samples", "8",
            "--batch-size", "4", "--threads", "1"]
    assert main([*args, "--val-size", "20", "--out", str(tmp_path / "v.safetensors")]) == 0
    assert main([*args, "--out", str(tmp_path / "t.safetensors")]) == 0
    v, t = (open_calibration(tmp_path / f) for f in ("v.safetensors", "t.safetensors"))
    assert v.data_digest != t.data_digest  # other examples: the validation carve-out comes first
    assert main([*args, "--val-size", "-1", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--val-size must be an integer >= 0" in capsys.readouterr().err


# --- pissa compare calibrates by itself; pissa finetune says how -----------------------------------


def _compare(tiny: Path, out: Path, methods: list[str], *extra: str) -> int:
    return main(["compare", "--methods", ",".join(methods), "--model", str(tiny / "llama"),
                 "--data", str(tiny / "data.jsonl"), "--rank", "4", "--steps", "2", "--batch-size", "4",
                 "--eval-size", "4", "--warmup", "1", "--val-size", "20", "--threads", "1", "--out", str(out), *extra])


def test_compare_calibrates_on_its_training_split_once_and_reuses_it(tiny: Path, tmp_path: Path, monkeypatch,
                                                                     capsys) -> None:
    out = tmp_path / "cmp"
    real_step, calls = train_step, [0]

    def crash_in_the_second_run(*a, **kw):
        calls[0] += 1
        if calls[0] == 4:  # the second method's second step: its first is checkpointed
            raise RuntimeError("killed")
        return real_step(*a, **kw)

    monkeypatch.setattr("pissa.training.loop.train_step", crash_in_the_second_run)
    with pytest.raises(RuntimeError, match="killed"):
        _compare(tiny, out, ["pissa", *AWARE], "--save-every", "1")
    work = out.with_name("cmp.partial")
    stats = work / "calibration.safetensors"
    assert "calibrated" in capsys.readouterr().out and stats.is_file()
    stamp = stats.stat().st_mtime_ns
    monkeypatch.setattr("pissa.training.loop.train_step", real_step)
    assert _compare(tiny, out, ["pissa", *AWARE], "--resume") == 0
    assert "reused" in capsys.readouterr().out
    stats = out / "calibration.safetensors"
    assert stats.stat().st_mtime_ns == stamp
    calibration = open_calibration(stats)
    assert calibration.has_gradients and calibration.info["examples"] == len(load_data(str(tiny / "data.jsonl"), 20).train)
    report = (out / "report.md").read_text()
    for method in ["pissa", *AWARE]:
        row = next(line for line in report.splitlines() if line.startswith(f"| {method} |"))
        m = json.loads((out / method / "metrics.json").read_text())
        losses = [m["eval_before"]["loss"], m["eval_after"]["loss"], *(x for _, x in m["train_loss"])]
        assert all(math.isfinite(v) for v in losses)
        assert "nan" not in row and "inf" not in row
        saved = (out / method / "config.yaml").read_text()
        assert (str(stats) in saved) == (method in AWARE)
    assert _compare(tiny, out, ["eva"]) == 0  # a new compare into the same folder reuses the finished one's statistics
    assert "reused" in capsys.readouterr().out and (out / "calibration.safetensors").stat().st_mtime_ns == stamp


def test_finetune_without_statistics_says_how_to_make_them(tiny: Path, tmp_path: Path, capsys) -> None:
    from helpers import finetune

    assert finetune(tiny, tmp_path / "ga", "--method", "lora-ga") == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("pissa: error: ") and "pissa calibrate --model MODEL --data DATA" in err
    assert "--gradients" in err and "pissa compare" in err
    assert not (tmp_path / "ga").exists() and not (tmp_path / "ga.partial").exists()
