"""WeLore-compressed models in memory: :class:`LowRankLinear`, :func:`compress`, and loading a ``pissa compress`` folder.

A compressed model is the base architecture with every low-rank-capable Linear (an LRCM,
:func:`pissa.methods.welore.is_lrcm`) replaced by a :class:`LowRankLinear` holding ``A (r, in)`` and ``B (out, r)``;
the other layers stay as they are. The model carries its :class:`Record` (``model.pissa_compressed``): the
per-layer shapes and ranks and the plan that chose them. A compressed folder is the ``save_pretrained`` layout
of such a model (its state dict: ``{layer}.A``, ``{layer}.B`` for each LRCM, the dense tensors as they were) plus
:data:`RECORD`; :func:`load_compressed` builds the architecture from its config.json, swaps in the recorded
LowRankLinear layers and loads the tensors. WeLore-COFT (``pissa finetune --method welore``) trains only the
factors (:func:`train_factors`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn import functional as F

from pissa.adapter.attach import set_module
from pissa.adapter.targets import find_targets
from pissa.errors import PissaError
from pissa.methods.welore import Plan, lowrank_factors, stored, uniform_plan, welore_plan
from pissa.runtime import hub

RECORD = "welore.json"
"""A compressed folder's record of the layers' shapes and ranks and of the plan (:class:`Record`)."""

FORMAT = "pissa-welore-1"


class LowRankLinear(nn.Module):
    """``y = (x A^T) B^T + bias``: an ``(out, in)`` Linear of rank r stored as ``A (r, in)`` and ``B (out, r)``."""

    def __init__(self, A: Tensor, B: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.in_features, self.out_features, self.rank = A.shape[1], B.shape[0], A.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@dataclass(frozen=True)
class Record:
    """What :data:`RECORD` holds: ``layers[name] = [out, in, rank or None]`` (None: kept dense) and the plan."""

    layers: dict[str, tuple[int, int, int | None]]
    plan: str
    """``"welore"`` (threshold τ on normalised singular values) or ``"uniform"`` (the same rank fraction cut everywhere)."""
    threshold: float
    requested: float
    reached: float
    dense_params: int
    stored_params: int

    @classmethod
    def of(cls, names: list[str], shapes: list[tuple[int, int]], plan: Plan, how: str) -> Record:
        layers = {n: (s[0], s[1], r) for n, s, r in zip(names, shapes, plan.ranks, strict=True)}
        return cls(layers, how, plan.threshold, plan.requested, plan.reached,
                   sum(m * n for m, n in shapes), sum(stored(s, r) for s, r in zip(shapes, plan.ranks, strict=True)))

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=2)

    @classmethod
    def read(cls, folder: Path) -> Record:
        try:
            doc = json.loads((folder / RECORD).read_text())
            if doc.pop("format") != FORMAT:
                raise ValueError
            doc["layers"] = {n: tuple(v) for n, v in doc["layers"].items()}
            return cls(**doc)
        except (OSError, ValueError, KeyError, TypeError):
            raise PissaError(f"{folder / RECORD} is missing or not a pissa compress record; rerun pissa compress") from None


def is_compressed(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a ``pissa compress`` output (it holds :data:`RECORD`)."""
    return (Path(folder).expanduser() / RECORD).is_file()


def spectrum(W: Tensor) -> Tensor:
    """The singular values of ``W (out, in)``, descending, in float32 (float64 for float64 weights)."""
    return torch.linalg.svdvals(W.to(torch.float64 if W.dtype == torch.float64 else torch.float32))


