"""Low-precision trainable factors train through float32 masters (pissa.optim.masters): torch's AdamW on a float16
weight divides by an underflowed sqrt(v) + eps, ours stays finite and follows the float32 run."""

from __future__ import annotations

import copy

import pytest
import torch

import pissa
from helpers import tiny_llama
from pissa.data.batches import Batch
from pissa.optim import OptimizerConfig, build_optimizer, state_bytes
from pissa.runtime.devices import grad_scaler
from pissa.training.config import RunConfig
from pissa.training.loop import make_optimizer, train_step


def test_torch_adamw_on_a_float16_weight_breaks_where_eps_and_v_underflow() -> None:
    """The cause: 1e-8 and (1 - b2) g^2 are 0 in float16, so Adam's step m / (sqrt(v) + eps) is m / 0."""
    assert torch.tensor(1e-8, dtype=torch.float16).item() == 0.0
    w = torch.nn.Parameter(torch.full((8,), 0.5, dtype=torch.float16))
    opt = torch.optim.AdamW([w], lr=1e-3)
    w.grad = torch.full((8,), 1e-3, dtype=torch.float16)  # v = 1e-3 * 1e-6: below float16's smallest subnormal
    opt.step()
    assert not torch.isfinite(w).all()


def batches(n: int = 4) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 96, (3, 12), generator=g)
        target = torch.zeros(3, 12, dtype=torch.bool)
        target[:, 6:] = True
        out.append(Batch(ids, torch.ones(3, 12, dtype=torch.long), target, torch.full((3,), -1)))
    return out


def trained(factor_dtype: str, dtype: str = "float32", steps: int = 6, lr: float = 1e-3) -> dict[str, torch.Tensor]:
    """The factors after ``steps`` train_steps of PiSSA (rank 4) on the tiny Llama, as float32."""
    model = pissa.attach(tiny_llama(getattr(torch, dtype)), pissa.AdapterConfig(rank=4, factor_dtype=factor_dtype))  # type: ignore[arg-type]
    cfg = RunConfig(dtype=dtype, lr=lr, batch_size=3, threads=1)  # type: ignore[arg-type]
    optimizer, scaler = make_optimizer(model, cfg), grad_scaler(torch.device("cpu"), getattr(torch, dtype))
    model.train()
    for b in batches(steps):
        loss, _ = train_step(model, [b], "causal-lm", optimizer, lr, cfg, scaler)
        assert torch.isfinite(torch.tensor(loss))
    return {n: p.detach().float() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_optimizer_of_a_low_precision_weight_is_float32_adamw_rounded(dtype: torch.dtype) -> None:
    """Fed the same gradients, the low-precision weight is the float32 AdamW weight rounded to its dtype (up to the
    gradients' own rounding), also for gradients small enough to break torch's AdamW in float16."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(16, 16, generator=g).to(dtype).float()
    ref, low = torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 16, bias=False).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(w0)
        low.weight.copy_(w0)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0)
    low_opt = build_optimizer(low, OptimizerConfig(), lr=1e-3, weight_decay=0.0)
    for step in range(10):
        grad = torch.randn(16, 16, generator=g) * 10.0 ** -(2 + step % 3)  # 1e-2 .. 1e-4
        ref.weight.grad, low.weight.grad = grad.to(dtype).float(), grad.to(dtype)
        ref_opt.step()
        low_opt.step()  # a plain step: its pre-step hook moves the gradient to the master
        assert low.weight.grad is None and low.weight.dtype == dtype
        assert torch.equal(low.weight, ref.weight.detach().to(dtype))
        ref_opt.zero_grad()
        low_opt.zero_grad()  # the masters' gradients (a gradient moved to one accumulates there until then)
    [(_, master)] = low_opt.pissa_masters
    assert (master - w0).abs().min() > 0  # every entry moved in float32 (about 1e-2 in all) ...
    assert ((low.weight.float() - w0).abs() > 0).float().mean() > 0.5  # ... and most by a step of the low dtype


@pytest.mark.parametrize(("factor_dtype", "dtype", "tol"), [("float16", "float32", 0.05), ("float16", "float16", 0.05),
                                                            ("bfloat16", "float32", 0.2)])
def test_low_precision_factors_stay_finite_and_follow_the_float32_run(factor_dtype: str, dtype: str, tol: float) -> None:
    """Whole train_steps (autocast and the gradient scaler for a float16 base): finite, and on average within a few
    percent of the float32 run's movement (the forward pass in the low dtype perturbs the gradients, which Adam's
    normalisation amplifies for the entries whose gradients are near zero)."""
    reference, low = trained("float32", dtype), trained(factor_dtype, dtype)
    start = {n: p.detach().float() for n, p in pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=4)).named_parameters()
             if p.requires_grad}
    for name, ref in reference.items():
        assert torch.isfinite(low[name]).all()
        moved = (ref - start[name]).abs().mean().item()
        assert moved > 1e-4, name  # the factors trained (lr 1e-3, 6 steps)
        assert (low[name] - ref).abs().mean().item() <= tol * moved, name


def test_a_small_learning_rate_still_moves_float16_factors() -> None:
    """An update far below float16's spacing accumulates in the master instead of rounding away each step."""
    reference, low = trained("float32", lr=2e-5, steps=4), trained("float16", lr=2e-5, steps=4)
    start = {n: p.detach().float() for n, p in pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=4)).named_parameters()
             if p.requires_grad}
    for name in reference:
        ref_delta, low_delta = reference[name] - start[name], low[name] - start[name].half().float()
        assert ref_delta.abs().max().item() > 0 and low_delta.abs().max().item() > 0
        assert (low_delta - ref_delta).abs().max().item() <= 2 * torch.finfo(torch.float16).eps * start[name].abs().max().item()


def test_masters_round_trip_through_the_state_dict_and_resume_exactly() -> None:
    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=4, factor_dtype="float16"))
    cfg = RunConfig(lr=1e-3, batch_size=3, threads=1)
    optimizer = make_optimizer(model, cfg)
    model.train()
    data = batches(6)
    for b in data[:3]:
        train_step(model, [b], "causal-lm", optimizer, 1e-3, cfg)
    sd = copy.deepcopy(optimizer.state_dict())  # as a checkpoint holds it (the live moments keep changing)
    assert all("master" not in s for s in optimizer.state.values())  # state_dict adds it, the live state has none
    assert sum("master" in s for s in sd["state"].values()) == sum(p.requires_grad for p in model.parameters())
    masters = [m.clone() for _, m in optimizer.pissa_masters]
    assert any(((m.half().float() - m) != 0).any() for m in masters)  # the masters hold more than float16 does
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    assert state_bytes(optimizer) == moments + 4 * n_trainable

    resumed = copy.deepcopy(model)  # its float16 factors, as a checkpoint restores them
    again = make_optimizer(resumed, cfg)
    again.load_state_dict(sd)
    assert all(torch.equal(a, m) for (_, a), m in zip(again.pissa_masters, masters, strict=True))
    assert all("master" not in s for s in again.state.values())
    for b in data[3:]:
        train_step(model, [b], "causal-lm", optimizer, 1e-3, cfg)
        train_step(resumed, [b], "causal-lm", again, 1e-3, cfg)
    for (n, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_float32_factors_train_without_masters() -> None:
    model = pissa.attach(tiny_llama(), pissa.AdapterConfig(rank=4))
    optimizer = make_optimizer(model, RunConfig(lr=1e-3, threads=1))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert not hasattr(optimizer, "pissa_masters")
    assert [id(p) for p in params] == [id(p) for p in model.parameters() if p.requires_grad]
