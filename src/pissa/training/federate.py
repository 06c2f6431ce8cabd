"""``pissa federate``: the options, the client's local round and the server's step of federated fine-tuning
(FedSVD and its baselines; the math in :mod:`pissa.methods.federated`, the Flower apps in
:mod:`pissa.training.flower`).

One round r of algorithm a, global factors ``(A, B)`` per adapted layer, clients k = 1..K (all sampled)::

    client k: load (A, B); train B (and A for fedavg-lora) for ``local_steps`` steps on its share of the data,
              a fresh optimizer each round, batches drawn from a generator seeded by (seed, r, k):
              fixed-size batches, or DP-SGD (Poisson sampling q = batch / n_k, per-example clipping, noise)
    server:   B <- sum_k p_k B_k (A likewise for fedavg-lora); fedsvd on a refactor round: (B, A) <- refactor(B, A)

A round is a pure function of the global factors and (seed, r), so a run resumed at round r + 1 from a
checkpoint of round r gives what an uninterrupted run gives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from pissa.adapter.attach import adapted_layers
from pissa.adapter.shapes.lowrank import FACTOR_A, FACTOR_B
from pissa.data.batches import Batch
from pissa.data.loss import loss_sum
from pissa.errors import PissaError
from pissa.methods.federated import client_weights, dirichlet_split, epsilon, noise_for, refactor, refactors, weighted_mean
from pissa.methods.registry import METHODS
from pissa.optim import build_optimizer
from pissa.runtime.devices import autocast
from pissa.training.config import RunConfig
from pissa.training.privacy import dp_optimizer, empty_grad_samples, poisson_batch, private
from pissa.training.session import Session

Algorithm = Literal["fedsvd", "ffa-lora", "fedavg-lora"]
ALGORITHMS: tuple[str, ...] = ("fedsvd", "ffa-lora", "fedavg-lora")
Factors = dict[str, Tensor]
"""``{"<layer>.lora_A": (r, in), "<layer>.lora_B": (out, r)}`` for every adapted layer."""


@dataclass
class FederateConfig(RunConfig):
    """A federated run per algorithm, everything else equal (``pissa federate``). ``lr``, ``batch_size``,
    ``max_grad_norm`` (DP-SGD: each example's clipping norm) apply on every client."""

    algorithms: list[str] = field(default_factory=lambda: ["fedsvd", "ffa-lora", "fedavg-lora"])
    """Comma-separated: fedsvd (B trained, A frozen, B A re-factorised by SVD on the server), ffa-lora (B trained,
    A frozen) and fedavg-lora (both trained and averaged)."""
    init: str = "lora"
    """The adapter every algorithm starts from (pissa.METHODS with B A factors): lora, as FedSVD's paper, or pissa."""
    clients: int = 4
    """Number of clients K (every client trains every round)."""
    rounds: int = 6
    """Federated rounds R."""
    local_steps: int = 5
    """Optimizer steps per client per round (a fresh optimizer each round)."""
    dirichlet_alpha: float | None = 0.5
    """Non-IID split: label proportions per client ~ Dirichlet(alpha); none: IID."""
    refactor_every: int = 1
    """fedsvd: re-factorise B A by SVD every N rounds ..."""
    refactor_warmup: int = 0
    """... once this many rounds have passed."""
    noise_multiplier: float | None = None
    """DP-SGD noise (std = noise multiplier x max_grad_norm) on the clients; none: not private unless target_epsilon."""
    target_epsilon: float | None = None
    """DP-SGD: the noise each client needs to spend at most this epsilon (at delta) over all rounds."""
    delta: float | None = None
    """The delta of the (epsilon, delta) privacy budget (needed with noise_multiplier or target_epsilon), e.g. 1e-5."""

    def __post_init__(self) -> None:
        if self.init not in METHODS or not METHODS[self.init].adapter or METHODS[self.init].compressed:
            raise PissaError(f"`init` must be an adapter method with B A factors such as lora or pissa, got {self.init!r}")
        super().__post_init__()
        self.adapter = dataclasses.replace(self.adapter, method=self.init)
        names = self.algorithms
        if not names or len(set(names)) != len(names) or not set(names) <= set(ALGORITHMS):
            raise PissaError(f"`algorithms` takes distinct names among {', '.join(ALGORITHMS)}, got {','.join(names)!r}")
        for name in ("clients", "rounds", "local_steps", "refactor_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise PissaError(f"`{name}` must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.refactor_warmup, int) or self.refactor_warmup < 0:
            raise PissaError(f"`refactor_warmup` must be an integer >= 0, got {self.refactor_warmup!r}")
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise PissaError("`noise_multiplier` and `target_epsilon` both set the noise; pass one of them")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise PissaError(f"`noise_multiplier` must be > 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise PissaError(f"`target_epsilon` must be > 0, got {self.target_epsilon}")
        if self.private and self.delta is None:
            raise PissaError("a privacy budget needs its `delta` (e.g. 1e-5, below 1 / the examples)")
        if self.delta is not None and not 0 < self.delta < 1:
            raise PissaError(f"`delta` must be in (0, 1), got {self.delta}")
        if self.private and self.pack:
            raise PissaError("DP-SGD clips each example's gradient; `pack` joins examples: drop `pack`")
        if self.objective != "sft":
            raise PissaError(f"`objective` {self.objective} does not run federated: clients train the sft objective")

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None or self.target_epsilon is not None

    def run_config(self) -> RunConfig:
        """The plain run options (model, data, adapter, lr, batches) each client and the server load with."""
        return RunConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RunConfig)})


