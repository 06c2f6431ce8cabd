"""Spectral diagnostics: intruder dimensions (pure functions) and `pissa analyze spectrum/intruders`."""

from __future__ import annotations

import copy

import pytest
import torch

import pissa
from helpers import TOKENS, lm_loss, tiny_llama, train_steps
from pissa import cli
from pissa.analysis.spectra import intruder_count, max_cosines
from pissa.runtime import hub


def random_weight(m: int = 96, n: int = 80, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def orthogonal_update(m: int, n: int, r: int, scale: float, seed: int = 1) -> torch.Tensor:
    """``scale * Q1 @ Q2^T`` with random orthonormal Q1 (m, r), Q2 (n, r): r equal singular values ``scale``."""
    g = torch.Generator().manual_seed(seed)
    Q1 = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    return scale * Q1 @ Q2.T


def test_zero_update_has_no_intruders() -> None:
    W = random_weight()
    cos = max_cosines(W, W.clone(), k=10)
    assert cos.shape == (10,) and torch.allclose(cos, torch.ones(10, dtype=torch.float64))
    assert intruder_count(W, W.clone()) == 0


def test_tiny_update_has_no_intruders() -> None:
    W = random_weight()
    assert intruder_count(W, W + orthogonal_update(96, 80, 4, 1e-6)) == 0


def test_large_random_orthogonal_update_has_intruders() -> None:
    """A rank-4 update 10x the base's top singular value: its 4 random directions lead W' and are new."""
    W = random_weight()
    big = 10 * torch.linalg.matrix_norm(W, ord=2).item()
    assert intruder_count(W, W + orthogonal_update(96, 80, 4, big), k=10, threshold=0.5) == 4
    # with a threshold above every cosine, all k examined vectors count
    assert intruder_count(W, W + orthogonal_update(96, 80, 4, big), k=10, threshold=1.01) == 10


@pytest.fixture(params=["lora", "pissa"])
def trained_adapter(tmp_path, monkeypatch, request):
    """An adapter (LoRA, and PiSSA, whose initial product is not zero) trained on a tiny Llama; the adapter
    records the base "tiny", and hub.load_model returns that tiny base for any name."""
    base = tiny_llama()
    base.pissa_base = {"model": "tiny", "kind": "causal-lm"}
    model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(method=request.param, rank=4, targets=["q_proj", "v_proj"]))
    train_steps(model, [TOKENS], lm_loss, steps=5, lr=5e-2)
    pissa.save_adapter(model, tmp_path / "adapter")
    monkeypatch.setattr(hub, "load_model", lambda name, kind="causal-lm", num_labels=None, dtype=None:
                        (copy.deepcopy(base), None))
    return tmp_path / "adapter", model, base


def test_intruders_command_writes_table_csv_and_plot(tmp_path, trained_adapter, capsys) -> None:
    adapter, model, base = trained_adapter
    out = tmp_path / "intr"
    assert cli.main(["analyze", "intruders", "--adapter", str(adapter), "--out", str(out), "--k", "5"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["intruders.csv", "intruders.md", "intruders.png"]
    rows = (out / "intruders.csv").read_text().splitlines()[1:]
    assert len(rows) == 4  # q_proj and v_proj of 2 blocks
    name, count = rows[0].split(",")[:2]
    tuned = model.get_submodule(name).merged().weight.detach().double()  # W_res + s B A: the fine-tuned weight
    W = base.get_submodule(name).weight.detach().double()
    assert int(count) == intruder_count(W, tuned, k=5)
    assert float(rows[0].split(",")[3]) == pytest.approx(((tuned - W).norm() / W.norm()).item(), rel=1e-4)
    assert "intruder dimensions" in capsys.readouterr().out.lower()


def test_spectrum_command_writes_table_csv_and_plot(tmp_path, trained_adapter) -> None:
    adapter, model, base = trained_adapter
    out = tmp_path / "spec"
    assert cli.main(["analyze", "spectrum", "--adapter", str(adapter), "--out", str(out), "--layers", "q_proj"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["spectrum.csv", "spectrum.md", "spectrum.png"]
    lines = (out / "spectrum.csv").read_text().splitlines()[1:]
    assert len(lines) == 2 * 32  # two q_proj layers, 32 singular values each
    name, _, before, _ = lines[0].split(",")
    assert float(before) == pytest.approx(torch.linalg.matrix_norm(base.get_submodule(name).weight.double(), ord=2).item())
    header = (out / "spectrum.md").read_text().splitlines()[2]
    assert "α before" in header and "α FARMS before" in header and "α FARMS after" in header


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--k", "0"], "--k must be >= 1"),
        (["--threshold", "1.5"], "--threshold must be in"),
        (["--layers", "nope"], "matched none of the adapter's 4 layers"),
    ],
)
def test_bad_input_is_refused_without_output(tmp_path, trained_adapter, capsys, argv, message) -> None:
    adapter, _, _ = trained_adapter
    out = tmp_path / "o"
    assert cli.main(["analyze", "intruders", "--adapter", str(adapter), "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_not_an_adapter_folder_is_refused(tmp_path, capsys) -> None:
    assert cli.main(["analyze", "spectrum", "--adapter", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a pissa adapter directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
