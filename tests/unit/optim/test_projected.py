"""GaLore and DCT-AdamW (pissa.optim): the DCT basis, the column choice, the update against torch's AdamW on the
rotated parameter and against galore-torch, which weights are projected, the state and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
from galore_torch import GaLoreAdamW
from torch import nn

from helpers import mlp, tiny_llama
from pissa.cli import main
from pissa.errors import PissaError
from pissa.optim import (
    OptimizerConfig,
    ProjectedAdamW,
    build_optimizer,
    dct_basis,
    projected_weights,
    select_columns,
    state_bytes,
    top_singular_vectors,
)
from pissa.training.config import RunConfig

X = torch.randn(16, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def loss_of(w: torch.Tensor, x: torch.Tensor = X) -> torch.Tensor:
    """A smooth non-quadratic loss of a (m, 16) or (16, n) weight, whichever fits."""
    y = w @ x if w.shape[1] == x.shape[0] else x.T @ w
    return (y.tanh() - 0.3).pow(2).sum()


@pytest.mark.parametrize("n", [1, 7, 64])
def test_dct_basis_is_orthonormal_and_gives_the_dct_ii(n: int) -> None:
    q = dct_basis(n, torch.float64, torch.device("cpu"))
    assert torch.allclose(q.T @ q, torch.eye(n, dtype=torch.float64), atol=1e-12)
    rows = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(rows @ q, dct_ii_by_fft(rows), atol=1e-12)


def dct_ii_by_fft(rows: torch.Tensor) -> torch.Tensor:
    """The orthonormal DCT-II of each row through the FFT of its even extension (Makhoul), not through a matrix."""
    n = rows.shape[-1]
    k = torch.arange(n, dtype=torch.float64)
    spectrum = torch.fft.fft(torch.cat([rows, rows.flip(-1)], dim=-1))[..., :n]
    y = (spectrum * torch.exp(-1j * torch.pi * k / (2 * n))).real / 2
    return y * torch.where(k == 0, (1 / n) ** 0.5, (2 / n) ** 0.5)


def test_dct_basis_is_built_once_per_size_and_each_size_has_its_own() -> None:
    cpu = torch.device("cpu")
    assert dct_basis(12, torch.float32, cpu) is dct_basis(12, torch.float32, cpu)
    assert dct_basis(12, torch.float32, cpu).shape == (12, 12) and dct_basis(5, torch.float32, cpu).shape == (5, 5)


def test_a_gradient_inside_r_basis_columns_is_chosen_and_projected_without_error() -> None:
    q = dct_basis(20, torch.float64, torch.device("cpu"))
    cols = torch.tensor([2, 5, 11, 17])
    g = torch.randn(30, 4, dtype=torch.float64) @ q[:, cols].T
    index, x = select_columns(g, q, 4)
    assert index.dtype == torch.int64 and index.tolist() == cols.tolist()
    assert torch.allclose(x @ q[:, index].T, g, atol=1e-12)


def run_projected(w0: torch.Tensor, projection: str, steps: int = 20, **group) -> tuple[torch.Tensor, ProjectedAdamW]:
    w = nn.Parameter(w0.clone())
    opt = ProjectedAdamW([{"params": [w], "projection": projection, **group}], lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        loss_of(w).backward()
        opt.step()
        opt.zero_grad()
    return w.detach(), opt


def run_adamw(w0: torch.Tensor, basis: torch.Tensor, wide: bool, steps: int = 20) -> torch.Tensor:
    """torch's AdamW on ``Y = W P`` (``P^T W`` for a wide W), returning ``W = Y P^T`` (``P Y``)."""
    y = nn.Parameter((basis.T @ w0) if wide else (w0 @ basis))
    opt = torch.optim.AdamW([y], lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        loss_of(basis @ y if wide else y @ basis.T).backward()
        opt.step()
        opt.zero_grad()
    return (basis @ y if wide else y @ basis.T).detach()


@pytest.mark.parametrize("shape", [(30, 16), (16, 24)])
def test_full_rank_dct_adamw_equals_torch_adamw_in_the_dct_basis(shape: tuple[int, int]) -> None:
    """r = n: every column is chosen at each re-selection (every 3 steps), so the moments never move and the update
    is AdamW on the DCT coefficients of the weight; with the identity instead of the DCT this is AdamW itself."""
    w0 = torch.randn(*shape, dtype=torch.float64)
    n = min(shape)
    w, opt = run_projected(w0, "dct", rank=n, every=3)
    assert opt.state[opt.param_groups[0]["params"][0]]["index"].tolist() == list(range(n))
    reference = run_adamw(w0, dct_basis(n, torch.float64, torch.device("cpu")), wide=shape[0] < shape[1])
    assert (w - reference).abs().max().item() <= 1e-6


@pytest.mark.parametrize("shape", [(30, 16), (16, 24)])
def test_full_rank_galore_with_one_projection_equals_torch_adamw_in_its_singular_basis(shape: tuple[int, int]) -> None:
    w0 = torch.randn(*shape, dtype=torch.float64)
    wide = shape[0] < shape[1]
    w00 = nn.Parameter(w0.clone())
    loss_of(w00).backward()
    basis = top_singular_vectors(w00.grad, min(shape))
    w, _ = run_projected(w0, "galore", rank=min(shape), every=100, scale=1.0)
    assert (w - run_adamw(w0, basis, wide)).abs().max().item() <= 1e-6


def test_unprojected_groups_equal_torch_adamw_over_20_steps() -> None:
    """No weight is projected when every smaller side is <= proj_rank: the same updates as torch's AdamW."""
    ours, theirs = mlp(), mlp()
    opt = build_optimizer(ours, OptimizerConfig(optimizer="dct-adamw", proj_rank=64), lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1)
    assert isinstance(opt, ProjectedAdamW) and all(g["projection"] is None for g in opt.param_groups)
    x = torch.randn(8, 24)
    for _ in range(20):
        for model, o in ((ours, opt), (theirs, ref)):
            model(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    assert max((a - b).abs().max().item() for a, b in zip(ours.parameters(), theirs.parameters())) <= 1e-6


def test_galore_equals_galore_torch_on_a_small_model() -> None:
    """Same side (the smaller one), same top-r SVD at steps 0, 3, 6, ..., same scale. galore-torch adds eps to
    sqrt(v) before the bias correction and torch's AdamW (ours) after it, and decays after the update instead of
    before: with weight decay 0 and a negligible eps the two rules are the same (with eps 1e-8 the tiny projected
    gradients of this model differ by 3e-4)."""
    ours, theirs = mlp(), mlp()
    cfg = OptimizerConfig(optimizer="galore", proj_rank=6, proj_every=3, proj_scale=0.25)
    opt = build_optimizer(ours, cfg, lr=1e-2, weight_decay=0.0)
    for group in opt.param_groups:
        group["eps"] = 1e-14
    mats = [p for p in theirs.parameters() if p.ndim == 2]
    rest = [p for p in theirs.parameters() if p.ndim != 2]
    ref = GaLoreAdamW([{"params": rest}, {"params": mats, "rank": 6, "update_proj_gap": 3, "scale": 0.25,
                                          "proj_type": "std"}], lr=1e-2, eps=1e-14, weight_decay=0.0)
    assert len(opt.param_groups[0]["params"]) == 3
    x = torch.randn(8, 24)
    for _ in range(10):
        for model, o in ((ours, opt), (theirs, ref)):
            model(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    assert max((a - b).abs().max().item() for a, b in zip(ours.parameters(), theirs.parameters())) <= 1e-6


def test_new_columns_start_fresh_and_staying_columns_keep_their_moments() -> None:
    q = dct_basis(8, torch.float64, torch.device("cpu"))
    w = nn.Parameter(torch.zeros(10, 8, dtype=torch.float64))
    opt = ProjectedAdamW([{"params": [w], "projection": "dct", "rank": 3, "every": 1}], lr=1e-2)
    coef = torch.randn(10, 3, dtype=torch.float64)
    for cols in ([0, 1, 2], [2, 3, 4]):
        w.grad = coef @ q[:, cols].T
        opt.step()
    state = opt.state[w]
    assert state["index"].tolist() == [2, 3, 4] and state["age"].tolist() == [2, 1, 1]
    b1 = 0.9
    assert torch.allclose(state["exp_avg"][:, 0], (1 - b1) * (b1 * coef[:, 2] + coef[:, 0]))  # column 2: both steps
    assert torch.allclose(state["exp_avg"][:, 1:], (1 - b1) * coef[:, 1:])  # 3 and 4: this step only


def test_embeddings_heads_and_1d_tensors_take_adamw() -> None:
    model = tiny_llama()
    chosen = {id(p) for p in projected_weights(model, rank=8)}
    names = [n for n, p in model.named_parameters() if id(p) in chosen]
    assert len(names) == 14 and all(n.endswith("proj.weight") for n in names)  # 7 per block, no lm_head/embeddings
    assert not projected_weights(model, rank=32)  # no smaller side over 32: nothing to save
    tied = tiny_llama()
    tied.lm_head.weight = tied.model.embed_tokens.weight
    assert id(tied.lm_head.weight) not in {id(p) for p in projected_weights(tied, rank=8)}


@pytest.mark.parametrize("name", ["galore", "dct-adamw"])
def test_state_is_tensors_smaller_than_adamw_and_round_trips(name: str) -> None:
    model = tiny_llama()
    x = torch.randint(0, 96, (2, 8))
    cfg = OptimizerConfig(optimizer=name, proj_rank=4, proj_every=2)
    opt = build_optimizer(model, cfg, lr=1e-3, weight_decay=0.0)

    def steps(m: nn.Module, o: torch.optim.Optimizer, k: int) -> None:
        for _ in range(k):
            m(input_ids=x, labels=x).loss.backward()
            o.step()
            o.zero_grad()

    steps(model, opt, 3)
    sd = opt.state_dict()
    assert all(isinstance(v, torch.Tensor) for s in sd["state"].values() for v in s.values())
    resumed_model = copy.deepcopy(model)
    resumed = build_optimizer(resumed_model, cfg, lr=1e-3, weight_decay=0.0)
    resumed.load_state_dict(copy.deepcopy(sd))
    if name == "dct-adamw":
        assert all(s["index"].dtype == torch.int64 for s in resumed.state.values() if "index" in s)
    steps(model, opt, 3)
    steps(resumed_model, resumed, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))
    full = copy.deepcopy(model)
    adamw = torch.optim.AdamW(full.parameters())
    steps(full, adamw, 1)
    assert state_bytes(opt) < 0.75 * state_bytes(adamw)


def test_bad_input_is_a_one_line_error_naming_the_field(capsys) -> None:
    with pytest.raises(PissaError, match="`proj_rank` must be an integer >= 1"):
        OptimizerConfig(proj_rank=0)
    with pytest.raises(PissaError, match="`proj_every`"):
        OptimizerConfig(proj_every=-2)
    with pytest.raises(PissaError, match="`optimizer` must be one of"):
        OptimizerConfig(optimizer="sgd")  # type: ignore[arg-type]
    with pytest.raises(PissaError, match="use it with `method` full"):
        RunConfig(optim=OptimizerConfig(optimizer="galore"))
    assert main(["finetune", "--optimizer", "sgd"]) == 2
    assert main(["finetune", "--method", "lora", "--optimizer", "dct-adamw"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--optimizer takes one of adamw, galore, dct-adamw" in err[0]
    assert "use it with --method full" in err[1]
