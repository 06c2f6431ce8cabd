"""The PEFT export: a trained adapter as a Hugging Face PEFT LoRA of rank 2r (or r) on the original base.

For a low-rank layer whose residual subtracts ``s B0 A0`` from W, the trained layer computes
``W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0]``: a LoRA on W that every LoRA server loads. Each shape
says whether it has such a form (:meth:`pissa.adapter.shapes.Shape.peft`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from safetensors.torch import save_file
from torch import Tensor, nn

from pissa.adapter.base_layers import is_conv1d
from pissa.adapter.config import AdapterConfig
from pissa.adapter.layer import PissaLinear
from pissa.adapter.save_load import _layers_or_fail, head_parameters
from pissa.errors import PissaError
from pissa.files.atomic import atomic_dir
from pissa.files.card import CARD_FILE, peft_card
from pissa.methods.factors import truncate
from pissa.methods.registry import METHODS


def peft_factors(layer: PissaLinear, export_rank: Literal["r", "2r"]) -> tuple[Tensor, Tensor]:
    """PEFT LoRA factors ``(lora_A (k, in), lora_B (out, k))`` of one layer's update, in float32; PEFT's scaling
    stays the layer's s (:meth:`pissa.adapter.shapes.Shape.peft`; low-rank: ``s [B | -B0] [A ; A0]`` of rank 2r,
    or r where the method's ``export_rank`` says so). A shape without a LoRA form is a PissaError saying to
    export the merged model instead."""
    factors = layer.shape.peft(layer.tensors(), layer.scaling, layer.train_parts, export_rank)
    if factors is None:
        raise PissaError(f"a {layer.shape.name} adapter has no LoRA form for PEFT; merge it instead "
                         "(pissa.merge, or `pissa export ADAPTER --out DIR --merged`) and serve the merged model")
    return factors


VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""``max_lora_rank`` values vLLM accepts: a server of an export of rank r needs the first one >= r."""