def factorize(W: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``A (r, in)``, ``B (out, r)`` in W's dtype with ``B A`` the best rank-r approximation of ``W (out, in)``
    (full SVD in float32, float64 for float64; ``sqrt(S)`` on both sides: :func:`~pissa.methods.welore.lowrank_factors`)."""
    U, S, Vh = torch.linalg.svd(W.to(torch.float64 if W.dtype == torch.float64 else torch.float32), full_matrices=False)
    A, B = lowrank_factors(U, S, Vh, rank)
    return A.to(W.dtype).contiguous(), B.to(W.dtype).contiguous()


def compressible(model: nn.Module, targets: str | list[str]) -> list[str]:
    """The target layers (:func:`~pissa.adapter.targets.find_targets`), refused unless each is an ``nn.Linear``."""
    names = find_targets(model, targets)
    for n in names:
        if type(model.get_submodule(n)) is not nn.Linear:
            raise PissaError(f"compress replaces nn.Linear layers; {n} is a {type(model.get_submodule(n)).__name__}: "
                             "choose `targets` that name Linear layers")
    return names


def plan_for(spectra: list[Tensor], shapes: list[tuple[int, int]], reduction: float, uniform: bool) -> Plan:
    """WeLore's plan (:func:`~pissa.methods.welore.welore_plan`) or, ``uniform``, the baseline's."""
    return uniform_plan(shapes, reduction) if uniform else welore_plan(spectra, shapes, reduction)


def compress(model: nn.Module, reduction: float, targets: str | list[str] = "all-linear", *, uniform: bool = False) -> Record:
    """Compress ``model`` in place: the LRCMs of the plan that saves ``reduction`` of the targets' parameters
    become :class:`LowRankLinear` (bias kept); returns the :class:`Record`, also kept as ``model.pissa_compressed``."""
    names = compressible(model, targets)
    linears = [cast(nn.Linear, model.get_submodule(n)) for n in names]
    shapes = [(lin.weight.shape[0], lin.weight.shape[1]) for lin in linears]
    spectra = [] if uniform else [spectrum(lin.weight.detach()) for lin in linears]
    plan = plan_for(spectra, shapes, reduction, uniform)
    for name, lin, rank in zip(names, linears, plan.ranks, strict=True):
        if rank is not None:
            A, B = factorize(lin.weight.detach(), rank)
            set_module(model, name, LowRankLinear(A, B, None if lin.bias is None else lin.bias.detach()))
    record = Record.of(names, shapes, plan, "uniform" if uniform else "welore")
    model.pissa_compressed = record  # type: ignore[assignment]
    return record


def load_compressed(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """The model and tokenizer of a ``pissa compress`` folder: the architecture of its config.json with the
    recorded LRCMs as :class:`LowRankLinear`, every tensor loaded from its safetensors files (a tied head re-tied)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = Path(folder).expanduser()
    record = Record.read(root)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(root), dtype=dtype)
    for name, (out, inp, rank) in record.layers.items():
        if rank is not None:
            bias = cast(nn.Linear, model.get_submodule(name)).bias
            set_module(model, name, LowRankLinear(torch.empty(rank, inp, dtype=dtype), torch.empty(out, rank, dtype=dtype),
                                                  None if bias is None else bias.detach()))
    state: dict[str, Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise PissaError(f"{root} does not match its {RECORD}: {(unexpected or sorted(set(missing) - tied))[0]} "
                         "is unexpected or missing; rerun pissa compress")
    model.tie_weights()
    model.pissa_compressed = record
    return model, hub.finish_loaded(model, AutoTokenizer.from_pretrained(root), str(root), "causal-lm")


def write_record(model: nn.Module, folder: Path) -> None:
    """Write a compressed model's :data:`RECORD` into ``folder`` (nothing for any other model)."""
    record = getattr(model, "pissa_compressed", None)
    if record is not None:
        (folder / RECORD).write_text(record.to_json())


def train_factors(model: nn.Module) -> int:
    """Freeze everything but the :class:`LowRankLinear` factors (WeLore-COFT); returns the trainable count."""
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    if not layers:
        raise PissaError("welore fine-tunes a compressed model: run pissa compress first, "
                         "then pissa finetune --model DIR --method welore")
    model.requires_grad_(False)
    for m in layers:
        m.A.requires_grad_(True)
        m.B.requires_grad_(True)
    return sum(m.A.numel() + m.B.numel() for m in layers)