# --- the global factors ------------------------------------------------------------------------


def get_factors(session: Session) -> Factors:
    """Copies of every adapted layer's current ``lora_A`` and ``lora_B`` (float32 or the factor dtype)."""
    found: Factors = {}
    for name, layer in adapted_layers(session.model):
        for part in (FACTOR_A, FACTOR_B):
            found[f"{name}.{part}"] = layer.tensors()[part].detach().clone()
    return found


def set_factors(session: Session, factors: Factors, algorithm: str) -> None:
    """Load ``factors`` into the adapted layers; ``lora_B`` trains, ``lora_A`` only for fedavg-lora."""
    for name, layer in adapted_layers(session.model):
        for part in (FACTOR_A, FACTOR_B):
            param = getattr(layer, part)
            with torch.no_grad():
                param.copy_(factors[f"{name}.{part}"])
            param.requires_grad_(part == FACTOR_B or algorithm == "fedavg-lora")
            param.grad = None


# --- the data split and the privacy budget -----------------------------------------------------


def client_shares(session: Session, cfg: FederateConfig) -> list[list[int]]:
    """Each client's training example indices (:func:`~pissa.methods.federated.dirichlet_split`, seeded)."""
    labels = [e.label for e in session.train]
    if cfg.dirichlet_alpha is not None and any(label is None for label in labels):
        raise PissaError(f"`dirichlet_alpha` splits by label and {cfg.data} has no labels: pass `dirichlet_alpha` none (IID)")
    return dirichlet_split([int(label or 0) for label in labels], cfg.clients, cfg.dirichlet_alpha, cfg.seed)


@dataclass
class Privacy:
    """Client k's DP-SGD: Poisson rate ``q = batch / n_k``, its noise multiplier, its steps and the epsilon spent."""

    sample_rate: float
    noise: float
    steps: int
    epsilon: float


def privacy_plan(cfg: FederateConfig, counts: Sequence[int]) -> list[Privacy] | None:
    """Each client's DP-SGD plan (None when not private): ``steps = local_steps x rounds`` (every client trains
    every round), ``q = min(1, batch_size / n_k)``; the noise is ``noise_multiplier`` or, for ``target_epsilon``,
    the least noise that keeps that client's epsilon at ``delta`` within it (Opacus's RDP accountant)."""
    if not cfg.private:
        return None
    assert cfg.delta is not None
    steps = cfg.local_steps * cfg.rounds
    plans = []
    for n in counts:
        q = min(1.0, cfg.batch_size / n)
        noise = cfg.noise_multiplier
        if noise is None:
            noise = noise_for(cfg.target_epsilon or 0.0, q, steps, cfg.delta)
        plans.append(Privacy(q, noise, steps, epsilon(noise, q, steps, cfg.delta)))
    return plans


# --- one client's round ----------------------------------------------------------------------