EXPORT_NOTE = "pissa_export.json"
"""Written beside a PEFT export: its rank, the server rank it needs, and any truncation error."""


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_peft` wrote: the LoRA rank (the largest layer's), the smallest vLLM ``max_lora_rank`` that
    serves it, and (with
    ``max_rank``) the relative Frobenius error of the truncation over all layers and the worst layer's."""

    path: Path
    rank: int
    full_rank: int
    max_lora_rank: int | None
    relative_error: float
    worst_layer_error: float
    modules_to_save: list[str]


@dataclass(frozen=True)
class LoraForm:
    """A trained model's update as one plain LoRA per layer, the form every export writes (PEFT, GGUF).

    ``factors[name] = (A (k, in), B (out, k))`` in float32 with the layer's delta ``scalings[name] * B @ A``
    (:func:`peft_factors`, then :func:`pissa.methods.factors.truncate` to ``max_rank``). ``full_rank``: the
    largest rank before truncation; ``relative_error`` / ``worst_layer_error``: the truncation's relative
    Frobenius error over all layers and for the worst one (0 without truncation)."""

    factors: dict[str, tuple[Tensor, Tensor]]
    scalings: dict[str, float]
    full_rank: int
    relative_error: float
    worst_layer_error: float

    @property
    def ranks(self) -> dict[str, int]:
        return {name: A.shape[0] for name, (A, _) in self.factors.items()}


def lora_form(model: nn.Module, max_rank: int | None = None) -> LoraForm:
    """The LoRA form of every adapted layer of ``model`` (:class:`LoraForm`): rank 2r (or r, see
    :func:`peft_factors`), or each layer's best rank-``max_rank`` approximation of its update; warns when the
    residual is quantized (the LoRA applies to the unquantized base)."""
    layers = _layers_or_fail(model)
    cfg: AdapterConfig = model.pissa_config  # type: ignore[assignment]
    if cfg.quantize is not None:
        warnings.warn(
            "the exported LoRA applies to the unquantized base weights; outputs differ from the "
            "4-bit-residual model by the residual's quantization error",
            stacklevel=3,
        )
    export_rank = METHODS[cfg.method].export_rank
    factors = {name: peft_factors(layer, export_rank) for name, layer in layers}
    if max_rank is not None and not max_rank >= 1:
        raise PissaError(f"`max_rank` must be >= 1, got {max_rank}")
    full = max(A.shape[0] for A, _ in factors.values())
    kept = discarded = 0.0
    worst = 0.0
    for name, (A, B) in list(factors.items()):
        if max_rank is not None and max_rank < A.shape[0]:
            A_k, B_k, S = truncate(A, B, max_rank)
            factors[name] = (A_k, B_k)
            lost, total = float((S[max_rank:] ** 2).sum()), float((S**2).sum())
            kept, discarded = kept + total, discarded + lost
            worst = max(worst, (lost / total) ** 0.5 if total > 0 else 0.0)
    return LoraForm(factors, {name: layer.scaling for name, layer in layers}, full,
                    (discarded / kept) ** 0.5 if kept > 0 else 0.0, worst)


def common_alpha(form: LoraForm) -> tuple[int, float]:
    """``(r, alpha)``: the most common rank (the larger on a tie) and the LoRA alpha ``s * r`` of its layers, so that
    a server's scaling ``alpha / r`` is the pissa scaling s of those layers."""
    ranks = form.ranks
    r = max(set(ranks.values()), key=lambda k: (list(ranks.values()).count(k), k))
    return r, form.scalings[next(n for n, k in ranks.items() if k == r)] * r


def export_report(path: str | os.PathLike, form: LoraForm, modules_to_save: list[str]) -> ExportReport:
    """What an export of ``form`` to ``path`` wrote (:class:`ExportReport`)."""
    rank = max(form.ranks.values())
    return ExportReport(path=Path(path), rank=rank, full_rank=form.full_rank,
                        max_lora_rank=next((v for v in VLLM_RANKS if v >= rank), None),
                        relative_error=form.relative_error, worst_layer_error=form.worst_layer_error,
                        modules_to_save=modules_to_save)


def export_peft(model: nn.Module, path: str | os.PathLike, max_rank: int | None = None, *,
                training: dict[str, Any] | None = None) -> ExportReport:
    """Write a Hugging Face PEFT LoRA adapter that reproduces the trained model on the original base.

    Rank 2r (or r, see :func:`peft_factors`). ``max_rank=K`` below that writes each layer's best
    rank-K approximation of its update instead (:func:`pissa.methods.factors.truncate`) and reports the
    error it introduced: ``sqrt(sum of the discarded S_i^2) / ||update||_F``, over all layers and
    for the worst one. Trained parameters outside the adapters (a classification head) go in as
    PEFT ``modules_to_save``, so the PEFT model has the trained head too. Layers of different ranks
    (``AdapterConfig.rank_pattern``, EVA) go in as PEFT ``rank_pattern`` with an ``alpha_pattern``
    that keeps each layer's scaling. The folder gets a model card (``README.md``, library_name peft and
    base_model, :func:`pissa.files.card.peft_card`); ``training``: the run that trained the adapter, for it.
    """
    layers = _layers_or_fail(model)
    cfg: AdapterConfig = model.pissa_config  # type: ignore[assignment]
    form = lora_form(model, max_rank)
    factors, scalings, ranks = form.factors, form.scalings, form.ranks
    # PEFT's LoRA scales each layer by lora_alpha / r: the most common rank is "r"; layers of another rank
    # (rank_pattern, EVA) get their own rank and alpha so that every layer keeps its pissa scaling
    r, alpha = common_alpha(form)
    rank_pattern = {name: k for name, k in ranks.items() if k != r}
    alphas = {name: scalings[name] * k for name, k in ranks.items()}
    alpha_pattern = {name: a for name, a in alphas.items() if a != alpha}
    tensors = {}
    kernels = {name: layer.residual.weight.shape for name, layer in layers if isinstance(layer.residual, nn.Conv2d)}
    for name, (A, B) in factors.items():
        if name in kernels:  # PEFT's Conv2d LoRA: lora_A a conv of the layer's kernel size, lora_B a 1x1 conv
            A, B = A.reshape(A.shape[0], *kernels[name][1:]), B[:, :, None, None]
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
    head = head_parameters(model)
    head_modules = sorted({n.rsplit(".", 1)[0] for n in head})
    for module in head_modules:  # PEFT's ModulesToSaveWrapper replaces the whole module: every parameter of it
        for pname, p in model.get_submodule(module).named_parameters():
            tensors[f"base_model.model.{module}.{pname}"] = p.detach().float().contiguous().cpu()
    names = [name for name, _ in layers]
    arch = type(model).__name__
    task = ("CAUSAL_LM" if arch.endswith(("ForCausalLM", "LMHeadModel"))
            else "SEQ_CLS" if arch.endswith("ForSequenceClassification") else None)
    config = {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(n): k for n, k in rank_pattern.items()},  # PEFT matches (.*\.)?(key)$
        "alpha_pattern": {re.escape(n): a for n, a in alpha_pattern.items()},
        "lora_dropout": cfg.dropout,
        "target_modules": "^(" + "|".join(re.escape(n) for n in names) + ")$",
        # a quantized residual (quantized.QuantizedLinear) remembers whether its base was a Conv1D
        "fan_in_fan_out": all(is_conv1d(layer.residual) or getattr(layer.residual, "conv1d", False) for _, layer in layers),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": head_modules or None,
    }
    report = export_report(path, form, head_modules)
    note = {k: v for k, v in dataclasses.asdict(report).items() if k != "path"}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (tmp / EXPORT_NOTE).write_text(json.dumps(note, indent=2))
        card = peft_card(cfg.to_dict(), getattr(model, "pissa_base", None), len(layers), report.rank, training)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
    return report
