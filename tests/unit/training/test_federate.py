"""Federated fine-tuning's client and server logic on a tiny random Llama, in process: per-sample gradients
against single-example gradients, lora_A frozen on FedSVD / FFA-LoRA clients, the server step's identities,
the privacy plan against Opacus's accountant, the Dirichlet split of the real data and the bad-input errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

from pissa.adapter.attach import adapted_layers
from pissa.data.loss import loss_sum
from pissa.errors import PissaError
from pissa.methods.federated import ALPHAS
from pissa.training import federate
from pissa.training.federate import (
    FederateConfig,
    client_round,
    client_shares,
    get_factors,
    privacy_plan,
    server_step,
    set_factors,
)
from pissa.training.privacy import private
from pissa.training.session import Session, prepare


def config(tiny: Path, **kw) -> FederateConfig:
    base = dict(model=str(tiny / "llama"), data=str(tiny / "data.jsonl"), eval_size=16, batch_size=4, lr=1e-2,
                threads=1, clients=3, rounds=2, local_steps=2)
    base.update(kw)
    return FederateConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def session(tiny: Path) -> Session:
    cfg = config(tiny)
    return prepare(cfg.run_config())


@pytest.mark.parametrize("algorithm", ["fedsvd", "fedavg-lora"])
def test_per_sample_gradients_equal_single_example_gradients(session: Session, algorithm: str) -> None:
    start = get_factors(session)
    g = torch.Generator().manual_seed(1)
    set_factors(session, {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in start.items()}, algorithm)
    picked = [0, 3, 7, 11]
    wrapped = private(session.model)
    try:
        batch = session.batch(picked)
        (loss_sum(session.model, batch, session.kind) / len(picked)).backward()
        params = [p for p in session.model.parameters() if p.requires_grad]
        per_sample = [p.grad_sample.clone() for p in params]
    finally:
        wrapped.to_standard_module()
    for p in params:
        p.grad = None
    for n, i in enumerate(picked):
        session.model.zero_grad()
        loss_sum(session.model, session.batch([i]), session.kind).backward()
        for p, gs in zip(params, per_sample, strict=True):
            assert torch.allclose(gs[n], p.grad, atol=1e-6, rtol=1e-4), (n, p.shape)
    session.model.zero_grad()
    a_params = sum(1 for _, layer in adapted_layers(session.model) if layer.lora_A.requires_grad)
    assert a_params == (len(params) // 2 if algorithm == "fedavg-lora" else 0)
    set_factors(session, start, algorithm)


@pytest.mark.parametrize("algorithm", ["fedsvd", "ffa-lora", "fedavg-lora"])
@pytest.mark.parametrize("dp", [False, True])
def test_clients_train_b_only_unless_fedavg_lora(tiny: Path, session: Session, algorithm: str, dp: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tiny, noise_multiplier=1.0, delta=1e-5) if dp else config(tiny)
    start = get_factors(session)
    shares = client_shares(session, cfg)
    plan = privacy_plan(cfg, [len(s) for s in shares])
    seen: list[bool] = []  # per optimizer step: whether any lora_A holds a gradient

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):  # type: ignore[override]
            seen.append(any(p.grad is not None for _, layer in adapted_layers(session.model) for p in [layer.lora_A]))
            return super().step(closure)

    monkeypatch.setattr(federate, "build_optimizer", lambda model, opt, lr, wd: Recording(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=wd))
    new, loss = client_round(session, cfg, algorithm, start, shares[0], 1, 0, plan[0] if plan else None)
    assert len(seen) == cfg.local_steps
    assert all(seen) if algorithm == "fedavg-lora" else not any(seen)  # lora_A gets no gradient on fedsvd / ffa-lora
    assert loss == loss  # a number: the client saw examples
    for key in start:
        moved = not torch.equal(new[key], start[key])
        assert moved == (key.endswith("lora_B") or algorithm == "fedavg-lora"), key
    again, _ = client_round(session, cfg, algorithm, start, shares[0], 1, 0, plan[0] if plan else None)
    assert all(torch.equal(again[k], new[k]) for k in new)  # a round is a pure function of (factors, seed, round)
    set_factors(session, start, algorithm)


def test_server_step_identities_and_averages() -> None:
    g = torch.Generator().manual_seed(0)
    old = {"l.lora_A": torch.randn(4, 24, generator=g), "l.lora_B": torch.zeros(16, 4)}
    updates = [{"l.lora_A": torch.randn(4, 24, generator=g), "l.lora_B": torch.randn(16, 4, generator=g)} for _ in range(3)]
    counts = [10, 30, 60]
    p = [0.1, 0.3, 0.6]
    mean_B = sum(w * u["l.lora_B"].double() for w, u in zip(p, updates))
    svd = server_step("fedsvd", old, updates, counts, round_=1, every=1, warmup=0)
    B, A = svd.factors["l.lora_B"].double(), svd.factors["l.lora_A"].double()
    assert svd.refactored and (B @ A - mean_B @ old["l.lora_A"].double()).abs().max() < 1e-6
    assert (A @ A.T - torch.eye(4, dtype=torch.float64)).abs().max() < 1e-6
    assert svd.product_error is not None and svd.product_error < 1e-6 and svd.orthonormality_error < 1e-6
    warm = server_step("fedsvd", old, updates, counts, round_=1, every=1, warmup=1)  # still warming up
    assert not warm.refactored and torch.equal(warm.factors["l.lora_A"], old["l.lora_A"])
    ffa = server_step("ffa-lora", old, updates, counts, round_=1, every=1, warmup=0)
    assert torch.equal(ffa.factors["l.lora_A"], old["l.lora_A"]) and not ffa.refactored
    assert torch.allclose(ffa.factors["l.lora_B"].double(), mean_B, atol=1e-6)
    avg = server_step("fedavg-lora", old, updates, counts, round_=1, every=1, warmup=0)
    mean_A = sum(w * u["l.lora_A"].double() for w, u in zip(p, updates))
    assert torch.allclose(avg.factors["l.lora_A"].double(), mean_A, atol=1e-6) and avg.product_error is None


def test_privacy_plan_is_opacus_accounting_with_the_clients_rate(tiny: Path, session: Session) -> None:
    cfg = config(tiny, target_epsilon=3.0, delta=1e-5)
    counts = [len(s) for s in client_shares(session, cfg)]
    plan = privacy_plan(cfg, counts)
    assert plan is not None and len(plan) == cfg.clients
    for n, p in zip(counts, plan, strict=True):
        assert p.sample_rate == cfg.batch_size / n and p.steps == cfg.local_steps * cfg.rounds
        stepped = RDPAccountant()
        for _ in range(p.steps):
            stepped.step(noise_multiplier=p.noise, sample_rate=p.sample_rate)
        assert p.epsilon == pytest.approx(stepped.get_epsilon(1e-5, alphas=ALPHAS), rel=1e-9)
        assert p.epsilon <= 3.0
    assert privacy_plan(config(tiny), counts) is None


def test_dirichlet_split_of_the_training_data_is_non_iid_for_small_alpha(tiny: Path, session: Session) -> None:
    labels = [e.label for e in session.train]

    def skew(alpha: float | None) -> float:
        shares = client_shares(session, config(tiny, dirichlet_alpha=alpha))
        assert sorted(i for s in shares for i in s) == list(range(len(labels)))
        return max(abs(sum(labels[i] == 1 for i in s) / len(s) - sum(x == 1 for x in labels) / len(labels)) for s in shares)

    assert skew(0.05) > 0.3 and skew(None) < 0.15  # ~43 examples a client: IID shares differ by chance only


def test_bad_options_are_one_line_errors(tiny: Path, session: Session) -> None:
    with pytest.raises(PissaError, match="`delta`"):
        config(tiny, target_epsilon=2.0)
    with pytest.raises(PissaError, match="`noise_multiplier` and `target_epsilon`"):
        config(tiny, target_epsilon=2.0, noise_multiplier=1.0, delta=1e-5)
    with pytest.raises(PissaError, match="`algorithms`"):
        config(tiny, algorithms=["fedsvd", "fedprox"])
    with pytest.raises(PissaError, match="`init`"):
        config(tiny, init="full")
    with pytest.raises(PissaError, match="`clients` 500 must be between 1 and the"):
        client_shares(session, config(tiny, clients=500))
    with pytest.raises(PissaError, match="`pack`"):
        config(tiny, pack=True, noise_multiplier=1.0, delta=1e-5)
    assert dataclasses.replace(config(tiny, init="pissa")).adapter.method == "pissa"