def round_seed(seed: int, round_: int, client: int) -> int:
    """The seed of client ``client``'s batches, dropout and noise in round ``round_`` (1-based)."""
    return (seed * 1_000_003 + round_ * 10_007 + client) % (2**63)


def client_round(session: Session, cfg: FederateConfig, algorithm: str, factors: Factors, share: Sequence[int],
                 round_: int, client: int, privacy: Privacy | None) -> tuple[Factors, float]:
    """Client ``client``'s local training in round ``round_``: start at the global ``factors``, take
    ``cfg.local_steps`` steps on the examples ``share`` (fixed batches of ``batch_size``, or DP-SGD with
    ``privacy``), return its factors and its mean training loss (per target token)."""
    set_factors(session, factors, algorithm)
    gen = torch.Generator().manual_seed(round_seed(cfg.seed, round_, client))
    torch.manual_seed(round_seed(cfg.seed, round_, client))  # dropout
    model = session.model
    optimizer = build_optimizer(model, cfg.optim, cfg.learning_rate, cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    wrapped = private(model) if privacy is not None else None
    if privacy is not None:
        optimizer = dp_optimizer(optimizer, privacy.noise, cfg.max_grad_norm,
                                 max(1, round(privacy.sample_rate * len(share))), generator=gen)
    losses: list[float] = []
    try:
        for _ in range(cfg.local_steps):
            if privacy is None:
                picked = torch.randperm(len(share), generator=gen)[: cfg.batch_size].tolist()
            else:
                picked = poisson_batch(len(share), privacy.sample_rate, gen)
            if picked:
                batch = session.batch([share[i] for i in picked])
                assert isinstance(batch, Batch)  # objective sft (validated): completion batches
                with autocast(session.device, session.dtype):
                    total = loss_sum(model, batch, session.kind)
                # DP: the mean over examples (Opacus scales per-example gradients back by the batch size)
                (total / (len(picked) if privacy is not None else max(1, batch.targets))).backward()
                losses.append(total.item() / max(1, batch.targets))
            elif privacy is not None:
                empty_grad_samples(optimizer)
            if privacy is None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        if wrapped is not None:
            wrapped.to_standard_module()
    if not all(torch.isfinite(p).all() for p in params):
        raise PissaError(f"client {client}'s factors diverged in round {round_}; lower `lr` (now {cfg.learning_rate:g})")
    return get_factors(session), sum(losses) / len(losses) if losses else float("nan")


# --- the server's step -------------------------------------------------------------------------


@dataclass
class ServerStep:
    """The new global factors and the checks of the step: ``product_error`` = max |B'A' - (sum p_k B_k) A_old|
    (fedsvd, ffa-lora; 0 expected up to rounding), ``orthonormality_error`` = max |A'A'^T - I_r| (fedsvd after a
    refactorisation), each the worst over the layers; None where they do not apply."""

    factors: Factors
    refactored: bool
    product_error: float | None
    orthonormality_error: float | None


def server_step(algorithm: str, old: Factors, updates: Sequence[Factors], counts: Sequence[int], round_: int,
                every: int, warmup: int) -> ServerStep:
    """Aggregate the clients' factors (weights ``p_k = n_k / sum n``) as ``algorithm`` does (module docstring)."""
    p = client_weights(counts)
    new: Factors = {}
    redo = algorithm == "fedsvd" and refactors(round_, every, warmup)
    product, ortho = 0.0, 0.0
    for key in old:
        if not key.endswith(f".{FACTOR_B}"):
            continue
        a_key = key[: -len(FACTOR_B)] + FACTOR_A
        B = weighted_mean([u[key] for u in updates], p)
        A = weighted_mean([u[a_key] for u in updates], p) if algorithm == "fedavg-lora" else old[a_key]
        if redo:
            B, A = refactor(B, A)
            eye = torch.eye(A.shape[0], dtype=torch.float64)
            ortho = max(ortho, float((A.double() @ A.double().T - eye).abs().max()))
        if algorithm != "fedavg-lora":
            expected = weighted_mean([u[key].double() for u in updates], p) @ old[a_key].double()
            product = max(product, float((B.double() @ A.double() - expected).abs().max()))
        new[key], new[a_key] = B, A
    return ServerStep(new, redo, None if algorithm == "fedavg-lora" else product, ortho if redo else None)
