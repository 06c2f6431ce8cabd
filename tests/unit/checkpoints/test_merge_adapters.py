"""`pissa merge-adapters`: RMM's merged folder rebuilds every adapter exactly at p >= the stacked rank (logits to
1e-6), each position's error is its discarded singular values, storage is counted right, the single merges, and
the one-line refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pissa
from helpers import TOKENS, lm_loss, logits, relative_error, tiny_llama, train_steps
from pissa.checkpoints.merge_adapters import MERGED_FILE, TENSORS_FILE, merge_adapters, merge_single, rebuild_task
from pissa.cli import main
from pissa.errors import PissaError
from pissa.files.adapter_dir import AdapterFiles
from pissa.methods.merging import dare_merge, ties_merge

RANK = 4


def _adapters(root: Path, tasks: int = 3, **cfg) -> tuple[torch.nn.Module, list[Path]]:
    """``tasks`` PiSSA adapters of one tiny Llama, each trained 3 steps on its own token batch."""
    base = tiny_llama()
    paths = []
    for t in range(tasks):
        model = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(rank=RANK, svd="exact", **cfg))
        ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(10 + t))
        train_steps(model, [ids], lm_loss, steps=3, lr=1e-2)
        paths.append(pissa.save_adapter(model, root / f"task{t}"))
    return base, paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[torch.nn.Module, list[Path]]:
    return _adapters(tmp_path_factory.mktemp("adapters"))


def _loaded(base: torch.nn.Module, path: Path) -> torch.Tensor:
    return logits(pissa.load_adapter(copy.deepcopy(base), path))


def test_p_at_least_the_stacked_rank_rebuilds_every_adapter_exactly(trained, tmp_path) -> None:
    base, paths = trained
    merged = merge_adapters(paths, tmp_path / "merged", p=3, progress=False)
    assert merged.tasks == ["task0", "task1", "task2"] and merged.components == 3
    assert max(merged.errors.values()) < 1e-6
    for t, path in enumerate(paths):
        out = rebuild_task(tmp_path / "merged", f"task{t}", tmp_path / f"back{t}")
        want = _loaded(base, path)
        assert relative_error(_loaded(base, out), want) <= 1e-6
        assert relative_error(want, logits(base)) > 1e-4  # the adapters did move the model


def test_each_positions_error_is_its_discarded_singular_values(trained, tmp_path) -> None:
    base, paths = trained
    merge_adapters(paths, tmp_path / "merged", p=1, progress=False)
    for t in range(3):
        rebuild_task(tmp_path / "merged", f"task{t}", tmp_path / f"back{t}")
    stored = load_file(str(tmp_path / "merged" / TENSORS_FILE))
    originals = [AdapterFiles(p) for p in paths]
    rebuilt = [AdapterFiles(tmp_path / f"back{t}") for t in range(3)]
    name = "model.layers.0.self_attn.q_proj"
    for k, axis, init in (("lora_A", 0, "A0"), ("lora_B", 1, "B0")):
        x = torch.stack([a.layer(name)[k].double() - a.layer(name)[init].double() for a in originals])
        y = torch.stack([a.layer(name)[k].double() - a.layer(name)[init].double() for a in rebuilt])
        per_position = (x - y).square().sum(0).sum(axis).sqrt()  # over tasks and the rank axis
        s = torch.linalg.svdvals(torch.stack(list(x.movedim(axis + 1, -1)), -1))  # (n, r, T) per position
        assert torch.allclose(per_position, s[:, 1:].square().sum(-1).sqrt(), rtol=1e-4, atol=1e-7)
        assert torch.allclose(stored[f"{name}.{k}.discarded"].double(), per_position, rtol=1e-4, atol=1e-7)
        assert per_position.max() > 1e-5  # p = 1 < rank: something is discarded


def test_storage_numbers(trained, tmp_path) -> None:
    _, paths = trained
    merged = merge_adapters(paths, tmp_path / "merged", p=2, progress=False)
    stored = load_file(str(tmp_path / "merged" / TENSORS_FILE))
    assert merged.storage.merged_bytes == sum(t.numel() * t.element_size() for t in stored.values())
    assert merged.storage.adapters_bytes == sum(
        t.numel() * t.element_size() for p in paths for t in AdapterFiles(p).tensors().values())
    positions = sum(t.shape[0] for k, t in stored.items() if k.endswith(".discarded"))
    assert merged.storage.merged_values == positions * 2 * (RANK + 3)  # q (r + T) per position
    assert merged.storage.task_values == positions * RANK * 3
    assert merged.storage.values_ratio == pytest.approx(2 * (RANK + 3) / (RANK * 3))
    doc = json.loads((tmp_path / "merged" / MERGED_FILE).read_text())
    assert doc["storage"]["ratio"] == pytest.approx(merged.storage.ratio) and doc["tasks"] == merged.tasks


@pytest.mark.parametrize("method", ["linear", "ties", "dare"])
def test_single_merges_move_each_factor_by_the_merged_movements(trained, tmp_path, method) -> None:
    base, paths = trained
    out = merge_single(paths, tmp_path / method, method, density=0.5, drop=0.3, seed=1, progress=False)
    model = pissa.load_adapter(copy.deepcopy(base), out)  # a normal adapter folder
    assert torch.isfinite(logits(model)).all()
    name = "model.layers.1.mlp.down_proj"
    layers = [AdapterFiles(p).layer(name) for p in paths]
    moves = torch.stack([t["lora_B"].double() - t["B0"].double() for t in layers])
    got = AdapterFiles(out).layer(name)["lora_B"].double() - layers[0]["B0"].double()
    if method == "linear":
        want = moves.mean(0)
    elif method == "ties":
        want = ties_merge(moves, 0.5)
    else:  # the generator is drawn per factor in layer order: check the first factor of the first layer instead
        first = next(iter(AdapterFiles(paths[0]).layers))
        layers = [AdapterFiles(p).layer(first) for p in paths]
        moves = torch.stack([t["lora_A"].double() - t["A0"].double() for t in layers])
        got = AdapterFiles(out).layer(first)["lora_A"].double() - layers[0]["A0"].double()
        want = dare_merge(moves, 0.3, torch.Generator().manual_seed(1))
    assert torch.allclose(got, want, atol=1e-6)


def test_cli_merges_and_rebuilds(trained, tmp_path, capsys) -> None:
    base, paths = trained
    out = tmp_path / "merged"
    assert main(["merge-adapters", *map(str, paths), "--out", str(out), "--p", "3", "--names", "a,b,c",
                 "--no-progress"]) == 0
    assert "3 tasks, 3 components per position" in capsys.readouterr().out
    assert main(["merge-adapters", str(out), "--task", "b", "--out", str(tmp_path / "b")]) == 0
    assert relative_error(_loaded(base, tmp_path / "b"), _loaded(base, paths[1])) <= 1e-6
    assert main(["merge-adapters", *map(str, paths), "--out", str(tmp_path / "ties"), "--method", "ties",
                 "--density", "0.3", "--no-progress"]) == 0
    assert (tmp_path / "ties" / "adapter_config.json").is_file()


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_one_line_errors(trained, tmp_path, capsys) -> None:
    base, paths = trained
    a, b = map(str, paths[:2])
    out = str(tmp_path / "out")
    assert "takes at least 2 adapter folders to merge" in _error(["merge-adapters", a, "--out", out], capsys)
    assert "--p must be an integer >= 1" in _error(["merge-adapters", a, b, "--out", out, "--p", "0"], capsys)
    assert "--density must be in (0, 1]" in _error(["merge-adapters", a, b, "--out", out, "--density", "0"], capsys)
    assert "--drop must be in [0, 1)" in _error(["merge-adapters", a, b, "--out", out, "--drop", "1"], capsys)
    assert "--names must be distinct" in _error(["merge-adapters", a, b, "--out", out, "--names", "x,x"], capsys)
    assert "--task rebuilds from one merged folder" in _error(["merge-adapters", a, b, "--out", out, "--task", "x"], capsys)
    assert "is not a merged folder" in _error(["merge-adapters", a, "--out", out, "--task", "x"], capsys)
    merge_adapters(paths, tmp_path / "m", p=1, progress=False)
    assert "--task 'x' is not in" in _error(["merge-adapters", str(tmp_path / "m"), "--out", out, "--task", "x"], capsys)
    with open(tmp_path / "m" / TENSORS_FILE, "r+b") as f:  # damage a tensor byte
        f.seek(-3, 2)
        byte = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert "does not match the digest" in _error(["merge-adapters", str(tmp_path / "m"), "--out", out, "--task", "task0"],
                                                  capsys)
    assert not Path(out).exists()  # nothing half-written


@pytest.mark.parametrize(("change", "message"), [
    ({"rank": RANK + 1}, "has rank 5"),
    ({"seed": 1, "method": "lora"}, "has seed 1"),
    ({"targets": ["q_proj"]}, "has targets ['q_proj']"),
    ({"method": "milora"}, "has method 'milora'"),
])
def test_refuses_adapters_made_otherwise(trained, tmp_path, change, message) -> None:
    base, paths = trained
    if change.get("method") == "lora":  # LoRA: the seed is the only difference (compare with LoRA seed 0)
        _, paths = _adapters(tmp_path / "lora", tasks=1, method="lora")
    other = pissa.attach(copy.deepcopy(base), pissa.AdapterConfig(**{"rank": RANK, "svd": "exact", **change}))
    train_steps(other, [TOKENS], lm_loss, steps=1, lr=1e-2)
    odd = pissa.save_adapter(other, tmp_path / "odd")
    with pytest.raises(PissaError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        merge_adapters([paths[0], odd], tmp_path / "merged", p=1, progress=False)
    assert not (tmp_path / "merged").exists()


def test_refuses_another_base(trained, tmp_path) -> None:
    base, paths = trained
    other_base = tiny_llama()
    with torch.no_grad():
        other_base.model.layers[0].self_attn.q_proj.weight.add_(0.1)
    model = pissa.attach(other_base, pissa.AdapterConfig(rank=RANK, svd="exact"))
    odd = pissa.save_adapter(model, tmp_path / "odd")
    with pytest.raises(PissaError, match="different base than"):
        merge_single([paths[0], odd], tmp_path / "merged", "linear", progress=False)
